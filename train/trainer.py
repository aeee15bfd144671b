"""The training skeleton both phases share: one run-config base and one Accelerate trainer (contrastors' ``BaseTrainer``
with per-objective subclasses; sentence-transformers' training arguments layered on one base).

- ``ChromaMoeRunConfig``: the run keys of both phases (output, model, seed, lr schedule, AdamW, clipping, precision,
  logging and checkpoint cadence, resume), declared and range-checked once. ``Phase1Config`` / ``Phase2Config``
  subclass it with their own keys and their own defaults of the schedule keys.
- ``ChromaMoeTrainer``: owns ``accelerator.prepare`` (AdamW + warmup-cosine over the phase's model), resume, the
  optimizer-step tail (clip, NaN/inf guard, optimizer and scheduler step, zero_grad, router-bias update), the logging
  cadence (tracker, ``train_log.jsonl``, tqdm), atomic checkpoints with the routing heatmap, and the final save, for
  which every process takes part in ``accelerator.get_state_dict`` (the FSDP / ZeRO-3-safe way of transformers'
  ``run_mlm_no_trainer.py``). A phase subclass builds its model and data in ``__init__`` and supplies ``step`` (one
  optimizer step's batches, loss and backward, ending in ``optimizer_step``), ``metrics`` (its log figures),
  ``events`` (figures logged off the cadence: dev evaluation, upcycling), ``checkpoint_state`` and ``write_final``.

Functions of ``train.common`` are called through the module, so a test patches them where they are defined.
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from configuration_chroma_moe import PRESETS, ChromaMoeConfig
from train import common

logger = logging.getLogger(__name__)

TRAIN_LOG = "train_log.jsonl"
HEATMAP_FILE = "routing_heatmap.png"
MODEL_CONFIG_KEYS = frozenset(inspect.signature(ChromaMoeConfig.__init__).parameters) - {"self", "kwargs"}
# Keys that shape the lr schedule: a resume with them changed continues on the schedule they give now (with a warning).
SCHEDULE_KEYS = ("max_steps", "warmup_steps", "learning_rate", "min_learning_rate")


@dataclass(kw_only=True)
class ChromaMoeRunConfig:
    """The run keys both phases share (YAML keys; ``key=value`` on the command line overrides them). A phase config
    subclasses it, adding its own keys and the defaults of the keys left without one here.

    Args:
        output_dir: Where ``logs/``, ``checkpoints/``, ``train_log.jsonl``, ``run_config.json`` and ``final/`` go
            (``$VARS`` expand, as in every path of a run config).
        model: ``preset`` (a ``ChromaMoeConfig`` preset name) plus any ``ChromaMoeConfig`` fields to override.
        seed: Seeds model init, the data order and dropout.
        max_steps: Optimizer steps of the whole run (the cosine ends here).
        warmup_steps: Linear warmup steps.
        learning_rate, min_learning_rate: Warmup, then cosine from the first to the second. A resumed run takes the
            schedule keys (``SCHEDULE_KEYS``) from its current config, continuing at its step.
        weight_decay, adam_beta1, adam_beta2, adam_epsilon: AdamW.
        max_grad_norm: Gradient clipping (global L2 norm; 0 = none).
        mixed_precision: ``auto`` (bf16 on a GPU that supports it, else fp32), ``no`` or ``bf16``.
        log_every: Steps between logs (the last step is always logged).
        checkpoint_every: Steps between checkpoints, plus one at the last step (0 = no checkpoints).
        resume: null (a fresh run; refused if ``output_dir`` already has a checkpoint), ``auto`` (the latest checkpoint
            in ``output_dir``, or a fresh run when there is none) or a checkpoint folder.
    """

    output_dir: str
    model: dict = field(default_factory=lambda: {"preset": "chroma-moe-tiny"})
    seed: int = 0
    max_steps: int
    warmup_steps: int
    learning_rate: float
    min_learning_rate: float
    weight_decay: float
    adam_beta1: float = 0.9
    adam_beta2: float
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"
    log_every: int
    checkpoint_every: int
    resume: str | None = None

    def refuse(self, key: str, why: str) -> NoReturn:
        """Raise the ``ConfigError`` of config key ``key``: ``config key 'key'=value: why``."""
        raise common.ConfigError(f"config key {key!r}={getattr(self, key)!r}: {why}")

    def __post_init__(self) -> None:
        for key in ("max_steps", "learning_rate", "adam_epsilon", "log_every"):
            if not getattr(self, key) > 0:
                self.refuse(key, "must be > 0")
        for key in ("weight_decay", "max_grad_norm", "checkpoint_every"):
            if getattr(self, key) < 0:
                self.refuse(key, "must be >= 0")
        if not 0 <= self.warmup_steps < self.max_steps:
            self.refuse("warmup_steps", f"must be in [0, max_steps={self.max_steps})")
        if not 0 <= self.min_learning_rate <= self.learning_rate:
            self.refuse("min_learning_rate", f"must be in [0, learning_rate={self.learning_rate}]")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, key) < 1:
                self.refuse(key, "must be in [0, 1)")
        if self.mixed_precision not in common.MIXED_PRECISION_CHOICES:
            self.refuse("mixed_precision", f"must be one of {common.MIXED_PRECISION_CHOICES}")
        unknown = sorted(set(self.model) - MODEL_CONFIG_KEYS - {"preset"})
        if unknown:
            raise common.ConfigError(f"config key 'model': unknown ChromaMoeConfig field(s) {unknown}")
        if self.model.get("preset") is None:  # `model.preset=null` on the command line removes a YAML's preset
            self.model.pop("preset", None)
        else:
            self.model_config()

    @classmethod
    def from_command_line(cls, argv: Sequence[str] | None, script: str, description: str) -> ChromaMoeRunConfig:
        """The run config of ``accelerate launch train/<script>.py --config YAML [key=value ...] [--resume
        [CHECKPOINT]]`` (``common.config_from_command_line``)."""
        return common.config_from_command_line(
            cls, argv, prog=f"accelerate launch train/{script}.py",
            description=f"{description} (see the module docstring).", example=f"train/configs/{script}_small.yaml",
        )  # fmt: skip

    def model_config(self) -> ChromaMoeConfig:
        """The config of a fresh model: ``model.preset`` with the other ``model`` keys as overrides."""
        overrides = {key: value for key, value in self.model.items() if key != "preset"}
        preset = self.model.get("preset")
        if preset not in PRESETS:
            raise common.ConfigError(f"config key 'model.preset'={preset!r}: expected one of {sorted(PRESETS)}")
        try:
            return ChromaMoeConfig.from_preset(preset, **overrides)
        except (ValueError, TypeError) as err:
            raise common.ConfigError(f"config key 'model': {err}") from err


@dataclass
class ChromaMoeStepStats:
    """One optimizer step, reduced over micro-batches and processes.

    Args:
        loss: The phase's training loss of the step (the value the NaN guard checks).
        grad_norm: Global L2 gradient norm before clipping.
        lrs: The step's learning rate of each optimizer param group.
        expert_counts: ``(moe_layers, experts)`` routed-token counts summed over the step, or None for a dense model.
        values: The phase's own figures of the step, read by its ``metrics``.
        seconds: Wall time of the step (batches, forward, backward, optimizer), set by the loop.
    """

    loss: float
    grad_norm: float
    lrs: list[float]
    expert_counts: torch.Tensor | None
    values: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


class ChromaMoeTrainer(abc.ABC):
    """The Accelerate loop shared by both phases; a phase subclass builds its model and data, then ``train()`` runs.

    The subclass's ``__init__`` calls this one (which finds the checkpoint to resume, before the model is built), then
    ``prepare`` with its model and ``load_resume``. ``train`` runs ``step`` for each remaining optimizer step, logs
    ``metrics`` every ``log_every`` steps and ``events`` whenever they return figures, checkpoints every
    ``checkpoint_every`` steps and at the end, then saves ``final/`` through ``write_final``.
    """

    name: ClassVar[str]  # "phase 1": the tracker project (without spaces) and the progress bar's label
    resume_fixed_keys: ClassVar[tuple[str, ...]]  # config keys a resume may not change (``common.resolve_resume``)
    schedule_keys: ClassVar[tuple[str, ...]] = SCHEDULE_KEYS

    def __init__(self, cfg: ChromaMoeRunConfig, accelerator: Accelerator) -> None:
        self.cfg = cfg
        self.acc = accelerator
        self.output_dir = Path(common.expand_path(cfg.output_dir))
        self.checkpoints_dir = self.output_dir / "checkpoints"
        self.resume_from = common.resolve_resume(
            cfg.resume, self.checkpoints_dir, dataclasses.asdict(cfg), self.resume_fixed_keys, self.schedule_keys
        )
        self.resume_state = common.read_trainer_state(self.resume_from) if self.resume_from else None
        self.start_step = 0
        self.last_checkpoint: Path | None = None
        self.losses: list[float] = []
        self.learning_rates: list[float] = []
        self.seconds = 0.0
        self._counts: torch.Tensor | None = None  # (moe_layers, experts) since the last checkpoint, for its heatmap
        self._counts_from = 0

    # ---- set-up --------------------------------------------------------------------------------------------------

    def prepare(
        self,
        model: torch.nn.Module,
        micro_batch_size: int,
        extra_groups: Sequence[dict[str, Any]] = (),
        checkpointed: Sequence[Any] = (),
        start_step: int = 0,
    ) -> None:
        """AdamW over ``model`` (``common.build_optimizer``; ``extra_groups`` are parameters outside it, clipped with
        it) and the warmup-cosine schedule at ``start_step``, prepared by the accelerator into ``self.model``,
        ``self.optimizer``, ``self.scheduler``; ``checkpointed`` objects (with ``state_dict``) join the checkpoints.
        Called again mid-run (upcycling) after ``accelerator.free_memory()``."""
        cfg = self.cfg
        model.train()
        optimizer = common.build_optimizer(
            model, cfg.learning_rate, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_epsilon,
            extra_groups=extra_groups,
        )  # fmt: skip
        scheduler = common.build_scheduler(
            optimizer, cfg.min_learning_rate / cfg.learning_rate, cfg.warmup_steps, cfg.max_steps, start_step=start_step
        )
        common.configure_deepspeed(self.acc, micro_batch_size, self.acc.gradient_accumulation_steps, cfg.max_grad_norm)
        self.model, self.optimizer, self.scheduler = self.acc.prepare(model, optimizer, scheduler)
        if checkpointed:
            self.acc.register_for_checkpointing(*checkpointed)
        self.clip_parameters = [*self.model.parameters(), *(p for group in extra_groups for p in group["params"])]

    def load_resume(self) -> None:
        """Restore the checkpoint ``resolve_resume`` chose (if any) into the prepared objects and RNG states."""
        if self.resume_from is None:
            return
        if self.resume_state["step"] >= self.cfg.max_steps:
            self.cfg.refuse(
                "max_steps", f"{self.resume_from} is at step {self.resume_state['step']}: nothing left to train; "
                f"resume with max_steps > {self.resume_state['step']}"
            )  # fmt: skip
        common.load_checkpoint(self.acc, self.resume_from)
        self.start_step = self.resume_state["step"]
        self.last_checkpoint = self.resume_from
        self.info(f"resumed from {self.resume_from} at step {self.start_step}")

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.acc.unwrap_model(self.model)

    def moe_layers(self) -> list[int]:
        config = self.unwrapped.config
        return [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]

    def info(self, message: str) -> None:
        if self.acc.is_main_process:
            logger.info(message)

    # ---- what a phase supplies -----------------------------------------------------------------------------------

    @abc.abstractmethod
    def step(self, step: int) -> ChromaMoeStepStats:
        """Optimizer step ``step`` (0-based): this process's batches, forward and backward, then ``optimizer_step``."""

    @abc.abstractmethod
    def metrics(self, window: list[ChromaMoeStepStats]) -> dict[str, float]:
        """The phase's log figures over the steps since the last log (besides lr, grad norm and expert load)."""

    def events(self, step: int, stats: ChromaMoeStepStats | None) -> dict[str, float]:
        """Figures to log at ``step`` off the cadence (``stats`` is None at step 0 of a fresh run). Collective: every
        process calls it."""
        return {}

    def checkpoint_state(self, step: int) -> tuple[dict[str, Any], Callable[[Path], None] | None]:
        """(JSON-able trainer state beside the step and config, a writer of extra files into the checkpoint folder)."""
        return {}, None

    @abc.abstractmethod
    def write_final(self, folder: Path, state_dict: dict[str, torch.Tensor]) -> None:
        """Write the final model folder from the full ``state_dict`` (empty on processes that hold none). Every
        process calls it; only the main one writes."""

    # ---- the step tail, logs, checkpoints ------------------------------------------------------------------------

    def optimizer_step(
        self, step: int, loss: float, expert_counts: torch.Tensor | None
    ) -> tuple[float, list[float]]:
        """After the step's backward passes: clip, stop on a non-finite ``loss`` or gradient norm, step the optimizer
        and the schedule, zero the gradients, move the routers' balancing biases by the step's global ``expert_counts``
        ``(moe_layers, experts)``. Returns (gradient norm before clipping, each param group's lr of this step)."""
        grad_norm = float(self.acc.clip_grad_norm_(self.clip_parameters, self.cfg.max_grad_norm or math.inf))
        common.raise_if_not_finite({"loss": loss, "grad_norm": grad_norm}, step + 1, self.last_checkpoint)
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if expert_counts is not None:
            self.unwrapped.update_router_bias(tuple(expert_counts))
            if self._counts is None:
                self._counts, self._counts_from = expert_counts.cpu().clone(), step
            else:
                self._counts += expert_counts.cpu()
        return grad_norm, lrs

    def reset_expert_counts(self) -> None:
        """Forget the expert load gathered for the next heatmap (the experts changed: upcycling)."""
        self._counts = None

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """To the trackers, and (main process) one ``train_log.jsonl`` line without the per-expert load shares."""
        self.acc.log(dict(metrics), step=step)
        if self.acc.is_main_process:
            record = {"step": step, **{key: value for key, value in metrics.items() if not key.startswith("moe/")}}
            with (self.output_dir / TRAIN_LOG).open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def _window_metrics(self, window: list[ChromaMoeStepStats]) -> dict[str, float]:
        metrics = {**self.metrics(window), "train/lr": window[-1].lrs[0], "train/grad_norm": window[-1].grad_norm}
        counts = [stats.expert_counts for stats in window if stats.expert_counts is not None]
        if counts and all(c.shape == counts[0].shape for c in counts):  # an upcycling window mixes no shapes
            metrics.update(common.expert_load_stats(torch.stack(counts).sum(dim=0).cpu(), self.moe_layers()))
        return metrics

    def save(self, step: int) -> None:
        """The atomic checkpoint after ``step`` steps (``common.save_checkpoint``), with the routing heatmap of the
        steps since the previous one."""
        state, write_phase_files = self.checkpoint_state(step)
        state = {"step": step, "config": dataclasses.asdict(self.cfg), **state}
        counts, layers, first = self._counts, self.moe_layers(), self._counts_from

        def extras(folder: Path) -> None:
            if write_phase_files is not None:
                write_phase_files(folder)
            if counts is not None:
                title = f"expert-load share, steps {first + 1}-{step}"
                common.save_routing_heatmap(counts, layers, folder / HEATMAP_FILE, title)

        self.last_checkpoint = common.save_checkpoint(self.acc, self.checkpoints_dir, step, state, extras)
        self._counts = None

    def save_final(self) -> Path:
        """``output_dir/final`` through ``write_final``. Every process takes part in ``get_state_dict`` (it gathers a
        sharded model) and in ``save_pretrained`` (it creates and lists the folder; only the main process writes), so
        the old folder is removed before the barrier: removed after it, it could vanish under another process."""
        final = self.output_dir / "final"
        if self.acc.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
        self.acc.wait_for_everyone()
        self.write_final(final, self.acc.get_state_dict(self.model))
        self.acc.wait_for_everyone()
        return final

    def _truncate_log(self, log_file: Path) -> None:
        """Keep the ``train_log.jsonl`` lines of the steps up to the checkpoint resumed from (none in a fresh run): a
        rerun rewrites whatever was logged after it. A line cut by a crash mid-write is dropped with a warning."""
        if not log_file.is_file():
            return
        kept = []
        for number, line in enumerate(log_file.read_text(encoding="utf-8").splitlines(), start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                logger.warning(f"{log_file}:{number}: unreadable log line dropped (a write cut short?): {line[:80]!r}")
                continue
            if self.resume_from is not None and record["step"] <= self.start_step:
                kept.append(line)
        log_file.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    # ---- the loop ------------------------------------------------------------------------------------------------

    def train(self) -> Path:
        """Steps ``start_step`` … ``max_steps - 1``, then the final save; returns the final folder."""
        cfg, acc = self.cfg, self.acc
        acc.init_trackers(self.name.replace(" ", ""), config=common.flatten_for_tracker(dataclasses.asdict(cfg)))
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            config_json = json.dumps(dataclasses.asdict(cfg), indent=1)
            (self.output_dir / common.RUN_CONFIG_FILE).write_text(config_json, encoding="utf-8")
            self._truncate_log(self.output_dir / TRAIN_LOG)
        if self.start_step == 0:
            first = self.events(0, None)
            if first:
                self.log(0, first)
        window: list[ChromaMoeStepStats] = []
        bar = tqdm(total=cfg.max_steps, initial=self.start_step, desc=self.name, unit="step",
                   disable=not acc.is_main_process)  # fmt: skip
        for step in range(self.start_step, cfg.max_steps):
            started = time.perf_counter()
            stats = self.step(step)
            stats.seconds = time.perf_counter() - started
            self.seconds += stats.seconds
            self.losses.append(stats.loss)
            self.learning_rates.append(stats.lrs[0])
            window.append(stats)
            done = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{stats.loss:.4f}", lr=f"{stats.lrs[0]:.2e}")
            metrics: dict[str, float] = {}
            if done % cfg.log_every == 0 or done == cfg.max_steps:
                metrics, window = self._window_metrics(window), []
            metrics.update(self.events(done, stats))
            if metrics:
                self.log(done, metrics)
            if cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == cfg.max_steps):
                self.save(done)
        bar.close()
        return self.save_final()

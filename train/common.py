"""Training machinery shared by phase 1 (masked-LM pretraining) and phase 2 (contrastive tuning).

- Config: a YAML mapping plus ``key=value`` command-line overrides (and ``--resume``, in any order), turned into a
  dataclass whose field types are enforced here and whose ``__post_init__`` checks value ranges; every error names the
  offending key.
- Optimisation: AdamW with the usual no-decay groups and a linear-warmup + cosine schedule (the seed's recipe) that a
  resumed run rebuilds from its current config, and the token-budget → gradient-accumulation arithmetic.
- Accelerate glue: the ``Accelerator`` with tensorboard tracking, atomic checkpoints (``save_state`` into a temporary
  folder, then one ``os.replace``), resume, and a NaN/inf guard.
- MoE monitoring: per-layer expert-load statistics and the layers × experts routing heatmap.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import string
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import yaml
from accelerate import Accelerator
from accelerate.utils import (
    InitProcessGroupKwargs,
    ProjectConfiguration,
    parse_flag_from_env,
)
from torch import nn

from train.data import shared_data_dir

ConfigT = TypeVar("ConfigT")
CHECKPOINT_PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-"
TRAINER_STATE_FILE = "trainer_state.json"
RUN_CONFIG_FILE = "run_config.json"  # a run's resolved config, written into its output_dir when it starts
MIXED_PRECISION_CHOICES = ("auto", "no", "bf16")

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# Config: YAML + key=value overrides -> validated dataclass.
# --------------------------------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the key."""


INPUT_ERRORS = (ValueError, FileNotFoundError, FileExistsError)  # a bad config, argument, data row or path


def run_command_line(main: Callable[[], object]) -> None:
    """Run a command's ``main()``. Bad input (``INPUT_ERRORS``, e.g. a `ConfigError` or a data row's ValueError; their
    messages name the key, row or path) prints ``error: <message>`` and exits with status 1 instead of a traceback."""
    try:
        main()
    except INPUT_ERRORS as error:
        raise SystemExit(f"error: {error}") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b=value"`` → (["a", "b"], value parsed as YAML, so ``3``, ``true``, ``null`` and ``[1, 2]`` work)."""
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            f"bad override {item!r}: expected key=value "
            "(dotted keys reach into mappings, e.g. model.n_routed_experts=0)"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {key}: cannot parse value {raw!r} as YAML ({err})") from err
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides to a config mapping (a copy); dotted keys set entries of nested mappings."""
    result = json.loads(json.dumps(raw))
    for item in overrides:
        path, value = parse_override(item)
        target = result
        for depth, part in enumerate(path[:-1]):
            child = target.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(path[: depth + 1])} is not a mapping")
            target = child
        target[path[-1]] = value
    return result


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field annotation; accept the lossless conversions a YAML file needs (``3e-4`` is a
    string to PyYAML, ``2.0e6`` a float where an int is expected)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"config key {key!r}={value!r}: expected {_type_name(annotation)}"
        )
    base = origin or annotation
    fail = ConfigError(f"config key {key!r}={value!r}: expected {_type_name(annotation)}")
    if base is bool:
        if isinstance(value, bool):
            return value
        raise fail
    if base is int:
        if isinstance(value, bool):
            raise fail
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise fail from None
            if number.is_integer():
                return int(number)
        raise fail
    if base is float:
        if isinstance(value, bool):
            raise fail
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise fail from None
        raise fail
    if base is str:
        if isinstance(value, str):
            return value
        raise fail
    if base in (list, dict):
        if isinstance(value, base):
            return value
        raise fail
    raise TypeError(f"config field {key!r} has an unsupported annotation {annotation!r}")


def config_from_dict(cls: type[ConfigT], raw: Mapping[str, Any], source: str = "config") -> ConfigT:
    """Build the config dataclass ``cls`` from a mapping: unknown and missing keys and wrong types raise
    ``ConfigError`` naming the key; value checks are the dataclass's own ``__post_init__``."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a mapping of config keys, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown config key(s) {unknown}; allowed: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, spec in fields.items():
        if name in raw:
            values[name] = _coerce(name, raw[name], hints[name])
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: required config key {name!r} is missing")
    return cls(**values)


def check_entry(where: str, entry: Any, allowed: frozenset[str], expected: str) -> None:
    """A config list's entry (``where``, e.g. ``data[0]``) must be a mapping whose keys are among ``allowed``;
    ``expected`` names them for the error (``spec, weight, text_field``)."""
    if not isinstance(entry, Mapping):
        raise ConfigError(f"config key {where!r}={entry!r}: expected a mapping with {expected}")
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise ConfigError(f"config key {where!r}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")


def load_config(cls: type[ConfigT], path: str | Path | None, overrides: Sequence[str] = ()) -> ConfigT:
    """Read a YAML config file (or start from the defaults when ``path`` is None), apply overrides, validate.
    ``FileNotFoundError`` when ``path`` is not a file; ``ConfigError`` for YAML that does not parse or is not a
    mapping."""
    raw: dict[str, Any] = {}
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            with open(path, encoding="utf-8") as handle:
                loaded = yaml.safe_load(handle)
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a YAML mapping, got {type(loaded).__name__}")
        raw = loaded or {}
    return config_from_dict(cls, apply_overrides(raw, overrides), source=str(path or "config"))


OVERRIDE_SHAPE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*=")


def config_from_command_line(
    cls: type[ConfigT], argv: Sequence[str] | None, prog: str, description: str, example: str
) -> ConfigT:
    """The run config of ``prog --config YAML [key=value ...] [--resume [CHECKPOINT]]``: the YAML file, then the
    overrides in the order given, then ``--resume`` (``resume=auto`` without a value). Overrides may come before or
    after ``--resume``; a word after ``--resume`` shaped like an override (``max_steps=12``, ``model.x=1``) is one, not
    the checkpoint, so ``--resume max_steps=12`` resumes the latest checkpoint with ``max_steps`` 12. A checkpoint
    path may still contain ``=`` after a ``/`` (``runs/lr=1e-3/checkpoints/checkpoint-00000006``)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, help=f"YAML config, e.g. {example}")
    parser.add_argument(
        "--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
        help="continue from the latest checkpoint in output_dir (no value) or from the given checkpoint folder",
    )  # fmt: skip
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. max_steps=100")
    words = list(sys.argv[1:] if argv is None else argv)
    for index, word in enumerate(words[:-1]):
        if word == "--resume" and OVERRIDE_SHAPE.match(words[index + 1]):
            words[index] = "--resume=auto"
    args = parser.parse_intermixed_args(words)
    config = load_config(cls, args.config, args.overrides)
    return config if args.resume is None else dataclasses.replace(config, resume=args.resume)


def expand_path(value: str) -> str:
    """Expand ``$VARS`` in a path; ``$CHROMA_SHARED_DATA`` defaults to ``<repo root>/../shared/data``."""
    variables = {**os.environ, "CHROMA_SHARED_DATA": str(shared_data_dir())}
    return string.Template(value).safe_substitute(variables)


def flatten_for_tracker(config: Mapping[str, Any], prefix: str = "") -> dict[str, int | float | str | bool]:
    """Tensorboard's hparams accept scalars and strings only: nested mappings become dotted keys, the rest JSON."""
    flat: dict[str, int | float | str | bool] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_for_tracker(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


# --------------------------------------------------------------------------------------------------------------------
# Optimisation.
# --------------------------------------------------------------------------------------------------------------------


def gradient_accumulation_steps(
    global_batch_tokens: int, per_device_batch_size: int, seq_len: int, num_processes: int
) -> int:
    """Micro-batches per optimizer step so that one step sees exactly ``global_batch_tokens`` tokens:
    ``global_batch_tokens / (per_device_batch_size · seq_len · num_processes)``, which must be a whole number."""
    for name, value in (("global_batch_tokens", global_batch_tokens), ("per_device_batch_size", per_device_batch_size),
                        ("seq_len", seq_len), ("num_processes", num_processes)):  # fmt: skip
        if value <= 0:
            raise ConfigError(f"{name}={value}: must be > 0")
    tokens_per_micro_batch = per_device_batch_size * seq_len * num_processes
    if global_batch_tokens % tokens_per_micro_batch:
        raise ConfigError(
            f"global_batch_tokens={global_batch_tokens} is not a multiple of "
            f"per_device_batch_size={per_device_batch_size} "
            f"× seq_len={seq_len} × num_processes={num_processes} = {tokens_per_micro_batch} tokens per micro-batch"
        )
    return global_batch_tokens // tokens_per_micro_batch


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay the matrices, not the 1-D parameters (norm weights, biases) nor embedding tables (BERT's and
    GPT-2's convention; decaying a norm's gain or a rare token's embedding only drags it towards zero). The router's
    ``expert_bias`` is a buffer moved outside autograd, so it never reaches the optimizer. Tied parameters appear
    once."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in model.parameters():  # deduplicates tied parameters
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or id(param) in embedding_ids else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    extra_groups: Sequence[dict[str, Any]] = (),
) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019) over ``parameter_groups`` of ``model`` at ``lr``, then ``extra_groups``
    (parameters outside the model with their own ``lr`` / ``weight_decay``, e.g. the InfoNCE temperature)."""
    return torch.optim.AdamW([*parameter_groups(model, weight_decay), *extra_groups], lr=lr, betas=betas, eps=eps)


class WarmupCosine:
    """LR multiplier for optimizer step ``t`` (0-based): linear warmup to the peak over ``warmup_steps`` (step 0 already
    gets ``1/warmup_steps``), then a half cosine from the peak down to ``min_ratio · peak`` at ``total_steps``
    (Loshchilov & Hutter 2017, without restarts). A callable object, so ``LambdaLR.state_dict`` stores its fields."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosineLR(torch.optim.lr_scheduler.LambdaLR):
    """``LambdaLR`` over ``WarmupCosine`` whose checkpointed state is the step count only. The schedule itself (each
    group's peak lr, warmup, total steps, minimum ratio) comes from the run's current config, so a resumed run continues
    at its step on the schedule that config gives: resuming a 6-step run with ``max_steps=12`` gives steps 7-12
    exactly the lrs of a fresh 12-step run (``resolve_resume`` warns which schedule keys changed)."""

    def state_dict(self) -> dict[str, int]:
        return {"last_epoch": self.last_epoch, "_step_count": self._step_count}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Take the step from ``state_dict`` (older checkpoints hold the whole ``LambdaLR`` state; the rest is ignored)
        and set every group's lr to this schedule's value there, replacing what the optimizer's state restored."""
        self.last_epoch = state_dict["last_epoch"]
        self._step_count = state_dict["_step_count"]
        self._last_lr = [base * schedule(self.last_epoch) for base, schedule in zip(self.base_lrs, self.lr_lambdas)]
        for group, base, lr in zip(self.optimizer.param_groups, self.base_lrs, self._last_lr):
            group["initial_lr"], group["lr"] = base, lr


def build_scheduler(
    optimizer: torch.optim.Optimizer, min_ratio: float, warmup_steps: int, total_steps: int, start_step: int = 0
) -> WarmupCosineLR:
    """Warmup + cosine for every param group from its current lr (its peak) down to ``min_ratio`` of it, positioned at
    ``start_step`` (a fresh optimizer built mid-run, as at upcycling, must continue the schedule, not restart it).
    Step it once per optimizer step."""
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    schedule = WarmupCosine(warmup_steps, total_steps, min_ratio)
    return WarmupCosineLR(optimizer, schedule, last_epoch=start_step - 1)


# --------------------------------------------------------------------------------------------------------------------
# Accelerate: accelerator, checkpoints, NaN guard.
# --------------------------------------------------------------------------------------------------------------------


def resolve_mixed_precision(setting: str) -> str:
    """``auto`` → bf16 autocast on a CUDA device that supports it, else full fp32 (CPU bf16 autocast is slower than
    fp32 on CPUs without bf16 units). fp16 is not offered: its loss scaling would not scale the MoE balance-loss
    gradient, which the model injects in backward with a fixed weight."""
    if setting not in MIXED_PRECISION_CHOICES:
        raise ConfigError(f"config key 'mixed_precision'={setting!r}: expected one of {MIXED_PRECISION_CHOICES}")
    if setting == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return setting


def make_accelerator(output_dir: str | Path, mixed_precision: str, gradient_accumulation_steps: int = 1) -> Accelerator:
    """An ``Accelerator`` logging to tensorboard under ``output_dir/logs``. Without a GPU it is told ``cpu=True``, which
    makes ``accelerate launch --multi_gpu --num_processes N`` start N gloo processes instead of N unrelated ones. The
    scheduler is stepped by the caller once per optimizer step (``step_scheduler_with_optimizer=False``), because
    Accelerate otherwise steps it once per process.

    Under DeepSpeed (``accelerate launch --use_deepspeed`` or a ``distributed_type: DEEPSPEED`` config) ``cpu=True``
    would silently turn the run into plain DDP, as Accelerate only selects DeepSpeed for ``cpu=False``; without a GPU
    the processes are then joined over gloo, the backend DeepSpeed's CPU accelerator supports."""
    output_dir = Path(output_dir)
    on_cpu = not torch.accelerator.is_available()
    deepspeed = parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")
    return Accelerator(
        cpu=on_cpu and not deepspeed,
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if on_cpu and deepspeed else None,
        mixed_precision=resolve_mixed_precision(mixed_precision),
        gradient_accumulation_steps=gradient_accumulation_steps,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        step_scheduler_with_optimizer=False,
    )


def configure_deepspeed(
    accelerator: Accelerator, micro_batch_size: int, gradient_accumulation_steps: int, max_grad_norm: float
) -> None:
    """Fill the DeepSpeed config from the run config before ``prepare`` (nothing to do without DeepSpeed).

    These loops pass ``prepare`` no DataLoader, where Accelerate would read ``train_micro_batch_size_per_gpu``.
    DeepSpeed clips inside its own ``step`` (``clip_grad_norm_`` only reads the norm back), so ``max_grad_norm`` must be
    its ``gradient_clipping``; Accelerate would fill an ``auto`` there with 1.0. Accelerate also lets a fixed
    ``gradient_accumulation_steps`` in the DeepSpeed config override ours with a warning, which would change the
    gradient's scale. A value left ``auto`` (or unset) is filled in; a fixed one that disagrees is refused."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    wanted = (
        ("train_micro_batch_size_per_gpu", micro_batch_size, "per_device_batch_size"),
        ("gradient_accumulation_steps", gradient_accumulation_steps, "global_batch_tokens"),
        ("gradient_clipping", max_grad_norm, "max_grad_norm"),
    )
    for key, value, source in wanted:
        current = plugin.deepspeed_config.get(key)
        if current in (None, "auto"):
            plugin.deepspeed_config[key] = value
        elif current != value:
            raise ConfigError(
                f"DeepSpeed config {key}={current!r} disagrees with the run config ({key}={value!r}, from config key "
                f"{source!r}): set it to auto in the DeepSpeed config"
            )


def checkpoint_step(path: Path) -> int | None:
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
    return int(match.group(1)) if match else None


def latest_checkpoint(checkpoints_dir: str | Path) -> Path | None:
    """The highest-step complete checkpoint folder (temporary folders of an interrupted save are ignored)."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return None
    complete = [p for p in root.iterdir() if checkpoint_step(p) is not None and (p / TRAINER_STATE_FILE).is_file()]
    return max(complete, key=checkpoint_step, default=None)


def save_checkpoint(
    accelerator: Accelerator,
    checkpoints_dir: str | Path,
    step: int,
    trainer_state: Mapping[str, Any],
    write_extras: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically and keep only it.

    Every process writes its part of ``accelerator.save_state`` (model safetensors, optimizer, scheduler, each process's
    RNG states; sharded engines write their shards) into a temporary folder; the main process adds
    ``trainer_state.json`` and the caller's extra files, then renames the folder into place with one ``os.replace``.
    A crash at any point leaves the previous checkpoint untouched, and a half-written folder is never mistaken for one;
    the next save removes the older checkpoints and any temporary folder a killed run left behind.
    """
    root = Path(checkpoints_dir)
    final = root / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = root / f"{TMP_PREFIX}{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()  # every process's files are in `tmp` before it is renamed (ZeRO ranks write late)
    if accelerator.is_main_process:
        with open(tmp / TRAINER_STATE_FILE, "w", encoding="utf-8") as handle:
            json.dump(dict(trainer_state), handle)
        if write_extras is not None:
            write_extras(tmp)
        os.replace(tmp, final)
        for old in root.iterdir():
            if old != final and (checkpoint_step(old) is not None or old.name.startswith(TMP_PREFIX)):
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def read_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of a checkpoint (readable before any model is built)."""
    state_file = Path(checkpoint) / TRAINER_STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a complete checkpoint: {TRAINER_STATE_FILE} is missing")
    with open(state_file, encoding="utf-8") as handle:
        return json.load(handle)


def load_checkpoint(accelerator: Accelerator, checkpoint: str | Path) -> dict[str, Any]:
    """Restore everything ``save_checkpoint`` wrote into the prepared objects (and every process's RNG states);
    return the trainer state."""
    state = read_trainer_state(checkpoint)
    accelerator.load_state(str(checkpoint))
    return state


def resolve_resume(
    resume: str | None,
    checkpoints_dir: str | Path,
    config: Mapping[str, Any],
    fixed_keys: Sequence[str],
    schedule_keys: Sequence[str] = (),
) -> Path | None:
    """The checkpoint a run continues from, per its ``resume`` setting: ``None`` starts fresh (refused when
    ``checkpoints_dir`` already holds a checkpoint, so no run is overwritten by accident); ``"auto"`` takes the latest
    checkpoint or starts fresh when there is none (one command serves the first launch and every restart after a
    preemption); anything else is a checkpoint folder. A checkpoint written under a different value of one of
    ``fixed_keys`` (compared with ``config``, the current run's config as a mapping) is refused, naming the keys. A
    changed ``schedule_keys`` value is allowed, with a warning naming the keys: the lr schedule is rebuilt from the
    current config at the checkpoint's step (``WarmupCosineLR``)."""
    existing = latest_checkpoint(checkpoints_dir)
    if resume is None:
        if existing is not None:
            raise ConfigError(
                f"config key 'resume'=None but {existing} exists: pass --resume (resume=auto) to continue that run, "
                "or choose another output_dir"
            )
        return None
    checkpoint = existing if resume == "auto" else Path(resume)
    if checkpoint is None:
        return None
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"config key 'resume'={resume!r}: no such checkpoint folder")
    saved = read_trainer_state(checkpoint)["config"]

    def changes(keys: Sequence[str]) -> tuple[list[str], str]:
        changed = [key for key in keys if saved.get(key) != config[key]]
        return changed, "; ".join(f"{key}: {saved.get(key)!r} -> {config[key]!r}" for key in changed)

    changed, details = changes(fixed_keys)
    if changed:
        raise ConfigError(
            f"cannot resume {checkpoint}: config key(s) {changed} changed since it was written ({details})"
        )
    changed, details = changes(schedule_keys)
    if changed and (not dist.is_initialized() or dist.get_rank() == 0):
        logger.warning(
            "resuming %s with changed schedule key(s) %s (%s): the lr schedule is rebuilt from the current config and "
            "continues at the checkpoint's step", checkpoint, changed, details,
        )  # fmt: skip
    return checkpoint


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient norm; the run stops without saving over the last good checkpoint."""


def raise_if_not_finite(values: Mapping[str, float], step: int, last_checkpoint: Path | None) -> None:
    """Stop with a message naming the quantity, the step and the checkpoint to go back to."""
    bad = {name: value for name, value in values.items() if not math.isfinite(value)}
    if bad:
        where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"step {step}: non-finite {', '.join(f'{k}={v}' for k, v in bad.items())}; "
            f"stopping without saving ({where}). "
            "Lower learning_rate or raise warmup_steps, then resume from that checkpoint."
        )


# --------------------------------------------------------------------------------------------------------------------
# MoE monitoring.
# --------------------------------------------------------------------------------------------------------------------


def expert_load_stats(counts: torch.Tensor, layer_indices: Sequence[int]) -> dict[str, float]:
    """Per MoE layer, from its ``(num_experts,)`` routed-token counts (rows of ``counts`` ``(layers, experts)``): each
    expert's share of the routed tokens, the entropy of that distribution normalised by log E (1 = perfectly balanced,
    0 = all tokens on one expert) and max/mean (1 = balanced, E = collapsed; the figure Switch/GShard-style capacity
    limits care about)."""
    counts = counts.double()
    num_experts = counts.shape[1]
    share = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)  # (L, E)
    entropy = -(share * share.clamp(min=1e-12).log()).sum(dim=1) / math.log(num_experts)  # (L,)
    max_over_mean = share.max(dim=1).values * num_experts  # (L,)
    stats: dict[str, float] = {}
    for row, layer in enumerate(layer_indices):
        stats[f"moe/layer{layer}/load_entropy"] = float(entropy[row])
        stats[f"moe/layer{layer}/load_max_over_mean"] = float(max_over_mean[row])
        for expert in range(num_experts):
            stats[f"moe/layer{layer}/share/expert{expert:03d}"] = float(share[row, expert])
    return stats


def save_routing_heatmap(counts: torch.Tensor, layer_indices: Sequence[int], path: str | Path, title: str) -> None:
    """PNG heatmap of each MoE layer's expert-load share (rows: layers, columns: experts), via matplotlib's Agg canvas
    (no display, no global backend switch)."""
    from matplotlib.figure import Figure

    share = (counts.double() / counts.double().sum(dim=1, keepdim=True).clamp(min=1)).numpy()  # (L, E)
    num_layers, num_experts = share.shape
    figure = Figure(
        figsize=(max(4.0, 0.25 * num_experts + 2.0), max(2.0, 0.35 * num_layers + 1.5)), layout="constrained"
    )
    axes = figure.add_subplot()
    image = axes.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0.0)
    axes.set_xlabel("expert")
    axes.set_ylabel("layer")
    axes.set_yticks(range(num_layers), [str(layer) for layer in layer_indices])
    axes.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axes, label=f"share of routed tokens (uniform = {1 / num_experts:.3f})")
    figure.savefig(path, dpi=100)

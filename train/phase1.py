"""Phase 1: bidirectional masked-LM pretraining of Chroma-MoE on a finance/retail text mixture, with Accelerate.

    accelerate launch train/phase1.py --config train/configs/phase1_small.yaml [key=value ...] [--resume [CHECKPOINT]]

(overrides may come before or after ``--resume``; see ``train.common.config_from_command_line``).

- Data: the mixture of ``train.data`` (length filter, exact-repeat dedup) is tokenised and *packed*: texts are
  concatenated, each followed by ``</s>``, and cut into blocks of ``seq_len`` tokens that start with ``<s>`` (RoBERTa's
  FULL-SENTENCES packing, Liu et al. 2019 §4.2, with fairseq's prepended BOS), so no compute goes to padding. Block
  ``i`` of the run is always the same tokens with the same mask: the masking RNG of a block is seeded by (seed, i).
  Step ``s`` takes the run's blocks ``s·B … (s+1)·B − 1`` (B blocks per step) and micro-batch ``j`` of process ``r``
  of ``P`` their rows ``(j·P + r)·b … +b``, so from shards what a step sees does not depend on the number of
  processes.
  Two ways in:
  - ``pretokenized``: a folder built by ``python -m train.pretokenize`` (the way at scale). Run-wide block ``g`` is
    row ``π_e(g mod N)`` of its memory-mapped shards (``train.pretokenize.BlockOrder``: every block once per epoch
    ``e``, in an order seeded by (seed, e)); each process reads only its own rows, in DataLoader workers that prefetch.
    The data position in a checkpoint is the step alone (O(1)), so resuming with another number of processes reads
    exactly the blocks the old run would have read (``global_batch_tokens`` is fixed across a resume).
  - no ``pretokenized`` (small runs): every process reads and filters the whole stream but tokenises and packs only
    its share of the texts (text ``i`` goes to process ``i mod P``) and trains on its own blocks, so here, unlike from
    shards, the batches depend on the number of processes. The checkpoint carries, per process, the number of texts
    read in the current pass (a resume replays them through the filters) and the tokens read but not yet packed
    (less than one step's); resuming with another number of processes is refused (ConfigError naming both counts).
- Objective: BERT's masking (Devlin et al. 2019 §3.1): ``mlm_probability`` of the non-special tokens are predicted; of
  those 80% become ``<mask>``, 10% a random token, 10% stay. ``span_masking`` picks contiguous spans instead, with
  SpanBERT's lengths (Joshi et al. 2020: geometric, p = 0.2, clipped at 10). The loss is the cross-entropy averaged over
  every predicted token of the global batch; the MoE balance loss (α = ``router_aux_loss_coef``) reaches the routers
  through the model's own backward hook and is logged beside it.
- Optimisation (the seed's recipe): AdamW β = (0.9, 0.95), ε = 1e-8, linear warmup then cosine from ``learning_rate`` to
  ``min_learning_rate``, no decay on norms/biases/embeddings, gradient clipping. The global batch is given in tokens
  and becomes gradient accumulation: ``global_batch_tokens / (per_device_batch_size · seq_len · processes)``.
- Dense → MoE upcycling (``upcycle_at``): a dense model (``train.upcycle.dense_config_for``) trains for that fraction of
  the steps, then becomes the MoE model with the same output, and AdamW's moments are carried over.
- Monitoring: loss, MLM accuracy, balance loss, lr, gradient norm, tokens/s and, per MoE layer, the expert-load shares,
  their normalised entropy and max/mean, through Accelerate's tensorboard tracker (``output_dir/logs``); a routing
  heatmap PNG in every checkpoint; a tqdm bar with ETA.
- Checkpoints (``output_dir/checkpoints``): model safetensors, optimizer, scheduler, RNG states, data position, written
  atomically every ``checkpoint_every`` steps and at the end; ``--resume`` continues with exactly the losses of an
  uninterrupted run. The lr schedule is not taken from the checkpoint: a resumed run continues at its step on the
  schedule its current config gives (``SCHEDULE_KEYS``; a changed one is logged as a warning), so resuming a finished
  6-step run with ``max_steps=12`` trains steps 7-12 at a fresh 12-step run's lrs. A NaN/inf loss stops the run and
  keeps the last good checkpoint. The final model goes to
  ``output_dir/final`` (``save_pretrained`` + tokenizer): it loads with ``AutoModelForMaskedLM`` and ``AutoModel``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch train/phase1.py): make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dataclasses
import inspect
import logging
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from configuration_chroma_moe import PRESETS, ChromaMoeConfig
from modeling_chroma_moe import ChromaMoeForMaskedLM
from train.common import (
    MIXED_PRECISION_CHOICES,
    ConfigError,
    build_optimizer,
    build_scheduler,
    config_from_command_line,
    config_from_dict,
    configure_deepspeed,
    expand_path,
    expert_load_stats,
    flatten_for_tracker,
    gradient_accumulation_steps,
    load_checkpoint,
    make_accelerator,
    raise_if_not_finite,
    read_trainer_state,
    resolve_resume,
    save_checkpoint,
    save_routing_heatmap,
)
from train.data import TextSourceSpec, build_text_stream
from train.mlm_data import (
    BatchLayout,
    MlmMasker,
    PackedBlocks,
    ShardMicroBatches,
    onthefly_micro_batches,
    shard_loader,
)
from train.pretokenize import BlockOrder, PackedBlockShards, tokenizer_hash
from train.upcycle import dense_config_for, upcycle_model, upcycle_tensors

logger = logging.getLogger(__name__)

DATA_BUFFER_FILE = "data_buffer.npy"
HEATMAP_FILE = "routing_heatmap.png"
# Keys whose change would make a resumed run a different run (data, model, batch): such a resume is refused.
RESUME_FIXED_KEYS = ("data", "model", "seed", "seq_len", "global_batch_tokens", "min_chars", "max_chars", "dedup",
                     "mlm_probability", "span_masking", "upcycle_at")  # fmt: skip
# Keys that shape the lr schedule: a resume with them changed continues on the schedule they give now (with a warning).
SCHEDULE_KEYS = ("max_steps", "warmup_steps", "learning_rate", "min_learning_rate")
MODEL_CONFIG_KEYS = frozenset(inspect.signature(ChromaMoeConfig.__init__).parameters) - {"self", "kwargs"}
DATA_ENTRY_KEYS = frozenset(f.name for f in dataclasses.fields(TextSourceSpec))


# --------------------------------------------------------------------------------------------------------------------
# Config.
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Phase1Config:
    """Phase-1 run configuration (YAML keys; ``key=value`` on the command line overrides them).

    Args:
        tokenizer: Folder of the tokenizer (``python -m tokenization.train --output DIR ...``); its size must equal the
            model's ``vocab_size``. Copied into the final model folder.
        data: The text mixture: a list of ``{spec, weight, text_field}`` (``train.data.TextSourceSpec``): a local
            ``.txt``/``.jsonl``/``.parquet`` path (``$CHROMA_SHARED_DATA`` expands to the shared data folder) or
            ``HUB_ID[:CONFIG[:SPLIT]]``.
        model: ``preset`` (a ``ChromaMoeConfig`` preset name) plus any ``ChromaMoeConfig`` fields to override.
            ``n_routed_experts: 0`` trains a dense model.
        output_dir: Where ``logs/``, ``checkpoints/`` and ``final/`` go (``$VARS`` expand, as in every path here).
        seed: Seeds model init, the mixture order and every block's masking.
        min_chars, max_chars, dedup: ``train.data.TextStream``'s filters.
        seq_len: Tokens per packed block.
        per_device_batch_size: Blocks per micro-batch on each process.
        global_batch_tokens: Tokens per optimizer step over all processes (the seed: 2M).
        max_steps: Optimizer steps of the whole run (the cosine ends here).
        warmup_steps: Linear warmup steps.
        learning_rate, min_learning_rate: Cosine from the first to the second.
        weight_decay, adam_beta1, adam_beta2, adam_epsilon: AdamW.
        max_grad_norm: Gradient clipping (global L2 norm).
        mlm_probability: Share of non-special tokens predicted.
        span_masking: Mask SpanBERT spans instead of single tokens.
        upcycle_at: Fraction of ``max_steps`` trained dense before upcycling into the configured MoE model (which then
            needs ``norm_topk_prob: true``); null trains the configured model from the start.
        mixed_precision: ``auto`` (bf16 on a GPU that supports it, else fp32), ``no`` or ``bf16``.
        log_every: Steps between tracker logs.
        checkpoint_every: Steps between checkpoints (one is also written at the end).
        resume: null (a fresh run; refused if ``output_dir`` already has a checkpoint), ``auto`` (the latest checkpoint
            in ``output_dir`` if any) or a checkpoint folder.
        pretokenized: A folder from ``python -m train.pretokenize`` built with this config's data, tokenizer,
            ``seq_len``, seed and filters (checked against its manifest); null tokenises ``data`` in the loop.
        dataloader_num_workers: DataLoader worker processes that read and mask ``pretokenized`` blocks ahead of the
            step (0: in the training process).
    """

    tokenizer: str
    data: list
    model: dict = field(default_factory=lambda: {"preset": "chroma-moe-tiny"})
    output_dir: str = "runs/phase1"
    seed: int = 0
    min_chars: int = 20
    max_chars: int | None = 1_000_000
    dedup: bool = True
    seq_len: int = 512
    per_device_batch_size: int = 8
    global_batch_tokens: int = 2_097_152
    max_steps: int = 1000
    warmup_steps: int = 100
    learning_rate: float = 3e-4
    min_learning_rate: float = 3e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    mlm_probability: float = 0.15
    span_masking: bool = False
    upcycle_at: float | None = None
    mixed_precision: str = "auto"
    log_every: int = 10
    checkpoint_every: int = 500
    resume: str | None = None
    pretokenized: str | None = None
    dataloader_num_workers: int = 1

    def __post_init__(self) -> None:
        def fail(key: str, why: str) -> None:
            raise ConfigError(f"config key {key!r}={getattr(self, key)!r}: {why}")

        for key in (
            "seq_len",
            "per_device_batch_size",
            "global_batch_tokens",
            "max_steps",
            "log_every",
            "checkpoint_every",
        ):
            if getattr(self, key) <= 0:
                fail(key, "must be > 0")
        if self.seq_len < 2:
            fail("seq_len", "must be >= 2 (<s> plus at least one text token)")
        if not 0 <= self.warmup_steps < self.max_steps:
            fail("warmup_steps", f"must be in [0, max_steps={self.max_steps})")
        if self.dataloader_num_workers < 0:
            fail("dataloader_num_workers", "must be >= 0")
        if self.learning_rate <= 0:
            fail("learning_rate", "must be > 0")
        if not 0 <= self.min_learning_rate <= self.learning_rate:
            fail("min_learning_rate", f"must be in [0, learning_rate={self.learning_rate}]")
        if self.weight_decay < 0:
            fail("weight_decay", "must be >= 0")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, key) < 1:
                fail(key, "must be in [0, 1)")
        if self.adam_epsilon <= 0:
            fail("adam_epsilon", "must be > 0")
        if self.max_grad_norm <= 0:
            fail("max_grad_norm", "must be > 0")
        if not 0 < self.mlm_probability < 1:
            fail("mlm_probability", "must be in (0, 1)")
        if self.mixed_precision not in MIXED_PRECISION_CHOICES:
            fail("mixed_precision", f"must be one of {MIXED_PRECISION_CHOICES}")
        if not self.data:
            fail("data", "must list at least one text source")
        for index, entry in enumerate(self.data):
            self._check_data_entry(index, entry)
        model_config = self.model_config()
        if self.seq_len > model_config.max_position_embeddings:
            fail("seq_len", f"exceeds the model's max_position_embeddings={model_config.max_position_embeddings}")
        if self.upcycle_at is not None:
            if not 0 < self.upcycle_at < 1:
                fail("upcycle_at", "must be a fraction of max_steps in (0, 1), or null")
            if not 1 <= self.upcycle_step < self.max_steps:
                fail("upcycle_at", f"gives upcycling step {self.upcycle_step}, outside [1, max_steps={self.max_steps})")
            dense_config_for(model_config)
            if not model_config.norm_topk_prob:
                raise ConfigError(
                    "config key 'model.norm_topk_prob'=False: must be true with upcycle_at (exact upcycling needs the "
                    "top-k gate weights to sum to 1)"
                )

    def _check_data_entry(self, index: int, entry: Any) -> None:
        where = f"data[{index}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"config key {where!r}={entry!r}: expected a mapping with spec, weight, text_field")
        unknown = sorted(set(entry) - DATA_ENTRY_KEYS)
        if unknown:
            raise ConfigError(f"config key {where!r}: unknown field(s) {unknown}; allowed: {sorted(DATA_ENTRY_KEYS)}")
        if not isinstance(entry.get("spec"), str) or not entry["spec"]:
            raise ConfigError(
                f"config key '{where}.spec'={entry.get('spec')!r}: expected a file path or Hub dataset id"
            )
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ConfigError(f"config key '{where}.weight'={weight!r}: must be a number > 0")
        if not isinstance(entry.get("text_field", "text"), str):
            raise ConfigError(f"config key '{where}.text_field'={entry['text_field']!r}: expected a string")

    def model_config(self) -> ChromaMoeConfig:
        """The (target) model config: ``model.preset`` with the other ``model`` keys as overrides."""
        overrides = dict(self.model)
        preset = overrides.pop("preset", None)
        if preset not in PRESETS:
            raise ConfigError(f"config key 'model.preset'={preset!r}: expected one of {sorted(PRESETS)}")
        unknown = sorted(set(overrides) - MODEL_CONFIG_KEYS)
        if unknown:
            raise ConfigError(f"config key 'model': unknown ChromaMoeConfig field(s) {unknown}")
        try:
            return ChromaMoeConfig.from_preset(preset, **overrides)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"config key 'model': {err}") from err

    @property
    def upcycle_step(self) -> int | None:
        return None if self.upcycle_at is None else int(self.upcycle_at * self.max_steps)

    def sources(self) -> list[TextSourceSpec]:
        return [
            TextSourceSpec(expand_path(e["spec"]), float(e.get("weight", 1.0)), e.get("text_field", "text"))
            for e in self.data
        ]


# --------------------------------------------------------------------------------------------------------------------
# Data: packing and masking.
# --------------------------------------------------------------------------------------------------------------------


def open_pretokenized(cfg: Phase1Config, tokenizer: PreTrainedTokenizerBase) -> PackedBlockShards:
    """The folder of config key ``pretokenized``, checked against the config: a folder built from other data, another
    tokenizer or other packing would silently train on something else, so any difference is a ConfigError."""
    folder = Path(expand_path(cfg.pretokenized))
    shards = PackedBlockShards(folder)
    manifest = shards.manifest
    where = f"the pre-tokenised folder {folder} (config key 'pretokenized')"
    if manifest["tokenizer_sha256"] != tokenizer_hash(tokenizer):
        raise ConfigError(f"config key 'tokenizer'={cfg.tokenizer!r} is not the tokenizer {where} was built with")
    built = {key: manifest[key] for key in ("seq_len", "seed", "min_chars", "max_chars", "dedup")}
    built["data"] = [{k: source[k] for k in ("spec", "weight", "text_field")} for source in manifest["sources"]]
    wanted = {key: getattr(cfg, key) for key in built if key != "data"}
    wanted["data"] = [dataclasses.asdict(source) for source in cfg.sources()]
    for key, value in built.items():
        if wanted[key] != value:
            raise ConfigError(
                f"config key {key!r}={wanted[key]!r} differs from {where}, built with {value!r}: set it to match or "
                f"rebuild the folder with python -m train.pretokenize"
            )
    return shards


def load_tokenizer(path: str, model_config: ChromaMoeConfig) -> PreTrainedTokenizerBase:
    """The tokenizer folder of config key ``tokenizer``, checked against the model config."""
    folder = Path(expand_path(path))
    if not folder.is_dir():
        raise FileNotFoundError(
            f"tokenizer folder {folder} (config key 'tokenizer') not found; build one with: "
            f"python -m tokenization.train --output {folder} --vocab-size {model_config.vocab_size} --input FILE ..."
        )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for name in ("bos_token_id", "eos_token_id", "mask_token_id"):
        if getattr(tokenizer, name) is None:
            raise ValueError(
                f"tokenizer {folder} has no {name.removesuffix('_id')}: masked-LM packing needs <s>, </s>, <mask>"
            )
    if len(tokenizer) != model_config.vocab_size:
        raise ConfigError(
            f"config key 'model.vocab_size'={model_config.vocab_size} differs from the tokenizer's size "
            f"{len(tokenizer)} ({folder}): set model.vocab_size={len(tokenizer)} or train the tokenizer with "
            f"--vocab-size {model_config.vocab_size}"
        )
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tokenizer, name) != getattr(model_config, name):
            raise ConfigError(
                f"config key 'model.{name}'={getattr(model_config, name)} differs from the tokenizer's "
                f"{getattr(tokenizer, name)}"
            )
    return tokenizer


# --------------------------------------------------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class StepStats:
    """One optimizer step, reduced over micro-batches and processes."""

    loss: float  # masked-LM cross-entropy per predicted token
    correct: float
    predicted: float
    aux_loss: float  # the balance loss, averaged over forward passes
    grad_norm: float
    lr: float
    expert_counts: torch.Tensor | None  # (moe_layers, experts), summed


@dataclass
class Phase1Result:
    """What ``run`` did: per-step losses and learning rates of this call, where its outputs went, the batch arithmetic
    (``tokens_per_step`` counts the packed tokens actually read per step), throughput and the upcycling record
    (``max_abs_logit_diff`` at the switch, ``loss_before``/``loss_after``/``loss_jump`` around it)."""

    first_step: int
    losses: list[float]
    learning_rates: list[float]
    output_dir: Path
    final_dir: Path
    last_checkpoint: Path | None
    gradient_accumulation_steps: int
    tokens_per_step: int
    tokens_per_second: float
    upcycle: dict[str, Any] | None


class Phase1Trainer:
    """The phase-1 loop over Accelerate; construct, then ``train()``."""

    def __init__(self, cfg: Phase1Config, accelerator: Accelerator) -> None:
        self.cfg = cfg
        self.acc = accelerator
        self.output_dir = Path(expand_path(cfg.output_dir))
        self.checkpoints_dir = self.output_dir / "checkpoints"
        self.accum = gradient_accumulation_steps(
            cfg.global_batch_tokens, cfg.per_device_batch_size, cfg.seq_len, accelerator.num_processes
        )
        accelerator.gradient_accumulation_steps = self.accum
        self.blocks_per_step = cfg.global_batch_tokens // cfg.seq_len
        self.layout = BatchLayout(self.blocks_per_step, cfg.per_device_batch_size, self.accum,
                                  accelerator.num_processes, accelerator.process_index)  # fmt: skip
        self.moe_config = cfg.model_config()
        self.tokenizer = load_tokenizer(cfg.tokenizer, self.moe_config)
        self.blocks: PackedBlocks | None = None  # the on-the-fly path
        self.shards: PackedBlockShards | None = None  # the pre-tokenised path
        if cfg.pretokenized is None:
            sources = cfg.sources()
            stream_options = {"min_chars": cfg.min_chars, "max_chars": cfg.max_chars, "dedup": cfg.dedup}
            self.blocks = PackedBlocks(
                lambda epoch: build_text_stream(sources, seed=cfg.seed + epoch, **stream_options),
                self.tokenizer,
                cfg.seq_len,
                rank=accelerator.process_index,
                processes=accelerator.num_processes,
                verbose=accelerator.is_main_process,
            )
            self.blocks.make_stream(0)  # fail now, not after model building, on a missing file or bad spec
        else:
            self.shards = open_pretokenized(cfg, self.tokenizer)
        self.masker = MlmMasker(self.tokenizer, cfg.mlm_probability, cfg.span_masking, cfg.seed)

        resume_from = resolve_resume(
            cfg.resume, self.checkpoints_dir, dataclasses.asdict(cfg), RESUME_FIXED_KEYS, SCHEDULE_KEYS
        )
        state = read_trainer_state(resume_from) if resume_from else None
        self.upcycle = state["upcycle"] if state else None
        self.upcycled = state["upcycled"] if state else cfg.upcycle_at is None
        if state and not self.upcycled and cfg.upcycle_step < state["step"]:
            raise ConfigError(
                f"cannot resume {resume_from} (dense, step {state['step']}): config key 'max_steps'={cfg.max_steps} "
                f"moves upcycling (upcycle_at={cfg.upcycle_at}) to step {cfg.upcycle_step}, which this run has passed"
            )
        set_seed(cfg.seed)
        model_config = self.moe_config if self.upcycled else dense_config_for(self.moe_config)
        self.model, self.optimizer, self.scheduler = self._prepare(ChromaMoeForMaskedLM(model_config), start_step=0)
        self.start_step = 0
        self.last_checkpoint: Path | None = None
        if resume_from is not None:
            load_checkpoint(self.acc, resume_from)
            self.start_step = state["step"]
            self._load_data_position(state["data"], resume_from)
            self.last_checkpoint = resume_from
            self._info(f"resumed from {resume_from} at step {self.start_step}")
        self._heatmap_counts: torch.Tensor | None = None
        self._heatmap_from = self.start_step
        self._losses: list[float] = []
        self._learning_rates: list[float] = []
        self._first_block = (
            self.blocks.blocks_emitted if self.blocks is not None else self.start_step * self.blocks_per_step
        )
        self._shard_batches = self._shard_loader() if self.shards is not None else None

    # ---- setup --------------------------------------------------------------------------------------------------

    def _shard_loader(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        acc, cfg = self.acc, self.cfg
        order = BlockOrder(len(self.shards), cfg.seed)
        micro_batches = ShardMicroBatches(self.shards, order, self.masker, self.layout)
        items = range(self.start_step * self.accum, cfg.max_steps * self.accum)
        return shard_loader(micro_batches, items, cfg.dataloader_num_workers, pin_memory=acc.device.type == "cuda")

    def _data_position(self, step: int) -> tuple[dict[str, Any], np.ndarray | None]:
        """(JSON-able data position after ``step`` steps, the on-the-fly path's unread tokens or None). From shards the
        position is the step itself; the folder's identity is kept to refuse a resume from other blocks."""
        if self.blocks is not None:
            return PackedBlocks.run_state(gather_object([self.blocks.state_dict()]))
        manifest = self.shards.manifest
        position = {"pretokenized_blocks": manifest["blocks"], "tokenizer_sha256": manifest["tokenizer_sha256"],
                    "blocks_read": step * self.blocks_per_step}  # fmt: skip
        return position, None

    def _load_data_position(self, position: Mapping[str, Any], checkpoint: Path) -> None:
        from_shards = "pretokenized_blocks" in position
        if from_shards != (self.shards is not None):
            written, wanted = ("pre-tokenised", "on-the-fly") if from_shards else ("on-the-fly", "pre-tokenised")
            raise ConfigError(
                f"config key 'pretokenized'={self.cfg.pretokenized!r}: {checkpoint} was written from {written} data, "
                f"this run reads {wanted} data: resume with the setting the run started with"
            )
        if self.blocks is not None:
            self.blocks.load_run_state(position, np.load(checkpoint / DATA_BUFFER_FILE))
            return
        expected, _ = self._data_position(self.start_step)
        if dict(position) != expected:
            raise ConfigError(
                f"config key 'pretokenized'={self.cfg.pretokenized!r}: {checkpoint} read other blocks "
                f"(data position {dict(position)}, this folder and step give {expected})"
            )

    def _info(self, message: str) -> None:
        if self.acc.is_main_process:
            logger.info(message)

    def _prepare(self, model: ChromaMoeForMaskedLM, start_step: int):
        cfg = self.cfg
        model.train()
        optimizer = build_optimizer(
            model, cfg.learning_rate, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_epsilon
        )
        scheduler = build_scheduler(
            optimizer, cfg.min_learning_rate / cfg.learning_rate, cfg.warmup_steps, cfg.max_steps, start_step=start_step
        )
        configure_deepspeed(self.acc, cfg.per_device_batch_size, self.accum, cfg.max_grad_norm)
        return self.acc.prepare(model, optimizer, scheduler)

    @property
    def unwrapped(self) -> ChromaMoeForMaskedLM:
        return self.acc.unwrap_model(self.model)

    def moe_layers(self) -> list[int]:
        config = self.unwrapped.config
        return [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]

    # ---- one step ------------------------------------------------------------------------------------------------

    def next_batch(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This process's ``accum`` micro-batches of the next step, each (input_ids (b, L), labels (b, L)) on the
        device, placed by ``self.layout``."""
        if self.shards is not None:
            micro = [next(self._shard_batches) for _ in range(self.accum)]
        else:
            micro = onthefly_micro_batches(self.blocks, self.masker, self.layout)
        device = self.acc.device
        return [(ids.to(device, non_blocking=True), labels.to(device, non_blocking=True)) for ids, labels in micro]

    def train_step(self, step: int, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> StepStats:
        """Forward/backward every micro-batch, then one clipped optimizer step.

        Each micro-batch contributes ``Σ CE · P·A / N`` (N predicted tokens in the global batch, P processes, A
        micro-batches): Accelerate divides by A and data-parallel engines average over P, so the parameters get the
        gradient of the mean CE over the global batch. The balance loss is a mean over sequences applied with weight 1
        per forward pass, so ``aux_loss_weight = 1/A`` makes it the mean over this process's micro-batches (P-averaging
        does the rest).
        """
        acc = self.acc
        predicted = sum(int((labels != -100).sum()) for _, labels in micro_batches)
        predicted_global = float(acc.reduce(torch.tensor([float(predicted)], device=acc.device), "sum")[0])
        scale = acc.num_processes * self.accum / max(predicted_global, 1.0)
        self.unwrapped.model.aux_loss_weight = 1.0 / self.accum
        ce_sum = torch.zeros((), device=acc.device)
        correct = torch.zeros((), device=acc.device)
        aux_sum = torch.zeros((), device=acc.device)
        counts = None
        for input_ids, labels in micro_batches:
            with acc.accumulate(self.model):
                output = self.model(input_ids=input_ids, labels=labels)
                target = labels[labels != -100]
                ce = F.cross_entropy(output.logits.float(), target, reduction="sum")
                acc.backward(ce * scale)
            ce_sum += ce.detach()
            correct += (output.logits.detach().argmax(dim=-1) == target).sum()
            aux_sum += output.aux_loss.detach().float() * self.accum  # undo the 1/A weight for logging
            if output.expert_counts:
                step_counts = torch.stack(output.expert_counts).float()  # (moe_layers, experts)
                counts = step_counts if counts is None else counts + step_counts
        packed = [ce_sum.reshape(1), correct.float().reshape(1), aux_sum.reshape(1)]
        if counts is not None:
            packed.append(counts.flatten())
        reduced = acc.reduce(torch.cat(packed), "sum")
        loss = float(reduced[0]) / max(predicted_global, 1.0)
        grad_norm = float(acc.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm))
        raise_if_not_finite({"loss": loss, "grad_norm": grad_norm}, step + 1, self.last_checkpoint)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        global_counts = reduced[3:].reshape(counts.shape).cpu() if counts is not None else None
        if global_counts is not None:
            self.unwrapped.update_router_bias(tuple(global_counts))
        return StepStats(
            loss=loss,
            correct=float(reduced[1]),
            predicted=predicted_global,
            aux_loss=float(reduced[2]) / (self.accum * acc.num_processes),
            grad_norm=grad_norm,
            lr=lr,
            expert_counts=global_counts,
        )

    # ---- upcycling -----------------------------------------------------------------------------------------------

    def _adam_moments(self) -> dict[str, Any] | None:
        """AdamW's per-parameter moments by parameter name, when the optimizer is a plain torch AdamW holding full
        tensors (single process, DDP); sharded engines keep partitioned state, which restarts at the switch."""
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        if not isinstance(optimizer, torch.optim.AdamW):
            return None
        moments: dict[str, Any] = {"exp_avg": {}, "exp_avg_sq": {}, "step": None}
        for name, param in self.unwrapped.named_parameters():
            state = optimizer.state.get(param)
            if not state or state["exp_avg"].shape != param.shape:
                return None
            moments["exp_avg"][name] = state["exp_avg"]
            moments["exp_avg_sq"][name] = state["exp_avg_sq"]
            moments["step"] = state["step"]
        return moments

    def upcycle_now(self, step: int, probe: torch.Tensor) -> None:
        """Swap the dense model for the upcycled MoE model, carry AdamW's moments over, continue the schedule, and
        measure the largest logit change on ``probe`` (B, T) input ids — zero up to float rounding by construction."""
        acc = self.acc
        acc.wait_for_everyone()
        dense_state = acc.get_state_dict(self.model)
        if not dense_state:
            raise RuntimeError(
                "upcycling mid-run needs the full dense weights on every process (single process, DDP, DeepSpeed "
                "ZeRO-0/1/2); under FSDP or ZeRO-3 train the dense model alone (model.n_routed_experts=0) and "
                "upcycle its folder with python -m train.upcycle"
            )
        dense = self.unwrapped
        moments = self._adam_moments()
        moe = upcycle_model(dense_state, dense.config, self.moe_config, seed=self.cfg.seed + step).to(acc.device)
        dense.eval()
        moe.eval()
        with torch.no_grad(), acc.autocast():
            diff = float((dense(input_ids=probe).logits.float() - moe(input_ids=probe).logits.float()).abs().max())
        del dense_state, dense
        acc.free_memory()
        self.model, self.optimizer, self.scheduler = self._prepare(moe, start_step=step)
        carried = moments is not None
        if carried:
            optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
            params = dict(self.unwrapped.named_parameters())
            dense_config = dense_config_for(self.moe_config)
            avg = upcycle_tensors(
                moments["exp_avg"], dense_config, self.moe_config, torch.zeros
            )  # new neurons: no history
            avg_sq = upcycle_tensors(moments["exp_avg_sq"], dense_config, self.moe_config, torch.zeros)
            for name, value in avg.items():
                param = params[name]
                optimizer.state[param] = {
                    "step": moments["step"].clone(),
                    "exp_avg": value.to(param).contiguous(),
                    "exp_avg_sq": avg_sq[name].to(param).contiguous(),
                }
        self.upcycled = True
        self._heatmap_counts = None
        self._heatmap_from = step
        self.upcycle = {"step": step, "max_abs_logit_diff": diff, "optimizer_state_carried": carried,
                        "loss_before": self._losses[-1] if self._losses else None}  # fmt: skip
        self._info(
            f"step {step}: upcycled to {self.moe_config.n_routed_experts} routed experts; max |Δlogit| = {diff:.3g}; "
            f"AdamW moments {'carried over' if carried else 'restarted'}"
        )

    # ---- checkpoints and logs ------------------------------------------------------------------------------------

    def save(self, step: int) -> None:
        position, buffer = self._data_position(step)
        state = {"step": step, "upcycled": self.upcycled, "upcycle": self.upcycle, "data": position,
                 "config": dataclasses.asdict(self.cfg)}  # fmt: skip
        counts, layers, span = self._heatmap_counts, self.moe_layers(), (self._heatmap_from, step)

        def extras(folder: Path) -> None:
            if buffer is not None:
                np.save(folder / DATA_BUFFER_FILE, buffer)
            if counts is not None:
                title = f"expert-load share, steps {span[0] + 1}-{span[1]}"
                save_routing_heatmap(counts, layers, folder / HEATMAP_FILE, title)

        self.last_checkpoint = save_checkpoint(self.acc, self.checkpoints_dir, step, state, extras)
        self._heatmap_counts, self._heatmap_from = None, step

    def save_final(self) -> Path:
        """Every process calls ``save_pretrained`` (it creates and lists the folder; only the main one writes), so the
        old folder is removed before the barrier: removed after it, it could vanish under another process."""
        final = self.output_dir / "final"
        acc = self.acc
        if acc.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
        acc.wait_for_everyone()
        state = acc.get_state_dict(self.model)
        self.unwrapped.save_pretrained(
            final, state_dict=state, is_main_process=acc.is_main_process, save_function=acc.save
        )
        if acc.is_main_process:
            self.tokenizer.save_pretrained(final)
        acc.wait_for_everyone()
        return final

    def _window_metrics(self, window: list[StepStats], seconds: float, step: int) -> dict[str, float]:
        tokens = len(window) * self.cfg.global_batch_tokens
        metrics = {
            "train/loss": sum(s.loss for s in window) / len(window),
            "train/mlm_accuracy": sum(s.correct for s in window) / max(sum(s.predicted for s in window), 1.0),
            "train/aux_loss": sum(s.aux_loss for s in window) / len(window),
            "train/grad_norm": window[-1].grad_norm,
            "train/lr": window[-1].lr,
            "train/tokens_per_second": tokens / max(seconds, 1e-9),
            "train/tokens": float(step * self.cfg.global_batch_tokens),
        }
        counts = [s.expert_counts for s in window if s.expert_counts is not None]
        if counts and all(c.shape == counts[0].shape for c in counts):
            metrics.update(expert_load_stats(torch.stack(counts).sum(dim=0), self.moe_layers()))
        return metrics

    # ---- loop ----------------------------------------------------------------------------------------------------

    def train(self) -> Phase1Result:
        cfg, acc = self.cfg, self.acc
        acc.init_trackers("phase1", config=flatten_for_tracker(dataclasses.asdict(cfg)))
        self._info(
            f"{acc.num_processes} process(es) × {cfg.per_device_batch_size} blocks × {cfg.seq_len} tokens × "
            f"{self.accum} accumulation = {cfg.global_batch_tokens} tokens per step; "
            f"steps {self.start_step}->{cfg.max_steps}"
        )
        window: list[StepStats] = []
        window_seconds = total_seconds = 0.0
        bar = tqdm(
            total=cfg.max_steps, initial=self.start_step, desc="phase 1", unit="step", disable=not acc.is_main_process
        )
        for step in range(self.start_step, cfg.max_steps):
            started = time.perf_counter()
            micro_batches = self.next_batch()
            if not self.upcycled and step == cfg.upcycle_step:
                self.upcycle_now(step, micro_batches[0][0])
            stats = self.train_step(step, micro_batches)
            elapsed = time.perf_counter() - started
            window_seconds += elapsed
            total_seconds += elapsed
            self._losses.append(stats.loss)
            self._learning_rates.append(stats.lr)
            window.append(stats)
            if stats.expert_counts is not None:
                self._heatmap_counts = (
                    stats.expert_counts if self._heatmap_counts is None else self._heatmap_counts + stats.expert_counts
                )
            done = step + 1
            if self.upcycle is not None and self.upcycle["step"] == step:
                self.upcycle["loss_after"] = stats.loss
                if self.upcycle["loss_before"] is not None:
                    self.upcycle["loss_jump"] = stats.loss - self.upcycle["loss_before"]
                    acc.log({"upcycle/loss_jump": self.upcycle["loss_jump"]}, step=done)
                acc.log({"upcycle/max_abs_logit_diff": self.upcycle["max_abs_logit_diff"]}, step=done)
                self._info(f"upcycling record: {self.upcycle}")
            bar.update(1)
            bar.set_postfix(
                loss=f"{stats.loss:.3f}", lr=f"{stats.lr:.2e}", tok_s=f"{cfg.global_batch_tokens / elapsed:.0f}"
            )
            if done % cfg.log_every == 0 or done == cfg.max_steps:
                acc.log(self._window_metrics(window, window_seconds, done), step=done)
                window, window_seconds = [], 0.0
            if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
                self.save(done)
        bar.close()
        if self.blocks is not None:
            self._info(f"data filters, current epoch {self.blocks.epoch}: {self.blocks.filter_summary()}")
        else:
            self._info(f"pre-tokenised data {self.cfg.pretokenized}: texts {self.shards.manifest['texts']}")
        final = self.save_final()
        steps_run = len(self._losses)
        if self.blocks is not None:
            blocks_read = self.blocks.blocks_emitted - self._first_block
        else:
            blocks_read = steps_run * self.blocks_per_step
        return Phase1Result(
            first_step=self.start_step,
            losses=self._losses,
            learning_rates=self._learning_rates,
            output_dir=self.output_dir,
            final_dir=final,
            last_checkpoint=self.last_checkpoint,
            gradient_accumulation_steps=self.accum,
            tokens_per_step=blocks_read * cfg.seq_len // max(steps_run, 1),
            tokens_per_second=steps_run * cfg.global_batch_tokens / max(total_seconds, 1e-9),
            upcycle=self.upcycle,
        )


def run(config: Phase1Config | Mapping[str, Any]) -> Phase1Result:
    """Train phase 1 with ``config`` (a ``Phase1Config`` or a mapping of its keys). Call it once per process under
    ``accelerate launch``/``torchrun``; in a plain Python process it trains on one device."""
    cfg = config if isinstance(config, Phase1Config) else config_from_dict(Phase1Config, config)
    accelerator = make_accelerator(expand_path(cfg.output_dir), cfg.mixed_precision)
    try:
        return Phase1Trainer(cfg, accelerator).train()
    finally:
        accelerator.end_training()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_from_command_line(
        Phase1Config, argv, prog="accelerate launch train/phase1.py",
        description="Phase-1 masked-LM pretraining of Chroma-MoE (see the module docstring).",
        example="train/configs/phase1_small.yaml",
    )  # fmt: skip
    result = run(cfg)
    if result.losses and PartialState().is_main_process:
        logger.info(
            f"steps {result.first_step + 1}-{result.first_step + len(result.losses)}: loss {result.losses[0]:.4f} -> "
            f"{result.losses[-1]:.4f}; {result.tokens_per_second:.0f} tokens/s; final model {result.final_dir}"
        )


if __name__ == "__main__":
    main()

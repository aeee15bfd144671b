"""Phase 1: bidirectional masked-LM pretraining of Chroma-MoE on a finance/retail text mixture, with Accelerate.

    accelerate launch train/phase1.py --config train/configs/phase1_small.yaml [key=value ...] [--resume [CHECKPOINT]]

(overrides may come before or after ``--resume``; see ``train.common.config_from_command_line``).

- Data: the mixture of ``train.data`` (length filter, exact-repeat dedup) is tokenised and *packed*: texts are
  concatenated, each followed by ``</s>``, and cut into blocks of ``seq_len`` tokens that start with ``<s>`` (RoBERTa's
  FULL-SENTENCES packing, Liu et al. 2019 §4.2, with fairseq's prepended BOS), so no compute goes to padding. The
  masking RNG of block ``i`` of the run is seeded by (seed, i); from shards, block ``i`` is always the same tokens.
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
- The loop is ``train.trainer.ChromaMoeTrainer``'s (shared with phase 2); this module supplies the batches, the
  masked-LM loss and its metrics, the upcycling switch and the data position of a checkpoint.
- Monitoring: loss, MLM accuracy, balance loss, lr, gradient norm, tokens/s and, per MoE layer, the expert-load shares,
  their normalised entropy and max/mean, through Accelerate's tensorboard tracker (``output_dir/logs``) and
  ``output_dir/train_log.jsonl`` (without the per-expert shares); a routing heatmap PNG in every checkpoint; a tqdm
  bar with ETA.
- Checkpoints (``output_dir/checkpoints``): model safetensors, optimizer, scheduler, RNG states, data position, written
  atomically every ``checkpoint_every`` steps and at the end (0: none); ``--resume`` continues with exactly the losses
  of an uninterrupted run (``resume=auto`` without a checkpoint starts fresh). The lr schedule is not taken from the
  checkpoint: a resumed run continues at its step on the schedule its current config gives
  (``train.trainer.SCHEDULE_KEYS``; a changed one is logged as a warning), so resuming a finished 6-step run with
  ``max_steps=12`` trains steps 7-12 at a fresh 12-step run's lrs. A NaN/inf loss stops the run and keeps the last
  good checkpoint. The final model goes to ``output_dir/final`` (``save_pretrained`` from the state every process
  gathers, + tokenizer): it loads with ``AutoModelForMaskedLM`` and ``AutoModel``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch train/phase1.py): make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, gather_object, set_seed
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from configuration_chroma_moe import ChromaMoeConfig
from modeling_chroma_moe import ChromaMoeForMaskedLM
from train import common, mlm_data
from train.common import ConfigError, expand_path
from train.data import TextSourceSpec, build_text_stream
from train.mlm_data import PackedBlocks
from train.pretokenize import BlockOrder, PackedBlockShards, tokenizer_hash
from train.trainer import ChromaMoeRunConfig, ChromaMoeStepStats, ChromaMoeTrainer
from train.upcycle import dense_config_for, upcycle_model, upcycle_tensors

logger = logging.getLogger(__name__)

DATA_BUFFER_FILE = "data_buffer.npy"
# Keys whose change would make a resumed run a different run (data, model, batch): such a resume is refused.
RESUME_FIXED_KEYS = ("data", "model", "seed", "seq_len", "global_batch_tokens", "min_chars", "max_chars", "dedup",
                     "mlm_probability", "span_masking", "upcycle_at")  # fmt: skip
DATA_ENTRY_KEYS = frozenset(f.name for f in dataclasses.fields(TextSourceSpec))


# --------------------------------------------------------------------------------------------------------------------
# Config.
# --------------------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Phase1Config(ChromaMoeRunConfig):
    """Phase-1 run configuration: the shared keys of ``train.trainer.ChromaMoeRunConfig`` (output_dir, model, seed,
    schedule, AdamW, max_grad_norm, mixed_precision, log_every, checkpoint_every, resume) with phase 1's defaults,
    plus:

    Args:
        tokenizer: Folder of the tokenizer (``python -m tokenization.train --output DIR ...``); its size must equal the
            model's ``vocab_size``. Copied into the final model folder.
        data: The text mixture: a list of ``{spec, weight, text_field}`` (``train.data.TextSourceSpec``): a local
            ``.txt``/``.jsonl``/``.parquet`` path (``$CHROMA_SHARED_DATA`` expands to the shared data folder) or
            ``HUB_ID[:CONFIG[:SPLIT]]``.
        min_chars, max_chars, dedup: ``train.data.TextStream``'s filters.
        seq_len: Tokens per packed block.
        per_device_batch_size: Blocks per micro-batch on each process.
        global_batch_tokens: Tokens per optimizer step over all processes (the seed: 2M).
        mlm_probability: Share of non-special tokens predicted.
        span_masking: Mask SpanBERT spans instead of single tokens.
        upcycle_at: Fraction of ``max_steps`` trained dense before upcycling into the configured MoE model (which then
            needs ``norm_topk_prob: true``); null trains the configured model from the start. ``model: {n_routed_experts:
            0}`` trains a dense model.
        pretokenized: A folder from ``python -m train.pretokenize`` built with this config's data, tokenizer,
            ``seq_len``, seed and filters (checked against its manifest); null tokenises ``data`` in the loop.
        dataloader_num_workers: DataLoader worker processes that read and mask ``pretokenized`` blocks ahead of the
            step (0: in the training process).
    """

    tokenizer: str
    data: list
    output_dir: str = "runs/phase1"
    min_chars: int = 20
    max_chars: int | None = 1_000_000
    dedup: bool = True
    seq_len: int = 512
    per_device_batch_size: int = 8
    global_batch_tokens: int = 2_097_152
    upcycle_at: float | None = None
    max_steps: int = 1000
    warmup_steps: int = 100
    learning_rate: float = 3e-4
    min_learning_rate: float = 3e-5
    pretokenized: str | None = None
    weight_decay: float = 0.1
    adam_beta2: float = 0.95
    mlm_probability: float = 0.15
    span_masking: bool = False
    dataloader_num_workers: int = 1
    log_every: int = 10
    checkpoint_every: int = 500

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("seq_len", "per_device_batch_size", "global_batch_tokens"):
            if not getattr(self, key) > 0:
                self.refuse(key, "must be > 0")
        if self.seq_len < 2:
            self.refuse("seq_len", "must be >= 2 (<s> plus at least one text token)")
        if self.dataloader_num_workers < 0:
            self.refuse("dataloader_num_workers", "must be >= 0")
        if not 0 < self.mlm_probability < 1:
            self.refuse("mlm_probability", "must be in (0, 1)")
        if not self.data:
            self.refuse("data", "must list at least one text source")
        for index, entry in enumerate(self.data):
            self._check_data_entry(index, entry)
        model_config = self.model_config()
        if self.seq_len > model_config.max_position_embeddings:
            limit = model_config.max_position_embeddings
            self.refuse("seq_len", f"exceeds the model's max_position_embeddings={limit}")
        if self.upcycle_at is not None:
            if not 0 < self.upcycle_at < 1:
                self.refuse("upcycle_at", "must be a fraction of max_steps in (0, 1), or null")
            if not 1 <= self.upcycle_step < self.max_steps:
                why = f"gives upcycling step {self.upcycle_step}, outside [1, max_steps={self.max_steps})"
                self.refuse("upcycle_at", why)
            dense_config_for(model_config)
            if not model_config.norm_topk_prob:
                raise ConfigError(
                    "config key 'model.norm_topk_prob'=False: must be true with upcycle_at (exact upcycling needs the "
                    "top-k gate weights to sum to 1)"
                )

    def _check_data_entry(self, index: int, entry: Any) -> None:
        where = f"data[{index}]"
        common.check_entry(where, entry, DATA_ENTRY_KEYS, "spec, weight, text_field")
        if not isinstance(entry.get("spec"), str) or not entry["spec"]:
            raise ConfigError(
                f"config key '{where}.spec'={entry.get('spec')!r}: expected a file path or Hub dataset id"
            )
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ConfigError(f"config key '{where}.weight'={weight!r}: must be a number > 0")
        if not isinstance(entry.get("text_field", "text"), str):
            raise ConfigError(f"config key '{where}.text_field'={entry['text_field']!r}: expected a string")

    @property
    def upcycle_step(self) -> int | None:
        return None if self.upcycle_at is None else int(self.upcycle_at * self.max_steps)

    def sources(self) -> list[TextSourceSpec]:
        return [
            TextSourceSpec(expand_path(e["spec"]), float(e.get("weight", 1.0)), e.get("text_field", "text"))
            for e in self.data
        ]


# --------------------------------------------------------------------------------------------------------------------
# Data: the tokenizer and the pre-tokenised folder, checked against the config.
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


def shards_parameters(accelerator: Accelerator) -> bool:
    """Whether the engine keeps only a shard of the weights on each process (FSDP, DeepSpeed ZeRO-3): the same answer
    on every process, so a refusal based on it is raised by all of them."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = accelerator.state.deepspeed_plugin
    return accelerator.distributed_type == DistributedType.DEEPSPEED and plugin.zero_stage == 3


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


class Phase1Trainer(ChromaMoeTrainer):
    """Masked-LM pretraining on ``ChromaMoeTrainer``'s loop; construct, then ``train()``."""

    name = "phase 1"
    resume_fixed_keys = RESUME_FIXED_KEYS

    def __init__(self, cfg: Phase1Config, accelerator: Accelerator) -> None:
        self.accum = common.gradient_accumulation_steps(
            cfg.global_batch_tokens, cfg.per_device_batch_size, cfg.seq_len, accelerator.num_processes
        )
        accelerator.gradient_accumulation_steps = self.accum
        self.blocks_per_step = cfg.global_batch_tokens // cfg.seq_len
        self.layout = mlm_data.BatchLayout(self.blocks_per_step, cfg.per_device_batch_size, self.accum,
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
        self.masker = mlm_data.MlmMasker(self.tokenizer, cfg.mlm_probability, cfg.span_masking, cfg.seed)

        super().__init__(cfg, accelerator)
        state = self.resume_state
        self.upcycle = state["upcycle"] if state else None
        self.upcycled = state["upcycled"] if state else cfg.upcycle_at is None
        if state and not self.upcycled and cfg.upcycle_step < state["step"]:
            raise ConfigError(
                f"cannot resume {self.resume_from} (dense, step {state['step']}): config key 'max_steps'="
                f"{cfg.max_steps} moves upcycling (upcycle_at={cfg.upcycle_at}) to step {cfg.upcycle_step}, which this "
                "run has passed"
            )
        if not self.upcycled and shards_parameters(accelerator):
            raise ConfigError(
                f"config key 'upcycle_at'={cfg.upcycle_at}: upcycling mid-run needs the full dense weights on every "
                "process (single process, DDP, DeepSpeed ZeRO-0/1/2); under FSDP or ZeRO-3 train the dense model alone "
                "(model.n_routed_experts=0) and upcycle its folder with python -m train.upcycle"
            )
        set_seed(cfg.seed)
        model_config = self.moe_config if self.upcycled else dense_config_for(self.moe_config)
        self.prepare(ChromaMoeForMaskedLM(model_config), cfg.per_device_batch_size)
        self.load_resume()
        if self.resume_from is not None:
            self._load_data_position(state["data"], self.resume_from)
        self._first_block = (
            self.blocks.blocks_emitted if self.blocks is not None else self.start_step * self.blocks_per_step
        )
        self._shard_batches = self._shard_loader() if self.shards is not None else None

    # ---- data ----------------------------------------------------------------------------------------------------

    def _shard_loader(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        cfg = self.cfg
        micro_batches = mlm_data.ShardMicroBatches(self.shards, BlockOrder(len(self.shards), cfg.seed), self.masker,
                                                   self.layout)  # fmt: skip
        items = range(self.start_step * self.accum, cfg.max_steps * self.accum)
        return mlm_data.shard_loader(micro_batches, items, cfg.dataloader_num_workers,
                                     pin_memory=self.acc.device.type == "cuda")  # fmt: skip

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

    def next_batch(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This process's ``accum`` micro-batches of the next step, each (input_ids (b, L), labels (b, L)) on the
        device, placed by ``self.layout``."""
        if self.shards is not None:
            micro = [next(self._shard_batches) for _ in range(self.accum)]
        else:
            micro = mlm_data.onthefly_micro_batches(self.blocks, self.masker, self.layout)
        device = self.acc.device
        return [(ids.to(device, non_blocking=True), labels.to(device, non_blocking=True)) for ids, labels in micro]

    # ---- one step ------------------------------------------------------------------------------------------------

    def step(self, step: int) -> ChromaMoeStepStats:
        """Forward/backward every micro-batch of the step (upcycling first at ``upcycle_step``), then the tail.

        Each micro-batch contributes ``Σ CE · P·A / N`` (N predicted tokens in the global batch, P processes, A
        micro-batches): Accelerate divides by A and data-parallel engines average over P, so the parameters get the
        gradient of the mean CE over the global batch. The balance loss is a mean over sequences applied with weight 1
        per forward pass, so ``aux_loss_weight = 1/A`` makes it the mean over this process's micro-batches (P-averaging
        does the rest).
        """
        micro_batches = self.next_batch()
        if not self.upcycled and step == self.cfg.upcycle_step:
            self.upcycle_now(step, micro_batches[0][0])
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
        global_counts = reduced[3:].reshape(counts.shape).cpu() if counts is not None else None
        grad_norm, lrs = self.optimizer_step(step, loss, global_counts)
        values = {"correct": float(reduced[1]), "predicted": predicted_global,
                  "aux_loss": float(reduced[2]) / (self.accum * acc.num_processes)}  # fmt: skip
        return ChromaMoeStepStats(loss, grad_norm, lrs, global_counts, values)

    def metrics(self, window: list[ChromaMoeStepStats]) -> dict[str, float]:
        tokens = len(window) * self.cfg.global_batch_tokens
        return {
            "train/loss": sum(s.loss for s in window) / len(window),
            "train/mlm_accuracy": sum(s.values["correct"] for s in window)
            / max(sum(s.values["predicted"] for s in window), 1.0),
            "train/aux_loss": sum(s.values["aux_loss"] for s in window) / len(window),
            "train/tokens_per_second": tokens / max(sum(s.seconds for s in window), 1e-9),
            "train/tokens": float((self.start_step + len(self.losses)) * self.cfg.global_batch_tokens),
        }

    def events(self, step: int, stats: ChromaMoeStepStats | None) -> dict[str, float]:
        """The upcycling record, at the step that switched to the MoE model."""
        if stats is None or self.upcycle is None or self.upcycle["step"] != step - 1:
            return {}
        self.upcycle["loss_after"] = stats.loss
        logged = {"upcycle/max_abs_logit_diff": self.upcycle["max_abs_logit_diff"]}
        if self.upcycle["loss_before"] is not None:
            self.upcycle["loss_jump"] = stats.loss - self.upcycle["loss_before"]
            logged["upcycle/loss_jump"] = self.upcycle["loss_jump"]
        self.info(f"upcycling record: {self.upcycle}")
        return logged

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
        dense_state = acc.get_state_dict(self.model)  # full on every process: sharding engines are refused at start
        dense = self.unwrapped
        moments = self._adam_moments()
        moe = upcycle_model(dense_state, dense.config, self.moe_config, seed=self.cfg.seed + step).to(acc.device)
        dense.eval()
        moe.eval()
        with torch.no_grad(), acc.autocast():
            diff = float((dense(input_ids=probe).logits.float() - moe(input_ids=probe).logits.float()).abs().max())
        del dense_state, dense
        acc.free_memory()
        self.prepare(moe, self.cfg.per_device_batch_size, start_step=step)
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
        self.reset_expert_counts()
        self.upcycle = {"step": step, "max_abs_logit_diff": diff, "optimizer_state_carried": carried,
                        "loss_before": self.losses[-1] if self.losses else None}  # fmt: skip
        self.info(
            f"step {step}: upcycled to {self.moe_config.n_routed_experts} routed experts; max |Δlogit| = {diff:.3g}; "
            f"AdamW moments {'carried over' if carried else 'restarted'}"
        )

    # ---- checkpoints and the final folder ------------------------------------------------------------------------

    def checkpoint_state(self, step: int) -> tuple[dict[str, Any], Callable[[Path], None] | None]:
        position, buffer = self._data_position(step)

        def write_buffer(folder: Path) -> None:
            np.save(folder / DATA_BUFFER_FILE, buffer)

        state = {"upcycled": self.upcycled, "upcycle": self.upcycle, "data": position}
        return state, None if buffer is None else write_buffer

    def write_final(self, folder: Path, state_dict: dict[str, torch.Tensor]) -> None:
        self.unwrapped.save_pretrained(
            folder, state_dict=state_dict, is_main_process=self.acc.is_main_process, save_function=self.acc.save
        )
        if self.acc.is_main_process:
            self.tokenizer.save_pretrained(folder)


def run(config: Phase1Config | Mapping[str, Any]) -> Phase1Result:
    """Train phase 1 with ``config`` (a ``Phase1Config`` or a mapping of its keys). Call it once per process under
    ``accelerate launch``/``torchrun``; in a plain Python process it trains on one device."""
    cfg = config if isinstance(config, Phase1Config) else common.config_from_dict(Phase1Config, config)
    accelerator = common.make_accelerator(expand_path(cfg.output_dir), cfg.mixed_precision)
    try:
        trainer = Phase1Trainer(cfg, accelerator)
        trainer.info(
            f"{accelerator.num_processes} process(es) × {cfg.per_device_batch_size} blocks × {cfg.seq_len} tokens × "
            f"{trainer.accum} accumulation = {cfg.global_batch_tokens} tokens per step; "
            f"steps {trainer.start_step}->{cfg.max_steps}"
        )
        final = trainer.train()
    finally:
        accelerator.end_training()
    if trainer.blocks is not None:
        trainer.info(f"data filters, current epoch {trainer.blocks.epoch}: {trainer.blocks.filter_summary()}")
        blocks_read = trainer.blocks.blocks_emitted - trainer._first_block
    else:
        trainer.info(f"pre-tokenised data {cfg.pretokenized}: texts {trainer.shards.manifest['texts']}")
        blocks_read = len(trainer.losses) * trainer.blocks_per_step
    steps_run = len(trainer.losses)
    return Phase1Result(
        first_step=trainer.start_step,
        losses=trainer.losses,
        learning_rates=trainer.learning_rates,
        output_dir=trainer.output_dir,
        final_dir=final,
        last_checkpoint=trainer.last_checkpoint,
        gradient_accumulation_steps=trainer.accum,
        tokens_per_step=blocks_read * cfg.seq_len // max(steps_run, 1),
        tokens_per_second=steps_run * cfg.global_batch_tokens / max(trainer.seconds, 1e-9),
        upcycle=trainer.upcycle,
    )


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = run(Phase1Config.from_command_line(argv, "phase1", "Phase-1 masked-LM pretraining of Chroma-MoE"))
    if result.losses and PartialState().is_main_process:
        logger.info(
            f"steps {result.first_step + 1}-{result.first_step + len(result.losses)}: loss {result.losses[0]:.4f} -> "
            f"{result.losses[-1]:.4f}; {result.tokens_per_second:.0f} tokens/s; final model {result.final_dir}"
        )


if __name__ == "__main__":
    common.run_command_line(main)

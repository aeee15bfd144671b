"""Benchmark: tokens/s of chroma-moe-small against a dense twin with the same number of active parameters.

Why: a sparse MoE only pays off if touching 22.6M of 43M parameters per token costs about what a dense model of 22.6M
costs. The dense twin is the same preset with `n_routed_experts=0` (every block gets the dense SwiGLU FFN) and an
`intermediate_size` solved so that `count_parameters(...)["active"]` matches the MoE model's; everything else
(MLA attention, latent-attention pooling, vocabulary) is identical. What remains is the MoE overhead: routing, token
sorting, grouped GEMMs over 16 experts, the balance loss (default `router_aux_loss_coef`, as in training).

The batch mimics an embedding-training batch: texts with lengths drawn uniformly between `--min-len` and `--max-len`
(seeded), random token ids, right-padded, with an attention mask. Both models run `ChromaMoeForEmbedding`:
"fwd+bwd" in training mode back-propagates a fixed random projection of the sentence embeddings; "fwd" is an
inference forward in eval mode under `torch.no_grad`. Throughput counts real (non-padding) tokens.

Run: `python benchmarks/model_throughput.py`. The last line printed is `moe_over_dense_time: X.XX` (fwd+bwd time of the
MoE model over the dense twin's; the target is <= 1.3).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

# The model files live at the repository root (as on the Hub); make them importable without an install.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine import report_load
from benchmarks.moe_dispatch import time_ms
from configuration_chroma_moe import ChromaMoeConfig
from modeling_chroma_moe import ChromaMoeForEmbedding, count_parameters

PRESET = "chroma-moe-small"


def dense_twin(moe_config: ChromaMoeConfig, count: str = "active") -> ChromaMoeConfig:
    """The preset with no routed experts and the dense FFN width whose parameter count is closest to the MoE model's
    `count` ("active": equal compute per token; "total": equal size, i.e. every block's dense FFN holds what the MoE's
    FFNs hold on average). A dense model's active count is its total, and both are linear in `intermediate_size`, so
    two counts give the slope."""
    if count not in ("active", "total"):
        raise ValueError(f"count={count!r}: expected 'active' or 'total'")
    target = count_parameters(moe_config)[count]
    base_width = moe_config.intermediate_size
    at_base = count_parameters(ChromaMoeConfig.from_preset(PRESET, n_routed_experts=0, intermediate_size=base_width))
    at_next = count_parameters(
        ChromaMoeConfig.from_preset(PRESET, n_routed_experts=0, intermediate_size=base_width + 1)
    )
    per_unit = at_next["total"] - at_base["total"]
    width = base_width + round((target - at_base["total"]) / per_unit)
    return ChromaMoeConfig.from_preset(PRESET, n_routed_experts=0, intermediate_size=width)


def mixed_length_batch(
    vocab_size: int, pad_id: int, num_texts: int, min_len: int, max_len: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (B, T_max) right-padded with `pad_id`, attention mask (B, T_max); lengths uniform in [min_len, max_len].
    Ids below 5 are the special tokens and are not drawn."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (num_texts,), generator=generator)  # (B,)
    longest = int(lengths.max())
    attention_mask = (torch.arange(longest)[None, :] < lengths[:, None]).long()  # (B, T_max)
    input_ids = torch.randint(5, vocab_size, (num_texts, longest), generator=generator)
    input_ids = input_ids.masked_fill(attention_mask == 0, pad_id)
    return input_ids, attention_mask


def training_step(
    model: ChromaMoeForEmbedding, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> Callable[[], None]:
    """Forward + backward of <embedding, fixed random target> summed over the batch (any scalar of the embeddings
    exercises the same backward graph)."""
    target = torch.randn(input_ids.shape[0], model.config.embedding_dim, generator=torch.Generator().manual_seed(1))

    def step() -> None:
        model.train()
        model.zero_grad(set_to_none=True)
        embedding = model(input_ids=input_ids, attention_mask=attention_mask).sentence_embedding  # (B, D)
        (embedding * target).sum().backward()

    return step


def inference_step(
    model: ChromaMoeForEmbedding, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> Callable[[], None]:
    def step() -> None:
        model.eval()
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask)

    return step


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-texts", type=int, default=32, help="texts in the batch")
    parser.add_argument("--min-len", type=int, default=16, help="shortest text, tokens")
    parser.add_argument("--max-len", type=int, default=256, help="longest text, tokens")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (the median is reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 1 <= args.min_len <= args.max_len:
        parser.error(f"need 1 <= --min-len ({args.min_len}) <= --max-len ({args.max_len})")
    report_load("start")
    torch.set_num_threads(args.threads)

    configs = {"moe": ChromaMoeConfig.from_preset(PRESET)}
    configs["dense"] = dense_twin(configs["moe"])
    counts = {name: count_parameters(config) for name, config in configs.items()}
    input_ids, attention_mask = mixed_length_batch(
        configs["moe"].vocab_size, configs["moe"].pad_token_id, args.num_texts, args.min_len, args.max_len, args.seed
    )
    real_tokens = int(attention_mask.sum())
    mismatch = abs(counts["dense"]["active"] - counts["moe"]["active"]) / counts["moe"]["active"]
    print(
        f"{PRESET}: MoE {counts['moe']['total'] / 1e6:.2f}M total / {counts['moe']['active'] / 1e6:.3f}M active; dense twin "
        f"(intermediate_size {configs['dense'].intermediate_size}) {counts['dense']['active'] / 1e6:.3f}M active "
        f"({mismatch:.2%} apart)"
    )
    print(
        f"batch: {args.num_texts} texts, lengths {args.min_len}-{args.max_len}, {real_tokens} real tokens "
        f"({input_ids.numel()} padded); torch {torch.__version__}, {args.threads} threads; median of {args.repeats} "
        f"after {args.warmup} warmup; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )

    torch.manual_seed(args.seed)
    models = {name: ChromaMoeForEmbedding(config) for name, config in configs.items()}
    timings = {
        pass_name: time_ms(
            {name: make(model, input_ids, attention_mask) for name, model in models.items()}, args.warmup, args.repeats
        )
        for pass_name, make in (("fwd+bwd", training_step), ("fwd", inference_step))
    }

    print()
    print("| pass    | MoE ms (best) | dense ms (best) | MoE tokens/s | dense tokens/s | MoE / dense time (best) |")
    print("|---------|--------------:|----------------:|-------------:|---------------:|------------------------:|")
    ratios = {}
    for pass_name, times in timings.items():
        moe, dense = times["moe"], times["dense"]
        ratios[pass_name] = moe.median / dense.median
        print(
            f"| {pass_name:7} | {moe.median:6.0f} ({moe.best:5.0f}) | {dense.median:8.0f} ({dense.best:5.0f}) | "
            f"{real_tokens / moe.median * 1e3:12.0f} | {real_tokens / dense.median * 1e3:14.0f} | "
            f"{ratios[pass_name]:15.2f} ({moe.best / dense.best:4.2f}) |"
        )
    report_load("end")
    print(f"moe_over_dense_time: {ratios['fwd+bwd']:.2f}")
    return ratios


if __name__ == "__main__":
    main()

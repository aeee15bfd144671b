"""Benchmark: Chroma-MoE's sparse MoE block against transformers' `DeepseekV2Moe` with its eager experts.

Why: the routed experts are the part of a fine-grained MoE that a naive implementation runs as a Python loop over
experts (64 small GEMMs per projection, plus gathers and scatters). `ChromaMoeSparseMoeBlock` dispatches them through
transformers' experts interface with one grouped GEMM per projection (`grouped_mm`); `DeepseekV2Moe` with
`experts_implementation="eager"` is the loop. Both blocks get the same configuration (DeepSeek-V2-Lite's MoE shape scaled
down: hidden 256, 64 routed experts of width 128, top-6 greedy softmax routing, 2 shared experts) and the same weights,
and their outputs are compared before anything is timed.

Like-for-like settings: `router_aux_loss_coef=0` (DeepseekV2Moe has no balance loss) and `norm_topk_prob=False`
(DeepseekV2Moe ignores it); both modules stay in training mode. "fwd" is an inference forward (`torch.no_grad`),
"fwd+bwd" a forward with autograd plus the backward of a fixed random output gradient into the input and all weights.

Run: `python benchmarks/moe_dispatch.py`. The last line printed is `speedup_fwd_bwd_vs_hf_eager: X.XX` (fp32, HF time
divided by ours; the target is >= 2.5).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import DeepseekV2Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

# The model files live at the repository root (as on the Hub); make them importable without an install.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine import report_load
from configuration_chroma_moe import ChromaMoeConfig
from modeling_chroma_moe import ChromaMoeSparseMoeBlock

HIDDEN = 256
ROUTED_EXPERTS = 64
EXPERT_WIDTH = 128
TOP_K = 6
SHARED_EXPERTS = 2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Largest tolerated |ours - HF| relative to max |HF output|: the blocks differ only in summation order (fp32 reshape-sum
# vs index_add_ in the compute dtype), so fp32 agrees to rounding and bf16 to a few bf16 ulps.
RELATIVE_TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2}


def build_blocks(seed: int) -> tuple[ChromaMoeSparseMoeBlock, DeepseekV2Moe]:
    """Our block (grouped_mm experts) and DeepseekV2Moe (eager experts) with identical fp32 weights."""
    config = ChromaMoeConfig(
        hidden_size=HIDDEN,
        n_routed_experts=ROUTED_EXPERTS,
        moe_intermediate_size=EXPERT_WIDTH,
        num_experts_per_tok=TOP_K,
        n_shared_experts=SHARED_EXPERTS,
        shared_expert_intermediate_size=EXPERT_WIDTH,
        norm_topk_prob=False,
        router_aux_loss_coef=0.0,
        pooling_num_heads=8,
        experts_implementation="grouped_mm",  # what ChromaMoePreTrainedModel picks by default; a bare block has none
    )
    hf_config = DeepseekV2Config(
        hidden_size=HIDDEN,
        num_attention_heads=8,
        n_routed_experts=ROUTED_EXPERTS,
        moe_intermediate_size=EXPERT_WIDTH,  # DeepseekV2Moe's shared expert is n_shared * this wide, as ours
        num_experts_per_tok=TOP_K,
        n_shared_experts=SHARED_EXPERTS,
        topk_method="greedy",
        routed_scaling_factor=1.0,
        experts_implementation="eager",
    )
    torch.manual_seed(seed)
    ours = ChromaMoeSparseMoeBlock(config)
    for parameter in ours.parameters():
        torch.nn.init.normal_(parameter, mean=0.0, std=config.initializer_range)
    theirs = DeepseekV2Moe(hf_config)
    with torch.no_grad():
        theirs.gate.weight.copy_(ours.gate.weight)
        theirs.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)  # (E, 2I, H), gate rows then up rows in both
        theirs.experts.down_proj.copy_(ours.experts.down_proj)  # (E, H, I)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(theirs.shared_experts, name).weight.copy_(getattr(ours.shared_experts, name).weight)
    return ours.train(), theirs.train()


def run_ours(block: ChromaMoeSparseMoeBlock, hidden: torch.Tensor) -> torch.Tensor:
    """(B, T, H) -> (B, T, H): our block's output, without padding (token_mask None)."""
    return block(hidden, None, 1.0)[0]


def run_theirs(block: DeepseekV2Moe, hidden: torch.Tensor) -> torch.Tensor:
    """(B, T, H) -> (B, T, H)."""
    return block(hidden)


def check_match(
    ours: ChromaMoeSparseMoeBlock, theirs: DeepseekV2Moe, hidden: torch.Tensor, dtype_name: str
) -> tuple[float, float]:
    """Max |ours - HF| of the outputs and of the input gradients; exits with a message when either is too large."""
    grad_out = torch.randn_like(hidden)
    results = []
    for block, run in ((ours, run_ours), (theirs, run_theirs)):
        x = hidden.detach().clone().requires_grad_(True)
        out = run(block, x)
        out.backward(grad_out)
        block.zero_grad(set_to_none=True)
        results.append((out.detach().float(), x.grad.float()))
    (out_a, grad_a), (out_b, grad_b) = results
    out_diff = (out_a - out_b).abs().max().item()
    grad_diff = (grad_a - grad_b).abs().max().item()
    tolerance = RELATIVE_TOLERANCE[dtype_name]
    if out_diff > tolerance * out_b.abs().max().item() or grad_diff > tolerance * grad_b.abs().max().item():
        raise SystemExit(
            f"{dtype_name}: our MoE block disagrees with DeepseekV2Moe (max |diff| output {out_diff:.3e}, input grad "
            f"{grad_diff:.3e}, allowed {tolerance:g} x max |HF value|): timings would compare different computations"
        )
    return out_diff, grad_diff


class Timing(NamedTuple):
    """Wall times of one candidate, ms. The median is the reported figure; the best (minimum) run is printed beside it
    because on a shared machine it is the run least disturbed by other processes."""

    median: float
    best: float


def time_ms(candidates: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, Timing]:
    """Time each callable. Repeats alternate between the candidates, so load from other processes on a shared machine
    hits all of them alike instead of whichever ran during a busy spell."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: Timing(statistics.median(values), min(values)) for name, values in times.items()}


def forward_only(block: torch.nn.Module, run: Callable, hidden: torch.Tensor) -> Callable[[], object]:
    """An inference forward: no graph is recorded."""

    def step() -> None:
        with torch.no_grad():
            run(block, hidden)

    return step


def forward_backward(block: torch.nn.Module, run: Callable, hidden: torch.Tensor) -> Callable[[], object]:
    """A training step's share of the block: forward with autograd, backward into the input and every weight."""

    x = hidden.detach().clone().requires_grad_(True)
    grad_out = torch.randn_like(hidden)

    def step() -> None:
        x.grad = None
        block.zero_grad(set_to_none=True)
        run(block, x).backward(grad_out)

    return step


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per call, as 8 sequences of tokens/8")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per measurement")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per measurement (the median is reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.tokens % 8:
        parser.error(f"--tokens={args.tokens} must be a multiple of 8 (8 sequences)")
    report_load("start")
    torch.set_num_threads(args.threads)

    print(
        f"MoE block: hidden {HIDDEN}, {ROUTED_EXPERTS} routed experts x width {EXPERT_WIDTH}, top-{TOP_K}, "
        f"{SHARED_EXPERTS} shared; {args.tokens} tokens; torch {torch.__version__}, {args.threads} threads; "
        f"median of {args.repeats} after {args.warmup} warmup; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    generator = torch.Generator().manual_seed(args.seed)
    hidden32 = torch.randn(8, args.tokens // 8, HIDDEN, generator=generator)  # (B, T, H)
    results: dict[str, float] = {}
    rows = []
    for dtype_name, dtype in DTYPES.items():
        ours, theirs = (block.to(dtype) for block in build_blocks(args.seed))
        hidden = hidden32.to(dtype)
        out_diff, grad_diff = check_match(ours, theirs, hidden, dtype_name)
        print(f"{dtype_name}: max |ours - HF| output {out_diff:.2e}, input grad {grad_diff:.2e}")
        for pass_name, make in (("fwd", forward_only), ("fwd+bwd", forward_backward)):
            timings = time_ms(
                {"ours": make(ours, run_ours, hidden), "hf": make(theirs, run_theirs, hidden)},
                args.warmup,
                args.repeats,
            )
            speedup = timings["hf"].median / timings["ours"].median
            rows.append((dtype_name, pass_name, timings["ours"], timings["hf"], speedup))
            results[f"{dtype_name}_{pass_name}"] = speedup

    print()
    print("| dtype | pass    | ours grouped_mm, ms (best) | HF DeepseekV2Moe eager, ms (best) | speedup (best) |")
    print("|-------|---------|---------------------------:|----------------------------------:|---------------:|")
    for dtype_name, pass_name, ours_ms, hf_ms, speedup in rows:
        print(
            f"| {dtype_name:5} | {pass_name:7} | {ours_ms.median:16.1f} ({ours_ms.best:7.1f}) | "
            f"{hf_ms.median:23.1f} ({hf_ms.best:7.1f}) | {speedup:5.2f}x ({hf_ms.best / ours_ms.best:5.2f}x) |"
        )
    report_load("end")
    print(f"speedup_fwd_bwd_vs_hf_eager: {results['fp32_fwd+bwd']:.2f}")
    return results


if __name__ == "__main__":
    main()

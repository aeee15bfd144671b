"""Benchmark: phase-1 training steps of a preset: tokens/s and model FLOPs utilisation (MFU).

    OMP_NUM_THREADS=2 python -m benchmarks.train_throughput --preset chroma-moe-small
    python -m benchmarks.train_throughput --preset chroma-moe-3b --num-hidden-layers 4 --dtype bf16 --device cuda

One step is phase 1's: masked-LM forward on ``--batch-size`` × ``--seq-len`` random tokens with 15% of the positions
labelled (only those go through the MLM head), backward (the balance loss included), gradient clipping and the AdamW
step of ``train.common.build_optimizer``; bf16 is autocast over fp32 weights, as Accelerate's ``mixed_precision=bf16``.
``--steps`` steps are timed after ``--warmup`` untimed ones.

MFU = model FLOPs per token × tokens/s ÷ the dense matmul rate of this device and dtype, measured in the same run (an
``n × n`` by ``n × n`` matmul, 2n³ FLOPs, median of 5). Not a datasheet peak: the MFU says how close a training step
comes to the matmul speed this device really gives. Model FLOPs per token (PaLM's accounting, Chowdhery et al. 2022,
App. B: 6 per parameter a token touches for forward + backward, plus attention):

    6 · N_active + 6 · p · (d² + V · d) + 6 · T · Σ_layers H · (d_qk + d_v)

``N_active``: the encoder parameters one token touches (attention projections, dense or shared FFN, router, the top-k
routed experts, norms), without the embedding table (a lookup); ``p = 0.15`` of the tokens go through the MLM head
(d × d transform and the V × d decoder); the last term is the attention scores and weighted sums over ``T`` keys in
each of the ``H`` heads (MLA: d_qk = nope + rope dims). Recomputation and the optimizer are not counted (MFU, not HFU).
The last line is ``mfu: X``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.machine import report_load
from configuration_chroma_moe import PRESETS, ChromaMoeConfig
from modeling_chroma_moe import ChromaMoeExperts, ChromaMoeForMaskedLM
from train.common import build_optimizer

MLM_PROBABILITY = 0.15
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def flops_per_token(config: ChromaMoeConfig, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token (forward + backward) by the formula of the module docstring, and its parts."""
    with torch.device("meta"):
        model = ChromaMoeForMaskedLM(config)
    encoder = model.model
    active = sum(p.numel() for p in encoder.parameters()) - encoder.embed_tokens.weight.numel()
    for module in encoder.modules():
        if isinstance(module, ChromaMoeExperts):
            per_expert = (module.gate_up_proj.numel() + module.down_proj.numel()) // module.num_experts
            active -= per_expert * (module.num_experts - config.num_experts_per_tok)
    d, vocab = config.hidden_size, config.vocab_size
    head = MLM_PROBABILITY * (d * d + vocab * d)
    attention = 0
    for layer in encoder.layers:
        attn = layer.self_attn
        qk = getattr(attn, "qk_head_dim", None) or attn.head_dim
        v = getattr(attn, "v_head_dim", None) or attn.head_dim
        attention += seq_len * attn.num_heads * (qk + v)
    return {"active_params": active, "total": 6 * active + 6 * head + 6 * attention,
            "params": 6 * active, "mlm_head": 6 * head, "attention": 6 * attention}  # fmt: skip


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """Dense matmul FLOP/s: median over 5 timed ``size``³ matmuls (after 2 untimed)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = []
    for repeat in range(7):
        synchronize(device)
        started = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        if repeat >= 2:
            times.append(time.perf_counter() - started)
    return 2 * size**3 / statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="chroma-moe-small", choices=sorted(PRESETS))
    parser.add_argument("--num-hidden-layers", type=int, help="cut the preset's depth (memory)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--matmul-size", type=int, help="n of the n×n matmul (default 8192 on a GPU, 2048 on a CPU)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    overrides = {} if args.num_hidden_layers is None else {"num_hidden_layers": args.num_hidden_layers}
    config = ChromaMoeConfig.from_preset(args.preset, **overrides)
    report_load("start")
    torch.manual_seed(0)
    model = ChromaMoeForMaskedLM(config).to(device).train()
    optimizer = build_optimizer(model, 3e-4, 0.1, (0.9, 0.95), 1e-8)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, config.vocab_size, (args.batch_size, args.seq_len), generator=generator)
    chosen = torch.rand(input_ids.shape, generator=generator) < MLM_PROBABILITY
    labels = input_ids.masked_fill(~chosen, -100).to(device)  # (B, T)
    input_ids = input_ids.to(device)
    bf16 = args.dtype == "bf16"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    seconds = time.perf_counter() - started
    tokens_per_s = args.steps * input_ids.numel() / seconds
    size = args.matmul_size or (8192 if device.type == "cuda" else 2048)
    peak = matmul_rate(device, DTYPES[args.dtype], size)
    flops = flops_per_token(config, args.seq_len)
    mfu = flops["total"] * tokens_per_s / peak
    report_load("end")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"preset {args.preset}, {config.num_hidden_layers} layers, {args.dtype}, {name}; "
          f"{args.batch_size} × {args.seq_len} tokens per step, {args.steps} steps in {seconds:.2f} s")  # fmt: skip
    print(f"active_params_without_embeddings: {flops['active_params']}")
    print(f"flops_per_token: {flops['total']:.4g} (parameters {flops['params']:.4g}, MLM head {flops['mlm_head']:.4g}, "
          f"attention {flops['attention']:.4g})")  # fmt: skip
    print(f"matmul_flops_per_s: {peak:.4g} ({size}×{size}, {args.dtype})")
    print(f"tokens_per_s: {tokens_per_s:.1f}")
    print(f"mfu: {mfu:.4f}")
    return {"tokens_per_s": tokens_per_s, "mfu": mfu, "matmul_flops_per_s": peak}


if __name__ == "__main__":
    main()

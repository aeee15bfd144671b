"""All-to-all overhead of expert parallelism: a one-layer model whose FFN is the MoE layer (4,096 tokens, d 256, 64 experts of width 128, top-6,
2 shared) run by one process holding every expert, against 2 processes (gloo) that each hold 32 experts and exchange
tokens with all-to-all through transformers' EP plan (`DistributedConfig(fsdp_size=2, ep_size=2)`), each with half
the tokens. Forward+backward, fp32, median of repeats.

    python benchmarks/expert_parallel.py            # spawns the 2-process run itself with torch.distributed.run

On one 2-core CPU both runs share the same two cores (1 thread per rank vs 2 threads), so the ratio measures what the
exchange and the sharded bookkeeping cost, not a speed-up: EP exists to fit experts that do not fit one device.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine import report_load  # noqa: E402
from configuration_chroma_moe import ChromaMoeConfig  # noqa: E402
from modeling_chroma_moe import ChromaMoeModel  # noqa: E402

TOKENS, REPEATS, WARMUP = 4096, 7, 2


def layer_config() -> ChromaMoeConfig:
    return ChromaMoeConfig.from_preset(
        "chroma-moe-tiny", vocab_size=512, hidden_size=256, num_hidden_layers=1, first_k_dense_replace=0,
        n_routed_experts=64, moe_intermediate_size=128, n_shared_experts=2, shared_expert_intermediate_size=128,
        num_experts_per_tok=6, router_aux_loss_coef=0.0, pooling_num_heads=4,
    )


def time_model(model: torch.nn.Module, tokens: int) -> float:
    """Median seconds of forward+backward of the one-layer model on `tokens` tokens (sequences of 256). The whole model
    is timed, not the MoE block alone: under FSDP only the wrapped modules' hooks gather the dense weights."""
    ids = torch.randint(5, 512, (tokens // 256, 256), generator=torch.Generator().manual_seed(0))
    times = []
    for i in range(WARMUP + REPEATS):
        start = time.perf_counter()
        model(input_ids=ids).last_hidden_state.pow(2).mean().backward()
        if i >= WARMUP:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(path: str, result_file: str) -> None:
    import torch.distributed as dist
    from transformers import AutoModel
    from transformers.distributed import DistributedConfig

    torch.set_num_threads(1)
    model = AutoModel.from_pretrained(path, trust_remote_code=True, distributed_config=DistributedConfig(fsdp_size=2, ep_size=2))
    seconds = time_model(model.train(), TOKENS // dist.get_world_size())
    slowest = torch.tensor([seconds])
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        Path(result_file).write_text(json.dumps({"ep2_seconds": slowest.item()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("MODEL_DIR", "RESULT_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    report_load("start")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model = ChromaMoeModel(layer_config())
        model.save_pretrained(Path(tmp) / "model")
        single = time_model(model.train(), TOKENS)
        result = Path(tmp) / "result.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
             "--worker", str(Path(tmp) / "model"), str(result)],
            check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        ep2 = json.loads(result.read_text())["ep2_seconds"]
    print(f"| run | ms (fwd+bwd, {TOKENS} tokens) |\n|---|---:|")
    print(f"| 1 process, 64 experts, 2 threads | {single * 1e3:.1f} |")
    print(f"| 2 processes x 32 experts, all-to-all, 1 thread each | {ep2 * 1e3:.1f} |")
    report_load("end")
    print(f"ep2_over_single_time: {ep2 / single:.2f}")


if __name__ == "__main__":
    main()

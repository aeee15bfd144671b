"""Phase 2 with 2 processes (gloo on CPU, through Accelerate's DDP): every query is scored against the documents and
hard negatives of both processes, and the loss and every gradient (routers and temperature included) equal one
process running the whole global batch, for every split of the hard negatives over the processes (uneven, all on one
process, none anywhere: a process without negatives must still take part in every collective and its backward).

End to end, `accelerate launch --multi_gpu --num_processes 2 train/phase2.py` trains like one process with the same
global batch: same losses, temperatures and final weights, and the final folder loads.

The file is also the worker: `python -m torch.distributed.run --nproc_per_node 2 tests/test_phase2_distributed.py OUT`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

# tests/ is on sys.path under pytest and when this file runs as the worker; `workspace` is a fixture
from test_phase2 import random_features, workspace  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
QUERIES_PER_PROCESS = 2
# Hard negatives per process: uneven on purpose (the gather pads, the balance-loss weights use global counts), then all
# on one process either way round (issue 13: [2, 0] crashed gloo at the all-gather's backward), then none anywhere.
NEGATIVE_SPLITS = ((3, 1), (2, 0), (0, 2), (0, 0))
# Text ids for the false-negative mask, with collisions across processes: pair 2 (process 1) repeats pair 0's positive,
# and process 0's second hard negative is pair 1's positive.
PAIR_IDS = torch.tensor([[1, 101], [2, 102], [3, 101], [4, 104]])
NEGATIVE_IDS = torch.tensor([105, 102, 106, 107])


def _fresh(seed: int = 0):
    from configuration_chroma_moe import ChromaMoeConfig
    from modeling_chroma_moe import ChromaMoeForEmbedding
    from train.contrastive import InfoNCELoss

    torch.manual_seed(seed)
    config = ChromaMoeConfig.from_preset("chroma-moe-tiny", router_aux_loss_coef=0.5)
    return ChromaMoeForEmbedding(config).train(), InfoNCELoss(temperature=0.05, symmetric=True, matryoshka_dims=[32, 16])


def _grads(model, loss_fn) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    grads["log_temperature"] = loss_fn.log_temperature.grad.detach().clone()
    return grads


def _local_batch(batch, rank: int, split: tuple[int, ...]):
    """Process `rank`'s share of the global `batch`: its queries and positives, and its `split[rank]` hard negatives."""
    from train.contrastive import ContrastiveBatch

    rows = slice(rank * QUERIES_PER_PROCESS, (rank + 1) * QUERIES_PER_PROCESS)
    first = sum(split[:rank])
    negatives = slice(first, first + split[rank])
    return ContrastiveBatch(
        {k: v[rows] for k, v in batch.queries.items()},
        {k: v[rows] for k, v in batch.positives.items()},
        {k: v[negatives] for k, v in batch.negatives.items()},
        batch.pair_ids[rows],
        batch.negative_ids[negatives],
    )


def worker(out_path: str) -> None:
    """Each process: the single-process full-batch references first (no process group yet), then, per negatives split,
    its own share of the batch under Accelerate/DDP; rank 0 writes the comparisons."""
    from train.common import make_accelerator
    from train.contrastive import ContrastiveBatch, grad_cache_step

    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(1)
    queries = random_features(generator, WORLD * QUERIES_PER_PROCESS, 10)
    positives = random_features(generator, WORLD * QUERIES_PER_PROCESS, 12)
    negatives = random_features(generator, max(map(sum, NEGATIVE_SPLITS)), 12)

    batches, references = [], []
    for split in NEGATIVE_SPLITS:
        kept = {k: v[: sum(split)] for k, v in negatives.items()}
        batch = ContrastiveBatch(queries, positives, kept, PAIR_IDS, NEGATIVE_IDS[: sum(split)])
        model, loss_fn = _fresh()
        reference = grad_cache_step(model, loss_fn, batch, chunk_size=64)
        batches.append(batch)
        references.append((reference, _grads(model, loss_fn)))

    accelerator = make_accelerator(Path(out_path).parent / "accelerate", "no")
    rank = accelerator.process_index
    results = []
    for split, batch, (reference, expected) in zip(NEGATIVE_SPLITS, batches, references):
        model, loss_fn = _fresh()
        model = accelerator.prepare(model)
        output = grad_cache_step(
            model, loss_fn, _local_batch(batch, rank, split), chunk_size=1,
            backward=accelerator.backward, no_sync=lambda: accelerator.no_sync(model),
        )  # fmt: skip
        loss = accelerator.reduce(output.loss, reduction="mean")
        aux = accelerator.reduce(output.aux_loss, reduction="mean")
        actual = _grads(accelerator.unwrap_model(model), loss_fn)
        errors = {name: float((actual[name] - grad).norm() / grad.norm().clamp_min(1e-12)) for name, grad in expected.items()}
        results.append({
            "split": list(split),
            "world": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type),
            "wrapped": type(model).__name__,
            "loss": float(loss),
            "reference_loss": float(reference.loss),
            "aux_loss": float(aux),
            "reference_aux_loss": float(reference.aux_loss),
            "missing": sorted(set(expected) - set(actual)),
            "errors": errors,
        })  # fmt: skip
    if rank == 0:
        Path(out_path).write_text(json.dumps(results))
    accelerator.wait_for_everyone()
    accelerator.end_training()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with the gloo backend is unavailable"
)
def test_two_processes_equal_one_full_batch_for_every_negatives_split(tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", f"--master_port={_free_port()}",
               str(Path(__file__).resolve()), str(out)]  # fmt: skip
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(out.read_text())
    assert [result["split"] for result in results] == [list(split) for split in NEGATIVE_SPLITS]
    for result in results:
        assert result["world"] == WORLD and result["wrapped"] == "DistributedDataParallel", result
        assert result["missing"] == []
        assert abs(result["loss"] - result["reference_loss"]) <= 1e-5 * abs(result["reference_loss"]), result
        assert abs(result["aux_loss"] - result["reference_aux_loss"]) <= 1e-5 * abs(result["reference_aux_loss"]), result
        routers = [name for name in result["errors"] if name.endswith("mlp.gate.weight")]
        assert len(routers) == 2 and "log_temperature" in result["errors"]
        worst = max(result["errors"], key=result["errors"].get)
        assert result["errors"][worst] <= 1e-5, f"{result['split']} {worst}: relative gradient error {result['errors'][worst]:.2e}"


def _launch_phase2(workspace: dict[str, Path], output: Path, processes: int, port: int) -> list[dict]:
    """``accelerate launch train/phase2.py`` on the tiny config with ``processes`` processes; its train log."""
    from test_phase2 import read_log

    overrides = [
        f"output_dir={output}", f"tokenizer={workspace['tokenizer']}",
        f"train_sources=[{{path: {workspace['pairs']}, task: finance_qa}}, {{beir: {workspace['beir']}, task: finance_qa}}]",
        "dev_beir=null", "eval_every=0", "split_fraction=0.6", "batch_sampling=per_source",
        "model={preset: chroma-moe-tiny, hidden_dropout: 0.0, attention_dropout: 0.0}",  # no dropout: equal runs
    ]  # fmt: skip
    launch = ["--multi_gpu", "--num_processes", str(processes)] if processes > 1 else ["--num_processes", "1", "--cpu"]
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(port), str(REPO / "train" / "phase2.py"),
               "--config", str(REPO / "train" / "configs" / "phase2_tiny.yaml"), *overrides]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return read_log(output)


@pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with the gloo backend is unavailable"
)
def test_accelerate_launch_with_two_processes_trains_like_one(workspace, tmp_path):
    """4 steps of the tiny config (global batch 8, per-source batches, checkpoints every 2 steps) on 1 and on 2
    processes: every step's loss and temperature, the final weights and the final folder's embeddings agree."""
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    one = _launch_phase2(workspace, tmp_path / "one", 1, _free_port())
    two = _launch_phase2(workspace, tmp_path / "two", 2, _free_port())
    assert [row["step"] for row in two] == [row["step"] for row in one] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        for key in ("train/loss", "train/temperature"):
            assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]), (key, a, b)
    assert one[0]["train/loss"] != one[-1]["train/loss"]
    checkpoint = tmp_path / "two" / "checkpoints" / "checkpoint-00000004"  # the last one kept
    assert sorted(path.name for path in checkpoint.glob("random_states_*.pkl")) == [f"random_states_{r}.pkl" for r in (0, 1)]

    weights = [load_file(next((tmp_path / name / "final").rglob("model.safetensors"))) for name in ("one", "two")]
    assert weights[0].keys() == weights[1].keys()
    for name, tensor in weights[0].items():
        assert torch.allclose(tensor, weights[1][name], atol=1e-5), name
    query = "How did revenue change at Acme?"
    models = [SentenceTransformer(str(tmp_path / name / "final"), trust_remote_code=True) for name in ("one", "two")]
    embeddings = [model.encode_query([query], convert_to_tensor=True) for model in models]
    assert torch.allclose(embeddings[0], embeddings[1], atol=1e-5)


if __name__ == "__main__":
    worker(sys.argv[1])

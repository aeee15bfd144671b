"""Worker for tests/test_distill.py, started by `torch.distributed.run --nproc_per_node 2 ... OUT CACHE_DIR`.

Each process: (1) GradCache with InfoNCE + distillation on the whole global batch in one process (no process group yet),
the reference; (2) its own share of the batch under Accelerate/DDP, with the teacher embeddings of its rows only;
(3) a teacher cache built by both processes from the same texts with a counting encoder. Rank 0 writes the comparison
of losses and gradients; every rank writes the texts it encoded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

WORLD = 2
QUERIES_PER_PROCESS = 2
NEGATIVES_PER_PROCESS = (3, 1)  # uneven: the gathers pad
TEACHER_DIM = 24  # differs from the student's 32
NEGATIVES_KNOWN = torch.tensor([True, False, True, True])  # the second negative (a parallel pair's) has no target
CACHE_TEXTS = [f"text {i}" for i in range(40)]


def _fresh():
    from configuration_chroma_moe import ChromaMoeConfig
    from modeling_chroma_moe import ChromaMoeForEmbedding
    from train.contrastive import InfoNCELoss
    from train.distill import ChromaMoeDistillationLoss

    torch.manual_seed(0)
    config = ChromaMoeConfig.from_preset("chroma-moe-tiny", router_aux_loss_coef=0.5)
    info_nce = InfoNCELoss(temperature=0.05, symmetric=True)
    distill = ChromaMoeDistillationLoss(similarity_weight=2.0, score_weight=0.5, teacher_temperature=0.1)
    return ChromaMoeForEmbedding(config).train(), info_nce, distill


def _grads(model, loss_fn) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    grads["log_temperature"] = loss_fn.log_temperature.grad.detach().clone()
    return grads


def main(out_path: str, cache_dir: str) -> None:
    from test_phase2 import random_features

    from train.common import make_accelerator
    from train.contrastive import ContrastiveBatch, TeacherEmbeddings, grad_cache_step
    from train.distill import ChromaMoeTeacherCache

    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(1)
    queries = random_features(generator, WORLD * QUERIES_PER_PROCESS, 10)
    positives = random_features(generator, WORLD * QUERIES_PER_PROCESS, 12)
    negatives = random_features(generator, sum(NEGATIVES_PER_PROCESS), 12)
    teacher = TeacherEmbeddings(
        torch.randn(WORLD * QUERIES_PER_PROCESS, TEACHER_DIM, generator=generator),
        torch.randn(WORLD * QUERIES_PER_PROCESS, TEACHER_DIM, generator=generator),
        torch.randn(sum(NEGATIVES_PER_PROCESS), TEACHER_DIM, generator=generator),
        NEGATIVES_KNOWN,
    )

    model, info_nce, distill = _fresh()
    reference = grad_cache_step(
        model, info_nce, ContrastiveBatch(queries, positives, negatives, teacher=teacher), chunk_size=64, distill_fn=distill
    )
    expected = _grads(model, info_nce)

    accelerator = make_accelerator(Path(out_path).parent / "accelerate", "no")
    rank = accelerator.process_index
    model, info_nce, distill = _fresh()
    model = accelerator.prepare(model)
    rows = slice(rank * QUERIES_PER_PROCESS, (rank + 1) * QUERIES_PER_PROCESS)
    first = sum(NEGATIVES_PER_PROCESS[:rank])
    local_negatives = slice(first, first + NEGATIVES_PER_PROCESS[rank])
    local = ContrastiveBatch(
        {k: v[rows] for k, v in queries.items()},
        {k: v[rows] for k, v in positives.items()},
        {k: v[local_negatives] for k, v in negatives.items()},
        teacher=TeacherEmbeddings(
            teacher.queries[rows], teacher.positives[rows], teacher.negatives[local_negatives], NEGATIVES_KNOWN[local_negatives]
        ),
    )
    output = grad_cache_step(
        model, info_nce, local, chunk_size=1, backward=accelerator.backward, no_sync=lambda: accelerator.no_sync(model),
        distill_fn=distill,
    )  # fmt: skip
    loss = accelerator.reduce(output.loss, reduction="mean")
    terms = {name: float(accelerator.reduce(value, reduction="mean")) for name, value in output.distill.items()}
    actual = _grads(accelerator.unwrap_model(model), info_nce)
    errors = {name: float((actual[name] - grad).norm() / grad.norm().clamp_min(1e-12)) for name, grad in expected.items()}

    encoded: list[str] = []

    def encode(texts: list[str], prompt: str) -> np.ndarray:
        encoded.extend(texts)
        return np.stack([np.full(4, float(text.split()[1]), dtype=np.float32) for text in texts])

    cache = ChromaMoeTeacherCache(cache_dir, "counting", encode=encode, shard_size=8)
    cache.ensure(CACHE_TEXTS[:30], CACHE_TEXTS[20:])
    looked_up = cache.lookup(CACHE_TEXTS[:30], "")[:, 0].tolist()
    Path(out_path).with_suffix(f".rank{rank}.json").write_text(json.dumps({"encoded": encoded, "looked_up": looked_up}))
    if rank == 0:
        result = {
            "world": accelerator.num_processes,
            "wrapped": type(model).__name__,
            "loss": float(loss),
            "reference_loss": float(reference.loss),
            "terms": terms,
            "reference_terms": {name: float(value) for name, value in reference.distill.items()},
            "missing": sorted(set(expected) - set(actual)),
            "errors": errors,
        }
        Path(out_path).write_text(json.dumps(result))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

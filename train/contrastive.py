"""Phase-2 objective: InfoNCE with a learnable temperature, cross-process negatives, and GradCache.

- ``InfoNCELoss``: each query is scored against every positive and every hard negative of the *global* batch (in-batch
  negatives, Karpukhin et al. 2020 DPR; hard negatives, Xiong et al. 2021 ANCE), with cosine similarity divided by a
  learnable temperature (CLIP, Radford et al. 2021, which also keeps it in range by clamping after each step), an
  optional document→query term (the symmetric loss of Li et al. 2023 GTE) and optional Matryoshka prefixes
  (Kusupati et al. 2022: the loss is summed over truncated, re-normalised embeddings). Duplicates of a query's own
  pair (same query text or same positive text, e.g. several questions on one table) are masked out of its candidates
  instead of being pushed away as negatives.
- ``gather_across_processes``: an autograd-aware all-gather (its backward sums the gradients of all processes into the
  local slice), with padding so processes may hold different numbers of rows (hard negatives vary per query).
- ``grad_cache_step``: GradCache (Gao et al. 2021, arXiv:2101.06983). A global batch far larger than memory is embedded
  in chunks without a graph, the loss and its gradient w.r.t. every embedding (and the temperature) are computed on the
  full batch, then each chunk is re-run with its saved RNG state (so dropout draws the same masks) and back-propagated
  from the cached embedding gradient. ``sentence_transformers``' ``CachedMultipleNegativesRankingLoss`` does the same
  with a fixed scale; its ``RandContext`` (RNG snapshot/replay) is reused here as is. A distillation loss
  (``train.distill``) on the batch's ``TeacherEmbeddings`` is added to the loss of that full-batch step, so its
  gradients take the same cached-embedding path. On one process, a step that fits in one chunk is the plain
  full-batch pass instead: the no-graph pass would only repeat the forward.

Gradient scaling with several processes: process ``r`` returns ``W / N · Σ_{i ∈ r} ℓ_i`` over its own queries
(``W`` processes, ``N`` queries in the global batch). The all-gather backward sums every process's gradient into the
documents it embedded, and data-parallel engines average parameter gradients over processes, so the parameters get
exactly ``∇ (1/N) Σ_i ℓ_i``, the single-process full-batch gradient. The temperature lives outside the wrapped model, so
``grad_cache_step`` averages its gradient itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sentence_transformers.base.losses.gradcache import RandContext
from torch import nn
from torch.distributed import _functional_collectives as funcol

Features = dict[str, torch.Tensor]
MODEL_INPUTS = ("input_ids", "attention_mask", "pooling_mask")


def _world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_across_processes(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All-gather `tensor` `(n_r, D)` from every process, keeping autograd: returns `(Σ_r n_r, D)` in rank order and the
    offset of this process's rows in it. Row counts may differ between processes (padded for the collective), and may
    be 0 on some or all of them.

    The backward of the gather sums, over processes, the gradient each one computed for a row into the process that
    owns the row: each process must therefore compute the loss of its own queries only (see the module docstring).
    That backward is itself a collective, so every process must run it or none: when any process's rows require a
    gradient, every process's gathered result does, even where the local rows are a constant (a process without hard
    negatives passes an empty tensor autograd does not track).
    """
    rank, world = _world()
    if world == 1:
        return tensor, 0
    local = torch.tensor([tensor.shape[0], int(tensor.requires_grad)], device=tensor.device)  # (rows, requires_grad)
    every = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(every, local)
    counts = [int(entry[0]) for entry in every]
    longest = max(counts)
    if longest == 0:
        return tensor, 0
    padded = F.pad(tensor, (0, 0, 0, longest - tensor.shape[0])).contiguous()  # (longest, D)
    if any(int(entry[1]) for entry in every) and not padded.requires_grad:
        padded = padded.detach().requires_grad_()  # a fresh leaf: the caller's tensor is left as it was
    gathered = funcol.wait_tensor(funcol.all_gather_single_autograd(padded, 0, dist.group.WORLD))  # (W·longest, D)
    pieces = [gathered[r * longest : r * longest + counts[r]] for r in range(world)]
    return torch.cat(pieces), sum(counts[:rank])


class InfoNCELoss(nn.Module):
    """InfoNCE over the global batch with a learnable temperature τ = exp(log_temperature).

    For query i with positive p_i: ℓ_i = -log softmax_j(cos(q_i, d_j) / τ)[p_i] over d = all positives then all hard
    negatives of the global batch. With `symmetric`, also ℓ'_i = -log softmax_j(cos(p_i, q_j) / τ)[q_i] over all global
    queries, and the two are averaged. With `matryoshka_dims`, the loss is summed over those embedding prefixes
    (each re-normalised). τ is log-parameterised (positive, scale-free steps) and clamped into `temperature_range`
    by `clamp_()` after each optimizer step, so it always receives a gradient (a clamp in the forward would zero it).
    """

    def __init__(
        self,
        temperature: float = 0.05,
        temperature_range: tuple[float, float] = (0.01, 1.0),
        symmetric: bool = False,
        matryoshka_dims: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        low, high = temperature_range
        if not 0 < low <= temperature <= high:
            raise ValueError(f"temperature {temperature} must lie in temperature_range [{low}, {high}] with {low} > 0")
        if matryoshka_dims is not None and (not matryoshka_dims or any(int(d) <= 0 for d in matryoshka_dims)):
            raise ValueError(f"matryoshka_dims must be a non-empty list of positive sizes, got {matryoshka_dims!r}")
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        self.log_range = (math.log(low), math.log(high))
        self.symmetric = symmetric
        self.matryoshka_dims = [int(d) for d in matryoshka_dims] if matryoshka_dims is not None else None

    @property
    def temperature(self) -> float:
        return float(self.log_temperature.detach().exp())

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep τ in range (call after every optimizer step)."""
        self.log_temperature.clamp_(*self.log_range)

    def forward(
        self,
        queries: torch.Tensor,
        positives: torch.Tensor,
        negatives: torch.Tensor | None = None,
        pair_ids: torch.Tensor | None = None,
        negative_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """queries, positives `(n, D)` (row i of each is a pair), negatives `(m, D)` (this process's hard negatives,
        any count, possibly none) -> this process's share of the global loss (see the module docstring).

        `pair_ids` `(n, 2)` (ids of each pair's query and positive text) and `negative_ids` `(m,)` remove false
        negatives: another pair with the same query or the same positive (TAT-QA asks several questions of one table;
        a parallel corpus pairs one sentence with several translations), and a hard negative equal to the query's own
        positive, are left out of that query's candidates (and of the document→query term likewise).
        """
        if queries.shape != positives.shape:
            raise ValueError(f"queries {tuple(queries.shape)} and positives {tuple(positives.shape)} must match")
        _, world = _world()
        if negatives is None:
            negatives = positives.new_zeros((0, positives.shape[1]))
        all_positives, offset = gather_across_processes(positives)  # (N, D)
        all_negatives, _ = gather_across_processes(negatives)  # (M, D)
        all_queries = gather_across_processes(queries)[0] if self.symmetric else None  # (N, D)
        rows = torch.arange(queries.shape[0], device=queries.device)
        targets = rows + offset  # (n,)
        collide, negative_is_positive = None, None
        if pair_ids is not None:
            all_pair_ids = gather_across_processes(pair_ids)[0]  # (N, 2)
            if negative_ids is None:
                negative_ids = pair_ids.new_zeros((negatives.shape[0],))
            all_negative_ids = gather_across_processes(negative_ids[:, None])[0][:, 0]  # (M,)
            collide = (pair_ids[:, None, :] == all_pair_ids[None, :, :]).any(dim=-1)  # (n, N)
            collide[rows, targets] = False
            negative_is_positive = pair_ids[:, 1:] == all_negative_ids[None, :]  # (n, M)
        inverse_temperature = (-self.log_temperature).exp()
        full_dim = queries.shape[1]
        total = queries.new_zeros(())
        for dim in self.matryoshka_dims or [full_dim]:
            if dim > full_dim:
                raise ValueError(f"matryoshka dim {dim} exceeds the embedding size {full_dim}")
            q = F.normalize(queries[:, :dim], dim=-1)
            documents = F.normalize(torch.cat([all_positives, all_negatives])[:, :dim], dim=-1)  # (N + M, d)
            scores = q @ documents.T * inverse_temperature  # (n, N + M)
            if collide is not None:
                scores = scores.masked_fill(torch.cat([collide, negative_is_positive], dim=1), float("-inf"))
            loss = F.cross_entropy(scores, targets, reduction="sum")
            if all_queries is not None:
                p = F.normalize(positives[:, :dim], dim=-1)
                reverse = p @ F.normalize(all_queries[:, :dim], dim=-1).T * inverse_temperature  # (n, N)
                if collide is not None:
                    reverse = reverse.masked_fill(collide, float("-inf"))  # the relation is symmetric
                loss = (loss + F.cross_entropy(reverse, targets, reduction="sum")) / 2
            total = total + loss
        return total * world / all_positives.shape[0]


@dataclass
class TeacherEmbeddings:
    """A teacher's embeddings of one process's share of a step, aligned row by row with a `ContrastiveBatch`:
    `queries` `(n, D_t)`, `positives` `(n, D_t)`, `negatives` `(m, D_t)` or None, and `negatives_known` `(m,)` bool
    (False where a hard negative has no target: the negatives of parallel pairs, whose source-language text is
    unknown). `D_t` is the teacher's size, independent of the student's. Built by `train.distill`."""

    queries: torch.Tensor
    positives: torch.Tensor
    negatives: torch.Tensor | None = None
    negatives_known: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> TeacherEmbeddings:
        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device)

        return TeacherEmbeddings(move(self.queries), move(self.positives), move(self.negatives), move(self.negatives_known))


@dataclass
class ContrastiveBatch:
    """One process's share of a step: tokenised queries, positives and hard negatives (each a dict of
    `input_ids`, `attention_mask`, `pooling_mask`, all `(rows, T)`). Row i of queries pairs with row i of positives;
    negatives may have any number of rows, or be None. `pair_ids` `(n, 2)` / `negative_ids` `(m,)`: text ids for the
    false-negative mask of `InfoNCELoss` (optional). `teacher`: the teacher's embeddings of the same rows, for a
    distillation loss (optional)."""

    queries: Features
    positives: Features
    negatives: Features | None = None
    pair_ids: torch.Tensor | None = None
    negative_ids: torch.Tensor | None = None
    teacher: TeacherEmbeddings | None = None

    def groups(self) -> Iterator[tuple[str, Features]]:
        yield "queries", self.queries
        yield "positives", self.positives
        if self.negatives is not None and self.negatives["input_ids"].shape[0] > 0:
            yield "negatives", self.negatives

    def to(self, device: torch.device | str) -> ContrastiveBatch:
        def move(features: Features | None) -> Features | None:
            return None if features is None else {key: value.to(device) for key, value in features.items()}

        def move_ids(ids: torch.Tensor | None) -> torch.Tensor | None:
            return None if ids is None else ids.to(device)

        return ContrastiveBatch(
            move(self.queries), move(self.positives), move(self.negatives), move_ids(self.pair_ids),
            move_ids(self.negative_ids), None if self.teacher is None else self.teacher.to(device),
        )  # fmt: skip


@dataclass
class StepOutput:
    """What one GradCache step reports: the loss (this process's share, detached; InfoNCE plus any distillation
    terms), the MoE balance loss as the full-batch passes would log it, the summed per-layer expert token counts, the
    number of embedded texts, and each weighted distillation term (this process's share, detached; empty without
    distillation)."""

    loss: torch.Tensor
    aux_loss: torch.Tensor
    expert_counts: tuple[torch.Tensor, ...]
    texts: int
    distill: dict[str, torch.Tensor] = field(default_factory=dict)


def _backbone(model: nn.Module) -> nn.Module:
    """The `ChromaMoeModel` inside a (possibly DDP/DeepSpeed-wrapped) `ChromaMoeForEmbedding`."""
    return getattr(model, "module", model).model


def _chunks(features: Features, size: int) -> list[Features]:
    rows = features["input_ids"].shape[0]
    return [{key: features[key][start : start + size] for key in MODEL_INPUTS} for start in range(0, rows, size)]


def _chunk_shares(groups: dict[str, Features]) -> dict[str, float]:
    """Per group, the balance-loss weight of one row: `W / N_group` with `N_group` the group's rows over all `W`
    processes. The full-batch reference takes the mean over the group's N sequences; data-parallel engines then average
    over processes, hence the factor W (exact even when processes hold different numbers of hard negatives)."""
    _, world = _world()
    names = ("queries", "positives", "negatives")
    local = [groups[name]["input_ids"].shape[0] if name in groups else 0 for name in names]
    totals = torch.tensor(local, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(totals)
    return {name: world / float(total) for name, total in zip(names, totals) if name in groups}


def _embed(model: nn.Module, chunk: Features):
    return model(**{key: chunk[key] for key in MODEL_INPUTS}, normalize=False)


def grad_cache_step(
    model: nn.Module,
    loss_fn: InfoNCELoss,
    batch: ContrastiveBatch,
    chunk_size: int,
    *,
    backward: Callable[[torch.Tensor], None] | None = None,
    no_sync: Callable[[], AbstractContextManager] | None = None,
    distill_fn: Callable[..., dict[str, torch.Tensor]] | None = None,
) -> StepOutput:
    """Accumulate into `.grad` the gradients of `loss_fn` on `batch` for `model`'s parameters and the temperature,
    running the model on at most `chunk_size` texts at a time (GradCache). On one process, when the step's texts
    number at most `chunk_size`, it is one forward per group with the graph kept and one `backward` of the loss (same
    gradients, no second forward). Several processes always take the GradCache path: they may hold different numbers
    of texts, and data-parallel forwards with a graph synchronise, so their forward counts must not depend on that.

    The reference is one full-batch forward per group (queries, positives, negatives). The MoE balance loss is a mean
    over the sequences of a forward pass and is attached inside the model (`ChromaMoeAddAuxiliaryLoss`), so during the
    re-run `aux_loss_weight` is set to the chunk's share of its group (see `_chunk_shares`): the chunks' router
    gradients then add up to the full-batch pass's. `backward` back-propagates each chunk's surrogate `(embeddings · cached_grad).sum()`
    (e.g. `accelerator.backward`); `no_sync` (e.g. `lambda: accelerator.no_sync(model)`) wraps every chunk but the
    last, so data-parallel gradients are all-reduced once per step.

    `distill_fn` (e.g. `train.distill.ChromaMoeDistillationLoss`), called as `distill_fn(queries, positives, negatives,
    batch.teacher, loss_fn.log_temperature)` on the same full-batch cached embeddings as `loss_fn`, returns weighted
    loss terms that are added to the InfoNCE loss, so their gradients reach the model through the cached-embedding
    path of step 3. Raises ValueError when `distill_fn` is given and `batch.teacher` is None.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if distill_fn is not None and batch.teacher is None:
        raise ValueError("distill_fn is given but batch.teacher is None: attach the teacher's embeddings to the batch")
    backward = backward or torch.Tensor.backward
    no_sync = no_sync or nullcontext
    backbone = _backbone(model)
    groups = dict(batch.groups())
    share_of = _chunk_shares(groups)
    texts = sum(len(f["input_ids"]) for f in groups.values())
    if _world()[1] == 1 and texts <= chunk_size:
        return _single_pass_step(model, loss_fn, batch, groups, share_of, texts, backward, distill_fn)

    # 1. Embed every chunk without a graph, remembering the RNG state it started from.
    jobs: list[tuple[str, Features, RandContext, float]] = []
    embeddings: dict[str, list[torch.Tensor]] = {}
    counts: list[torch.Tensor] | None = None
    aux_loss = torch.zeros(())
    with torch.no_grad():
        for name, features in groups.items():
            for chunk in _chunks(features, chunk_size):
                share = share_of[name] * chunk["input_ids"].shape[0]
                rng = RandContext(*chunk.values())
                output = _embed(model, chunk)
                embeddings.setdefault(name, []).append(output.sentence_embedding.float())
                aux_loss = aux_loss + share * output.aux_loss.float().cpu()
                chunk_counts = [c.cpu() for c in output.expert_counts]
                counts = chunk_counts if counts is None else [a + b for a, b in zip(counts, chunk_counts)]
                jobs.append((name, chunk, rng, share))

    # 2. Full-batch loss; gradients w.r.t. the embeddings (leaves) and the temperature.
    leaves = {name: torch.cat(parts).requires_grad_() for name, parts in embeddings.items()}
    loss, terms = _full_batch_loss(loss_fn, batch, leaves, distill_fn)
    loss.backward()
    _average_temperature_gradient(loss_fn)
    cached = {name: leaf.grad.split([len(e) for e in embeddings[name]]) for name, leaf in leaves.items()}
    position = {name: 0 for name in cached}

    # 3. Re-run each chunk with its RNG state and back-propagate its cached embedding gradient.
    try:
        for index, (name, chunk, rng, share) in enumerate(jobs):
            grad = cached[name][position[name]]
            position[name] += 1
            backbone.aux_loss_weight = share
            with nullcontext() if index == len(jobs) - 1 else no_sync(), rng:
                embedding = _embed(model, chunk).sentence_embedding
                backward((embedding.float() * grad).sum())
    finally:
        backbone.aux_loss_weight = 1.0
    return StepOutput(loss.detach(), aux_loss, tuple(counts or ()), texts, {name: t.detach() for name, t in terms.items()})


def _full_batch_loss(
    loss_fn: InfoNCELoss,
    batch: ContrastiveBatch,
    embeddings: dict[str, torch.Tensor],
    distill_fn: Callable[..., dict[str, torch.Tensor]] | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """InfoNCE plus the weighted distillation terms on the whole step's embeddings (each `(rows, D)`)."""
    negative_ids = batch.negative_ids if "negatives" in embeddings else None
    queries, positives, negatives = embeddings["queries"], embeddings["positives"], embeddings.get("negatives")
    loss = loss_fn(queries, positives, negatives, batch.pair_ids, negative_ids)
    terms: dict[str, torch.Tensor] = {}
    if distill_fn is not None:
        terms = distill_fn(queries, positives, negatives, batch.teacher, loss_fn.log_temperature)
        loss = loss + sum(terms.values())
    return loss, terms


def _average_temperature_gradient(loss_fn: InfoNCELoss) -> None:
    """The temperature lives outside the data-parallel wrapper: average its gradient over processes here."""
    _, world = _world()
    if world > 1 and loss_fn.log_temperature.grad is not None:
        dist.all_reduce(loss_fn.log_temperature.grad)
        loss_fn.log_temperature.grad /= world


def _single_pass_step(
    model: nn.Module,
    loss_fn: InfoNCELoss,
    batch: ContrastiveBatch,
    groups: dict[str, Features],
    share_of: dict[str, float],
    texts: int,
    backward: Callable[[torch.Tensor], None],
    distill_fn: Callable[..., dict[str, torch.Tensor]] | None,
) -> StepOutput:
    """`grad_cache_step` on one process when the step's texts fit in one chunk: one forward per group with its graph
    kept and one backward of the loss, i.e. the full-batch reference itself (GradCache's no-graph pass would only
    repeat the forward)."""
    backbone = _backbone(model)
    outputs = {}
    try:
        for name, features in groups.items():
            backbone.aux_loss_weight = share_of[name] * features["input_ids"].shape[0]
            outputs[name] = _embed(model, features)
        embeddings = {name: output.sentence_embedding.float() for name, output in outputs.items()}
        loss, terms = _full_batch_loss(loss_fn, batch, embeddings, distill_fn)
        backward(loss)
    finally:
        backbone.aux_loss_weight = 1.0
    _average_temperature_gradient(loss_fn)
    aux_loss = sum(output.aux_loss.float().cpu() for output in outputs.values())  # each weighted by its group's share
    counts = [sum(parts) for parts in zip(*([c.cpu() for c in o.expert_counts] for o in outputs.values()))]
    return StepOutput(loss.detach(), aux_loss, tuple(counts), texts, {name: t.detach() for name, t in terms.items()})

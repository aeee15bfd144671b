"""Serving robustness (issue 13): the whitespace rule of every text the model reads, in training and inference."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from sentence_transformers import SentenceTransformer
from test_sentence_transformers import CORPUS  # tests/ is on sys.path under pytest

from configuration_chroma_moe import ChromaMoeConfig
from modeling_chroma_moe import ChromaMoeForEmbedding
from sentence_chroma_moe import build_sentence_transformer, instruction_prompt, strip_text
from tokenization.train import train_tokenizer
from train.data import INSTRUCTIONS, format_query

WHITESPACE_VARIANTS = ["\nhdmi cable", "  hdmi cable  ", "hdmi cable", "\t hdmi cable\n\n", "\u3000hdmi cable\u00a0"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS * 4, vocab_size=400, show_progress=False)


@pytest.fixture(scope="module")
def st_model(tokenizer) -> SentenceTransformer:
    torch.manual_seed(0)
    embedder = ChromaMoeForEmbedding(ChromaMoeConfig.from_preset("chroma-moe-tiny")).eval()
    return build_sentence_transformer(embedder, tokenizer)


def pooled_ids(features: dict[str, torch.Tensor], row: int) -> list[int]:
    return features["input_ids"][row][features["pooling_mask"][row].bool()].tolist()


@pytest.mark.parametrize("kind", ["query", "document"])
def test_leading_and_trailing_whitespace_do_not_change_the_embedding(st_model, kind):
    encode = st_model.encode_query if kind == "query" else st_model.encode_document
    batched = encode(WHITESPACE_VARIANTS, convert_to_tensor=True)  # (5, D)
    for row in range(len(WHITESPACE_VARIANTS)):
        torch.testing.assert_close(batched[row], batched[2], atol=1e-6, rtol=0)
        alone = encode([WHITESPACE_VARIANTS[row]], convert_to_tensor=True)[0]  # its own batch, no padding
        torch.testing.assert_close(alone, batched[2], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["query", "document"])
def test_pooled_tokens_are_the_texts_own_tokens(st_model, tokenizer, kind):
    prompt = st_model.prompts[kind]
    features = st_model.preprocess(WHITESPACE_VARIANTS, prompt=prompt)
    own = tokenizer("hdmi cable", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert tokenizer.convert_ids_to_tokens(own) == ["Ġh", "d", "m", "i", "Ġc", "able", "</s>"]
    if kind == "document":  # a text without instruction pools <s> too
        own = [tokenizer.bos_token_id, *own]
    for row in range(len(WHITESPACE_VARIANTS)):
        assert pooled_ids(features, row) == own


def test_training_queries_follow_the_same_rule(st_model):
    """The phase-2 collator formats queries with `format_query` and tokenises them with the same `preprocess`: the
    features equal inference's `encode_query` features with the task's prompt, whatever whitespace the query has."""
    from train.phase2 import PairCollator

    collator = PairCollator(st_model[0], max_query_length=128, max_document_length=128, max_negatives=1)
    task = "product_search"
    training = collator.queries(WHITESPACE_VARIANTS, [task] * len(WHITESPACE_VARIANTS))
    inference = st_model.preprocess(["hdmi cable"] * len(WHITESPACE_VARIANTS),
                                    prompt=instruction_prompt(INSTRUCTIONS[task]))  # fmt: skip
    for key in ("input_ids", "attention_mask", "pooling_mask"):
        assert training[key].tolist() == inference[key].tolist(), key
    text, prefix_len = format_query("\n  hdmi cable \n", task)
    assert text == f"Instruction: {INSTRUCTIONS[task]} Query: hdmi cable" and text[prefix_len:] == " hdmi cable"
    documents = collator.documents(WHITESPACE_VARIANTS)
    assert all(pooled_ids(documents, row) == pooled_ids(documents, 2) for row in range(len(WHITESPACE_VARIANTS)))


def test_strip_text_rule():
    assert [strip_text(text) for text in WHITESPACE_VARIANTS] == ["hdmi cable"] * len(WHITESPACE_VARIANTS)
    assert strip_text(" a  b ") == "a  b"  # inner whitespace is the text's own
    assert strip_text(" \n ") == ""


# --------------------------------------------------------------------------------------------------------------------
# Validation lives in setters, not only in constructors: what is accepted saves a folder that loads.
# --------------------------------------------------------------------------------------------------------------------


def test_max_seq_length_out_of_range_is_refused_when_set(st_model, tmp_path):
    from sentence_chroma_moe import ChromaMoeSentenceEncoder, save_sentence_transformer

    message = "max_seq_length=1024 must be in 1..max_position_embeddings=512"
    for bad, shown in ((1024, "1024"), (0, "0"), (-1, "-1"), (128.0, "128.0"), ("128", "'128'"), (True, "True")):
        with pytest.raises(ValueError) as error:
            st_model.max_seq_length = bad
        assert str(error.value) == message.replace("1024", shown)
        assert st_model.max_seq_length == 512  # unchanged
    with pytest.raises(ValueError) as error:
        ChromaMoeSentenceEncoder(st_model[0].model, st_model.tokenizer, max_seq_length=1024)
    assert str(error.value) == message
    st_model.max_seq_length = 512  # the limit itself is fine and saves a folder that loads
    try:
        st_model.max_seq_length = 300
        folder = tmp_path / "st"
        save_sentence_transformer(st_model, folder)
        loaded = SentenceTransformer(str(folder), trust_remote_code=True, local_files_only=True)
        assert loaded.max_seq_length == 300
        # a hand-edited sentence_bert_config.json is refused on load with the same rule
        (folder / "sentence_bert_config.json").write_text('{"max_seq_length": 1024}')
        with pytest.raises(ValueError) as error:
            SentenceTransformer(str(folder), trust_remote_code=True, local_files_only=True)
        assert str(error.value) == message
        # the positions shrunk after max_seq_length was set: refused before the model is written
        st_model[0].model.config.max_position_embeddings = 256
        with pytest.raises(ValueError) as error:
            st_model.save(str(tmp_path / "shrunk"))
        assert str(error.value) == "max_seq_length=300 must be in 1..max_position_embeddings=256"
        assert not (tmp_path / "shrunk" / "config.json").exists()
    finally:
        st_model[0].model.config.max_position_embeddings = 512
        st_model.max_seq_length = 512


def test_tokenizer_is_checked_when_set(st_model):
    tokenizer = st_model.tokenizer
    big = train_tokenizer(CORPUS * 4, vocab_size=600, show_progress=False)
    with pytest.raises(ValueError) as error:
        st_model.tokenizer = big
    assert str(error.value) == f"tokenizer has {len(big)} tokens but the model's vocab_size is 512"
    assert st_model.tokenizer is tokenizer
    with pytest.raises(ValueError) as error:
        st_model.tokenizer = type("SlowTokenizer", (), {"is_fast": False})()
    assert str(error.value) == (
        "tokenizer SlowTokenizer is not a fast tokenizer: character offsets are needed to keep the instruction out of "
        "pooling"
    )
    assert st_model.tokenizer is tokenizer


# --------------------------------------------------------------------------------------------------------------------
# ChromaMoeConfig: every field gets a ValueError naming it, at construction, at save and at model construction.
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kv_lora_rank": None}, "ChromaMoeConfig.kv_lora_rank=None: must be a positive integer"),
        ({"qk_rope_head_dim": 7}, "ChromaMoeConfig.qk_rope_head_dim=7: must be even (RoPE rotates pairs of channels)"),
        ({"qk_rope_head_dim": None}, "ChromaMoeConfig.qk_rope_head_dim=None: must be a positive integer"),
        ({"hidden_size": 64.0}, "ChromaMoeConfig.hidden_size=64.0: must be a positive integer"),
        ({"num_attention_heads": True}, "ChromaMoeConfig.num_attention_heads=True: must be a positive integer"),
        ({"num_experts_per_tok": None}, "ChromaMoeConfig.num_experts_per_tok=None: must be a positive integer"),
        ({"n_routed_experts": None}, "ChromaMoeConfig.n_routed_experts=None: must be an integer >= 0"),
        ({"q_lora_rank": 0}, "ChromaMoeConfig.q_lora_rank=0: must be None (full-rank queries) or a positive integer"),
        ({"rope_theta": -1.0}, "ChromaMoeConfig.rope_theta=-1.0: must be a positive number"),
        ({"rms_norm_eps": None}, "ChromaMoeConfig.rms_norm_eps=None: must be a positive number"),
        ({"router_aux_loss_coef": "0.01"}, "ChromaMoeConfig.router_aux_loss_coef='0.01': must be a number >= 0"),
        ({"hidden_dropout": 1.0}, "ChromaMoeConfig.hidden_dropout=1.0: must be a number in [0, 1)"),
        ({"normalize_embeddings": "yes"}, "ChromaMoeConfig.normalize_embeddings='yes': must be true or false"),
        ({"hidden_act": "swish2"},
         "ChromaMoeConfig.hidden_act='swish2': must be an activation name of transformers.activations.ACT2FN, "
         "e.g. 'silu'"),
        ({"rope_scaling": "yarn"}, "ChromaMoeConfig.rope_scaling='yarn': must be None or a dict"),
        ({"attention_type": "gqa", "head_dim": 7},
         "ChromaMoeConfig.head_dim=7: must be a positive even integer (None means hidden_size // num_attention_heads)"),
        ({"attention_type": "gqa", "num_key_value_heads": 3},
         "ChromaMoeConfig.num_key_value_heads=3: must be > 0 and divide num_attention_heads=4"),
    ],
)
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ValueError) as error:
        ChromaMoeConfig.from_preset("chroma-moe-tiny", **overrides)
    assert str(error.value) == message


def test_config_field_set_after_construction_is_refused_before_save_and_build(tmp_path):
    config = ChromaMoeConfig.from_preset("chroma-moe-tiny")
    config.kv_lora_rank = None
    message = "ChromaMoeConfig.kv_lora_rank=None: must be a positive integer"
    with pytest.raises(ValueError) as error:
        config.save_pretrained(tmp_path)
    assert str(error.value) == message
    assert not (tmp_path / "config.json").exists()
    with pytest.raises(ValueError) as error:
        ChromaMoeForEmbedding(config)
    assert str(error.value) == message


# --------------------------------------------------------------------------------------------------------------------
# One jsonl reader: blank lines are skipped by training and evaluation alike.
# --------------------------------------------------------------------------------------------------------------------


def test_blank_lines_are_skipped_by_every_jsonl_reader(tmp_path):
    import train.data
    from evaluation import tasks
    from evaluation.tasks import iter_jsonl, load_beir

    assert train.data.iter_jsonl is tasks.iter_jsonl  # one function
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text(
        '{"_id": "d1", "title": "Cable", "text": "hdmi 2m"}\n\n   \n{"_id": "d2", "text": "usb charger"}\n\n',
        encoding="utf-8",
    )
    (folder / "queries.jsonl").write_text('{"_id": "q1", "text": "hdmi cable"}\n \t\n', encoding="utf-8")
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n", encoding="utf-8")
    beir = load_beir(folder)
    assert (beir.doc_ids, beir.doc_texts, beir.query_texts) == (["d1", "d2"], ["Cable hdmi 2m", "usb charger"],
                                                                ["hdmi cable"])  # fmt: skip
    assert [line for line, _ in iter_jsonl(folder / "corpus.jsonl")] == [1, 4]  # file line numbers
    texts = [row["text"] for row in train.data.load_text_dataset(str(folder / "corpus.jsonl"))]
    assert texts == ["hdmi 2m", "usb charger"]
    (folder / "corpus.jsonl").write_text('{"_id": "d1", "text": "a"}\n\n{"_id": "d2"\n', encoding="utf-8")
    with pytest.raises(ValueError) as error:
        load_beir(folder)
    assert str(error.value).startswith(f"{folder / 'corpus.jsonl'}:3: invalid JSON (")
    (folder / "corpus.jsonl").write_text('{"_id": "d1", "text": "a"}\n\n{"_id": "", "text": "b"}\n', encoding="utf-8")
    with pytest.raises(ValueError) as error:
        load_beir(folder)
    assert str(error.value) == f"{folder / 'corpus.jsonl'}:3: field '_id' is empty"


# --------------------------------------------------------------------------------------------------------------------
# Export: the serving length is chosen deliberately, printed and stated in the model card beside the training lengths.
# --------------------------------------------------------------------------------------------------------------------

LONG_DOCUMENT = " ".join(CORPUS[:8])  # 48 to 512 tokens with the tiny tokenizer


@pytest.fixture(scope="module")
def phase2_run(st_model, tmp_path_factory):
    """A phase-2 output folder as `train/phase2.py` leaves it: `final/` saved at the training length 48 and a checkpoint
    whose trainer state holds the run's config."""
    from sentence_chroma_moe import save_sentence_transformer

    run = tmp_path_factory.mktemp("phase2_run")
    st_model.max_seq_length = 48
    try:
        save_sentence_transformer(st_model, run / "final")
    finally:
        st_model.max_seq_length = 512
    checkpoint = run / "checkpoints" / "checkpoint-00000006"
    checkpoint.mkdir(parents=True)
    state = {"step": 6, "config": {"max_query_length": 32, "max_document_length": 48, "teacher": "all-MiniLM-L6-v2",
                                   "teacher_max_seq_length": 48}}  # fmt: skip
    (checkpoint / "trainer_state.json").write_text(json.dumps(state), encoding="utf-8")
    return run


def test_export_serves_at_the_model_length_and_says_so(phase2_run, st_model, tmp_path, capsys):
    import train.export as export_module

    tokens = len(st_model.tokenizer(LONG_DOCUMENT)["input_ids"])
    assert 48 < tokens < 512
    output = tmp_path / "hub"
    export_module.export(phase2_run / "final", output, datasets=[])
    assert capsys.readouterr().out == (
        "export: serving max_seq_length=512 tokens (min(max_position_embeddings=512, 512)); trained at: queries 32 "
        "tokens, documents 48 tokens (the phase-2 run's config)\n"
    )
    card = (output / "README.md").read_text(encoding="utf-8")
    assert "| Max sequence length | 512 tokens when serving (longer texts are truncated; positions up to 512) |" in card
    assert "| Training sequence length | queries 32 tokens, documents 48 tokens (the phase-2 run's config) |" in card
    assert ("| Distilled from | all-MiniLM-L6-v2 (reading up to 48 of its tokens; similarity matching and KL score "
            "distillation beside InfoNCE) |") in card  # fmt: skip
    loaded = SentenceTransformer(str(output), trust_remote_code=True, local_files_only=True)
    assert loaded.max_seq_length == 512
    served = loaded.encode_document([LONG_DOCUMENT], convert_to_tensor=True)
    torch.testing.assert_close(served, st_model.encode_document([LONG_DOCUMENT], convert_to_tensor=True),
                               atol=1e-6, rtol=0)  # fmt: skip
    trained = SentenceTransformer(str(phase2_run / "final"), trust_remote_code=True, local_files_only=True)
    assert (served - trained.encode_document([LONG_DOCUMENT], convert_to_tensor=True)).abs().max() > 1e-3  # not cut


def test_export_max_seq_length_option_and_fallback_lengths(phase2_run, tmp_path, capsys):
    import train.export as export_module

    export_module.main(["--model", str(phase2_run / "final"), "--output", str(tmp_path / "short"),
                        "--max-seq-length", "100"])  # fmt: skip
    assert capsys.readouterr().out.startswith("export: serving max_seq_length=100 tokens (--max-seq-length); ")
    assert json.loads((tmp_path / "short" / "sentence_bert_config.json").read_text()) == {"max_seq_length": 100}
    with pytest.raises(ValueError) as error:
        export_module.export(phase2_run / "final", tmp_path / "long", max_seq_length=1024)
    assert str(error.value) == "max_seq_length=1024 must be in 1..max_position_embeddings=512"
    assert not (tmp_path / "long").exists()
    # phase 2's run_config.json beside final/ is read first; a folder moved away from its run records no lengths
    (phase2_run / "run_config.json").write_text(json.dumps({"max_query_length": 40, "max_document_length": 96}))
    try:
        assert export_module.training_lengths(phase2_run / "final") == {"max_query_length": 40, "max_document_length": 96}
    finally:
        (phase2_run / "run_config.json").unlink()
    lone = tmp_path / "lone"
    shutil.copytree(phase2_run / "final", lone)
    assert export_module.training_lengths(lone) == {}
    assert export_module.describe_training_lengths({}) == "not recorded in the trained folder"
    assert export_module.training_run(lone) == {} and export_module.describe_teacher({}) is None
    assert export_module.describe_teacher({"teacher": "BAAI/bge-m3", "teacher_max_seq_length": None}) == (
        "BAAI/bge-m3 (reading its own maximum length; similarity matching and KL score distillation beside InfoNCE)")
    card = (tmp_path / "short" / "README.md").read_text(encoding="utf-8")
    assert "| Distilled from | all-MiniLM-L6-v2 (reading up to 48 of its tokens;" in card

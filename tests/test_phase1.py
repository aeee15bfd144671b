"""Tests for phase-1 pretraining (train/phase1.py, train/common.py, train/upcycle.py) on the tiny preset, CPU only.

A synthetic corpus of pseudo-words stands in for real text: it trains a 512-token BPE in a second and is small enough
to be repeated (each pass is a new data epoch) so the loss visibly falls within a few steps.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from configuration_chroma_moe import ChromaMoeConfig
from modeling_chroma_moe import ChromaMoeForMaskedLM
from tokenization.train import train_tokenizer
from train import mlm_data, phase1
from train.common import (
    ConfigError,
    NonFiniteLossError,
    WarmupCosine,
    gradient_accumulation_steps,
    latest_checkpoint,
    load_config,
    parameter_groups,
)
from train.data import TextSourceSpec, build_text_stream
from train.upcycle import ROUTER_INIT_STD, check_upcyclable, dense_config_for, upcycle_model

REPO = Path(__file__).resolve().parents[1]
SYLLABLES = ["ka", "lo", "mi", "ner", "sut", "pa", "ro", "vin", "tes", "da", "gul", "bre", "fo", "qui", "zan", "el", "or"]  # fmt: skip


def _sentences(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = sorted({"".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(400)})
    return [" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))) + "." for _ in range(count)]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    tokenizer = train_tokenizer(_sentences(300, seed=0), vocab_size=512, show_progress=False)
    assert len(tokenizer) == 512
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """24 distinct texts (~300 tokens): every few steps start a new pass over them."""
    path = tmp_path_factory.mktemp("corpus") / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": t, "source": "synthetic"}) + "\n" for t in _sentences(24, seed=1)))
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from intra-op threads, and on a busy 2-core machine OpenMP threads waiting on
    each other made these runs 8× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each ``run`` builds its own Accelerator; Accelerate keeps process-wide singletons that must be cleared."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _config(tokenizer_dir: Path, corpus: Path, output_dir: Path, **overrides) -> dict:
    config = {
        "tokenizer": str(tokenizer_dir),
        "data": [{"spec": str(corpus)}],
        "model": {"preset": "chroma-moe-tiny", "norm_topk_prob": True},
        "output_dir": str(output_dir),
        "min_chars": 1,
        "seq_len": 32,
        "per_device_batch_size": 4,
        "global_batch_tokens": 256,
        "max_steps": 8,
        "warmup_steps": 1,
        "learning_rate": 3e-3,
        "min_learning_rate": 3e-4,
        "log_every": 4,
        "checkpoint_every": 100,
    }
    config.update(overrides)
    return config


# ---- arithmetic, optimizer groups, schedule ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "batch", "seq_len", "processes", "expected"),
    [(256, 4, 32, 1, 2), (256, 4, 32, 2, 1), (2_097_152, 16, 1024, 64, 2), (2_097_152, 16, 1024, 1, 128)],
)
def test_gradient_accumulation_gives_the_token_budget(tokens, batch, seq_len, processes, expected):
    steps = gradient_accumulation_steps(tokens, batch, seq_len, processes)
    assert steps == expected
    assert steps * batch * seq_len * processes == tokens


def test_gradient_accumulation_names_the_values_when_not_divisible():
    with pytest.raises(
        ConfigError, match=r"global_batch_tokens=1000 .*per_device_batch_size=4 .*seq_len=32 .*num_processes=2"
    ):
        gradient_accumulation_steps(1000, 4, 32, 2)


def test_no_decay_groups_and_schedule():
    model = ChromaMoeForMaskedLM(ChromaMoeConfig.from_preset("chroma-moe-tiny"))
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert "model.embed_tokens.weight" in no_decay_names and "decoder.bias" in no_decay_names
    assert any(n.endswith("input_layernorm.weight") for n in no_decay_names)
    assert "model.layers.1.mlp.experts.gate_up_proj" in decay_names and "model.layers.1.mlp.gate.weight" in decay_names
    assert len(decay_names) + len(no_decay_names) == len(list(model.parameters()))  # tied decoder counted once
    schedule = WarmupCosine(warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert schedule(0) == pytest.approx(0.1) and schedule(9) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.55) and schedule(110) == pytest.approx(0.1)


# ---- data: packing and masking -------------------------------------------------------------------------------------


def test_packing_and_masking(tokenizer_dir, corpus):
    tokenizer = phase1.AutoTokenizer.from_pretrained(tokenizer_dir)
    sources = [TextSourceSpec(str(corpus))]
    blocks = mlm_data.PackedBlocks(lambda epoch: build_text_stream(sources, seed=epoch, min_chars=1), tokenizer, 32)
    first, packed = blocks.take(6)
    assert first == 0 and packed.shape == (6, 32)
    assert (packed[:, 0] == tokenizer.bos_token_id).all() and not (packed == tokenizer.pad_token_id).any()
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    stream = [
        t for text in texts for t in tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ]
    assert packed[:, 1:].reshape(-1).tolist() == stream[: 6 * 31]  # texts in order, each closed by </s>, no gaps

    position, buffer = blocks.state_dict()
    _, expected = blocks.take(20)  # crosses into the next data epoch
    restored = mlm_data.PackedBlocks(lambda epoch: build_text_stream(sources, seed=epoch, min_chars=1), tokenizer, 32)
    restored.load_state_dict(json.loads(json.dumps(position)), buffer)
    index, again = restored.take(20)
    assert index == 6 and (again == expected).all() and restored.epoch == blocks.epoch > 0

    special = np.array(tokenizer.all_special_ids)
    masker = mlm_data.MlmMasker(tokenizer, 0.3, span_masking=False, seed=0)
    many = np.concatenate([packed, expected])
    inputs, labels = masker(many, 0)
    chosen = labels != -100
    assert not np.isin(many[chosen], special).any()  # special tokens are never predicted
    maskable = ~np.isin(many, special)
    assert chosen.sum() / maskable.sum() == pytest.approx(0.3, abs=0.03)
    assert (inputs[~chosen] == many[~chosen]).all()
    masked_share = (inputs[chosen] == tokenizer.mask_token_id).mean()
    kept_share = (inputs[chosen] == many[chosen]).mean()
    assert masked_share == pytest.approx(0.8, abs=0.06) and kept_share == pytest.approx(0.1 + 0.1 / 507, abs=0.05)
    again_inputs, again_labels = masker(many[3:5], 3)  # a block's mask depends on its index only
    assert (again_inputs == inputs[3:5]).all() and (again_labels == labels[3:5]).all()

    spans = mlm_data.MlmMasker(tokenizer, 0.3, span_masking=True, seed=0)
    _, span_labels = spans(many, 0)
    span_chosen = span_labels != -100
    assert not np.isin(many[span_chosen], special).any()
    runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], span_chosen.reshape(-1).astype(int), [0]]))))[::2]
    assert runs.mean() > 2.0  # contiguous spans, not single tokens (token masking at 30% gives ≈ 1.4)


# ---- training runs -------------------------------------------------------------------------------------------------


def test_loss_falls_and_outputs_are_written(tokenizer_dir, corpus, tmp_path):
    result = phase1.run(_config(tokenizer_dir, corpus, tmp_path / "run", max_steps=16, checkpoint_every=8))
    losses = result.losses
    assert len(losses) == 16 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    assert result.gradient_accumulation_steps == 2 and result.tokens_per_step == 256
    checkpoint = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert checkpoint.name == "checkpoint-00000016"
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["checkpoint-00000016"]  # older one replaced
    for name in ("model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "trainer_state.json",
                 "data_buffer.npy", "routing_heatmap.png"):  # fmt: skip
        assert (checkpoint / name).is_file(), name
    assert (checkpoint / "routing_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert list((tmp_path / "run" / "logs").rglob("events.out.tfevents.*"))
    assert (result.final_dir / "config.json").is_file() and (result.final_dir / "tokenizer.json").is_file()


def test_upcycling_keeps_the_output_whatever_the_routing():
    moe_config = ChromaMoeConfig.from_preset("chroma-moe-tiny", norm_topk_prob=True)
    dense_config = dense_config_for(moe_config)
    assert dense_config.n_routed_experts == 0 and dense_config.intermediate_size == 32 + 32
    torch.manual_seed(0)
    dense = ChromaMoeForMaskedLM(dense_config).eval()
    ids = torch.randint(5, 512, (3, 24))
    with torch.no_grad():
        expected = dense(input_ids=ids).logits
        for router_std in (ROUTER_INIT_STD, 1.0):  # near-uniform and strongly peaked routing
            moe = upcycle_model(dense.state_dict(), dense_config, moe_config, router_std=router_std).eval()
            output = moe.model(input_ids=ids)
            assert all(int((c > 0).sum()) > 2 for c in output.expert_counts)  # tokens really spread over experts
            torch.testing.assert_close(moe(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert moe.model.layers[0].mlp.gate_proj.weight.shape[0] == moe_config.intermediate_size  # dense layer grown
    with pytest.raises(ConfigError, match="norm_topk_prob"):
        check_upcyclable(dense_config, ChromaMoeConfig.from_preset("chroma-moe-tiny"))


def test_upcycling_mid_run_and_kill_and_resume_give_the_same_losses(tokenizer_dir, corpus, tmp_path, phase1_killer):
    """Dense for 4 steps, upcycled at step 4 (upcycle_at 0.5 of 8); dropout on, so the RNG restore matters too. The
    interrupted run is killed right after its checkpoints at steps 3 (dense) and 6 (MoE), then resumed each time."""
    model = {"preset": "chroma-moe-tiny", "norm_topk_prob": True, "hidden_dropout": 0.1}
    options = {"upcycle_at": 0.5, "checkpoint_every": 3, "model": model}
    straight = phase1.run(_config(tokenizer_dir, corpus, tmp_path / "straight", **options))
    upcycle = straight.upcycle
    assert upcycle["step"] == 4 and upcycle["optimizer_state_carried"]
    assert upcycle["max_abs_logit_diff"] < 1e-4
    assert abs(upcycle["loss_jump"]) < 0.5, straight.losses
    assert all(math.isfinite(x) for x in straight.losses)
    assert json.loads((straight.final_dir / "config.json").read_text())["n_routed_experts"] == 8

    Killed = phase1_killer.Killed
    phase1_killer.arm()
    interrupted = _config(tokenizer_dir, corpus, tmp_path / "interrupted", **options)
    with pytest.raises(Killed):
        phase1.run(interrupted)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    with pytest.raises(ConfigError, match="resume"):  # a fresh run refuses to overwrite a checkpointed one
        phase1.run(interrupted)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    with pytest.raises(Killed):
        phase1.run({**interrupted, "resume": "auto"})  # steps 4-6: upcycles after resuming a dense checkpoint
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    phase1_killer.disarm()
    resumed = phase1.run({**interrupted, "resume": "auto"})  # steps 7-8 from an upcycled checkpoint
    assert resumed.first_step == 6
    assert resumed.losses == straight.losses[6:]
    assert resumed.upcycle["loss_jump"] == upcycle["loss_jump"]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tokenizer_dir, corpus, tmp_path):
    config = _config(tokenizer_dir, corpus, tmp_path / "run", learning_rate=1e30, min_learning_rate=0.0,
                     warmup_steps=0, checkpoint_every=1, max_steps=4)  # fmt: skip
    # step 1's update (lr 1e30) blows the weights up: step 2's loss or gradient norm is NaN/inf
    with pytest.raises(NonFiniteLossError, match=r"step 2: non-finite (loss|grad_norm)=(nan|inf).*checkpoint-00000001"):
        phase1.run(config)
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "checkpoint-00000001"
    assert not (tmp_path / "run" / "final").exists()


# ---- errors --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["mlm_probability=1.5"], r"'mlm_probability'=1.5: must be in \(0, 1\)"),
        (["learning_rate=fast"], r"'learning_rate'='fast': expected float"),
        (["warmup_steps=8"], r"'warmup_steps'=8: must be in \[0, max_steps=8\)"),
        (["batch_size=4"], r"unknown config key\(s\) \['batch_size'\]"),
        (["model.preset=chroma-moe-huge"], r"'model.preset'='chroma-moe-huge'"),
        (["model.n_routed_expert=0"], r"unknown ChromaMoeConfig field\(s\) \['n_routed_expert'\]"),
        (["model.hidden_size=-1"], r"'model'.*hidden_size=-1"),
        (["upcycle_at=0.5", "model.norm_topk_prob=false"], r"'model.norm_topk_prob'"),
        (["data=[{path: a.jsonl}]"], r"'data\[0\]': unknown field\(s\) \['path'\]"),
        (["data=[{spec: a.jsonl, weight: 0}]"], r"'data\[0\].weight'=0"),
        (["seq_len=1024"], r"'seq_len'=1024: exceeds the model's max_position_embeddings=512"),
        (["mixed_precision=fp16"], r"'mixed_precision'='fp16'"),
        (["max_steps"], r"bad override 'max_steps'"),
    ],
)
def test_bad_config_values_name_the_key(tokenizer_dir, corpus, tmp_path, overrides, message):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(_config(tokenizer_dir, corpus, tmp_path / "run")))
    with pytest.raises(ConfigError, match=message):
        load_config(phase1.Phase1Config, path, overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"global_batch_tokens": 200}, r"global_batch_tokens=200 is not a multiple of .* = 128"),
        (
            {"model": {"preset": "chroma-moe-tiny", "vocab_size": 600}},
            r"'model.vocab_size'=600 differs from the tokenizer's size 512",
        ),
    ],
)
def test_run_time_config_errors(tokenizer_dir, corpus, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        phase1.run(_config(tokenizer_dir, corpus, tmp_path / "run", **overrides))


def test_data_file_with_a_missing_field_names_file_and_line(tokenizer_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "a fine first text"}) + "\n" + json.dumps({"body": "no text field"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: field 'text' is missing"):
        phase1.run(_config(tokenizer_dir, bad, tmp_path / "run"))
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        phase1.run(_config(tokenizer_dir, tmp_path / "nowhere.jsonl", tmp_path / "run2"))


# ---- the real entry point ------------------------------------------------------------------------------------------


def test_accelerate_launch_and_the_saved_model_loads_in_a_fresh_process(tokenizer_dir, corpus, tmp_path):
    """``accelerate launch train/phase1.py --config train/configs/phase1_tiny.yaml`` end to end, then the final folder
    loads with the Auto classes (remote code, offline) in a process that cannot import the repo's modules."""
    output = tmp_path / "launched"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1", "--cpu",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "train/phase1.py", "--config", "train/configs/phase1_tiny.yaml",
        f"tokenizer={tokenizer_dir}", f"data=[{{spec: {corpus}}}]", f"output_dir={output}", "min_chars=1",
        "max_steps=4", "checkpoint_every=2", "seq_len=32", "global_batch_tokens=256",
    ]  # fmt: skip
    done = subprocess.run(
        launch, cwd=REPO, env=env, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "phase 1: 100%" in done.stderr  # the progress bar ran to the end
    checkpoint = latest_checkpoint(output / "checkpoints")
    assert checkpoint.name == "checkpoint-00000004" and (checkpoint / "routing_heatmap.png").is_file()

    probe = """
import json, sys, torch
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer
folder, out = sys.argv[1], sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)  # config.json's auto_map is remote code
batch = tokenizer(["kalo mi nersut pa.", "vin tes <mask> gul."], return_tensors="pt", padding=True)
mlm = AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True).eval()
base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
with torch.no_grad():
    logits = mlm(**batch).logits
    hidden = base(**batch).last_hidden_state
with open(out, "w") as handle:
    json.dump({"classes": [type(mlm).__name__, type(base).__name__], "vocab": len(tokenizer),
               "input_ids": batch["input_ids"].tolist(), "attention_mask": batch["attention_mask"].tolist(),
               "logits": logits.tolist(), "hidden": hidden.tolist()}, handle)
"""
    seen_file = tmp_path / "seen.json"
    loaded = subprocess.run([sys.executable, "-c", probe, str(output / "final"), str(seen_file)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=False,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    seen = json.loads(seen_file.read_text())
    assert seen["classes"] == ["ChromaMoeForMaskedLM", "ChromaMoeModel"] and seen["vocab"] == 512

    # The same weights read straight from the last checkpoint's safetensors give the same outputs.
    config = ChromaMoeConfig.from_pretrained(output / "final")
    model = ChromaMoeForMaskedLM(config).eval()
    missing, unexpected = model.load_state_dict(load_file(checkpoint / "model.safetensors"), strict=False)
    assert missing == ["decoder.weight"] and not unexpected  # the tied decoder is stored once, as the embeddings
    ids, mask = torch.tensor(seen["input_ids"]), torch.tensor(seen["attention_mask"])
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, attention_mask=mask).logits, torch.tensor(seen["logits"]), atol=1e-4, rtol=1e-4
        )
        torch.testing.assert_close(model.model(input_ids=ids, attention_mask=mask).last_hidden_state,
                                   torch.tensor(seen["hidden"]), atol=1e-4, rtol=1e-4)  # fmt: skip


def test_upcycling_is_refused_on_every_process_of_a_sharding_engine():
    """FSDP and ZeRO-3 keep a shard of the weights per process: `shards_parameters` says so from the engine alone (the
    same answer on every process), so the refusal of `upcycle_at` is raised at start by all of them, never half-way."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    def accelerator(kind, stage=None):
        plugin = None if stage is None else SimpleNamespace(zero_stage=stage)
        return SimpleNamespace(distributed_type=kind, state=SimpleNamespace(deepspeed_plugin=plugin))

    assert phase1.shards_parameters(accelerator(DistributedType.FSDP))
    assert phase1.shards_parameters(accelerator(DistributedType.DEEPSPEED, 3))
    assert not phase1.shards_parameters(accelerator(DistributedType.DEEPSPEED, 2))
    assert not phase1.shards_parameters(accelerator(DistributedType.MULTI_CPU))
    assert not phase1.shards_parameters(accelerator(DistributedType.NO))

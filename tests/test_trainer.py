"""The shared training skeleton (train/trainer.py) as both phases use it: phase 2's dev evaluation gives the same
metrics and embeddings on 2 processes as on 1, through the DDP-prepared model and through an FSDP2-sharded one (whose forward is
collective: the old rank-0-only evaluation would hang there); phase 2's final folder holds exactly the trained weights
(it is written from the state every process gathers) and loads; the shared config base keeps each phase's defaults.

The file is also the worker: `python -m torch.distributed.run --nproc_per_node 2 tests/test_trainer.py WORKSPACE OUT`.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

# tests/ is on sys.path under pytest and when this file runs as the worker
from test_phase2 import one_thread, tiny_config, workspace  # noqa: F401 (fixtures)
from test_phase2_distributed import _free_port

REPO = Path(__file__).resolve().parents[1]
EVAL_BATCH = 7  # 18 dev queries: 3 batches, so one process runs a repeated forward; 40 documents: 6 batches


def _dev_setup(root: Path):
    """A seeded tiny embedding model, the collator and the dev set of `test_phase2`'s workspace under `root`."""
    from transformers import PreTrainedTokenizerFast

    from configuration_chroma_moe import ChromaMoeConfig
    from modeling_chroma_moe import ChromaMoeForEmbedding
    from sentence_chroma_moe import ChromaMoeSentenceEncoder
    from train.phase2 import PairCollator, load_dev_set

    paths = {"root": root, "pairs": root / "pairs.jsonl", "beir": root / "beir", "tokenizer": root / "tokenizer"}
    config = tiny_config(paths, root / "unused")
    torch.manual_seed(0)
    model = ChromaMoeForEmbedding(ChromaMoeConfig.from_preset("chroma-moe-tiny")).train()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(paths["tokenizer"])
    collator = PairCollator(ChromaMoeSentenceEncoder(model, tokenizer), config.max_query_length,
                            config.max_document_length, 1)  # fmt: skip
    return model, collator, load_dev_set(config)


def worker(root: str, out_path: str) -> None:
    """Each process: the 1-process reference first (no process group yet), then the same evaluation split over the 2
    processes through the DDP-prepared model and through an FSDP2-sharded copy; rank 0 writes what it saw."""
    from torch.distributed.fsdp import fully_shard

    from train.common import make_accelerator
    from train.phase2 import embed_texts, evaluate_retrieval

    torch.set_num_threads(1)
    model, collator, dev = _dev_setup(Path(root))
    documents = collator.documents(dev.doc_texts)
    reference = evaluate_retrieval(model, collator, dev, "finance_qa", EVAL_BATCH)
    reference_documents = embed_texts(model, documents, EVAL_BATCH)

    accelerator = make_accelerator(Path(out_path).parent / "accelerate", "no")
    prepared = accelerator.prepare(copy.deepcopy(model))
    sharded = fully_shard(copy.deepcopy(model))
    seen = {"world": accelerator.num_processes, "prepared": type(prepared).__name__, "reference": reference}
    for name, wrapped in (("ddp", prepared), ("fsdp", sharded)):
        seen[name] = evaluate_retrieval(wrapped, collator, dev, "finance_qa", EVAL_BATCH, accelerator)
        embedded = embed_texts(wrapped, documents, EVAL_BATCH, accelerator)
        seen[f"{name}_documents_equal"] = torch.equal(embedded, reference_documents)
        seen[f"{name}_still_training"] = wrapped.training
    seen["dev_sizes"] = [len(dev.query_ids), len(dev.doc_ids)]
    if accelerator.is_main_process:
        Path(out_path).write_text(json.dumps(seen))
    accelerator.wait_for_everyone()
    accelerator.end_training()


@pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with the gloo backend is unavailable"
)
def test_two_processes_evaluate_like_one_through_ddp_and_fsdp(workspace, tmp_path):
    out = tmp_path / "seen.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               str(Path(__file__).resolve()), str(workspace["root"]), str(out)]  # fmt: skip
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    seen = json.loads(out.read_text())
    assert seen["world"] == 2 and seen["prepared"] == "DistributedDataParallel"
    assert seen["dev_sizes"] == [18, 40]  # 3 query batches of 7 (uneven over 2 processes), 6 document batches
    assert 0.0 < seen["reference"]["ndcg@10"] <= 1.0
    for name in ("ddp", "fsdp"):
        assert seen[name] == seen["reference"], name
        assert seen[f"{name}_documents_equal"], name
        assert seen[f"{name}_still_training"], name  # evaluation puts the model back in training mode


def test_phase2_final_folder_holds_the_trained_weights_and_loads(workspace, tmp_path):
    """The final folder is written from `accelerator.get_state_dict` into a fresh model: its weights equal the last
    checkpoint's bit for bit, and it loads with SentenceTransformer."""
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    import train.phase2 as phase2
    from modeling_chroma_moe import ChromaMoeForEmbedding

    output = tmp_path / "run"
    phase2.train(tiny_config(workspace, output, "max_steps=2", "checkpoint_every=2", "dev_beir=null"))
    trained = load_file(output / "checkpoints" / "checkpoint-00000002" / "model.safetensors")
    final = load_file(output / "final" / "model.safetensors")
    assert final.keys() == trained.keys()
    for name, tensor in trained.items():
        assert torch.equal(final[name], tensor), name
    untrained = phase2.build_model(tiny_config(workspace, output))[0].state_dict()
    assert any(not torch.equal(untrained[name], tensor) for name, tensor in trained.items())
    st_model = SentenceTransformer(str(output / "final"), trust_remote_code=True)
    query = "How did revenue change at Acme?"
    from_checkpoint = ChromaMoeForEmbedding(st_model[0].model.config)
    from_checkpoint.load_state_dict(trained)
    features = phase2.PairCollator(st_model[0], 128, 64, 1).queries([query], ["finance_qa"])
    expected = phase2.embed_texts(from_checkpoint, features, batch_size=4)  # (1, D)
    assert torch.allclose(st_model.encode_query([query], convert_to_tensor=True).cpu(), expected, atol=1e-6)


def test_each_phase_keeps_its_defaults_on_the_shared_base():
    """The keys declared once in `ChromaMoeRunConfig` take each phase's own defaults; the range checks are shared."""
    from train.common import ConfigError, config_from_dict
    from train.phase1 import Phase1Config
    from train.phase2 import Phase2Config
    from train.trainer import ChromaMoeRunConfig

    phase1 = Phase1Config(tokenizer="t", data=[{"spec": "a.jsonl"}])
    phase2 = Phase2Config(output_dir="o", tokenizer="t", train_sources=[{"path": "p.jsonl", "task": "finance_qa"}])
    assert isinstance(phase1, ChromaMoeRunConfig) and isinstance(phase2, ChromaMoeRunConfig)
    shared = ("output_dir", "max_steps", "warmup_steps", "learning_rate", "min_learning_rate", "weight_decay",
              "adam_beta2", "log_every", "checkpoint_every")  # fmt: skip
    assert [getattr(phase1, key) for key in shared] == ["runs/phase1", 1000, 100, 3e-4, 3e-5, 0.1, 0.95, 10, 500]
    assert [getattr(phase2, key) for key in shared] == ["o", 100, 10, 1e-4, 1e-5, 0.01, 0.999, 1, 0]
    for config in (phase1, phase2):
        assert (config.seed, config.adam_beta1, config.adam_epsilon, config.max_grad_norm) == (0, 0.9, 1e-8, 1.0)
        with pytest.raises(ConfigError, match=r"config key 'warmup_steps'=5: must be in \[0, max_steps=5\)"):
            type(config)(**{**config.__dict__, "max_steps": 5, "warmup_steps": 5})
    with pytest.raises(ConfigError, match="required config key 'output_dir' is missing"):
        config_from_dict(Phase2Config, {"train_sources": phase2.train_sources, "tokenizer": "t"})


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])


def test_a_fresh_run_starts_a_new_train_log_and_a_torn_line_is_dropped(workspace, tmp_path, caplog):
    """`train_log.jsonl` of a fresh run into a folder with an old log holds only the new run's steps; a resume keeps
    the lines up to its checkpoint and drops a line cut by a crash, with a warning naming it."""
    import train.phase2 as phase2

    output = tmp_path / "run"
    output.mkdir()
    (output / "train_log.jsonl").write_text('{"step": 1, "train/loss": 99.0}\n{"step": 7}\n', encoding="utf-8")
    phase2.train(tiny_config(workspace, output, "max_steps=2", "checkpoint_every=1", "dev_beir=null"))
    lines = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2] and lines[0]["train/loss"] != 99.0
    with (output / "train_log.jsonl").open("a", encoding="utf-8") as handle:
        handle.write('{"step": 3, "train/lo')
    phase2.train(tiny_config(workspace, output, "max_steps=3", "checkpoint_every=1", "dev_beir=null", "resume=auto"))
    assert [json.loads(line)["step"] for line in (output / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert "train_log.jsonl:3: unreadable log line dropped" in caplog.text


def test_a_resume_with_nothing_left_to_train_is_refused_and_preset_null_clears_the_yaml_preset(workspace, tmp_path):
    """Resuming a step-2 checkpoint with max_steps=2 (or fewer) is a ConfigError naming the step, not a silent no-op that
    rewrites final/; `model.preset=null` on the command line lets a YAML with a preset start from `init_from`."""
    import train.phase2 as phase2
    from train.common import ConfigError

    output = tmp_path / "run"
    phase2.train(tiny_config(workspace, output, "max_steps=2", "checkpoint_every=2", "dev_beir=null"))
    for steps in ("2", "1"):
        with pytest.raises(ConfigError, match=rf"config key 'max_steps'={steps}: .*checkpoint-00000002 is at step 2: "
                                              r"nothing left to train; resume with max_steps > 2"):  # fmt: skip
            phase2.train(tiny_config(workspace, output, f"max_steps={steps}", "warmup_steps=0", "dev_beir=null",
                                     "resume=auto"))  # fmt: skip
    with pytest.raises(ConfigError, match="give exactly one"):
        tiny_config(workspace, tmp_path / "next", f"init_from={output / 'final'}")
    config = tiny_config(workspace, tmp_path / "next", f"init_from={output / 'final'}", "model.preset=null")
    assert config.init_from == str(output / "final") and "preset" not in config.model


def test_a_checkpoint_save_keeps_only_itself_and_clears_a_killed_runs_temporary_folder(tmp_path):
    from accelerate import Accelerator

    from train.common import read_trainer_state, save_checkpoint

    root = tmp_path / "checkpoints"
    leftover = root / ".tmp-checkpoint-00000003"  # what a kill -9 during a save leaves
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half-written")
    accelerator = Accelerator()
    save_checkpoint(accelerator, root, 2, {"step": 2})
    assert sorted(path.name for path in root.iterdir()) == ["checkpoint-00000002"]
    save_checkpoint(accelerator, root, 4, {"step": 4})
    assert sorted(path.name for path in root.iterdir()) == ["checkpoint-00000004"]
    assert read_trainer_state(root / "checkpoint-00000004") == {"step": 4}

"""DeepSpeed ZeRO-2 through Accelerate on CPU: phase 1 launched with train/accelerate/deepspeed_zero2.yaml trains on 2
processes joined over gloo, and a run stopped right after a checkpoint and resumed continues exactly like an
uninterrupted one (bit-for-bit equal losses and final weights: same process count, same reduction order).

The first DeepSpeed launch on a machine JIT-compiles DeepSpeed's shared-memory comm op (about a minute on 2 cores,
then cached under ~/.cache/torch_extensions); the timing in the test's budget assumes that cache.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train.common import latest_checkpoint

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "distributed" / "deepspeed_worker.py"
ZERO2_CONFIG = REPO / "train" / "accelerate" / "deepspeed_zero2.yaml"


def _launch(config: dict, tmp_path: Path, name: str, *flags: str) -> list[float] | None:
    """Phase 1 under ``accelerate launch`` with the ZeRO-2 config, 2 processes; the losses, unless it was stopped.
    ``CUDA_VISIBLE_DEVICES=""`` keeps the CPU/gloo path this test is about on a machine with a GPU too."""
    config_file, losses_file = tmp_path / f"{name}.json", tmp_path / f"{name}_losses.json"
    config_file.write_text(json.dumps(config))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ZERO2_CONFIG),
               "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "29620",
               str(WORKER), str(config_file), str(losses_file), *flags]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                            stdin=subprocess.DEVNULL, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads(losses_file.read_text()) if losses_file.is_file() else None


def test_deepspeed_zero2_phase1_runs_and_resumes_exactly(tmp_path, tiny_phase1_config):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not importable (it installs with pip install -e .[scale])")
    config = {
        **tiny_phase1_config,
        # dropout on: the resumed run must also get back every process's RNG state
        "model": {**tiny_phase1_config["model"], "hidden_dropout": 0.1},
        "global_batch_tokens": 512,  # 2 processes × 4 blocks × 32 tokens × 2 micro-batches: DeepSpeed accumulates
        "max_steps": 4,
        "warmup_steps": 1,
        "learning_rate": 3e-3,
        "min_learning_rate": 3e-4,
        "max_grad_norm": 0.5,  # not Accelerate's default 1.0, so the DeepSpeed config must have taken it from here
        "log_every": 2,
        "checkpoint_every": 2,
    }
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight = _launch({**config, "output_dir": str(straight_dir)}, tmp_path, "straight")
    assert len(straight) == 4 and all(math.isfinite(x) for x in straight), straight

    # It really ran as DeepSpeed ZeRO-2 over 2 processes, with the run config's batch, accumulation and clipping.
    checkpoint = latest_checkpoint(straight_dir / "checkpoints")
    engine_files = checkpoint / "pytorch_model"
    assert {p.name for p in engine_files.glob("zero_pp_rank_*_optim_states.pt")} == {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    }
    engine_state = torch.load(engine_files / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    ds_config = engine_state["ds_config"]
    assert ds_config["zero_optimization"]["stage"] == 2 and engine_state["dp_world_size"] == 2
    assert ds_config["train_micro_batch_size_per_gpu"] == 4 and ds_config["gradient_accumulation_steps"] == 2
    assert ds_config["gradient_clipping"] == 0.5
    assert engine_state["global_steps"] == 4  # one optimizer step per 2 micro-batches

    # Stopped right after the step-2 checkpoint, as a preempted job would be, then continued with resume=auto.
    assert _launch({**config, "output_dir": str(resumed_dir)}, tmp_path, "stopped", "--stop-after-checkpoint") is None
    assert latest_checkpoint(resumed_dir / "checkpoints").name == "checkpoint-00000002"
    assert not (resumed_dir / "final").exists()
    resumed = _launch({**config, "output_dir": str(resumed_dir), "resume": "auto"}, tmp_path, "resumed")
    assert resumed == straight[2:]  # exact: the same computation, reduced in the same order

    straight_weights = load_file(straight_dir / "final" / "model.safetensors")
    resumed_weights = load_file(resumed_dir / "final" / "model.safetensors")
    assert resumed_weights.keys() == straight_weights.keys()
    for name, tensor in straight_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, atol=0, rtol=0, msg=name)

"""Scale-out through Accelerate on CPU: 2 DDP processes (gloo) train phase 1 exactly like one process with the same
global batch in tokens (each process takes half the micro-batches, gradients are averaged)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file


REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "distributed" / "phase1_worker.py"


def _launch(config: dict, tmp_path: Path, name: str, processes: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    config = {**config, "output_dir": str(tmp_path / name)}
    config_file, losses_file = tmp_path / f"{name}.json", tmp_path / f"{name}_losses.json"
    config_file.write_text(json.dumps(config))
    launch = ["--multi_gpu", "--num_processes", str(processes)] if processes > 1 else ["--num_processes", "1"]
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(29600 + processes),
               str(WORKER), str(config_file), str(losses_file)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                            stdin=subprocess.DEVNULL)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    weights = load_file(tmp_path / name / "final" / "model.safetensors")
    return json.loads(losses_file.read_text()), weights


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available")
def test_ddp_phase1_steps_equal_single_process(tmp_path, tiny_phase1_config):
    config = {
        **tiny_phase1_config,
        "global_batch_tokens": 256,  # 1 process: 2 accumulated micro-batches; 2 processes: 1 each
        "max_steps": 4,
        "warmup_steps": 1,
        "learning_rate": 3e-3,
        "min_learning_rate": 3e-4,
        "log_every": 2,
        "checkpoint_every": 100,
    }
    single_losses, single_weights = _launch(config, tmp_path, "single", 1)
    ddp_losses, ddp_weights = _launch(config, tmp_path, "ddp", 2)
    assert len(single_losses) == len(ddp_losses) == 4
    assert ddp_losses == pytest.approx(single_losses, rel=1e-5)
    for name, tensor in single_weights.items():
        torch.testing.assert_close(ddp_weights[name], tensor, atol=1e-5, rtol=1e-4, msg=name)

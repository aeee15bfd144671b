"""Scale-out through Accelerate on CPU: 2 DDP processes (gloo) train phase 1 on the on-the-fly path, each on its own
share of the texts, and a resume of that run on another number of processes is refused. (2 processes train exactly
like one from pre-tokenised shards: tests/test_pretokenize.py.)"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from train import phase1
from train.common import ConfigError


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
def test_ddp_phase1_on_the_fly_trains_and_refuses_a_resume_on_another_process_count(tmp_path, tiny_phase1_config):
    config = {
        **tiny_phase1_config,
        "global_batch_tokens": 256,  # 2 processes: 1 micro-batch of 4 blocks each
        "max_steps": 2,
        "warmup_steps": 1,
        "learning_rate": 3e-3,
        "min_learning_rate": 3e-4,
        "log_every": 1,
        "checkpoint_every": 2,
    }
    ddp_losses, _ = _launch(config, tmp_path, "ddp", 2)
    assert len(ddp_losses) == 2 and all(math.isfinite(x) for x in ddp_losses), ddp_losses
    checkpoint = tmp_path / "ddp" / "checkpoints" / "checkpoint-00000002"
    position = json.loads((checkpoint / "trainer_state.json").read_text())["data"]
    assert position["processes"] == 2 and position["blocks_emitted"] == 16 and len(position["ranks"]) == 2

    resumed = {**config, "output_dir": str(tmp_path / "ddp"), "max_steps": 4, "resume": "auto"}
    message = r"the on-the-fly data position was written by 2 process\(es\), this run has 1"
    try:
        with pytest.raises(ConfigError, match=message):
            phase1.run(resumed)  # in this process: 1 process
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

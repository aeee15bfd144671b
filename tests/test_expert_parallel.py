"""Expert parallelism with 2 CPU processes (gloo): transformers' EP plan for our experts equals the single-process layer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from configuration_chroma_moe import ChromaMoeConfig
from modeling_chroma_moe import ChromaMoeModel

WORKER = Path(__file__).parent / "distributed" / "ep_worker.py"


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available")
def test_expert_parallel_equals_single_process(tmp_path):
    torch.manual_seed(0)
    ChromaMoeModel(ChromaMoeConfig.from_preset("chroma-moe-tiny")).save_pretrained(tmp_path / "model")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), str(tmp_path / "model")]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    for rank in (0, 1):
        assert f"rank {rank}: expert-parallel forward and gradients equal" in result.stdout

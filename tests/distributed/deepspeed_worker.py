"""Worker for tests/test_deepspeed.py, started by `accelerate launch` with train/accelerate/deepspeed_zero2.yaml: runs
phase 1 from a JSON config and, on the main process, writes the per-step losses next to the final model.

With ``--stop-after-checkpoint`` every process stops right after the first checkpoint is complete, as a preempted job
would; the run is then continued by launching again with ``resume: auto``."""

import json
import sys
from pathlib import Path

from accelerate import PartialState

from train import common, phase1

SAVE_CHECKPOINT = common.save_checkpoint


class Preempted(Exception):
    """Raised in every process once its first checkpoint is written."""


def save_then_stop(*args, **kwargs):
    raise Preempted(SAVE_CHECKPOINT(*args, **kwargs))


if __name__ == "__main__":
    config_file, losses_file, *flags = sys.argv[1:]
    if flags == ["--stop-after-checkpoint"]:
        common.save_checkpoint = save_then_stop
    elif flags:
        sys.exit(f"unknown arguments {flags}")
    try:
        result = phase1.run(json.loads(Path(config_file).read_text()))
    except Preempted as stop:
        print(f"stopped after writing {stop.args[0]}")
    else:
        if PartialState().is_main_process:
            with open(losses_file, "w") as handle:
                json.dump(result.losses, handle)

"""Worker for tests/test_scale_out.py, started by `accelerate launch`: runs phase 1 from a JSON config and, on the main
process, writes the per-step losses next to the final model."""

import json
import sys

from accelerate import PartialState

from train import phase1

if __name__ == "__main__":
    config_file, losses_file = sys.argv[1], sys.argv[2]
    result = phase1.run(json.loads(open(config_file).read()))
    if PartialState().is_main_process:
        with open(losses_file, "w") as handle:
            json.dump(result.losses, handle)

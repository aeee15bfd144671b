"""The machine a benchmark runs on: its load average, printed with every result.

A timing taken while other jobs share the cores is not a result (an encode table measured at load 5–10 was 10× off), so
every benchmark calls `report_load()` before and after it measures and prints both lines with its output.
"""

from __future__ import annotations

import os
import sys

BUSY_LOAD = 1.0


def report_load(when: str) -> float:
    """Print `load_average_<when>: 1m 5m 15m` (from `os.getloadavg`) and, when the 1-minute load is at or above
    `BUSY_LOAD`, a warning on stderr that the figures are not to be recorded. Returns the 1-minute load."""
    one, five, fifteen = os.getloadavg()
    print(f"load_average_{when}: {one:.2f} {five:.2f} {fifteen:.2f} (cores: {os.cpu_count()})", flush=True)
    if one >= BUSY_LOAD:
        print(
            f"WARNING: 1-minute load {one:.2f} >= {BUSY_LOAD}: other jobs share this machine, do not record these figures",
            file=sys.stderr,
            flush=True,
        )
    return one

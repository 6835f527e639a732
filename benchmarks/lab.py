"""How long the lab takes to build, verify (without the NAT timers) and remove, against the
issue's budget of 30 s for `lab up` on a 2-core machine. Needs root.

    .venv/bin/python benchmarks/lab.py [runs]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAME = "fvbench"
BUDGET_UP_S = 30.0


def timed(*args: str) -> float:
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "fleetvpn", "lab", *args, "--name", NAME],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    return time.monotonic() - started


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("benchmarks/lab.py needs root (it builds network namespaces)")
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    timed("down")
    ups, repairs, verifies, downs = [], [], [], []
    for _ in range(runs):
        ups.append(timed("up"))
        repairs.append(timed("up"))  # idempotent re-run: nothing to create
        verifies.append(timed("verify", "--no-timeouts"))
        downs.append(timed("down"))
    print(f"lab {NAME} (default topology), {runs} runs, median / max seconds")
    for label, xs in (
        ("up", ups),
        ("up again", repairs),
        ("verify --no-timeouts", verifies),
        ("down", downs),
    ):
        print(f"  {label:22} {statistics.median(xs):6.2f} / {max(xs):6.2f}")
    print(f"  up vs the {BUDGET_UP_S:.0f} s budget: {BUDGET_UP_S / max(ups):.0f}x under")


if __name__ == "__main__":
    main()

"""NAT mapping lifetime: measured vs configured, error and wall time, on real lab NATs.

Builds its own lab (``fvnat``): a public hub running the responder and one NAT site per
configured established-flow timeout T, all measured at once with ``fleetvpn probe nat``.
The baseline is the truth (the NAT's own ``nf_conntrack_udp_timeout_stream``) and the goal from
the issue: ±1 s, wall time ≤ T + 5 s. Needs root.

    .venv/bin/python benchmarks/nat.py [--timeouts 15,20,30,37,60,90] [--runs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fleetvpn.lab import topology  # noqa: E402
from fleetvpn.lab.build import Lab  # noqa: E402
from fleetvpn.lab.plan import build_plan  # noqa: E402

NAME = "fvnat"
PORT = 4789


def topology_text(timeouts: list[int]) -> str:
    sites = "\n".join(
        f"  t{t}:\n    kind: nat\n    conntrack: {{udp_timeout: {min(t, 30)}, "
        f"udp_timeout_stream: {t}}}\n    hosts: [n{t}]"
        for t in timeouts
    )
    return (
        f"name: {NAME}\ncontroller: hub\nsites:\n  hub: {{kind: public, hosts: [hub]}}\n{sites}\n"
    )


def fleetvpn(*args: str) -> list[str]:
    return [sys.executable, "-m", "fleetvpn", *args]


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("benchmarks/nat.py needs root (it builds network namespaces)")
    parser = argparse.ArgumentParser()
    parser.add_argument("--timeouts", default="15,20,30,37,60,90")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    timeouts = [int(t) for t in args.timeouts.split(",")]
    max_lifetime = max(timeouts) * 2

    with tempfile.TemporaryDirectory() as tmp:
        topo_file = Path(tmp) / "nat.yml"
        topo_file.write_text(topology_text(timeouts))
        key_file = Path(tmp) / "probe.key"
        subprocess.run([*fleetvpn("probe", "genkey")], stdout=key_file.open("w"), check=True)
        topo = topology.load(topo_file)
        plan = build_plan(topo)
        lab = Lab(plan, topo)
        subprocess.run(fleetvpn("lab", "down", "-t", str(topo_file)), capture_output=True)
        subprocess.run(fleetvpn("lab", "up", "-t", str(topo_file)), check=True, capture_output=True)
        responder = subprocess.Popen(
            [*lab.host_ns("hub").prefix(), *fleetvpn("probe", "responder", "--listen",
             f"0.0.0.0:{PORT}", "--key-file", str(key_file))],
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(1.0)
        target = f"{plan.hosts['hub'].ipv4}:{PORT}"

        def measure(t: int) -> tuple[int, dict[str, object], float]:
            started = time.monotonic()
            out = subprocess.run(
                [*lab.host_ns(f"n{t}").prefix(), *fleetvpn("probe", "nat", target, "--key-file",
                 str(key_file), "--max-lifetime", str(max_lifetime), "--json")],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            return t, json.loads(out.stdout), time.monotonic() - started

        try:
            rows = []
            for _ in range(args.runs):
                with ThreadPoolExecutor(len(timeouts)) as pool:
                    rows += list(pool.map(measure, timeouts))
        finally:
            responder.terminate()
            responder.wait(5)
            subprocess.run(fleetvpn("lab", "down", "-t", str(topo_file)), capture_output=True)

    print(f"NAT mapping lifetime, search range 5..{max_lifetime} s, {args.runs} run(s) per T")
    print(f"{'true T':>7} {'measured':>9} {'error':>7} {'wall':>7} {'wall-T':>7} {'mappings':>8}"
          f"  keepalive  goal (±1 s, wall ≤ T+5 s)")  # fmt: skip
    met = 0
    for t, doc, wall in sorted(rows, key=lambda r: r[0]):
        measured = doc["mapping_lifetime_s"]
        error = None if measured is None else float(measured) - t  # type: ignore[arg-type]
        exact = error is not None and abs(error) <= 1.0
        fast = wall <= t + 5
        met += exact and fast
        print(
            f"{t:>7} {measured!s:>9} {error if error is None else f'{error:+.2f}':>7} "
            f"{wall:>7.1f} {wall - t:>+7.1f} {doc['mappings_used']!s:>8}  {doc['keepalive_s']!s:>9}"
            f"  {'±1 s' if exact else 'OFF'}, {'in time' if fast else f'{wall / t:.2f}×T'}"
        )
    print(f"{met} of {len(rows)} measurements met both goals")


if __name__ == "__main__":
    main()

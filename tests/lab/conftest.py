from __future__ import annotations

import json
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetvpn.lab import topology
from fleetvpn.lab.build import Lab
from fleetvpn.lab.plan import Plan, build_plan

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TOPOLOGY = REPO / "inventories/lab/topology.yml"


def lab_name(base: str) -> str:
    """A test lab's name: ``base`` plus a tag of this checkout, so the suite running in another
    clone (CI) at the same time builds other namespaces. Never the user's own lab's name."""
    return base + format(zlib.crc32(str(REPO).encode()) & 0xFFFF, "04x")


TEST_LAB = lab_name("fvtest")  # tests must not touch a running demo


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/lab/" in str(item.fspath):
            item.add_marker(pytest.mark.lab)


def fleetvpn(
    *args: str, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "fleetvpn", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"fleetvpn {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def verify_json(*args: str) -> dict[str, object]:
    proc = fleetvpn("lab", "verify", "--json", *args, check=False)
    doc = json.loads(proc.stdout)
    assert isinstance(doc, dict)
    doc["exit"] = proc.returncode
    return doc


class LabHandle:
    def __init__(self, topology_path: Path, name: str) -> None:
        self.topology_path = topology_path
        self.name = name
        topo = topology.load(topology_path)
        import dataclasses

        self.topo = dataclasses.replace(topo, name=name)
        self.plan: Plan = build_plan(self.topo)
        self.lab = Lab(self.plan, self.topo)

    def cli(self, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        command, *rest = args
        return fleetvpn(  # type: ignore[arg-type]
            "lab", command, "-t", str(self.topology_path), "--name", self.name, *rest, **kw
        )


@pytest.fixture(scope="session")
def default_lab() -> Iterator[LabHandle]:
    handle = LabHandle(DEFAULT_TOPOLOGY, TEST_LAB)
    handle.cli("down", check=False)
    up = handle.cli("up")
    print(up.stderr + up.stdout)
    yield handle
    handle.cli("down", check=False)

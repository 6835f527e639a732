"""Real ``ansible-playbook`` runs over SSH (paramiko, through the lab's management network)
against a lab of their own (``fvanst`` and a tag of the checkout). Tests that need the lab are
marked ``lab``: the top-level conftest skips them, saying why, when not run as root."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TOPOLOGY = HERE / "topology.yml"
# This suite's own lab: "fvanst" plus a tag of the checkout, so that the suite running in a CI
# clone and in a working tree at the same time never share (and tear down) one lab.
LAB = "fvanst" + format(zlib.crc32(str(REPO).encode()) & 0xFFFF, "04x")
BIN = Path(sys.executable).parent
INVENTORY = HERE / f"hosts-{LAB}.yml"
HOSTS_DIR = Path("/var/lib/fleetvpn-lab") / LAB / "hosts"
NODES = ("hub", "branch1", "branch2", "cloud1")
# Agents report and re-measure often, so measurements arrive within the test's patience.
FAST_AGENTS = json.dumps({"fleetvpn_agent_intervals": {"report_s": 5, "desired_s": 5, "nat_s": 30}})

_LAB_TESTS = {"test_playbooks.py"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).name in _LAB_TESTS:
            item.add_marker(pytest.mark.lab)


@dataclass
class Run:
    argv: list[str]
    returncode: int
    output: str  # stdout and stderr together, as an operator sees them
    recap: dict[str, dict[str, int]] = field(default_factory=dict)

    def changed(self, host: str) -> int:
        return self.recap[host]["changed"]


_RECAP = re.compile(r"^(\S+)\s+:\s+((?:\w+=\d+\s*)+)$", re.MULTILINE)


def parse_recap(output: str) -> dict[str, dict[str, int]]:
    recap: dict[str, dict[str, int]] = {}
    tail = output.rsplit("PLAY RECAP", 1)[-1]
    for host, counters in _RECAP.findall(tail):
        recap[host] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", counters)}
    return recap


class Ansible:
    """Runs playbooks from the checkout as an operator would (the repo's ansible.cfg finds the
    collection), and keeps every output for the secrets check."""

    def __init__(self) -> None:
        self.outputs: list[str] = []

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            PATH=f"{BIN}:{env.get('PATH', '')}",
            ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
            ANSIBLE_NOCOLOR="1",
            ANSIBLE_FORCE_COLOR="0",
            ANSIBLE_DEPRECATION_WARNINGS="0",
        )
        return env

    def playbook(self, playbook: str, *args: str, timeout: float = 600) -> Run:
        path = playbook if "/" in playbook else f"playbooks/{playbook}"
        argv = [str(BIN / "ansible-playbook"), "-i", str(INVENTORY), path, *args]
        proc = subprocess.run(
            argv,
            cwd=REPO,
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
        self.outputs.append(proc.stdout)
        return Run(argv, proc.returncode, proc.stdout, parse_recap(proc.stdout))

    def inventory(self, source: Path, *args: str) -> subprocess.CompletedProcess[str]:
        """ansible-inventory from inside the lab's management network (the root namespace has
        no route into the lab, by design)."""
        argv = ["nsenter", f"--net=/run/netns/{LAB}-mgmt", str(BIN / "ansible-inventory")]
        proc = subprocess.run(
            [*argv, "-i", str(source), *args],
            cwd=REPO,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.outputs.append(proc.stdout + proc.stderr)
        return proc


def lab_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "fleetvpn", "lab", *args, "-t", str(TOPOLOGY), "--name", LAB],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"fleetvpn lab {' '.join(args)}: {proc.stdout}{proc.stderr}")
    return proc


def on(host: str, *argv: str) -> str:
    """Run a command on a lab host (or box); its stdout."""
    proc = subprocess.run(
        [sys.executable, "-m", "fleetvpn", "lab", "exec", "-t", str(TOPOLOGY), "--name", LAB,
         host, "--", *argv],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if proc.returncode != 0:
        raise AssertionError(f"{host}: {' '.join(argv)}: {proc.stdout}{proc.stderr}")
    return proc.stdout


@pytest.fixture(scope="module")
def ansible_lab() -> Iterator[Ansible]:
    lab_cli("down", check=False)
    lab_cli("up")
    try:
        yield Ansible()
    finally:
        lab_cli("down", check=False)

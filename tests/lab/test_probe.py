"""`fleetvpn probe` on the lab's real paths: exact path MTUs, NAT lifetimes, a silent responder."""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleetvpn.engines.natlife import keepalive_for
from fleetvpn.lab import netns
from fleetvpn.net import keys, wire

from .conftest import LabHandle, lab_name

PORT = 4789


@dataclass
class Responder:
    lab: LabHandle
    key_file: Path
    proc: subprocess.Popen[str]
    address: str  # the hub's IPv4
    address6: str

    def probe(self, host: str, *args: str) -> dict[str, object]:
        argv = [*self.lab.lab.host_ns(host).prefix(), sys.executable, "-m", "fleetvpn", "probe"]
        proc = subprocess.run(
            [*argv, *args, "--key-file", str(self.key_file), "--json"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        assert isinstance(doc, dict) and doc["schema_version"] == 1
        return doc


def start_responder(lab: LabHandle, key_file: Path, host: str = "hub") -> subprocess.Popen[str]:
    argv = [*lab.lab.host_ns(host).prefix(), sys.executable, "-m", "fleetvpn", "probe"]
    proc = subprocess.Popen(
        [*argv, "responder", "--listen", f"[::]:{PORT}", "--key-file", str(key_file)],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert "fleetvpn probe responder on" in line, line
    return proc


@pytest.fixture(scope="module")
def responder(
    default_lab: LabHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Responder]:
    default_lab.cli("up")
    key_file = tmp_path_factory.mktemp("probe") / "probe.key"
    keys.write_key(key_file)
    proc = start_responder(default_lab, key_file)
    hub = default_lab.plan.hosts["hub"]
    assert hub.ipv6 is not None
    yield Responder(default_lab, key_file, proc, hub.ipv4, hub.ipv6)
    proc.terminate()
    proc.wait(5)


@pytest.mark.parametrize(
    ("host", "family", "path_mtu", "icmp"),
    [
        ("branch1", 4, 1400, False),  # NAT, black hole
        ("home1", 4, 1492, True),  # double NAT, PPPoE, ICMP works
        ("cloud1", 6, 1350, False),  # IPv6, black hole
        ("office1", 6, 1460, True),  # IPv6 through a stateful firewall
        ("controller", 4, 1500, False),  # no bottleneck
    ],
)
def test_pmtu_is_exact(
    responder: Responder, host: str, family: int, path_mtu: int, icmp: bool
) -> None:
    target = f"{responder.address}:{PORT}" if family == 4 else f"[{responder.address6}]:{PORT}"
    doc = responder.probe(host, "pmtu", target)
    assert doc["path_mtu"] == path_mtu, doc
    assert doc["family"] == family
    assert doc["tunnel_mtu"] == path_mtu - (60 if family == 4 else 80)
    assert doc["icmp_seen"] is icmp
    assert isinstance(doc["probes_sent"], int) and doc["probes_sent"] > 0


def test_nat_lifetimes_filters_and_keepalives(responder: Responder) -> None:
    """Four sites measured at once: 20 s NAT, double NAT (home 30 s < carrier 45 s),
    a 40 s firewall without NAT, and the public hub."""
    cases = {
        "branch1": (True, True, 20),
        "home1": (True, True, 30),
        "office1": (False, True, 40),
        "controller": (False, False, None),
    }
    target = f"{responder.address}:{PORT}"
    with ThreadPoolExecutor(len(cases)) as pool:
        docs = dict(
            zip(
                cases,
                pool.map(
                    lambda h: responder.probe(h, "nat", target, "--max-lifetime", "60"), cases
                ),
                strict=True,
            )
        )
    for host, (nat, stateful, lifetime) in cases.items():
        doc = docs[host]
        assert doc["nat"] is nat, (host, doc)
        assert doc["stateful_filter"] is stateful, (host, doc)
        measured = doc["mapping_lifetime_s"]
        if lifetime is None:
            assert measured is None and doc["keepalive_s"] == 0, (host, doc)
            continue
        assert isinstance(measured, float) and abs(measured - lifetime) <= 1.0, (host, doc)
        assert doc["keepalive_s"] == keepalive_for(measured, nat, stateful)[0]
    assert str(docs["branch1"]["mapped_address"]).startswith(
        responder.lab.plan.hosts["branch1"].public_ipv4 + ":"
    )
    assert docs["office1"]["mapped_address"] == docs["office1"]["local_address"]


def _returned_bytes(sock: socket.socket, wait_s: float = 1.0) -> int:
    total = 0
    deadline = time.monotonic() + wait_s
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            total += len(sock.recv(65535))
        except TimeoutError:
            break
    return total


def test_responder_is_silent_to_what_it_cannot_authenticate(responder: Responder) -> None:
    key = keys.load_key(responder.key_file)
    dest = (responder.address, PORT)
    sock = netns.socket_in(responder.lab.plan.hosts["controller"].ns, socket.AF_INET)
    try:
        sealer = wire.Sealer(key, secrets.randbits(64))
        probe = wire.PmtuProbe(7)
        good = sealer.seal(probe, time.time(), pad_to=1200)
        sock.sendto(good, dest)
        assert _returned_bytes(sock) > 0  # the responder is there and answers a real probe

        stranger = wire.Sealer(secrets.token_bytes(32), secrets.randbits(64))
        bad = [
            good,  # replayed
            stranger.seal(probe, time.time(), pad_to=1200),  # another key
            good[:-1],  # truncated
            good[:40],
            good + b"x" * 100,  # oversized: trailing bytes
            secrets.token_bytes(60000),  # oversized garbage
            b"",
            b"FVP\x01" + bytes(60),
            sealer.seal(probe, time.time() - 3600, pad_to=1200),  # an hour-old capture
        ]
        for packet in bad:
            sock.sendto(packet, dest)
        assert _returned_bytes(sock, 2.0) == 0
    finally:
        sock.close()


LOSSY = """
name: fvloss
controller: hub
sites:
  hub: {kind: public, hosts: [hub]}
  lossy:
    kind: nat
    uplink_mtu: 1400
    icmp_blackhole: true
    uplink_loss_percent: 5
    conntrack: {udp_timeout: 10, udp_timeout_stream: 20}
    hosts: [far]
"""


def test_pmtu_stays_exact_with_5_percent_loss(tmp_path: Path) -> None:
    topo = tmp_path / "lossy.yml"
    topo.write_text(LOSSY)
    lab = LabHandle(topo, lab_name("fvloss"))
    lab.cli("down", check=False)
    key_file = tmp_path / "probe.key"
    keys.write_key(key_file)
    try:
        lab.cli("up")
        proc = start_responder(lab, key_file)
        try:
            responder = Responder(lab, key_file, proc, lab.plan.hosts["hub"].ipv4, "")
            found = [
                responder.probe("far", "pmtu", f"{responder.address}:{PORT}")["path_mtu"]
                for _ in range(10)
            ]
        finally:
            proc.terminate()
            proc.wait(5)
    finally:
        lab.cli("down")
    assert found == [1400] * 10

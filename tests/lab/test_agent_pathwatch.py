"""Issue 12 in the built-in lab, with real agents applying and the real controller: the branch's
black-holed uplink (ICMP eaten) shrinks under a busy tunnel, and the branch agent's path watch
confirms it, lowers its own route MTU towards the hub at once ("applied locally, controller to
confirm"), re-measures, reports, and the controller agrees; bulk TCP completes again.

A smaller fleet than test_agent_fleet.py (controller, hub, branch1): the path under test is
branch1 ↔ hub. The bounds are well above the figures measured on this machine (printed), so
the test is not a timing race: the issue's goal is 10 s on a busy link, 30 s on an idle one (an
idle link is checked when traffic resumes: the first stalled send triggers the check).

Below 1340 bytes (1400 → 1300, issue 12 item 3), in a tunnel that carries IPv6 as well (this
module's controller sets ``tunnel.ipv6``): no standing black hole. Both ends' IPv4 routes go to
1232, their IPv6 routes stay at 1280 with TCP's MSS clamped to 1172, and the route towards each
other's endpoint is locked at 1340 (``proto 252``), so wireguard-go's 1340-byte outer packets
leave without DF and the bottleneck's router fragments them: IPv4 and IPv6 bulk TCP complete, a
1280-byte IPv6 ping crosses, and health says ``fragmenting`` with its reason, not ``blackhole``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from . import wgutil
from .conftest import DEFAULT_TOPOLOGY, LabHandle, lab_name
from .test_agent_fleet import Fleet, _log_offset, _log_since

LAB = lab_name("fvpw")
AGENTS = ("hub", "branch1")
BOXES = ((f"{LAB}-branch-isp", "tosite"), (f"{LAB}-branch-r", "wan"))
DETECT_BOUND_S = 45.0  # change → route lowered on branch1 (measured: see the printout)
RECOVER_BOUND_S = 60.0  # change → a bulk transfer completes again

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: builds network namespaces")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    lab = LabHandle(DEFAULT_TOPOLOGY, LAB)
    lab.cli("down", check=False)
    lab.cli("up")
    logs = tmp_path_factory.mktemp("agent-pathwatch")
    f = Fleet(lab, logs, agents=AGENTS)
    f.tunnel_ipv6 = "fd99:f1ee:7::/64"
    f.pmtu_s = 30  # the upkeep finds the path grown back after each test within ~35 s
    try:
        f.setup()
        for host in AGENTS:
            f.start_agent(host)
        yield f
    finally:
        for name in list(f.procs):
            f.stop(name)
        print(f"logs in {logs}")
        lab.cli("down", check=False)


def _route_mtu(fleet: Fleet, host: str, peer: str) -> int | None:
    """The locked MTU of ``host``'s route to ``peer``'s tunnel address, read from the kernel."""
    ip = fleet._addresses(peer)[0]
    out = fleet.sh(host, f"ip route show {ip}/32 dev wg0")
    m = re.search(r"mtu lock (\d+)", out)
    return int(m.group(1)) if m else None


def _settled(fleet: Fleet) -> str | None:
    try:
        links = {(r["a"], r["b"]): r for r in fleet.health()["links"]}
    except (OSError, AssertionError) as e:
        return f"no health ({e})"
    row = links.get(("branch1", "hub"))
    if row is None:
        return "no link branch1↔hub"
    got = (row["a_to_b"]["path_mtu"], row["b_to_a"]["path_mtu"])
    if got != (1400, 1400):
        return f"path MTU {got}"
    for host, peer in (("branch1", "hub"), ("hub", "branch1")):
        route = _route_mtu(fleet, host, peer)  # the kernel's, not a status file a sample old
        if route != 1340:
            return f"{host}→{peer} route MTU {route}"
    return None


@contextlib.contextmanager
def uplink(mtu: int) -> Iterator[float]:
    """The branch's uplink (both boxes of the bottleneck) at ``mtu``; yields when it changed."""
    for ns, dev in BOXES:
        subprocess.run(["ip", "-n", ns, "link", "set", dev, "mtu", str(mtu)], check=True)
    try:
        yield time.monotonic()
    finally:
        for ns, dev in BOXES:
            subprocess.run(["ip", "-n", ns, "link", "set", dev, "mtu", "1400"], check=True)


class Traffic:
    """Bulk TCP branch1 → hub, one 1 MB transfer after another (each a new connection, so it
    takes the route MTU of its moment): (started, ended) of each one completed or stalled."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.completed: list[tuple[float, float]] = []
        self.stalled: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        src, dst = self.fleet.plan.hosts["branch1"].ns, self.fleet.plan.hosts["hub"].ns
        ip = self.fleet._addresses("hub")[0]
        port = 5800
        while not self.stop.is_set():
            port = 5800 + (port - 5799) % 100
            started = time.monotonic()
            ok = wgutil.tcp_transfer(src, dst, ip, 1_000_000, 4.0, port)
            done = self.completed if ok == (True, 1_000_000) else self.stalled
            done.append((started, time.monotonic()))
            self.stop.wait(1.0)

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(15)


def test_busy_link_shrink_is_confirmed_and_lowered_locally_at_once(fleet: Fleet) -> None:
    fleet.wait("branch1↔hub measured (1400) and applied (1340)", lambda: _settled(fleet), 240)
    offset = _log_offset(fleet, "branch1")
    with Traffic(fleet) as traffic:
        time.sleep(8)
        assert traffic.completed, "no transfer completed before the change"
        with uplink(1360) as changed_at:
            lowered_s, route_now = _wait_lowered(fleet, changed_at, 1360)
            recovered_s, stalls = _wait_recovered(fleet, traffic, changed_at)
            log = _log_since(fleet, "branch1", offset)
            assert "no longer gets through" in log, log[-3000:]
            assert "applied locally, controller to confirm" in log, log[-3000:]
            fleet.wait("the controller agrees", lambda: _logged(fleet, offset, "agrees"), 60)
            agreed_s = time.monotonic() - changed_at
    print(
        f"busy: uplink 1400 -> 1360 under bulk TCP: branch1's route to hub lowered to "
        f"{route_now} {lowered_s:.1f} s after the change (bound {DETECT_BOUND_S:g} s); a "
        f"transfer completed again at {recovered_s:.1f} s (bound {RECOVER_BOUND_S:g} s, "
        f"{stalls} stalled meanwhile); the controller agreed by {agreed_s:.0f} s"
    )
    assert lowered_s <= DETECT_BOUND_S
    assert recovered_s <= RECOVER_BOUND_S


def test_idle_link_shrink_is_found_when_traffic_resumes(fleet: Fleet) -> None:
    fleet.wait("back to 1400 (the upkeep finds the increase)", lambda: _settled(fleet), 240)
    offset = _log_offset(fleet, "branch1")
    with uplink(1360) as changed_at:
        time.sleep(3)  # idle: only the agents' own small RTT probes cross the tunnel
        with Traffic(fleet) as traffic:
            lowered_s, route_now = _wait_lowered(fleet, changed_at, 1360)
            recovered_s, stalls = _wait_recovered(fleet, traffic, changed_at)
        trigger = re.search(r"1400 no longer gets through: ([^;:]*)", _log_since(
            fleet, "branch1", offset))  # fmt: skip
    print(
        f"idle, traffic from 3 s after the change: route lowered to {route_now} at "
        f"{lowered_s:.1f} s, a transfer completed at {recovered_s:.1f} s (bound "
        f"{RECOVER_BOUND_S:g} s; the issue's goal 30 s), {stalls} stalled; found by: "
        f"{trigger.group(1) if trigger else '?'}"
    )
    assert recovered_s <= RECOVER_BOUND_S


def test_below_1340_leaves_no_black_hole_for_ipv4_or_ipv6(fleet: Fleet) -> None:
    fleet.wait("back to 1400 (the upkeep finds the increase)", lambda: _settled(fleet), 240)
    offset = _log_offset(fleet, "branch1")
    hub_v4, hub_v6 = fleet._addresses("hub")[:2]
    with Traffic(fleet) as traffic, uplink(1300) as changed_at:
        lowered_s, route_now = _wait_lowered(fleet, changed_at, 1300)
        recovered_s, stalls = _wait_recovered(fleet, traffic, changed_at)
        fleet.wait("both ends settle below 1280 with outer fragmentation",
                   lambda: _fragmenting(fleet), 120)  # fmt: skip
        settled_s = time.monotonic() - changed_at
        src, dst = fleet.plan.hosts["branch1"].ns, fleet.plan.hosts["hub"].ns
        v6_bulk = wgutil.tcp_transfer(src, dst, hub_v6, 1_000_000, 10.0, 5790)
        v4_bulk = wgutil.tcp_transfer(src, dst, hub_v4, 1_000_000, 10.0, 5791)
        # 1232 + 8 + 40 = a 1280-byte IPv6 packet, more than the path carries inside the tunnel:
        # it crosses only as outer fragments, both ways
        big_there = _udp6(fleet, "branch1", "hub", 1232)
        big_back = _udp6(fleet, "hub", "branch1", 1232)
        # the control: without branch1's locked route to the hub's endpoint, wireguard-go
        # sets DF and the same datagram vanishes; the agent's next sample puts the route back
        agent = fleet.procs["branch1"]
        agent.send_signal(signal.SIGSTOP)  # so that it cannot put the route back meanwhile
        try:
            fleet.sh("branch1", "ip -4 route flush proto 252")
            lost_without = not _udp6(fleet, "branch1", "hub", 1232)
        finally:
            agent.send_signal(signal.SIGCONT)
        fleet.wait("branch1 puts its endpoint route back", lambda: _fragmenting(fleet), 30)
        big_again = _udp6(fleet, "branch1", "hub", 1232)
        rows = {(r["a"], r["b"]): r for r in fleet.health()["links"]}
        link = rows[("branch1", "hub")]
        answer = re.findall(r"hub: controller (?:agrees|corrected)[^\n]*",
                            _log_since(fleet, "branch1", offset))  # fmt: skip
    print(
        f"uplink 1400 -> 1300 (tunnel carries IPv4 and IPv6): branch1 lowered its route to "
        f"{route_now} at {lowered_s:.1f} s, a transfer completed at {recovered_s:.1f} s "
        f"({stalls} stalled); both ends at 1232 + outer fragmentation by {settled_s:.0f} s; "
        f"controller: {answer[-1][:200] if answer else 'no answer'}; health: {link['state']}: "
        f"{link['reason'][:400]}"
    )
    assert lowered_s <= DETECT_BOUND_S
    assert recovered_s <= RECOVER_BOUND_S
    assert v4_bulk == (True, 1_000_000), v4_bulk
    assert v6_bulk == (True, 1_000_000), v6_bulk
    assert big_there and big_back, (big_there, big_back)
    assert lost_without and big_again, (lost_without, big_again)
    assert link["state"] == "fragmenting", link
    assert "IPv6 inside above 1232 bytes" in link["reason"], link["reason"]


def _udp6(fleet: Fleet, src: str, dst: str, size: int) -> bool:
    """A UDP datagram of ``size`` bytes (DF: never fragmented inside) from ``src`` to ``dst``'s
    tunnel IPv6 address arrives whole (3 tries)."""
    import socket

    from fleetvpn.lab import netns

    dst_v6 = fleet._addresses(dst)[1]
    server = netns.socket_in(fleet.plan.hosts[dst].ns, socket.AF_INET6, socket.SOCK_DGRAM)
    client = netns.socket_in(fleet.plan.hosts[src].ns, socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        server.bind((dst_v6, 5792))
        server.settimeout(2.0)
        client.setsockopt(socket.IPPROTO_IPV6, 62, 1)  # IPV6_DONTFRAG
        for _ in range(3):
            client.sendto(b"x" * size, (dst_v6, 5792))
            with contextlib.suppress(TimeoutError):
                if len(server.recv(65535)) == size:
                    return True
        return False
    finally:
        server.close()
        client.close()


def _fragmenting(fleet: Fleet) -> str | None:
    """None once both ends run the sub-1280 settings: IPv4 route 1232, IPv6 route 1280 with
    advmss 1172, the endpoint route locked at 1340 (outerroute.py), as the kernel shows them."""
    for host, peer in (("branch1", "hub"), ("hub", "branch1")):
        v6 = fleet._addresses(peer)[1]
        if _route_mtu(fleet, host, peer) != 1232:
            return f"{host}→{peer} IPv4 route MTU {_route_mtu(fleet, host, peer)}"
        six = fleet.sh(host, f"ip -6 route show {v6}/128 dev wg0")
        if "mtu lock 1280 advmss 1172" not in six:
            return f"{host}→{peer} IPv6 route {six.strip()!r}"
        endpoint = fleet.sh(host, "ip -4 route show proto 252")
        if "mtu lock 1340" not in endpoint:
            return f"{host}: endpoint routes {endpoint.strip()!r}"
    return None


def _logged(fleet: Fleet, offset: int, what: str) -> str | None:
    return None if what in _log_since(fleet, "branch1", offset) else f"no {what!r} logged"


def _wait_lowered(fleet: Fleet, changed_at: float, path_mtu: int) -> tuple[float, int | None]:
    def lowered() -> str | None:
        got = _route_mtu(fleet, "branch1", "hub")
        return None if got is not None and got + 60 <= path_mtu else f"route MTU {got}"

    fleet.wait("branch1 lowers its route to hub", lowered, DETECT_BOUND_S + 30)
    return time.monotonic() - changed_at, _route_mtu(fleet, "branch1", "hub")


def _wait_recovered(fleet: Fleet, traffic: Traffic, changed_at: float) -> tuple[float, int]:
    """Until a transfer started after the change completes: (its end - the change, stalls)."""

    def recovered() -> str | None:
        return None if any(t > changed_at for t, _ in traffic.completed) else "none completed"

    fleet.wait("a bulk transfer completes again", recovered, RECOVER_BOUND_S + 30)
    first = min(end for start, end in traffic.completed if start > changed_at)
    return first - changed_at, len([s for s, _ in traffic.stalled if s > changed_at])

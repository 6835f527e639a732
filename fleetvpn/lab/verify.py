"""``fleetvpn lab verify``: prove with real packets that the lab is what its topology says.

Every check opens real UDP sockets inside the lab's namespaces (see :mod:`fleetvpn.lab.netns`)
and talks to the core's anchor addresses across the site's real routers, NATs and bottleneck.
Checks run in parallel threads; the slowest is a NAT timer check, about T + 3 s.
"""

from __future__ import annotations

import errno
import functools
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fleetvpn.lab import netns
from fleetvpn.lab.build import LabPaths
from fleetvpn.lab.plan import ANCHOR_V4, ANCHOR_V6, Plan, StatefulBox
from fleetvpn.lab.topology import Site, Topology
from fleetvpn.net import dfsock

WAIT_S = 0.4  # how long a packet that should arrive may take (lab RTTs are < 1 ms)
COPIES = 3  # every probe is sent this often, so uplink loss cannot fake a failure


@dataclass
class CheckResult:
    site: str
    check: str
    expected: str
    observed: str
    ok: bool


Addr = tuple[str, int]


def _bound(ns: str, family: int, host: str = "") -> socket.socket:
    s = netns.socket_in(ns, family)
    s.bind((host, 0))
    return s


def _anchor(family: int) -> str:
    return str(ANCHOR_V6 if family == socket.AF_INET6 else ANCHOR_V4)


def _receive(
    sock: socket.socket, token: bytes, wait_s: float = WAIT_S, first: bool = False
) -> tuple[Addr | None, int]:
    """Wait for datagrams starting with ``token``; return (source, count) seen within wait_s.

    With ``first``, return as soon as one arrives (timing checks measure from that moment).
    """
    deadline = time.monotonic() + wait_s
    source: Addr | None = None
    count = 0
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data, addr = sock.recvfrom(65535)
        except TimeoutError:
            break
        except OSError:  # a queued ICMP error surfaces here with IP_RECVERR; read it elsewhere
            continue
        if data.startswith(token):
            source = (addr[0], addr[1])
            count += 1
            if first:
                break
    return source, count


def _token(tag: str) -> bytes:
    return f"fleetvpn-lab-verify {tag} ".encode() + os.urandom(6).hex().encode()


def _send_copies(sock: socket.socket, payload: bytes, dest: Addr) -> list[dfsock.SocketError]:
    """Send COPIES times; return the errors the kernel queued meanwhile.

    With IP_RECVERR a send fails with EMSGSIZE both when the size is over the local MTU and
    when an ICMP "too big" is pending, so the error queue (whose entries carry their origin)
    is what tells the two apart.
    """
    errors: list[dfsock.SocketError] = []
    for _ in range(COPIES):
        try:
            sock.sendto(payload, dest)
        except OSError as e:
            if e.errno != errno.EMSGSIZE:
                raise
            errors += dfsock.read_errors(sock)
    return errors


def _describe_failure(errors: list[dfsock.SocketError]) -> str:
    too_big = [e for e in errors if e.too_big]
    if any(not e.from_icmp for e in too_big):
        return "refused locally"
    return f"ICMP says {too_big[-1].mtu}" if too_big else "dropped silently"


def _probe_pair(tx: socket.socket, rx: socket.socket, dest: Addr, size: int) -> tuple[bool, str]:
    """Send DF packets of IP size `size` and `size+1`; (did size pass, what happened to size+1)."""
    dfsock.set_probe_mode(tx)
    hdr = dfsock.headers(tx.family)
    tok = _token("pmtu")
    dfsock.read_errors(tx)
    _send_copies(tx, tok.ljust(size - hdr, b"."), dest)
    _, passed = _receive(rx, tok)
    tok2 = _token("pmtu+1")
    errors = _send_copies(tx, tok2.ljust(size + 1 - hdr, b"."), dest)
    _, over = _receive(rx, tok2)
    if over:
        return passed > 0, "passed"
    return passed > 0, _describe_failure(errors + dfsock.read_errors(tx))


def _warm_up(tx: socket.socket, rx: socket.socket, dest: Addr, wait_s: float = 3.0) -> bool:
    """Small packets until one arrives: neighbour discovery on the way drops the first ones."""
    deadline = time.monotonic() + wait_s
    tok = _token("warm")
    while time.monotonic() < deadline:
        tx.sendto(tok, dest)
        if _receive(rx, tok, 0.2, first=True)[0] is not None:
            return True
    return False


def _expected_failure(limit_mode: str, mtu: int) -> str:
    return {"local": "refused locally", "silent": "dropped silently"}.get(
        limit_mode, f"ICMP says {mtu}"
    )


def check_pmtu(plan: Plan, site: Site, family: int, direction: str) -> CheckResult:
    host_ns = plan.hosts[site.hosts[0]].ns
    fam = "ipv6" if family == socket.AF_INET6 else "ipv4"
    mtu = site.path_mtu
    core_if_mtu = max(1500, site.uplink_mtu)
    if direction == "out":
        mode = (
            "local"
            if site.uplink_mtu >= site.lan_mtu
            else ("silent" if site.icmp_blackhole else "icmp")
        )
    else:
        mode = "local" if mtu >= core_if_mtu else ("silent" if site.icmp_blackhole else "icmp")
    expected = f"{mtu} passes, {mtu + 1} {_expected_failure(mode, mtu)}"
    host = _bound(host_ns, family)
    core = _bound(plan.core, family, _anchor(family))
    try:
        core_addr: Addr = (_anchor(family), core.getsockname()[1])
        if direction == "out":
            if not _warm_up(host, core, core_addr):
                return CheckResult(site.name, f"path MTU out, {fam}", expected, "no path", False)
            ok_small, big = _probe_pair(host, core, core_addr, mtu)
        else:
            # Open the way in (NAT mapping / firewall state), then probe back towards the host.
            tok = _token("open")
            host.sendto(tok, core_addr)
            mapped, _ = _receive(core, tok, 2.0, first=True)
            if mapped is None or not _warm_up(core, host, mapped):
                return CheckResult(site.name, f"path MTU in, {fam}", expected, "no path", False)
            ok_small, big = _probe_pair(core, host, mapped, mtu)
    finally:
        host.close()
        core.close()
    observed = f"{mtu} {'passes' if ok_small else 'is lost'}, {mtu + 1} {big}"
    return CheckResult(
        site.name, f"path MTU {direction}, {fam}", expected, observed, observed == expected
    )


def check_unsolicited(plan: Plan, site: Site, family: int) -> CheckResult:
    """A packet from a never-contacted port to the address a host is seen from."""
    fam = "ipv6" if family == socket.AF_INET6 else "ipv4"
    expected = "gets in" if site.kind == "public" else "is dropped"
    host = _bound(plan.hosts[site.hosts[0]].ns, family)
    core = _bound(plan.core, family, _anchor(family))
    stranger = _bound(plan.core, family, _anchor(family))
    try:
        tok = _token("hello")
        host.sendto(tok, (_anchor(family), core.getsockname()[1]))
        seen_as, _ = _receive(core, tok, 2.0, first=True)
        if seen_as is None:
            return CheckResult(site.name, f"unsolicited UDP, {fam}", expected, "no path", False)
        tok = _token("unsolicited")
        _send_copies(stranger, tok, seen_as)
        _, got = _receive(host, tok)
    finally:
        for s in (host, core, stranger):
            s.close()
    observed = "gets in" if got else "is dropped"
    return CheckResult(
        site.name, f"unsolicited UDP, {fam}", expected, observed, observed == expected
    )


def flow_survives(source_ns: str, core_ns: str, gap_s: float, established: bool) -> bool | None:
    """Does a UDP flow from source_ns still let the core in after `gap_s` idle? None: no path.

    Established = a reply, then a packet ≥ 2 s after the flow began (what moves Linux conntrack
    to its stream timer, as a WireGuard flow does). The gap runs from the last packet.
    """
    src = _bound(source_ns, socket.AF_INET)
    core = _bound(core_ns, socket.AF_INET, str(ANCHOR_V4))
    try:
        dest = (str(ANCHOR_V4), core.getsockname()[1])
        started = time.monotonic()
        tok = _token("flow")
        src.sendto(tok, dest)
        mapped, _ = _receive(core, tok, 2.0, first=True)
        if mapped is None:
            return None
        last = time.monotonic()
        if established:
            core.sendto(tok, mapped)
            if _receive(src, tok, 2.0, first=True)[0] is None:
                return None
            time.sleep(max(0.0, started + 2.3 - time.monotonic()))
            tok = _token("flow-again")
            src.sendto(tok, dest)
            if _receive(core, tok, 2.0, first=True)[0] is None:
                return None
            core.sendto(tok, mapped)
            last = time.monotonic()
            if _receive(src, tok, 2.0, first=True)[0] is None:
                return None
        time.sleep(max(0.0, last + gap_s - time.monotonic()))
        fire = _token("fire")
        for _ in range(COPIES):
            core.sendto(fire, mapped)
            time.sleep(0.02)
        return _receive(src, fire, 0.5, first=True)[1] > 0
    finally:
        src.close()
        core.close()


def check_timer(plan: Plan, box: StatefulBox, established: bool) -> CheckResult:
    timeout = box.stream_timeout if established else box.unreplied_timeout
    what = "established" if established else "unreplied"
    name = f"{box.label}: {what} UDP timer"
    short, long = max(0.0, timeout - 1.0), timeout + 1.0
    expected = f"{timeout} s: alive at {short:g} s idle, gone at {long:g} s"
    with ThreadPoolExecutor(max_workers=2) as pool:
        a = pool.submit(flow_survives, box.source_ns, plan.core, short, established)
        b = pool.submit(flow_survives, box.source_ns, plan.core, long, established)
        alive, gone = a.result(), b.result()
    if alive is None or gone is None:
        return CheckResult(box.site, name, expected, "no path", False)
    observed = (
        f"{'alive' if alive else 'gone'} at {short:g} s idle, {'alive' if gone else 'gone'} "
        f"at {long:g} s"
    )
    return CheckResult(box.site, name, expected, observed, alive and not gone)


def check_sshd(plan: Plan, paths: LabPaths, host: str) -> CheckResult:
    import paramiko  # type: ignore[import-untyped]  # only the lab needs it

    hp = plan.hosts[host]
    expected = f"key login as root, hostname {host}"
    sock = netns.socket_in(plan.mgmt, socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(5)
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    try:
        sock.connect((hp.mgmt_ip, 22))
        client.connect(
            hp.mgmt_ip,
            username="root",
            key_filename=str(paths.ssh_key),
            sock=sock,
            allow_agent=False,
            look_for_keys=False,
            timeout=5,
        )
        _, stdout, _ = client.exec_command("hostname", timeout=5)
        name = stdout.read().decode().strip()
        observed = f"key login as root, hostname {name}"
    except (OSError, paramiko.SSHException) as e:
        observed = f"failed: {e}"
    finally:
        client.close()
        sock.close()
    return CheckResult(
        hp.site, f"sshd on {host} ({hp.mgmt_ip})", expected, observed, observed == expected
    )


def _guarded(job: Callable[[], CheckResult]) -> CheckResult:
    """A check that crashes is a failed check with the error as its observation."""
    try:
        return job()
    except Exception as e:
        name = getattr(getattr(job, "func", job), "__name__", "check")
        return CheckResult("?", name, "runs", f"error: {e!r}", False)


def run_checks(
    topo: Topology, plan: Plan, paths: LabPaths, timeouts: bool = True
) -> list[CheckResult]:
    jobs: list[Callable[[], CheckResult]] = []
    for site in topo.sites:
        families = [socket.AF_INET] + ([socket.AF_INET6] if site.ipv6 else [])
        for fam in families:
            for direction in ("out", "in"):
                jobs.append(functools.partial(check_pmtu, plan, site, fam, direction))
            jobs.append(functools.partial(check_unsolicited, plan, site, fam))
    if timeouts:
        for box in plan.boxes:
            for established in (True, False):
                jobs.append(functools.partial(check_timer, plan, box, established))
    for host in plan.hosts:
        jobs.append(functools.partial(check_sshd, plan, paths, host))
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(_guarded, jobs))
    order = {s.name: i for i, s in enumerate(topo.sites)}
    return sorted(results, key=lambda r: order.get(r.site, 0))


def print_results(topo: Topology, results: list[CheckResult], elapsed_s: float) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if os.isatty(1) else 150)
    table = Table(title=f"lab {topo.name}: verify", title_justify="left")
    for col in ("site", "check", "expected", "observed", ""):
        table.add_column(col)
    last_site = None
    for r in results:
        site_cell = r.site if r.site != last_site else ""
        if r.site != last_site and last_site is not None:
            table.add_section()
        last_site = r.site
        mark = "[green]ok[/]" if r.ok else "[red bold]MISMATCH[/]"
        table.add_row(site_cell, r.check, r.expected, r.observed, mark)
    console.print(table)
    bad = sum(not r.ok for r in results)
    verdict = "[green]the lab matches its topology[/]" if not bad else f"[red]{bad} mismatches[/]"
    console.print(f"{len(results)} checks in {elapsed_s:.1f}s: {verdict}")

"""Measure the path MTU towards a responder: the PMTU engine driven over a real DF socket.

Contract: ``await measure_pmtu(target, key, …)`` returns a :class:`PmtuReport` or raises
:class:`ProbeError` with one line saying what is wrong (responder unreachable, no authenticated
reply — wrong key or no responder —, path below the floor, timeout). The socket is connected to
the responder (so ``IP_MTU`` gives the local ceiling and the kernel picks the same source
address and route as other traffic to that peer; ``source`` pins the source address, e.g. the
one WireGuard uses), in ``IP_PMTUDISC_PROBE`` mode, with ICMP errors on the error queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import random
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from fleetvpn.engines import pmtu
from fleetvpn.net import dfsock, wire

WIREGUARD_OVERHEAD = {4: 60, 6: 80}  # 32 WireGuard + 8 UDP + 20/40 IP (design.md)
MAX_CEILING = 9000  # jumbo frames; a larger local MTU (loopback) is capped here


class ProbeError(RuntimeError):
    """A measurement could not be made; the message is one line for the user."""


@dataclass(frozen=True)
class PmtuReport:
    family: int
    path_mtu: int
    tunnel_mtu: int
    local_mtu: int
    icmp_seen: bool
    probes_sent: int
    bytes_sent: int
    rounds: int
    elapsed_s: float
    reason: str

    def as_json(self) -> dict[str, object]:
        return {
            "schema_version": 1,
            "family": self.family,
            "path_mtu": self.path_mtu,
            "tunnel_mtu": self.tunnel_mtu,
            "local_mtu": self.local_mtu,
            "icmp_seen": self.icmp_seen,
            "probes_sent": self.probes_sent,
            "bytes_sent": self.bytes_sent,
            "rounds": self.rounds,
            "elapsed_s": round(self.elapsed_s, 3),
            "reason": self.reason,
        }


def family_of(host: str) -> int:
    return 6 if ":" in host else 4


def _socket(target: tuple[str, int], source: str | None) -> socket.socket:
    fam = socket.AF_INET6 if family_of(target[0]) == 6 else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_DGRAM)
    try:
        if source is not None:
            sock.bind((source, 0))
        sock.connect(target)
    except OSError as e:
        sock.close()
        raise ProbeError(f"cannot reach {target[0]}:{target[1]}: {e.strerror}") from None
    dfsock.set_probe_mode(sock)
    sock.setblocking(False)
    return sock


class _Driver:
    """Feeds one PmtuSearch from one socket; the only state is what the engine does not know."""

    def __init__(self, sock: socket.socket, key: wire.KeyLike, search: pmtu.PmtuSearch) -> None:
        self.sock = sock
        self.key = key
        self.search = search
        self.family = family_of(sock.getpeername()[0])
        self.sealer = wire.Sealer(key, secrets.randbits(64))
        self.guard = wire.ReplayGuard()
        self.icmp_seen = False
        self.acks = 0
        self.refused = False

    def send_due(self, now: float) -> None:
        for probe in self.search.probes_to_send(now):
            payload = self.sealer.seal(
                wire.PmtuProbe(probe.probe_id),
                time.time(),
                pad_to=wire.udp_payload_len(probe.size, self.family),
            )
            self._send(probe, payload, now)

    def _send(self, probe: pmtu.Probe, payload: bytes, now: float) -> None:
        # EMSGSIZE means either "over the local MTU" or "an ICMP too-big is pending"; the error
        # queue says which (entries carry their origin). A pending one is consumed, so retry once.
        for _attempt in range(2):
            try:
                self.sock.send(payload)
                return
            except ConnectionRefusedError:
                self.refused = True
                return
            except OSError as e:
                if e.errno != errno.EMSGSIZE:
                    raise ProbeError(f"cannot send probes: {e.strerror}") from None
                local = self.read_errors(now)
                if local is not None:
                    self.search.on_local_too_big(probe.probe_id, now, mtu_hint=local or None)
                    return

    def read_errors(self, now: float) -> int | None:
        """Feed queued ICMP errors to the engine; return the MTU of a local refusal, if any."""
        local: int | None = None
        for err in dfsock.read_errors(self.sock):
            if err.errno == errno.ECONNREFUSED:
                self.refused = True
            elif err.too_big and err.from_icmp:
                self.icmp_seen = True
                self.search.on_icmp_too_big(err.mtu, now)
            elif err.too_big:
                local = err.mtu
        return local

    def receive(self, now: float) -> None:
        while True:
            try:
                data = self.sock.recv(65535)
            except BlockingIOError:
                return
            except ConnectionRefusedError:
                self.refused = True
                return
            except OSError as e:
                if e.errno != errno.EMSGSIZE:
                    raise ProbeError(f"receive failed: {e.strerror}") from None
                self.read_errors(now)
                continue
            try:
                message = wire.decode(data, self.key)
                self.guard.check(message, time.time())
            except wire.WireError:
                continue  # not for us, forged or replayed: an ack must prove itself
            if isinstance(message.body, wire.PmtuAck):
                self.acks += 1
                self.search.on_ack(message.body.probe_id, now)


async def measure_pmtu(
    target: tuple[str, int],
    key: wire.KeyLike,
    *,
    source: str | None = None,
    timeout_s: float = 60.0,
    probes_per_round: int = 15,
    progress: Callable[[pmtu.PmtuSearch], None] | None = None,
    sock: socket.socket | None = None,
) -> PmtuReport:
    """``sock``: a UDP socket already connected to ``target`` to probe from instead of a new
    one (the agent probes a NATed peer back from its responder's port, through the mapping the
    peer opened to it); it is put in probe mode and closed when done."""
    loop = asyncio.get_running_loop()
    if sock is None:
        sock = _socket(target, source)
    else:
        dfsock.set_probe_mode(sock)
        sock.setblocking(False)
    try:
        # The ceiling is the largest interface MTU, not IP_MTU: that one includes a path MTU the
        # kernel cached from ICMP, which would hide an increase. Too high only costs a probe
        # that the kernel refuses at once (EMSGSIZE: proof, not a guess).
        local_mtu = max(dfsock.interface_mtus().values(), default=dfsock.local_mtu(sock))
        family = family_of(target[0])
        search = pmtu.PmtuSearch(
            family,
            ceiling=min(local_mtu, MAX_CEILING),
            probes_per_round=probes_per_round,
            rng=random.Random(),
        )
        driver = _Driver(sock, key, search)
        wake = asyncio.Event()
        loop.add_reader(sock.fileno(), wake.set)
        try:
            started = loop.time()
            search.start(started)
            deadline = started + timeout_s
            while True:
                now = loop.time()
                driver.read_errors(now)
                driver.receive(now)
                timer = search.get_timer()
                if timer is not None and now >= timer:
                    search.handle_timer(now)
                driver.send_due(now)
                if driver.refused:
                    raise ProbeError(
                        f"{target[0]}:{target[1]} refused the probes: no responder on that port"
                    )
                while (event := search.next_event()) is not None:
                    if isinstance(event, pmtu.PmtuFound):
                        return _report(driver, event, local_mtu, loop.time() - started)
                    if isinstance(event, pmtu.PmtuBelowFloor):
                        raise ProbeError(_no_reply(target, driver, event))
                if progress is not None:
                    progress(search)
                if now >= deadline:
                    raise ProbeError(f"no result from {target[0]}:{target[1]} in {timeout_s:g} s")
                timer = search.get_timer()
                wait = min(deadline, timer if timer is not None else deadline) - loop.time()
                wake.clear()
                if wait > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), wait)
        finally:
            loop.remove_reader(sock.fileno())
    finally:
        sock.close()


def _no_reply(target: tuple[str, int], driver: _Driver, event: pmtu.PmtuBelowFloor) -> str:
    where = f"{target[0]}:{target[1]}"
    if driver.acks == 0:
        return (
            f"no authenticated reply from {where}: is `fleetvpn probe responder` running there "
            "with the same probe key?"
        )
    return f"the path to {where} no longer carries {event.floor}-byte packets ({event.reason})"


def _report(driver: _Driver, found: pmtu.PmtuFound, local_mtu: int, elapsed: float) -> PmtuReport:
    family = driver.family
    return PmtuReport(
        family=family,
        path_mtu=found.path_mtu,
        tunnel_mtu=found.path_mtu - WIREGUARD_OVERHEAD[family],
        local_mtu=local_mtu,
        icmp_seen=driver.icmp_seen or found.icmp_seen,
        probes_sent=found.probes_sent,
        bytes_sent=driver.search.bytes_sent,
        rounds=found.rounds,
        elapsed_s=elapsed,
        reason=found.reason,
    )

"""Measure this host's NAT against a responder: is there one, does it filter, and how long does an
established mapping live idle. The NAT lifetime engine driven over real UDP sockets.

Contract: ``await measure_nat(target, key, …)`` returns a :class:`NatReport` or raises
:class:`ProbeError` (one line). Each engine "slot" is one UDP socket bound to the same local
address (the one the kernel picks towards the responder, or ``source``), so every slot's
mapping is made by the same NAT the tunnel's traffic crosses. Sockets are not connected: fires
from the responder's other port must be able to arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from fleetvpn.engines import natlife
from fleetvpn.net import wire
from fleetvpn.net.pmtuprobe import ProbeError, family_of


@dataclass(frozen=True)
class NatReport:
    nat: bool
    mapped_address: str
    local_address: str
    stateful_filter: bool
    mapping_lifetime_s: float | None
    resolution_s: float | None
    keepalive_s: int
    elapsed_s: float
    mappings_used: int
    reason: str

    def as_json(self) -> dict[str, object]:
        return {"schema_version": 1, **self.__dict__, "elapsed_s": round(self.elapsed_s, 2)}


def _endpoint(addr: tuple[str, int]) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


def local_address_towards(target: tuple[str, int]) -> str:
    """The source address the kernel picks for the responder (a connected UDP socket sends
    nothing)."""
    fam = socket.AF_INET6 if family_of(target[0]) == 6 else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        try:
            s.connect(target)
        except OSError as e:
            raise ProbeError(f"cannot reach {_endpoint(target)}: {e.strerror}") from None
        return str(s.getsockname()[0])


class _Driver:
    """Performs the engine's actions on sockets and feeds back what the responder says."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        target: tuple[str, int],
        key: wire.KeyLike,
        source: str,
        search: natlife.NatLifetimeSearch,
    ) -> None:
        self.loop = loop
        self.target = target
        self.key = key
        self.source = source
        self.search = search
        self.family = socket.AF_INET6 if family_of(target[0]) == 6 else socket.AF_INET
        self.sealer = wire.Sealer(key, secrets.randbits(64))
        self.guard = wire.ReplayGuard()
        self.slots: dict[int, socket.socket] = {}
        self.binding_txn: dict[int, int] = {}  # txn -> slot, for SendBinding
        self.wake = asyncio.Event()

    def perform(self, now: float) -> None:
        for action in self.search.actions_to_send(now):
            if isinstance(action, natlife.OpenSlot):
                self._open(action.slot)
            elif isinstance(action, natlife.CloseSlot):
                self._close(action.slot)
            elif isinstance(action, natlife.SendBinding | natlife.SendCondition):
                txn = secrets.randbits(64)
                if isinstance(action, natlife.SendBinding):
                    self.binding_txn[txn] = action.slot
                body: wire.Body = wire.BindingRequest(txn)
                self._send(action.slot, body, now)
            elif isinstance(action, natlife.Arm):
                body = wire.ArmRequest(
                    action.token, action.gap_s, action.copies, action.from_other_port
                )
                self._send(action.slot, body, now)

    def _open(self, slot: int) -> None:
        sock = socket.socket(self.family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind((self.source, 0))
        self.slots[slot] = sock
        self.loop.add_reader(sock.fileno(), self.wake.set)

    def _close(self, slot: int) -> None:
        sock = self.slots.pop(slot, None)
        if sock is not None:
            self.loop.remove_reader(sock.fileno())
            sock.close()

    def close_all(self) -> None:
        for slot in list(self.slots):
            self._close(slot)

    def _send(self, slot: int, body: wire.Body, now: float) -> None:
        sock = self.slots.get(slot)
        if sock is None:
            return
        packet = self.sealer.seal(body, time.time(), pad_to=wire.min_len(body))
        try:
            sock.sendto(packet, self.target)
        except OSError:
            self.search.on_send_error(slot, now)

    def receive(self, now: float) -> None:
        for slot, sock in list(self.slots.items()):
            while slot in self.slots:
                try:
                    data, addr = sock.recvfrom(65535)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    continue  # ICMP about an earlier packet: the engine times it out
                self._handle(slot, sock, data, addr, now)

    def _handle(
        self, slot: int, sock: socket.socket, data: bytes, addr: tuple[str, int], now: float
    ) -> None:
        try:
            message = wire.decode(data, self.key)
            self.guard.check(message, time.time())
        except wire.WireError:
            return
        body = message.body
        if isinstance(body, wire.BindingReply):
            binding_slot = self.binding_txn.pop(body.txn, None)
            if binding_slot == slot:
                local = sock.getsockname()
                self.search.on_binding(
                    slot, (str(body.address), body.port), (str(local[0]), local[1]), now
                )
            else:
                self.search.on_reply(slot, now)
        elif isinstance(body, wire.Armed):
            self.search.on_armed(slot, body.token, now)
        elif isinstance(body, wire.Fire):
            self.search.on_fire(slot, body.token, now, from_other_port=addr[1] != self.target[1])


async def measure_nat(
    target: tuple[str, int],
    key: wire.KeyLike,
    *,
    source: str | None = None,
    max_lifetime_s: float = 300.0,
    progress: Callable[[float, int], None] | None = None,
) -> NatReport:
    loop = asyncio.get_running_loop()
    source = source or local_address_towards(target)
    config = natlife.NatSearchConfig(max_lifetime_s=max_lifetime_s)
    search = natlife.NatLifetimeSearch(random.Random(), config)
    driver = _Driver(loop, target, key, source, search)
    started = loop.time()
    try:
        search.start(started)
        while True:
            now = loop.time()
            driver.receive(now)
            timer = search.get_timer()
            if timer is not None and now >= timer:
                search.handle_timer(now)
            driver.perform(now)
            event = search.next_event()
            if isinstance(event, natlife.NatResult):
                return _report(event)
            if isinstance(event, natlife.NatFailed):
                raise ProbeError(
                    f"no authenticated reply from {_endpoint(target)} ({event.reason}): is "
                    "`fleetvpn probe responder` running there with the same probe key?"
                )
            if progress is not None:
                progress(now - started, len(driver.slots))
            timer = search.get_timer()
            wait = 1.0 if timer is None else min(1.0, timer - loop.time())
            driver.wake.clear()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(driver.wake.wait(), wait)
    finally:
        driver.close_all()


def _report(result: natlife.NatResult) -> NatReport:
    return NatReport(
        nat=result.nat,
        mapped_address=_endpoint(result.mapped_address),
        local_address=_endpoint(result.local_address),
        stateful_filter=result.stateful_filter,
        mapping_lifetime_s=result.mapping_lifetime_s,
        resolution_s=result.resolution_s,
        keepalive_s=result.keepalive_s,
        elapsed_s=result.elapsed_s,
        mappings_used=result.mappings_used,
        reason=result.reason,
    )

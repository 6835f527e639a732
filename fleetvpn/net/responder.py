"""The probe responder: answers PMTU probes and NAT binding / arm requests on UDP.

Contract:
- ``Responder(key)`` is an asyncio datagram protocol; :func:`serve` binds it (and a second,
  "other port" socket used to fire from a port the client never contacted) and returns a
  :class:`ResponderHandle`.
- Every datagram is rate-limited per source address, decoded and authenticated, and checked
  against replay. Anything that fails is counted in ``counters`` and gets **no** answer: the
  responder is silent towards what it cannot authenticate.
- A reply is never larger than its request (the wire format guarantees it, fires included), so
  the responder cannot be used as an amplifier.
- An arm request schedules ``copies`` fires, ``FIRE_SPACING_S`` apart, starting ``gap_s`` after
  its receipt, to the request's source; a new arm from the same source replaces the schedule
  (the NAT engine relies on this).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import secrets
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from fleetvpn.net import wire

log = logging.getLogger("fleetvpn.responder")

FIRE_SPACING_S = 0.033  # NatSearchConfig.copy_spacing_s must match
RATE_PER_S = 400.0  # datagrams per second per source IP: a PMTU round is ~50 probes
BURST = 200.0
MAX_ARMED_SOURCES = 4096

Addr = tuple[str, int]


def source_ip(
    addr: tuple[str, int] | tuple[str, int, int, int],
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(addr[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # a dual-stack socket sees IPv4 peers as ::ffff:a.b.c.d
    return ip


class Responder(asyncio.DatagramProtocol):
    def __init__(self, key: wire.KeyLike) -> None:
        self.key = key
        self.sealer = wire.Sealer(key, secrets.randbits(64))
        self.guard = wire.ReplayGuard()
        self.limiter = wire.RateLimiter(RATE_PER_S, BURST)
        self.counters = wire.Counters()
        self.transport: asyncio.DatagramTransport | None = None
        self.other: asyncio.DatagramTransport | None = None  # fires "from another port"
        self._armed: OrderedDict[Addr, list[asyncio.TimerHandle]] = OrderedDict()

    def set_key(self, key: wire.KeyLike) -> None:
        """A new key ring (a rotation's step): accepted at once, and it seals what this
        responder sends on its own (replies carry the key of their request)."""
        self.key = key
        self.sealer.rekey(key)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        ip = source_ip(addr)
        if not self.limiter.allow(ip, loop.time()):
            self.counters.record_rate_limited()
            return
        try:
            message, matched = wire.decode_keyed(data, self.key)
            self.guard.check(message, time.time())
        except wire.WireError as e:
            self.counters.record(e)
            return
        reply = wire.reply_to(message, ip, addr[1])
        if reply is None:  # a reply or a fire sent to us: not ours to answer
            self.counters.record(wire.Malformed("not a request"))
            return
        self.counters.record(None)
        self._send(self.transport, reply, addr, matched)
        if isinstance(message.body, wire.ArmRequest):
            self._arm(message.body, (addr[0], addr[1]), matched)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP about a client that went away: nothing to do

    def _send(
        self, transport: asyncio.DatagramTransport | None, body: wire.Body, addr: Addr, key: bytes
    ) -> None:
        """Replies are sealed with the key their request used (a key rotation's overlap)."""
        if transport is not None and not transport.is_closing():
            transport.sendto(self.sealer.seal(body, time.time(), key=key), addr)

    def _arm(self, arm: wire.ArmRequest, addr: Addr, key: bytes) -> None:
        for handle in self._armed.pop(addr, []):
            handle.cancel()
        while len(self._armed) >= MAX_ARMED_SOURCES:
            _, handles = self._armed.popitem(last=False)
            for handle in handles:
                handle.cancel()
        loop = asyncio.get_running_loop()
        transport = self.other if arm.other_port else self.transport
        self._armed[addr] = [
            loop.call_later(arm.gap_s + i * FIRE_SPACING_S, self._send, transport, fire, addr, key)
            for i, fire in enumerate(wire.fires_for(arm))
        ]

    def close(self) -> None:
        for handles in self._armed.values():
            for handle in handles:
                handle.cancel()
        self._armed.clear()
        for t in (self.transport, self.other):
            if t is not None:
                t.close()


@dataclass
class ResponderHandle:
    protocol: Responder
    address: Addr
    other_address: Addr

    def close(self) -> None:
        self.protocol.close()


class _Sink(asyncio.DatagramProtocol):
    """The other-port socket only sends; whatever reaches it is dropped."""


async def follow_key_file(path: Path, protocol: Responder, every_s: float = 5.0) -> None:
    """Re-read the probe key file whenever it changes (a key rotation's step, written by
    ``fleetvpn probe rotate-key`` or copied by Ansible) and answer with the new ring from then
    on — a key the file dropped still accepted for its grace (:class:`KeyFollower`); a file
    that does not read as a key ring is logged and the last good ring kept. Runs until
    cancelled."""
    from fleetvpn.net.keys import KeyFileError, KeyFollower, load_key

    loop = asyncio.get_running_loop()
    key = protocol.key
    follower = KeyFollower(key if isinstance(key, wire.KeyRing) else wire.KeyRing((key,)))

    def signature() -> tuple[int, int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    seen = signature()
    while True:
        await asyncio.sleep(every_s)
        accepted = follower.ring(loop.time())
        now = signature()
        if now != seen:
            seen = now
            try:
                ring = await asyncio.to_thread(load_key, path)
            except KeyFileError as e:
                log.warning("probe key not reloaded, the last good one kept: %s", e)
            else:
                accepted = follower.update(ring, loop.time())
                log.info(
                    "probe key reloaded from %s: %d key(s), %d retired one(s) still accepted",
                    path, len(ring.keys), len(accepted.keys) - len(ring.keys),
                )  # fmt: skip
        if accepted != protocol.key:
            protocol.set_key(accepted)


async def serve(listen: Addr, key: wire.KeyLike) -> ResponderHandle:
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
    protocol = Responder(key)
    transport, _ = await loop.create_datagram_endpoint(
        lambda: protocol, local_addr=listen, family=family
    )
    other, _ = await loop.create_datagram_endpoint(_Sink, local_addr=(listen[0], 0), family=family)
    protocol.other = other
    bound = transport.get_extra_info("sockname")
    other_bound = other.get_extra_info("sockname")
    return ResponderHandle(protocol, (bound[0], bound[1]), (other_bound[0], other_bound[1]))

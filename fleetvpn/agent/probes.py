"""The agent's probing adapters: its responder, reverse PMTU runs, RTT/loss through the tunnel.

Path MTU has a direction, and one ``measure_pmtu`` run measures only sender → responder (the
probes are large, each ack is small: a reply is never larger than its request). So node a's
report carries a → b, b's report carries b → a, and the controller sets each sender's route
from its own direction (policy_mtu). A peer b can probe a only if its probes can reach a's
responder — not when a is behind a NAT or a stateful firewall. The agents close that gap
themselves, without the controller:

1. Forward: every node probes each peer that has an endpoint (is dialable) on the peer's probe
   port, from an ephemeral port; its NAT lets the acks back in. That search is long-lived and
   watched between conclusions (:mod:`fleetvpn.agent.paths`).
2. Reverse ("probe me back"): a node without an endpoint of its own, after probing a dialable
   peer b, sends b a *hello* from its responder's socket: an authenticated BINDING_REQUEST
   whose txn is :func:`hello_tag` of its WireGuard public key. That packet opens a mapping
   a:probe_port ↔ b:probe_port in a's NAT (and b's answer makes it established). b's responder
   recognises the tag of one of its peers and b then probes a *from its own probe port*
   (a socket bound to it with SO_REUSEPORT and connected to the address the hello came from —
   Linux hands that connected socket the replies from there, the responder everything else),
   so the probes match the mapping and a's responder acks them. The probes keep the mapping
   alive while they run; nothing needs a keepalive in between. b reports b → a as its own
   measurement. A forged or replayed hello cannot get through (HMAC, replay window), and a
   real one costs b at most one run per peer per :class:`~fleetvpn.agent.schedule.ProbeBudget`.
3. Two nodes without endpoints have no tunnel (WireGuard has no NAT traversal), so no link
   to measure.

So every link with a tunnel is measured in both directions by its senders. The limit: all
agents use the same probe port (the desired state does not carry a peer's probe port).

RTT and loss go *through the tunnel*: a few small authenticated probes to the peer's responder
at its tunnel address (the responder listens on every address), so they measure what the
tunnel's users get, and the path the peer's handshakes keep open.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import socket
import time
from collections.abc import Callable
from typing import Final

from fleetvpn.agent.report import Rtt
from fleetvpn.net import dfsock, wire
from fleetvpn.net.pmtuprobe import PmtuReport, measure_pmtu
from fleetvpn.net.responder import Responder

HELLO_DOMAIN: Final = b"fleetvpn probe-me-back v1\0"
NAT_CHECK_DOMAIN: Final = b"fleetvpn nat-check v1\0"
RTT_PROBES: Final = 4
RTT_SPACING_S: Final = 0.2
RTT_TIMEOUT_S: Final = 2.0
RTT_PROBE_BYTES: Final = 128  # IP packet size of an RTT probe
PENDING_HELLO_S: Final = 8.0  # within the shortest NAT timeouts seen (10 s unreplied)
MAX_PENDING_HELLOS: Final = 256


def nat_check_tag(public_key: str) -> int:
    """The txn of a node's *NAT check* request: sent through the tunnel to a NATed peer whose
    mapping seems to expire under its keepalive (fleetvpn.engines.natwatch, side "outside"),
    asking it to measure its NAT again. A BINDING_REQUEST like a hello, another tag."""
    digest = hashlib.sha256(NAT_CHECK_DOMAIN + public_key.encode()).digest()
    return int.from_bytes(digest[:8], "big")


def hello_tag(public_key: str) -> int:
    """The txn a node puts in its hellos: derived from its WireGuard public key, so a peer knows
    who asks without any new wire format (and the tag reveals nothing the peer does not know)."""
    digest = hashlib.sha256(HELLO_DOMAIN + public_key.encode()).digest()
    return int.from_bytes(digest[:8], "big")


class AgentResponder(Responder):
    """The probe responder (fleetvpn.net.responder) plus the agent's two additions: it tells
    the agent about an authenticated hello from a known peer, and it sends this node's hellos.

    ``hello_tags``: tag → peer name (updated by the agent from the desired state);
    ``on_hello(peer, addr)`` is called for each accepted hello. A hello with a tag not known
    yet (a peer that enrolled after our last desired state) is kept for ``PENDING_HELLO_S``
    (at most ``MAX_PENDING_HELLOS``) and ``on_unknown()`` is called, so the agent can fetch the
    desired state; :meth:`set_hello_tags` then delivers the hellos that became known."""

    def __init__(self, key: wire.KeyLike, on_hello: Callable[[str, tuple[str, int]], None]) -> None:
        super().__init__(key)
        self.hello_tags: dict[int, str] = {}
        self.on_hello = on_hello
        self.on_unknown: Callable[[], None] | None = None
        self.pending: dict[int, tuple[tuple[str, int], float]] = {}
        self.own_tag: int | None = None
        self.hellos_sent = 0
        self.nat_check_tags: dict[int, str] = {}  # tag → peer name
        self.own_nat_check_tag: int | None = None
        self.on_nat_check: Callable[[str], None] | None = None

    def set_hello_tags(self, tags: dict[int, str]) -> None:
        self.hello_tags = tags
        now = time.monotonic()
        for tag, (addr, seen) in list(self.pending.items()):
            if now - seen > PENDING_HELLO_S:
                del self.pending[tag]
            elif tag in tags:
                del self.pending[tag]
                self.on_hello(tags[tag], addr)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            peek = wire.decode(data, self.key)
        except wire.WireError:
            peek = None
        body = peek.body if peek is not None else None
        if isinstance(body, wire.BindingReply) and body.txn in (
            self.own_tag,
            self.own_nat_check_tag,
        ):
            return  # the answer to our own hello or NAT check: it did its job
        accepted = self.counters.accepted
        super().datagram_received(data, addr)
        if self.counters.accepted == accepted or not isinstance(body, wire.BindingRequest):
            return
        asker = self.nat_check_tags.get(body.txn)
        if asker is not None:
            if self.on_nat_check is not None:
                self.on_nat_check(asker)
            return
        peer = self.hello_tags.get(body.txn)
        if peer is not None:
            self.on_hello(peer, (addr[0], addr[1]))
        elif body.txn not in self.pending and len(self.pending) < MAX_PENDING_HELLOS:
            self.pending[body.txn] = ((addr[0], addr[1]), time.monotonic())
            if self.on_unknown is not None:
                self.on_unknown()

    def send_hello(self, target: tuple[str, int], *, nat_check: bool = False) -> None:
        tag = self.own_nat_check_tag if nat_check else self.own_tag
        if self.transport is None or tag is None:
            return
        body = wire.BindingRequest(tag)
        packet = self.sealer.seal(body, time.time(), pad_to=wire.min_len(body))
        with contextlib.suppress(OSError):
            self.transport.sendto(packet, target)
            self.hellos_sent += 1


def _reuse_socket(family: int, port: int, host: str | None = None) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    if host is None:
        host = "::" if family == socket.AF_INET6 else "0.0.0.0"
    sock.bind((host, port))
    return sock


async def serve_responder(
    port: int,
    key: wire.KeyLike,
    on_hello: Callable[[str, tuple[str, int]], None],
    host: str = "0.0.0.0",
) -> tuple[AgentResponder, list[asyncio.DatagramTransport]]:
    """The responder on ``port`` of ``host`` (every IPv4 address; ``"::"``: every IPv6
    address, IPv6 only), with SO_REUSEPORT so reverse runs can send from the same port."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    protocol = AgentResponder(key, on_hello)
    main, _ = await loop.create_datagram_endpoint(
        lambda: protocol, sock=_reuse_socket(family, port, host)
    )
    other, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, local_addr=(host, 0), family=family
    )
    protocol.other = other
    return protocol, [main, other]


class ResponderSet:
    """This node's responders, one per address family (IPv6 where the host has it), seen by
    the agent as one: the same hello tags, hellos sent from the family of the target."""

    def __init__(self, v4: AgentResponder, v6: AgentResponder | None) -> None:
        self.v4 = v4
        self.v6 = v6

    def _all(self) -> list[AgentResponder]:
        return [self.v4] if self.v6 is None else [self.v4, self.v6]

    def set_hello_tags(self, tags: dict[int, str]) -> None:
        for r in self._all():
            r.set_hello_tags(tags)

    def set_on_unknown(self, callback: Callable[[], None]) -> None:
        for r in self._all():
            r.on_unknown = callback

    def set_own_tag(self, tag: int, nat_check: int | None = None) -> None:
        for r in self._all():
            r.own_tag = tag
            r.own_nat_check_tag = nat_check

    def set_nat_check(self, tags: dict[int, str], callback: Callable[[str], None]) -> None:
        """Who may ask this node to measure its NAT again (tag → peer), and what to call."""
        for r in self._all():
            r.nat_check_tags = tags
            r.on_nat_check = callback

    def send_nat_check(self, target: tuple[str, int]) -> None:
        """Ask the peer at ``target`` (its tunnel address) to measure its NAT again."""
        responder = self.v6 if ":" in target[0] else self.v4
        if responder is not None:
            responder.send_hello(target, nat_check=True)

    def set_key(self, key: wire.KeyLike) -> None:
        """A reloaded probe key ring (SIGHUP during a rotation): what peers send with the new
        key is answered, and hellos are sealed with it."""
        for r in self._all():
            r.set_key(key)

    def send_hello(self, target: tuple[str, int]) -> None:
        responder = self.v6 if ":" in target[0] else self.v4
        if responder is not None:
            responder.send_hello(target)


async def serve_responders(
    port: int, key: wire.KeyLike, on_hello: Callable[[str, tuple[str, int]], None]
) -> tuple[ResponderSet, list[asyncio.DatagramTransport]]:
    v4, transports = await serve_responder(port, key, on_hello)
    v6 = None
    try:
        v6, more = await serve_responder(port, key, on_hello, host="::")
        transports += more
    except OSError:  # no IPv6 on this host: IPv4 only
        pass
    return ResponderSet(v4, v6), transports


async def measure_reverse(
    target: tuple[str, int], key: wire.KeyLike, port: int, timeout_s: float, host: str | None = None
) -> PmtuReport:
    """Probe ``target`` (the address a hello came from) from our own probe ``port``."""
    family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
    sock = _reuse_socket(family, port, host)
    try:
        sock.connect(target)
    except OSError:
        sock.close()
        raise
    return await measure_pmtu(target, key, timeout_s=timeout_s, sock=sock)


async def measure_rtt(
    target: tuple[str, int],
    key: wire.KeyLike,
    *,
    probes: int = RTT_PROBES,
    spacing_s: float = RTT_SPACING_S,
    timeout_s: float = RTT_TIMEOUT_S,
    full_size: int | None = None,
) -> Rtt:
    """``probes`` small authenticated probes to the responder at ``target``; the smallest RTT of
    those answered (the path, not the queue), and the share unanswered after ``timeout_s``.

    ``full_size``: also send one DF probe of that many bytes (the route MTU towards the peer,
    through the tunnel): ``Rtt.full_size_lost`` then says whether it vanished. Lost while the
    small ones arrive means the tunnel's packets no longer fit the path (a black hole opened
    under the configured MTU)."""
    loop = asyncio.get_running_loop()
    v6 = ":" in target[0]
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sealer = wire.Sealer(key, secrets.randbits(64))
    guard = wire.ReplayGuard()
    sizes = [RTT_PROBE_BYTES] * probes + ([full_size] if full_size else [])
    sent_at: dict[int, float] = {}  # probe id -> when sent, until answered
    base = secrets.randbits(31)
    large_id = base + probes if full_size else None
    large_acked = False
    sent = 0
    rtts: list[float] = []
    wake = asyncio.Event()
    try:
        sock.connect(target)
        if full_size:
            dfsock.set_probe_mode(sock)
        loop.add_reader(sock.fileno(), wake.set)
        next_send = loop.time()
        deadline: float | None = None
        while True:
            now = loop.time()
            if sent < len(sizes) and now >= next_send:
                probe_id = base + sent
                packet = sealer.seal(
                    wire.PmtuProbe(probe_id),
                    time.time(),
                    pad_to=wire.udp_payload_len(sizes[sent], 6 if v6 else 4),
                )
                sent += 1
                sent_at[probe_id] = now
                with contextlib.suppress(OSError):  # EMSGSIZE: over the route MTU: lost
                    sock.send(packet)
                next_send = now + spacing_s
                if sent == len(sizes):
                    deadline = now + timeout_s
            while True:
                try:
                    data = sock.recv(2048)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    if full_size:
                        dfsock.read_errors(sock)
                    continue  # ICMP (port unreachable …): the probe counts as lost
                try:
                    message = wire.decode(data, key)
                    guard.check(message, time.time())
                except wire.WireError:
                    continue
                if isinstance(message.body, wire.PmtuAck):
                    started = sent_at.pop(message.body.probe_id, None)
                    if started is None:
                        continue
                    if message.body.probe_id == large_id:
                        large_acked = True
                    else:
                        rtts.append(loop.time() - started)
            if not sent_at and sent == len(sizes):
                break
            if deadline is not None and loop.time() >= deadline:
                break
            wait = (deadline if deadline is not None else next_send) - loop.time()
            wake.clear()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), wait)
    finally:
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(sock.fileno())
        sock.close()
    return Rtt(
        rtt_s=min(rtts) if rtts else None,
        loss_ratio=1.0 - len(rtts) / probes,
        sent=probes,
        measured_at=time.time(),
        full_size=full_size,
        full_size_lost=None if not full_size else not large_acked,
    )

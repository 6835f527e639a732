"""The socket side of one :class:`~fleetvpn.agent.pathkeeper.PathKeeper`: a connected DF probe
socket to the peer's responder, the loop's reader for its acks and errors, and one
``loop.call_at`` at the keeper's timer (style rule 3). Thin: every decision is the keeper's.

Contract: ``PeerPathAdapter(keeper, sock, key, on_action)`` takes a UDP socket connected to the
peer's probe port (:func:`probe_socket` makes one); :meth:`start` runs the first search;
:meth:`on_sample` feeds a `wg show dump` sample (the loop's clock: ``time.monotonic()``);
:meth:`close` stops everything and closes the socket. ``on_action(peer, action)`` receives
the keeper's actions; it must not call back into the adapter synchronously (schedule work).

Whether fragments cross (issue 12 item 9): after a search finds an IPv4 path MTU below the local
link's, the adapter sends one probe of the local link's size with DF clear — the path's routers
must fragment it — up to :data:`FRAGMENT_TRIES` times, :data:`FRAGMENT_WAIT_S` apart, and reports
:class:`FragmentsCross` (an ack: they cross; none: they do not) through ``on_action``.

What goes in: authenticated acks (replays and forgeries dropped) → ``on_ack``; a local EMSGSIZE
at send (the error queue says it is local) → ``on_local_too_big`` with the route MTU it gives;
an ICMP too-big from the error queue → ``on_icmp_too_big``. Any other send error (unreachable,
refused: no responder) loses the probe, which is what the engines expect of a dead path.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from fleetvpn.agent.pathkeeper import KeeperAction, Measured, PathKeeper
from fleetvpn.engines.pmtu import Probe
from fleetvpn.net import dfsock, wire

log = logging.getLogger("fleetvpn.agent")

MAX_CEILING = 9000  # as fleetvpn.net.pmtuprobe: jumbo frames; a larger local MTU is capped
FRAGMENT_TRIES: Final = 3
FRAGMENT_WAIT_S: Final = 1.0
FRAGMENT_PROBE_ID: Final = 0xFFFF_FFFF  # the keeper's searches number their probes from 0


@dataclass(frozen=True, slots=True)
class FragmentsCross:
    """A DF-clear probe of ``size`` bytes, above the path MTU, came back in fragments or not."""

    crossed: bool
    size: int
    path_mtu: int


AdapterAction = KeeperAction | FragmentsCross


def probe_socket(target: tuple[str, int]) -> socket.socket:
    """A non-blocking UDP socket connected to ``target``, in DF probe mode (raises OSError)."""
    family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.connect(target)
        dfsock.set_probe_mode(sock)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def local_ceiling(sock: socket.socket) -> int:
    """The largest interface MTU (not IP_MTU, which includes a cached PMTU: it would hide an
    increase), capped at :data:`MAX_CEILING`."""
    return min(max(dfsock.interface_mtus().values(), default=dfsock.local_mtu(sock)), MAX_CEILING)


class PeerPathAdapter:
    def __init__(
        self,
        keeper: PathKeeper,
        sock: socket.socket,
        key: wire.KeyLike,
        on_action: Callable[[str, AdapterAction], None],
    ) -> None:
        self.keeper = keeper
        self.sock = sock
        self.key = key
        self.on_action = on_action
        self.family = 6 if sock.family == socket.AF_INET6 else 4
        self.sealer = wire.Sealer(key, secrets.randbits(64))
        self.guard = wire.ReplayGuard()
        self.loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._fragments: tuple[int, int, asyncio.TimerHandle | None] | None = None  # size, path
        self._fragments_path: int | None = None  # the path MTU last checked (once per value)

    def start(self) -> None:
        self.loop.add_reader(self.sock.fileno(), self._readable)
        self.keeper.start(self.loop.time())
        self._pump()

    def on_sample(
        self, now: float, *, tx_bytes: int, rx_bytes: int, latest_handshake: float | None
    ) -> None:
        if self._closed:
            return
        self.keeper.on_sample(
            now, tx_bytes=tx_bytes, rx_bytes=rx_bytes, latest_handshake=latest_handshake
        )
        self._pump()

    def set_key(self, key: wire.KeyLike) -> None:
        """A new probe key (SIGHUP): probes are sealed and acks checked with it from now on."""
        self.key = key
        self.sealer.rekey(key)  # the same sender id and counter: replay windows carry on

    def search(self, reason: str) -> None:
        if not self._closed:
            self.keeper.search(self.loop.time(), reason)
            self._pump()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.keeper.close()
        if self._timer is not None:
            self._timer.cancel()
        if self._fragments is not None and self._fragments[2] is not None:
            self._fragments[2].cancel()
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()

    # --- the loop's callbacks ---------------------------------------------------------------
    def _readable(self) -> None:
        now = self.loop.time()
        self._read_errors(now)
        while True:
            try:
                data = self.sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # refused (no responder yet), or an error queued: read it
                self._read_errors(now)
                continue
            try:
                message = wire.decode(data, self.key)
                self.guard.check(message, time.time())
            except wire.WireError:
                continue  # not for us, forged or replayed: an ack must prove itself
            if isinstance(message.body, wire.PmtuAck):
                if message.body.probe_id == FRAGMENT_PROBE_ID:
                    self._fragments_done(crossed=True)
                    continue
                self.keeper.on_ack(message.body.probe_id, now)
        self._pump()

    def _on_timer(self) -> None:
        self._timer = None
        if self._closed:
            return
        self.keeper.handle_timer(self.loop.time())
        self._pump()

    # --- internals ------------------------------------------------------------------------
    def _pump(self) -> None:
        if self._closed:
            return
        now = self.loop.time()
        for _ in range(4):  # a local refusal may decide a round and queue the next one
            probes = self.keeper.probes_to_send(now)
            if not probes:
                break
            for probe in probes:
                self._send(probe, now)
        while (action := self.keeper.next_action()) is not None:
            self.on_action(self.keeper.peer, action)
            if isinstance(action, Measured):
                self._check_fragments(action.path_mtu)
        deadline = self.keeper.get_timer()
        if self._timer is not None and (deadline is None or self._timer.when() != deadline):
            self._timer.cancel()
            self._timer = None
        if deadline is not None and self._timer is None:
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _send(self, probe: Probe, now: float) -> None:
        payload = self.sealer.seal(
            wire.PmtuProbe(probe.probe_id),
            time.time(),
            pad_to=wire.udp_payload_len(probe.size, self.family),
        )
        # EMSGSIZE means "over the local MTU" or "an ICMP too-big is pending": the error
        # queue says which (its entries carry their origin); a pending one is consumed, retry.
        for _attempt in range(2):
            try:
                self.sock.send(payload)
                return
            except OSError as e:
                if e.errno != errno.EMSGSIZE:
                    return  # unreachable, refused: the probe is lost
                local = self._read_errors(now)
                if local is not None:
                    self.keeper.on_local_too_big(probe.probe_id, now, local or None)
                    return

    def _check_fragments(self, path_mtu: int) -> None:
        """Start the fragment check (module docstring) for a path MTU just measured."""
        if self.family != 4 or self._fragments is not None or path_mtu == self._fragments_path:
            return
        try:
            size = local_ceiling(self.sock)
        except OSError:
            return
        if size <= path_mtu:
            return  # nothing on the way is smaller than this link: nothing to fragment
        self._fragments = (size, path_mtu, None)
        self._fragment_try(FRAGMENT_TRIES)

    def _fragment_try(self, left: int) -> None:
        if self._closed or self._fragments is None:
            return
        size, path_mtu, _ = self._fragments
        if left == 0:
            self._fragments_done(crossed=False)
            return
        payload = self.sealer.seal(
            wire.PmtuProbe(FRAGMENT_PROBE_ID), time.time(), pad_to=wire.udp_payload_len(size, 4)
        )
        with contextlib.suppress(OSError):  # lost, like any probe
            dfsock.send_fragmentable(self.sock, payload)
        handle = self.loop.call_later(FRAGMENT_WAIT_S, self._fragment_try, left - 1)
        self._fragments = (size, path_mtu, handle)

    def _fragments_done(self, *, crossed: bool) -> None:
        if self._fragments is None:
            return
        size, path_mtu, handle = self._fragments
        if handle is not None:
            handle.cancel()
        self._fragments = None
        self._fragments_path = path_mtu
        self.on_action(self.keeper.peer, FragmentsCross(crossed, size, path_mtu))

    def _read_errors(self, now: float) -> int | None:
        """Feed queued ICMP too-big errors to the keeper; the MTU of a local refusal, if any."""
        local: int | None = None
        for err in dfsock.read_errors(self.sock):
            if err.too_big and err.from_icmp:
                self.keeper.on_icmp_too_big(err.mtu, now)
            elif err.too_big:
                local = err.mtu
        return local

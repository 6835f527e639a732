"""The agent's standing watch over its paths (issue 12): per peer with an endpoint, a long-lived
:class:`~fleetvpn.agent.pathkeeper.PathKeeper` on its own probe socket (replacing the periodic
PMTU run); per keepalived peer of a node behind a NAT, a :class:`~fleetvpn.engines.natwatch.
NatWatch`; and the :class:`~fleetvpn.agent.localmtu.LocalHolds` a confirmed decrease makes.

Contract (:class:`PathSupervisor`, driven by the daemon on its loop):

- :meth:`sync` (after every desired state): adapters for the peers with an endpoint (resolved
  by the port; a moved endpoint gets a new socket and a new search), NAT watches for the peers
  this node keeps a mapping open to (``nated`` and a keepalive), everything else closed.
- :meth:`sample` (every ``SAMPLE_S``): one `wg show dump` of the interface, on the monotonic
  clock, to the keepers and NAT watches.
- :meth:`measured`: a path MTU measured (by a keeper, or a reverse run): recorded, a decrease
  held locally at once (and applied), a change reported at once.
- What it asks of the agent goes through :class:`AgentPort` (record, apply, report, NAT
  re-measurement, hello, resolve); nothing here touches the tunnel itself.
"""

from __future__ import annotations

import logging
import random
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from fleetvpn.agent.desired import Desired
from fleetvpn.agent.localmtu import LocalHolds
from fleetvpn.agent.pathkeeper import (
    LowerNow,
    Measured,
    Note,
    PathKeeper,
    SearchSlots,
    Unreachable,
)
from fleetvpn.agent.pathwatch_adapter import (
    AdapterAction,
    FragmentsCross,
    PeerPathAdapter,
    local_ceiling,
    probe_socket,
)
from fleetvpn.agent.schedule import ProbeBudget
from fleetvpn.engines.natwatch import NatRemeasure, NatShrinkSuspected, NatWatch
from fleetvpn.net import wire
from fleetvpn.wg.state import PeerStatus, TunnelSpec

log = logging.getLogger("fleetvpn.agent")

MAX_SEARCHES: Final = 2  # PMTU searches at once, whatever the number of peers


class AgentPort(Protocol):
    """What the supervisor needs from the agent."""

    def spec(self) -> TunnelSpec | None: ...  # the controller's desired spec (uncapped)
    async def resolve(self, endpoint: str) -> tuple[tuple[str, int] | None, str]: ...
    def record(self, peer: str, family: int, path_mtu: int, reason: str, how: str) -> None: ...
    def apply_local(self, why: str) -> None: ...  # re-apply the desired state with the holds
    def report_now(self) -> None: ...
    def remeasure_nat(self, why: str) -> None: ...
    def measured_forward(self, peer: str, target: tuple[str, int]) -> None: ...  # hellos
    def record_fragments(self, peer: str, crossed: bool) -> None: ...
    def ask_nat_check(self, peer: str, why: str) -> None: ...  # through the tunnel


@dataclass
class _Peer:
    endpoint: str
    target: tuple[str, int]
    adapter: PeerPathAdapter


class PathSupervisor:
    def __init__(
        self,
        port: AgentPort,
        *,
        key: wire.KeyLike,
        probe_port: int,
        upkeep_s: float,
        budget: ProbeBudget,
        rng: random.Random,
        nated: bool,
    ) -> None:
        self.port = port
        self.key = key
        self.probe_port = probe_port
        self.upkeep_s = upkeep_s
        self.budget = budget
        self.rng = rng
        self.nated = nated
        self.peers: dict[str, _Peer] = {}
        self.nat_watches: dict[str, NatWatch] = {}  # side "nated": this node's NAT
        self.outside_watches: dict[str, NatWatch] = {}  # side "outside": a NATed peer's
        self.holds = LocalHolds()
        self.slots = SearchSlots(MAX_SEARCHES)
        # wall clock → monotonic, fixed once: a handshake time must map to the same value in
        # every sample (the watches compare them), so the offset is not re-read each time
        self.clock_offset = time.time() - time.monotonic()

    # --- peers ----------------------------------------------------------------------------
    async def sync(self, desired: Desired) -> None:
        wanted = {p.name: p for p in desired.peers if p.endpoint is not None}
        for name in [n for n in self.peers if n not in wanted]:
            self.peers.pop(name).adapter.close()
        for name, plan in wanted.items():
            assert plan.endpoint is not None
            known = self.peers.get(name)
            if known is not None and known.endpoint == plan.endpoint:
                continue
            address, why = await self.port.resolve(plan.endpoint)
            if address is None:
                log.warning("path watch towards %s not started: %s", name, why)
                continue
            target = (address[0], self.probe_port)
            if known is not None:
                if known.target == target:
                    known.endpoint = plan.endpoint
                    continue
                known.adapter.close()
                del self.peers[name]
            self._open(name, plan.endpoint, target)
        theirs = {p.name: p.peer_keepalive_s for p in desired.peers if p.peer_keepalive_s > 0}
        for name in [n for n in self.outside_watches if n not in theirs]:
            del self.outside_watches[name]
        for name, keepalive_s in theirs.items():
            watch = self.outside_watches.get(name)
            if watch is None:
                self.outside_watches[name] = NatWatch(keepalive_s=keepalive_s, side="outside")
            elif watch.keepalive_s != keepalive_s:
                watch.set_keepalive(keepalive_s, time.monotonic())
        keepalived = {p.name: p.keepalive_s for p in desired.peers if p.keepalive_s > 0}
        for name in [n for n in self.nat_watches if n not in keepalived or not self.nated]:
            del self.nat_watches[name]
        if self.nated:
            now = time.monotonic()
            for name, keepalive_s in keepalived.items():
                watch = self.nat_watches.get(name)
                if watch is None:
                    self.nat_watches[name] = NatWatch(keepalive_s=keepalive_s, side="nated")
                elif watch.keepalive_s != keepalive_s:
                    watch.set_keepalive(keepalive_s, now)

    def _open(self, peer: str, endpoint: str, target: tuple[str, int]) -> None:
        try:
            sock = probe_socket(target)
        except OSError as e:
            log.warning("path watch towards %s (%s:%d) not started: %s", peer, *target, e)
            return
        keeper = PathKeeper(
            peer,
            family=6 if sock.family == socket.AF_INET6 else 4,
            ceiling=local_ceiling(sock),
            budget=self.budget,
            rng=random.Random(self.rng.getrandbits(64)),
            upkeep_s=self.upkeep_s,
            slots=self.slots,
        )
        adapter = PeerPathAdapter(keeper, sock, self.key, self._on_action)
        self.peers[peer] = _Peer(endpoint, target, adapter)
        adapter.start()

    def set_key(self, key: wire.KeyLike) -> None:
        self.key = key
        for known in self.peers.values():
            known.adapter.set_key(key)

    def close(self) -> None:
        for known in self.peers.values():
            known.adapter.close()
        self.peers.clear()

    # --- evidence ---------------------------------------------------------------------------
    def sample(self, statuses: Sequence[PeerStatus], names: dict[str, str]) -> None:
        """``statuses`` from `wg show dump`; ``names``: public key → peer name."""
        now, offset = time.monotonic(), self.clock_offset
        for status in statuses:
            name = names.get(status.public_key)
            if name is None:
                continue
            handshake = status.latest_handshake - offset if status.latest_handshake else None
            known = self.peers.get(name)
            if known is not None:
                known.adapter.on_sample(now, tx_bytes=status.tx_bytes, rx_bytes=status.rx_bytes,
                                        latest_handshake=handshake)  # fmt: skip
            watch = self.nat_watches.get(name)
            if watch is not None:
                watch.on_sample(now, tx_bytes=status.tx_bytes, rx_bytes=status.rx_bytes,
                                latest_handshake=handshake, endpoint=status.endpoint)  # fmt: skip
                while (event := watch.next_event()) is not None:
                    if isinstance(event, NatRemeasure):
                        self.port.remeasure_nat(f"towards {name}: {event.reason}")
                    elif isinstance(event, NatShrinkSuspected):
                        log.info("NAT watch towards %s: %s", name, event.reason)
            outside = self.outside_watches.get(name)
            if outside is not None:
                outside.on_sample(now, tx_bytes=status.tx_bytes, rx_bytes=status.rx_bytes,
                                  latest_handshake=handshake, endpoint=status.endpoint)  # fmt: skip
                while (event := outside.next_event()) is not None:
                    # the mapping is the peer's NAT's: only the peer can measure it again
                    self.port.ask_nat_check(name, event.reason)

    # --- decisions ------------------------------------------------------------------------
    def _on_action(self, peer: str, action: AdapterAction) -> None:
        if isinstance(action, LowerNow):
            log.warning("path towards %s: %d no longer gets through: %s", peer,
                        action.lost_size, action.reason)  # fmt: skip
            self._hold(peer, action.assume_path_mtu, self._family(peer), final=False,
                       why=f"{action.lost_size} lost, search running: {action.reason}")  # fmt: skip
        elif isinstance(action, Measured):
            self.measured(peer, self._family(peer), action.path_mtu, action.previous,
                          action.reason, "forward")  # fmt: skip
            known = self.peers.get(peer)
            if known is not None:
                self.port.measured_forward(peer, known.target)
        elif isinstance(action, FragmentsCross):
            log.info("path towards %s: a %d-byte DF-clear probe over the %d path %s", peer,
                     action.size, action.path_mtu,
                     "came back: fragments cross" if action.crossed
                     else "never came back: fragments do not cross")  # fmt: skip
            self.port.record_fragments(peer, action.crossed)
        elif isinstance(action, Unreachable):
            log.warning("path towards %s: %s", peer, action.reason)
        elif isinstance(action, Note):
            log.info("path towards %s: %s", peer, action.reason)

    def _family(self, peer: str) -> int:
        known = self.peers.get(peer)
        return known.adapter.family if known is not None else 4

    def measured(
        self, peer: str, family: int, path_mtu: int, previous: int | None, reason: str, how: str
    ) -> None:
        self.port.record(peer, family, path_mtu, reason, how)
        if previous is None or previous == path_mtu:
            if peer in self.holds.holds and not self.holds.holds[peer].final:
                self._hold(peer, path_mtu, family, final=True, why=reason)  # the interim ends
            return
        log.info("path MTU towards %s: %d -> %d (%s): %s", peer, previous, path_mtu, how, reason)
        if path_mtu < previous or peer in self.holds.holds:
            self._hold(peer, path_mtu, family, final=True, why=reason)
        self.port.report_now()

    def _hold(self, peer: str, path_mtu: int, family: int, *, final: bool, why: str) -> None:
        spec = self.port.spec()
        if spec is None:
            return
        before = self.holds.holds.get(peer)
        held = self.holds.hold(peer, path_mtu=path_mtu, family=family, spec=spec, final=final,
                               why=why, now=time.monotonic())  # fmt: skip
        if held is None:
            if before is not None:
                self.port.apply_local(f"{peer}: the controller's route fits path MTU {path_mtu}")
            return
        if before is None or before.route_mtu != held.route_mtu:
            self.port.apply_local(f"{peer}: {held.reason}")

    def reported(self, built_at: float) -> None:
        """A report built at ``built_at`` (monotonic) reached the controller."""
        self.holds.reported(built_at, time.monotonic())

    def recheck(self, peer: str, why: str) -> None:
        known = self.peers.get(peer)
        if known is not None:
            known.adapter.search(why)

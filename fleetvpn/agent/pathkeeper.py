"""One peer's path MTU, kept: the PMTU search and the path watch glued together with the probe
budget. Sans-IO, sans-clock (every input carries ``now``), like the engines it drives; the
socket side is :mod:`fleetvpn.agent.pathwatch_adapter`.

Contract (the adapter's side; one keeper per peer, for the direction this node sends)::

    keeper = PathKeeper("hub", family=4, ceiling=1500, budget=budget, rng=rng)
    keeper.start(now)                                   # the first search, budget permitting
    after every input call:
        for probe in keeper.probes_to_send(now): ...    # DF, probe.size bytes of IP packet
        while (action := keeper.next_action()) is not None: ...
        arm one timer at keeper.get_timer(); when it fires -> keeper.handle_timer(now)
    inputs: on_ack(probe_id, now), on_local_too_big(probe_id, now, mtu_hint),
            on_icmp_too_big(mtu, now), on_sample(now, tx_bytes=…, rx_bytes=…, latest_handshake=…)

Actions, each with its reason:

* :class:`LowerNow` — the watch confirmed that the path no longer carries the value: lower the
  route at once so that it fits ``assume_path_mtu`` (the search floor, or the local route MTU
  that refused a probe) while the search below the lost size runs.
* :class:`Measured` — a search concluded (the first one, after a decrease, an increase, or the
  long schedule). ``previous`` is the value before it (None for the first).
* :class:`Unreachable` — not even the floor got through (the search retries on its interval).
* :class:`Note` — for the log only (suspected, cleared, a search postponed by the budget).

Who does what: the watch does the upkeep (the value, value + 1, every ``upkeep_s``) and the
black-hole watch; the search runs only when the watch asks (decrease: search below the lost
size; increase: search above the acked size; the long schedule: from scratch) — its own
maintenance checks are never run (its timer is ignored once it is done). Every search start
passes the :class:`~fleetvpn.agent.schedule.ProbeBudget` (shared with reverse runs) and takes
one of the :class:`SearchSlots` shared by every peer (a fleet of searches at once loses its own
probes in the bursts); a refused one waits (for the budget, or 1 s for a slot; a later request
replaces it; a decrease outranks the rest).
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Final, Literal

from fleetvpn.agent.schedule import ProbeBudget
from fleetvpn.engines.pathwatch import (
    DecreaseCleared,
    DecreaseConfirmed,
    DecreaseSuspected,
    FullSearchDue,
    IncreaseSeen,
    PathWatch,
    WatchConfig,
)
from fleetvpn.engines.pmtu import PmtuBelowFloor, PmtuFound, PmtuSearch, PmtuState, Probe

CONTROL_SIZE: Final = {4: 82, 6: 102}  # the smallest authenticated probe (IP bytes)

SearchKind = Literal["below", "above", "full"]


@dataclass(frozen=True, slots=True)
class LowerNow:
    lost_size: int
    assume_path_mtu: int
    reason: str


@dataclass(frozen=True, slots=True)
class Measured:
    path_mtu: int
    previous: int | None
    probes_sent: int
    elapsed_s: float
    reason: str


@dataclass(frozen=True, slots=True)
class Unreachable:
    reason: str


@dataclass(frozen=True, slots=True)
class Note:
    reason: str


KeeperAction = LowerNow | Measured | Unreachable | Note

_RANK: Final = {"below": 2, "full": 1, "above": 0}
SLOT_RETRY_S: Final = 1.0


@dataclass
class SearchSlots:
    """At most ``size`` searches at once, whatever the number of peers."""

    size: int = 2
    busy: set[str] = field(default_factory=set)

    def take(self, peer: str) -> bool:
        if peer not in self.busy and len(self.busy) >= self.size:
            return False
        self.busy.add(peer)
        return True

    def give(self, peer: str) -> None:
        self.busy.discard(peer)


@dataclass(slots=True)
class _Request:
    kind: SearchKind
    size: int
    reason: str
    at: float  # when the budget allows it


class PathKeeper:
    """The search + watch + budget of one peer (module docstring)."""

    def __init__(
        self,
        peer: str,
        *,
        family: int,
        ceiling: int,
        budget: ProbeBudget,
        rng: random.Random | None = None,
        upkeep_s: float = 600.0,
        full_search_s: float = 86400.0,
        probes_per_round: int = 15,
        slots: SearchSlots | None = None,
    ) -> None:
        self.peer = peer
        self.family = family
        self._budget = budget
        self._slots = slots if slots is not None else SearchSlots()
        rng = rng if rng is not None else random.Random()
        self._search = PmtuSearch(
            family,
            ceiling=ceiling,
            rng=rng,
            probes_per_round=probes_per_round,
            maintenance_interval_s=upkeep_s,  # only its below-floor retry: see the docstring
        )
        self._watch = PathWatch(
            ceiling=ceiling,
            rng=rng,
            config=WatchConfig(
                control_size=CONTROL_SIZE[family], upkeep_s=upkeep_s, full_search_s=full_search_s
            ),
        )
        self._actions: deque[KeeperAction] = deque()
        self._pending: _Request | None = None
        self._trigger = ""  # why the running search runs
        self._started_at = 0.0

    # ----------------------------------------------------------------- read-only view

    @property
    def path_mtu(self) -> int | None:
        return self._search.path_mtu

    @property
    def searching(self) -> bool:
        return self._search.state in (PmtuState.SEARCHING, PmtuState.CONFIRMING)

    @property
    def bytes_sent(self) -> int:
        return self._search.bytes_sent + self._watch.bytes_sent

    @property
    def watch_bytes_sent(self) -> int:
        return self._watch.bytes_sent

    @property
    def watch(self) -> PathWatch:
        return self._watch

    # ----------------------------------------------------------------- inputs

    def start(self, now: float) -> None:
        self._request(now, "full", 0, "initial search")

    def search(self, now: float, reason: str) -> None:
        """A search from scratch (a new path: the endpoint moved, the handshake went stale)."""
        self._request(now, "full", 0, reason)
        self._drain(now)

    def on_ack(self, probe_id: int, now: float) -> None:
        self._search.on_ack(probe_id, now)
        self._watch.on_ack(probe_id, now)
        self._drain(now)

    def on_local_too_big(self, probe_id: int, now: float, mtu_hint: int | None = None) -> None:
        self._search.on_local_too_big(probe_id, now, mtu_hint)
        self._watch.on_local_too_big(probe_id, now, mtu_hint)
        self._drain(now)

    def on_icmp_too_big(self, mtu: int, now: float) -> None:
        if self.searching:
            self._search.on_icmp_too_big(mtu, now)
        self._watch.on_icmp_too_big(mtu, now)
        self._drain(now)

    def on_sample(
        self, now: float, *, tx_bytes: int, rx_bytes: int, latest_handshake: float | None
    ) -> None:
        self._watch.on_sample(
            now, tx_bytes=tx_bytes, rx_bytes=rx_bytes, latest_handshake=latest_handshake
        )
        self._drain(now)

    def handle_timer(self, now: float) -> None:
        pending = self._pending
        if pending is not None and now >= pending.at:
            self._pending = None
            self._request(now, pending.kind, pending.size, pending.reason)
        if self._search.state is not PmtuState.DONE:
            self._search.handle_timer(now)
        self._watch.handle_timer(now)
        self._drain(now)

    # ----------------------------------------------------------------- outputs

    def probes_to_send(self, now: float) -> list[Probe]:
        return self._search.probes_to_send(now) + self._watch.probes_to_send(now)

    def next_action(self) -> KeeperAction | None:
        return self._actions.popleft() if self._actions else None

    def get_timer(self) -> float | None:
        times = [self._watch.get_timer()]
        if self._search.state is not PmtuState.DONE:
            times.append(self._search.get_timer())
        if self._pending is not None:
            times.append(self._pending.at)
        return min((t for t in times if t is not None), default=None)

    # ----------------------------------------------------------------- internals

    def close(self) -> None:
        """The peer is gone: give back the search slot."""
        self._slots.give(self.peer)

    def _request(self, now: float, kind: SearchKind, size: int, reason: str) -> None:
        if self.searching and kind != "below":
            return  # the running search answers it too
        if not self._slots.take(self.peer):
            pending = self._pending
            if pending is None or _RANK[kind] >= _RANK[pending.kind]:
                self._pending = _Request(kind, size, reason, now + SLOT_RETRY_S)
            return
        urgent = kind == "below"  # a confirmed decrease: the route is held low meanwhile
        why_not = self._budget.allow(self.peer, now, urgent=urgent)
        if why_not is not None:
            pending = self._pending
            if pending is None or _RANK[kind] >= _RANK[pending.kind]:
                at = self._budget.next_allowed(self.peer, now, urgent=urgent)
                self._pending = _Request(kind, size, reason, at)
                self._actions.append(
                    Note(f"search ({reason}) postponed {at - now:.0f} s: {why_not}")
                )
            self._slots.give(self.peer)
            return
        self._budget.spend(self.peer, now)
        self._trigger, self._started_at = reason, now
        if kind == "below":
            self._search.search_below(now, size, reason)
        else:  # "above" from a proven size; "full": from scratch (0 is below every floor)
            self._search.search_above(now, size if kind == "above" else 0, reason)

    def _drain(self, now: float) -> None:
        while (event := self._watch.next_event()) is not None:
            if isinstance(event, DecreaseConfirmed):
                floor = self._search.floor
                hint = event.known_good
                assume = hint if hint is not None and floor <= hint < event.size else floor
                self._actions.append(LowerNow(event.size, assume, event.reason))
                self._request(now, "below", event.size,
                              f"{event.size} no longer gets through ({event.reason})")  # fmt: skip
            elif isinstance(event, IncreaseSeen):
                self._request(now, "above", event.size, event.reason)
            elif isinstance(event, FullSearchDue):
                self._request(now, "full", 0, event.reason)
            elif isinstance(event, DecreaseSuspected | DecreaseCleared):
                self._actions.append(Note(event.reason))
        previous = self._watch.path_mtu
        while (found := self._search.next_event()) is not None:
            if isinstance(found, PmtuFound):
                self._watch.set_value(found.path_mtu, now)
                why = f"{self._trigger}: {found.reason}"
                self._actions.append(
                    Measured(found.path_mtu, previous, found.probes_sent, found.elapsed_s, why)
                )
                previous = found.path_mtu
                self._slots.give(self.peer)
            elif isinstance(found, PmtuBelowFloor):
                self._actions.append(Unreachable(f"{self._trigger}: {found.reason}"))
                self._slots.give(self.peer)

"""PathKeeper (search + watch + budget) on virtual time and a fake link (no sockets, no clock).

The link delivers a probe iff its size <= the path MTU at that moment and random loss spares it;
the ack comes back one RTT later (lost with the same probability). A fake tunnel gives the
`wg show dump` counters every 2 s: while busy, tx and rx grow when the route fits the path, and
only tx grows (retransmissions) when it does not. The fake agent takes LowerNow / Measured
as the daemon does (the route follows the latest value)."""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from fleetvpn.agent.pathkeeper import (
    LowerNow,
    Measured,
    Note,
    PathKeeper,
    SearchSlots,
    Unreachable,
)
from fleetvpn.agent.schedule import ProbeBudget


@dataclass
class Sim:
    mtu_at: Callable[[float], int]
    busy: Callable[[float], bool] = lambda t: False
    loss: float = 0.0
    rtt: float = 0.05
    seed: int = 1
    budget: ProbeBudget = field(default_factory=ProbeBudget)
    actions: list[tuple[float, object]] = field(default_factory=list)

    def run(self, until: float) -> PathKeeper:
        rng = random.Random(self.seed)
        keeper = PathKeeper("hub", family=4, ceiling=1500, budget=self.budget,
                            rng=random.Random(self.seed + 1), upkeep_s=600.0)  # fmt: skip
        acks: list[tuple[float, int]] = []
        tx = rx = 0
        route_fits_until: int | None = None  # the path MTU the route was set for
        now, next_sample = 0.0, 2.0
        keeper.start(now)
        while now < until:
            for probe in keeper.probes_to_send(now):
                lost = rng.random() < self.loss or rng.random() < self.loss
                if probe.size <= self.mtu_at(now) and not lost:
                    heapq.heappush(acks, (now + self.rtt, probe.probe_id))
            while (action := keeper.next_action()) is not None:
                self.actions.append((now, action))
                if isinstance(action, LowerNow):
                    route_fits_until = action.assume_path_mtu
                elif isinstance(action, Measured):
                    route_fits_until = action.path_mtu
            timer = keeper.get_timer()
            candidates = [next_sample, until]
            if timer is not None:
                candidates.append(max(timer, now))
            if acks:
                candidates.append(acks[0][0])
            now = min(candidates)
            if acks and acks[0][0] <= now:
                _, probe_id = heapq.heappop(acks)
                keeper.on_ack(probe_id, now)
            elif now >= next_sample:
                next_sample = now + 2.0
                if self.busy(now):
                    tx += 200_000
                    fits = route_fits_until is not None and route_fits_until <= self.mtu_at(now)
                    rx += 10_000 if fits else 0
                keeper.on_sample(now, tx_bytes=tx, rx_bytes=rx, latest_handshake=None)
            elif timer is not None and now >= timer:
                keeper.handle_timer(now)
        return keeper

    def of(self, kind: type) -> list[tuple[float, object]]:
        return [(t, a) for t, a in self.actions if isinstance(a, kind)]


def test_initial_search_then_a_decrease_on_a_busy_link_is_lowered_and_measured_fast() -> None:
    sim = Sim(mtu_at=lambda t: 1400 if t < 300 else 1360, busy=lambda t: True)
    keeper = sim.run(400.0)
    measured = sim.of(Measured)
    assert measured[0][1].path_mtu == 1400 and measured[0][1].previous is None  # type: ignore[attr-defined]
    lowered = sim.of(LowerNow)
    assert len(lowered) == 1
    t_lower, lower = lowered[0]
    assert isinstance(lower, LowerNow) and lower.lost_size == 1400
    assert lower.assume_path_mtu == 1200  # the IPv4 search floor until the search concludes
    assert 300 < t_lower <= 310, t_lower  # issue 12: within 10 s on a busy link
    t_found, found = measured[1]
    assert isinstance(found, Measured) and (found.path_mtu, found.previous) == (1360, 1400)
    assert t_found - 300 <= 15, t_found
    assert "no longer gets through" in found.reason
    assert keeper.path_mtu == 1360


def test_a_decrease_on_an_idle_link_is_found_by_the_upkeep_and_nothing_runs_meanwhile() -> None:
    sim = Sim(mtu_at=lambda t: 1400 if t < 100 else 1360)
    keeper = sim.run(2 * 3600.0)
    assert [a.path_mtu for _, a in sim.of(Measured)] == [1400, 1360]  # type: ignore[attr-defined]
    t_lower = sim.of(LowerNow)[0][0]
    assert t_lower <= 100 + 660 + 5  # idle: the upkeep (600 s ±10 %) finds it
    # idle upkeep after the start: the value and value + 1 every ~600 s, nothing else
    assert keeper.watch_bytes_sent < 20_000 * 2 + 4 * 1400 * 2


def test_five_percent_loss_for_a_day_never_lowers_anything() -> None:
    sim = Sim(mtu_at=lambda t: 1400, busy=lambda t: (t // 600) % 2 == 0, loss=0.05, seed=7)
    sim.run(24 * 3600.0)
    assert not sim.of(LowerNow)
    # the first search, and the long schedule's full search (daily, ±10 %): never another value
    assert {a.path_mtu for _, a in sim.of(Measured)} == {1400}  # type: ignore[attr-defined]
    assert len(sim.of(Measured)) <= 2
    assert not sim.of(Unreachable)


def test_an_increase_is_searched_from_the_acked_size() -> None:
    sim = Sim(mtu_at=lambda t: 1400 if t < 50 else 1500)
    sim.run(1500.0)
    measured = [a for _, a in sim.of(Measured)]
    assert [m.path_mtu for m in measured] == [1400, 1500]  # type: ignore[attr-defined]
    assert "the path grew" in measured[1].reason  # type: ignore[attr-defined]


def test_a_confirmed_decrease_searches_at_once_within_the_hourly_bound() -> None:
    """A confirmed decrease is urgent: its search waits only the budget's urgent gap (5 s), not
    the 30 s between ordinary runs; the route is lowered at once either way."""
    budget = ProbeBudget(max_per_hour=12, min_gap_s=30.0)
    sim = Sim(mtu_at=lambda t: 1400 if t < 5 else 1360, busy=lambda t: True, budget=budget)
    sim.run(120.0)
    t_lower, _ = sim.of(LowerNow)[0]
    assert t_lower < 20
    t_found, found = sim.of(Measured)[1]
    assert found.path_mtu == 1360 and t_found - t_lower < 10  # type: ignore[attr-defined]
    assert len(budget.runs["hub"]) == 2


def test_the_hourly_bound_postpones_a_search_but_not_the_local_lowering() -> None:
    budget = ProbeBudget(max_per_hour=1, min_gap_s=30.0)
    sim = Sim(mtu_at=lambda t: 1400 if t < 5 else 1360, busy=lambda t: True, budget=budget)
    sim.run(120.0)
    t_lower, _ = sim.of(LowerNow)[0]
    assert t_lower < 20  # at once, whatever the budget
    notes = [a.reason for _, a in sim.of(Note) if "postponed" in a.reason]  # type: ignore[attr-defined]
    assert notes and "in the last hour (the bound)" in notes[0]
    assert len(sim.of(Measured)) == 1 and len(budget.runs["hub"]) == 1


def test_probe_budget_next_allowed() -> None:
    b = ProbeBudget(max_per_hour=2, min_gap_s=30.0)
    assert b.next_allowed("hub", 0.0) == 0.0
    b.spend("hub", 0.0)
    assert b.next_allowed("hub", 10.0) == 30.0
    b.spend("hub", 100.0)
    assert b.next_allowed("hub", 200.0) == 3600.0
    assert b.allow("hub", 3599.0) is not None and b.allow("hub", 3600.0) is None
    # urgent runs (a confirmed decrease, a peer's hello) need only the urgent gap
    u = ProbeBudget(max_per_hour=12, min_gap_s=30.0, urgent_gap_s=5.0)
    u.spend("hub", 0.0)
    assert u.allow("hub", 6.0) is not None and u.allow("hub", 6.0, urgent=True) is None
    assert u.next_allowed("hub", 1.0, urgent=True) == 5.0


def test_idle_upkeep_costs_under_20_kb_per_hour() -> None:
    """Issue 12 item 7: PMTU upkeep and black-hole watch < 20 kB per peer per hour, idle."""
    sim = Sim(mtu_at=lambda t: 1400)
    keeper = sim.run(6 * 3600.0)
    per_hour = keeper.watch_bytes_sent / 6
    assert per_hour < 20_000, per_hour
    assert len(sim.of(Measured)) == 1  # no search after the first one


def test_search_slots_serialise_the_searches_of_many_peers() -> None:
    slots = SearchSlots(1)
    budget = ProbeBudget()
    a = PathKeeper("a", family=4, ceiling=1500, budget=budget, rng=random.Random(1), slots=slots)
    b = PathKeeper("b", family=4, ceiling=1500, budget=budget, rng=random.Random(2), slots=slots)
    a.start(0.0)
    b.start(0.0)
    assert a.probes_to_send(0.0) and not b.probes_to_send(0.0)
    assert b.get_timer() == 1.0
    b.handle_timer(1.0)
    assert not b.probes_to_send(1.0)  # a still searches
    a.close()  # a peer removed mid-search gives its slot back
    b.handle_timer(2.0)
    assert b.probes_to_send(2.0)

"""The targeted searches the path watch asks for (PmtuSearch.search_below / search_above), on
virtual time and a fake link: exact, quick, cheaper than a full search, and loss-proof."""

from __future__ import annotations

import heapq
import random

import pytest

from fleetvpn.engines.pmtu import PmtuChanged, PmtuEvent, PmtuFound, PmtuSearch


def drive(
    engine: PmtuSearch, mtu: int, now: float, loss: float = 0.0, seed: int = 0, rtt: float = 0.05
) -> tuple[float, list[PmtuEvent]]:
    """Run ``engine`` over a path of ``mtu`` until it concludes; returns (time, events)."""
    rng = random.Random(seed)
    acks: list[tuple[float, int]] = []
    events: list[PmtuEvent] = []
    while True:
        for probe in engine.probes_to_send(now):
            if probe.size <= mtu and rng.random() >= loss and rng.random() >= loss:
                heapq.heappush(acks, (now + rtt, probe.probe_id))
        while (event := engine.next_event()) is not None:
            events.append(event)
        if any(isinstance(e, PmtuFound) for e in events):
            return now, events
        timer = engine.get_timer()
        if acks and (timer is None or acks[0][0] <= timer):
            now, probe_id = heapq.heappop(acks)
            engine.on_ack(probe_id, now)
        else:
            assert timer is not None
            now = max(now, timer)
            engine.handle_timer(now)


def converged(seed: int = 1, mtu: int = 1400, ceiling: int = 1420) -> PmtuSearch:
    engine = PmtuSearch(4, ceiling=ceiling, rng=random.Random(seed))
    engine.start(0.0)
    drive(engine, mtu, 0.0)
    assert engine.path_mtu == mtu
    return engine


def test_full_search_cost_for_the_budget() -> None:
    engine = PmtuSearch(4, ceiling=1420, rng=random.Random(1))
    engine.start(0.0)
    drive(engine, 1400, 0.0)
    # one direction, k = 15: what the long-schedule full search costs (the budget counts 63 kB,
    # the agent's figure for its two-way run)
    assert engine.bytes_sent < 63_000


def test_search_below_finds_the_new_value_with_the_reason() -> None:
    engine = converged()
    spent = engine.bytes_sent
    end, events = drive_below(engine, 1300, 100.0)
    found = [e for e in events if isinstance(e, PmtuFound)]
    changed = [e for e in events if isinstance(e, PmtuChanged)]
    assert [f.path_mtu for f in found] == [1300]
    assert changed[0].old == 1400 and changed[0].new == 1300
    assert changed[0].reason.startswith("path watch: 1400 lost ×8 in 3 rounds")
    assert end - 100.0 <= 3.0
    assert engine.bytes_sent - spent < spent  # less than the first full search (55.6 kB)


def drive_below(engine: PmtuSearch, mtu: int, now: float, **kw: float) -> tuple[float, list]:
    engine.search_below(now, 1400, "path watch: 1400 lost ×8 in 3 rounds while 82 acked ×6")
    return drive(engine, mtu, now, **kw)


@pytest.mark.parametrize("mtu", [1399, 1360, 1300, 1280, 1200])
def test_search_below_is_exact_at_5_percent_loss(mtu: int) -> None:
    times = []
    for seed in range(40):
        engine = converged(seed)
        end, _ = drive_below(engine, mtu, 100.0, loss=0.05, seed=seed)
        assert engine.path_mtu == mtu, seed
        times.append(end - 100.0)
    assert max(times) <= 12.0, sorted(times)


def test_search_above_from_the_acked_size() -> None:
    engine = converged(mtu=1400, ceiling=1500)
    engine.search_above(50.0, 1401, "path watch: 1401 acked, above the path MTU 1400")
    end, events = drive(engine, 1492, 50.0)
    assert engine.path_mtu == 1492
    changed = [e for e in events if isinstance(e, PmtuChanged)]
    assert changed[0].reason.startswith("path watch: 1401 acked")
    assert end - 50.0 <= 3.0


def test_search_below_the_floor_or_before_start() -> None:
    engine = PmtuSearch(4, ceiling=1420, rng=random.Random(3))
    engine.search_below(0.0, 1100, "path watch")  # idle engine: starts; 1100 < floor ignored
    drive(engine, 1300, 0.0)
    assert engine.path_mtu == 1300

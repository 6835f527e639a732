"""Scheduling on virtual time: jitter spreads a fleet, re-probe triggers, the probe budget."""

from __future__ import annotations

import itertools
import random
import statistics

from fleetvpn.agent.schedule import PeerWatch, ProbeBudget, Scheduler


def run_until(s: Scheduler, end: float, step: float = 0.5) -> dict[str, list[float]]:
    runs: dict[str, list[float]] = {}
    now = 0.0
    while now <= end:
        for job in s.due(now):
            runs.setdefault(job, []).append(now)
        now += step
    return runs


def test_periods_are_jittered_around_the_interval() -> None:
    s = Scheduler(random.Random(1))
    s.add("pmtu:hub", 600.0, 0.0, first_within_s=10.0)
    runs = run_until(s, 24 * 3600.0)["pmtu:hub"]
    assert runs[0] <= 10.0
    gaps = [b - a for a, b in itertools.pairwise(runs)]
    assert all(540.0 - 0.5 <= g <= 660.0 + 0.5 for g in gaps)
    assert abs(statistics.mean(gaps) - 600.0) < 10.0
    assert statistics.pstdev(gaps) > 20.0  # really jittered, not a fixed period
    assert 130 <= len(runs) <= 160


def test_a_fleet_started_at_once_does_not_probe_in_lock_step() -> None:
    # 200 agents start at the same second; count how many probe in the same 10 s window
    firsts, laters = [], []
    for seed in range(200):
        s = Scheduler(random.Random(seed))
        s.add("pmtu:hub", 600.0, 0.0, first_within_s=10.0)
        runs = run_until(s, 3 * 3600.0, step=1.0)["pmtu:hub"]
        firsts.append(runs[0])
        laters.append(runs[-1])
    windows = [int(t // 10) for t in laters]
    busiest = max(windows.count(w) for w in set(windows))
    assert busiest <= 20  # three hours on, the fleet is spread over the period
    assert len({int(t) for t in firsts}) >= 8  # the first runs are spread over the window


def test_trigger_brings_a_job_forward_never_back() -> None:
    s = Scheduler(random.Random(2))
    s.add("pmtu:hub", 600.0, 0.0)
    s.due(0.0)
    assert s.jobs["pmtu:hub"].due > 500
    s.trigger("pmtu:hub", 100.0, within_s=5.0)
    assert 100.0 <= s.jobs["pmtu:hub"].due <= 105.0
    s.trigger("pmtu:hub", 101.0, within_s=1000.0)
    assert s.jobs["pmtu:hub"].due <= 105.0
    assert s.due(106.0) == ["pmtu:hub"]
    s.trigger("absent", 0.0)  # a peer that went away: nothing happens


def test_set_period_after_a_reload_takes_effect_within_one_new_period() -> None:
    s = Scheduler(random.Random(3))
    s.add("report", 300.0, 0.0)
    s.due(0.0)
    s.set_period("report", 10.0, 1.0)
    assert s.jobs["report"].due <= 12.0
    assert s.next_deadline() == s.jobs["report"].due


def test_endpoint_change_and_stale_handshake_trigger_a_reprobe() -> None:
    w = PeerWatch()
    assert w.observe("hub", "198.19.1.11:51820", 5.0) is None  # first sight
    assert w.observe("hub", "198.19.1.11:51820", 100.0) is None
    why = w.observe("hub", "198.19.1.12:51820", 3.0)
    assert why is not None and "endpoint changed 198.19.1.11:51820 -> 198.19.1.12:51820" in why
    why = w.observe("hub", "198.19.1.12:51820", 200.0)
    assert why is not None and "200 s ago" in why
    assert w.observe("hub", "198.19.1.12:51820", 260.0) is None  # still stale: said once
    assert w.observe("hub", "198.19.1.12:51820", 2.0) is None  # fresh again
    assert w.observe("hub", None, None) is not None  # no handshake at all: stale
    w.forget("hub")
    assert w.observe("hub", None, None) is None


def test_probe_budget_bounds_runs_per_peer() -> None:
    b = ProbeBudget(max_per_hour=4, min_gap_s=30.0)
    now = 0.0
    started = []
    while now < 7200.0:
        if b.allow("hub", now) is None:
            b.spend("hub", now)
            started.append(now)
        now += 1.0
    per_hour = [sum(1 for t in started if h * 3600 <= t < (h + 1) * 3600) for h in range(2)]
    assert per_hour == [4, 4]
    assert all(b - a >= 30.0 for a, b in itertools.pairwise(started))
    reason = b.allow("hub", 1.0 + started[-1])
    assert reason is not None and "< 30 s" in reason
    assert b.allow("cloud1", 0.0) is None  # per peer

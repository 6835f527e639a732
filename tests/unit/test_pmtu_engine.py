"""PMTU search engine on virtual time and a simulated path (no sockets, no clock).

The simulated path delivers a probe iff its size <= the path MTU (and random loss spares it);
the ack comes back one RTT after the send (and may be lost too). Optional ICMP hints, local
EMSGSIZE and MTU changes at chosen times.
"""

from __future__ import annotations

import ast
import heapq
import itertools
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetvpn.engines.common import RttEstimator, budgeted_round, split_points
from fleetvpn.engines.pmtu import (
    PLATEAUS,
    PmtuBelowFloor,
    PmtuChanged,
    PmtuEvent,
    PmtuFound,
    PmtuSearch,
    PmtuState,
    Probe,
)


@dataclass
class Path_:
    mtu: int
    rtt: float = 0.05
    loss: float = 0.0  # per packet, each direction independently
    icmp_report: int | None = None  # ICMP too-big reporting this MTU for each dropped probe
    local_mtu: int | None = None  # sizes above this fail at send with EMSGSIZE
    seed: int = 0


@dataclass
class Sim:
    engine: PmtuSearch
    path: Path_
    now: float = 0.0
    batches: list[tuple[float, list[Probe]]] = field(default_factory=list)
    events: list[tuple[float, PmtuEvent]] = field(default_factory=list)
    changes: list[tuple[float, int, bool]] = field(default_factory=list)  # (t, new mtu, notify)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.path.seed)
        self._queue: list[tuple[float, int, str, int]] = []
        self._seq = 0

    def _push(self, at: float, kind: str, value: int) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (at, self._seq, kind, value))

    def _drain(self) -> None:
        while probes := self.engine.probes_to_send(self.now):
            self.batches.append((self.now, probes))
            for probe in probes:
                local = self.path.local_mtu
                if local is not None and probe.size > local:
                    self.engine.on_local_too_big(probe.probe_id, self.now, local)
                    continue
                if self._rng.random() < self.path.loss:
                    continue
                if probe.size > self.path.mtu:
                    if self.path.icmp_report is not None:
                        self._push(self.now + self.path.rtt / 2, "icmp", self.path.icmp_report)
                    continue
                if self._rng.random() < self.path.loss:
                    continue
                self._push(self.now + self.path.rtt, "ack", probe.probe_id)
        while (event := self.engine.next_event()) is not None:
            self.events.append((self.now, event))

    def start(self) -> Sim:
        self.engine.start(self.now)
        self._drain()
        return self

    def run(self, until: float, stop_on_found: bool = True) -> None:
        """Advance virtual time to ``until``, or (optionally) to the next Found/BelowFloor."""
        seen = len(self.events)
        while True:
            candidates = []
            if self._queue:
                candidates.append(self._queue[0][0])
            timer = self.engine.get_timer()
            if timer is not None:
                candidates.append(timer)
            if self.changes:
                candidates.append(self.changes[0][0])
            if not candidates or min(candidates) > until:
                self.now = until
                return
            self.now = max(self.now, min(candidates))
            if self.changes and self.changes[0][0] <= self.now:
                _, mtu, notify = self.changes.pop(0)
                self.path.mtu = mtu
                if notify:
                    self.engine.path_changed(self.now)
            elif self._queue and self._queue[0][0] <= self.now:
                _, _, kind, value = heapq.heappop(self._queue)
                if kind == "ack":
                    self.engine.on_ack(value, self.now)
                else:
                    self.engine.on_icmp_too_big(value, self.now)
            else:
                self.engine.handle_timer(self.now)
            self._drain()
            if stop_on_found and any(
                isinstance(e, PmtuFound | PmtuBelowFloor) for _, e in self.events[seen:]
            ):
                return

    def found(self) -> list[PmtuFound]:
        return [e for _, e in self.events if isinstance(e, PmtuFound)]

    def changed(self) -> list[PmtuChanged]:
        return [e for _, e in self.events if isinstance(e, PmtuChanged)]


def search(path: Path_, family: int = 4, ceiling: int = 1500, seed: int = 1, **kwargs: Any) -> Sim:
    engine = PmtuSearch(family, ceiling=ceiling, rng=random.Random(seed), **kwargs)
    return Sim(engine, path).start()


def converge(path: Path_, family: int = 4, ceiling: int = 1500, **kwargs: Any) -> PmtuFound:
    sim = search(path, family, ceiling, **kwargs)
    sim.run(until=120.0)
    found = sim.found()
    assert len(found) == 1, sim.events
    return found[0]


# ------------------------------------------------------------------ exact results


def test_black_hole_1400_ipv4_exact_and_fast() -> None:
    found = converge(Path_(mtu=1400))
    assert found.path_mtu == 1400
    assert not found.icmp_seen
    assert found.rounds <= 3
    assert found.elapsed_s <= 1.0
    assert "1401 lost" in found.reason


def test_pppoe_1492_with_icmp() -> None:
    found = converge(Path_(mtu=1492, icmp_report=1492))
    assert found.path_mtu == 1492
    assert found.icmp_seen
    assert found.rounds <= 3


def test_ipv6_black_hole_1350() -> None:
    found = converge(Path_(mtu=1350), family=6)
    assert found.path_mtu == 1350
    assert "1351 lost" in found.reason


@pytest.mark.parametrize(("family", "ceiling"), [(4, 1500), (6, 1500), (4, 9000), (6, 9001)])
def test_no_bottleneck_finds_the_ceiling_in_one_round(family: int, ceiling: int) -> None:
    found = converge(Path_(mtu=ceiling), family=family, ceiling=ceiling)
    assert found.path_mtu == ceiling
    assert found.rounds == 1
    assert found.elapsed_s == pytest.approx(0.05)
    assert "ceiling" in found.reason


def test_jumbo_ceiling_with_black_hole_at_1500() -> None:
    found = converge(Path_(mtu=1500), ceiling=9000)
    assert found.path_mtu == 1500


def test_floor_only_path() -> None:
    assert converge(Path_(mtu=1200)).path_mtu == 1200
    assert converge(Path_(mtu=1280), family=6).path_mtu == 1280


def test_below_floor_path_is_reported() -> None:
    sim = search(Path_(mtu=1100))
    sim.run(until=120.0)
    [event] = [e for _, e in sim.events]
    assert isinstance(event, PmtuBelowFloor)
    assert event.floor == 1200
    assert "below floor" in event.reason
    assert sim.engine.path_mtu is None
    assert sim.engine.state is PmtuState.BELOW_FLOOR
    assert event.elapsed_s < 10.0


def test_explicit_lower_floor_reaches_hotel_wifi_1124() -> None:
    found = converge(Path_(mtu=1124), floor=576)
    assert found.path_mtu == 1124


def test_misleading_icmp_hint_is_not_trusted() -> None:
    found = converge(Path_(mtu=1400, icmp_report=1300))
    assert found.path_mtu == 1400
    assert found.icmp_seen


def test_icmp_hint_reporting_more_than_the_path_is_not_trusted() -> None:
    assert converge(Path_(mtu=1400, icmp_report=1450)).path_mtu == 1400


def test_local_emsgsize_is_proof_and_bounds_the_search() -> None:
    # Caller claimed 1500, but the local route only takes 1450: EMSGSIZE at send, no ICMP.
    found = converge(Path_(mtu=1500, local_mtu=1450))
    assert found.path_mtu == 1450
    assert "refused locally" in found.reason
    assert found.confirm_rounds == 0


def test_local_emsgsize_below_floor() -> None:
    sim = search(Path_(mtu=1500, local_mtu=1100))
    sim.run(until=60.0)
    [event] = [e for _, e in sim.events]
    assert isinstance(event, PmtuBelowFloor)
    assert "EMSGSIZE" in event.reason


@settings(max_examples=60, deadline=None)
@given(
    family=st.sampled_from([4, 6]),
    ceiling=st.sampled_from([1500, 1500, 9000]),
    data=st.data(),
)
def test_any_path_mtu_without_loss_is_exact(family: int, ceiling: int, data: st.DataObject) -> None:
    floor = 1200 if family == 4 else 1280
    mtu = data.draw(st.integers(min_value=floor, max_value=ceiling), label="mtu")
    found = converge(Path_(mtu=mtu), family=family, ceiling=ceiling)
    assert found.path_mtu == mtu
    if ceiling == 1500 and family == 6:
        assert found.rounds - found.confirm_rounds <= 3


# ------------------------------------------------------------------ loss


def test_five_percent_loss_each_way_200_seeds_all_exact() -> None:
    wrong = []
    for seed in range(200):
        mtu = random.Random(seed).choice([1280, 1350, 1400, 1411, 1460, 1492, 1499, 1500])
        found = converge(Path_(mtu=mtu, loss=0.05, seed=seed), family=6, seed=seed)
        if found.path_mtu != mtu:
            wrong.append((seed, mtu, found))
    assert wrong == []


def test_loss_right_above_the_answer_is_confirmed_not_guessed() -> None:
    # 1401 happens to be lost once in a search round on a 1450 path: a confirmation must clear it.
    for seed in range(40):
        found = converge(Path_(mtu=1450, loss=0.1, seed=seed), seed=seed)
        assert found.path_mtu == 1450, (seed, found)


# ------------------------------------------------------------------ bounds


@pytest.mark.parametrize("mtu", [1280, 1281, 1333, 1400, 1401, 1459, 1499])
def test_rounds_bound_1280_1500_k15(mtu: int) -> None:
    found = converge(Path_(mtu=mtu), family=6, probes_per_round=15)
    assert found.path_mtu == mtu
    assert found.rounds - found.confirm_rounds <= 3
    assert found.confirm_rounds <= 1


def test_bytes_per_round_bound_is_respected() -> None:
    for mtu, ceiling in [(1400, 1500), (4000, 9000), (8999, 9000)]:
        sim = search(Path_(mtu=mtu), ceiling=ceiling, max_round_bytes=64000)
        sim.run(until=60.0)
        assert sim.found()[0].path_mtu == mtu
        for _, batch in sim.batches:
            assert sum(p.size for p in batch) <= 64000
    sim = search(Path_(mtu=1400), max_round_bytes=12000)
    sim.run(until=60.0)
    assert sim.found()[0].path_mtu == 1400
    assert max(sum(p.size for p in b) for _, b in sim.batches) <= 12000


def test_budget_too_small_for_a_confirmation_round_is_refused() -> None:
    with pytest.raises(ValueError, match="confirmation round"):
        PmtuSearch(4, ceiling=9000, max_round_bytes=20000)


def test_probe_ids_are_unique_and_32_bit() -> None:
    sim = search(Path_(mtu=1400))
    sim.run(until=60.0)
    ids = [p.probe_id for _, b in sim.batches for p in b]
    assert len(ids) == len(set(ids))
    assert all(0 <= i < 2**32 for i in ids)


# ------------------------------------------------------------------ changes and maintenance


def test_path_change_during_search_with_notification() -> None:
    sim = search(Path_(mtu=1450))
    sim.changes.append((0.25, 1400, True))
    sim.run(until=60.0)
    [found] = sim.found()
    assert found.path_mtu == 1400


def test_silent_path_change_during_search_still_ends_exact_eventually() -> None:
    sim = search(Path_(mtu=1450), maintenance_interval_s=30.0)
    sim.changes.append((0.25, 1400, False))
    sim.run(until=200.0, stop_on_found=False)
    assert sim.engine.path_mtu == 1400


def test_maintenance_detects_increase() -> None:
    sim = search(Path_(mtu=1400), maintenance_interval_s=60.0)
    sim.run(until=10.0)
    assert sim.engine.path_mtu == 1400
    sim.path.mtu = 1480
    sim.run(until=200.0, stop_on_found=False)
    assert sim.engine.path_mtu == 1480
    [change] = sim.changed()
    assert (change.old, change.new) == (1400, 1480)
    assert "1401 acked" in change.reason
    t_change = next(t for t, e in sim.events if isinstance(e, PmtuChanged))
    assert t_change <= 61.0


def test_maintenance_detects_decrease() -> None:
    sim = search(Path_(mtu=1492), maintenance_interval_s=60.0)
    sim.run(until=10.0)
    sim.path.mtu = 1420
    sim.run(until=200.0, stop_on_found=False)
    assert sim.engine.path_mtu == 1420
    [change] = sim.changed()
    assert (change.old, change.new) == (1492, 1420)
    assert "1492 lost" in change.reason


def test_icmp_below_value_triggers_an_early_check() -> None:
    sim = search(Path_(mtu=1500, icmp_report=1400))
    sim.run(until=10.0)
    assert sim.engine.path_mtu == 1500
    sim.path.mtu = 1400
    sim.engine.on_icmp_too_big(1400, sim.now)
    sim.run(until=30.0, stop_on_found=False)
    assert sim.engine.path_mtu == 1400


def test_maintenance_on_a_stable_path_stays_quiet() -> None:
    sim = search(Path_(mtu=1400, loss=0.05, seed=3), maintenance_interval_s=60.0)
    sim.run(until=3600.0, stop_on_found=False)
    assert sim.engine.path_mtu == 1400
    assert sim.changed() == []


def test_path_down_then_back() -> None:
    sim = search(Path_(mtu=1400), maintenance_interval_s=60.0)
    sim.run(until=10.0)
    sim.path.mtu = 0  # everything vanishes
    sim.run(until=120.0, stop_on_found=False)
    assert sim.engine.path_mtu is None
    assert [(c.old, c.new) for c in sim.changed()] == [(1400, None)]
    sim.path.mtu = 1400
    sim.run(until=1000.0, stop_on_found=False)
    assert sim.engine.path_mtu == 1400
    assert [(c.old, c.new) for c in sim.changed()][-1] == (None, 1400)


def test_path_changed_with_new_ceiling() -> None:
    sim = search(Path_(mtu=1400))
    sim.run(until=10.0)
    sim.path.mtu = 9000
    sim.engine.path_changed(sim.now, ceiling=9000)
    sim._drain()
    sim.run(until=60.0)
    assert sim.engine.path_mtu == 9000


# ------------------------------------------------------------------ API contract


def test_inputs_for_unknown_probes_are_ignored_and_start_twice_raises() -> None:
    engine = PmtuSearch(4, rng=random.Random(0))
    assert engine.get_timer() is None
    engine.on_ack(123, 0.0)
    engine.on_local_too_big(5, 0.0)
    engine.on_icmp_too_big(1400, 0.0)
    engine.handle_timer(0.0)
    assert engine.probes_to_send(0.0) == []
    engine.start(0.0)
    with pytest.raises(RuntimeError):
        engine.start(0.0)
    probes = engine.probes_to_send(0.0)
    assert probes and all(1200 <= p.size <= 1500 for p in probes)
    assert {1500, 1492, 1400, 1200} <= {p.size for p in probes}
    engine.on_ack(probes[0].probe_id, 0.1)
    engine.on_ack(probes[0].probe_id, 0.1)  # duplicate: ignored
    engine.on_ack(2**40, 0.1)


def test_first_round_contains_plateaus_inside_the_interval_only() -> None:
    engine = PmtuSearch(6, ceiling=1480, rng=random.Random(0))
    engine.start(0.0)
    sizes = {p.size for p in engine.probes_to_send(0.0)}
    inside = {p for p in PLATEAUS if 1280 <= p <= 1480}
    assert inside <= sizes
    assert max(sizes) == 1480 and min(sizes) == 1280


@pytest.mark.parametrize(
    "kwargs",
    [
        {"family": 5},
        {"family": 6, "floor": 1200},
        {"ceiling": 1100},
        {"ceiling": 70000},
        {"probes_per_round": 0},
        {"min_probe_timeout_s": 0.0},
    ],
)
def test_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        PmtuSearch(**kwargs)


# ------------------------------------------------------------------ shared helpers


@settings(max_examples=200, deadline=None)
@given(
    base=st.integers(1000, 1500),
    width=st.integers(2, 600),
    k=st.integers(0, 40),
    fixed=st.lists(st.integers(1000, 2100), max_size=6),
)
def test_split_points_minimise_the_largest_untried_run(
    base: int, width: int, k: int, fixed: list[int]
) -> None:
    upper = base + width
    points = split_points(base, upper, fixed, k)
    inside = {f for f in fixed if base < f < upper}
    assert len(points) == len(set(points)) <= k
    assert all(base < p < upper and p not in inside for p in points)
    tried = sorted({base, upper, *inside, *points})
    largest_run = max(b - a - 1 for a, b in itertools.pairwise(tried))
    # Optimal: the smallest T such that giving each run between fixed points
    # ceil((L - T) / (T + 1)) points (what it needs to get down to T) costs at most k.
    runs = [b - a - 1 for a, b in itertools.pairwise(sorted({base, upper, *inside}))]
    optimum = next(
        t for t in range(width + 1) if sum(max(0, -(-(run - t) // (t + 1))) for run in runs) <= k
    )
    assert largest_run == optimum


def test_budgeted_round_sheds_splits_then_optional_sizes() -> None:
    sizes = budgeted_round(1280, 1501, [(1280, 1)], [1500, 1400], k=15, max_bytes=10**6)
    assert len(sizes) == 1 + 2 + 15
    small = budgeted_round(1280, 1501, [(1280, 1)], [1500, 1400], k=15, max_bytes=6000)
    assert sum(s * c for s, c in small) <= 6000
    assert (1500, 1) in small and (1400, 1) in small
    tiny = budgeted_round(1280, 1501, [(1280, 1)], [1500, 1400], k=15, max_bytes=2800)
    assert len(tiny) == 2 and sum(s * c for s, c in tiny) <= 2800


def test_rtt_estimator_timeout() -> None:
    rtt = RttEstimator(initial_s=1.0, min_s=0.2, max_s=10.0)
    assert rtt.timeout() == 1.0
    rtt.sample(0.01)
    assert rtt.timeout() == 0.2
    rtt.sample(-5.0)  # ignored
    for _ in range(100):
        rtt.sample(0.5)
    assert rtt.timeout() == pytest.approx(1.5, rel=0.01)
    assert rtt.timeout(backoff=2) == pytest.approx(6.0, rel=0.01)
    assert rtt.timeout(backoff=9) == pytest.approx(12.0, rel=0.01)


# ------------------------------------------------------------------ import rule


FORBIDDEN = {"socket", "asyncio", "time", "subprocess", "os", "select", "selectors", "threading"}


def test_engines_are_sans_io() -> None:
    engines = Path(__file__).resolve().parents[2] / "fleetvpn" / "engines"
    modules = sorted(engines.glob("*.py"))
    assert any(m.name == "pmtu.py" for m in modules)
    offenders = []
    for module in modules:
        tree = ast.parse(module.read_text(), filename=str(module))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "__import__"
            ):
                names = ["__import__"]
            for name in names:
                if name.split(".")[0] in FORBIDDEN | {"__import__", "importlib"}:
                    offenders.append(f"{module.name}:{getattr(node, 'lineno', 0)}: {name}")
    assert offenders == []

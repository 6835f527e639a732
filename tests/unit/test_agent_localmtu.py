"""Local holds: the route MTU an agent lowers at once, and the controller's agreement or
correction; and the supervisor's wiring of a measured decrease (a fake agent port)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from fleetvpn.agent.desired import Desired, PeerPlan
from fleetvpn.agent.localmtu import LocalHolds, padded_outer, route_mtu_for
from fleetvpn.agent.paths import PathSupervisor
from fleetvpn.agent.schedule import ProbeBudget
from fleetvpn.wg.state import PeerSpec, PeerStatus, TunnelSpec

HUB_KEY = "h" * 43 + "="
CLOUD_KEY = "c" * 43 + "="


def spec(mtu: int = 1340, hub_route: int | None = 1340, v6: bool = False) -> TunnelSpec:
    addresses = ("10.99.0.2/16", "fd99::2/64") if v6 else ("10.99.0.2/16",)
    return TunnelSpec("wg0", 51820, addresses, mtu, (
        PeerSpec(HUB_KEY, "198.18.0.10:51820", ("10.99.0.1/32",), 8, hub_route, "hub"),
        PeerSpec(CLOUD_KEY, None, ("10.99.0.3/32",), 0, 1280, "cloud1"),
    ))  # fmt: skip


@pytest.mark.parametrize(
    ("path", "interface", "want"),
    [
        (1400, 1340, 1340),  # = the interface MTU: padding stops there
        (1360, 1340, 1296),  # floor16(1300)
        (1300, 1340, 1232),  # floor16(1240): IPv4 routes go there, IPv6 ones stay at 1280
        (1200, 1420, 1136),
        (600, 1420, 576),  # the IPv4 minimum: the path cannot be made to fit
    ],
)
def test_route_mtu_for(path: int, interface: int, want: int) -> None:
    assert route_mtu_for(path, 4, interface) == want
    if want > 576:
        assert padded_outer(want, interface, 4) <= path


def test_a_hold_below_1280_in_a_tunnel_that_carries_ipv6_asks_for_outer_fragmentation() -> None:
    holds = LocalHolds()
    held = holds.hold("hub", path_mtu=1300, family=4, spec=spec(v6=True), final=True, why="t",
                      now=1.0)  # fmt: skip
    assert held is not None and held.route_mtu == 1232
    assert "IPv6 routes 1280 with TCP MSS 1172" in held.reason
    capped, _ = holds.capped(spec(v6=True), {})
    hub = next(p for p in capped.peers if p.name == "hub")
    assert (hub.route_mtu, hub.outer_fragmentation) == (1232, True)
    # an IPv4-only tunnel: the same route, nothing to fragment
    holds.hold("hub", path_mtu=1300, family=4, spec=spec(), final=True, why="t", now=2.0)
    hub = next(p for p in holds.capped(spec(), {})[0].peers if p.name == "hub")
    assert (hub.route_mtu, hub.outer_fragmentation) == (1232, False)


def test_a_hold_caps_the_route_until_the_controller_agrees() -> None:
    holds = LocalHolds()
    held = holds.hold("hub", path_mtu=1360, family=4, spec=spec(), final=True, why="test",
                      now=10.0)  # fmt: skip
    assert held is not None and held.route_mtu == 1296
    assert "applied locally, controller to confirm" in held.reason
    capped, reasons = holds.capped(spec(), {})
    hub = next(p for p in capped.peers if p.name == "hub")
    assert hub.route_mtu == 1296 and reasons[f"{HUB_KEY}:route_mtu"] == held.reason
    # the controller has not seen it yet: its old plan does not end the hold
    assert holds.review(spec(), {}, 11.0, "userspace") == []
    # it agrees: interface 1300, route 1300 (outer 1360 fits)
    lines = holds.review(spec(1300, 1300), {f"{HUB_KEY}:route_mtu": "theirs"}, 12.0, "userspace")
    assert len(lines) == 1 and "controller agrees" in lines[0] and "theirs" in lines[0]
    assert holds.holds == {}
    assert holds.capped(spec(1300, 1300), {})[0] == spec(1300, 1300)


def test_the_controller_corrects_once_it_has_seen_the_measurement() -> None:
    holds = LocalHolds()
    holds.hold("hub", path_mtu=1300, family=4, spec=spec(), final=True, why="t", now=10.0)
    assert holds.holds["hub"].route_mtu == 1232
    theirs = {f"{HUB_KEY}:route_mtu": "an override: 1280"}
    assert holds.review(spec(1280, 1280), theirs, 20.0, "userspace") == []  # not reported yet
    holds.reported(built_at=5.0, now=21.0)  # a report built before the hold: not it
    assert holds.review(spec(1280, 1280), theirs, 22.0, "userspace") == []
    holds.reported(built_at=15.0, now=23.0)
    assert holds.review(spec(1280, 1280), theirs, 22.5, "userspace") == []  # fetched before
    lines = holds.review(spec(1280, 1280), theirs, 24.0, "userspace")
    assert len(lines) == 1 and "controller corrected" in lines[0] and "blackhole" in lines[0]
    assert holds.holds == {}


def test_an_interim_hold_is_not_released_by_the_controller() -> None:
    holds = LocalHolds()
    holds.hold("hub", path_mtu=1200, family=4, spec=spec(), final=False, why="t", now=1.0)
    holds.reported(built_at=2.0, now=3.0)
    assert holds.review(spec(1340, 1340), {}, 4.0, "userspace") == []
    assert holds.holds["hub"].route_mtu == 1136


@dataclass
class FakePort:
    the_spec: TunnelSpec = field(default_factory=spec)
    calls: list[str] = field(default_factory=list)

    def spec(self) -> TunnelSpec | None:
        return self.the_spec

    async def resolve(self, endpoint: str) -> tuple[tuple[str, int] | None, str]:
        return ("127.0.0.1", 0), ""

    def record(self, peer: str, family: int, path_mtu: int, reason: str, how: str) -> None:
        self.calls.append(f"record {peer} {path_mtu} {how}")

    def apply_local(self, why: str) -> None:
        self.calls.append(f"apply {why}")

    def report_now(self) -> None:
        self.calls.append("report")

    def remeasure_nat(self, why: str) -> None:
        self.calls.append(f"nat {why}")

    def measured_forward(self, peer: str, target: tuple[str, int]) -> None:
        self.calls.append(f"hello {peer}")

    def record_fragments(self, peer: str, crossed: bool) -> None:
        self.calls.append(f"fragments {peer} {crossed}")

    def ask_nat_check(self, peer: str, why: str) -> None:
        self.calls.append(f"ask {peer}: {why}")


def supervisor(port: FakePort, nated: bool = True) -> PathSupervisor:
    return PathSupervisor(port, key=b"k" * 32, probe_port=0, upkeep_s=600.0,
                          budget=ProbeBudget(), rng=random.Random(1), nated=nated)  # fmt: skip


def test_a_measured_decrease_is_held_applied_and_reported_at_once() -> None:
    port = FakePort()
    sup = supervisor(port)
    sup.measured("hub", 4, 1400, None, "initial", "forward")
    assert port.calls == ["record hub 1400 forward"]  # the first value: nothing to hold
    port.calls.clear()
    sup.measured("hub", 4, 1360, 1400, "1400 no longer gets through", "reverse")
    assert port.calls[0] == "record hub 1360 reverse"
    assert port.calls[1].startswith("apply hub: route MTU 1296: applied locally")
    assert port.calls[2] == "report"
    port.calls.clear()
    sup.measured("hub", 4, 1400, 1360, "the path grew", "forward")  # the controller's fits again
    fits = "apply hub: the controller's route fits path MTU 1400"
    assert port.calls == ["record hub 1400 forward", fits, "report"]
    assert sup.holds.holds == {}


def test_the_nated_side_asks_for_a_nat_remeasurement_on_early_handshakes() -> None:
    port = FakePort()
    sup = supervisor(port)
    plans = (PeerPlan("hub", "hub", HUB_KEY, None, "10.99.0.1", 1340, 8),)
    desired = Desired("branch1", "branch", spec(), {}, plans, {})
    import asyncio

    asyncio.run(sup.sync(desired))
    assert set(sup.nat_watches) == {"hub"} and not sup.peers
    names = {HUB_KEY: "hub"}

    def status(hs: int, tx: int) -> list[PeerStatus]:
        return [PeerStatus(HUB_KEY, "198.18.0.10:51820", ("10.99.0.1/32",), 8, hs, 0, tx)]

    import time

    base = int(time.time())
    # keepalives only (32 bytes each) and the peer re-initiating every ~25 s, twice
    for i, hs in enumerate([base - 200, base - 200, base - 175, base - 175, base - 150]):
        sup.sample(status(hs, 32 * i), names)
    assert any(c.startswith("nat towards hub: re-measure the NAT") for c in port.calls), port.calls


def test_the_outside_side_asks_a_nated_peer_to_measure_its_nat_again() -> None:
    """The hub (no NAT) watches a NATed peer that keeps its mapping with an 8 s keepalive: the
    peer's endpoint changes although that keepalive should hold the mapping (a new mapping):
    the hub asks the peer, which alone can measure its NAT (issue 12 item 5)."""
    import asyncio

    port = FakePort()
    sup = supervisor(port, nated=False)
    plans = (PeerPlan("branch1", "branch", HUB_KEY, None, "10.99.0.2", 1340, 0, 8),)
    asyncio.run(sup.sync(Desired("hub", "hub", spec(), {}, plans, {})))
    assert set(sup.outside_watches) == {"branch1"} and not sup.nat_watches
    names = {HUB_KEY: "branch1"}

    def sample(endpoint: str, rx: int, tx: int) -> None:
        status = PeerStatus(HUB_KEY, endpoint, ("10.99.0.2/32",), 0, 0, rx, tx)
        sup.sample([status], names)

    sample("198.18.2.6:40001", 1000, 1000)
    sample("198.18.2.6:40001", 2000, 2000)
    assert not [c for c in port.calls if c.startswith("ask")]
    sample("198.18.2.6:40777", 3000, 3000)  # the NAT made a new mapping
    asks = [c for c in port.calls if c.startswith("ask branch1: ")]
    assert len(asks) == 1, port.calls
    # no peer keepalive towards us any more (the controller turned it off): no watch
    plans = (PeerPlan("branch1", "branch", HUB_KEY, None, "10.99.0.2", 1340, 0, 0),)
    asyncio.run(sup.sync(Desired("hub", "hub", spec(), {}, plans, {})))
    assert sup.outside_watches == {}

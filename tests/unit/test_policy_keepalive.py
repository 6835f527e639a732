"""Keepalive policy: sites with several nodes of different lifetimes, no-NAT nodes, placement on
the NATed side, overrides, hysteresis, the eviction case and the slow raise — values and reasons,
on virtual time."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from fleetvpn.controller.policy import (
    EVICTION_FLOOR_S,
    KEEPALIVE_MAX_S,
    RAISE_CONFIRM_S,
    RAISE_INTERVAL_S,
    NodeNat,
    decide_keepalives,
    decide_site_keepalive,
    detect_mapping_losses,
    keepalive_for,
)
from fleetvpn.model import (
    KeepaliveState,
    LinkMeasurement,
    MappingLoss,
    NatMeasurement,
    Override,
    Report,
    SiteKeepalive,
)

T0 = datetime(2024, 5, 1, 12, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def nat(lifetime_s: float | None, when: float = 0.0, **extra: object) -> NatMeasurement:
    flags = {"nat": True, "stateful_filter": True} | extra
    return NatMeasurement(at(when), mapping_lifetime_s=lifetime_s, **flags)  # type: ignore[arg-type]


PUBLIC = NatMeasurement(T0, nat=False, stateful_filter=False)


def site(
    *lifetimes: float | None, previous: KeepaliveState | None = None, now: float = 0.0,
    losses: Sequence[MappingLoss] = (),
) -> tuple[KeepaliveState, SiteKeepalive]:  # fmt: skip
    nodes = [NodeNat(f"b{i}", "office", (nat(t, min(now, 0.0)),)) for i, t in enumerate(lifetimes)]
    return decide_site_keepalive("office", nodes, previous, losses, at(now))


def test_the_rule_is_the_shared_one() -> None:
    assert keepalive_for(30, True, True)[0] == 13  # ⌊(30 − 3)/2⌋
    assert keepalive_for(120, True, False)[0] == 54


def test_a_site_with_nodes_of_different_lifetimes_uses_the_smallest() -> None:
    nodes = [
        NodeNat("b1", "office", (nat(60),)),
        NodeNat("b2", "office", (nat(30),)),
        NodeNat("b3", "office", (nat(None, max_lifetime_s=300),)),  # nothing expired in 300 s
    ]
    state, decision = decide_site_keepalive("office", nodes, None, [], T0)
    assert (decision.keepalive_s, decision.source, decision.mapping_lifetime_s) == (
        13,
        "measured",
        30,
    )
    assert decision.reason.startswith("keepalive 13 s at site office: keepalive 13 s = floor((30")
    assert "smallest recent lifetime: b2, of 3 NATed/filtered node(s)" in decision.reason
    assert state.measured_keepalive_s == 13


def test_only_recent_lifetimes_count_but_an_old_one_beats_nothing() -> None:
    two_days = -2 * 86400.0
    node = NodeNat("b1", "office", (nat(20, two_days), nat(60, -3600)))
    _, decision = decide_site_keepalive("office", [node], None, [], T0)
    assert decision.keepalive_s == 27  # the 60 s of an hour ago, not the 20 s of two days ago
    old_only = NodeNat("b1", "office", (nat(20, two_days),))
    _, decision = decide_site_keepalive("office", [old_only], None, [], T0)
    assert decision.keepalive_s == 9
    assert "last measured 48 h ago" in decision.reason


def test_a_search_bound_without_an_expiry_uses_the_rule_at_the_bound_or_the_default() -> None:
    _, long_bound = site(None, previous=None)  # no lifetime, no bound: the default
    assert (long_bound.keepalive_s, long_bound.source) == (25, "default")
    node = NodeNat("b1", "office", (nat(None, max_lifetime_s=40),))
    _, decision = decide_site_keepalive("office", [node], None, [], T0)
    assert decision.keepalive_s == 18  # ⌊(40 − 4)/2⌋ < the default 25
    assert "smallest search bound: b1" in decision.reason


def test_a_very_long_lifetime_is_clamped() -> None:
    _, decision = site(600)
    assert decision.keepalive_s == KEEPALIVE_MAX_S
    assert "clamped to 120 s (1..120)" in decision.reason


def test_no_nat_nodes_get_no_keepalive_and_the_nated_side_sends_it() -> None:
    nodes = [
        NodeNat("hub", "dc", (PUBLIC,)),
        NodeNat("branch1", "office", (nat(30),)),
        NodeNat("branch2", "office", (nat(60),)),
        NodeNat("laptop", "home"),  # never measured
    ]
    links = [("hub", "branch1"), ("hub", "branch2"), ("hub", "laptop"), ("branch1", "branch2")]
    fleet = decide_keepalives(nodes, links, {}, [], [], T0)
    assert fleet.sites["dc"].keepalive_s == 0
    assert "no NAT and no stateful filter at any of 1 measured node(s)" in fleet.sites["dc"].reason
    assert fleet.sites["office"].keepalive_s == 13
    peers = fleet.peers
    # the NATed branch keeps the mapping the hub reaches it through; the public hub sends none
    assert peers["branch1", "hub"].keepalive_s == 13
    assert "branch1 is behind NAT: keepalive 13 s towards hub" in peers["branch1", "hub"].reason
    assert peers["hub", "branch1"].keepalive_s == 0
    assert peers["hub", "branch1"].reason == (
        "hub has no NAT and no stateful filter: keepalive off towards branch1 "
        "(nothing to keep open)"
    )
    # the site's smallest lifetime applies to every NATed node there, towards every peer
    assert peers["branch2", "hub"].keepalive_s == 13
    assert peers["branch1", "branch2"].keepalive_s == 13
    assert peers["branch2", "branch1"].keepalive_s == 13
    # not measured: the default
    assert (peers["laptop", "hub"].keepalive_s, peers["laptop", "hub"].source) == (25, "default")
    assert "laptop's NAT not measured yet" in peers["laptop", "hub"].reason


def test_a_stateful_filter_without_nat_also_needs_keepalive() -> None:
    nodes = [NodeNat("cloud", "vpc", (nat(350, nat=False, stateful_filter=True),))]
    fleet = decide_keepalives(nodes, [("cloud", "hub")], {}, [], [], T0)
    assert fleet.peers["cloud", "hub"].keepalive_s == 120
    assert "behind a stateful filter" in fleet.peers["cloud", "hub"].reason


def test_overrides_beat_measurements_and_show_as_overrides() -> None:
    nodes = [NodeNat("hub", "dc", (PUBLIC,)), NodeNat("b1", "office", (nat(30),))]
    nodes.append(NodeNat("b2", "office", (nat(30),)))
    links = [("hub", "b1"), ("hub", "b2")]
    overrides = [
        Override("site", "office", "keepalive_s", 15),
        Override("node", "b2", "keepalive_s", 20),
        Override("link", "hub>b1", "keepalive_s", 25, "legacy firewall"),
        Override("site", "office", "tunnel_mtu", 1300),  # another setting: ignored here
    ]
    fleet = decide_keepalives(nodes, links, {}, [], overrides, T0)
    office = fleet.sites["office"]
    assert (office.keepalive_s, office.source) == (15, "override")
    assert (
        office.reason == "override by admin (site office): keepalive 15 s (measured would be 13 s)"
    )
    b1 = fleet.peers["b1", "hub"]
    assert (b1.keepalive_s, b1.source) == (15, "override")
    assert b1.reason == (
        "override by admin (site office): keepalive 15 s towards hub (measured would be 13 s)"
    )
    assert fleet.peers["b2", "hub"].keepalive_s == 20  # node beats site
    hub = fleet.peers["hub", "b1"]
    assert (hub.keepalive_s, hub.source) == (25, "override")  # link, even on a public node
    assert 'link hub>b1, "legacy firewall"' in hub.reason
    assert "(measured would be off)" in hub.reason
    # the state keeps following the measurements underneath
    assert fleet.states["office"].measured_keepalive_s == 13


# --- hysteresis -----------------------------------------------------------------------------


def test_hysteresis_keeps_a_value_within_the_band() -> None:
    state, first = site(30)
    assert first.keepalive_s == 13
    for lifetime, proposal in ((32, 14), (26, 11)):  # ±2 s around 13: noise
        assert keepalive_for(lifetime, True, True)[0] == proposal
        kept_state, kept = site(lifetime, previous=state, now=60)
        assert kept.keepalive_s == 13
        assert f"kept 13 s: {proposal} s is within the hysteresis band ±2 s" in kept.reason
        assert kept_state.pending_keepalive_s is None


def test_hysteresis_lowers_at_once_outside_the_band() -> None:
    state, _ = site(30)
    _, lowered = site(20, previous=state, now=60)  # proposal 9: 4 s below 13
    assert lowered.keepalive_s == 9
    assert "lowered from 13 s at once" in lowered.reason


def test_hysteresis_raises_only_after_consistent_proposals() -> None:
    state, _ = site(30)
    state, d = site(60, previous=state, now=600)  # proposal 27: a raise
    assert d.keepalive_s == 13
    assert "kept 13 s: 27 s must hold for 3600 s before raising (0 s so far)" in d.reason
    assert (state.pending_keepalive_s, state.pending_since) == (27, at(600))
    state, d = site(56, previous=state, now=1800)  # proposal 25: still a raise, lower
    assert d.keepalive_s == 13
    assert state.pending_keepalive_s == 25
    state, d = site(60, previous=state, now=600 + RAISE_CONFIRM_S)
    assert d.keepalive_s == 25  # the lowest proposed while pending
    assert "raised from 13 s after 3600 s of consistent proposals" in d.reason
    assert state.pending_keepalive_s is None


def test_a_raise_is_forgotten_when_the_proposal_falls_back() -> None:
    state, _ = site(30)
    state, _ = site(60, previous=state, now=600)
    state, d = site(30, previous=state, now=1200)
    assert (d.keepalive_s, state.pending_keepalive_s, state.pending_since) == (13, None, None)
    state, d = site(60, previous=state, now=1800)
    assert state.pending_since == at(1800)  # the hold starts again


def test_nat_appearing_applies_at_once_and_disappearing_waits() -> None:
    open_site = [NodeNat("b1", "office", (PUBLIC,))]
    state, d = decide_site_keepalive("office", open_site, None, [], T0)
    assert d.keepalive_s == 0
    natted = [NodeNat("b1", "office", (PUBLIC, nat(30, 60)))]
    state, d = decide_site_keepalive("office", natted, state, [], at(60))
    assert d.keepalive_s == 13
    assert "lowered from off at once" in d.reason
    public_again = [NodeNat("b1", "office", (nat(30, 60), NatMeasurement(at(120), False, False)))]
    state, d = decide_site_keepalive("office", public_again, state, [], at(120))
    assert d.keepalive_s == 13
    assert "off must hold for 3600 s" in d.reason
    state, d = decide_site_keepalive("office", public_again, state, [], at(120 + RAISE_CONFIRM_S))
    assert d.keepalive_s == 0


def test_the_first_measurement_replaces_the_default_at_once() -> None:
    unmeasured = [NodeNat("b1", "office")]
    state, d = decide_site_keepalive("office", unmeasured, None, [], T0)
    assert (d.keepalive_s, d.source) == (25, "default")
    state, d = site(120, previous=state, now=60)
    assert (d.keepalive_s, d.source) == (54, "measured")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(27, 33), min_size=2, max_size=12))
def test_noise_around_a_lifetime_does_not_flap_the_setting(lifetimes: list[float]) -> None:
    state, first = site(30)
    values = {first.keepalive_s}
    for i, lifetime in enumerate(lifetimes):
        state, d = site(lifetime, previous=state, now=60.0 * (i + 1))
        values.add(d.keepalive_s)
    # ⌊(T − T/10)/2⌋ over 27..33 is 12..14: always within the band of 13
    assert values == {13}


# --- eviction and the slow raise ------------------------------------------------------------


def loss(keepalive_s: int, when: float, node: str = "b0") -> MappingLoss:
    return MappingLoss(node, "hub", at(when), keepalive_s, "hub saw its endpoint move")


def test_eviction_lowers_the_keepalive_and_repeats_change_nothing() -> None:
    state, d = site(120)
    assert d.keepalive_s == 54
    state, d = site(120, previous=state, now=600, losses=[loss(54, 590)])
    assert d.keepalive_s == 27
    assert (state.eviction_cap_s, state.measured_keepalive_s) == (27, 54)
    assert d.reason.startswith("keepalive 27 s at site office (eviction cap; lifetimes alone")
    assert (
        "lowered to 27 s: b0's mapping towards hub was lost (hub saw its endpoint move) with "
        "keepalive 54 s below the lifetime 120 s — small-table eviction suspected" in d.reason
    )
    # the same loss again, and a loss reported before the agent applied 27 s: no change
    state, d = site(120, previous=state, now=660, losses=[loss(54, 590), loss(54, 650)])
    assert (d.keepalive_s, state.eviction_cap_s) == (27, 27)
    # a loss with the new value: halved again, down to the floor and no further
    steps = ((27, 13), (13, 6), (6, EVICTION_FLOOR_S), (5, EVICTION_FLOOR_S))
    for i, (k, expected) in enumerate(steps):
        state, d = site(120, previous=state, now=700 + i, losses=[loss(k, 700 + i)])
        assert d.keepalive_s == expected


def test_an_expected_expiry_is_not_an_eviction() -> None:
    state, _ = site(30)
    # 25 s < T = 30 s should have held the mapping: an eviction, halved
    state, d = site(30, previous=state, now=60, losses=[loss(25, 50)])
    assert d.keepalive_s == 12
    state, _ = site(30)
    state, d = site(30, previous=state, now=60, losses=[loss(40, 50)])  # 40 s >= T = 30
    assert d.keepalive_s == 13
    assert "with keepalive 40 s, lifetime 30 s: not judged an eviction" in d.reason
    state, d = site(30, previous=state, now=120, losses=[loss(0, 110)])
    assert "with keepalive off" in d.reason and d.keepalive_s == 13
    _, d = site(30, previous=state, now=180, losses=[loss(10, 170, node="elsewhere")])
    assert d.keepalive_s == 13  # another site's node


def test_the_cap_is_raised_slowly_after_quiet_hours_and_lifted() -> None:
    state, _ = site(120)
    state, d = site(120, previous=state, now=0, losses=[loss(54, 0)])
    assert d.keepalive_s == 27
    assert "eviction cap 27 s, next raise at 2024-05-01T13:00:00Z" in d.reason
    hour = RAISE_INTERVAL_S
    expected = [(hour - 1, 27), (hour, 34), (2 * hour, 43), (3 * hour, 54)]
    for now, keepalive_s in expected:
        state, d = site(120, previous=state, now=now)
        assert d.keepalive_s == keepalive_s, now
        if now == 2 * hour:
            assert "eviction cap raised to 43 s after quiet hours" in d.reason
    assert state.eviction_cap_s is None
    assert "eviction cap lifted after quiet hours" in d.reason


def test_the_raise_schedule_does_not_depend_on_how_often_the_policy_runs() -> None:
    start, _ = site(120)
    start, _ = site(120, previous=start, now=0, losses=[loss(54, 0), loss(27, 1), loss(13, 2)])
    assert start.eviction_cap_s == 6
    often, rarely = start, start
    for minute in range(10, 5 * 60 + 1, 10):
        often, _ = site(120, previous=often, now=minute * 60.0)
    rarely, _ = site(120, previous=rarely, now=5 * 3600.0)
    assert often.eviction_cap_s == rarely.eviction_cap_s == 22  # 6 → 8 → 10 → 13 → 17 → 22
    assert often.cap_changed_at == rarely.cap_changed_at


def test_an_eviction_during_the_raise_halves_from_where_the_cap_is() -> None:
    state, _ = site(120)
    state, _ = site(120, previous=state, now=0, losses=[loss(54, 0)])
    state, d = site(120, previous=state, now=RAISE_INTERVAL_S)
    assert d.keepalive_s == 34
    state, d = site(120, previous=state, now=RAISE_INTERVAL_S + 60, losses=[loss(34, 3630)])
    assert d.keepalive_s == 17
    assert state.cap_changed_at == at(RAISE_INTERVAL_S + 60)


def test_detect_mapping_losses_from_a_new_port_not_from_roaming() -> None:
    def report(created_s: float, *endpoints: tuple[str, str]) -> Report:
        return Report(
            report_id="0b9e3b5c-1f3e-4c1a-9d2e-2b7d8f0c1a22",
            node="hub",
            site="dc",
            created_at=at(created_s),
            measurements=tuple(
                LinkMeasurement(peer, 4, 0, 0, endpoint=endpoint) for peer, endpoint in endpoints
            ),
        )

    before = report(
        0, ("b1", "198.18.1.2:40000"), ("b2", "198.18.2.2:40000"), ("b3", "198.18.3.2:1")
    )
    after = report(
        60, ("b1", "198.18.1.2:40017"), ("b2", "198.18.9.9:40000"), ("b3", "198.18.3.2:1")
    )
    losses = detect_mapping_losses(before, after, {("b1", "hub"): 54})
    assert losses == [
        MappingLoss(
            "b1", "hub", at(60), 54, "hub saw its endpoint move 198.18.1.2:40000 → 198.18.1.2:40017"
        )
    ]

"""MTU policy: IPv4 and IPv6 underlays, asymmetric paths, unmeasured links, jumbo paths, the
IPv6 minimum, wireguard-go's padding rule, overrides — values and reasons."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fleetvpn.controller.policy import (
    OVERHEAD_BYTES,
    MtuMemo,
    apply_mtu_override,
    decide_mtus,
    direction_mtu,
    find_override,
    floor16,
    latest_link_measurements,
    link_mtu,
    node_mtu_plan,
    padded_outer_bytes,
)
from fleetvpn.model import Family, LinkMeasurement, Override, Report


def measured(
    peer: str, path_mtu: int | None, family: Family = 4, **extra: object
) -> LinkMeasurement:
    return LinkMeasurement(
        peer=peer, family=family, rx_bytes=0, tx_bytes=0, path_mtu=path_mtu, **extra  # type: ignore[arg-type]
    )  # fmt: skip


def test_ipv4_underlay_subtracts_60() -> None:
    d = direction_mtu("hub", "branch1", measured("branch1", 1400))
    assert (d.tunnel_mtu, d.source, d.path_mtu, d.family) == (1340, "measured", 1400, 4)
    assert d.reason == "MTU 1340 hub→branch1: path MTU 1400 measured by hub (IPv4 underlay, −60)"


def test_ipv6_underlay_subtracts_80() -> None:
    d = direction_mtu("hub", "branch1", measured("branch1", 1500, 6))
    assert d.tunnel_mtu == 1420
    assert "path MTU 1500 measured by hub (IPv6 underlay, −80)" in d.reason


def test_a_symmetric_link_says_both_ways() -> None:
    fleet = decide_mtus(
        [("a", "b")], {("a", "b"): measured("b", 1400), ("b", "a"): measured("a", 1400)}, {}
    )
    link = fleet.links["a", "b"]
    assert link.tunnel_mtu == 1340
    assert link.reason == "MTU 1340: path MTU 1400 measured both ways (IPv4 underlay, −60)"


def test_asymmetric_paths_each_sender_its_own_direction_and_the_link_the_smaller() -> None:
    # a→b crosses a 1500 path, b→a a PPPoE-like 1400 one
    fleet = decide_mtus(
        [("a", "b")], {("a", "b"): measured("b", 1500), ("b", "a"): measured("a", 1400)}, {}
    )
    assert fleet.directions["a", "b"].tunnel_mtu == 1440
    assert fleet.directions["b", "a"].tunnel_mtu == 1340
    assert fleet.nodes["a"].routes[0].route_mtu == 1440  # a's route to b: a's own measurement
    assert fleet.nodes["b"].routes[0].route_mtu == 1340
    link = fleet.links["a", "b"]
    assert link.tunnel_mtu == 1340  # fits both directions
    assert "asymmetric" in link.reason
    assert "a→b 1440, b→a 1340" in link.reason
    assert "TCP uses the smaller" in link.reason


def test_unmeasured_links_get_the_safe_default() -> None:
    for m in (None, measured("b", None)):
        d = direction_mtu("a", "b", m)
        assert (d.tunnel_mtu, d.source) == (1280, "default")
        assert "unmeasured: safe default 1280" in d.reason
    # one direction measured, the other not: the link holds 1280 until both are known
    fleet = decide_mtus([("a", "b")], {("a", "b"): measured("b", 1500)}, {})
    assert fleet.directions["a", "b"].tunnel_mtu == 1440
    assert fleet.links["a", "b"].tunnel_mtu == 1280
    assert fleet.nodes["b"].interface_mtu == 1280
    assert "unmeasured" in fleet.nodes["b"].reason


def test_jumbo_paths() -> None:
    v4 = direction_mtu("a", "b", measured("b", 9000))
    assert v4.tunnel_mtu == 8940
    assert "jumbo path" in v4.reason
    assert direction_mtu("a", "b", measured("b", 9000, 6)).tunnel_mtu == 8920
    # beyond what the prober tries: taken as 9000, and the reason says so
    big = direction_mtu("a", "b", measured("b", 9216))
    assert big.tunnel_mtu == 8940
    assert "path MTU 9216 measured by a, taken as 9000" in big.reason


def test_below_1280_plus_overhead_ipv4_routes_go_lower_and_ipv6_fragments_outside() -> None:
    # IPv4 underlay, 1300-byte path: IPv4 inside fits at 1240; IPv6 inside cannot go below 1280
    small = direction_mtu("a", "b", measured("b", 1300))
    assert (small.tunnel_mtu, small.needs_fragmentation) == (1240, True)
    assert "IPv4 inside at 1240" in small.reason
    assert "IPv6 inside stays at 1280 (RFC 8200) with TCP's MSS clamped" in small.reason
    assert "fragmented outside the tunnel towards this peer's endpoint" in small.reason
    # the node's plan: the interface stays at the IPv6 minimum, the route below it is floor16
    # (wireguard-go pads 1240 to 1248 under a 1280 interface: 1308 > 1300) and fragments outside
    plan = node_mtu_plan("a", [small])
    assert plan.interface_mtu == 1280
    assert "the IPv6 minimum" in plan.reason
    (route,) = plan.routes
    assert (route.route_mtu, route.fragment_outer) == (1232, True)
    assert padded_outer_bytes(route.route_mtu, plan.interface_mtu, 60) <= 1300
    assert "TCP MSS 1172" in route.reason
    # a larger link on the same node keeps the interface above 1280; this route still fragments
    both = node_mtu_plan("a", [small, direction_mtu("a", "c", measured("c", 1500))])
    assert both.interface_mtu == 1440
    assert [(r.peer, r.route_mtu, r.fragment_outer) for r in both.routes] == [
        ("b", 1232, True),
        ("c", 1440, False),
    ]
    # an IPv6 underlay: the same routes, but routers never fragment IPv6, and the reason says so
    v6 = direction_mtu("a", "b", measured("b", 1300, 6))
    assert (v6.tunnel_mtu, v6.needs_fragmentation) == (1220, True)
    assert "lost: routers never fragment an IPv6 underlay" in v6.reason
    # an IPv4-only tunnel may go lower, down to 576, and nothing fragments
    v4_only = direction_mtu("a", "b", measured("b", 1300), carries_ipv6=False)
    assert (v4_only.tunnel_mtu, v4_only.needs_fragmentation) == (1240, False)
    assert not node_mtu_plan("a", [v4_only]).routes[0].fragment_outer
    assert node_mtu_plan("a", [v4_only]).interface_mtu == 1240
    tiny = direction_mtu("a", "b", measured("b", 600), carries_ipv6=False)
    assert (tiny.tunnel_mtu, tiny.needs_fragmentation) == (576, True)
    assert "IPv4 minimum" in tiny.reason
    # exactly 1280 + overhead is fine
    assert not direction_mtu("a", "b", measured("b", 1360, 6)).needs_fragmentation
    assert not direction_mtu("a", "b", measured("b", 1340)).needs_fragmentation


def test_the_padding_rule_from_design_md() -> None:
    # wireguard-go, interface MTU 1420, route MTU 1329, 1400 path: 1329 pads to 1344 + 60 = 1404
    assert padded_outer_bytes(1329, 1420, 60) == 1404
    assert padded_outer_bytes(1328, 1420, 60) == 1388
    assert padded_outer_bytes(None, 1340, 60) == 1400  # interface MTU exactly pmtu − 60: safe
    plan = node_mtu_plan(
        "hub",
        [
            direction_mtu("hub", "fast", measured("fast", 1480)),  # 1420: the interface MTU
            direction_mtu("hub", "slow", measured("slow", 1400)),  # 1340 → route 1328
            direction_mtu("hub", "v6", measured("v6", 1360, 6)),  # 1280: already a multiple of 16
        ],
    )
    assert plan.interface_mtu == 1420
    assert "the largest of 3 link(s)" in plan.reason
    routes = {r.peer: r for r in plan.routes}
    assert routes["fast"].route_mtu == 1420
    assert "= the interface MTU" in routes["fast"].reason
    assert (routes["slow"].route_mtu, routes["slow"].tunnel_mtu) == (1328, 1340)
    assert "floor16(1340)" in routes["slow"].reason
    assert "wireguard-go pads 1340 to 1344" in routes["slow"].reason
    assert routes["v6"].route_mtu == 1280
    assert "already a multiple of 16" in routes["v6"].reason


def test_two_links_at_the_interface_mtu_keep_the_exact_value() -> None:
    plan = node_mtu_plan(
        "a", [direction_mtu("a", p, measured(p, 1390)) for p in ("b", "c")]
    )  # 1330, not a multiple of 16, but padding is capped at the interface MTU 1330
    assert plan.interface_mtu == 1330
    assert [r.route_mtu for r in plan.routes] == [1330, 1330]


def test_a_node_without_links_gets_the_safe_default() -> None:
    plan = node_mtu_plan("lonely", [])
    assert (plan.interface_mtu, plan.routes) == (1280, ())


_paths = st.lists(
    st.tuples(st.integers(1280 + 80, 9000), st.sampled_from([4, 6])), min_size=1, max_size=6
)


@settings(max_examples=150, deadline=None)
@given(_paths)
def test_the_padding_rule_never_black_holes(paths: list[tuple[int, Family]]) -> None:
    peers = [f"p{i}" for i in range(len(paths))]
    fleet = decide_mtus(
        [("n", p) for p in peers],
        {("n", p): measured(p, path, fam) for p, (path, fam) in zip(peers, paths, strict=True)},
        {},
    )
    plan = fleet.nodes["n"]
    for route, (path_mtu, family) in zip(plan.routes, paths, strict=True):
        assert route.route_mtu <= plan.interface_mtu
        if route.route_mtu < plan.interface_mtu:
            assert route.route_mtu % 16 == 0
        assert route.route_mtu >= 1280
        # the largest packet the route lets through, padded by wireguard-go (to 16, capped at
        # the interface MTU), plus the overhead, fits the path
        padded = min(-(-route.route_mtu // 16) * 16, plan.interface_mtu)
        assert padded + OVERHEAD_BYTES[family] <= path_mtu
        assert padded_outer_bytes(route.route_mtu, plan.interface_mtu, OVERHEAD_BYTES[family]) == (
            padded + OVERHEAD_BYTES[family]
        )
        # and no more than 15 bytes are lost to the rule
        assert path_mtu - OVERHEAD_BYTES[family] - route.route_mtu < 16 or path_mtu > 9000


def test_floor16() -> None:
    assert [floor16(n) for n in (1280, 1295, 1296, 1340, 1420)] == [1280, 1280, 1296, 1328, 1408]


def test_overrides_beat_measurements_most_specific_first() -> None:
    overrides = [
        Override("site", "office1", "tunnel_mtu", 1200),
        Override("node", "branch1", "tunnel_mtu", 1300),
        Override("link", "branch1>hub", "tunnel_mtu", 1380, "carrier says 1440"),
        Override("link", "branch1>hub", "keepalive_s", 5),  # another setting: ignored here
    ]
    links = [("branch1", "hub"), ("branch1", "branch2"), ("branch2", "hub")]
    meas = {(a, b): measured(b, 1400) for a, b in links} | {
        (b, a): measured(a, 1400) for a, b in links
    }
    sites = {"branch1": "office1", "branch2": "office1", "hub": "dc"}
    fleet = decide_mtus(links, meas, sites, overrides)
    to_hub = fleet.directions["branch1", "hub"]
    assert (to_hub.tunnel_mtu, to_hub.source) == (1380, "override")
    assert to_hub.reason == (
        'MTU 1380 branch1→hub: override by admin (link branch1>hub, "carrier says 1440"): '
        "tunnel MTU 1380 (measured would be 1340)"
    )
    assert fleet.directions["branch1", "branch2"].tunnel_mtu == 1300  # node override
    assert fleet.directions["branch2", "hub"].tunnel_mtu == 1200  # site override
    assert fleet.directions["hub", "branch1"].source == "measured"  # the hub is in another site
    # the padding rule still holds for overridden values below the interface MTU
    routes = {r.peer: r.route_mtu for r in fleet.nodes["branch1"].routes}
    assert fleet.nodes["branch1"].interface_mtu == 1380
    assert routes == {"hub": 1380, "branch2": 1296}


def test_override_lookup_and_noop() -> None:
    d = direction_mtu("a", "b", None)
    assert apply_mtu_override(d, None) is d
    assert find_override([], "tunnel_mtu", "a", "b", "s") is None
    assert (
        find_override([Override("site", "s", "tunnel_mtu", 1300)], "tunnel_mtu", "a", "b", None)
        is None
    )
    default_reason = apply_mtu_override(d, Override("node", "a", "tunnel_mtu", 1300)).reason
    assert "(default would be 1280)" in default_reason


def test_latest_link_measurements_prefers_the_endpoint_in_use_then_the_smaller() -> None:
    def report(node: str, *ms: LinkMeasurement) -> Report:
        return Report.from_json(
            {
                "schema_version": 1,
                "report_id": "0b9e3b5c-1f3e-4c1a-9d2e-2b7d8f0c1a22",
                "node": node,
                "site": "s",
                "created_at": "2024-05-01T12:00:00Z",
                "measurements": [m.to_json() for m in ms],
            }
        )

    chosen = latest_link_measurements(
        [
            report("a", measured("b", 1500), measured("b", 1400, 6, endpoint="[2001:db8::1]:1")),
            report("c", measured("d", 1500), measured("d", 1400, 6)),
            report("e", measured("f", None), measured("f", 1400, 6)),
        ]
    )
    assert chosen["a", "b"].family == 6  # in use
    assert chosen["c", "d"].path_mtu == 1400  # 1320 over IPv6 < 1440 over IPv4
    assert chosen["e", "f"].path_mtu == 1400  # a measured one over an unmeasured one


def test_link_mtu_with_equal_values_from_different_paths_names_both() -> None:
    link = link_mtu(
        direction_mtu("a", "b", measured("b", 1400)),
        direction_mtu("b", "a", measured("a", 1420, 6)),
    )
    assert link.tunnel_mtu == 1340
    assert "both ways" in link.reason and "IPv6 underlay" in link.reason


def test_a_memo_reuses_what_did_not_change_and_decides_the_rest_anew() -> None:
    links = [("a", "b"), ("a", "c"), ("b", "c")]
    meas = {("a", "b"): measured("b", 1400), ("b", "a"): measured("a", 1500)}
    meas |= {("c", "a"): measured("a", 1480), ("b", "c"): measured("c", 1440, 6)}
    sites = {"a": "s1", "b": "s1", "c": "s2"}
    memo = MtuMemo()
    first = decide_mtus(links, meas, sites, memo=memo)
    assert first == decide_mtus(links, meas, sites)
    again = decide_mtus(links, meas, sites, memo=memo)
    assert again == first and again.nodes["a"] is first.nodes["a"]  # nothing changed: reused
    # b measures anew (a new report): b's decisions and plan are new, a's and c's reused
    changed = meas | {("b", "a"): measured("a", 1400)}
    after = decide_mtus(links, changed, sites, memo=memo)
    assert after == decide_mtus(links, changed, sites)
    assert after.directions["b", "a"].tunnel_mtu == 1340
    assert after.nodes["a"] is first.nodes["a"] and after.nodes["b"] is not first.nodes["b"]
    # an equal measurement that is another object is decided anew (no equality guesses)
    copied = changed | {("c", "a"): measured("a", 1480)}
    assert decide_mtus(links, copied, sites, memo=memo).nodes["c"] is not after.nodes["c"]
    # another site, new peers, or other overrides: decided anew, as without a memo
    for args in (
        (links, copied, sites | {"a": "s2"}, [Override("site", "s2", "tunnel_mtu", 1300)]),
        ([*links, ("a", "d")], copied, sites, []),
        (links, copied, sites, [Override("node", "c", "tunnel_mtu", 1280)]),
        (links, copied, sites, []),
    ):
        assert decide_mtus(*args, memo=memo) == decide_mtus(*args)

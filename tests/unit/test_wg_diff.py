"""The desired-vs-actual plan: each kind of change gives exactly its minimal commands with the
caller's reason; nothing differing gives nothing; the interface is never recreated for a
setting; and (property) applying a plan to a model of the interface reaches the desired state,
after which the plan is empty."""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetvpn.wg.diff import USERSPACE_ENV, Change, SpecError, plan, plan_restore
from fleetvpn.wg.state import PeerSpec, PeerStatus, TunnelSpec, TunnelState


def key(n: int) -> str:
    return base64.b64encode(bytes([n]) * 32).decode()


HUB, SHOP, HOME = key(1), key(2), key(3)
OWN = key(9)

SPEC = TunnelSpec(
    interface="wg0",
    listen_port=51820,
    addresses=("10.99.0.2/24",),
    mtu=1420,
    peers=(
        PeerSpec(HUB, "198.19.1.10:51820", ("10.99.0.1/32",), 25, 1328, "hub"),
        PeerSpec(SHOP, None, ("10.99.0.3/32", "fd00:99::3/128"), 0, None, "shop1"),
    ),
)


def state_of(spec: TunnelSpec, **changes: object) -> TunnelState:
    """The state an interface configured exactly as ``spec`` reads back as."""
    routes: dict[str, int | None] = {}
    for p in spec.peers:
        for cidr in p.allowed_ips:
            if ipaddress.ip_network(cidr, strict=False).prefixlen:
                routes[str(ipaddress.ip_network(cidr, strict=False))] = p.route_mtu
    state = TunnelState(
        interface=spec.interface,
        public_key=OWN,
        listen_port=spec.listen_port,
        mtu=spec.mtu,
        addresses=spec.addresses,
        peers=tuple(
            PeerStatus(p.public_key, p.endpoint, p.allowed_ips, p.keepalive_s, 0, 0, 0)
            for p in spec.peers
        ),
        route_mtus=routes,
        ifindex=7,
    )
    return dataclasses.replace(state, **changes)  # type: ignore[arg-type]


def with_peer(spec: TunnelSpec, public_key: str, **changes: object) -> TunnelSpec:
    peers = tuple(
        dataclasses.replace(p, **changes) if p.public_key == public_key else p  # type: ignore[arg-type]
        for p in spec.peers
    )
    return dataclasses.replace(spec, peers=peers)


def argvs(changes: Sequence[Change]) -> list[list[str]]:
    return [list(argv) for c in changes for argv in c.argvs]


def test_nothing_differs_nothing_to_do() -> None:
    assert plan(SPEC, state_of(SPEC)) == []
    assert plan(SPEC, state_of(SPEC), private_key_file="/k", public_key=OWN) == []


def test_equivalent_spellings_are_no_change() -> None:
    spec = dataclasses.replace(
        with_peer(SPEC, SHOP, allowed_ips=("fd00:99:0::3/128", "10.99.0.3/32")),
        addresses=("10.99.0.2/24",),
    )
    assert plan(spec, state_of(SPEC)) == []


def test_interface_mtu_is_one_ip_link_set_with_the_callers_reason() -> None:
    changes = plan(
        dataclasses.replace(SPEC, mtu=1380),
        state_of(SPEC),
        {"interface_mtu": "largest link 1380: PMTU 1440 measured"},
    )
    assert [(c.kind, c.summary, c.reason) for c in changes] == [
        ("interface_mtu", "wg0: mtu 1420 => 1380", "largest link 1380: PMTU 1440 measured")
    ]
    assert argvs(changes) == [["ip", "link", "set", "dev", "wg0", "mtu", "1380"]]


def test_keepalive_is_one_wg_set_of_that_peer() -> None:
    reasons = {f"{HUB}:keepalive": "site NAT lifetime 30 s: floor((30-3)/2)"}
    changes = plan(with_peer(SPEC, HUB, keepalive_s=13), state_of(SPEC), reasons)
    assert [(c.kind, c.summary, c.reason) for c in changes] == [
        ("keepalive", "peer hub: keepalive 25 s => 13 s", "site NAT lifetime 30 s: floor((30-3)/2)")
    ]
    assert argvs(changes) == [["wg", "set", "wg0", "peer", HUB, "persistent-keepalive", "13"]]
    off = plan(with_peer(SPEC, HUB, keepalive_s=0), state_of(SPEC))
    assert argvs(off) == [["wg", "set", "wg0", "peer", HUB, "persistent-keepalive", "off"]]
    assert off[0].summary == "peer hub: keepalive 25 s => off"
    assert off[0].reason == "desired keepalive; no reason given"


def test_endpoint_is_one_wg_set_and_none_keeps_the_learned_one() -> None:
    changes = plan(with_peer(SPEC, HUB, endpoint="198.19.1.11:51820"), state_of(SPEC))
    assert [c.kind for c in changes] == ["endpoint"]
    assert argvs(changes) == [["wg", "set", "wg0", "peer", HUB, "endpoint", "198.19.1.11:51820"]]
    learned = with_peer(SPEC, SHOP, endpoint="198.18.2.6:40001")
    assert plan(SPEC, state_of(learned)) == []


def test_route_mtu_is_ip_route_replace_per_route_of_that_peer() -> None:
    reasons = {f"{SHOP}:route_mtu": "PMTU 1400 both ways, wireguard-go padding: 1328"}
    changes = plan(with_peer(SPEC, SHOP, route_mtu=1328), state_of(SPEC), reasons)
    assert [(c.kind, c.reason) for c in changes] == [("route", reasons[f"{SHOP}:route_mtu"])]
    assert (
        changes[0].summary
        == "peer shop1: route 10.99.0.3/32, fd00:99::3/128 no mtu => mtu lock 1328"
    )
    assert argvs(changes) == [
        ["ip", "route", "replace", "10.99.0.3/32", "dev", "wg0", "mtu", "lock", "1328"],
        ["ip", "route", "replace", "fd00:99::3/128", "dev", "wg0", "mtu", "lock", "1328"],
    ]
    back = plan(SPEC, state_of(with_peer(SPEC, SHOP, route_mtu=1328)))
    assert argvs(back) == [
        ["ip", "route", "replace", "10.99.0.3/32", "dev", "wg0"],
        ["ip", "route", "replace", "fd00:99::3/128", "dev", "wg0"],
    ]


def test_a_route_mtu_below_1280_keeps_ipv6_routes_at_1280_with_tcp_mss_clamped() -> None:
    """Issue 12: a path under 1280 + overhead. IPv4 routes take the route MTU; an IPv6 route
    cannot (RFC 8200; the kernel refuses to send IPv6 under 1280), so it stays at 1280 and
    advertises an MSS that fits the route MTU; read back the same way, nothing is left to do."""
    low = with_peer(SPEC, SHOP, route_mtu=1232)
    changes = plan(low, state_of(SPEC))
    assert argvs(changes) == [
        ["ip", "route", "replace", "10.99.0.3/32", "dev", "wg0", "mtu", "lock", "1232"],
        ["ip", "route", "replace", "fd00:99::3/128", "dev", "wg0", "mtu", "lock", "1280",
         "advmss", "1172"],
    ]  # fmt: skip
    assert changes[0].summary.endswith("no mtu => per route")
    applied = state_of(
        SPEC,
        route_mtus={"10.99.0.1/32": 1328, "10.99.0.3/32": 1232, "fd00:99::3/128": 1280},
        route_advmss={"fd00:99::3/128": 1172},
    )
    assert plan(low, applied) == []
    # back above 1280: the advmss goes with a plain replace
    assert argvs(plan(with_peer(SPEC, SHOP, route_mtu=1328), applied)) == [
        ["ip", "route", "replace", "10.99.0.3/32", "dev", "wg0", "mtu", "lock", "1328"],
        ["ip", "route", "replace", "fd00:99::3/128", "dev", "wg0", "mtu", "lock", "1328"],
    ]
    # the interface of a tunnel that carries IPv6 still cannot go below 1280
    with pytest.raises(SpecError, match="mtu: 1232 out of range"):
        plan(dataclasses.replace(low, mtu=1232, addresses=("fd00:99::2/64",)), None)


def test_an_unlocked_route_mtu_is_locked() -> None:
    state = state_of(SPEC, route_mtus={"10.99.0.1/32": None, "10.99.0.3/32": None,
                                       "fd00:99::3/128": None},
                     unlocked_route_mtus={"10.99.0.1/32": 1328})  # fmt: skip
    changes = plan(SPEC, state)
    assert argvs(changes) == [
        ["ip", "route", "replace", "10.99.0.1/32", "dev", "wg0", "mtu", "lock", "1328"]
    ]
    assert changes[0].summary == "peer hub: route 10.99.0.1/32 mtu 1328 => mtu lock 1328"


def test_allowed_ips_change_is_one_wg_set_plus_the_route_difference() -> None:
    changes = plan(
        with_peer(SPEC, HUB, allowed_ips=("10.99.0.1/32", "10.99.5.0/24")),
        state_of(SPEC),
        {f"{HUB}:allowed_ips": "hub now routes the office LAN"},
    )
    assert [(c.kind, c.reason) for c in changes] == [
        ("allowed_ips", "hub now routes the office LAN"),
        ("route", "route MTU 1328; no reason given"),
    ]
    assert argvs(changes) == [
        ["wg", "set", "wg0", "peer", HUB, "allowed-ips", "10.99.0.1/32,10.99.5.0/24"],
        ["ip", "route", "replace", "10.99.5.0/24", "dev", "wg0", "mtu", "lock", "1328"],
    ]
    narrowed = plan(
        SPEC, state_of(with_peer(SPEC, HUB, allowed_ips=("10.99.0.1/32", "10.99.5.0/24")))
    )
    assert argvs(narrowed) == [
        ["wg", "set", "wg0", "peer", HUB, "allowed-ips", "10.99.0.1/32"],
        ["ip", "route", "del", "10.99.5.0/24", "dev", "wg0"],
    ]


def test_adding_a_peer_is_one_wg_set_and_its_routes() -> None:
    new = PeerSpec(HOME, "198.18.3.4:51820", ("10.99.0.4/32",), 13, 1412, "home1")
    desired = dataclasses.replace(SPEC, peers=(*SPEC.peers, new))
    changes = plan(desired, state_of(SPEC), {f"{HOME}:add": "enrolled", f"{HOME}:route_mtu": "r"})
    assert [(c.kind, c.reason) for c in changes] == [("peer_add", "enrolled"), ("route", "r")]
    assert changes[0].summary == (
        "add peer home1: endpoint 198.18.3.4:51820, allowed-ips 10.99.0.4/32, keepalive 13 s"
    )
    assert argvs(changes) == [
        ["wg", "set", "wg0", "peer", HOME, "endpoint", "198.18.3.4:51820",
         "allowed-ips", "10.99.0.4/32", "persistent-keepalive", "13"],
        ["ip", "route", "replace", "10.99.0.4/32", "dev", "wg0", "mtu", "lock", "1412"],
    ]  # fmt: skip


def test_removing_a_peer_is_wg_remove_and_its_routes() -> None:
    desired = dataclasses.replace(SPEC, peers=SPEC.peers[:1])
    changes = plan(desired, state_of(SPEC), {f"{SHOP}:remove": "node retired"})
    assert [(c.kind, c.reason) for c in changes] == [
        ("peer_remove", "node retired"),
        ("route_del", "node retired"),
        ("route_del", "node retired"),
    ]
    assert argvs(changes) == [
        ["wg", "set", "wg0", "peer", SHOP, "remove"],
        ["ip", "route", "del", "10.99.0.3/32", "dev", "wg0"],
        ["ip", "route", "del", "fd00:99::3/128", "dev", "wg0"],
    ]


def test_a_stray_route_on_the_interface_is_removed() -> None:
    state = state_of(SPEC)
    state = dataclasses.replace(state, route_mtus={**state.route_mtus, "192.0.2.0/24": None})
    changes = plan(SPEC, state)
    assert [(c.kind, c.reason) for c in changes] == [
        ("route_del", "not among the desired peers' allowed IPs")
    ]


def test_a_default_route_allowed_ip_gets_no_route() -> None:
    spec = with_peer(SPEC, HUB, allowed_ips=("0.0.0.0/0", "10.99.0.1/32"))
    changes = plan(spec, state_of(SPEC))
    assert argvs(changes) == [
        ["wg", "set", "wg0", "peer", HUB, "allowed-ips", "0.0.0.0/0,10.99.0.1/32"]
    ]


def test_listen_port_addresses_and_link_state() -> None:
    desired = dataclasses.replace(
        SPEC, listen_port=51821, addresses=("10.99.0.2/24", "fd00:99::2/64")
    )
    state = state_of(SPEC, addresses=("10.99.0.2/24", "10.98.0.2/24"), is_up=False)
    changes = plan(desired, state)
    assert [c.kind for c in changes] == ["listen_port", "address_del", "address_add", "link_up"]
    assert argvs(changes) == [
        ["wg", "set", "wg0", "listen-port", "51821"],
        ["ip", "address", "del", "10.98.0.2/24", "dev", "wg0"],
        ["ip", "address", "add", "fd00:99::2/64", "dev", "wg0"],
        ["ip", "link", "set", "dev", "wg0", "up"],
    ]


def test_private_key_is_set_by_file_only_when_the_public_key_differs() -> None:
    changes = plan(SPEC, state_of(SPEC, public_key=""), private_key_file="/etc/wireguard/wg.key",
                   public_key=OWN)  # fmt: skip
    assert argvs(changes) == [["wg", "set", "wg0", "private-key", "/etc/wireguard/wg.key"]]
    assert plan(SPEC, state_of(SPEC), private_key_file="/k", public_key=OWN) == []


@pytest.mark.parametrize(
    ("implementation", "first", "fallback"),
    [
        ("auto", ["ip", "link", "add", "wg0", "type", "wireguard"],
         [["env", USERSPACE_ENV, "wireguard-go", "wg0"]]),
        ("kernel", ["ip", "link", "add", "wg0", "type", "wireguard"], []),
        ("userspace", ["env", USERSPACE_ENV, "wireguard-go", "wg0"], []),
    ],
)  # fmt: skip
def test_an_absent_interface_is_created_then_configured(
    implementation: str, first: list[str], fallback: list[list[str]]
) -> None:
    changes = plan(SPEC, None, private_key_file="/etc/wireguard/wg.key",
                   implementation=implementation)  # type: ignore[arg-type]  # fmt: skip
    assert [c.kind for c in changes] == [
        "create", "private_key", "listen_port", "interface_mtu", "address_add", "link_up",
        "peer_add", "peer_add", "route", "route",
    ]  # fmt: skip
    assert list(changes[0].argv) == first
    assert [list(a) for a in changes[0].fallback] == fallback
    assert argvs(changes)[1] == ["wg", "set", "wg0", "private-key", "/etc/wireguard/wg.key"]
    flat = [" ".join(a) for a in argvs(changes)]
    assert not any(OWN in a for a in flat)


def test_bad_desired_input_is_named() -> None:
    with pytest.raises(SpecError, match=r"peers\[0\]\.allowed_ips\[0\]: 'nope' is not ADDRESS"):
        plan(with_peer(SPEC, HUB, allowed_ips=("nope",)), None)
    twice = dataclasses.replace(SPEC, peers=(SPEC.peers[0], SPEC.peers[0]))
    with pytest.raises(ValueError, match="peer hub listed twice"):
        plan(twice, None)


def test_restore_undoes_what_a_half_applied_plan_did() -> None:
    before = state_of(SPEC)
    stray = PeerStatus(HOME, None, ("10.99.0.4/32",), 0, 0, 0, 0)
    now = dataclasses.replace(
        state_of(with_peer(SPEC, HUB, keepalive_s=7), mtu=1360),
        peers=(*state_of(with_peer(SPEC, HUB, keepalive_s=7)).peers, stray),
        route_mtus={**before.route_mtus, "10.99.0.4/32": 1300},
    )
    changes = plan_restore(before, now)
    assert [c.kind for c in changes] == ["interface_mtu", "peer_remove", "keepalive", "route_del"]
    assert all(c.reason == "rollback" for c in changes)
    assert argvs(changes) == [
        ["ip", "link", "set", "dev", "wg0", "mtu", "1420"],
        ["wg", "set", "wg0", "peer", HOME, "remove"],
        ["wg", "set", "wg0", "peer", HUB, "persistent-keepalive", "25"],
        ["ip", "route", "del", "10.99.0.4/32", "dev", "wg0"],
    ]
    assert plan_restore(None, now)[0].argvs == (("ip", "link", "del", "wg0"),)
    assert plan_restore(None, None) == []
    assert plan_restore(before, before) == []


# -- property: a plan applied to a model of the interface reaches the desired state ----------


def apply_to_model(state: TunnelState | None, changes: Sequence[Change]) -> TunnelState:
    """What the kernel and wg would make of these commands (the parts plan() uses)."""
    mtu = state.mtu if state else 1420
    port = state.listen_port if state else 0
    up = state.is_up if state else False
    addresses = list(state.addresses) if state else []
    peers = {p.public_key: p for p in state.peers} if state else {}
    routes = dict(state.route_mtus) if state else {}
    for change in changes:
        assert change.kind not in ("create", "delete") or state is None
        for argv in change.argvs:
            a = list(argv)
            if a[:2] == ["wg", "set"] and a[3] == "listen-port":
                port = int(a[4])
            elif a[:2] == ["wg", "set"] and a[3] == "peer":
                pk, rest = a[4], a[5:]
                if rest == ["remove"]:
                    del peers[pk]
                    continue
                p = peers.get(pk, PeerStatus(pk, None, (), 0, 0, 0, 0))
                for opt, value in zip(rest[::2], rest[1::2], strict=True):
                    if opt == "endpoint":
                        p = dataclasses.replace(p, endpoint=value)
                    elif opt == "allowed-ips":
                        p = dataclasses.replace(
                            p, allowed_ips=tuple(value.split(",")) if value else ()
                        )
                    elif opt == "persistent-keepalive":
                        p = dataclasses.replace(p, keepalive_s=0 if value == "off" else int(value))
                peers[pk] = p
            elif a[:3] == ["ip", "link", "set"]:
                if a[5] == "mtu":
                    mtu = int(a[6])
                else:
                    up = a[5] == "up"
            elif a[:3] == ["ip", "address", "add"]:
                addresses.append(a[3])
            elif a[:3] == ["ip", "address", "del"]:
                addresses.remove(a[3])
            elif a[:3] == ["ip", "route", "replace"]:
                routes[a[3]] = int(a[8]) if len(a) > 6 else None
            elif a[:3] == ["ip", "route", "del"]:
                del routes[a[3]]
    return TunnelState("wg0", OWN, port, mtu, tuple(addresses), tuple(peers.values()), routes,
                       is_up=up)  # fmt: skip


keys = st.sampled_from([key(n) for n in range(10, 13)])
v4 = st.integers(1, 254).map(lambda n: f"10.99.{n}.0/24")
peer_specs = st.builds(
    PeerSpec,
    public_key=keys,
    endpoint=st.one_of(st.none(), st.sampled_from(["198.18.0.1:51820", "[2001:2::1]:1"])),
    allowed_ips=st.lists(st.one_of(v4, st.just("fd00:99::/64"), st.just("0.0.0.0/0")),
                         max_size=3, unique=True).map(tuple),
    keepalive_s=st.sampled_from([0, 10, 25]),
    route_mtu=st.sampled_from([None, 1280, 1328]),
)  # fmt: skip
specs = st.builds(
    TunnelSpec,
    interface=st.just("wg0"),
    listen_port=st.sampled_from([51820, 51821]),
    addresses=st.lists(st.sampled_from(["10.99.0.1/24", "fd00:99::1/64"]), unique=True).map(tuple),
    mtu=st.sampled_from([1280, 1380, 1420]),
    peers=st.lists(peer_specs, max_size=4, unique_by=lambda p: p.public_key).map(tuple),
)


def routes_claimed_once(spec: TunnelSpec) -> bool:
    cidrs = [c for p in spec.peers for c in p.allowed_ips]
    return len(cidrs) == len(set(cidrs))


@settings(max_examples=400)
@given(specs, specs)
def test_any_plan_reaches_the_desired_state_live_and_minimally(
    a: TunnelSpec, b: TunnelSpec
) -> None:
    if not (routes_claimed_once(a) and routes_claimed_once(b)):
        return
    start = apply_to_model(None, plan(a, None))
    assert plan(a, start) == []
    changes = plan(b, start)
    assert not any(c.kind in ("create", "delete") for c in changes)  # never recreated
    per_peer = [(c.kind, c.argv[4]) for c in changes if c.argv[:2] == ("wg", "set") and
                len(c.argv) > 4]  # fmt: skip
    assert len(per_peer) == len(set(per_peer))  # at most one wg set per peer and attribute
    end = apply_to_model(start, changes)
    assert plan(b, end) == []
    assert plan(a, apply_to_model(end, plan_restore(start, end))) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"interface": "wg0 up"}, "interface: 'wg0 up' is not an interface name"),
        ({"interface": "-h"}, "interface: '-h' is not an interface name"),
        ({"listen_port": 0}, "listen_port: 0 is out of range"),
        ({"mtu": 68}, "mtu: 68 out of range (1280..9000: the tunnel carries IPv6)"),
        ({"mtu": 9001}, "mtu: 9001 out of range"),
        ({"mtu": "1420"}, "mtu: expected an integer MTU"),
        ({"addresses": ("10.99.0.2/24\n",)}, "addresses[0]:"),
        ({"addresses": ("fe80::1%eth0/64",)}, "addresses[0]:"),
        ({"peer": {"public_key": "--help"}}, "peers[0].public_key: not a WireGuard key"),
        ({"peer": {"endpoint": "1.2.3.4:51820\nPostUp"}}, "peers[0].endpoint:"),
        ({"peer": {"endpoint": "[fe80::1%1]:51820"}}, "peers[0].endpoint:"),
        ({"peer": {"endpoint": "-h:51820"}}, "peers[0].endpoint:"),
        ({"peer": {"allowed_ips": ("10.99.0.1/32,0.0.0.0/0",)}}, "peers[0].allowed_ips[0]:"),
        ({"peer": {"allowed_ips": "10.99.0.1/32"}}, "peers[0].allowed_ips: a tuple of CIDRs"),
        ({"peer": {"keepalive_s": 65536}}, "peers[0].keepalive_s: 65536 out of range"),
        ({"peer": {"keepalive_s": True}}, "peers[0].keepalive_s: not an integer"),
        ({"peer": {"route_mtu": 575}}, "peers[0].route_mtu: 575 out of range"),
        ({"peer": {"name": "hub\n[Peer]"}}, "peers[0].name: has an unprintable character"),
    ],
)
def test_hostile_values_never_reach_an_argv(change: dict[str, object], message: str) -> None:
    peer_change = change.pop("peer", None)
    spec = dataclasses.replace(SPEC, **change)  # type: ignore[arg-type]
    if isinstance(peer_change, dict):
        hub = dataclasses.replace(spec.peers[0], **peer_change)  # type: ignore[arg-type]
        spec = dataclasses.replace(spec, peers=(hub, *spec.peers[1:]))
    for actual in (None, state_of(SPEC)):
        with pytest.raises(SpecError) as refused:
            plan(spec, actual, private_key_file="/etc/wireguard/wg.key")
        assert str(refused.value).startswith(message), str(refused.value)


def test_an_ipv4_only_tunnel_goes_down_to_576_and_the_key_file_is_checked() -> None:
    v4 = dataclasses.replace(SPEC, mtu=576, peers=SPEC.peers[:1])
    assert [c.kind for c in plan(v4, state_of(SPEC))][:1] == ["interface_mtu"]
    with pytest.raises(SpecError, match=r"private_key_file: 'wg\.key' is not an absolute path"):
        plan(SPEC, None, private_key_file="wg.key")
    with pytest.raises(SpecError, match="private_key_file: has an unprintable"):
        plan(SPEC, None, private_key_file="/etc/wg.key\n")


def test_a_learned_endpoint_the_grammar_refuses_is_never_written_back() -> None:
    before = state_of(SPEC)
    scoped = PeerStatus(SHOP, "[fe80::1%eth0]:51820", ("10.99.0.3/32", "fd00:99::3/128"),
                        0, 0, 0, 0)  # fmt: skip
    before = dataclasses.replace(before, peers=(before.peers[0], scoped))
    now = dataclasses.replace(before, mtu=1360)
    flat = [" ".join(a) for a in argvs(plan_restore(before, now))]
    assert flat == ["ip link set dev wg0 mtu 1420"]
    with pytest.raises(SpecError, match="peer key"):
        plan(SPEC, dataclasses.replace(before, peers=(PeerStatus("--help", None, (), 0, 0, 0, 0),)))

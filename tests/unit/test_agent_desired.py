"""The agent trusts nothing in its desired state (issue 11): every hostile document is refused
naming the field, and what is accepted is exactly what the grammar and the agent's config allow."""

from __future__ import annotations

import copy
import ipaddress
import re
from typing import Any

import pytest

from fleetvpn.agent.desired import (
    REASON_WITHHELD,
    Acceptance,
    DesiredError,
    parse_desired,
)

HUB_KEY = "h" * 42 + "g="
CLOUD_KEY = "c" * 42 + "c="
OWN_KEY = "o" * 42 + "o="
V4 = ipaddress.ip_network("10.99.0.0/16")
V6 = ipaddress.ip_network("fd99::/64")
LAN = ipaddress.ip_network("192.168.10.0/24")
ACCEPT = Acceptance((V4, V6), (LAN,), own_public_key=OWN_KEY, node="branch1")


def doc() -> dict[str, Any]:
    return {
        "schema_version": 1, "node": "branch1", "site": "branch",
        "addresses": ["10.99.0.6/16", "fd99::6/64"], "listen_port": 51820,
        "interface_mtu": 1340, "interface_mtu_reason": "largest link",
        "peers": [
            {"peer": "hub", "site": "hub", "public_key": HUB_KEY,
             "endpoint": "198.19.1.11:51820",
             "allowed_ips": ["10.99.0.5/32", "fd99::5/128", "192.168.10.0/24"],
             "keepalive_s": 8, "keepalive_reason": "branch is behind NAT",
             "route_mtu": 1340, "route_mtu_reason": "path MTU 1400 measured"},
            {"peer": "cloud1", "site": "cloud", "public_key": CLOUD_KEY,
             "endpoint": "cloud1.example.net:51820",
             "allowed_ips": ["10.99.0.3/32"], "keepalive_s": 0,
             "keepalive_reason": "off", "route_mtu": 1280, "route_mtu_reason": "unmeasured"},
        ],
    }  # fmt: skip


def parse(d: Any, accept: Acceptance | None = ACCEPT) -> Any:
    return parse_desired(d, interface="wg0", listen_port=51820, accept=accept)


def test_a_good_document_with_routed_subnet_and_dns_endpoint() -> None:
    d = parse(doc())
    hub, cloud = d.spec.peers
    assert hub.allowed_ips == ("10.99.0.5/32", "fd99::5/128", "192.168.10.0/24")
    assert cloud.endpoint == "cloud1.example.net:51820"  # resolved by the daemon, not here
    assert [p.tunnel_ipv4 for p in d.peers] == ["10.99.0.5", "10.99.0.3"]
    assert d.warnings == ()


def hostile(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    d = copy.deepcopy(doc())
    target: Any = d
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return d


P0, P1 = ("peers", 0), ("peers", 1)
CASES = [
    # redirecting traffic: routes the agent never agreed to carry
    ((*P0, "allowed_ips"), ["0.0.0.0/0"], "peers[0].allowed_ips[0]: 0.0.0.0/0 is neither"),
    ((*P0, "allowed_ips"), ["::/0"], "peers[0].allowed_ips[0]: ::/0 is neither"),
    ((*P0, "allowed_ips"), ["0.0.0.0/1", "128.0.0.0/1"], "peers[0].allowed_ips[0]: 0.0.0.0/1"),
    ((*P0, "allowed_ips"), ["10.99.0.0/24"], "peers[0].allowed_ips[0]: 10.99.0.0/24 is neither"),
    ((*P0, "allowed_ips"), ["10.98.0.5/32"], "peers[0].allowed_ips[0]: 10.98.0.5/32 is neither"),
    ((*P0, "allowed_ips"), ["192.168.0.0/16"], "peers[0].allowed_ips[0]: 192.168.0.0/16"),
    (
        (*P1, "allowed_ips"),
        ["10.99.0.5/32"],
        "peers[1].allowed_ips[0] (cloud1): 10.99.0.5/32 overlaps 10.99.0.5/32 (peers[0]",
    ),
    (
        (*P1, "allowed_ips"),
        ["192.168.10.7/32"],
        "peers[1].allowed_ips[0] (cloud1): 192.168.10.7/32 overlaps 192.168.10.0/24",
    ),
    (
        (*P0, "allowed_ips"),
        ["10.99.0.6/32"],
        "peers[0].allowed_ips[0] (hub): 10.99.0.6/32 overlaps 10.99.0.6/32 (addresses[0])",
    ),
    (
        (*P0, "allowed_ips"),
        ["10.99.0.5/32", "10.99.0.5/32"],
        "peers[0].allowed_ips[1] (hub): 10.99.0.5/32 overlaps",
    ),
    ((*P0, "allowed_ips"), "10.99.0.5/32", "peers[0].allowed_ips: unexpected value"),
    ((*P0, "allowed_ips"), ["10.99.0.5/32\n"], "peers[0].allowed_ips[0]:"),
    ((*P0, "allowed_ips"), ["10.99.0.5"], "peers[0].allowed_ips[0]:"),
    # this node's own addresses outside the fleet's tunnel networks (a /1 route on wg0)
    (("addresses",), ["10.99.0.6/1"], "addresses[0]: 10.99.0.6/1 is outside the tunnel"),
    (("addresses",), ["172.16.0.6/24"], "addresses[0]: 172.16.0.6/24 is outside"),
    (("addresses",), [], "addresses: no tunnel address"),
    # keys: a flag for wg, a key that is not 32 bytes, the same key twice, our own key
    ((*P0, "public_key"), "--help", "peers[0].public_key: not a WireGuard key"),
    ((*P0, "public_key"), "h" * 43 + "=", "peers[0].public_key: not a WireGuard key"),
    ((*P1, "public_key"), HUB_KEY, "peers[1].public_key: the same key as peers[0]"),
    ((*P1, "public_key"), OWN_KEY, "peers[1].public_key: this node's own public key"),
    # names: newlines, upper case, another node's document, the same peer twice
    ((*P0, "peer"), "hub\n[Interface]", "peers[0].peer: 'hub\\n[Interface]' is not a name"),
    ((*P0, "site"), "Hub", "peers[0].site: 'Hub' is not a name"),
    (("node",), "branch2", "node: 'branch2' is not this node (branch1)"),
    (("site",), "br anch", "site: 'br anch' is not a name"),
    ((*P1, "peer"), "hub", "peers[1].peer: 'hub' is listed twice"),
    ((*P1, "peer"), "branch1", "peers[1].peer: 'branch1' is listed twice or is this node"),
    # endpoints: a scope id, a config file in a newline, non-ASCII digits, a port out of range
    ((*P0, "endpoint"), "[fe80::1%1]:51820", "peers[0].endpoint:"),
    ((*P0, "endpoint"), "1.2.3.4:51820\n[Interface]", "peers[0].endpoint:"),
    ((*P0, "endpoint"), "1.2.3.4:٥١٨٢٠", "peers[0].endpoint:"),
    ((*P0, "endpoint"), "1.2.3.4:65536", "peers[0].endpoint:"),
    ((*P0, "endpoint"), "-h:51820", "peers[0].endpoint:"),
    # MTUs and keepalive out of their ranges
    (("interface_mtu",), 68, "interface_mtu: 68 out of range (1280..9000: the tunnel carries"),
    (("interface_mtu",), 1279, "interface_mtu: 1279 out of range"),
    (("interface_mtu",), 9001, "interface_mtu: 9001 out of range"),
    (("interface_mtu",), 1340.0, "interface_mtu: unexpected value"),
    ((*P1, "route_mtu"), 575, "peers[1].route_mtu: 575 out of range (576..9000"),
    ((*P1, "outer_fragmentation"), "yes", "peers[1].outer_fragmentation: 'yes' is not a boolean"),
    ((*P1, "peer_keepalive_s"), 121, "peers[1].peer_keepalive_s: 121 is not a keepalive"),
    ((*P1, "peer_keepalive_s"), True, "peers[1].peer_keepalive_s: True is not a keepalive"),
    (("interface_mtu",), 1232, "interface_mtu: 1232 out of range (1280..9000"),
    ((*P1, "route_mtu"), 65535, "peers[1].route_mtu: 65535 out of range"),
    ((*P0, "keepalive_s"), 65535, "peers[0].keepalive_s: 65535 out of range (0..120 s)"),
    ((*P0, "keepalive_s"), 121, "peers[0].keepalive_s: 121 out of range"),
    ((*P0, "keepalive_s"), -1, "peers[0].keepalive_s: -1 out of range"),
    ((*P0, "keepalive_s"), True, "peers[0].keepalive_s: unexpected value True"),
]


@pytest.mark.parametrize(("path", "value", "message"), CASES)
def test_hostile_documents_are_refused_naming_the_field(
    path: tuple[Any, ...], value: Any, message: str
) -> None:
    with pytest.raises(DesiredError, match="^desired state: " + re.escape(message)):
        parse(hostile(path, value))


def test_refusals_are_one_line() -> None:
    for path, value, _ in CASES:
        with pytest.raises(DesiredError) as refused:
            parse(hostile(path, value))
        assert refused.value.args[0].isprintable(), refused.value


def test_ipv4_only_tunnels_go_down_to_576() -> None:
    d = doc()
    d["addresses"] = ["10.99.0.6/16"]
    d["peers"][0]["allowed_ips"] = ["10.99.0.5/32"]
    d["interface_mtu"] = 576
    d["peers"][1]["route_mtu"] = 576
    assert parse(d).spec.mtu == 576
    d["interface_mtu"] = 575
    with pytest.raises(DesiredError, match=r"interface_mtu: 575 out of range \(576\.\.9000\)"):
        parse(d)


def test_a_route_below_1280_with_outer_fragmentation_in_a_tunnel_that_carries_ipv6() -> None:
    """Issue 12: the controller lowers a peer's IPv4 routes below 1280 (its IPv6 routes stay
    at 1280, grammar.ipv6_route) and asks for outer fragmentation towards it."""
    d = doc()
    d["peers"][1]["route_mtu"] = 1232
    d["peers"][1]["outer_fragmentation"] = True
    d["peers"][1]["peer_keepalive_s"] = 8
    parsed = parse(d)
    assert [p.peer_keepalive_s for p in parsed.peers] == [0, 8]
    assert [(p.route_mtu, p.outer_fragmentation) for p in parsed.spec.peers] == [
        (1340, False),
        (1232, True),
    ]


def test_unprintable_reasons_are_withheld_with_a_warning() -> None:
    d = doc()
    d["interface_mtu_reason"] = "ok\n[Interface]\nPostUp = rm -rf /"
    d["peers"][0]["keepalive_reason"] = "\u202eevil"
    d["peers"][1]["route_mtu_reason"] = 7
    parsed = parse(d)
    assert parsed.reasons["interface_mtu"] == REASON_WITHHELD
    assert parsed.reasons[f"{HUB_KEY}:keepalive"] == f"hub: {REASON_WITHHELD}"
    assert parsed.reasons[f"{CLOUD_KEY}:route_mtu"] == f"cloud1: {REASON_WITHHELD}"
    assert len(parsed.warnings) == 3
    assert all(w.isprintable() and "PostUp" not in w for w in parsed.warnings)
    assert all(r.isprintable() for r in parsed.reasons.values())


def test_first_use_trusts_the_documents_own_networks_within_bounds() -> None:
    d = doc()
    d["peers"][0]["allowed_ips"] = ["10.99.0.5/32"]  # no routed subnets accepted by default
    first = parse(d, None)
    assert [str(n) for n in first.tunnel_networks] == ["10.99.0.0/16", "fd99::/64"]
    # a first document that would route a /1 through the tunnel is not trusted
    d["addresses"] = ["10.99.0.6/7"]
    with pytest.raises(DesiredError, match=r"addresses\[0\]: 10.99.0.6/7 is wider than /8"):
        parse(d, None)
    # a later document is held to the networks trusted before
    d["addresses"] = ["10.99.0.6/8", "fd99::6/64"]
    with pytest.raises(DesiredError, match=r"addresses\[0\]: 10.99.0.6/8 is outside"):
        parse(d, Acceptance(first.tunnel_networks))


def test_overlap_check_scales_to_a_hub() -> None:
    import time

    d = doc()
    peers = []
    for n in range(5000):
        key = f"{n:042d}" + "A="
        peers.append({"peer": f"n{n}", "site": "s", "public_key": key, "endpoint": None,
                      "allowed_ips": [f"10.99.{n // 250 + 1}.{n % 250 + 1}/32"],
                      "keepalive_s": 0, "route_mtu": 1280})  # fmt: skip
    d["peers"] = peers
    started = time.perf_counter()
    assert len(parse(d).peers) == 5000
    assert time.perf_counter() - started < 2.0
    peers[4999]["allowed_ips"] = ["10.99.1.1/32"]  # the first peer's
    with pytest.raises(DesiredError, match=r"overlaps 10\.99\.1\.1/32"):
        parse(d)

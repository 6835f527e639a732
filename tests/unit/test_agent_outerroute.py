"""The route towards a peer's endpoint that lets wireguard-go's outer packets fragment on the way
(issue 12 item 3): which endpoints get one, the commands, and the kernel's answers parsed."""

from __future__ import annotations

import dataclasses
import json
import subprocess

from fleetvpn.agent.outerroute import EndpointRoutes, Lookup, parse_lookup, plan, wanted
from fleetvpn.wg.state import PeerSpec, PeerStatus, TunnelSpec, TunnelState

HUB_KEY = "h" * 43 + "="
NAT_KEY = "n" * 43 + "="
V6_KEY = "v" * 43 + "="

SPEC = TunnelSpec("wg0", 51820, ("10.99.0.1/16", "fd99::1/64"), 1280, (
    PeerSpec(HUB_KEY, "198.18.0.10:51820", ("10.99.0.2/32",), 0, 1232, "hub", True),
    PeerSpec(NAT_KEY, None, ("10.99.0.3/32",), 0, 1232, "branch1", True),
    PeerSpec(V6_KEY, "[2001:2::5]:51820", ("10.99.0.4/32",), 0, 1232, "v6", True),
))  # fmt: skip


def state(implementation: str = "userspace", nat_endpoint: str | None = "198.19.7.2:40001"):
    return TunnelState(
        "wg0", HUB_KEY, 51820, 1280, SPEC.addresses,
        (PeerStatus(NAT_KEY, nat_endpoint, ("10.99.0.3/32",), 0, 0, 0, 0),),
        implementation=implementation,  # type: ignore[arg-type]
    )  # fmt: skip


def test_wireguard_go_locks_the_route_to_each_ipv4_endpoint_at_the_largest_outer_packet() -> None:
    # the configured endpoint, the learned one of a NATed peer; IPv6: routers never fragment
    assert wanted(SPEC, state()) == {
        "198.18.0.10": (1340, "hub"),
        "198.19.7.2": (1340, "branch1"),
    }
    # kernel WireGuard never sets DF on IPv4: nothing to do; no state (no tunnel): nothing
    assert wanted(SPEC, state("kernel")) == {}
    assert wanted(SPEC, None) == {}
    # not asked for: nothing; an endpoint not known yet: nothing
    plain = dataclasses.replace(
        SPEC, peers=tuple(dataclasses.replace(p, outer_fragmentation=False) for p in SPEC.peers)
    )
    assert wanted(plain, state()) == {}
    assert wanted(SPEC, state(nat_endpoint=None)) == {"198.18.0.10": (1340, "hub")}


def test_plan_adds_replaces_and_removes_only_its_own_routes() -> None:
    want = {"198.18.0.10": (1340, "hub"), "198.19.7.2": (1340, "branch1")}
    ours = {"198.18.0.10": 1340, "203.0.113.9": 1340, "198.19.7.2": 1420}
    lookups = {"198.19.7.2": Lookup("uplink", "198.19.1.1", "198.19.1.10")}
    assert plan(want, ours, lookups, "wg0") == [
        (("ip", "-4", "route", "del", "203.0.113.9/32", "proto", "252"),
         "203.0.113.9: outer fragmentation no longer wanted"),
        (("ip", "-4", "route", "replace", "198.19.7.2/32", "via", "198.19.1.1", "dev", "uplink",
          "src", "198.19.1.10", "mtu", "lock", "1340", "proto", "252"),
         "peer branch1: outer packets towards 198.19.7.2 leave without DF, fragmented on the way "
         "(route MTU locked at 1340, the largest the tunnel sends)"),
    ]  # fmt: skip
    # no route to it, or one through the tunnel itself: no route added
    assert plan({"198.19.7.2": (1340, "b")}, {}, {"198.19.7.2": None}, "wg0") == []
    through = {"198.19.7.2": Lookup("wg0")}
    assert plan({"198.19.7.2": (1340, "b")}, {}, through, "wg0") == []
    # a directly connected endpoint: no gateway
    direct = {"198.19.7.2": Lookup("eth0")}
    assert plan({"198.19.7.2": (1340, "b")}, {}, direct, "wg0")[0][0] == (
        "ip", "-4", "route", "replace", "198.19.7.2/32", "dev", "eth0",
        "mtu", "lock", "1340", "proto", "252",
    )  # fmt: skip


def test_route_get_answers_are_parsed_through_their_grammars() -> None:
    text = (
        '[{"dst":"198.19.7.2","gateway":"198.19.1.1","dev":"uplink","prefsrc":"198.19.1.10",'
        '"flags":[],"uid":0,"cache":[]}]'
    )
    assert parse_lookup(text) == Lookup("uplink", "198.19.1.1", "198.19.1.10")
    assert parse_lookup('[{"dst":"198.19.7.2","dev":"eth0"}]') == Lookup("eth0")
    # a device name that would be an option, a gateway that is not an address, not unicast,
    # two answers, not JSON: no route
    for bad in (
        '[{"dst":"x","dev":"-h"}]',
        '[{"dst":"x","dev":"eth0","gateway":"1.2.3.4 mtu 9000"}]',
        '[{"type":"unreachable","dst":"x","dev":"lo"}]',
        '[{"dev":"eth0"},{"dev":"eth1"}]',
        "not json",
        "[]",
    ):
        assert parse_lookup(bad) is None, bad


class FakeIp:
    """``ip`` as EndpointRoutes uses it: our proto 252 routes in a dict, route get answers."""

    def __init__(self) -> None:
        self.routes: dict[str, int] = {}
        self.ran: list[list[str]] = []
        self.dry_run = False

    def run(self, argv: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        self.ran.append(argv)
        out = ""
        if argv[:5] == ["ip", "-4", "-d", "route", "show"]:
            out = "".join(f"unicast {a} via 198.19.1.1 dev up proto 252 mtu lock {m}\n"
                          for a, m in self.routes.items())  # fmt: skip
        elif argv[:4] == ["ip", "-j", "-4", "route"]:
            out = json.dumps([{"dst": argv[-1], "gateway": "198.19.1.1", "dev": "up"}])
        elif argv[:4] == ["ip", "-4", "route", "replace"]:
            self.routes[argv[4].removesuffix("/32")] = int(argv[argv.index("lock") + 1])
        elif argv[:4] == ["ip", "-4", "route", "del"]:
            self.routes.pop(argv[4].removesuffix("/32"), None)
        return subprocess.CompletedProcess(argv, 0, out, "")


def test_sync_makes_the_routes_puts_back_a_removed_one_and_reads_nothing_when_idle() -> None:
    ip = FakeIp()
    routes = EndpointRoutes("wg0", ip)  # type: ignore[arg-type]
    want = {"198.18.0.10": (1340, "hub")}
    assert len(routes.sync(want)) == 1 and ip.routes == {"198.18.0.10": 1340}
    assert routes.in_place == {"hub"}
    ip.ran.clear()
    assert routes.sync(want) == [] and len(ip.ran) == 1  # one read, nothing to do
    del ip.routes["198.18.0.10"]  # somebody removed it
    assert routes.sync(want) and ip.routes == {"198.18.0.10": 1340}
    assert routes.sync({}) == ["198.18.0.10: outer fragmentation no longer wanted"]
    assert ip.routes == {} and routes.in_place == set()
    ip.ran.clear()
    assert routes.sync({}) == [] and ip.ran == []  # nothing wanted, nothing made: no command

"""The topology file: the default parses; bad files are refused with file, key and problem."""

from __future__ import annotations

import ipaddress
import itertools
from pathlib import Path

import pytest

from fleetvpn.lab import topology
from fleetvpn.lab.plan import build_plan, subnets
from fleetvpn.lab.topology import TopologyError

REPO = Path(__file__).resolve().parents[2]
DEFAULT = REPO / "inventories/lab/topology.yml"

GOOD = """
name: t
controller: c
sites:
  hub: {kind: public, ipv6: true, hosts: [c, h]}
  br: {kind: nat, uplink_mtu: 1400, icmp_blackhole: true, hosts: [b],
       conntrack: {udp_timeout: 10, udp_timeout_stream: 20}}
"""


def test_default_topology_reproduces_the_failure_it_promises() -> None:
    topo = topology.load(DEFAULT)
    kinds = {s.kind for s in topo.sites}
    assert {"public", "nat", "double_nat", "firewall"} <= kinds
    short = [s for s in topo.sites if s.nated and s.stream_timeout and s.stream_timeout <= 20]
    assert any(s.uplink_mtu == 1400 and s.icmp_blackhole for s in short)
    assert any(s.ipv6 for s in topo.sites)
    assert topo.site_of(topo.controller).kind == "public"


def test_plan_addresses_are_unique_and_inside_the_lab_ranges() -> None:
    plan = build_plan(topology.load(DEFAULT))
    addrs = [
        a.split("/")[0] for ns in plan.namespaces.values() for i in ns.ifaces for a in i.addresses
    ]
    assert len(addrs) == len(set(addrs))
    allowed = [
        ipaddress.ip_network(n)
        for n in ("198.18.0.0/15", "2001:2::/48", "10.0.0.0/8", "100.64.0.0/10", "192.168.0.0/16")
    ]
    for a in addrs:
        ip = ipaddress.ip_address(a)
        assert any(ip.version == n.version and ip in n for n in allowed), a
    assert all(ns.name.startswith("fleetlab-") for ns in plan.namespaces.values())


def test_interface_names_fit_the_kernel_limit() -> None:
    plan = build_plan(topology.load(DEFAULT))
    for ns in plan.namespaces.values():
        for i in ns.ifaces:
            assert len(i.name) <= 15


def test_double_nat_boxes_expect_the_shorter_timer_end_to_end() -> None:
    plan = build_plan(topology.load(DEFAULT))
    home = [b for b in plan.boxes if b.site == "home"]
    assert {b.label for b in home} == {"home NAT + carrier NAT", "carrier NAT"}
    end_to_end = next(b for b in home if b.label != "carrier NAT")
    carrier = next(b for b in home if b.label == "carrier NAT")
    assert end_to_end.stream_timeout == 30 and carrier.stream_timeout == 45
    assert carrier.source_ns == "fleetlab-home-r"


def _error(text: str) -> TopologyError:
    with pytest.raises(TopologyError) as info:
        topology.parse(text, "lab.yml")
    return info.value


@pytest.mark.parametrize(
    ("mutation", "key", "problem"),
    [
        (("kind: nat", "kind: nat, colour: red"), "sites.br.colour", "unknown key"),
        (("name: t", "name: t\nextra: 1"), "extra", "unknown key"),
        (("udp_timeout: 10", "udp_timeout: 0"), "sites.br.conntrack.udp_timeout", "out of range"),
        (("udp_timeout_stream: 20", "udp_timeout_stream: 0"), "udp_timeout_stream", "out of range"),
        (("ipv6: true", "ipv6: true, uplink_mtu: 1200"), "sites.hub.uplink_mtu", "1280"),
        (("kind: public", "kind: pubic"), "sites.hub.kind", "must be one of"),
        (("hosts: [b]", "hosts: [c]"), "sites.br.hosts", "already in site"),
        (("controller: c", "controller: b"), "controller", "public site"),
        (("controller: c", "controller: zz"), "controller", "not a host"),
        (("hosts: [b]", "hosts: [core]"), "sites.br.hosts[0]", "reserved"),
        (("uplink_mtu: 1400", "uplink_mtu: 9001"), "sites.br.uplink_mtu", "out of range"),
        (("uplink_mtu: 1400", "uplink_mtu: '1400'"), "sites.br.uplink_mtu", "integer"),
        (("name: t", "name: Bad-Name"), "name", "not a valid name"),
        (("kind: nat,", "kind: nat, lan: 198.18.1.0/24,"), "sites.br", "overlaps"),
        (("kind: nat,", "kind: nat, lan: 10.254.0.0/24,"), "sites.br.lan", "overlaps"),
        (("kind: nat,", "kind: nat, lan: 10.0.0.0/33,"), "sites.br.lan", "not a valid"),
        (("icmp_blackhole: true", "icmp_blackhole: yes please"), "icmp_blackhole", "true or false"),
        (
            ("controller: c", "controller: c\ncontroller_tls: 'yes'"),
            "controller_tls",
            "true or false",
        ),
    ],
)
def test_bad_topologies_name_file_key_and_problem(
    mutation: tuple[str, str], key: str, problem: str
) -> None:
    old, new = mutation
    assert old in GOOD
    err = _error(GOOD.replace(old, new, 1))
    assert err.source == "lab.yml"
    assert key in err.key
    assert problem in err.problem
    assert str(err).startswith("lab.yml: ")


def test_conntrack_on_a_public_site_is_refused() -> None:
    err = _error(GOOD.replace("kind: public,", "kind: public, conntrack: {udp_timeout: 5},"))
    assert err.key == "sites.hub.conntrack"


def test_yaml_syntax_errors_name_the_line() -> None:
    err = _error("name: t\nsites: [\n")
    assert "YAML" in err.problem and err.key.startswith("line ")


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="cannot read"):
        topology.load(tmp_path / "missing.yml")


def test_subnets_of_a_big_generated_topology_never_overlap() -> None:
    sites = "\n".join(
        f"  s{i}: {{kind: {k}, hosts: [h{i}]}}"
        for i, k in zip(range(60), itertools.cycle(topology.SITE_KINDS), strict=False)
    )
    text = f"name: big\ncontroller: h0\nsites:\n{sites}\n"
    topo = topology.parse(text)
    nets = [n for _, n in subnets(topo)]
    for a, b in itertools.combinations(nets, 2):
        assert not (a.version == b.version and a.overlaps(b)), (a, b)


def test_a_lab_controller_serves_tls_only_when_the_topology_says_so() -> None:
    assert topology.parse(GOOD, "lab.yml").controller_tls is False
    assert topology.parse(GOOD + "controller_tls: true\n", "lab.yml").controller_tls is True

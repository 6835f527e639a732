"""From a topology to a build plan: every namespace, link, address, route, sysctl and ruleset.

Pure: the plan is data; :mod:`fleetvpn.lab.build` executes it. The shape of one site::

    core ──s<i>── tocore:[isp]:tosite ══bottleneck══ wan:[router]:br0 ── eth0:[host] ...
                                               (double_nat: wan:[cgn]:lan ── wan:[router]:br0)

- ``core`` is the "internet" (198.18.0.0/15 and 2001:2::/48, both benchmarking ranges). Its
  anchor addresses 198.18.0.1 and 2001:2::1 (on ``lo``) are where ``lab verify`` sends from/to.
- ``isp`` is the site's provider router, on the far side of the bottleneck. With
  ``icmp_blackhole`` it, and the site router on the near side, drop the ICMP "fragmentation
  needed" / "packet too big" they would send about the bottleneck: a PMTU black hole both ways.
- ``router`` (``<site>-r``) NATs (MASQUERADE), filters statefully, or just routes.
- ``cgn`` (``<site>-cgn``) is the carrier NAT of a ``double_nat`` site (100.64.0.0/10 inside).
- hosts have ``eth0`` on the site LAN and ``mgmt0`` on the management bridge in ``<lab>-mgmt``,
  which carries only SSH (never the data path under test).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal

from fleetvpn.lab.topology import Conntrack, Site, Topology

IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network
Role = Literal["core", "isp", "router", "cgn", "host", "mgmt"]

ANCHOR_V4 = ipaddress.IPv4Address("198.18.0.1")
ANCHOR_V6 = ipaddress.IPv6Address("2001:2::1")
HOST_OFFSET = 10  # first host address in a LAN: .10


@dataclass
class Iface:
    name: str
    mtu: int = 1500
    addresses: list[str] = field(default_factory=list)  # CIDR strings
    master: str | None = None  # the bridge this port belongs to
    bridge: bool = False  # this interface *is* a bridge (created in its namespace)


@dataclass
class Route:
    dst: str  # "default" or a CIDR
    via: str


@dataclass
class Namespace:
    name: str  # full namespace name, "<lab>-<short>"
    role: Role
    ifaces: list[Iface] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    sysctls: dict[str, str] = field(default_factory=dict)
    conntrack: Conntrack | None = None  # UDP timers, when this namespace is a stateful box
    nft: str = ""
    host: str | None = None  # lab host name, for role "host"
    site: str | None = None

    def iface(self, name: str) -> Iface:
        return next(i for i in self.ifaces if i.name == name)


@dataclass(frozen=True)
class Veth:
    a_ns: str
    a_if: str
    b_ns: str
    b_if: str


@dataclass(frozen=True)
class HostPlan:
    name: str
    site: str
    ns: str
    mgmt_ip: str
    ipv4: str  # LAN address
    public_ipv4: str  # how the internet sees it: its own address, or the outermost NAT's
    ipv6: str | None


@dataclass(frozen=True)
class StatefulBox:
    """A NAT or firewall, seen from the namespace directly behind it: what ``verify`` checks."""

    site: str
    label: str  # "router", "home NAT", "carrier NAT", "firewall"
    box_ns: str
    source_ns: str  # a namespace behind the box whose traffic crosses every box on the way out
    stream_timeout: int  # the shortest established-flow timer on the way out
    unreplied_timeout: int
    nat: bool


@dataclass
class Plan:
    lab: str
    namespaces: dict[str, Namespace]
    veths: list[Veth]
    hosts: dict[str, HostPlan]
    boxes: list[StatefulBox]
    core: str
    mgmt: str


def ns_name(lab: str, short: str) -> str:
    return f"{lab}-{short}"


def site_index(topo: Topology, site: Site) -> int:
    return topo.sites.index(site) + 1


def default_lan(site: Site, index: int) -> ipaddress.IPv4Network:
    if site.lan is not None:
        return site.lan
    if site.kind == "nat":
        return ipaddress.IPv4Network(f"10.{index}.0.0/24")
    if site.kind == "double_nat":
        return ipaddress.IPv4Network(f"192.168.{index}.0/24")
    return ipaddress.IPv4Network(f"198.19.{index}.0/24")


def _v4(index: int, offset: int) -> ipaddress.IPv4Network:
    """Transit /30s inside 198.18.<index>.0/24: offset 0 core↔isp, 4 isp↔router."""
    return ipaddress.IPv4Network(f"198.18.{index}.{offset}/30")


def _v6(index: int, sub: int) -> ipaddress.IPv6Network:
    """Site <index> owns 2001:2:0:<index>0::/60.

    sub 0: core↔isp, 1: isp↔router, 2: cgn↔router, 3: LAN.
    """
    return ipaddress.IPv6Network(f"2001:2:0:{index:x}{sub:x}::/64")


def _cgn_link(index: int) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(f"100.64.{index}.0/24")


def _addr(net: IPNet, n: int) -> str:
    return f"{net[n]}/{net.prefixlen}"


def _ip(net: IPNet, n: int) -> str:
    return str(net[n])


def subnets(topo: Topology) -> list[tuple[str, IPNet]]:
    """Every subnet the lab will use, with the topology key it comes from (for overlap checks)."""
    out: list[tuple[str, IPNet]] = [("management", topo.management)]
    for site in topo.sites:
        i = site_index(topo, site)
        key = f"sites.{site.name}"
        out.append((f"{key} (uplink)", ipaddress.IPv4Network(f"198.18.{i}.0/24")))
        out.append((f"{key}.lan" if site.lan else f"{key} (lan)", default_lan(site, i)))
        if site.kind == "double_nat":
            out.append((f"{key} (carrier link)", _cgn_link(i)))
        if site.ipv6:
            out.append((f"{key} (ipv6)", ipaddress.IPv6Network(f"2001:2:0:{i:x}0::/60")))
    return out


_BLACKHOLE = """\
    # PMTU black hole: the ICMP that would report the bottleneck never leaves this box
    icmp type destination-unreachable icmp code frag-needed drop
    icmpv6 type packet-too-big drop
"""


def _ruleset(*, blackhole: bool, loss_percent: int, stateful: bool, masquerade: bool) -> str:
    """An nftables ruleset for one box (applied atomically after ``flush ruleset``)."""
    parts = ["flush ruleset\n"]
    filt = []
    if stateful or loss_percent:
        rules = []
        if loss_percent:
            rules.append(f"    numgen random mod 100 < {loss_percent} drop  # uplink loss\n")
        if stateful:
            rules.append("    ct state established,related accept\n")
            rules.append('    iifname "wan" drop  # stateful: nothing new gets in\n')
        filt.append(
            "  chain forward {\n    type filter hook forward priority filter; policy accept;\n"
            + "".join(rules)
            + "  }\n"
        )
    if blackhole:
        filt.append(
            "  chain output {\n    type filter hook output priority filter; policy accept;\n"
            + _BLACKHOLE
            + "  }\n"
        )
    if filt:
        parts.append("table inet lab {\n" + "".join(filt) + "}\n")
    if masquerade:
        parts.append(
            "table ip labnat {\n  chain postrouting {\n"
            "    type nat hook postrouting priority srcnat; policy accept;\n"
            '    oifname "wan" masquerade\n  }\n}\n'
        )
    return "".join(parts) if len(parts) > 1 else ""


_ROUTER_SYSCTLS = {"net/ipv4/ip_forward": "1", "net/ipv6/conf/all/forwarding": "1"}


def _conntrack_sysctls(ct: Conntrack) -> dict[str, str]:
    return {
        "net/netfilter/nf_conntrack_udp_timeout": str(ct.udp_timeout),
        "net/netfilter/nf_conntrack_udp_timeout_stream": str(ct.udp_timeout_stream),
    }


def build_plan(topo: Topology) -> Plan:
    lab = topo.name
    nss: dict[str, Namespace] = {}
    veths: list[Veth] = []
    hosts: dict[str, HostPlan] = {}
    boxes: list[StatefulBox] = []

    def add_ns(short: str, role: Role, **kw: object) -> Namespace:
        ns = Namespace(name=ns_name(lab, short), role=role, **kw)  # type: ignore[arg-type]
        if role != "host":
            ns.sysctls.update(_ROUTER_SYSCTLS if role not in ("mgmt",) else {})
        nss[ns.name] = ns
        return ns

    def link(a: Namespace, a_if: Iface, b: Namespace, b_if: Iface) -> None:
        a.ifaces.append(a_if)
        b.ifaces.append(b_if)
        veths.append(Veth(a.name, a_if.name, b.name, b_if.name))

    core = add_ns("core", "core")
    core.ifaces.append(Iface("lo", 65536, [f"{ANCHOR_V4}/32", f"{ANCHOR_V6}/128"]))
    mgmt = add_ns("mgmt", "mgmt")
    mgmt.ifaces.append(Iface("br0", 1500, [_addr(topo.management, 1)], bridge=True))

    host_no = 0
    for site in topo.sites:
        i = site_index(topo, site)
        up, down = _v4(i, 0), _v4(i, 4)
        up6, down6, cgn6, lan6 = (_v6(i, n) for n in range(4))
        v6 = site.ipv6
        outer_mtu = max(1500, site.uplink_mtu)

        isp = add_ns(f"{site.name}-isp", "isp", site=site.name)
        isp.nft = _ruleset(
            blackhole=site.icmp_blackhole,
            loss_percent=site.uplink_loss_percent,
            stateful=False,
            masquerade=False,
        )
        link(
            core,
            Iface(f"s{i}", outer_mtu, [_addr(up, 1)] + ([_addr(up6, 1)] if v6 else [])),
            isp,
            Iface("tocore", outer_mtu, [_addr(up, 2)] + ([_addr(up6, 2)] if v6 else [])),
        )
        isp.routes.append(Route("default", _ip(up, 1)))
        if v6:
            isp.routes.append(Route("default", _ip(up6, 1)))

        # The chain of site boxes from the bottleneck inwards.
        router = add_ns(f"{site.name}-r", "router", site=site.name)
        outer = router
        if site.kind == "double_nat":
            outer = add_ns(f"{site.name}-cgn", "cgn", site=site.name)
        bottleneck = site.uplink_mtu
        link(
            isp,
            Iface("tosite", bottleneck, [_addr(down, 1)] + ([_addr(down6, 1)] if v6 else [])),
            outer,
            Iface("wan", bottleneck, [_addr(down, 2)] + ([_addr(down6, 2)] if v6 else [])),
        )
        outer.routes.append(Route("default", _ip(down, 1)))
        if v6:
            outer.routes.append(Route("default", _ip(down6, 1)))
        public_ipv4 = _ip(down, 2)  # what the internet sees of a NATed site

        if outer is not router:
            assert site.carrier_conntrack is not None
            cl = _cgn_link(i)
            inner_mtu = max(1500, site.lan_mtu)
            link(
                outer,
                Iface("lan", inner_mtu, [_addr(cl, 1)] + ([_addr(cgn6, 1)] if v6 else [])),
                router,
                Iface("wan", inner_mtu, [_addr(cl, 2)] + ([_addr(cgn6, 2)] if v6 else [])),
            )
            router.routes.append(Route("default", _ip(cl, 1)))
            if v6:
                router.routes.append(Route("default", _ip(cgn6, 1)))
                outer.routes.append(Route(str(lan6), _ip(cgn6, 2)))
            outer.conntrack = site.carrier_conntrack
            outer.sysctls.update(_conntrack_sysctls(site.carrier_conntrack))
            outer.nft = _ruleset(
                blackhole=site.icmp_blackhole, loss_percent=0, stateful=True, masquerade=True
            )

        lan = default_lan(site, i)
        router.ifaces.append(
            Iface(
                "br0",
                site.lan_mtu,
                [_addr(lan, 1)] + ([_addr(lan6, 1)] if v6 else []),
                bridge=True,
            )
        )
        if site.conntrack is not None:
            router.conntrack = site.conntrack
            router.sysctls.update(_conntrack_sysctls(site.conntrack))
        router.nft = _ruleset(
            blackhole=site.icmp_blackhole and outer is router,
            loss_percent=0,
            stateful=site.stateful,
            masquerade=site.nated,
        )

        # How the internet reaches the site's addresses.
        core.routes.append(Route(str(down), _ip(up, 2)))
        if not site.nated:
            isp.routes.append(Route(str(lan), _ip(down, 2)))
            core.routes.append(Route(str(lan), _ip(up, 2)))
        if v6:
            core.routes.append(Route(f"2001:2:0:{i:x}0::/60", _ip(up6, 2)))
            isp.routes.append(Route(str(lan6), _ip(down6, 2)))
            if outer is not router:
                isp.routes.append(Route(str(cgn6), _ip(down6, 2)))

        for k, name in enumerate(site.hosts):
            host_no += 1
            port = f"p{k + 1}"
            ipv4 = _ip(lan, HOST_OFFSET + k)
            ipv6 = _ip(lan6, HOST_OFFSET + k) if v6 else None
            h = add_ns(name, "host", host=name, site=site.name)
            link(
                router,
                Iface(port, site.lan_mtu, master="br0"),
                h,
                Iface(
                    "eth0",
                    site.lan_mtu,
                    [_addr(lan, HOST_OFFSET + k)] + ([_addr(lan6, HOST_OFFSET + k)] if v6 else []),
                ),
            )
            h.routes.append(Route("default", _ip(lan, 1)))
            if v6:
                h.routes.append(Route("default", _ip(lan6, 1)))
            mgmt_ip = _ip(topo.management, HOST_OFFSET + host_no - 1)
            link(
                mgmt,
                Iface(f"h{host_no}", 1500, master="br0"),
                h,
                Iface("mgmt0", 1500, [f"{mgmt_ip}/{topo.management.prefixlen}"]),
            )
            hosts[name] = HostPlan(
                name=name,
                site=site.name,
                ns=h.name,
                mgmt_ip=mgmt_ip,
                ipv4=ipv4,
                public_ipv4=public_ipv4 if site.nated else ipv4,
                ipv6=ipv6,
            )

        first_host = ns_name(lab, site.hosts[0])
        if site.conntrack is not None:
            label = {"nat": "NAT", "double_nat": "home NAT + carrier NAT", "firewall": "firewall"}
            stream, unreplied = site.stream_timeout, site.unreplied_timeout
            assert stream is not None and unreplied is not None
            boxes.append(
                StatefulBox(
                    site.name,
                    label[site.kind],
                    router.name,
                    first_host,
                    stream,
                    unreplied,
                    site.nated,
                )
            )
        if site.carrier_conntrack is not None:
            ct = site.carrier_conntrack
            boxes.append(
                StatefulBox(
                    site.name,
                    "carrier NAT",
                    outer.name,
                    router.name,
                    ct.udp_timeout_stream,
                    ct.udp_timeout,
                    True,
                )
            )

    return Plan(
        lab=lab,
        namespaces=nss,
        veths=veths,
        hosts=hosts,
        boxes=boxes,
        core=core.name,
        mgmt=mgmt.name,
    )

"""The lab's topology file: load, validate, and describe a fleet of sites.

A topology file is YAML (see ``inventories/lab/topology.yml`` for the documented default). This
module is pure: it reads text and returns frozen dataclasses, or raises :class:`TopologyError`
naming the file, the key and the problem. Nothing is created before a file has passed here.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

SiteKind = Literal["public", "firewall", "nat", "double_nat"]
SITE_KINDS: tuple[str, ...] = ("public", "firewall", "nat", "double_nat")

# Names become parts of namespace names (``<lab>-<site>-isp``) and of interface-free identifiers,
# so they are short, lower case, and without dashes (the dash separates the parts).
_NAME = re.compile(r"^[a-z][a-z0-9]*$")
LAB_NAME_MAX = 12
RESERVED_HOST_NAMES = frozenset({"core", "mgmt"})

MIN_MTU_IPV4 = 576  # RFC 791: every IPv4 host must accept 576-byte datagrams
MIN_MTU_IPV6 = 1280  # RFC 8200 §5
MAX_MTU = 9000  # jumbo frames; veth allows more, the product's probing stops here
MAX_SITES = 200
MAX_HOSTS = 240

DEFAULT_MANAGEMENT = ipaddress.IPv4Network("10.254.0.0/24")
INTERNET_V4 = ipaddress.IPv4Network("198.18.0.0/15")  # RFC 2544 benchmarking range
INTERNET_V6 = ipaddress.IPv6Network("2001:2::/48")  # RFC 5180 benchmarking range


class TopologyError(ValueError):
    """A topology file is wrong. ``str()`` reads ``FILE: KEY: PROBLEM``."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class Conntrack:
    """A stateful box's UDP timers (Linux ``nf_conntrack_udp_timeout[_stream]``), in seconds."""

    udp_timeout: int = 30
    udp_timeout_stream: int = 120


@dataclass(frozen=True)
class Site:
    name: str
    kind: SiteKind
    hosts: tuple[str, ...]
    uplink_mtu: int = 1500
    lan_mtu: int = 1500
    icmp_blackhole: bool = False
    uplink_loss_percent: int = 0
    ipv6: bool = False
    lan: ipaddress.IPv4Network | None = None
    conntrack: Conntrack | None = None  # the site router's timers (nat, double_nat, firewall)
    carrier_conntrack: Conntrack | None = None  # the carrier NAT's timers (double_nat only)

    @property
    def nated(self) -> bool:
        return self.kind in ("nat", "double_nat")

    @property
    def stateful(self) -> bool:
        return self.kind != "public"

    @property
    def path_mtu(self) -> int:
        """The largest IP packet a host of this site gets across its uplink (lab ground truth)."""
        return min(self.uplink_mtu, self.lan_mtu)

    @property
    def stream_timeout(self) -> int | None:
        """The established-flow lifetime a host of this site sees: the shortest box on its way."""
        timers = [c.udp_timeout_stream for c in (self.conntrack, self.carrier_conntrack) if c]
        return min(timers) if timers else None

    @property
    def unreplied_timeout(self) -> int | None:
        timers = [c.udp_timeout for c in (self.conntrack, self.carrier_conntrack) if c]
        return min(timers) if timers else None


@dataclass(frozen=True)
class Topology:
    name: str
    sites: tuple[Site, ...]
    controller: str
    source: str = "<topology>"
    management: ipaddress.IPv4Network = DEFAULT_MANAGEMENT
    controller_tls: bool = False
    host_sites: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def hosts(self) -> list[str]:
        return [h for s in self.sites for h in s.hosts]

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)

    def site_of(self, host: str) -> Site:
        return self.site(self.host_sites[host])


# --- loading -----------------------------------------------------------------------------------

_TOP_KEYS = {"name", "controller", "controller_tls", "management", "sites"}
_SITE_KEYS = {
    "kind",
    "hosts",
    "uplink_mtu",
    "lan_mtu",
    "icmp_blackhole",
    "uplink_loss_percent",
    "ipv6",
    "lan",
    "conntrack",
    "carrier_conntrack",
}
_CT_KEYS = {"udp_timeout", "udp_timeout_stream"}


class _Reader:
    """Field-by-field reading with errors that name the file and the key."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, problem: str) -> TopologyError:
        return TopologyError(self.source, key, problem)

    def mapping(self, value: Any, key: str, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a mapping, not {type(value).__name__}")
        for k in value:
            if k not in allowed:
                known = ", ".join(sorted(allowed))
                raise self.fail(f"{key}.{k}" if key else str(k), f"unknown key (known: {known})")
        return value

    def integer(self, value: Any, key: str, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"must be an integer, not {value!r}")
        if not low <= value <= high:
            raise self.fail(key, f"{value} is out of range ({low}..{high})")
        return value

    def boolean(self, value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, not {value!r}")
        return value

    def name(self, value: Any, key: str, max_len: int = 20) -> str:
        if not isinstance(value, str) or not _NAME.match(value) or len(value) > max_len:
            raise self.fail(
                key,
                f"{value!r} is not a valid name (lower-case letters and digits, starting with a "
                f"letter, at most {max_len} characters)",
            )
        return value

    def network(self, value: Any, key: str) -> ipaddress.IPv4Network:
        try:
            net = ipaddress.ip_network(str(value), strict=True)
        except ValueError as e:
            raise self.fail(key, f"not a valid IPv4 network: {e}") from None
        if not isinstance(net, ipaddress.IPv4Network):
            raise self.fail(key, "must be an IPv4 network")
        if net.prefixlen > 28:
            raise self.fail(key, f"/{net.prefixlen} is too small for a site (at most /28)")
        return net

    def conntrack(self, value: Any, key: str) -> Conntrack:
        m = self.mapping(value, key, _CT_KEYS)
        day = 86400
        return Conntrack(
            udp_timeout=self.integer(m.get("udp_timeout", 30), f"{key}.udp_timeout", 1, day),
            udp_timeout_stream=self.integer(
                m.get("udp_timeout_stream", 120), f"{key}.udp_timeout_stream", 1, day
            ),
        )


def load(path: str | Path) -> Topology:
    """Read and validate a topology file. Raises :class:`TopologyError` (also for I/O errors)."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise TopologyError(source, "", f"cannot read: {e.strerror}") from None
    return parse(text, source)


def parse(text: str, source: str = "<topology>") -> Topology:
    r = _Reader(source)
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else ""
        raise TopologyError(source, where, f"not valid YAML: {getattr(e, 'problem', e)}") from None
    top = r.mapping(doc, "", _TOP_KEYS)
    for required in ("name", "controller", "sites"):
        if required not in top:
            raise r.fail(required, "is required")
    lab_name = r.name(top["name"], "name", LAB_NAME_MAX)
    management = r.network(top.get("management", str(DEFAULT_MANAGEMENT)), "management")

    raw_sites = top["sites"]
    if not isinstance(raw_sites, dict) or not raw_sites:
        raise r.fail("sites", "must be a non-empty mapping of site name to site")
    if len(raw_sites) > MAX_SITES:
        raise r.fail("sites", f"{len(raw_sites)} sites; the lab supports at most {MAX_SITES}")

    sites: list[Site] = []
    host_sites: dict[str, str] = {}
    for site_name, raw in raw_sites.items():
        key = f"sites.{site_name}"
        r.name(site_name, key)
        site = _site(r, key, site_name, raw)
        for h in site.hosts:
            if h in host_sites:
                raise r.fail(f"{key}.hosts", f"host {h!r} is already in site {host_sites[h]!r}")
            host_sites[h] = site_name
        sites.append(site)

    if len(host_sites) > MAX_HOSTS:
        raise r.fail("sites", f"{len(host_sites)} hosts; the lab supports at most {MAX_HOSTS}")
    if len(host_sites) + 10 > management.num_addresses - 2:
        raise r.fail("management", f"{management} is too small for {len(host_sites)} hosts")

    controller_tls = top.get("controller_tls", False)
    if not isinstance(controller_tls, bool):
        raise r.fail("controller_tls", f"must be true or false, not {controller_tls!r}")
    controller = top["controller"]
    if controller not in host_sites:
        raise r.fail("controller", f"{controller!r} is not a host of any site")
    if _kind_of(sites, host_sites[controller]) != "public":
        raise r.fail(
            "controller", f"{controller!r} must be in a public site (it needs a public address)"
        )

    topo = Topology(
        name=lab_name,
        sites=tuple(sites),
        controller=controller,
        source=source,
        management=management,
        controller_tls=controller_tls,
        host_sites=host_sites,
    )
    _check_overlaps(r, topo)
    return topo


def _kind_of(sites: list[Site], name: str) -> str:
    return next(s.kind for s in sites if s.name == name)


def _site(r: _Reader, key: str, name: str, raw: Any) -> Site:
    m = r.mapping(raw, key, _SITE_KEYS)
    kind = m.get("kind")
    if kind not in SITE_KINDS:
        raise r.fail(f"{key}.kind", f"must be one of {', '.join(SITE_KINDS)}, not {kind!r}")

    hosts = m.get("hosts")
    if not isinstance(hosts, list) or not hosts:
        raise r.fail(f"{key}.hosts", "must be a non-empty list of host names")
    for i, h in enumerate(hosts):
        r.name(h, f"{key}.hosts[{i}]")
        if h in RESERVED_HOST_NAMES:
            raise r.fail(f"{key}.hosts[{i}]", f"{h!r} is reserved for the lab's own namespaces")
    if len(set(hosts)) != len(hosts):
        raise r.fail(f"{key}.hosts", "lists a host twice")

    ipv6 = r.boolean(m.get("ipv6", False), f"{key}.ipv6")
    low = MIN_MTU_IPV6 if ipv6 else MIN_MTU_IPV4
    uplink_mtu = r.integer(m.get("uplink_mtu", 1500), f"{key}.uplink_mtu", 0, MAX_MTU)
    lan_mtu = r.integer(m.get("lan_mtu", max(1500, uplink_mtu)), f"{key}.lan_mtu", 0, MAX_MTU)
    for k, v in (("uplink_mtu", uplink_mtu), ("lan_mtu", lan_mtu)):
        if v < low:
            why = "an IPv6 site needs at least 1280 (RFC 8200)" if ipv6 else "IPv4 needs 576"
            raise r.fail(f"{key}.{k}", f"{v} is below the minimum: {why}")

    if "conntrack" in m and kind == "public":
        raise r.fail(f"{key}.conntrack", "a public site has no stateful box to time out")
    if "carrier_conntrack" in m and kind != "double_nat":
        raise r.fail(f"{key}.carrier_conntrack", "only a double_nat site has a carrier NAT")
    conntrack = (
        None if kind == "public" else r.conntrack(m.get("conntrack", {}), f"{key}.conntrack")
    )
    carrier = (
        r.conntrack(m.get("carrier_conntrack", {}), f"{key}.carrier_conntrack")
        if kind == "double_nat"
        else None
    )
    lan = r.network(m["lan"], f"{key}.lan") if "lan" in m else None
    if lan is not None and len(hosts) + 10 > lan.num_addresses - 2:
        raise r.fail(f"{key}.lan", f"{lan} is too small for {len(hosts)} hosts")
    if lan is not None and kind in ("public", "firewall") and not lan.subnet_of(INTERNET_V4):
        raise r.fail(
            f"{key}.lan", f"a {kind} site's LAN is public: it must be inside {INTERNET_V4}"
        )

    return Site(
        name=name,
        kind=kind,
        hosts=tuple(hosts),
        uplink_mtu=uplink_mtu,
        lan_mtu=lan_mtu,
        icmp_blackhole=r.boolean(m.get("icmp_blackhole", False), f"{key}.icmp_blackhole"),
        uplink_loss_percent=r.integer(
            m.get("uplink_loss_percent", 0), f"{key}.uplink_loss_percent", 0, 50
        ),
        ipv6=ipv6,
        lan=lan,
        conntrack=conntrack,
        carrier_conntrack=carrier,
    )


def _check_overlaps(r: _Reader, topo: Topology) -> None:
    """Every subnet the plan will use must be disjoint from every other."""
    from fleetvpn.lab.plan import subnets  # the plan owns the address allocation

    seen: list[tuple[str, ipaddress.IPv4Network | ipaddress.IPv6Network]] = []
    for key, net in subnets(topo):
        for other_key, other in seen:
            if net.version == other.version and net.overlaps(other):
                raise r.fail(key, f"{net} overlaps {other} ({other_key})")
        seen.append((key, net))

"""The controller's desired state (``GET /v1/nodes/NAME/desired``) → what the tunnel layer applies.

Pure. :func:`parse_desired` parses the document value by value through :mod:`fleetvpn.grammar`
(``DesiredError`` names the field) and returns a :class:`Desired`: the
:class:`~fleetvpn.wg.state.TunnelSpec` for ``WgTunnel.reconcile``, the reason of every value
(logged with each change), and per peer what the agent needs to probe it (name, site, endpoint,
tunnel address). The agent keeps the last document it applied without error on disk and starts
from it, so a restart or a controller outage re-applies the same thing (a no-op on an
established tunnel: reconcile applies only differences).

The agent trusts nothing in the document (issue 11: whoever controls the controller, or the
path to it without TLS, must not be able to redirect a node's traffic or break its tunnel).
Beyond each value's grammar:

- this node's addresses must lie in the fleet's tunnel networks (:class:`Acceptance`);
- a peer's allowed IPs are host routes (/32, /128) inside the tunnel networks (the peer's tunnel
  addresses) or subnets inside the ``routed_subnets`` the agent's config accepts; nothing else
  (``0.0.0.0/0``, ``::/0``, ``0.0.0.0/1`` + ``128.0.0.0/1``, another LAN). No allowed IP may
  overlap another one (another peer's, or this node's own address): WireGuard would silently
  move it to the last peer that names it (cryptokey routing), which redirects traffic;
- public keys are distinct, and none is this node's own;
- MTUs (:func:`fleetvpn.grammar.tunnel_mtu`) in 1280..9000 where the tunnel carries IPv6
  (RFC 8200 §5: every IPv6 link carries 1280, and Linux drops IPv6 from a device whose MTU goes
  below it), 576..9000 otherwise (RFC 791: every IPv4 host accepts 576-byte datagrams; below
  that a path is not worth a tunnel, and the controller's policy never goes lower:
  ``policy_mtu.IPV4_MIN_MTU``). 9000: jumbo frames, the largest underlay the controller's policy
  plans for (``policy_mtu.MAX_PATH_MTU``). The tunnel carries IPv6 when any address of this
  node or any allowed IP is IPv6, and then every MTU of it obeys the IPv6 floor;
- keepalive 0..120 s (the controller's ``KEEPALIVE_MAX_S``: beyond, a NAT mapping is long gone);
- reasons are free text for logs and ``status.json``, never for ``wg``/``ip``: one printable line
  (:func:`fleetvpn.grammar.note`), else replaced by :data:`REASON_WITHHELD` and a warning
  (``Desired.warnings``). Replaced, not refused: a reason carries no setting, so refusing a
  document whose values are all valid for its prose would let cosmetic text stop every update;
  a placeholder keeps the log to one line and says something was withheld.

Where the tunnel networks come from (:class:`Acceptance`): the agent config's
``tunnel_networks``; without it, the networks of the addresses in the agent's last good desired
state (the one it applied and saved); with neither (the very first start), the networks of the
first document's own addresses, trust on first use, no wider than /8 (IPv4) or /32 (IPv6). The
daemon fixes them at start, so a later document can narrow nothing and widen nothing; a fleet
that moves its tunnel subnet sets ``tunnel_networks`` in the agent config.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from fleetvpn import grammar
from fleetvpn.grammar import GrammarError, IPInterface, IPNetwork
from fleetvpn.wg.state import PeerSpec, TunnelSpec

KEEPALIVE_RANGE_S: Final = (0, grammar.KEEPALIVE_MAX_S)
TOFU_MIN_PREFIX: Final = {4: 8, 6: 32}  # the widest tunnel network trusted on first use
REASON_WITHHELD: Final = "(reason withheld: not one printable line)"


class DesiredError(ValueError):
    """``str()`` reads ``desired state: FIELD: PROBLEM``."""


@dataclass(frozen=True)
class Acceptance:
    """What this agent accepts beyond each value's grammar (module docstring).
    ``tunnel_networks`` empty: trust the document's own address networks (first use)."""

    tunnel_networks: tuple[IPNetwork, ...] = ()
    routed_subnets: tuple[IPNetwork, ...] = ()
    own_public_key: str | None = None
    node: str | None = None  # the node this document must be for


@dataclass(frozen=True)
class PeerPlan:
    name: str
    site: str
    public_key: str
    endpoint: str | None  # canonical (grammar.Endpoint); None: the peer dials us
    tunnel_ipv4: str | None  # the peer's tunnel address (RTT/loss probes go there)
    route_mtu: int
    keepalive_s: int
    peer_keepalive_s: int = 0  # the keepalive the peer sends us (its NAT's mapping), 0: none


@dataclass(frozen=True)
class Desired:
    node: str
    site: str
    spec: TunnelSpec
    reasons: Mapping[str, str]
    peers: tuple[PeerPlan, ...]
    document: Mapping[str, Any]  # as received: what is saved as the last good state
    warnings: tuple[str, ...] = field(default=())  # reasons withheld (module docstring)

    def peer_by_key(self) -> dict[str, PeerPlan]:
        return {p.public_key: p for p in self.peers}

    @property
    def tunnel_networks(self) -> tuple[IPNetwork, ...]:
        """The networks of this node's addresses (what a restart derives its trust from)."""
        return networks_of(grammar.interface(a) for a in self.spec.addresses)


def networks_of(addresses: Iterable[IPInterface]) -> tuple[IPNetwork, ...]:
    return tuple(dict.fromkeys(a.network for a in addresses))


def _fail(where: str, problem: str) -> DesiredError:
    return DesiredError(f"desired state: {where}: {problem}")


def _get(doc: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in doc:
        raise _fail(f"{where}{key}", "missing")
    value = doc[key]
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise _fail(f"{where}{key}", f"unexpected value {grammar.shown(value)}")
    return value


def _parsed(parse: Any, value: Any, where: str) -> Any:
    try:
        return parse(value, where)
    except GrammarError as e:  # a part's error (an endpoint's "port: …") gets the field too
        text = str(e)
        raise DesiredError(
            f"desired state: {text if text.startswith(where) else f'{where}: {text}'}"
        ) from None


def _within(net: IPNetwork, networks: Iterable[IPNetwork]) -> bool:
    return any(net.version == n.version and net.subnet_of(n) for n in networks)  # type: ignore[arg-type]


def _in_range(value: int, bounds: tuple[int, int], where: str, why: str) -> int:
    if not bounds[0] <= value <= bounds[1]:
        raise _fail(where, f"{value} out of range ({bounds[0]}..{bounds[1]}{why})")
    return value


def _check_overlaps(owned: list[tuple[IPNetwork, str]]) -> None:
    """Refuse any two networks that overlap (equal, or one inside the other), naming both.
    A sweep over the networks sorted by start: O(n log n) for a hub with thousands of peers."""
    spans = sorted(
        (n.version, int(n.network_address), -n.prefixlen, int(n.broadcast_address), n, where)
        for n, where in owned
    )
    last: dict[int, tuple[int, IPNetwork, str]] = {}
    for version, start, _, end, net, where in spans:
        before = last.get(version)
        if before is not None and start <= before[0]:
            raise _fail(where, f"{net} overlaps {before[1]} ({before[2]})")
        if before is None or end > before[0]:
            last[version] = (end, net, where)


def parse_desired(
    doc: Any, *, interface: str, listen_port: int, accept: Acceptance | None = None
) -> Desired:
    """``interface`` and ``listen_port`` come from the agent's own config (it owns them);
    ``accept`` is what it accepts beyond the grammar (default: first use, nothing routed)."""
    accept = accept or Acceptance()
    if not isinstance(doc, Mapping):
        raise DesiredError("desired state: not a JSON object")
    node = _parsed(grammar.name, _get(doc, "node", str, ""), "node")
    if accept.node is not None and node != accept.node:
        raise _fail("node", f"{node!r} is not this node ({accept.node})")
    site = _parsed(grammar.name, _get(doc, "site", str, ""), "site")
    raw_addresses = _get(doc, "addresses", list, "")
    addresses: list[IPInterface] = [
        _parsed(grammar.interface, a, f"addresses[{i}]") for i, a in enumerate(raw_addresses)
    ]
    if not addresses:
        raise _fail("addresses", "no tunnel address for this node")
    tunnel_networks = accept.tunnel_networks
    if not tunnel_networks:  # first use: the document's own networks, bounded
        for i, a in enumerate(addresses):
            if a.network.prefixlen < TOFU_MIN_PREFIX[a.version]:
                raise _fail(
                    f"addresses[{i}]",
                    f"{a} is wider than /{TOFU_MIN_PREFIX[a.version]} (set tunnel_networks "
                    "in the agent config to accept it)",
                )
        tunnel_networks = networks_of(addresses)
    for i, a in enumerate(addresses):
        if not _within(a.network, tunnel_networks):
            raise _fail(
                f"addresses[{i}]",
                f"{a} is outside the tunnel networks "
                f"{', '.join(map(str, tunnel_networks))} (agent config: tunnel_networks)",
            )
    warnings: list[str] = []

    def reason(raw: Mapping[str, Any], key: str, where: str) -> str:
        value = raw.get(key, "")
        try:
            return grammar.note(value, f"{where}{key}")
        except GrammarError as e:
            warnings.append(f"desired state: {e}; shown as {REASON_WITHHELD!r}")
            return REASON_WITHHELD

    mtu = _get(doc, "interface_mtu", int, "")
    reasons: dict[str, str] = {
        "interface_mtu": reason(doc, "interface_mtu_reason", ""),
        "addresses": "this node's tunnel addresses in the desired state",
        "listen_port": "listen_port in the agent's config",
    }
    owned: list[tuple[IPNetwork, str]] = [
        (ipaddress.ip_network(a.ip), f"addresses[{i}]") for i, a in enumerate(addresses)
    ]
    carries_v6 = any(a.version == 6 for a in addresses)
    raw_peers = _get(doc, "peers", list, "")
    parsed: list[tuple[str, str, str, str | None, tuple[IPNetwork, ...], int, int, bool]] = []
    peer_keepalive: dict[str, int] = {}
    seen_keys: dict[str, str] = {}
    seen_names: set[str] = set()
    for i, raw in enumerate(raw_peers):
        where = f"peers[{i}]."
        if not isinstance(raw, Mapping):
            raise _fail(f"peers[{i}]", "not an object")
        name = _parsed(grammar.name, _get(raw, "peer", str, where), f"{where}peer")
        if name in seen_names or name == node:
            raise _fail(f"{where}peer", f"{name!r} is listed twice or is this node")
        seen_names.add(name)
        peer_site = _parsed(grammar.name, _get(raw, "site", str, where), f"{where}site")
        key = _parsed(grammar.wg_key, _get(raw, "public_key", str, where), f"{where}public_key")
        if key in seen_keys:
            raise _fail(f"{where}public_key", f"the same key as {seen_keys[key]}")
        if key == accept.own_public_key:
            raise _fail(f"{where}public_key", "this node's own public key")
        seen_keys[key] = f"peers[{i}]"
        endpoint = raw.get("endpoint")
        if endpoint is not None:
            endpoint = str(_parsed(grammar.endpoint, endpoint, f"{where}endpoint"))
        allowed: list[IPNetwork] = []
        for j, text in enumerate(_get(raw, "allowed_ips", list, where)):
            at = f"{where}allowed_ips[{j}]"
            net = _parsed(grammar.cidr, text, at)
            host = net.prefixlen == net.max_prefixlen
            if not (host and _within(net, tunnel_networks)) and not _within(
                net, accept.routed_subnets
            ):
                raise _fail(
                    at,
                    f"{net} is neither a tunnel address (a host in "
                    f"{', '.join(map(str, tunnel_networks))}) nor in the routed_subnets this "
                    f"agent accepts ({', '.join(map(str, accept.routed_subnets)) or 'none'})",
                )
            allowed.append(net)
            owned.append((net, f"{at} ({name})"))
            carries_v6 = carries_v6 or net.version == 6
        keepalive = _in_range(
            _get(raw, "keepalive_s", int, where), KEEPALIVE_RANGE_S, f"{where}keepalive_s", " s"
        )
        route_mtu = _get(raw, "route_mtu", int, where)
        theirs = raw.get("peer_keepalive_s", 0)  # absent: a controller too old to say
        if theirs.__class__ is not int or not 0 <= theirs <= KEEPALIVE_RANGE_S[1]:
            raise _fail(f"{where}peer_keepalive_s", f"{grammar.shown(theirs)} is not a keepalive")
        peer_keepalive[key] = theirs
        outer = raw.get("outer_fragmentation", False)  # absent: a controller too old to say
        if not isinstance(outer, bool):
            raise _fail(f"{where}outer_fragmentation", f"{grammar.shown(outer)} is not a boolean")
        parsed.append((name, peer_site, key, endpoint, tuple(allowed), keepalive, route_mtu, outer))
        reasons[f"{key}:keepalive"] = f"{name}: {reason(raw, 'keepalive_reason', where)}"
        reasons[f"{key}:route_mtu"] = f"{name}: {reason(raw, 'route_mtu_reason', where)}"
        reasons[f"{key}:add"] = f"{name} (site {peer_site}) is a peer in the desired state"
        reasons[f"{key}:endpoint"] = f"{name}'s endpoint in the desired state"
        reasons[f"{key}:allowed_ips"] = f"{name}'s tunnel addresses in the desired state"
    _check_overlaps(owned)
    _parsed(lambda v, w: grammar.tunnel_mtu(v, w, ipv6=carries_v6), mtu, "interface_mtu")
    specs: list[PeerSpec] = []
    plans: list[PeerPlan] = []
    for i, (name, peer_site, key, endpoint, nets, keepalive, route_mtu, outer) in enumerate(parsed):
        # a route MTU applies to IPv4 routes as it is; IPv6 ones stay at 1280 with TCP's MSS
        # clamped below it (grammar.ipv6_route), so the IPv4 floor is the route's floor
        _parsed(
            lambda v, w: grammar.tunnel_mtu(v, w, ipv6=False), route_mtu, f"peers[{i}].route_mtu"
        )
        texts = tuple(str(n) for n in nets)
        specs.append(PeerSpec(key, endpoint, texts, keepalive, route_mtu, name, outer))
        tunnel_v4 = [
            str(n.network_address)
            for n in nets
            if n.version == 4 and n.prefixlen == 32 and _within(n, tunnel_networks)
        ]
        plans.append(
            PeerPlan(name, peer_site, key, endpoint, tunnel_v4[0] if tunnel_v4 else None,
                     route_mtu, keepalive, peer_keepalive[key])
        )  # fmt: skip
    spec = TunnelSpec(interface, listen_port, tuple(str(a) for a in addresses), mtu, tuple(specs))
    return Desired(node, site, spec, reasons, tuple(plans), doc, tuple(warnings))

"""Tunnel MTU policy: per link direction, per node interface, per peer route.  Pure.

Rules (design.md, "Numbers the product must get right"):
- A direction node → peer gets tunnel MTU = path MTU − overhead (60 over an IPv4 underlay, 80
  over IPv6), from the *sender's* own measurement.  Unmeasured: a safe 1280.
- No standing black hole below 1280 + overhead (issue 12).  An interface that carries IPv6
  never goes below 1280 (RFC 8200 §5), but a route for IPv4 may: when the path cannot carry
  1280 + overhead the direction's tunnel MTU is still path − overhead (down to 576) and the
  decision says ``needs_fragmentation``. The node then keeps its interface at 1280 at least, its
  IPv4 routes towards the peer at the route MTU below, its IPv6 routes at 1280 with TCP's MSS
  clamped to fit the route MTU (``advmss``: no TCP segment needs fragmenting), and every other
  IPv6 packet above the route MTU leaves fragmented outside the tunnel, towards this peer's
  endpoint only (``fragment_outer`` in the route: kernel WireGuard never sets DF on IPv4;
  wireguard-go gets a locked route MTU towards the endpoint, which clears DF without making its
  GSO batches too big, see fleetvpn.agent.outerroute). Over an IPv6 underlay routers never
  fragment, so those packets are lost; health says which (fleetvpn.engines.outer).
  An IPv4-only tunnel goes down to 576 with no fragmentation at all.
- A link's one number is the smaller direction: it fits both ways, and it is what TCP across the
  link uses anyway (each end advertises its MSS from its own route MTU).  Each sender's route
  still follows its own direction, so one-way traffic on an asymmetric path is not held back.
- Interface MTU of a node = the largest of its directions.  Each peer's route MTU: the exact value
  where it equals the interface MTU, else floor16 of it — wireguard-go pads plaintext to a
  multiple of 16 capped at the *interface* MTU, so a route MTU of 1329 under an interface MTU of
  1420 sends 1344 + 60 = 1404 bytes into a 1400-byte path (measured; design.md).  floor16 is
  safe for kernel WireGuard too (it caps padding at the route MTU) and costs at most 15 bytes.
- Overrides (link > node > site) beat measurements; the padding rule still applies to them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from operator import attrgetter, is_
from typing import Final

from fleetvpn import grammar
from fleetvpn.controller.policy_overrides import OverrideIndex, describe
from fleetvpn.controller.trusted import fast_constructor
from fleetvpn.model import (
    Family,
    LinkMeasurement,
    LinkMtu,
    LinkMtuDecision,
    NodeMtuPlan,
    Override,
    Report,
    RouteMtu,
)

OVERHEAD_BYTES: Final[dict[int, int]] = {4: 60, 6: 80}  # 32 WireGuard + 8 UDP + 20/40 IP
PADDING_BYTES: Final = 16  # WireGuard pads plaintext to a multiple of 16 (wireguard-go send.go)
IPV6_MIN_MTU: Final = 1280  # RFC 8200 §5: every IPv6 link carries 1280
IPV4_MIN_MTU: Final = 576  # RFC 791: every IPv4 host accepts 576; the floor of IPv4-only tunnels
SAFE_DEFAULT_MTU: Final = 1280  # unmeasured: fits any path >= 1360, the IPv6 minimum inside
# The PMTU prober never probes above 9000 (net/pmtuprobe.py MAX_CEILING, jumbo frames), so a
# larger path MTU is not proven; it is taken as 9000 (IPv4 tunnel 8940, IPv6 tunnel 8920).
MAX_PATH_MTU: Final = 9000

# 200,000 of each per recompute of a large fleet
_new_decision = fast_constructor(LinkMtuDecision)
_new_route = fast_constructor(RouteMtu)


def floor16(size: int) -> int:
    return size - size % PADDING_BYTES


def padded_outer_bytes(route_mtu: int | None, interface_mtu: int, overhead: int) -> int:
    """The largest outer packet a sender emits with these settings (wireguard-go's worst case:
    padding to 16 capped at the interface MTU).  ``route_mtu`` None: no per-peer route MTU."""
    inner = interface_mtu if route_mtu is None else min(route_mtu, interface_mtu)
    padded = min(-(-inner // PADDING_BYTES) * PADDING_BYTES, interface_mtu)
    return padded + overhead


def direction_mtu(
    node: str, peer: str, measurement: LinkMeasurement | None, *, carries_ipv6: bool = True
) -> LinkMtuDecision:
    """The measured (or default) tunnel MTU for node → peer, from node's own measurement.

    ``measurement`` None or without a path MTU: the safe default.  Never raises.
    """
    if measurement is None or measurement.path_mtu is None:
        reason = (
            f"MTU {SAFE_DEFAULT_MTU} {node}→{peer}: unmeasured: safe default {SAFE_DEFAULT_MTU}"
        )
        family = None if measurement is None else measurement.family
        return _new_decision(node, peer, SAFE_DEFAULT_MTU, "default", reason, None, family, False)
    family = measurement.family
    path_mtu = measurement.path_mtu
    tunnel_mtu, rest, fragments = _measured(path_mtu, family, carries_ipv6)
    reason = f"MTU {tunnel_mtu} {node}→{peer}: path MTU {path_mtu} measured by {node}{rest}"
    return _new_decision(node, peer, tunnel_mtu, "measured", reason, path_mtu, family, fragments)


@lru_cache(maxsize=1024, typed=True)
def _measured(path_mtu: int, family: Family, carries_ipv6: bool) -> tuple[int, str, bool]:
    """(tunnel MTU, the reason after "measured by {node}", needs fragmentation) of a measured
    path: the same for every direction with this path MTU (200,000 directions, a few values)."""
    overhead = OVERHEAD_BYTES[family]
    usable = min(path_mtu, MAX_PATH_MTU)
    fits = usable - overhead
    underlay = f"IPv{family} underlay, −{overhead}"
    taken = f", taken as {MAX_PATH_MTU} (the largest size probed)" if usable < path_mtu else ""
    if fits >= (IPV6_MIN_MTU if carries_ipv6 else IPV4_MIN_MTU):
        jumbo = "; jumbo path" if path_mtu > 1500 else ""
        return fits, f"{taken} ({underlay}{jumbo})", False
    if fits < IPV4_MIN_MTU:
        rest = (
            f"{taken} ({underlay}) cannot carry {IPV4_MIN_MTU} + {overhead}; held at "
            f"{IPV4_MIN_MTU}, the IPv4 minimum: larger packets need outer fragmentation or "
            "are dropped — the link needs another path"
        )
        return IPV4_MIN_MTU, rest, True
    if not carries_ipv6:
        return fits, f"{taken} ({underlay}; the tunnel carries IPv4 only)", False
    outside = (
        "fragmented outside the tunnel towards this peer's endpoint"
        if family == 4
        else "lost: routers never fragment an IPv6 underlay"
    )
    rest = (
        f"{taken} ({underlay}) is below {IPV6_MIN_MTU} + {overhead}: IPv4 inside at {fits}; "
        f"IPv6 inside stays at {IPV6_MIN_MTU} (RFC 8200) with TCP's MSS clamped to fit, larger "
        f"IPv6 packets {outside}"
    )
    return fits, rest, True


def apply_mtu_override(decision: LinkMtuDecision, override: Override | None) -> LinkMtuDecision:
    """``decision`` replaced by ``override`` (source "override"), or unchanged if None."""
    if override is None:
        return decision
    kind = "measured" if decision.source == "measured" else "default"
    reason = (
        f"MTU {override.value} {decision.node}→{decision.peer}: {describe(override)}: "
        f"tunnel MTU {override.value} ({kind} would be {decision.tunnel_mtu})"
    )
    return replace(decision, tunnel_mtu=override.value, source="override", reason=reason)


def link_mtu(a_to_b: LinkMtuDecision, b_to_a: LinkMtuDecision) -> LinkMtu:
    """The link's tunnel MTU: the smaller direction, so it fits both ways (module docstring)."""
    smaller = min(a_to_b.tunnel_mtu, b_to_a.tunnel_mtu)
    a, b = a_to_b.node, a_to_b.peer
    if (
        a_to_b.tunnel_mtu == b_to_a.tunnel_mtu
        and a_to_b.path_mtu == b_to_a.path_mtu
        and a_to_b.family == b_to_a.family
        and a_to_b.source == b_to_a.source == "measured"
        and not a_to_b.needs_fragmentation
    ):
        reason = (
            f"MTU {smaller}: path MTU {a_to_b.path_mtu} measured both ways "
            f"(IPv{a_to_b.family} underlay, −{overhead_for(a_to_b.family)})"
        )
    elif a_to_b.tunnel_mtu == b_to_a.tunnel_mtu:
        reason = f"MTU {smaller} both ways: {a_to_b.reason}; {b_to_a.reason}"
    else:
        reason = (
            f"MTU {smaller}: the smaller direction of an asymmetric link ({a}→{b} "
            f"{a_to_b.tunnel_mtu}, {b}→{a} {b_to_a.tunnel_mtu}); each sender's route follows "
            f"its own direction, TCP uses the smaller both ways"
        )
    return LinkMtu(node_a=a, node_b=b, tunnel_mtu=smaller, reason=reason)


def node_mtu_plan(node: str, directions: Sequence[LinkMtuDecision]) -> NodeMtuPlan:
    """Interface MTU and per-peer route MTUs for ``node`` from its outgoing ``directions``
    (each with ``decision.node == node``).  No directions: the safe default interface MTU."""
    if not directions:
        reason = f"interface MTU {SAFE_DEFAULT_MTU}: no links: safe default"
        return NodeMtuPlan(node, SAFE_DEFAULT_MTU, reason, ())
    largest = max(directions, key=_by_tunnel_mtu)
    interface_mtu = largest.tunnel_mtu
    reason_of_plan = (
        f"interface MTU {interface_mtu}: the largest of {len(directions)} link(s) "
        f"(towards {largest.peer}: {largest.reason})"
    )
    if interface_mtu < IPV6_MIN_MTU and any(d.needs_fragmentation for d in directions):
        interface_mtu = IPV6_MIN_MTU
        reason_of_plan = (
            f"interface MTU {IPV6_MIN_MTU}: the IPv6 minimum (RFC 8200); every link is "
            f"smaller, its IPv4 routes lower (towards {largest.peer}: {largest.reason})"
        )
    routes = []
    for d in sorted(directions, key=_by_peer):
        route_mtu, reason = _route(d.tunnel_mtu, interface_mtu)
        fragment = d.needs_fragmentation and route_mtu < IPV6_MIN_MTU
        if fragment:
            mss = route_mtu - grammar.TCP_IPV6_HEADERS
            reason = (
                f"{reason}; IPv6 routes {IPV6_MIN_MTU} with TCP MSS {mss}, larger "
                "IPv6 packets fragmented outside the tunnel towards this peer's endpoint"
            )
        routes.append(_new_route(d.peer, route_mtu, d.tunnel_mtu, reason, fragment))
    return NodeMtuPlan(node, interface_mtu, reason_of_plan, tuple(routes))


_by_peer = attrgetter("peer")
_by_tunnel_mtu = attrgetter("tunnel_mtu")


@lru_cache(maxsize=4096, typed=True)
def _route(tunnel_mtu: int, interface_mtu: int) -> tuple[int, str]:
    """(route MTU, its reason) of a direction's tunnel MTU under the node's interface MTU."""
    if tunnel_mtu >= interface_mtu:
        route_mtu = interface_mtu
        why = "= the interface MTU: padding is capped there, the exact value is safe"
    elif tunnel_mtu % PADDING_BYTES == 0:
        route_mtu = tunnel_mtu
        why = f"below the interface MTU {interface_mtu}, already a multiple of 16"
    else:
        route_mtu = floor16(tunnel_mtu)
        padded = min(-(-tunnel_mtu // PADDING_BYTES) * PADDING_BYTES, interface_mtu)
        why = (
            f"= floor16({tunnel_mtu}): below the interface MTU {interface_mtu}, "
            f"wireguard-go pads {tunnel_mtu} to {padded}"
        )
    return route_mtu, f"route MTU {route_mtu} {why}"


@dataclass(frozen=True, slots=True)
class FleetMtu:
    directions: dict[tuple[str, str], LinkMtuDecision]  # (node, peer) → decision
    links: dict[tuple[str, str], LinkMtu]  # (a, b) as given in ``links``
    nodes: dict[str, NodeMtuPlan]


class MtuMemo:
    """What :func:`decide_mtus` decided for each node last time, and from what: given one, it
    reuses a node's decisions and plan when the node's site, its peers (in order) and its
    measurements of them are the same (the same measurement objects) and the overrides are
    equal — a fleet's recompute sees new reports from a few of its nodes only. The policy
    stays pure: equal inputs, the values it would decide anew."""

    __slots__ = ("_carries_ipv6", "_nodes", "_overrides")

    def __init__(self) -> None:
        self._overrides: tuple[Override, ...] | None = None
        self._carries_ipv6 = True
        # node → (site, peers, measurements, decisions towards the peers, plan)
        self._nodes: dict[str, _NodeMtus] = {}


_NodeMtus = tuple[
    str | None,
    tuple[str, ...],
    tuple[LinkMeasurement | None, ...],
    list[LinkMtuDecision],
    NodeMtuPlan,
]


def decide_mtus(
    links: Iterable[tuple[str, str]],
    measurements: Mapping[tuple[str, str], LinkMeasurement],
    node_sites: Mapping[str, str],
    overrides: Iterable[Override] = (),
    *,
    carries_ipv6: bool = True,
    per_link: bool = True,
    memo: MtuMemo | None = None,
) -> FleetMtu:
    """Every MTU decision of a fleet.

    ``links``: unordered peerings (a, b).  ``measurements``: (sender, receiver) → the sender's
    latest measurement (see :func:`latest_link_measurements`).  ``node_sites``: node → site
    (for site overrides; unknown nodes have none).  ``carries_ipv6``: the tunnels carry IPv6.
    ``memo``: the previous call's, to reuse what did not change (:class:`MtuMemo`; updated).
    Returns per-direction decisions, per-link values (``per_link`` False: none, for a caller
    that reads only directions and plans) and per-node plans.  Never raises.
    """
    links = list(links)
    overrides = tuple(overrides)
    index = OverrideIndex(overrides)
    # node → its peers, each once, in the order of the links: the order node_mtu_plan sees
    peers_of: dict[str, dict[str, None]] = {}
    for a, b in links:
        peers_of.setdefault(a, {})[b] = None
        peers_of.setdefault(b, {})[a] = None
    known: dict[str, _NodeMtus] = {}
    if memo is not None:
        if memo._overrides == overrides and memo._carries_ipv6 == carries_ipv6:
            known = memo._nodes
        memo._overrides, memo._carries_ipv6 = overrides, carries_ipv6
    remembered: dict[str, _NodeMtus] = {}
    directions: dict[tuple[str, str], LinkMtuDecision] = {}
    plans: dict[str, NodeMtuPlan] = {}
    for node, peer_set in peers_of.items():
        site = node_sites.get(node)
        peers = tuple(peer_set)
        ms = tuple([measurements.get((node, peer)) for peer in peers])
        last = known.get(node)
        if last is not None and last[0] == site and last[1] == peers and all(map(is_, last[2], ms)):
            decided, plan = last[3], last[4]
        else:
            decided = [
                apply_mtu_override(
                    direction_mtu(node, peer, m, carries_ipv6=carries_ipv6),
                    index.find("tunnel_mtu", node, peer, site),
                )
                for peer, m in zip(peers, ms, strict=True)
            ]
            plan = node_mtu_plan(node, decided)
        remembered[node] = (site, peers, ms, decided, plan)
        for peer, decision in zip(peers, decided, strict=True):
            directions[node, peer] = decision
        plans[node] = plan
    if memo is not None:
        memo._nodes = remembered
    link_values: dict[tuple[str, str], LinkMtu] = {}
    if per_link:
        for a, b in links:
            link_values[a, b] = link_mtu(directions[a, b], directions[b, a])
    return FleetMtu(directions, link_values, plans)


def latest_link_measurements(reports: Iterable[Report]) -> dict[tuple[str, str], LinkMeasurement]:
    """(node, peer) → the measurement to decide from; ``reports``: each node's latest one.

    A report holds at most one measurement per (peer, family); the one whose endpoint is in use
    wins, else the one with the smaller path MTU (either family may carry the tunnel).
    """
    chosen: dict[tuple[str, str], LinkMeasurement] = {}
    for report in reports:
        for m in report.measurements:
            key = (report.node, m.peer)
            other = chosen.get(key)
            if other is None or _preferred(m, other):
                chosen[key] = m
    return chosen


def _preferred(candidate: LinkMeasurement, current: LinkMeasurement) -> bool:
    if (candidate.endpoint is None) != (current.endpoint is None):
        return candidate.endpoint is not None
    if current.path_mtu is None:
        return candidate.path_mtu is not None
    return candidate.path_mtu is not None and _tunnel(candidate) < _tunnel(current)


def _tunnel(m: LinkMeasurement) -> int:
    return (m.path_mtu or 0) - OVERHEAD_BYTES[m.family]


def overhead_for(family: Family | None) -> int:
    """The WireGuard overhead over ``family`` (None: unknown, the larger IPv6 figure)."""
    return OVERHEAD_BYTES[6 if family is None else family]

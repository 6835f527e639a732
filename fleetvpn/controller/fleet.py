"""The fleet as the controller sees it now: the store's latest reports run through the policy.

Contract: ``compute(store, now)`` reads the store (nodes, each node's two newest reports, NAT
history, overrides, the keepalive policy's previous state), runs the pure policy, saves the
keepalive state the policy returned, and returns a :class:`FleetView` — per-link health rows,
per-site keepalive, per-node desired MTU and keepalive — every value with its reason. It is
the only place that joins storage and policy; the API, ``health``, ``tune`` and ``/metrics``
all read a FleetView.
"""

from __future__ import annotations

import bisect
import functools
import gc
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from fleetvpn import grammar
from fleetvpn.controller import policy
from fleetvpn.controller.config import TunnelConfig
from fleetvpn.controller.health import NodeHealth, link_verdict
from fleetvpn.controller.store import Store
from fleetvpn.controller.trusted import stored_report
from fleetvpn.model import (
    ConfiguredPeer,
    KeepaliveState,
    LinkHealth,
    LinkMeasurement,
    LinkMtuDecision,
    MappingLoss,
    NatMeasurement,
    NodeMtuPlan,
    Override,
    PeerKeepalive,
    Report,
    RouteMtu,
    SiteKeepalive,
    StoredReport,
    format_time,
)

_STATE_KEY = "keepalive:site:"
log = logging.getLogger(__name__)


# Direction and LinkRow: 300,000 of them per 100,000-link view; slots and a plain __init__
# (a frozen dataclass sets each field through object.__setattr__) make them a third cheaper.
# Treat them as values all the same: nothing changes a view once it is computed.
@dataclass(slots=True)
class Direction:
    """What ``node`` does towards ``peer``: measured, configured and recommended."""

    node: str
    peer: str
    path_mtu: int | None
    icmp_seen: bool
    rtt_s: float | None
    loss_ratio: float | None
    handshake_age_s: float | None
    configured_mtu: int | None
    recommended_mtu: int
    mtu_reason: str
    configured_keepalive_s: int | None
    recommended_keepalive_s: int
    keepalive_reason: str
    health: LinkHealth


@dataclass(slots=True)
class LinkRow:
    a: str
    b: str
    site_a: str
    site_b: str
    state: str
    reason: str
    a_to_b: Direction
    b_to_a: Direction
    mapping_lifetime_s: float | None  # the NATed side's site, the smaller if both
    report_age_s: float | None  # the older of the two ends' latest reports


@dataclass(frozen=True)
class NodeInfo:
    """What enrollment recorded of a node (never its private key: that never leaves it)."""

    node_id: int
    name: str
    site: str
    public_key: str
    listen_port: int
    endpoint: str | None  # where others reach it; None: it dials out (behind a NAT)


@dataclass(frozen=True)
class FleetView:
    generated_at: datetime
    links: list[LinkRow]
    sites: dict[str, SiteKeepalive]
    plans: dict[str, NodeMtuPlan]
    peer_keepalives: dict[tuple[str, str], PeerKeepalive]
    node_sites: dict[str, str]
    nodes: dict[str, NodeInfo]
    peers: dict[str, list[str]]  # node → the nodes it has a tunnel with


def peerings(nodes: dict[str, NodeInfo]) -> set[tuple[str, str]]:
    """Which nodes get a tunnel: every pair in which at least one end has an endpoint the other
    can dial (WireGuard has no NAT traversal of its own: two NATed nodes reach each other only
    through a third). Unordered pairs, (a, b) with a < b."""
    reachable = sorted(n for n, info in nodes.items() if info.endpoint)
    return {
        (min(hub, other), max(hub, other)) for hub in reachable for other in nodes if other != hub
    }


class Sources:
    """What compute() reads from the store, kept between computes so that each recompute reads
    only what changed: every node's two newest reports, parsed once (through the trusted fast
    path: they were validated when they arrived), and the NAT measurements of the lifetime
    window. Which reports are the newest two comes from the nodes table (the store records
    them at ingest), so nothing scans the reports. One instance per view worker; not shared
    between threads. It keeps the MTU decisions of every node too, reused for the nodes whose
    measurements did not change (policy.MtuMemo)."""

    # NAT rows are read again from reports that arrived this long before the previous read: a
    # transaction that was still open then (PostgreSQL commits out of id order) is seen too.
    NAT_REREAD_S = 60.0

    UNREADABLE_LOGGED_MAX = 10_000  # report ids remembered as logged (then forgotten, logged again)

    def __init__(self) -> None:
        self._reports: dict[str, Report] = {}  # report_id → parsed, only the newest two per node
        # Stored bodies that cannot be read (a row an older version stored, a hand-edited
        # database): report_id → why. Skipped, each logged once; their nodes count as having
        # no readable report, and ``unreadable`` (node → reason) tells health why.
        self._unreadable: dict[str, str] = {}
        self._logged: set[str] = set()
        self.unreadable: dict[str, str] = {}
        self._nat: dict[int, tuple[str, NatMeasurement]] = {}  # row id → (node, measurement)
        self._nat_read_at: datetime | None = None
        self.mtus = policy.MtuMemo()  # the MTU decisions of nodes whose measurements are the same

    def reports(
        self, store: Store, node_sites: dict[str, str]
    ) -> tuple[dict[str, StoredReport], dict[str, Report]]:
        """(node → its latest report as received, node → the report before it)."""
        heads = store.report_heads()
        wanted = {
            report_id
            for node, (latest, _, previous) in heads.items()
            if node in node_sites
            for report_id in (latest, previous)
            if report_id is not None
        }
        known = {k: v for k, v in self._reports.items() if k in wanted}
        unreadable = {k: v for k, v in self._unreadable.items() if k in wanted}
        missing = sorted(wanted - known.keys() - unreadable.keys())
        for report_id, (_, body) in store.report_bodies(missing).items():
            try:
                known[report_id] = stored_report(body)
            except Exception as e:  # one row never stops the view: skipped, logged once
                unreadable[report_id] = _unreadable_reason(e)
                self._log_unreadable(report_id, unreadable[report_id])
        self._reports, self._unreadable = known, unreadable
        latest: dict[str, StoredReport] = {}
        previous: dict[str, Report] = {}
        self.unreadable = {}
        for node, (latest_id, received_at, previous_id) in heads.items():
            if node not in node_sites:
                continue
            if latest_id in unreadable:
                why = unreadable[latest_id]
                self.unreadable[node] = (
                    f"down: {node}'s latest report {latest_id} is unreadable ({why})"
                )
            if latest_id in known and received_at is not None:
                latest[node] = StoredReport(received_at, known[latest_id])
            if previous_id in known:
                previous[node] = known[previous_id]
        return latest, previous

    def _log_unreadable(self, report_id: str, why: str) -> None:
        if report_id in self._logged:
            return
        if len(self._logged) >= self.UNREADABLE_LOGGED_MAX:
            self._logged.clear()
        self._logged.add(report_id)
        log.error("stored report %s is unreadable, skipped: %s", report_id, why)

    def nat(
        self, store: Store, node_sites: dict[str, str], now: datetime
    ) -> dict[str, list[NatMeasurement]]:
        """node → its NAT measurements within the lifetime window, and its newest however old."""
        since = now - timedelta(seconds=policy.LIFETIME_WINDOW_S)
        if self._nat_read_at is None:
            rows = store.nat_history(since)
        else:
            reread_from = self._nat_read_at - timedelta(seconds=self.NAT_REREAD_S)
            rows = store.nat_received_since(reread_from)
        self._nat_read_at = now
        for row in rows:
            if row["id"] not in self._nat:
                self._nat[row["id"]] = (
                    row["node"],
                    NatMeasurement(
                        measured_at=row["measured_at"],
                        nat=row["nat"],
                        stateful_filter=row["stateful_filter"],
                        mapped_address=row["mapped_address"],
                        mapping_lifetime_s=row["mapping_lifetime_s"],
                        resolution_s=row["resolution_s"],
                        max_lifetime_s=row["max_lifetime_s"],
                    ),
                )
        newest: dict[str, int] = {}
        for row_id, (node, _) in self._nat.items():
            if row_id > newest.get(node, -1):
                newest[node] = row_id
        keep_ids = set(newest.values())
        self._nat = {
            row_id: value
            for row_id, value in self._nat.items()
            if row_id in keep_ids or value[1].measured_at >= since
        }
        by_node: dict[str, list[NatMeasurement]] = {}
        for _, (node, m) in sorted(self._nat.items()):
            if node in node_sites:
                by_node.setdefault(node, []).append(m)
        return by_node


@dataclass(frozen=True)
class _NodeIndex:
    """One node's latest report, indexed by peer (built once per compute, not per direction)."""

    stored: StoredReport | None
    measurements: dict[str, LinkMeasurement]  # peer → the one measurement_of() picks
    configured: dict[str, ConfiguredPeer]
    interface_mtu: int | None
    routes: dict[str, RouteMtu]


def _index(stored: StoredReport | None, plan: NodeMtuPlan | None) -> _NodeIndex:
    chosen: dict[str, LinkMeasurement] = {}
    interface_mtu = None
    configured: dict[str, ConfiguredPeer] = {}
    if stored is not None:
        for m in stored.report.measurements:  # as measurement_of: the first in use, else first
            current = chosen.get(m.peer)
            if current is None or (current.endpoint is None and m.endpoint is not None):
                chosen[m.peer] = m
        interface_mtu = stored.report.configured.interface_mtu
        for p in stored.report.configured.peers:
            configured.setdefault(p.peer, p)
    routes: dict[str, RouteMtu] = {}
    if plan is not None:
        for r in plan.routes:
            routes.setdefault(r.peer, r)
    return _NodeIndex(stored, chosen, configured, interface_mtu, routes)


def compute(
    store: Store, now: datetime, sources: Sources | None = None, *, carries_ipv6: bool = True
) -> FleetView:
    """The fleet now. ``sources``: what earlier computes read (the view worker keeps one), so
    that only new reports are read and parsed; None reads everything. ``carries_ipv6``: the
    tunnels carry IPv6 (``tunnel.ipv6`` is set; see policy_mtu). The cyclic garbage
    collector is paused meanwhile: a large fleet makes millions of objects, none of them in a
    cycle, and collecting while they pile up cost a third of the time."""
    with gc_paused():
        return _compute(store, now, sources or Sources(), carries_ipv6)


@contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off meanwhile (as it was before, after)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _unreadable_reason(e: Exception) -> str:
    return grammar.shown(f"{type(e).__name__}: {e}", 200)


@functools.lru_cache(maxsize=1 << 16)
def _node_info(
    node_id: int, name: Any, site: Any, public_key: Any, listen_port: Any, endpoint: Any
) -> NodeInfo | None:
    """A node row as the view uses it, each value through its grammar again: a row stored by
    an older version (an endpoint with a scope id and a newline in it) never reaches a
    desired state. A bad endpoint is dropped (the node dials out); a bad name, site, key or
    port leaves the node out of the view. Logged once per distinct row (cached)."""
    try:
        info = NodeInfo(
            node_id,
            grammar.name(name, "name"),
            grammar.name(site, "site"),
            grammar.wg_key(public_key, "public_key"),
            grammar.port(listen_port, "listen_port"),
            None,
        )
    except grammar.GrammarError as e:
        log.error("node %d is left out of the fleet view: stored %s", node_id, e)
        return None
    if endpoint is None:
        return info
    try:
        canonical = str(grammar.endpoint(endpoint, "endpoint"))
    except grammar.GrammarError as e:
        log.error("node %s: its stored endpoint is ignored: %s", info.name, e)
        return info
    return NodeInfo(node_id, info.name, info.site, info.public_key, info.listen_port, canonical)


def _compute(store: Store, now: datetime, sources: Sources, carries_ipv6: bool) -> FleetView:
    infos = {
        info.name: info
        for n in store.nodes()
        if n["revoked_at"] is None
        and (
            info := _node_info(
                n["id"], n["name"], n["site"], n["public_key"], n["listen_port"], n["endpoint"]
            )
        )
        is not None
    }
    node_sites = {name: info.site for name, info in infos.items()}
    latest, previous_reports = sources.reports(store, node_sites)

    planned = peerings(infos)
    measured = {
        (node, m.peer) if node < m.peer else (m.peer, node)
        for node, stored in latest.items()
        for m in stored.report.measurements
        if m.peer in node_sites
    }
    pairs = sorted(planned | measured)
    peer_lists: dict[str, list[str]] = {}
    for a, b in sorted(planned):
        peer_lists.setdefault(a, []).append(b)
        peer_lists.setdefault(b, []).append(a)
    overrides = [
        Override(o["scope"], o["target"], o["setting"], o["value"], o["note"])
        for o in store.overrides()
    ]

    measurements = policy.latest_link_measurements(s.report for s in latest.values())
    mtus = policy.decide_mtus(
        pairs,
        measurements,
        node_sites,
        overrides,
        carries_ipv6=carries_ipv6,
        per_link=False,
        memo=sources.mtus,
    )

    nat_by_node = sources.nat(store, node_sites, now)
    nodes = [
        policy.NodeNat(node, site, tuple(nat_by_node.get(node, ())))
        for node, site in sorted(node_sites.items())
    ]
    saved = store.load_policy_states(_STATE_KEY)
    previous: dict[str, KeepaliveState] = {}
    for site in set(node_sites.values()):
        if _STATE_KEY + site in saved:
            previous[site] = KeepaliveState.from_json(saved[_STATE_KEY + site])
    losses = _mapping_losses(previous_reports, latest)
    keepalives = policy.decide_keepalives(nodes, pairs, previous, losses, overrides, now)
    store.save_policy_states(
        {
            _STATE_KEY + site: new_state.to_json()
            for site, new_state in keepalives.states.items()
            if previous.get(site) != new_state
        }
    )

    lifetimes = {site: d.mapping_lifetime_s for site, d in keepalives.sites.items()}
    towards = {
        node: _towards(
            node,
            latest.get(node),
            mtus.nodes.get(node),
            mtus.directions,
            keepalives.peers,
            lifetimes.get(site),
            now,
            sources.unreadable.get(node),
        )
        for node, site in node_sites.items()
    }
    report_ages = {node: (now - s.received_at).total_seconds() for node, s in latest.items()}
    site_lifetimes = {node: lifetimes.get(site) for node, site in node_sites.items()}
    rows = []
    for a, b in pairs:  # a row and its directions made together: near in memory when read
        ab = towards[a](b)
        ba = towards[b](a)
        state, reason = link_verdict(ab.health, ba.health)
        age_a, age_b = report_ages.get(a), report_ages.get(b)
        # the NATed side's site lifetime, the smaller if both (0 and None: no lifetime)
        lifetime_a, lifetime_b = site_lifetimes[a], site_lifetimes[b]
        if lifetime_a and lifetime_b:
            mapping_lifetime_s: float | None = min(lifetime_a, lifetime_b)
        else:
            mapping_lifetime_s = lifetime_a or lifetime_b or None
        rows.append(
            LinkRow(
                a,
                b,
                node_sites[a],
                node_sites[b],
                state,
                reason,
                ab,
                ba,
                mapping_lifetime_s,
                None if age_a is None or age_b is None else max(age_a, age_b),
            )
        )
    return FleetView(
        now, rows, keepalives.sites, mtus.nodes, keepalives.peers, node_sites, infos, peer_lists
    )


def _towards(
    node: str,
    stored: StoredReport | None,
    plan: NodeMtuPlan | None,
    decisions: dict[tuple[str, str], LinkMtuDecision],
    peer_keepalives: dict[tuple[str, str], PeerKeepalive],
    mapping_lifetime_s: float | None,
    now: datetime,
    unreadable: str | None = None,
) -> Callable[[str], Direction]:
    """What ``node`` does towards a peer, as a function of the peer. What depends on the node
    alone (its report indexed by peer, its plan, its report's age for link health, its site's
    lifetime) is worked out here, once, not once per direction (200,000 of them).
    ``unreadable``: why node's latest stored report cannot be read (its directions say so)."""
    index = _index(stored, plan)
    measurements, routes, configured = index.measurements, index.routes, index.configured
    interface_mtu = index.interface_mtu
    classify = NodeHealth(node, stored, now).classify
    reported = stored is not None

    def direction(peer: str) -> Direction:
        m = measurements.get(peer)
        route = routes.get(peer)
        key = (node, peer)
        decision = decisions[key]
        if route is not None:
            recommended_mtu = route.route_mtu
            mtu_reason = f"{decision.reason}; {route.reason}"
        else:
            recommended_mtu = decision.tunnel_mtu
            mtu_reason = decision.reason
        keepalive = peer_keepalives.get(key)
        recommended_keepalive = keepalive.keepalive_s if keepalive is not None else 0
        peer_config = configured.get(peer)
        configured_mtu: int | None = None
        configured_keepalive: int | None = None
        if reported:  # what node says it applies towards peer
            if peer_config is not None:
                configured_mtu = peer_config.route_mtu or interface_mtu
                configured_keepalive = peer_config.keepalive_s
            else:
                configured_mtu = interface_mtu
        health = classify(
            peer, m, peer_config, recommended_mtu, recommended_keepalive, mapping_lifetime_s
        )
        if unreadable is not None:
            health = LinkHealth(node, peer, "down", unreadable)
        return Direction(
            node,
            peer,
            m.path_mtu if m is not None else None,
            m.icmp_seen if m is not None else False,
            m.rtt_s if m is not None else None,
            m.loss_ratio if m is not None else None,
            m.handshake_age_s if m is not None else None,
            configured_mtu,
            recommended_mtu,
            mtu_reason,
            configured_keepalive,
            recommended_keepalive,
            keepalive.reason if keepalive is not None else "no keepalive decided",
            health,
        )

    return direction


def _mapping_losses(
    previous: dict[str, Report], latest: dict[str, StoredReport]
) -> list[MappingLoss]:
    """Losses each node's two newest reports reveal (the policy ignores ones it has seen)."""
    applied = _Applied(latest)
    losses: list[MappingLoss] = []
    for node, before in previous.items():
        if node in latest:
            losses += policy.detect_mapping_losses(before, latest[node].report, applied)
    return losses


class _Applied(Mapping[tuple[str, str], int]):
    """(node, peer) → the keepalive node's latest report says it applies towards peer. A node's
    entries are indexed when first asked for: only the peers of a lost mapping are (400,000
    entries of a large fleet, almost none of them read)."""

    def __init__(self, latest: dict[str, StoredReport]) -> None:
        self._latest = latest
        self._by_node: dict[str, dict[str, int]] = {}

    def _of(self, node: str) -> dict[str, int]:
        try:
            return self._by_node[node]
        except KeyError:
            stored = self._latest.get(node)
            peers = stored.report.configured.peers if stored is not None else ()
            made = self._by_node[node] = {p.peer: p.keepalive_s for p in peers}
            return made

    def __getitem__(self, key: tuple[str, str]) -> int:
        node, peer = key
        return self._of(node)[peer]

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return ((node, peer) for node in self._latest for peer in self._of(node))

    def __len__(self) -> int:
        return sum(len(self._of(node)) for node in self._latest)


# --- JSON for the API ----------------------------------------------------------------------------


def direction_json(d: Direction) -> dict[str, Any]:
    return {
        "node": d.node,
        "peer": d.peer,
        "state": d.health.state,
        "path_mtu": d.path_mtu,
        "icmp_seen": d.icmp_seen,
        "rtt_s": d.rtt_s,
        "loss_ratio": d.loss_ratio,
        "handshake_age_s": d.handshake_age_s,
        "configured_mtu": d.configured_mtu,
        "recommended_mtu": d.recommended_mtu,
        "mtu_reason": d.mtu_reason,
        "configured_keepalive_s": d.configured_keepalive_s,
        "recommended_keepalive_s": d.recommended_keepalive_s,
        "keepalive_reason": d.keepalive_reason,
        "reason": d.health.reason,
    }


def link_json(r: LinkRow) -> dict[str, Any]:
    return {
        "a": r.a,
        "b": r.b,
        "site_a": r.site_a,
        "site_b": r.site_b,
        "state": r.state,
        "reason": r.reason,
        "mapping_lifetime_s": r.mapping_lifetime_s,
        "report_age_s": None if r.report_age_s is None else round(r.report_age_s, 1),
        "a_to_b": direction_json(r.a_to_b),
        "b_to_a": direction_json(r.b_to_a),
    }


def link_cursor(row: LinkRow) -> str:
    """The paging cursor of a link row: ``a,b`` (names have no comma)."""
    return f"{row.a},{row.b}"


def health_json(
    view: FleetView,
    site: str | None = None,
    problems: bool = False,
    *,
    limit: int | None = None,
    after: str | None = None,
) -> dict[str, Any]:
    """The health document: links (those with an end in ``site``; with ``problems`` only those
    not ok), the fleet's summary (always the whole fleet) and the sites' keepalives.

    Paging: links come ordered by (a, b); ``after`` (a cursor, ``a,b``) starts after that link,
    ``limit`` caps how many; ``next_after`` is the cursor to ask for the next page, None after
    the last. ``links_matched`` counts every link the filters match, on all pages.

    The definition of what ``GET /v1/health`` answers: the API serves the same document from
    a published view's pre-encoded rows (``views.Published.health``; a test holds the two
    equal for every filter and page)."""
    links = [r for r in view.links if site is None or site in (r.site_a, r.site_b)]
    if problems:
        links = [r for r in links if r.state != "ok"]
    matched = len(links)
    if after is not None:
        a, _, b = after.partition(",")
        links = links[bisect.bisect_right(links, (a, b), key=lambda r: (r.a, r.b)) :]
    next_after = None
    if limit is not None and len(links) > limit:
        links = links[:limit]
        next_after = link_cursor(links[-1]) if links else after
    counts = summary(view)
    return {
        "schema_version": 1,
        "generated_at": format_time(view.generated_at),
        "summary": counts,
        "healthy": all(state == "ok" for state in counts),
        "links_matched": matched,
        "next_after": next_after,
        "links": [link_json(r) for r in links],
        "sites": [
            site_json(s) for name, s in sorted(view.sites.items()) if site is None or name == site
        ],
    }


def site_json(s: SiteKeepalive) -> dict[str, Any]:
    """A site's keepalive decision as the health document shows it (``site`` first)."""
    return {"site": s.site, **{k: v for k, v in s.to_json().items() if k != "site"}}


def summary(view: FleetView) -> dict[str, int]:
    """Links per state, the whole fleet."""
    counts: dict[str, int] = {}
    for r in view.links:
        counts[r.state] = counts.get(r.state, 0) + 1
    return counts


def dumps_bytes() -> Callable[[Any], bytes]:
    """Compact JSON as UTF-8 bytes: orjson where installed (the controller extra installs it:
    it encodes a 100,000-link health document 2-3 times faster), else the standard library."""
    try:
        import orjson
    except ImportError:
        encode = json.JSONEncoder(separators=(",", ":")).encode  # ASCII out: str → bytes 1:1
        return lambda obj: encode(obj).encode()
    return orjson.dumps


def desired_json(view: FleetView, node: str, tunnel: TunnelConfig) -> dict[str, Any]:
    """Everything ``node`` applies: its interface (addresses, port, MTU) and, per peer, the
    public key, endpoint, allowed IPs, keepalive and route MTU — each decision with its reason.
    The private key is not here: it is generated on the node and never leaves it."""
    info = view.nodes[node]
    plan = view.plans.get(node)
    routes = {r.peer: r for r in plan.routes} if plan else {}
    peers = []
    for name in view.peers.get(node, []):
        peer = view.nodes[name]
        keepalive = view.peer_keepalives.get((node, name))
        theirs = view.peer_keepalives.get((name, node))
        route = routes.get(name)
        peers.append(
            {
                "peer": name,
                "site": peer.site,
                "public_key": peer.public_key,
                "endpoint": peer.endpoint,
                "allowed_ips": [_host_route(a) for a in tunnel.addresses(peer.node_id)],
                "keepalive_s": keepalive.keepalive_s if keepalive else 0,
                "keepalive_reason": keepalive.reason if keepalive else "no keepalive decided",
                # what the peer sends us: its NAT's mapping is held by it (NAT watch)
                "peer_keepalive_s": theirs.keepalive_s if theirs else 0,
                "route_mtu": route.route_mtu if route else policy.SAFE_DEFAULT_MTU,
                "route_mtu_reason": route.reason if route else "unmeasured: safe default 1280",
                "outer_fragmentation": route.fragment_outer if route else False,
            }
        )
    return {
        "schema_version": 1,
        "node": node,
        "site": info.site,
        "generated_at": format_time(view.generated_at),
        "interface": tunnel.interface,
        "addresses": tunnel.addresses(info.node_id),
        "listen_port": info.listen_port,
        "interface_mtu": plan.interface_mtu if plan else policy.SAFE_DEFAULT_MTU,
        "interface_mtu_reason": plan.reason if plan else "no links yet: safe default",
        "peers": peers,
    }


def _host_route(cidr: str) -> str:
    address = cidr.split("/")[0]
    return f"{address}/{128 if ':' in address else 32}"


def tune_json(view: FleetView, site: str | None = None) -> dict[str, Any]:
    """What would change: every configured value that differs from the recommendation."""
    changes = []
    for r in view.links:
        for d in (r.a_to_b, r.b_to_a):
            if site is not None and view.node_sites.get(d.node) != site:
                continue
            if d.configured_mtu is not None and d.configured_mtu != d.recommended_mtu:
                changes.append(
                    {"node": d.node, "peer": d.peer, "setting": "route_mtu",
                     "current": d.configured_mtu, "recommended": d.recommended_mtu,
                     "reason": d.mtu_reason}
                )  # fmt: skip
            current_k = d.configured_keepalive_s
            if current_k is not None and current_k != d.recommended_keepalive_s:
                changes.append(
                    {"node": d.node, "peer": d.peer, "setting": "keepalive_s",
                     "current": current_k, "recommended": d.recommended_keepalive_s,
                     "reason": d.keepalive_reason}
                )  # fmt: skip
    return {"schema_version": 1, "generated_at": format_time(view.generated_at), "changes": changes}

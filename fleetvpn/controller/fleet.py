"""The fleet as the controller sees it now: the store's latest reports run through the policy.

Contract: ``compute(store, now)`` reads the store (nodes, each node's two newest reports, NAT
history, overrides, the keepalive policy's previous state), runs the pure policy, saves the
keepalive state the policy returned, and returns a :class:`FleetView` — per-link health rows,
per-site keepalive, per-node desired MTU and keepalive — every value with its reason. It is
the only place that joins storage and policy; the API, ``health``, ``tune`` and ``/metrics``
all read a FleetView.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from fleetvpn.controller import policy
from fleetvpn.controller.config import TunnelConfig
from fleetvpn.controller.health import measurement_of
from fleetvpn.controller.store import Store
from fleetvpn.model import (
    KeepaliveState,
    LinkHealth,
    MappingLoss,
    NatMeasurement,
    NodeMtuPlan,
    Override,
    PeerKeepalive,
    Report,
    SiteKeepalive,
    StoredReport,
    format_time,
)

_STATE_KEY = "keepalive:site:"


@dataclass(frozen=True)
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


@dataclass(frozen=True)
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


def _stored(received_at: datetime, body: dict[str, Any]) -> StoredReport:
    return StoredReport(received_at, Report.from_json(body))


def _configured(stored: StoredReport | None, peer: str) -> tuple[int | None, int | None]:
    """(route MTU or interface MTU, keepalive) that node says it applies towards peer."""
    if stored is None:
        return None, None
    configured = stored.report.configured
    for p in configured.peers:
        if p.peer == peer:
            return p.route_mtu or configured.interface_mtu, p.keepalive_s
    return configured.interface_mtu, None


def compute(store: Store, now: datetime) -> FleetView:
    infos = {
        n["name"]: NodeInfo(
            n["id"], n["name"], n["site"], n["public_key"], n["listen_port"], n["endpoint"]
        )
        for n in store.nodes()
        if n["revoked_at"] is None
    }
    node_sites = {name: info.site for name, info in infos.items()}
    history = store.latest_reports(per_node=2)
    latest = {node: _stored(*reports[0]) for node, reports in history.items() if node in node_sites}

    planned = peerings(infos)
    measured = {
        (min(node, m.peer), max(node, m.peer))
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
    mtus = policy.decide_mtus(pairs, measurements, node_sites, overrides)

    since = now - timedelta(seconds=policy.LIFETIME_WINDOW_S)
    nat_by_node: dict[str, list[NatMeasurement]] = {}
    for row in store.nat_history(since):
        nat_by_node.setdefault(row["node"], []).append(
            NatMeasurement(
                measured_at=row["measured_at"],
                nat=row["nat"],
                stateful_filter=row["stateful_filter"],
                mapped_address=row["mapped_address"],
                mapping_lifetime_s=row["mapping_lifetime_s"],
                resolution_s=row["resolution_s"],
                max_lifetime_s=row["max_lifetime_s"],
            )
        )
    nodes = [
        policy.NodeNat(node, site, tuple(nat_by_node.get(node, ())))
        for node, site in sorted(node_sites.items())
    ]
    previous: dict[str, KeepaliveState] = {}
    for site in set(node_sites.values()):
        saved = store.load_policy_state(_STATE_KEY + site)
        if saved is not None:
            previous[site] = KeepaliveState.from_json(saved)
    losses = _mapping_losses(history, latest)
    keepalives = policy.decide_keepalives(nodes, pairs, previous, losses, overrides, now)
    for site, new_state in keepalives.states.items():
        if previous.get(site) != new_state:
            store.save_policy_state(_STATE_KEY + site, new_state.to_json())

    lifetimes = {site: d.mapping_lifetime_s for site, d in keepalives.sites.items()}
    rows = []
    for a, b in pairs:
        ab = _direction(a, b, latest, mtus, keepalives, lifetimes, node_sites, now)
        ba = _direction(b, a, latest, mtus, keepalives, lifetimes, node_sites, now)
        link = policy.classify_link(ab.health, ba.health)
        ages = [(now - latest[n].received_at).total_seconds() for n in (a, b) if n in latest]
        site_lifetimes = [
            t for t in (lifetimes.get(node_sites[a]), lifetimes.get(node_sites[b])) if t
        ]
        rows.append(
            LinkRow(
                a=a,
                b=b,
                site_a=node_sites[a],
                site_b=node_sites[b],
                state=link.state,
                reason=link.reason,
                a_to_b=ab,
                b_to_a=ba,
                mapping_lifetime_s=min(site_lifetimes) if site_lifetimes else None,
                report_age_s=max(ages) if len(ages) == 2 else None,
            )
        )
    return FleetView(
        now, rows, keepalives.sites, mtus.nodes, keepalives.peers, node_sites, infos, peer_lists
    )


def _direction(
    node: str,
    peer: str,
    latest: dict[str, StoredReport],
    mtus: policy.FleetMtu,
    keepalives: policy.FleetKeepalive,
    lifetimes: dict[str, float | None],
    node_sites: dict[str, str],
    now: datetime,
) -> Direction:
    stored = latest.get(node)
    m = measurement_of(stored, peer) if stored is not None else None
    plan = mtus.nodes.get(node)
    route = next((r for r in plan.routes if r.peer == peer), None) if plan else None
    decision = mtus.directions[node, peer]
    recommended_mtu = route.route_mtu if route else decision.tunnel_mtu
    mtu_reason = f"{decision.reason}; {route.reason}" if route else decision.reason
    keepalive = keepalives.peers.get((node, peer))
    recommended_keepalive = keepalive.keepalive_s if keepalive else 0
    configured_mtu, configured_keepalive = _configured(stored, peer)
    health = policy.classify_direction(
        node,
        peer,
        stored,
        now=now,
        recommended_route_mtu=recommended_mtu,
        recommended_keepalive_s=recommended_keepalive,
        mapping_lifetime_s=lifetimes.get(node_sites[node]),
    )
    return Direction(
        node=node,
        peer=peer,
        path_mtu=m.path_mtu if m else None,
        icmp_seen=m.icmp_seen if m else False,
        rtt_s=m.rtt_s if m else None,
        loss_ratio=m.loss_ratio if m else None,
        handshake_age_s=m.handshake_age_s if m else None,
        configured_mtu=configured_mtu,
        recommended_mtu=recommended_mtu,
        mtu_reason=mtu_reason,
        configured_keepalive_s=configured_keepalive,
        recommended_keepalive_s=recommended_keepalive,
        keepalive_reason=keepalive.reason if keepalive else "no keepalive decided",
        health=health,
    )


def _mapping_losses(
    history: dict[str, list[tuple[datetime, dict[str, Any]]]], latest: dict[str, StoredReport]
) -> list[MappingLoss]:
    """Losses each node's two newest reports reveal (the policy ignores ones it has seen)."""
    applied = {
        (node, p.peer): p.keepalive_s
        for node, stored in latest.items()
        for p in stored.report.configured.peers
    }
    losses: list[MappingLoss] = []
    for node, reports in history.items():
        if len(reports) == 2 and node in latest:
            before = Report.from_json(reports[1][1])
            losses += policy.detect_mapping_losses(before, latest[node].report, applied)
    return losses


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


def health_json(view: FleetView, site: str | None = None, problems: bool = False) -> dict[str, Any]:
    rows = [
        r
        for r in view.links
        if (site is None or site in (r.site_a, r.site_b)) and (not problems or r.state != "ok")
    ]
    counts: dict[str, int] = {}
    for r in view.links:
        counts[r.state] = counts.get(r.state, 0) + 1
    return {
        "schema_version": 1,
        "generated_at": format_time(view.generated_at),
        "summary": counts,
        "healthy": all(r.state == "ok" for r in view.links),
        "links": [
            {
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
            for r in rows
        ],
        "sites": [
            {"site": s.site, **{k: v for k, v in s.to_json().items() if k != "site"}}
            for name, s in sorted(view.sites.items())
            if site is None or name == site
        ],
    }


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
                "route_mtu": route.route_mtu if route else policy.SAFE_DEFAULT_MTU,
                "route_mtu_reason": route.reason if route else "unmeasured: safe default 1280",
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


class FleetCache:
    """One FleetView shared by every reader, recomputed when it is older than ``max_age_s`` or
    after a write through this process (``invalidate``). Several controllers on one PostgreSQL
    database see each other's writes within ``max_age_s``. Thread-safe: one recompute at a time,
    readers of a fresh view never wait."""

    def __init__(self, store: Store, max_age_s: float = 5.0) -> None:
        import threading

        self.store = store
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._view: FleetView | None = None
        self._stale = True

    def invalidate(self) -> None:
        self._stale = True

    def get(self, now: datetime) -> FleetView:
        view = self._view
        if view is not None and not self._stale and self._fresh(view, now):
            return view
        with self._lock:
            view = self._view
            if view is None or self._stale or not self._fresh(view, now):
                self._stale = False
                view = self._view = compute(self.store, now)
            return view

    def _fresh(self, view: FleetView, now: datetime) -> bool:
        return (now - view.generated_at).total_seconds() < self.max_age_s

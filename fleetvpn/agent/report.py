"""What the agent knows → a :class:`~fleetvpn.model.Report` and the ``status.json`` document. Pure.

A report is a snapshot: every report carries the latest known value of everything (the newest
path MTU of each peer, the newest NAT measurement), not only what changed since the last one,
because the controller decides from each node's latest report alone.

``configured`` is what is *applied* — read back from the interface (``wg show`` and the routes),
not what the controller asked for — so the controller sees a failed or partial apply, and with
``apply: false`` it sees what Ansible (or a person) configured.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from fleetvpn.model import (
    Configured,
    ConfiguredPeer,
    Family,
    LinkMeasurement,
    NatMeasurement,
    Report,
    format_time,
)
from fleetvpn.wg.state import TunnelState

STATUS_SCHEMA: Final = 1


@dataclass(frozen=True)
class PathMtu:
    """One PMTU measurement node → peer (forward, or a reverse run through the peer's mapping)."""

    family: Family
    path_mtu: int
    icmp_seen: bool
    measured_at: float  # unix seconds
    how: str  # "forward" | "reverse"
    reason: str
    fragments_cross: bool | None = None  # a DF-clear probe above it came back (IPv4)


@dataclass(frozen=True)
class Rtt:
    rtt_s: float | None  # None: every probe lost
    loss_ratio: float
    sent: int
    measured_at: float
    full_size: int | None = None  # a full-size probe went along (the route MTU), or None
    full_size_lost: bool | None = None


@dataclass(frozen=True)
class PeerObservation:
    """Everything the agent knows about one peer right now."""

    name: str
    public_key: str
    planned_endpoint: str | None  # from the desired state
    endpoint: str | None = None  # in use by WireGuard (``wg show``)
    latest_handshake: int = 0  # unix seconds, 0 = never
    rx_bytes: int = 0
    tx_bytes: int = 0
    pmtu: PathMtu | None = None
    rtt: Rtt | None = None


def family_of(endpoint: str | None) -> Family | None:
    if endpoint is None:
        return None
    return 6 if endpoint.startswith("[") else 4


def measurement(peer: PeerObservation, now_unix: float) -> LinkMeasurement:
    """The peer's LinkMeasurement. Its family is the underlay in use (the endpoint WireGuard
    uses, else the planned one, else the one probed); a PMTU of another family is left out (the
    report would mix two paths)."""
    family = (
        family_of(peer.endpoint)
        or family_of(peer.planned_endpoint)
        or (peer.pmtu.family if peer.pmtu else None)
        or 4
    )
    pmtu = peer.pmtu if peer.pmtu is not None and peer.pmtu.family == family else None
    age = None
    if peer.latest_handshake > 0:
        age = max(0.0, now_unix - peer.latest_handshake)
    return LinkMeasurement(
        peer=peer.name,
        family=family,
        rx_bytes=peer.rx_bytes,
        tx_bytes=peer.tx_bytes,
        endpoint=peer.endpoint if family_of(peer.endpoint) == family else None,
        path_mtu=pmtu.path_mtu if pmtu else None,
        icmp_seen=pmtu.icmp_seen if pmtu else False,
        fragments_cross=pmtu.fragments_cross if pmtu else None,
        rtt_s=peer.rtt.rtt_s if peer.rtt else None,
        loss_ratio=peer.rtt.loss_ratio if peer.rtt else None,
        handshake_age_s=age,
    )


def configured_from(
    state: TunnelState | None, names: Mapping[str, str], outer: Collection[str] = ()
) -> Configured:
    """What the interface applies. ``names``: public key → peer name (peers the controller does
    not know are left out: the report names peers, not keys). ``outer``: the peers whose outer
    packets may fragment on the way (fleetvpn.agent.outerroute). A peer's route MTU is its
    smallest route's (IPv6 routes stay at 1280 when its IPv4 ones go below)."""
    if state is None:
        return Configured()
    peers = []
    for status in state.peers:
        name = names.get(status.public_key)
        if name is None:
            continue
        mtus = [state.route_mtus[c] for c in status.allowed_ips if c in state.route_mtus]
        known = [m for m in mtus if m is not None]
        route_mtu = min(known) if known else None
        peers.append(ConfiguredPeer(name, route_mtu, status.keepalive_s, name in outer))
    peers.sort(key=lambda p: p.peer)
    return Configured(state.mtu, tuple(peers), state.implementation)


def build_report(
    *,
    report_id: str,
    node: str,
    site: str,
    created_at: datetime,
    peers: Sequence[PeerObservation],
    nat: NatMeasurement | None,
    configured: Configured,
) -> Report:
    now_unix = created_at.timestamp()
    measurements = tuple(measurement(p, now_unix) for p in peers if p.name != node)
    if nat is not None and nat.measured_at > created_at:
        nat = None  # a clock step backwards: the controller would refuse the report
    return Report(
        report_id=report_id,
        node=node,
        site=site,
        created_at=created_at,
        measurements=measurements,
        nat=nat,
        configured=configured,
    )


def status_document(
    *,
    node: str,
    site: str | None,
    interface: str,
    apply: bool,
    now: datetime,
    peers: Sequence[PeerObservation],
    nat: NatMeasurement | None,
    configured: Configured,
    controller: Mapping[str, Any],
    last_apply: Mapping[str, Any] | None,
    spool: Mapping[str, int],
    pid: int,
) -> dict[str, Any]:
    """``status.json``: for ``fleetvpn agent status`` and Ansible. Never a key or a token."""
    now_unix = now.timestamp()
    rows = []
    for p in peers:
        m = measurement(p, now_unix)
        rows.append(
            {
                **{k: v for k, v in m.to_json().items() if k != "peer"},
                "peer": p.name,
                "planned_endpoint": p.planned_endpoint,
                "path_mtu_how": p.pmtu.how if p.pmtu else None,
                "path_mtu_reason": p.pmtu.reason if p.pmtu else None,
                "path_mtu_measured_at": _at(p.pmtu.measured_at) if p.pmtu else None,
                "rtt_measured_at": _at(p.rtt.measured_at) if p.rtt else None,
            }
        )
    return {
        "schema_version": STATUS_SCHEMA,
        "node": node,
        "site": site,
        "pid": pid,
        "updated_at": format_time(now),
        "interface": interface,
        "apply": apply,
        "configured": configured.to_json(),
        "peers": rows,
        "nat": nat.to_json() if nat else None,
        "controller": dict(controller),
        "last_apply": dict(last_apply) if last_apply else None,
        "spool": dict(spool),
    }


def _at(unix_s: float) -> str:
    from datetime import UTC

    return format_time(datetime.fromtimestamp(round(unix_s), UTC))

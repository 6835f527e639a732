"""Link health: one state and its reason per link direction, for ``fleetvpn health``.  Pure.

States, checked in this order (the first that holds wins; "degraded" lists every cause):
  down        no report from the node, or the handshake is older than REJECT_AFTER_TIME_S (no
              valid session: nothing passes).  Note: WireGuard handshakes only when it sends, so
              an idle link with keepalive off on both ends also ends up here.
  stale       the node's latest report is older than STALE_AFTER_S: what we know is too old.
  unmeasured  the report has no measurement of this peer, or (after the checks below) no path MTU.
  blackhole   the configured MTUs send outer packets (padding included) above the measured path
              MTU and no ICMP "too big" was seen: big packets vanish while small ones pass —
              unless those outer packets are fragmented on the way (next).
  degraded    loss above LOSS_DEGRADED_RATIO; the path too small but ICMP seen (big packets rely
              on PMTU discovery or fragmentation); configured MTU more than MTU_SHORTFALL_BYTES
              below the recommendation; keepalive above the site's mapping lifetime, or off where
              one is recommended.
  fragmenting every packet arrives, some of them as outer fragments (slower): the node's
              implementation and settings send them without DF (kernel WireGuard over IPv4
              always; wireguard-go towards an endpoint whose route is locked, which the agent
              does under a path below 1280 + overhead for IPv6 inside) and the prober saw
              fragments cross the path. Where they do not cross, or over an IPv6 underlay
              (routers never fragment), it is blackhole with that reason
              (fleetvpn.engines.outer decides the fate of an outer packet).
  ok          none of the above.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

from fleetvpn import grammar
from fleetvpn.controller.policy_mtu import IPV6_MIN_MTU, overhead_for, padded_outer_bytes
from fleetvpn.controller.trusted import fast_constructor
from fleetvpn.engines.outer import Implementation, OuterVerdict, outer_fate
from fleetvpn.model import (
    HEALTH_SEVERITY,
    ConfiguredPeer,
    Family,
    HealthState,
    LinkHealth,
    LinkMeasurement,
    StoredReport,
)

# WireGuard rejects a session's keys 180 s after its handshake (wireguard-go device/constants.go
# RejectAfterTime); with traffic or keepalives a new handshake comes every ~120 s.
REJECT_AFTER_TIME_S: Final = 180.0
# Agents report about once a minute: five missed reports make what we show history.
STALE_AFTER_S: Final = 300.0
# Above 2 % loss TCP throughput collapses (Mathis: rate ∝ 1/√loss) and users notice.
LOSS_DEGRADED_RATIO: Final = 0.02
# 100 bytes below the recommendation wastes ~7 % of every full-size packet (1420 → 1320).
MTU_SHORTFALL_BYTES: Final = 100

SEVERITY: Final = HEALTH_SEVERITY  # worst first (model.py)


class _Unset:
    """The type of "not given" for arguments whose None means something."""


_UNSET: Final = _Unset()


def measurement_of(stored: StoredReport, peer: str) -> LinkMeasurement | None:
    """node's measurement of ``peer`` in its report: the one over the endpoint in use, if any."""
    candidates = [m for m in stored.report.measurements if m.peer == peer]
    in_use = [m for m in candidates if m.endpoint is not None]
    chosen = in_use or candidates
    return chosen[0] if chosen else None


def classify_direction(
    node: str,
    peer: str,
    stored: StoredReport | None,
    *,
    now: datetime,
    recommended_route_mtu: int | None = None,
    recommended_keepalive_s: int | None = None,
    mapping_lifetime_s: float | None = None,
    measurement: LinkMeasurement | _Unset | None = _UNSET,
    peer_config: ConfiguredPeer | _Unset | None = _UNSET,
) -> LinkHealth:
    """The health of node → peer as ``node``'s latest report shows it.

    ``stored``: node's latest accepted report (None: never reported).  ``now``: the controller's
    clock (aware).  ``recommended_route_mtu`` / ``recommended_keepalive_s``: the policy's values
    for what node applies towards peer (None: no comparison).  ``mapping_lifetime_s``: the
    smallest recent lifetime at node's site (None: unknown or no NAT).  ``measurement`` /
    ``peer_config``: :func:`measurement_of` ``stored`` for peer and ``stored``'s configured
    entry for peer, when the caller has them indexed already (a fleet asks 200,000 times; it
    uses :class:`NodeHealth` directly).  Never raises.
    """
    m: LinkMeasurement | None = None
    config: ConfiguredPeer | None = None
    if stored is not None:
        m = measurement_of(stored, peer) if isinstance(measurement, _Unset) else measurement
        if isinstance(peer_config, _Unset):
            config = next((p for p in stored.report.configured.peers if p.peer == peer), None)
        else:
            config = peer_config
    return NodeHealth(node, stored, now).classify(
        peer, m, config, recommended_route_mtu, recommended_keepalive_s, mapping_lifetime_s
    )


_new_health = fast_constructor(LinkHealth)  # 200,000 per recompute


class NodeHealth:
    """:func:`classify_direction` for the directions of one node: what depends on the node alone
    (its latest report, that report's age, whether it is missing or stale) is worked out once,
    not once per peer."""

    __slots__ = ("_age_s", "_implementation", "_interface_mtu", "_outer", "_verdict", "node")

    def __init__(self, node: str, stored: StoredReport | None, now: datetime) -> None:
        self.node = node
        # (state, reason) of every direction of this node, when the node alone decides it
        self._verdict: tuple[HealthState, str] | None = None
        self._age_s = 0.0
        self._interface_mtu: int | None = None
        self._implementation: Implementation | None = None
        # (route MTU, family) → (overhead, largest outer packet): a node's peers share a few
        self._outer: dict[tuple[int | None, Family], tuple[int, int]] = {}
        if stored is None:
            self._verdict = ("down", f"down: no report from {node}")
            return
        report_age_s = (now - stored.received_at).total_seconds()
        if report_age_s > STALE_AFTER_S:
            self._verdict = (
                "stale",
                f"stale: last report from {node} {report_age_s:.0f} s ago "
                f"(> {STALE_AFTER_S:.0f} s)",
            )
        self._age_s = max(0.0, report_age_s)
        self._interface_mtu = stored.report.configured.interface_mtu
        self._implementation = stored.report.configured.implementation

    def classify(
        self,
        peer: str,
        m: LinkMeasurement | None,
        peer_config: ConfiguredPeer | None,
        recommended_route_mtu: int | None,
        recommended_keepalive_s: int | None,
        mapping_lifetime_s: float | None,
    ) -> LinkHealth:
        """node → peer; ``m``: :func:`measurement_of` the report for peer, ``peer_config``: the
        report's configured entry for peer (see :func:`classify_direction` for the rest)."""
        node = self.node
        if self._verdict is not None:
            return _new_health(node, peer, *self._verdict)
        if m is None:
            reason = f"unmeasured: {node}'s report has no measurement of {peer}"
            return _new_health(node, peer, "unmeasured", reason)
        if m.handshake_age_s is None:
            return _new_health(
                node, peer, "down", f"down: no handshake between {node} and {peer} yet"
            )
        handshake_age_s = m.handshake_age_s + self._age_s
        if handshake_age_s > REJECT_AFTER_TIME_S:
            reason = (
                f"down: last handshake {handshake_age_s:.0f} s ago "
                f"(> {REJECT_AFTER_TIME_S:.0f} s, REJECT_AFTER_TIME): no valid session"
            )
            return _new_health(node, peer, "down", reason)
        route_mtu = peer_config.route_mtu if peer_config else None
        interface_mtu = self._interface_mtu or route_mtu
        path_mtu = m.path_mtu
        loss_ratio = m.loss_ratio
        problems: list[str] = []
        fragmenting: str | None = None
        if path_mtu is not None and interface_mtu is not None:
            try:
                overhead, outer = self._outer[route_mtu, m.family]
            except KeyError:
                overhead = overhead_for(m.family)
                outer = padded_outer_bytes(route_mtu, interface_mtu, overhead)
                self._outer[route_mtu, m.family] = overhead, outer
            fragment = peer_config is not None and peer_config.outer_fragmentation
            if outer <= path_mtu and fragment and route_mtu is not None:
                # IPv4 inside fits; IPv6 inside keeps 1280 and the rest goes out fragmented
                big = padded_outer_bytes(max(route_mtu, IPV6_MIN_MTU), interface_mtu, overhead)
                if big > path_mtu:
                    fate = self._fate(m, big, path_mtu, locked=True)
                    mss = route_mtu - grammar.TCP_IPV6_HEADERS
                    said = (
                        f"IPv4 inside fits (route MTU {route_mtu}: up to {outer} bytes into "
                        f"a path MTU of {path_mtu}); IPv6 inside above {route_mtu} bytes, "
                        f"TCP aside (MSS clamped to {mss}): {fate.reason}"
                    )
                    if fate.fate == "black_hole":
                        return _new_health(node, peer, "blackhole", f"blackhole: {said}")
                    fragmenting = said
            if outer > path_mtu:
                effective = min(route_mtu or interface_mtu, interface_mtu)
                sends = (
                    f"configured MTU {effective} sends up to {outer} bytes (padding and "
                    f"+{overhead} overhead) into a path MTU of {path_mtu}"
                )
                if self._implementation == "kernel" or fragment:
                    fate = self._fate(m, outer, path_mtu, locked=fragment)
                    if fate.fate == "fragmented":
                        fragmenting = f"{sends}: {fate.reason}"
                    elif not m.icmp_seen:
                        reason = f"blackhole: {sends}: {fate.reason}"
                        return _new_health(node, peer, "blackhole", reason)
                    else:
                        problems.append(f"{sends}: {fate.reason}; ICMP seen")
                elif not m.icmp_seen:
                    reason = (
                        f"blackhole: {sends} and no ICMP was seen: packets above "
                        f"{path_mtu - overhead} bytes vanish"
                    )
                    return _new_health(node, peer, "blackhole", reason)
                else:
                    problems.append(f"{sends}; ICMP seen, so big packets rely on PMTU discovery")
        if loss_ratio is not None and loss_ratio > LOSS_DEGRADED_RATIO:
            problems.append(f"loss {loss_ratio:.1%} (> {LOSS_DEGRADED_RATIO:.0%})")
        effective_mtu = route_mtu or interface_mtu
        if (
            recommended_route_mtu is not None
            and effective_mtu is not None
            and effective_mtu < recommended_route_mtu - MTU_SHORTFALL_BYTES
        ):
            problems.append(
                f"MTU {effective_mtu} configured, {recommended_route_mtu} recommended "
                f"(> {MTU_SHORTFALL_BYTES} bytes unused per packet)"
            )
        keepalive_s = peer_config.keepalive_s if peer_config else None
        if keepalive_s and mapping_lifetime_s is not None and keepalive_s > mapping_lifetime_s:
            problems.append(
                f"keepalive {keepalive_s} s is above the site's mapping lifetime "
                f"{mapping_lifetime_s:g} s: {peer} cannot reach {node} part of the time"
            )
        if keepalive_s == 0 and recommended_keepalive_s:
            problems.append(f"keepalive off, {recommended_keepalive_s} s recommended (NAT)")
        if problems:
            if fragmenting is not None:
                problems.append(fragmenting)
            return _new_health(node, peer, "degraded", "degraded: " + "; ".join(problems))
        if fragmenting is not None:
            return _new_health(node, peer, "fragmenting", f"fragmenting: {fragmenting}")
        if path_mtu is None:
            reason = f"unmeasured: path MTU {node}→{peer} not measured yet"
            return _new_health(node, peer, "unmeasured", reason)
        rtt_s = m.rtt_s
        if rtt_s is not None and loss_ratio is not None:  # the usual case: one format
            reason = (
                f"ok: handshake {handshake_age_s:.0f} s ago, RTT {rtt_s * 1000:.0f} ms, "
                f"loss {loss_ratio:.1%}, path MTU {path_mtu}"
            )
        else:
            rtt = f", RTT {rtt_s * 1000:.0f} ms" if rtt_s is not None else ""
            loss = f", loss {loss_ratio:.1%}" if loss_ratio is not None else ""
            reason = f"ok: handshake {handshake_age_s:.0f} s ago{rtt}{loss}, path MTU {path_mtu}"
        return _new_health(node, peer, "ok", reason)

    def _fate(self, m: LinkMeasurement, outer: int, path_mtu: int, *, locked: bool) -> OuterVerdict:
        """The fate of an ``outer``-byte packet from this node over ``m``'s path; the route
        towards the endpoint is locked at ``outer`` or above when ``locked`` (the agent's
        outer fragmentation), else it carries it (no smaller route MTU is set there)."""
        return outer_fate(
            self._implementation or "userspace",
            m.family,
            outer_size=outer,
            route_mtu=outer,
            path_mtu=path_mtu,
            route_locked=locked,
            fragments_cross=m.fragments_cross is not False,
        )


def classify_link(a_to_b: LinkHealth, b_to_a: LinkHealth) -> LinkHealth:
    """One row per link: the worse direction's state, with both directions' reasons."""
    state, reason = link_verdict(a_to_b, b_to_a)
    return LinkHealth(a_to_b.node, a_to_b.peer, state, reason)


_RANK: Final[dict[str, int]] = {state: rank for rank, state in enumerate(SEVERITY)}


def link_verdict(a_to_b: LinkHealth, b_to_a: LinkHealth) -> tuple[HealthState, str]:
    """:func:`classify_link`'s state and reason, without the LinkHealth around them."""
    state = a_to_b.state if _RANK[a_to_b.state] <= _RANK[b_to_a.state] else b_to_a.state
    reason = f"{a_to_b.node}→{a_to_b.peer} {a_to_b.reason}; {b_to_a.node}→{b_to_a.peer} " + (
        b_to_a.reason
    )
    return state, reason

"""``/metrics``: the fleet view in Prometheus' text format. Host and site names are labels
(never public keys); bytes and seconds are the units (reference.md, "CLI and output")."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from fleetvpn.controller.fleet import FleetView

STATES = ("ok", "degraded", "blackhole", "stale", "down", "unmeasured")


class _FleetCollector(Collector):
    def __init__(self, view: FleetView) -> None:
        self.view = view

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["node", "peer", "site"]
        path_mtu = GaugeMetricFamily(
            "fleetvpn_link_path_mtu_bytes",
            "Measured path MTU, node to peer (IP bytes)",
            labels=labels,
        )
        rtt = GaugeMetricFamily(
            "fleetvpn_link_rtt_seconds", "Round-trip time through the tunnel", labels=labels
        )
        loss = GaugeMetricFamily(
            "fleetvpn_link_loss_ratio", "Probe loss, node to peer", labels=labels
        )
        handshake = GaugeMetricFamily(
            "fleetvpn_peer_last_handshake_seconds",
            "Unix time of the latest WireGuard handshake seen by node",
            labels=labels,
        )
        recommended = GaugeMetricFamily(
            "fleetvpn_link_recommended_mtu_bytes", "Route MTU the policy recommends", labels=labels
        )
        configured = GaugeMetricFamily(
            "fleetvpn_link_configured_mtu_bytes", "Route MTU the node applies", labels=labels
        )
        state = GaugeMetricFamily(
            "fleetvpn_link_state",
            "1 for the link's current health state",
            labels=["a", "b", "state"],
        )
        lifetime = GaugeMetricFamily(
            "fleetvpn_site_mapping_lifetime_seconds",
            "Smallest recent established-flow NAT mapping lifetime at the site",
            labels=["site"],
        )
        keepalive = GaugeMetricFamily(
            "fleetvpn_site_keepalive_seconds",
            "Keepalive decided for the site (0 = off)",
            labels=["site"],
        )
        now = self.view.generated_at.timestamp()
        for row in self.view.links:
            for d, site in ((row.a_to_b, row.site_a), (row.b_to_a, row.site_b)):
                key = [d.node, d.peer, site]
                if d.path_mtu is not None:
                    path_mtu.add_metric(key, d.path_mtu)
                if d.rtt_s is not None:
                    rtt.add_metric(key, d.rtt_s)
                if d.loss_ratio is not None:
                    loss.add_metric(key, d.loss_ratio)
                if d.handshake_age_s is not None and row.report_age_s is not None:
                    handshake.add_metric(key, now - row.report_age_s - d.handshake_age_s)
                recommended.add_metric(key, d.recommended_mtu)
                if d.configured_mtu is not None:
                    configured.add_metric(key, d.configured_mtu)
            for s in STATES:
                state.add_metric([row.a, row.b, s], 1.0 if row.state == s else 0.0)
        for site, decision in sorted(self.view.sites.items()):
            keepalive.add_metric([site], decision.keepalive_s)
            if decision.mapping_lifetime_s is not None:
                lifetime.add_metric([site], decision.mapping_lifetime_s)
        yield from (
            path_mtu,
            rtt,
            loss,
            handshake,
            recommended,
            configured,
            state,
            lifetime,
            keepalive,
        )


def render(view: FleetView) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_FleetCollector(view))
    return generate_latest(registry)

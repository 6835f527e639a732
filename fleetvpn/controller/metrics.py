"""``/metrics``: the fleet view in Prometheus' text format (version 0.0.4). Host and site names
are labels (never public keys); bytes and seconds are the units (reference.md, "CLI and
output").

Written by hand rather than through prometheus_client's collector: a 100,000-link fleet has
over a million samples, and the client's per-sample objects and label checks took 12 s of it.
Names and sites are validated at enrollment (``NAME_PATTERN``: no quote, backslash or newline),
so labels need no escaping; :func:`_label` escapes anyway, should that ever change. The text is
rendered by the view worker, for each view while someone scrapes (see views.py).

Series: per link direction (``node`` → ``peer``, ``site`` = node's site) path MTU, RTT, loss,
last handshake, recommended and configured route MTU; per link one ``fleetvpn_link_state``
sample, 1, with the link's state as a label (one series per link, not one per possible state);
per site the mapping lifetime and the keepalive.
"""

from __future__ import annotations

import math

from fleetvpn.controller.fleet import FleetView
from fleetvpn.model import HEALTH_SEVERITY

STATES = HEALTH_SEVERITY

_DIRECTION_METRICS = (
    ("fleetvpn_link_path_mtu_bytes", "Measured path MTU, node to peer (IP bytes)"),
    ("fleetvpn_link_rtt_seconds", "Round-trip time through the tunnel"),
    ("fleetvpn_link_loss_ratio", "Probe loss, node to peer"),
    (
        "fleetvpn_peer_last_handshake_seconds",
        "Unix time of the latest WireGuard handshake seen by node",
    ),
    ("fleetvpn_link_recommended_mtu_bytes", "Route MTU the policy recommends"),
    ("fleetvpn_link_configured_mtu_bytes", "Route MTU the node applies"),
)


def _label(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def _value(value: float) -> str:
    """As prometheus_client writes a sample (Go's float formatting): 1400 → ``1400.0``."""
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _header(name: str, help_text: str) -> str:
    return f"# HELP {name} {help_text}\n# TYPE {name} gauge\n"


def render(view: FleetView) -> bytes:
    """The exposition text of ``view``."""
    columns: list[list[str]] = [[_header(name, text)] for name, text in _DIRECTION_METRICS]
    path_mtu, rtt, loss, handshake, recommended, configured = columns
    state = [_header("fleetvpn_link_state", "1, labelled with the link's current health state")]
    now = view.generated_at.timestamp()
    for row in view.links:
        for d, site in ((row.a_to_b, row.site_a), (row.b_to_a, row.site_b)):
            key = f'{{node="{_label(d.node)}",peer="{_label(d.peer)}",site="{_label(site)}"}} '
            if d.path_mtu is not None:
                path_mtu.append(f"fleetvpn_link_path_mtu_bytes{key}{_value(d.path_mtu)}\n")
            if d.rtt_s is not None:
                rtt.append(f"fleetvpn_link_rtt_seconds{key}{_value(d.rtt_s)}\n")
            if d.loss_ratio is not None:
                loss.append(f"fleetvpn_link_loss_ratio{key}{_value(d.loss_ratio)}\n")
            if d.handshake_age_s is not None and row.report_age_s is not None:
                at = now - row.report_age_s - d.handshake_age_s
                handshake.append(f"fleetvpn_peer_last_handshake_seconds{key}{_value(at)}\n")
            recommended.append(
                f"fleetvpn_link_recommended_mtu_bytes{key}{_value(d.recommended_mtu)}\n"
            )
            if d.configured_mtu is not None:
                configured.append(
                    f"fleetvpn_link_configured_mtu_bytes{key}{_value(d.configured_mtu)}\n"
                )
        state.append(
            f'fleetvpn_link_state{{a="{_label(row.a)}",b="{_label(row.b)}",'
            f'state="{row.state}"}} 1.0\n'
        )
    lifetime = [
        _header(
            "fleetvpn_site_mapping_lifetime_seconds",
            "Smallest recent established-flow NAT mapping lifetime at the site",
        )
    ]
    keepalive = [
        _header("fleetvpn_site_keepalive_seconds", "Keepalive decided for the site (0 = off)")
    ]
    for site, decision in sorted(view.sites.items()):
        label = f'{{site="{_label(site)}"}} '
        keepalive.append(f"fleetvpn_site_keepalive_seconds{label}{_value(decision.keepalive_s)}\n")
        if decision.mapping_lifetime_s is not None:
            lifetime.append(
                f"fleetvpn_site_mapping_lifetime_seconds{label}"
                f"{_value(decision.mapping_lifetime_s)}\n"
            )
    parts = [*columns, state, lifetime, keepalive]
    return "".join("".join(part) for part in parts).encode()

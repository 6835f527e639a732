"""Decode report bodies the controller stored itself: a fast path past the validation.

A stored body passed :func:`fleetvpn.model.parse_report` when it arrived (``/v1/reports``
stores nothing it did not accept), so reading it back needs no second check of every field and
endpoint: that re-validation was most of a 10,000-node recompute. :func:`stored_report` builds
the same :class:`Report` ``Report.from_json`` would (numbers made floats where the model says
float, timestamps parsed, defaults filled in), through the dataclass constructors, which do not
validate (model.py: "they are for trusted code"). A body that does not have the expected shape
(a database edited by hand) falls back to ``Report.from_json``, whose ReportError names the
field. Pure.
"""

from __future__ import annotations

import json
from typing import Any

from fleetvpn.model import (
    Configured,
    ConfiguredPeer,
    LinkMeasurement,
    NatMeasurement,
    Report,
    parse_time,
)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _measurement(m: dict[str, Any]) -> LinkMeasurement:
    get = m.get
    rtt_s, loss_ratio, handshake_age_s = get("rtt_s"), get("loss_ratio"), get("handshake_age_s")
    return LinkMeasurement(  # positional, in field order (400,000 of them in a cold recompute)
        m["peer"],
        m["family"],
        m["rx_bytes"],
        m["tx_bytes"],
        get("endpoint"),
        get("path_mtu"),
        get("icmp_seen", False),
        None if rtt_s is None else float(rtt_s),
        None if loss_ratio is None else float(loss_ratio),
        None if handshake_age_s is None else float(handshake_age_s),
    )


def _nat(n: dict[str, Any] | None) -> NatMeasurement | None:
    if n is None:
        return None
    return NatMeasurement(
        measured_at=parse_time(n["measured_at"]),
        nat=n["nat"],
        stateful_filter=n["stateful_filter"],
        mapped_address=n.get("mapped_address"),
        mapping_lifetime_s=_float(n.get("mapping_lifetime_s")),
        resolution_s=_float(n.get("resolution_s")),
        max_lifetime_s=_float(n.get("max_lifetime_s")),
    )


def _configured(c: dict[str, Any] | None) -> Configured:
    if c is None:
        return Configured()
    peers = tuple(
        ConfiguredPeer(p["peer"], p.get("route_mtu"), p.get("keepalive_s", 0))
        for p in c.get("peers", ())
    )
    return Configured(c.get("interface_mtu"), peers)


def report_from_trusted(doc: Any) -> Report:
    """The Report a stored (once validated) JSON document holds; see the module docstring."""
    try:
        return Report(
            schema_version=doc["schema_version"],
            report_id=doc["report_id"],
            node=doc["node"],
            site=doc["site"],
            created_at=parse_time(doc["created_at"]),
            measurements=tuple(map(_measurement, doc["measurements"])),
            nat=_nat(doc.get("nat")),
            configured=_configured(doc.get("configured")),
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        return Report.from_json(doc)


def stored_report(body: str) -> Report:
    """A stored report body (JSON text) → Report, through the trusted fast path."""
    return report_from_trusted(json.loads(body))

"""Decode report bodies the controller stored itself: a fast path past the validation.

A stored body passed :func:`fleetvpn.model.parse_report` when it arrived (``/v1/reports``
stores nothing it did not accept), so reading it back needs no second check of every field and
endpoint: that re-validation was most of a 10,000-node recompute. :func:`stored_report` builds
the same :class:`Report` ``Report.from_json`` would (numbers made floats where the model says
float, timestamps parsed, defaults filled in), through the dataclass constructors, which do not
validate (model.py: "they are for trusted code"). A body that does not have the expected shape
(a database edited by hand) falls back to ``Report.from_json``, whose ReportError names the
field. Pure.

The bodies are decoded by orjson where installed (the controller extra installs it: twice as fast
as the standard library on 20,000 bodies); a body orjson refuses, or one whose shape sends it to
``Report.from_json``, is decoded by the standard library as before, so the error is the same.
(orjson reads an integer beyond 64 bits as a float; no valid report holds one.)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from operator import itemgetter
from typing import Any, TypeVar

from fleetvpn.model import (
    Configured,
    ConfiguredPeer,
    LinkMeasurement,
    NatMeasurement,
    Report,
    parse_time,
)

T = TypeVar("T")


def fast_constructor(cls: type[T]) -> Callable[..., T]:
    """A constructor of ``cls`` — a slotted dataclass — taking every field positionally, in
    field order, that sets each slot directly: a frozen dataclass's __init__ goes through
    ``object.__setattr__`` per field, which made it twice as slow (the fleet builds 200,000 to
    800,000 of a kind per recompute). It never validates, nor fills in defaults: for trusted
    code, like the constructors themselves (model.py)."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    slots = getattr(cls, "__slots__", ())
    if getattr(cls, "__post_init__", None) is not None or set(names) - set(slots):
        raise TypeError(f"{cls.__name__}: not a plain slotted dataclass")
    namespace: dict[str, Any] = {"_new": object.__new__, "_cls": cls}
    namespace.update({f"_set_{name}": vars(cls)[name].__set__ for name in names})
    body = "".join(f"    _set_{name}(self, {name})\n" for name in names)
    source = f"def new_{cls.__name__}({', '.join(names)}):\n    self = _new(_cls)\n{body}"
    exec(source + "    return self\n", namespace)  # as dataclasses makes __init__
    made: Callable[..., T] = namespace[f"new_{cls.__name__}"]
    return made


_new_measurement = fast_constructor(LinkMeasurement)
_new_configured_peer = fast_constructor(ConfiguredPeer)

_loads: Callable[[str], Any]
try:
    from orjson import loads as _loads
except ImportError:  # pragma: no cover - the controller extra installs orjson
    _loads = json.loads


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


_EVERY_FIELD = itemgetter(*(f.name for f in dataclasses.fields(LinkMeasurement)))


def _measurement(m: dict[str, Any]) -> LinkMeasurement:
    # 400,000 of them in a cold recompute: an agent's measurement has every key, its numbers
    # floats, so one itemgetter gives every value in field order; anything else goes key by key.
    try:
        values = _EVERY_FIELD(m)
    except KeyError:
        return _measurement_by_key(m)
    rtt_s, loss_ratio, handshake_age_s = values[7], values[8], values[9]
    if (
        (rtt_s is None or rtt_s.__class__ is float)
        and (loss_ratio is None or loss_ratio.__class__ is float)
        and (handshake_age_s is None or handshake_age_s.__class__ is float)
    ):
        return _new_measurement(*values)
    return _measurement_by_key(m)


def _measurement_by_key(m: dict[str, Any]) -> LinkMeasurement:
    get = m.get
    rtt_s, loss_ratio, handshake_age_s = get("rtt_s"), get("loss_ratio"), get("handshake_age_s")
    return _new_measurement(  # positional, in field order
        m["peer"],
        m["family"],
        m["rx_bytes"],
        m["tx_bytes"],
        get("endpoint"),
        get("path_mtu"),
        get("icmp_seen", False),
        _float(rtt_s),
        _float(loss_ratio),
        _float(handshake_age_s),
        get("fragments_cross"),
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
    new = _new_configured_peer
    peers = tuple(
        [
            new(p["peer"], p.get("route_mtu"), p.get("keepalive_s", 0),
                p.get("outer_fragmentation", False))
            for p in c.get("peers", ())
        ]
    )  # fmt: skip
    return Configured(c.get("interface_mtu"), peers, c.get("implementation"))


def report_from_trusted(doc: Any) -> Report:
    """The Report a stored (once validated) JSON document holds; see the module docstring."""
    try:
        return _trusted(doc)
    except _NOT_THE_SHAPE:
        return Report.from_json(doc)


_NOT_THE_SHAPE = (KeyError, TypeError, ValueError, AttributeError)


def _trusted(doc: Any) -> Report:
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


def stored_report(body: str) -> Report:
    """A stored report body (JSON text) → Report, through the trusted fast path."""
    try:
        return _trusted(_loads(body))
    except _NOT_THE_SHAPE:  # orjson.JSONDecodeError is a ValueError
        return Report.from_json(json.loads(body))

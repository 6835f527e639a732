"""parse_report's fast path (model._fast_report) against the generic decoder (Report.from_json):
whatever the fast path accepts, the generic decoder accepts as the same Report (same values,
same types); ordinary reports do take the fast path."""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetvpn.controller.trusted import fast_constructor, stored_report
from fleetvpn.model import (
    ConfiguredPeer,
    LinkHealth,
    LinkMeasurement,
    LinkMtuDecision,
    PeerKeepalive,
    Report,
    ReportError,
    RouteMtu,
    _fast_report,
    parse_report,
)

from .apiutil import json_paths


def _report() -> dict[str, Any]:
    return {
        "schema_version": 1,
        "report_id": "0b9e3b5c-1f3e-4c1a-9d2e-2b7d8f0c1a22",
        "node": "branch1",
        "site": "office1",
        "created_at": "2024-05-01T12:00:00Z",
        "measurements": [
            {"peer": "hub", "family": 4, "rx_bytes": 10, "tx_bytes": 20,
             "endpoint": "198.18.0.1:51820", "path_mtu": 1400, "icmp_seen": False, "rtt_s": 0.02,
             "loss_ratio": 0, "handshake_age_s": 12},
            {"peer": "branch2", "family": 4, "rx_bytes": 0, "tx_bytes": 0},
            {"peer": "dc2", "family": 6, "rx_bytes": 1, "tx_bytes": 2,
             "endpoint": "[2001:db8::2]:51820", "path_mtu": 1500},
            {"peer": "dc2", "family": 4, "rx_bytes": 1, "tx_bytes": 2, "path_mtu": 9000},
        ],
        "nat": {"measured_at": "2024-05-01T11:00:00Z", "nat": True, "stateful_filter": True,
                "mapped_address": "198.18.1.2:40000", "mapping_lifetime_s": 30,
                "resolution_s": 1, "max_lifetime_s": 300},
        "configured": {"interface_mtu": 1420,
                       "peers": [{"peer": "hub", "route_mtu": 1340, "keepalive_s": 25}]},
    }  # fmt: skip


def _generic(doc: object) -> Report | ReportError:
    try:
        return Report.from_json(doc)
    except ReportError as e:
        return e


def _same(fast: Report, generic: Report | ReportError) -> None:
    assert isinstance(generic, Report), (
        f"the fast path accepted what the decoder refuses: {generic}"
    )
    assert repr(fast) == repr(generic)  # equal values and equal types (30 vs 30.0)


def test_ordinary_reports_take_the_fast_path() -> None:
    doc = _report()
    fast = _fast_report(doc)
    assert fast is not None
    _same(fast, _generic(doc))
    minimal = {k: doc[k] for k in ("schema_version", "report_id", "node", "site", "created_at")}
    fast = _fast_report({**minimal, "measurements": []})
    assert fast is not None
    _same(fast, _generic({**minimal, "measurements": []}))


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("measurements", 0, "peer"), "branch1"),  # the node itself
        (("measurements", 3, "family"), 6),  # a second IPv6 measurement of dc2
        (("measurements", 3, "endpoint"), "198.18.0.2:1"),  # dc2's second endpoint in use
        (("measurements", 0, "endpoint"), "[2001:db8::1]:51820"),  # family 4, IPv6 endpoint
        (("measurements", 2, "path_mtu"), 1279),  # below the IPv6 minimum
        (("measurements", 0, "rtt_s"), 3600),  # the open upper bound
        (("measurements", 0, "loss_ratio"), True),
        (("measurements", 0, "rx_bytes"), 2**64),
        (("measurements", 0, "handshake_age_s"), float("nan")),
        (("nat", "measured_at"), "2024-05-01T12:00:01Z"),  # after created_at
        (("nat", "mapping_lifetime_s"), 0),  # the open lower bound
        (("nat", "mapped_address"), "198.18.1.2:0"),
        (("configured", "peers", 0, "keepalive_s"), None),
        (("configured", "interface_mtu"), 67),
        (("schema_version",), 1.0),
        (("created_at",), "2024-05-01T12:00:00+01:00"),
    ],
)
def test_invalid_reports_leave_the_fast_path_and_get_the_decoders_error(
    path: tuple[Any, ...], value: object
) -> None:
    doc = _report()
    target: Any = doc
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    assert _fast_report(doc) is None
    with pytest.raises(ReportError) as raised:
        parse_report(doc)
    assert str(raised.value) == str(_generic(doc))


def test_a_duplicate_configured_peer_leaves_the_fast_path() -> None:
    doc = _report()
    doc["configured"]["peers"].append({"peer": "hub"})
    assert _fast_report(doc) is None
    assert isinstance(_generic(doc), ReportError)


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, 1, 4, 6, 67, 68, 1279, 1280, 3600, 86400, 65535, 65536, 2**64 - 1])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0.0, 1.0, 3599.999, 3600.0, 86400.0, 1e300, -0.0])
    | st.text(max_size=12)
    | st.sampled_from(["hub", "branch1", "dc2", "198.18.0.9:1", "[2001:db8::9]:65535",
                       "2024-05-01T11:59:59.5Z", "2024-05-01T12:00:00Z", "0" * 2001])
)  # fmt: skip
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)


_PATHS = json_paths(_report())


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(_PATHS), _json | st.just(KeyError)), max_size=3))
def test_whatever_the_fast_path_accepts_the_decoder_accepts_as_the_same_report(
    edits: list[tuple[tuple[Any, ...], object]],
) -> None:
    doc = _report()
    for path, value in edits:  # replace a field, or remove it (KeyError)
        target: Any = doc
        try:
            for part in path[:-1]:
                target = target[part]
            if value is KeyError:
                del target[path[-1]]
            else:
                target[path[-1]] = copy.deepcopy(value)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit replaced the container
    fast = _fast_report(doc)
    if fast is not None:
        _same(fast, _generic(doc))
    generic = _generic(doc)
    if isinstance(generic, Report):  # stored, then read back through the trusted path
        assert repr(stored_report(json.dumps(doc))) == repr(generic)


def test_a_stored_body_reads_back_as_the_report_it_was() -> None:
    doc = _report()  # integers where the model says float: converted as the decoder does
    assert repr(stored_report(json.dumps(doc))) == repr(Report.from_json(doc))
    doc["measurements"][0] |= {"loss_ratio": 0.5, "handshake_age_s": 12.5}  # every key, floats
    assert repr(stored_report(json.dumps(doc))) == repr(Report.from_json(doc))
    doc["measurements"][0]["rtt_s"] = None
    assert repr(stored_report(json.dumps(doc))) == repr(Report.from_json(doc))
    minimal = {k: doc[k] for k in ("schema_version", "report_id", "node", "site", "created_at")}
    text = json.dumps({**minimal, "measurements": []})
    assert repr(stored_report(text)) == repr(Report.from_json(json.loads(text)))


@pytest.mark.parametrize(
    "text",
    [
        '{"schema_version": 1, "measurements": 3}',  # not the shape: the decoder's error
        '{"schema_version": NaN}',  # orjson refuses NaN: the standard library reads it
        "[1, 2]",
    ],
)
def test_a_body_not_of_the_stored_shape_gets_the_decoders_error(text: str) -> None:
    with pytest.raises(ReportError) as raised:
        stored_report(text)
    assert str(raised.value) == str(_generic(json.loads(text)))


def test_a_body_that_is_no_json_raises_as_the_standard_library_does() -> None:
    with pytest.raises(json.JSONDecodeError):
        stored_report('{"schema_version": ')


_VALUES: list[tuple[type[Any], tuple[Any, ...]]] = [
    (LinkMeasurement, ("hub", 4, 1, 2, "198.18.0.1:51820", 1400, True, 0.02, 0.0, 12.5, True)),
    (ConfiguredPeer, ("hub", None, 25, True)),
    (LinkHealth, ("a", "b", "ok", "ok: handshake 3 s ago")),
    (LinkMtuDecision, ("a", "b", 1420, "measured", "MTU 1420", 1480, 4, False)),
    (RouteMtu, ("b", 1408, 1420, "route MTU 1408", False)),
    (PeerKeepalive, ("a", "b", 25, "default", "default keepalive")),
]


@pytest.mark.parametrize(("cls", "values"), _VALUES)
def test_the_fast_constructor_builds_what_the_class_builds(
    cls: type[Any], values: tuple[Any, ...]
) -> None:
    made = fast_constructor(cls)(*values)
    assert type(made) is cls
    assert made == cls(*values) and repr(made) == repr(cls(*values))
    assert hash(made) == hash(cls(*values))
    with pytest.raises(dataclasses.FrozenInstanceError):  # still frozen
        setattr(made, dataclasses.fields(cls)[0].name, "changed")


def test_the_fast_constructor_refuses_what_it_cannot_build_the_same() -> None:
    class Plain:
        pass

    with pytest.raises(TypeError):
        fast_constructor(Plain)

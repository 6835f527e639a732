"""The wire model: every kind of bad input names its field; any JSON value gives a Report or a
ReportError, never anything else; valid values survive the JSON round trip."""

from __future__ import annotations

import contextlib
import copy
import json
import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetvpn.model import (
    Configured,
    ConfiguredPeer,
    Family,
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
    ReportError,
    RouteMtu,
    SiteKeepalive,
    StoredReport,
    format_time,
    parse_report,
    parse_time,
)

from .apiutil import json_paths

REPORT_ID = "0b9e3b5c-1f3e-4c1a-9d2e-2b7d8f0c1a22"


def _link(peer: str, **extra: Any) -> dict[str, Any]:
    return {"peer": peer, "family": 4, "rx_bytes": 10, "tx_bytes": 20, **extra}


def valid_report() -> dict[str, Any]:
    return {
        "schema_version": 1,
        "report_id": REPORT_ID,
        "node": "branch1",
        "site": "office1",
        "created_at": "2024-05-01T12:00:00Z",
        "measurements": [
            _link(
                "hub",
                endpoint="198.18.0.1:51820",
                path_mtu=1400,
                icmp_seen=False,
                rtt_s=0.02,
                loss_ratio=0.0,
                handshake_age_s=12.5,
            ),
            _link("branch2"),
            {**_link("dc2"), "family": 6, "endpoint": "[2001:db8::2]:51820", "path_mtu": 1500},
            _link("dc3", path_mtu=9000),
        ],
        "nat": {
            "measured_at": "2024-05-01T11:00:00Z",
            "nat": True,
            "stateful_filter": True,
            "mapped_address": "198.18.1.2:40000",
            "mapping_lifetime_s": 30,
            "resolution_s": 1,
            "max_lifetime_s": 300,
        },
        "configured": {
            "interface_mtu": 1420,
            "peers": [{"peer": "hub", "route_mtu": 1340, "keepalive_s": 25}],
        },
    }


def test_a_valid_report_parses_with_units_and_types() -> None:
    report = parse_report(valid_report())
    assert report.node == "branch1"
    assert report.created_at == datetime(2024, 5, 1, 12, tzinfo=UTC)
    hub = report.measurements[0]
    assert (hub.path_mtu, hub.rtt_s, hub.handshake_age_s) == (1400, 0.02, 12.5)
    assert report.measurements[1].path_mtu is None  # omitted optional key → None
    assert report.nat is not None and report.nat.mapping_lifetime_s == 30.0
    assert isinstance(report.nat.mapping_lifetime_s, float)  # JSON 30 → 30.0
    assert report.configured.peers[0] == ConfiguredPeer("hub", 1340, 25)


def test_a_minimal_report_needs_only_the_required_keys() -> None:
    minimal = {
        "schema_version": 1,
        "report_id": REPORT_ID,
        "node": "n1",
        "site": "s1",
        "created_at": "2024-05-01T12:00:00Z",
        "measurements": [{"peer": "hub", "family": 6, "rx_bytes": 0, "tx_bytes": 0}],
    }
    report = parse_report(minimal)
    assert report.nat is None
    assert report.configured == Configured(None, ())
    assert report.measurements[0].icmp_seen is False
    assert parse_report(report.to_json()) == report


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation setting a dotted path with [i] indexes, e.g. ``measurements[3].path_mtu``."""

    def mutate(doc: dict[str, Any]) -> None:
        target: Any = doc
        parts = path.replace("[", ".[").split(".")
        for part in parts[:-1]:
            target = target[int(part[1:-1])] if part.startswith("[") else target[part]
        last = parts[-1]
        target[int(last[1:-1]) if last.startswith("[") else last] = value

    return mutate


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        *head, last = path.split(".")
        target: Any = doc
        for part in head:
            target = target[part]
        del target[last]

    return mutate


BAD: list[tuple[str, Callable[[dict[str, Any]], None], str, str]] = [
    # (case, mutation, field path, words of the problem)
    ("out of range", _set("measurements[3].path_mtu", 70000), "measurements[3].path_mtu",
     "70000 is out of range (68..65535)"),
    ("below range", _set("measurements[0].path_mtu", 67), "measurements[0].path_mtu",
     "out of range (68..65535)"),
    ("string for int", _set("measurements[0].path_mtu", "1400"), "measurements[0].path_mtu",
     "expected an integer, got string '1400'"),
    ("float for int", _set("measurements[0].path_mtu", 1400.0), "measurements[0].path_mtu",
     "expected an integer"),
    ("bool for int", _set("measurements[0].rx_bytes", True), "measurements[0].rx_bytes",
     "expected an integer, got boolean True"),
    ("bool for float", _set("measurements[0].rtt_s", False), "measurements[0].rtt_s",
     "expected a number"),
    ("int for bool", _set("measurements[0].icmp_seen", 1), "measurements[0].icmp_seen",
     "expected a boolean"),
    # issue 12's fields: an implementation by name only, booleans as booleans
    ("fragments as int", _set("measurements[0].fragments_cross", 1),
     "measurements[0].fragments_cross", "expected a boolean"),
    ("unknown implementation", _set("configured.implementation", "kernel\nPostUp"),
     "configured.implementation", "expected one of 'kernel', 'userspace'"),
    ("implementation as bool", _set("configured.implementation", True),
     "configured.implementation", "expected one of"),
    ("outer fragmentation as text", _set("configured.peers[0].outer_fragmentation", "yes"),
     "configured.peers[0].outer_fragmentation", "expected a boolean"),
    ("null for required", _set("measurements[0].rx_bytes", None), "measurements[0].rx_bytes",
     "expected an integer, got null"),
    ("rtt at limit", _set("measurements[0].rtt_s", 3600), "measurements[0].rtt_s",
     "out of range (0 <= value < 3600)"),
    ("rtt negative", _set("measurements[0].rtt_s", -0.1), "measurements[0].rtt_s", "out of range"),
    ("loss above 1", _set("measurements[0].loss_ratio", 1.5), "measurements[0].loss_ratio",
     "1.5 is out of range (0..1)"),
    ("negative age", _set("measurements[0].handshake_age_s", -1), "measurements[0].handshake_age_s",
     "out of range"),
    ("negative counter", _set("measurements[1].tx_bytes", -1), "measurements[1].tx_bytes",
     "-1 is out of range"),
    ("counter over u64", _set("measurements[1].tx_bytes", 2**64), "measurements[1].tx_bytes",
     "out of range"),
    ("infinite", _set("measurements[0].rtt_s", math.inf), "measurements[0].rtt_s",
     "not a finite number"),
    ("nan", _set("measurements[0].loss_ratio", math.nan), "measurements[0].loss_ratio",
     "not a finite number"),
    ("huge int for float", _set("nat.resolution_s", 10**400), "nat.resolution_s",
     "not a finite number"),
    ("upper-case name", _set("node", "Branch1"), "node", "is not a name"),
    ("name starting with -", _set("measurements[1].peer", "-x"), "measurements[1].peer",
     "is not a name"),
    ("name too long", _set("site", "a" * 64), "site", "is not a name"),
    ("family 5", _set("measurements[1].family", 5), "measurements[1].family",
     "expected one of 4, 6, got integer 5"),
    ("family as string", _set("measurements[1].family", "4"), "measurements[1].family",
     "expected one of 4, 6"),
    ("family vs endpoint", _set("measurements[0].family", 6), "measurements[0].family",
     "6 does not match endpoint 198.18.0.1:51820 (IPv4)"),
    ("IPv6 below 1280", _set("measurements[2].path_mtu", 1200), "measurements[2].path_mtu",
     "below the IPv6 minimum 1280"),
    ("endpoint without port", _set("measurements[0].endpoint", "198.18.0.1"),
     "measurements[0].endpoint", "is not an endpoint"),
    ("endpoint port 0", _set("measurements[0].endpoint", "198.18.0.1:0"),
     "measurements[0].endpoint", "'0' is not a port"),
    ("endpoint host name", _set("measurements[0].endpoint", "hub:51820"),
     "measurements[0].endpoint", "is not an endpoint"),
    ("IPv6 endpoint unbracketed", _set("measurements[2].endpoint", "2001:db8::2:51820"),
     "measurements[2].endpoint", "is not an endpoint"),
    ("bad mapped address", _set("nat.mapped_address", "[::1]:99999"), "nat.mapped_address",
     "is not an endpoint"),
    ("malformed id", _set("report_id", "not-a-uuid"), "report_id", "is not a lowercase UUID"),
    ("upper-case id", _set("report_id", REPORT_ID.upper()), "report_id", "lowercase UUID"),
    ("braced id", _set("report_id", "{" + REPORT_ID + "}"), "report_id", "lowercase UUID"),
    ("id as number", _set("report_id", 7), "report_id", "expected a string, got integer 7"),
    ("no timezone", _set("created_at", "2024-05-01T12:00:00"), "created_at", "RFC 3339"),
    ("space separator", _set("created_at", "2024-05-01 12:00:00Z"), "created_at", "RFC 3339"),
    ("not UTC", _set("created_at", "2024-05-01T12:00:00+02:00"), "created_at",
     "offset +02:00 is not UTC"),
    ("month 13", _set("created_at", "2024-13-01T00:00:00Z"), "created_at", "month"),
    ("timestamp as number", _set("created_at", 1714564800), "created_at",
     "expected an RFC 3339 timestamp"),
    ("unknown top-level key", _set("colour", "blue"), "colour", "unknown field"),
    ("misspelt key", _set("measurements[0].pathmtu", 1400), "measurements[0].pathmtu",
     "unknown field (did you mean 'path_mtu'?)"),
    ("misspelt nested key", _set("nat.mapping_lifetime", 30), "nat.mapping_lifetime",
     "did you mean 'mapping_lifetime_s'?"),
    ("missing node", _drop("node"), "node", "required field is missing"),
    ("missing schema version", _drop("schema_version"), "schema_version",
     "required field is missing"),
    ("missing nat time", _drop("nat.measured_at"), "nat.measured_at", "required field is missing"),
    ("other schema version", _set("schema_version", 2), "schema_version",
     "expected one of 1, got integer 2"),
    ("measurements not a list", _set("measurements", {"hub": 1}), "measurements",
     "expected an array, got an object"),
    ("measurement not an object", _set("measurements[1]", "hub"), "measurements[1]",
     "expected an object, got string 'hub'"),
    ("nat lifetime zero", _set("nat.mapping_lifetime_s", 0), "nat.mapping_lifetime_s",
     "out of range (0 < value <= 86400)"),
    ("nat after report", _set("nat.measured_at", "2024-05-01T12:00:01Z"), "nat.measured_at",
     "after the report's created_at"),
    ("measuring itself", _set("measurements[1].peer", "branch1"), "measurements[1].peer",
     "is the node itself"),
    ("duplicate peer and family", _set("measurements[1].peer", "hub"), "measurements[1].family",
     "a second IPv4 measurement of peer 'hub' (also measurements[0])"),
    ("two endpoints in use", _set("measurements[2].peer", "hub"), "measurements[2].endpoint",
     "one endpoint in use"),
    ("duplicate configured peer",
     _set("configured.peers", [{"peer": "hub"}, {"peer": "hub", "keepalive_s": 5}]),
     "configured.peers[1].peer", "duplicate peer 'hub' (also peers[0])"),
    ("keepalive out of range", _set("configured.peers[0].keepalive_s", 65536),
     "configured.peers[0].keepalive_s", "out of range (0..65535)"),
    ("long text", _set("node", "x" * 5000), "node", "text of 5000 characters"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "mutate", "path", "problem"), BAD, ids=[b[0] for b in BAD])
def test_each_bad_input_names_its_field(
    case: str, mutate: Callable[[dict[str, Any]], None], path: str, problem: str
) -> None:
    doc = valid_report()
    mutate(doc)
    with pytest.raises(ReportError) as caught:
        parse_report(doc)
    assert caught.value.field_path == path, str(caught.value)
    assert problem in caught.value.problem, str(caught.value)
    assert str(caught.value) == f"{path}: {caught.value.problem}"


@pytest.mark.parametrize("top", [None, [], "report", 3, True])
def test_a_non_object_is_rejected_at_the_top_level(top: object) -> None:
    with pytest.raises(ReportError) as caught:
        parse_report(top)
    assert caught.value.field_path == ""
    assert str(caught.value).startswith("(top level): expected an object")


def test_non_string_keys_are_rejected() -> None:
    doc: dict[Any, Any] = valid_report()
    doc["measurements"][0][7] = 1
    with pytest.raises(ReportError, match=r"^measurements\[0\]: keys must be strings"):
        parse_report(doc)


def test_timestamps_accept_rfc3339_utc_forms_and_truncate_beyond_microseconds() -> None:
    base = datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert parse_time("2024-05-01T12:00:00+00:00") == base
    assert parse_time("2024-05-01t12:00:00z") == base
    assert parse_time("2024-05-01T12:00:00.123456789Z") == base + timedelta(microseconds=123456)
    assert format_time(base + timedelta(microseconds=5)) == "2024-05-01T12:00:00.000005Z"
    assert format_time(base) == "2024-05-01T12:00:00Z"


# --- fuzzing --------------------------------------------------------------------------------

_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
_json = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)

_KEYS = [
    "schema_version", "report_id", "node", "site", "created_at", "measurements", "nat",
    "configured", "peer", "family", "path_mtu", "endpoint", "rx_bytes", "tx_bytes",
]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(_json)
def test_any_json_value_gives_a_report_error_and_nothing_else(obj: object) -> None:
    with contextlib.suppress(ReportError):
        parse_report(obj)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(_KEYS), _json, max_size=8))
def test_objects_with_report_keys_give_only_report_errors(obj: dict[str, object]) -> None:
    with contextlib.suppress(ReportError):
        parse_report(obj)


_VALID_PATHS = json_paths(valid_report())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(_VALID_PATHS), _json)
def test_one_field_replaced_by_anything_gives_a_report_or_an_error_at_that_field(
    where: tuple[Any, ...], value: object
) -> None:
    doc = valid_report()
    target: Any = doc
    for part in where[:-1]:
        target = target[part]
    target[where[-1]] = value
    try:
        parse_report(doc)
    except ReportError as e:
        # the error names the replaced field or something inside it, or comes from a
        # cross-field check: of the object holding it, or of the report (peers, nat time)
        shown = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in where).lstrip(".")
        parent = shown.rsplit(".", 1)[0] if "." in shown else shown
        report_checks = ("measurements[", "nat.measured_at")
        assert e.field_path.startswith((shown, parent, *report_checks)), (shown, str(e))


# --- round trips ----------------------------------------------------------------------------

_names = st.from_regex(r"[a-z0-9][a-z0-9-]{0,10}", fullmatch=True)
_times = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
)
_finite = st.floats(min_value=0, max_value=3599.9, allow_nan=False)


@st.composite
def _measurement(draw: st.DrawFn, peer: str) -> LinkMeasurement:
    family: Family = 4 if draw(st.booleans()) else 6
    host = "198.18.0.9" if family == 4 else "[2001:db8::9]"
    return LinkMeasurement(
        peer=peer,
        family=family,
        rx_bytes=draw(st.integers(0, 2**64 - 1)),
        tx_bytes=draw(st.integers(0, 2**64 - 1)),
        endpoint=draw(st.none() | st.integers(1, 65535).map(lambda p: f"{host}:{p}")),
        path_mtu=draw(st.none() | st.integers(1280, 65535)),
        icmp_seen=draw(st.booleans()),
        rtt_s=draw(st.none() | _finite),
        loss_ratio=draw(st.none() | st.floats(0, 1)),
        handshake_age_s=draw(st.none() | _finite),
    )


@st.composite
def _report(draw: st.DrawFn) -> Report:
    node = draw(_names)
    peers = draw(st.lists(_names.filter(lambda p: p != node), unique=True, max_size=4))
    created_at = draw(_times)
    nat = draw(
        st.none()
        | st.builds(
            NatMeasurement,
            measured_at=st.just(created_at),
            nat=st.booleans(),
            stateful_filter=st.booleans(),
            mapped_address=st.none() | st.just("198.18.1.2:40000"),
            mapping_lifetime_s=st.none() | st.floats(0.5, 86400),
            resolution_s=st.none() | st.floats(0, 60),
            max_lifetime_s=st.none() | st.floats(1, 86400),
        )
    )
    return Report(
        report_id=draw(st.uuids()).hex[:8] + "-0000-4000-8000-" + "0" * 12,
        node=node,
        site=draw(_names),
        created_at=created_at,
        measurements=tuple(draw(_measurement(p)) for p in peers),
        nat=nat,
        configured=Configured(
            interface_mtu=draw(st.none() | st.integers(1280, 9000)),
            peers=tuple(ConfiguredPeer(p, None, draw(st.integers(0, 65535))) for p in peers),
        ),
    )


@settings(max_examples=200, deadline=None)
@given(_report())
def test_valid_reports_survive_the_json_round_trip(report: Report) -> None:
    as_json = report.to_json()
    assert parse_report(as_json) == report
    assert parse_report(json.loads(json.dumps(as_json))) == report
    assert next(iter(as_json)) == "schema_version"


def test_every_stored_and_decided_type_round_trips() -> None:
    at = datetime(2024, 5, 1, 12, 0, 0, 250000, tzinfo=UTC)
    values = [
        StoredReport(at, parse_report(valid_report())),
        Override("link", "branch1>hub", "keepalive_s", 15, "small NAT table"),
        Override("site", "office1", "tunnel_mtu", 1300),
        MappingLoss("branch1", "hub", at, 25, "hub saw its endpoint move"),
        KeepaliveState("office1", at, 13, "measured", 27, at, 6, at, at),
        LinkMtuDecision("a", "b", 1340, "measured", "MTU 1340", 1400, 4),
        NodeMtuPlan("a", 1420, "largest", (RouteMtu("b", 1328, 1340, "floor16"),)),
        SiteKeepalive("office1", 13, "measured", "rule", 30.0),
        PeerKeepalive("branch1", "hub", 13, "measured", "behind NAT"),
        LinkHealth("a", "b", "blackhole", "blackhole: big packets vanish"),
    ]
    for value in values:
        assert type(value).from_json(json.loads(json.dumps(value.to_json()))) == value


@pytest.mark.parametrize(
    ("doc", "path", "problem"),
    [
        ({"scope": "link", "target": "hub", "setting": "keepalive_s", "value": 5}, "target",
         "is not node>peer"),
        ({"scope": "node", "target": "a>b", "setting": "keepalive_s", "value": 5}, "target",
         "is not a node name"),
        ({"scope": "site", "target": "s", "setting": "tunnel_mtu", "value": 575}, "value",
         "575 is out of range (576..9000)"),
        ({"scope": "site", "target": "s", "setting": "tunnel_mtu", "value": 9001}, "value",
         "9001 is out of range (576..9000)"),
        ({"scope": "site", "target": "s", "setting": "keepalive_s", "value": -1}, "value",
         "out of range (0..120)"),
        # what every agent would refuse (fleetvpn.grammar.KEEPALIVE_MAX_S)
        ({"scope": "site", "target": "s", "setting": "keepalive_s", "value": 121}, "value",
         "out of range (0..120)"),
        ({"scope": "planet", "target": "s", "setting": "keepalive_s", "value": 1}, "scope",
         "expected one of 'site', 'node', 'link'"),
    ],
)  # fmt: skip
def test_override_validation_names_the_field(doc: dict[str, Any], path: str, problem: str) -> None:
    with pytest.raises(ReportError) as caught:
        Override.from_json(doc)
    assert (caught.value.field_path, problem in caught.value.problem) == (path, True), str(
        caught.value
    )


def test_parse_does_not_mutate_its_input() -> None:
    doc = valid_report()
    before = copy.deepcopy(doc)
    parse_report(doc)
    assert doc == before


@pytest.mark.parametrize("note", ["a\nPostUp = touch /pwned", "a\rb", "\u2028", "\ud800", "\u202e"])
def test_an_override_note_is_one_printable_line(note: str) -> None:
    doc = {"scope": "site", "target": "branch", "setting": "keepalive_s", "value": 5, "note": note}
    with pytest.raises(ReportError) as caught:
        Override.from_json(doc)
    assert caught.value.field_path == "note" and "unprintable" in caught.value.problem

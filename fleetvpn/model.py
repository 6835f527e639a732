"""The wire model: what agents report and what the controller stores and decides.

One set of types (style.md rule 5).  What a client *submits* (:class:`Report` and its parts,
:class:`Override`) is separate from what the controller *stores* (:class:`StoredReport`,
:class:`KeepaliveState`) and *decides* (:class:`LinkMtuDecision`, :class:`NodeMtuPlan`,
:class:`SiteKeepalive`, :class:`PeerKeepalive`, :class:`LinkHealth`, …).  Absence is ``None``;
keepalive ``0`` means off (as in ``wg set … persistent-keepalive 0``).

Contract.
  parse_report(obj) -> Report         ``obj`` is a decoded JSON value (dict/list/str/number/bool/
                                      None); the report is validated field by field.
  T.from_json(obj) -> T               the same validation, for every type T here.
  x.to_json() -> dict                 JSON-ready: snake_case keys, units in names (``_s``,
                                      ``_bytes``, ``_ratio``), timestamps RFC 3339 UTC
                                      (``2024-05-01T12:00:00Z``), tuples as lists, None as null.
  Round trip: ``T.from_json(x.to_json()) == x`` for every valid ``x``.
  Errors: :class:`ReportError` (a ValueError) only, for any input: ``field_path`` names the exact
    field (``measurements[3].path_mtu``; ``""`` for the top level) and ``problem`` says why:
    wrong type, out of range, malformed name/id/timestamp/endpoint, unknown key (with a
    did-you-mean), missing required key, duplicate peer, inconsistent fields.
  Keys: a field with a Python default may be omitted; every other key is required.
  Constructors do not validate (they are for trusted code); ``from_json`` is the trust boundary.
Pure: no I/O, no clock.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
import types
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal, Self, TypeVar, Union, get_args, get_origin, get_type_hints

from fleetvpn import grammar
from fleetvpn.engines.outer import Implementation  # the wg layer's names (wg/state.py)
from fleetvpn.grammar import NAME_PATTERN as NAME_PATTERN

SCHEMA_VERSION: Final = 1

Family = Literal[4, 6]
Source = Literal["measured", "default", "override"]
Setting = Literal["tunnel_mtu", "keepalive_s"]
Scope = Literal["site", "node", "link"]
HealthState = Literal["ok", "degraded", "fragmenting", "blackhole", "stale", "down", "unmeasured"]
# Worst first: a link shows the worse of its two directions, a node the worst of its links.
HEALTH_SEVERITY: Final[tuple[HealthState, ...]] = (
    "down", "blackhole", "stale", "degraded", "fragmenting", "unmeasured", "ok"
)  # fmt: skip


MTU_RANGE: Final = (68, 65535)  # IPv4 minimum (RFC 791) .. the largest IP packet
KEEPALIVE_RANGE: Final = (0, 65535)  # wg(8): 0 = off, else 1..65535 s
RTT_LIMIT_S: Final = 3600.0  # exclusive: an hour-long RTT is a broken clock, not a path
AGE_LIMIT_S: Final = 10 * 365 * 86400.0  # ten years: beyond is a bogus clock
LIFETIME_LIMIT_S: Final = 86400.0  # NAT mapping lifetimes are searched up to hours, not days
COUNTER_LIMIT: Final = 2**64 - 1  # WireGuard's rx/tx counters are u64
MAX_PEERS: Final = 65535  # entries per list in one report; the API's body limit comes first
MAX_TEXT: Final = 2000  # reasons, notes, evidence

_NAME_RE: Final = re.compile(NAME_PATTERN, re.ASCII)
_UUID_RE: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_RFC3339_RE: Final = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})",
    re.ASCII,  # \d and int() take "٢٠٢٤" too: a timestamp is ASCII digits only
)


class ReportError(ValueError):
    """Invalid input: ``field_path`` names the field ("" = top level), ``problem`` says why."""

    def __init__(self, field_path: str, problem: str) -> None:
        self.field_path = field_path
        self.problem = problem
        super().__init__(f"{field_path or '(top level)'}: {problem}")


# --- field constraints ---------------------------------------------------------------------
# A check takes the decoded (typed) value, never None, and returns a problem or None.

Check = Callable[[Any], "str | None"]


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _range(lo: float, hi: float, *, open_lo: bool = False, open_hi: bool = False) -> Check:
    """lo <= value <= hi; ``open_lo``/``open_hi`` exclude that end."""
    shown = [str(int(b)) if float(b).is_integer() else f"{b:g}" for b in (lo, hi)]
    if open_lo or open_hi:
        bound = f"{shown[0]} {'<' if open_lo else '<='} value {'<' if open_hi else '<='} {shown[1]}"
    else:
        bound = f"{shown[0]}..{shown[1]}"

    def check(value: float) -> str | None:
        if lo < value < hi or (value == lo and not open_lo) or (value == hi and not open_hi):
            return None
        return f"{_show(value)} is out of range ({bound})"

    return check


def _name(value: str) -> str | None:
    return None if grammar.is_name(value) else f"{_show(value)} is not a name ({NAME_PATTERN})"


def _grammar_problem(parse: Callable[[Any], object], value: object) -> str | None:
    """A grammar's refusal as a field problem (without the grammar's own field label)."""
    try:
        parse(value)
    except grammar.GrammarError as e:
        return str(e).split(": ", 1)[-1]
    return None


def _uuid(value: str) -> str | None:
    if _UUID_RE.fullmatch(value):
        return None
    return f"{_show(value)} is not a lowercase UUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)"


def parse_endpoint(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """``"198.18.0.1:51820"`` or ``"[2001:db8::1]:51820"`` → (address, port); ValueError.
    An IP literal only (what WireGuard reports in use), by :mod:`fleetvpn.grammar`."""
    parsed = grammar.Endpoint.parse(text, allow_dns=False)
    assert parsed.address is not None
    return parsed.address, parsed.port


def _endpoint(value: str) -> str | None:
    try:
        parse_endpoint(value)
    except ValueError as e:
        return f"{_show(value)} is not an endpoint: {e}"
    return None


def _meta(check: Check | None = None, *, required: bool = False) -> dict[str, Any]:
    """Field metadata: a check of the decoded value; ``required`` even with a Python default."""
    return {"check": check, "required": required}


# --- timestamps ----------------------------------------------------------------------------


def format_time(moment: datetime) -> str:
    """RFC 3339 UTC with a ``Z``; microseconds only when nonzero.  ``moment`` must be aware."""
    utc = moment.astimezone(UTC)
    text = (
        f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}"
        f"T{utc.hour:02d}:{utc.minute:02d}:{utc.second:02d}"
    )
    return f"{text}.{utc.microsecond:06d}Z" if utc.microsecond else text + "Z"


def parse_time(text: str) -> datetime:
    """RFC 3339 with offset ``Z`` or ``+00:00`` (UTC only) → aware datetime; ValueError.
    Fractions beyond microseconds are truncated."""
    match = _RFC3339_RE.fullmatch(text)
    if match is None:
        raise ValueError("expected an RFC 3339 timestamp like 2024-05-01T12:00:00Z")
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    if offset not in ("Z", "z", "+00:00", "-00:00"):
        raise ValueError(f"offset {offset} is not UTC (end with Z)")
    micros = int((fraction or "0")[:6].ljust(6, "0"))
    return datetime(
        int(year), int(month), int(day), int(hour), int(minute), int(second), micros, tzinfo=UTC
    )


# --- the generic decoder/encoder ------------------------------------------------------------

W = TypeVar("W", bound="Wire")


class Wire:
    """Base of every wire type: ``to_json`` / ``from_json`` (see the module contract)."""

    __slots__ = ()

    def to_json(self) -> dict[str, Any]:
        return {f.name: _encode(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_json(cls, obj: object) -> Self:
        return _decode_object(cls, obj, "")

    def _cross_check(self, path: str) -> None:
        """Consistency between fields, after each field was validated; raises ReportError."""


def _encode(value: object) -> object:
    if isinstance(value, Wire):
        return value.to_json()
    if isinstance(value, datetime):
        return format_time(value)
    if isinstance(value, tuple):
        return [_encode(item) for item in value]
    return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# Decoders are built once per type (from the dataclasses' type hints and field metadata) and
# cached: reflection per value would halve the ingest rate.
Decoder = Callable[[object, str], Any]
_DECODERS: dict[Any, Decoder] = {}


@dataclass(frozen=True, slots=True)
class _FieldPlan:
    name: str
    decode: Decoder
    check: Check | None
    optional: bool


_PLANS: dict[type, tuple[dict[str, _FieldPlan], list[str]]] = {}


def _plan(cls: type) -> tuple[dict[str, _FieldPlan], list[str]]:
    if cls not in _PLANS:
        hints = get_type_hints(cls)
        plans: dict[str, _FieldPlan] = {}
        for spec in fields(cls):
            has_default = spec.default is not MISSING or spec.default_factory is not MISSING
            plans[spec.name] = _FieldPlan(
                spec.name,
                _decoder(hints[spec.name]),
                spec.metadata.get("check"),
                has_default and not spec.metadata.get("required", False),
            )
        _PLANS[cls] = (plans, list(plans))
    return _PLANS[cls]


def _decode_object(cls: type[W], obj: object, path: str) -> W:
    if not isinstance(obj, dict):
        raise ReportError(path, f"expected an object, got {_kind(obj)}")
    plans, names = _plan(cls)
    for key in obj:
        if key not in plans:
            if not isinstance(key, str):
                raise ReportError(path, f"keys must be strings, got {_show(key)}")
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ReportError(_join(path, key), f"unknown field{hint}")
    values: dict[str, Any] = {}
    for name, plan in plans.items():
        where = f"{path}.{name}" if path else name
        if name not in obj:
            if plan.optional:
                continue
            raise ReportError(where, "required field is missing")
        raw = obj[name]
        if isinstance(raw, list | tuple) and len(raw) > MAX_PEERS:
            raise ReportError(where, f"{len(raw)} items is more than {MAX_PEERS}")
        value = plan.decode(raw, where)
        if value is not None and plan.check is not None:
            problem = plan.check(value)
            if problem is not None:
                raise ReportError(where, problem)
        values[name] = value
    result = cls(**values)
    result._cross_check(path)
    return result


def _kind(value: object) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array"}
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "an object"
    return f"{names.get(type(value), type(value).__name__)} {_show(value)}"


def _decoder(hint: Any) -> Decoder:
    if hint not in _DECODERS:
        _DECODERS[hint] = _build_decoder(hint)
    return _DECODERS[hint]


def _build_decoder(hint: Any) -> Decoder:
    expected = _expected(hint)

    def wrong(value: object, path: str) -> ReportError:
        return ReportError(path, f"expected {expected}, got {_kind(value)}")

    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        (inner_hint,) = [a for a in get_args(hint) if a is not type(None)]  # only ``X | None``
        inner = _decoder(inner_hint)

        def optional(value: object, path: str) -> Any:
            return None if value is None else inner(value, path)

        return optional
    if origin is Literal:
        allowed = get_args(hint)

        def literal(value: object, path: str) -> Any:
            for option in allowed:
                if type(value) is type(option) and value == option:
                    return value
            raise wrong(value, path)

        return literal
    if origin is tuple:
        item = _decoder(get_args(hint)[0])

        def array(value: object, path: str) -> Any:
            if not isinstance(value, list | tuple):
                raise ReportError(path, f"expected an array, got {_kind(value)}")
            return tuple(item(v, f"{path}[{i}]") for i, v in enumerate(value))

        return array
    if isinstance(hint, type) and is_dataclass(hint) and issubclass(hint, Wire):
        cls = hint
        return lambda value, path: _decode_object(cls, value, path)
    accepts, convert = _PRIMITIVES[hint]

    def primitive(value: object, path: str) -> Any:
        if not accepts(value):
            raise wrong(value, path)
        return convert(value, path)

    return primitive


def _finite(value: float, path: str) -> float:
    as_float = float(value) if abs(value) < 1e300 else math.inf  # float(10**400) overflows
    if not math.isfinite(as_float):
        raise ReportError(path, f"{_show(value)} is not a finite number")
    return as_float


def _text(value: str, path: str) -> str:
    if len(value) > MAX_TEXT:
        raise ReportError(path, f"text of {len(value)} characters (at most {MAX_TEXT})")
    return value


def _timestamp(value: str, path: str) -> datetime:
    try:
        return parse_time(value)
    except ValueError as e:
        raise ReportError(path, f"{_show(value)}: {e}") from None


def _not_bool(value: object) -> bool:
    return not isinstance(value, bool)


_PRIMITIVES: Final[dict[Any, tuple[Callable[[object], bool], Callable[[Any, str], Any]]]] = {
    bool: (lambda v: isinstance(v, bool), lambda v, _: v),
    int: (lambda v: isinstance(v, int) and _not_bool(v), lambda v, _: v),
    float: (lambda v: isinstance(v, int | float) and _not_bool(v), _finite),
    str: (lambda v: isinstance(v, str), _text),
    datetime: (lambda v: isinstance(v, str), _timestamp),
}


def _expected(hint: Any) -> str:
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, "an RFC 3339 timestamp" if hint is datetime else str(hint))


# --- what an agent submits ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LinkMeasurement(Wire):
    """One peer as seen by the reporting node.  The path MTU is the direction node → peer (the
    sender's own probes); the reverse direction comes in the peer's report."""

    peer: str = field(metadata=_meta(_name))
    family: Family  # the underlay: 4 or 6
    rx_bytes: int = field(metadata=_meta(_range(0, COUNTER_LIMIT)))
    tx_bytes: int = field(metadata=_meta(_range(0, COUNTER_LIMIT)))
    endpoint: str | None = field(default=None, metadata=_meta(_endpoint))  # in use by WireGuard
    path_mtu: int | None = field(default=None, metadata=_meta(_range(*MTU_RANGE)))
    icmp_seen: bool = False  # a "too big" ICMP arrived while probing
    rtt_s: float | None = field(default=None, metadata=_meta(_range(0, RTT_LIMIT_S, open_hi=True)))
    loss_ratio: float | None = field(default=None, metadata=_meta(_range(0, 1)))
    handshake_age_s: float | None = field(default=None, metadata=_meta(_range(0, AGE_LIMIT_S)))
    # Whether IP fragments cross the path: a DF-clear probe above the path MTU came back
    # (IPv4 only; None: not measured, or the path is as large as the local link).
    fragments_cross: bool | None = None

    def _cross_check(self, path: str) -> None:
        if self.family == 6 and self.path_mtu is not None and self.path_mtu < 1280:
            raise ReportError(
                _join(path, "path_mtu"), f"{self.path_mtu} is below the IPv6 minimum 1280"
            )
        if self.endpoint is not None:
            address, _ = parse_endpoint(self.endpoint)
            if address.version != self.family:
                raise ReportError(
                    _join(path, "family"),
                    f"{self.family} does not match endpoint {self.endpoint} (IPv{address.version})",
                )


@dataclass(frozen=True, slots=True)
class NatMeasurement(Wire):
    """The reporting node's NAT, as the NAT-lifetime engine measured it at ``measured_at``."""

    measured_at: datetime
    nat: bool  # the responder saw another address than the local one
    stateful_filter: bool  # unsolicited inbound from a never-contacted port was dropped
    mapped_address: str | None = field(default=None, metadata=_meta(_endpoint))
    # Lower bound L of the established-flow lifetime T ∈ (L, L + resolution_s]; None: nothing
    # expired up to max_lifetime_s (or there is nothing to expire).
    mapping_lifetime_s: float | None = field(
        default=None, metadata=_meta(_range(0, LIFETIME_LIMIT_S, open_lo=True))
    )
    resolution_s: float | None = field(default=None, metadata=_meta(_range(0, LIFETIME_LIMIT_S)))
    max_lifetime_s: float | None = field(
        default=None, metadata=_meta(_range(0, LIFETIME_LIMIT_S, open_lo=True))
    )


@dataclass(frozen=True, slots=True)
class ConfiguredPeer(Wire):
    """What the agent currently applies towards one peer."""

    peer: str = field(metadata=_meta(_name))
    route_mtu: int | None = field(default=None, metadata=_meta(_range(*MTU_RANGE)))  # None: none
    keepalive_s: int = field(default=0, metadata=_meta(_range(*KEEPALIVE_RANGE)))  # 0 = off
    # Outer packets towards this peer may be fragmented on the way (a path under the tunnel's
    # minimum MTU): the route towards its endpoint is set so (see fleetvpn.agent.outerroute).
    outer_fragmentation: bool = False


@dataclass(frozen=True, slots=True)
class Configured(Wire):
    interface_mtu: int | None = field(default=None, metadata=_meta(_range(*MTU_RANGE)))
    peers: tuple[ConfiguredPeer, ...] = ()
    implementation: Implementation | None = None  # None: an agent too old to say

    def _cross_check(self, path: str) -> None:
        first: dict[str, int] = {}
        for i, configured in enumerate(self.peers):
            if configured.peer in first:
                raise ReportError(
                    f"{_join(path, 'peers')}[{i}].peer",
                    f"duplicate peer {configured.peer!r} (also peers[{first[configured.peer]}])",
                )
            first[configured.peer] = i


@dataclass(frozen=True, slots=True)
class Report(Wire):
    """One agent report.  ``report_id`` makes resubmission idempotent."""

    schema_version: Literal[1] = field(default=1, kw_only=True, metadata=_meta(required=True))
    report_id: str = field(metadata=_meta(_uuid))
    node: str = field(metadata=_meta(_name))
    site: str = field(metadata=_meta(_name))
    created_at: datetime  # the agent's clock
    measurements: tuple[LinkMeasurement, ...]  # at most one per (peer, family)
    nat: NatMeasurement | None = None  # None: not measured yet
    configured: Configured = field(default_factory=Configured)

    def _cross_check(self, path: str) -> None:
        seen: dict[tuple[str, int], int] = {}
        endpoint_at: dict[str, int] = {}
        for i, m in enumerate(self.measurements):
            where = f"measurements[{i}]"
            if m.peer == self.node:
                raise ReportError(f"{where}.peer", f"{m.peer!r} is the node itself")
            if (m.peer, m.family) in seen:
                raise ReportError(
                    f"{where}.family",
                    f"a second IPv{m.family} measurement of peer {m.peer!r} "
                    f"(also measurements[{seen[m.peer, m.family]}])",
                )
            seen[m.peer, m.family] = i
            if m.endpoint is not None:
                if m.peer in endpoint_at:
                    raise ReportError(
                        f"{where}.endpoint",
                        f"peer {m.peer!r} has one endpoint in use "
                        f"(also measurements[{endpoint_at[m.peer]}])",
                    )
                endpoint_at[m.peer] = i
        if self.nat is not None and self.nat.measured_at > self.created_at:
            raise ReportError("nat.measured_at", "is after the report's created_at")


def parse_report(obj: object) -> Report:
    """Validate a decoded JSON report; raises ReportError naming the field (module contract).

    Ordinary reports take a hand-written path that checks exactly what ``Report.from_json``
    checks, several times faster (report ingest at fleet scale); anything it is not sure of —
    every invalid report among them — goes through ``Report.from_json``, whose answer (the
    Report, or the ReportError naming the field) is the contract."""
    fast = _fast_report(obj)
    return fast if fast is not None else Report.from_json(obj)


# --- the fast path of parse_report ----------------------------------------------------------
# Each helper returns the decoded value or _NO ("not sure: ask the generic decoder"). It never
# raises and never accepts what the generic decoder rejects; tests/unit/test_report_fastpath.py
# fuzzes it against Report.from_json.


class _No:
    __slots__ = ()


_NO: Final = _No()
_REPORT_KEYS: Final = frozenset(
    ("schema_version", "report_id", "node", "site", "created_at", "measurements", "nat",
     "configured")
)  # fmt: skip
_REPORT_REQUIRED: Final = frozenset(
    ("schema_version", "report_id", "node", "site", "created_at", "measurements")
)
_MEASUREMENT_KEYS: Final = frozenset(
    ("peer", "family", "rx_bytes", "tx_bytes", "endpoint", "path_mtu", "icmp_seen", "rtt_s",
     "loss_ratio", "handshake_age_s", "fragments_cross")
)  # fmt: skip
_MEASUREMENT_REQUIRED: Final = frozenset(("peer", "family", "rx_bytes", "tx_bytes"))
_NAT_KEYS: Final = frozenset(
    ("measured_at", "nat", "stateful_filter", "mapped_address", "mapping_lifetime_s",
     "resolution_s", "max_lifetime_s")
)  # fmt: skip
_NAT_REQUIRED: Final = frozenset(("measured_at", "nat", "stateful_filter"))
_CONFIGURED_KEYS: Final = frozenset(("interface_mtu", "peers", "implementation"))
_CONFIGURED_PEER_KEYS: Final = frozenset(
    ("peer", "route_mtu", "keepalive_s", "outer_fragmentation")
)
_IMPLEMENTATIONS: Final = frozenset((None, "kernel", "userspace"))
_ENDPOINT_VERSIONS: dict[str, int] = {}  # valid endpoint text -> IP version (parse_endpoint)
_ENDPOINT_CACHE_MAX: Final = 1 << 16
_name_ok: Final = _NAME_RE.fullmatch


def _fast_name(value: object) -> str | _No:
    if type(value) is str and len(value) <= MAX_TEXT and _name_ok(value):
        return value
    return _NO


def _fast_endpoint_version(value: object) -> int:
    """The IP version of a valid endpoint text, 0 if it is not one (or not sure)."""
    if type(value) is not str or len(value) > MAX_TEXT:
        return 0
    version = _ENDPOINT_VERSIONS.get(value)
    if version is None:
        try:
            address, _ = parse_endpoint(value)
        except ValueError:
            return 0
        if len(_ENDPOINT_VERSIONS) >= _ENDPOINT_CACHE_MAX:
            _ENDPOINT_VERSIONS.clear()
        version = _ENDPOINT_VERSIONS[value] = address.version
    return version


def _fast_int(value: object, lo: int, hi: int) -> int | _No:
    if type(value) is int and lo <= value <= hi:
        return value
    return _NO


def _fast_float(value: object, lo: float, hi: float, open_lo: bool, open_hi: bool) -> float | _No:
    """A number in range as a float (what _finite and _range accept); _NO otherwise."""
    kind = type(value)
    if kind is float:
        number: float = value  # type: ignore[assignment]
    elif kind is int and -1e300 < value < 1e300:  # type: ignore[operator]
        number = float(value)  # type: ignore[arg-type]
    else:
        return _NO
    if (lo < number or (number == lo and not open_lo)) and (
        number < hi or (number == hi and not open_hi)
    ):
        return number
    return _NO


def _fast_optional_float(
    obj: dict[Any, Any],
    key: str,
    lo: float,
    hi: float,
    open_lo: bool = False,
    open_hi: bool = False,
) -> float | _No | None:
    value = obj.get(key)
    return None if value is None else _fast_float(value, lo, hi, open_lo, open_hi)


def _fast_time(value: object) -> datetime | _No:
    if type(value) is not str:
        return _NO
    try:
        return parse_time(value)
    except ValueError:
        return _NO


def _fast_measurement(obj: object) -> LinkMeasurement | _No:
    if type(obj) is not dict or not _MEASUREMENT_KEYS.issuperset(obj):
        return _NO
    if not _MEASUREMENT_REQUIRED.issubset(obj):
        return _NO
    peer = _fast_name(obj["peer"])
    family = obj["family"]
    rx_bytes = _fast_int(obj["rx_bytes"], 0, COUNTER_LIMIT)
    tx_bytes = _fast_int(obj["tx_bytes"], 0, COUNTER_LIMIT)
    if peer is _NO or rx_bytes is _NO or tx_bytes is _NO:
        return _NO
    if type(family) is not int or (family != 4 and family != 6):
        return _NO
    endpoint = obj.get("endpoint")
    if endpoint is not None and _fast_endpoint_version(endpoint) != family:
        return _NO
    path_mtu = obj.get("path_mtu")
    if path_mtu is not None and (
        _fast_int(path_mtu, MTU_RANGE[0], MTU_RANGE[1]) is _NO or (family == 6 and path_mtu < 1280)
    ):
        return _NO
    icmp_seen = obj.get("icmp_seen", False)
    if type(icmp_seen) is not bool:
        return _NO
    rtt_s = _fast_optional_float(obj, "rtt_s", 0, RTT_LIMIT_S, open_hi=True)
    loss_ratio = _fast_optional_float(obj, "loss_ratio", 0, 1)
    handshake_age_s = _fast_optional_float(obj, "handshake_age_s", 0, AGE_LIMIT_S)
    if rtt_s is _NO or loss_ratio is _NO or handshake_age_s is _NO:
        return _NO
    fragments_cross = obj.get("fragments_cross")
    if fragments_cross is not None and type(fragments_cross) is not bool:
        return _NO
    return LinkMeasurement(
        peer, family, rx_bytes, tx_bytes, endpoint, path_mtu, icmp_seen,  # type: ignore[arg-type]
        rtt_s, loss_ratio, handshake_age_s, fragments_cross,  # type: ignore[arg-type]
    )  # fmt: skip


def _fast_nat(obj: object) -> NatMeasurement | _No | None:
    if obj is None:
        return None
    if type(obj) is not dict or not _NAT_KEYS.issuperset(obj) or not _NAT_REQUIRED.issubset(obj):
        return _NO
    measured_at = _fast_time(obj["measured_at"])
    nat, stateful_filter = obj["nat"], obj["stateful_filter"]
    if measured_at is _NO or type(nat) is not bool or type(stateful_filter) is not bool:
        return _NO
    mapped_address = obj.get("mapped_address")
    if mapped_address is not None and not _fast_endpoint_version(mapped_address):
        return _NO
    mapping_lifetime_s = _fast_optional_float(obj, "mapping_lifetime_s", 0, LIFETIME_LIMIT_S, True)
    resolution_s = _fast_optional_float(obj, "resolution_s", 0, LIFETIME_LIMIT_S)
    max_lifetime_s = _fast_optional_float(obj, "max_lifetime_s", 0, LIFETIME_LIMIT_S, True)
    if mapping_lifetime_s is _NO or resolution_s is _NO or max_lifetime_s is _NO:
        return _NO
    return NatMeasurement(
        measured_at, nat, stateful_filter, mapped_address,  # type: ignore[arg-type]
        mapping_lifetime_s, resolution_s, max_lifetime_s,  # type: ignore[arg-type]
    )  # fmt: skip


def _fast_configured(obj: object) -> Configured | _No:
    if type(obj) is not dict or not _CONFIGURED_KEYS.issuperset(obj):
        return _NO
    interface_mtu = obj.get("interface_mtu")
    if interface_mtu is not None and _fast_int(interface_mtu, *MTU_RANGE) is _NO:
        return _NO
    implementation = obj.get("implementation")
    if type(implementation) not in (str, type(None)) or implementation not in _IMPLEMENTATIONS:
        return _NO
    items = obj.get("peers", ())
    if type(items) is not list and type(items) is not tuple:
        return _NO
    if len(items) > MAX_PEERS:
        return _NO
    peers = []
    seen = set()
    for item in items:
        if type(item) is not dict or not _CONFIGURED_PEER_KEYS.issuperset(item):
            return _NO
        peer = _fast_name(item.get("peer"))
        route_mtu = item.get("route_mtu")
        keepalive_s = item.get("keepalive_s", 0)
        outer = item.get("outer_fragmentation", False)
        if peer is _NO or peer in seen or _fast_int(keepalive_s, *KEEPALIVE_RANGE) is _NO:
            return _NO
        if route_mtu is not None and _fast_int(route_mtu, *MTU_RANGE) is _NO:
            return _NO
        if type(outer) is not bool:
            return _NO
        seen.add(peer)
        peers.append(ConfiguredPeer(peer, route_mtu, keepalive_s, outer))  # type: ignore[arg-type]
    return Configured(interface_mtu, tuple(peers), implementation)


def _fast_report(obj: object) -> Report | None:
    """``obj`` as a Report if it is surely valid, else None (then Report.from_json decides)."""
    if type(obj) is not dict or not _REPORT_KEYS.issuperset(obj):
        return None
    if not _REPORT_REQUIRED.issubset(obj):
        return None
    schema_version, report_id = obj["schema_version"], obj["report_id"]
    if type(schema_version) is not int or schema_version != 1:
        return None
    if type(report_id) is not str or len(report_id) > MAX_TEXT or not _UUID_RE.fullmatch(report_id):
        return None
    node, site = _fast_name(obj["node"]), _fast_name(obj["site"])
    created_at = _fast_time(obj["created_at"])
    if node is _NO or site is _NO or created_at is _NO:
        return None
    items = obj["measurements"]
    if type(items) is not list or len(items) > MAX_PEERS:
        return None
    measurements = []
    seen: set[tuple[str, int]] = set()
    with_endpoint: set[str] = set()
    for item in items:
        m = _fast_measurement(item)
        if m is _NO:
            return None
        key = (m.peer, m.family)  # type: ignore[union-attr]
        if m.peer == node or key in seen:  # type: ignore[union-attr]
            return None
        seen.add(key)
        if m.endpoint is not None:  # type: ignore[union-attr]
            if m.peer in with_endpoint:  # type: ignore[union-attr]
                return None
            with_endpoint.add(m.peer)  # type: ignore[union-attr]
        measurements.append(m)
    nat = _fast_nat(obj.get("nat"))
    if nat is _NO or (nat is not None and nat.measured_at > created_at):  # type: ignore[union-attr,operator]
        return None
    configured = _fast_configured(obj["configured"]) if "configured" in obj else Configured()
    if configured is _NO:
        return None
    return Report(
        schema_version=1,
        report_id=report_id,
        node=node,  # type: ignore[arg-type]
        site=site,  # type: ignore[arg-type]
        created_at=created_at,  # type: ignore[arg-type]
        measurements=tuple(measurements),  # type: ignore[arg-type]
        nat=nat,  # type: ignore[arg-type]
        configured=configured,  # type: ignore[arg-type]
    )


# --- what the controller stores -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredReport(Wire):
    """A report as accepted: ``received_at`` is the controller's clock (agents' clocks skew)."""

    received_at: datetime
    report: Report


@dataclass(frozen=True, slots=True)
class Override(Wire):
    """An admin's setting that beats measurements.  ``target``: a site (scope "site"), a node
    ("node": everything that node applies), or ``"node>peer"`` ("link": what node applies
    towards peer — directional, like a route MTU or a [Peer] keepalive)."""

    scope: Scope
    target: str
    setting: Setting
    value: int
    note: str = field(default="", metadata=_meta(lambda v: _grammar_problem(grammar.note, v)))

    def _cross_check(self, path: str) -> None:
        names = self.target.split(">") if self.scope == "link" else [self.target]
        if len(names) != (2 if self.scope == "link" else 1) or any(_name(n) for n in names):
            shape = "node>peer" if self.scope == "link" else f"a {self.scope} name"
            raise ReportError(_join(path, "target"), f"{_show(self.target)} is not {shape}")
        # What agents accept (fleetvpn.grammar): an override beyond it would be refused by every
        # node it applies to. An IPv6 tunnel's floor of 1280 is the API's to check (it knows
        # the tunnel).
        lo, hi = (
            grammar.TUNNEL_MTU_IPV4
            if self.setting == "tunnel_mtu"
            else (0, grammar.KEEPALIVE_MAX_S)
        )
        if not lo <= self.value <= hi:
            raise ReportError(_join(path, "value"), f"{self.value} is out of range ({lo}..{hi})")


@dataclass(frozen=True, slots=True)
class MappingLoss(Wire):
    """Evidence that ``node``'s NAT mapping towards ``peer`` was lost at ``observed_at`` while
    ``node`` sent keepalives every ``configured_keepalive_s`` (e.g. the peer saw the node's
    endpoint port change)."""

    node: str = field(metadata=_meta(_name))
    peer: str = field(metadata=_meta(_name))
    observed_at: datetime
    configured_keepalive_s: int = field(metadata=_meta(_range(*KEEPALIVE_RANGE)))
    evidence: str


@dataclass(frozen=True, slots=True)
class KeepaliveState(Wire):
    """The keepalive policy's memory of one site between evaluations (hysteresis, eviction)."""

    site: str = field(metadata=_meta(_name))
    updated_at: datetime
    # the hysteresis-filtered value from lifetimes
    measured_keepalive_s: int = field(metadata=_meta(_range(*KEEPALIVE_RANGE)))
    measured_source: Source
    pending_keepalive_s: int | None = None  # a raise waiting for confirmation
    pending_since: datetime | None = None
    eviction_cap_s: int | None = None  # lowered after evictions, raised again slowly
    cap_changed_at: datetime | None = None
    last_loss_at: datetime | None = None  # losses up to here are accounted for


# --- what the controller decides ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LinkMtuDecision(Wire):
    """One direction of a link: the tunnel MTU ``node`` may send towards ``peer``."""

    node: str
    peer: str
    tunnel_mtu: int
    source: Source
    reason: str
    path_mtu: int | None = None
    family: Family | None = None
    needs_fragmentation: bool = False  # the path cannot carry the tunnel's minimum MTU


@dataclass(frozen=True, slots=True)
class LinkMtu(Wire):
    """A link's one number: the tunnel MTU that fits both directions."""

    node_a: str
    node_b: str
    tunnel_mtu: int
    reason: str


@dataclass(frozen=True, slots=True)
class RouteMtu(Wire):
    """The MTU of ``node``'s route to ``peer``'s allowed IPs (what the kernel and TCP use)."""

    peer: str
    route_mtu: int
    tunnel_mtu: int
    reason: str
    # The path cannot carry the tunnel's minimum (1280 while it carries IPv6): ``route_mtu``
    # is below it, for IPv4 inside; IPv6 inside keeps 1280 with TCP's MSS clamped to fit, and
    # larger packets leave fragmented outside the tunnel, towards this peer's endpoint only.
    fragment_outer: bool = False


@dataclass(frozen=True, slots=True)
class NodeMtuPlan(Wire):
    node: str
    interface_mtu: int
    reason: str
    routes: tuple[RouteMtu, ...]


@dataclass(frozen=True, slots=True)
class SiteKeepalive(Wire):
    site: str
    keepalive_s: int  # 0 = off
    source: Source
    reason: str
    mapping_lifetime_s: float | None = None  # the smallest recent one, when measured


@dataclass(frozen=True, slots=True)
class PeerKeepalive(Wire):
    """The PersistentKeepalive ``node`` sets in its [Peer] section for ``peer``."""

    node: str
    peer: str
    keepalive_s: int  # 0 = off
    source: Source
    reason: str


@dataclass(frozen=True, slots=True)
class LinkHealth(Wire):
    node: str
    peer: str
    state: HealthState
    reason: str

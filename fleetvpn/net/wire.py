"""The probe wire protocol: authenticated, replay-protected UDP messages between fleet nodes.

Pure: no sockets, no clock (times come in as arguments). The responder adapter and the probing
adapters use it like this::

    msg = decode(datagram, key)          # raises a WireError subclass for anything wrong
    guard.check(msg, unix_time_s)        # raises Replayed (or its subclass Stale)
    reply = reply_to(msg, src_ip, src_port)   # None for non-requests
    sealer.seal(reply, unix_time_s)      # bytes, never longer than the request

Every datagram (all integers big-endian)::

    offset  size  field
    0       3     magic b"FVP"
    3       1     version (1); other versions -> Unsupported
    4       1     type (below); unknown -> Unsupported
    5       1     flags; bit 0 FLAG_OTHER_PORT (arm/armed/fire only); other bits -> Unsupported
    6       2     body length (exactly the type's body size)
    8       8     sender id: random per sending process, names the replay window
    16      8     counter: strictly increasing per sender id (sliding-window anti-replay)
    24      8     timestamp, unix ms (freshness: old captures fail after a responder restart)
    32      n     body (below)
    32+n    p     padding (requests only; any content, authenticated)
    end-16  16    tag = HMAC-SHA256(fleet probe key, every preceding byte)[:16]

Bodies (offsets relative to the body)::

    type 1 PMTU_PROBE (request)    0 u32 probe_id; padded to the probe size
    type 2 PMTU_ACK (reply)        0 u32 probe_id; 4 u16 received_len (UDP payload bytes)
    type 3 BINDING_REQUEST (req.)  0 u64 txn; padded to >= the reply size
    type 4 BINDING_REPLY (reply)   0 u64 txn; 8 u8 family 4|6; 9 u8 0; 10 u16 port;
                                   12 16 address (IPv4: first 4 bytes, rest zero)
    type 5 ARM_REQUEST (request)   0 u64 token; 8 u32 gap_ms; 12 u8 copies (1..8);
                                   padded to >= ARMED + copies x FIRE
    type 6 ARMED (reply)           same body as ARM_REQUEST, echoed
    type 7 FIRE (later reply)      0 u64 token; 8 u8 copy_index; 9 u8 copies

The responder is not an amplifier: a reply is never longer than its request, and for an arm
request the armed reply plus all fire packets together are not longer than the request (the
decoder refuses requests shorter than that). Replies carry no padding.

Keys: every function that takes a key takes a :class:`KeyRing` too (the probe key file may hold
up to :data:`MAX_KEYS` keys while the fleet rotates its key): the ring's first key seals what is
sent; a datagram sealed with any key of the ring is accepted, and :func:`decode_keyed` says which,
so that a reply is sealed with the key its request used. Rotation with an overlap, fleet-wide,
one step at a time: add the new key second (accepted, not used) → make it first (used; the old one
still accepted) → drop the old one. At every step every sender's key is accepted by every
receiver, so probing never stops.

Errors: ``decode`` raises only :class:`WireError` subclasses — Malformed (framing, lengths,
field values), BadAuth (tag), Unsupported (version, type, flags), never anything else for any
input. Replayed/Stale come from :class:`ReplayGuard`. Encoding with invalid field values, and
any use of a key shorter than 16 bytes, raises ValueError (a caller bug, not wire input).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import struct
from collections.abc import Hashable
from dataclasses import asdict, dataclass
from typing import Final

MAGIC: Final = b"FVP"
VERSION: Final = 1
HEADER_LEN: Final = 32
TAG_LEN: Final = 16
OVERHEAD: Final = HEADER_LEN + TAG_LEN
MIN_KEY_LEN: Final = 16
MAX_DATAGRAM: Final = 65507  # largest UDP payload over IPv4
FLAG_OTHER_PORT: Final = 0x01  # fire from a different responder port (filter detection)
MAX_FIRE_COPIES: Final = 8
MAX_GAP_S: Final = 3600.0
MAX_KEYS: Final = 4  # keys in a ring: each costs one HMAC per datagram that fails them all

PMTU_PROBE: Final = 1
PMTU_ACK: Final = 2
BINDING_REQUEST: Final = 3
BINDING_REPLY: Final = 4
ARM_REQUEST: Final = 5
ARMED: Final = 6
FIRE: Final = 7

_HEADER = struct.Struct("!3sBBBHQQQ")
_PROBE = struct.Struct("!I")
_ACK = struct.Struct("!IH")
_TXN = struct.Struct("!Q")
_BINDING = struct.Struct("!QBBH16s")
_ARM = struct.Struct("!QIB")
_FIRE = struct.Struct("!QBB")
_U64: Final = (1 << 64) - 1

PMTU_ACK_LEN: Final = OVERHEAD + _ACK.size
BINDING_REPLY_LEN: Final = OVERHEAD + _BINDING.size
ARMED_LEN: Final = OVERHEAD + _ARM.size
FIRE_LEN: Final = OVERHEAD + _FIRE.size


# ---------------------------------------------------------------------- errors


class WireError(Exception):
    """Anything wrong with a received datagram. The only exception ``decode`` raises."""


class Malformed(WireError):
    pass


class BadAuth(WireError):
    pass


class Unsupported(WireError):
    pass


class Replayed(WireError):
    pass


class Stale(Replayed):
    """Timestamp outside the freshness bound (an old capture, or a badly skewed clock)."""


# ---------------------------------------------------------------------- messages

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Header:
    sender_id: int  # u64
    counter: int  # u64
    timestamp_ms: int  # u64, unix ms


@dataclass(frozen=True, slots=True)
class PmtuProbe:
    probe_id: int  # u32


@dataclass(frozen=True, slots=True)
class PmtuAck:
    probe_id: int  # u32
    received_len: int  # UDP payload bytes of the probe as received, u16


@dataclass(frozen=True, slots=True)
class BindingRequest:
    txn: int  # u64, echoed in the reply


@dataclass(frozen=True, slots=True)
class BindingReply:
    txn: int
    address: IPAddress  # the request's source address as the responder saw it
    port: int


@dataclass(frozen=True, slots=True)
class ArmRequest:
    """Ask the responder to send ``copies`` FIRE packets to this request's source after
    ``gap_s`` (millisecond resolution), from another port if ``other_port``."""

    token: int  # u64, echoed in ARMED and every FIRE
    gap_s: float
    copies: int = 3
    other_port: bool = False


@dataclass(frozen=True, slots=True)
class Armed:
    token: int
    gap_s: float
    copies: int
    other_port: bool


@dataclass(frozen=True, slots=True)
class Fire:
    token: int
    copy_index: int  # 0 .. copies-1
    copies: int
    other_port: bool


Body = PmtuProbe | PmtuAck | BindingRequest | BindingReply | ArmRequest | Armed | Fire
REQUESTS: Final = (PmtuProbe, BindingRequest, ArmRequest)


@dataclass(frozen=True, slots=True)
class Message:
    header: Header
    body: Body
    datagram_len: int  # bytes of the whole datagram (= UDP payload length)


# ---------------------------------------------------------------------- encoding


def udp_payload_len(ip_packet_size: int, family: int) -> int:
    """UDP payload bytes of an IP packet of ``ip_packet_size`` (28 / 48 bytes of headers)."""
    return ip_packet_size - (28 if family == 4 else 48)


def min_len(body: Body) -> int:
    """Smallest datagram that may carry ``body`` (requests: room for all their replies)."""
    if isinstance(body, PmtuProbe):
        return max(OVERHEAD + _PROBE.size, PMTU_ACK_LEN)
    if isinstance(body, BindingRequest):
        return max(OVERHEAD + _TXN.size, BINDING_REPLY_LEN)
    if isinstance(body, ArmRequest):
        return max(OVERHEAD + _ARM.size, ARMED_LEN + body.copies * FIRE_LEN)
    return OVERHEAD + _REPLY_STRUCTS[type(body)].size


@dataclass(frozen=True, slots=True)
class KeyRing:
    """The fleet probe keys one process holds: ``keys[0]`` seals, every key authenticates."""

    keys: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.keys) <= MAX_KEYS:
            raise ValueError(f"a key ring holds 1 to {MAX_KEYS} keys, not {len(self.keys)}")
        for key in self.keys:
            _check_key(key)
        if len(set(self.keys)) != len(self.keys):
            raise ValueError("a key ring holds each key once")

    @property
    def send(self) -> bytes:
        return self.keys[0]

    def __repr__(self) -> str:  # never the keys themselves
        return f"KeyRing(<{len(self.keys)} keys>)"


KeyLike = bytes | KeyRing


def _keys(key: KeyLike) -> tuple[bytes, ...]:
    if isinstance(key, KeyRing):
        return key.keys
    _check_key(key)
    return (key,)


def encode(body: Body, header: Header, key: KeyLike, *, pad_to: int | None = None) -> bytes:
    """Serialise and authenticate one datagram.

    ``pad_to`` (requests only) is the exact datagram length wanted — for a PMTU probe, the UDP
    payload length of the probe size. ValueError if it is below ``min_len(body)``, above 65507,
    given for a reply, or if any field is out of range.
    """
    key = _keys(key)[0]
    for name, value, limit in (
        ("sender_id", header.sender_id, _U64),
        ("counter", header.counter, _U64),
        ("timestamp_ms", header.timestamp_ms, _U64),
    ):
        _check_range(name, value, limit)
    type_, flags, payload = _encode_body(body)
    length = min_len(body)
    if pad_to is not None:
        if not isinstance(body, REQUESTS):
            raise ValueError(f"{type(body).__name__} is a reply: replies are never padded")
        if not length <= pad_to <= MAX_DATAGRAM:
            raise ValueError(f"pad_to {pad_to} outside [{length}, {MAX_DATAGRAM}]")
        length = pad_to
    head = _HEADER.pack(
        MAGIC, VERSION, type_, flags, len(payload), header.sender_id, header.counter,
        header.timestamp_ms,
    )  # fmt: skip
    unsigned = head + payload + bytes(length - OVERHEAD - len(payload))
    return unsigned + _tag(key, unsigned)


class Sealer:
    """Stamps outgoing messages with this process's sender id and a strictly increasing counter.

    ``sender_id`` must be fresh and random per process (e.g. ``secrets.randbits(64)``): the
    receivers' replay windows are keyed by it, so reusing one after a restart would make the
    new counters look like replays.
    """

    def __init__(self, key: KeyLike, sender_id: int, first_counter: int = 1) -> None:
        _check_range("sender_id", sender_id, _U64)
        _check_range("first_counter", first_counter, _U64)
        self._key = bytes(_keys(key)[0])
        self.sender_id = sender_id
        self._counter = first_counter

    def rekey(self, key: KeyLike) -> None:
        """Seal with ``key`` (its ring's first key) from now on; the same sender id and
        counter, so receivers' replay windows carry on."""
        self._key = bytes(_keys(key)[0])

    def seal(
        self,
        body: Body,
        unix_time_s: float,
        *,
        pad_to: int | None = None,
        key: bytes | None = None,
    ) -> bytes:
        """``key``: seal with this key instead (a reply, with the key of its request)."""
        header = Header(self.sender_id, self._counter, max(0, int(unix_time_s * 1000)))
        packet = encode(body, header, self._key if key is None else key, pad_to=pad_to)
        self._counter += 1
        return packet


def reply_to(message: Message, source_ip: IPAddress, source_port: int) -> Body | None:
    """The immediate reply a responder owes ``message`` (None for replies / fire packets).

    ``source_ip``/``source_port``: where the request came from (after any NAT), reported back
    in a binding reply. Encoded, the reply is never longer than ``message.datagram_len``.
    """
    body = message.body
    if isinstance(body, PmtuProbe):
        return PmtuAck(body.probe_id, message.datagram_len)
    if isinstance(body, BindingRequest):
        return BindingReply(body.txn, source_ip, source_port)
    if isinstance(body, ArmRequest):
        return Armed(body.token, body.gap_s, body.copies, body.other_port)
    return None


def fires_for(arm: ArmRequest) -> list[Fire]:
    """The FIRE packets to send ``arm.gap_s`` after an arm request (adapter spaces them)."""
    return [Fire(arm.token, i, arm.copies, arm.other_port) for i in range(arm.copies)]


# ---------------------------------------------------------------------- decoding


def decode(data: bytes, key: KeyLike) -> Message:
    """Parse and authenticate one datagram. Total: raises only WireError subclasses.

    Order: framing (Malformed), version (Unsupported), tag (BadAuth), then the authenticated
    type/flags (Unsupported) and lengths/fields (Malformed). Replay is the guard's job.
    """
    return decode_keyed(data, key)[0]


def decode_keyed(data: bytes, key: KeyLike) -> tuple[Message, bytes]:
    """:func:`decode`, and the key of the ring that authenticated the datagram."""
    keys = _keys(key)
    if not isinstance(data, bytes | bytearray | memoryview):
        raise Malformed(f"not bytes: {type(data).__name__}")
    data = bytes(data)
    n = len(data)
    if n < OVERHEAD:
        raise Malformed(f"{n} bytes: shorter than header and tag ({OVERHEAD})")
    if n > MAX_DATAGRAM:
        raise Malformed(f"{n} bytes: longer than any UDP datagram")
    magic, version, type_, flags, body_len, sender, counter, stamp = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise Malformed("bad magic")
    if version != VERSION:
        raise Unsupported(f"version {version}")
    tag, signed = data[-TAG_LEN:], data[:-TAG_LEN]
    matched = next((k for k in keys if hmac.compare_digest(tag, _tag(k, signed))), None)
    if matched is None:
        raise BadAuth("tag mismatch (wrong key or altered datagram)")
    spec = _BODY_SPECS.get(type_)
    if spec is None:
        raise Unsupported(f"message type {type_}")
    st, flags_allowed, is_request = spec
    if flags & ~flags_allowed:
        raise Unsupported(f"flags 0x{flags:02x} for type {type_}")
    if body_len != st.size:
        raise Malformed(f"type {type_}: body length {body_len}, expected {st.size}")
    if HEADER_LEN + body_len + TAG_LEN > n:
        raise Malformed(f"type {type_}: body runs past the tag")
    body = _decode_body(type_, flags, st.unpack_from(data, HEADER_LEN))
    need = min_len(body)
    if (n < need) if is_request else (n != need):
        what = "request shorter than its replies" if is_request else "reply with padding"
        raise Malformed(f"type {type_}: {n} bytes, {what} ({need})")
    return Message(Header(sender, counter, stamp), body, n), matched


# ---------------------------------------------------------------------- replay protection


class ReplayWindow:
    """Sliding anti-replay window over one sender's counters (RFC 6479 / WireGuard style).

    Accepts each counter at most once, and none older than ``size`` below the highest seen.
    """

    def __init__(self, size: int = 2048) -> None:
        if size < 1:
            raise ValueError("window size must be >= 1")
        self._size = size
        self._mask = (1 << size) - 1
        self._top = -1  # highest counter accepted; -1: none yet
        self._seen = 0  # bit i set: counter (top - i) accepted

    @property
    def top(self) -> int:
        return self._top

    def accept(self, counter: int) -> bool:
        """True (and remembered) for a new counter; False for a replay or a too-old one."""
        if counter < 0:
            return False
        if counter > self._top:
            shift = counter - self._top
            self._seen = 1 if shift >= self._size else ((self._seen << shift) | 1) & self._mask
            self._top = counter
            return True
        offset = self._top - counter
        if offset >= self._size or (self._seen >> offset) & 1:
            return False
        self._seen |= 1 << offset
        return True


class ReplayGuard:
    """Freshness bound plus one :class:`ReplayWindow` per sender id, bounded in memory.

    ``check`` raises Stale when the timestamp is more than ``max_skew_s`` away from
    ``unix_time_s`` (so captures older than that fail even after a restart emptied the
    windows), Replayed for a counter seen before or below the window. Call it only after
    ``decode`` succeeded (authenticated messages), so forged traffic cannot fill the table.
    When more than ``max_senders`` are tracked, the least recently seen is forgotten: its
    recent packets could then be replayed once, within the freshness bound.
    """

    def __init__(
        self, *, window: int = 2048, max_skew_s: float = 30.0, max_senders: int = 4096
    ) -> None:
        if max_skew_s <= 0 or max_senders < 1:
            raise ValueError("max_skew_s must be > 0 and max_senders >= 1")
        self._window = window
        self._max_skew_ms = max_skew_s * 1000
        self._max_senders = max_senders
        self._windows: dict[int, ReplayWindow] = {}

    def check(self, message: Message, unix_time_s: float) -> None:
        header = message.header
        skew_ms = header.timestamp_ms - unix_time_s * 1000
        if abs(skew_ms) > self._max_skew_ms:
            raise Stale(f"timestamp {skew_ms / 1000:+.1f} s from now")
        window = self._windows.pop(header.sender_id, None)
        if window is None:
            window = ReplayWindow(self._window)
            if len(self._windows) >= self._max_senders:
                del self._windows[next(iter(self._windows))]
        self._windows[header.sender_id] = window  # (re)insert: dict order is recency
        if not window.accept(header.counter):
            raise Replayed(f"sender {header.sender_id:016x} counter {header.counter}")

    def __len__(self) -> int:
        return len(self._windows)


# ---------------------------------------------------------------------- responder hygiene


class RateLimiter:
    """Token bucket per source (any hashable, e.g. an (ip, port) tuple or an ip string).

    ``rate_per_s`` tokens refill per second up to ``burst``; ``allow`` spends ``cost``.
    At most ``max_sources`` buckets are kept; the least recently used is dropped first (a
    dropped source starts again with a full bucket). Time going backwards refills nothing.
    """

    def __init__(self, rate_per_s: float, burst: float, max_sources: int = 65536) -> None:
        if rate_per_s <= 0 or burst <= 0 or max_sources < 1:
            raise ValueError("rate_per_s, burst and max_sources must be > 0")
        self._rate = rate_per_s
        self._burst = burst
        self._max_sources = max_sources
        self._buckets: dict[Hashable, tuple[float, float]] = {}  # source -> (tokens, at)

    def allow(self, source: Hashable, now: float, cost: float = 1.0) -> bool:
        tokens, at = self._buckets.pop(source, (self._burst, now))
        tokens = min(self._burst, tokens + max(0.0, now - at) * self._rate)
        allowed = tokens >= cost
        if allowed:
            tokens -= cost
        if len(self._buckets) >= self._max_sources:
            del self._buckets[next(iter(self._buckets))]
        self._buckets[source] = (tokens, max(at, now))
        return allowed

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass
class Counters:
    """What a responder accepted and why it dropped the rest (for metrics and ``health``)."""

    accepted: int = 0
    malformed: int = 0
    bad_auth: int = 0
    replayed: int = 0  # Stale included
    unsupported: int = 0
    rate_limited: int = 0

    def record(self, error: WireError | None) -> None:
        """Count one datagram: None means accepted, else the error it was dropped for."""
        if error is None:
            self.accepted += 1
        elif isinstance(error, BadAuth):
            self.bad_auth += 1
        elif isinstance(error, Replayed):
            self.replayed += 1
        elif isinstance(error, Unsupported):
            self.unsupported += 1
        else:
            self.malformed += 1

    def record_rate_limited(self) -> None:
        self.rate_limited += 1

    @property
    def dropped(self) -> int:
        return self.malformed + self.bad_auth + self.replayed + self.unsupported + self.rate_limited

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "dropped": self.dropped}


# ---------------------------------------------------------------------- internals

# type -> (body struct, allowed flags, is a request)
_BODY_SPECS: Final[dict[int, tuple[struct.Struct, int, bool]]] = {
    PMTU_PROBE: (_PROBE, 0, True),
    PMTU_ACK: (_ACK, 0, False),
    BINDING_REQUEST: (_TXN, 0, True),
    BINDING_REPLY: (_BINDING, 0, False),
    ARM_REQUEST: (_ARM, FLAG_OTHER_PORT, True),
    ARMED: (_ARM, FLAG_OTHER_PORT, False),
    FIRE: (_FIRE, FLAG_OTHER_PORT, False),
}


_REPLY_STRUCTS: Final[dict[type, struct.Struct]] = {
    PmtuAck: _ACK,
    BindingReply: _BINDING,
    Armed: _ARM,
    Fire: _FIRE,
}


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes | bytearray) or len(key) < MIN_KEY_LEN:
        raise ValueError(f"the fleet probe key must be >= {MIN_KEY_LEN} bytes")


def _check_range(name: str, value: int, limit: int, low: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= limit:
        raise ValueError(f"{name}={value!r} outside [{low}, {limit}]")


def _tag(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()[:TAG_LEN]


def _gap_ms(gap_s: float) -> int:
    if not isinstance(gap_s, int | float) or not 0.0 <= gap_s <= MAX_GAP_S:
        raise ValueError(f"gap_s={gap_s!r} outside [0, {MAX_GAP_S}]")
    return round(gap_s * 1000)


def _encode_body(body: Body) -> tuple[int, int, bytes]:
    """(type, flags, body bytes); ValueError for out-of-range fields."""
    if isinstance(body, PmtuProbe):
        _check_range("probe_id", body.probe_id, 0xFFFFFFFF)
        return PMTU_PROBE, 0, _PROBE.pack(body.probe_id)
    if isinstance(body, PmtuAck):
        _check_range("probe_id", body.probe_id, 0xFFFFFFFF)
        _check_range("received_len", body.received_len, 0xFFFF)
        return PMTU_ACK, 0, _ACK.pack(body.probe_id, body.received_len)
    if isinstance(body, BindingRequest):
        _check_range("txn", body.txn, _U64)
        return BINDING_REQUEST, 0, _TXN.pack(body.txn)
    if isinstance(body, BindingReply):
        _check_range("txn", body.txn, _U64)
        _check_range("port", body.port, 0xFFFF)
        if not isinstance(body.address, ipaddress.IPv4Address | ipaddress.IPv6Address):
            raise ValueError(f"address={body.address!r} is not an IP address")
        packed = body.address.packed.ljust(16, b"\0")
        return BINDING_REPLY, 0, _BINDING.pack(body.txn, body.address.version, 0, body.port, packed)
    if isinstance(body, ArmRequest | Armed):
        _check_range("token", body.token, _U64)
        _check_range("copies", body.copies, MAX_FIRE_COPIES, low=1)
        type_ = ARM_REQUEST if isinstance(body, ArmRequest) else ARMED
        flags = FLAG_OTHER_PORT if body.other_port else 0
        return type_, flags, _ARM.pack(body.token, _gap_ms(body.gap_s), body.copies)
    _check_range("token", body.token, _U64)
    _check_range("copies", body.copies, MAX_FIRE_COPIES, low=1)
    _check_range("copy_index", body.copy_index, body.copies - 1)
    flags = FLAG_OTHER_PORT if body.other_port else 0
    return FIRE, flags, _FIRE.pack(body.token, body.copy_index, body.copies)


def _decode_body(type_: int, flags: int, fields: tuple[int | bytes, ...]) -> Body:
    """Build the body from unpacked fields; Malformed for values out of range."""
    ints = [f for f in fields if isinstance(f, int)]
    other_port = bool(flags & FLAG_OTHER_PORT)
    if type_ == PMTU_PROBE:
        return PmtuProbe(ints[0])
    if type_ == PMTU_ACK:
        return PmtuAck(ints[0], ints[1])
    if type_ == BINDING_REQUEST:
        return BindingRequest(ints[0])
    if type_ == BINDING_REPLY:
        txn, family, reserved, port = ints
        raw = fields[4]
        assert isinstance(raw, bytes)
        if reserved != 0:
            raise Malformed("binding reply: reserved byte not zero")
        address: IPAddress
        if family == 4 and raw[4:] == bytes(12):
            address = ipaddress.IPv4Address(raw[:4])
        elif family == 6:
            address = ipaddress.IPv6Address(raw)
        else:
            raise Malformed(f"binding reply: bad family {family} or address padding")
        return BindingReply(txn, address, port)
    if type_ in (ARM_REQUEST, ARMED):
        token, gap_ms, copies = ints
        if not 1 <= copies <= MAX_FIRE_COPIES or gap_ms > MAX_GAP_S * 1000:
            raise Malformed(f"arm: copies {copies} or gap {gap_ms} ms out of range")
        cls = ArmRequest if type_ == ARM_REQUEST else Armed
        return cls(token, gap_ms / 1000, copies, other_port)
    token, copy_index, copies = ints
    if not 1 <= copies <= MAX_FIRE_COPIES or copy_index >= copies:
        raise Malformed(f"fire: copy {copy_index} of {copies} out of range")
    return Fire(token, copy_index, copies, other_port)

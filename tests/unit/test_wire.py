"""Probe wire protocol: round trips, authentication, replay, totality, anti-amplification."""

from __future__ import annotations

import contextlib
import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetvpn.net import wire
from fleetvpn.net.wire import (
    Armed,
    ArmRequest,
    BadAuth,
    BindingReply,
    BindingRequest,
    Body,
    Counters,
    Fire,
    Header,
    Malformed,
    Message,
    PmtuAck,
    PmtuProbe,
    RateLimiter,
    Replayed,
    ReplayGuard,
    ReplayWindow,
    Sealer,
    Stale,
    Unsupported,
    WireError,
    decode,
    encode,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
NOW = 1_800_000_000.0  # unix seconds
HEADER = Header(sender_id=0x1122334455667788, counter=7, timestamp_ms=int(NOW * 1000))
V4 = ipaddress.IPv4Address("198.18.0.7")
V6 = ipaddress.IPv6Address("fd00::1234")

BODIES: list[Body] = [
    PmtuProbe(0xDEADBEEF),
    PmtuAck(5, 1372),
    BindingRequest(2**64 - 1),
    BindingReply(9, V4, 51820),
    BindingReply(9, V6, 1),
    ArmRequest(token=42, gap_s=17.25, copies=3, other_port=False),
    ArmRequest(token=43, gap_s=0.0, copies=8, other_port=True),
    Armed(token=42, gap_s=17.25, copies=3, other_port=True),
    Fire(token=42, copy_index=2, copies=3, other_port=True),
]


def packets() -> list[bytes]:
    out = [encode(b, HEADER, KEY) for b in BODIES]
    out.append(encode(PmtuProbe(1), HEADER, KEY, pad_to=1372))  # a 1400-byte IPv4 probe
    return out


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("body", BODIES, ids=lambda b: type(b).__name__)
def test_round_trip(body: Body) -> None:
    data = encode(body, HEADER, KEY)
    msg = decode(data, KEY)
    assert msg == Message(HEADER, body, len(data))
    assert data[:3] == b"FVP" and data[3] == 1


def test_pmtu_probe_is_padded_to_exactly_the_payload_length() -> None:
    for ip_size in (1200, 1280, 1400, 1500, 9000):
        payload = wire.udp_payload_len(ip_size, 4)
        data = encode(PmtuProbe(3), HEADER, KEY, pad_to=payload)
        assert len(data) == payload == ip_size - 28
        assert decode(data, KEY).datagram_len == payload
    assert wire.udp_payload_len(1280, 6) == 1232


def test_padding_below_the_minimum_or_on_replies_is_refused() -> None:
    with pytest.raises(ValueError):
        encode(PmtuProbe(3), HEADER, KEY, pad_to=wire.HEADER_LEN)
    with pytest.raises(ValueError):
        encode(PmtuProbe(3), HEADER, KEY, pad_to=70000)
    with pytest.raises(ValueError):
        encode(PmtuAck(3, 100), HEADER, KEY, pad_to=200)


@pytest.mark.parametrize(
    "body",
    [
        PmtuProbe(2**32),
        PmtuAck(1, 70000),
        BindingReply(1, V4, 70000),
        ArmRequest(1, gap_s=-1.0),
        ArmRequest(1, gap_s=4000.0),
        ArmRequest(1, gap_s=1.0, copies=0),
        ArmRequest(1, gap_s=1.0, copies=9),
        Fire(1, copy_index=3, copies=3, other_port=False),
        BindingRequest(-1),
    ],
)
def test_out_of_range_fields_are_value_errors(body: Body) -> None:
    with pytest.raises(ValueError):
        encode(body, HEADER, KEY)


def test_short_key_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        encode(PmtuProbe(1), HEADER, b"short")
    with pytest.raises(ValueError):
        decode(encode(PmtuProbe(1), HEADER, KEY), b"short")


def test_sealer_counts_up_and_stamps_time() -> None:
    sealer = Sealer(KEY, sender_id=77)
    first = decode(sealer.seal(PmtuProbe(1), NOW), KEY)
    second = decode(sealer.seal(PmtuProbe(2), NOW + 1.5, pad_to=500), KEY)
    assert (first.header.sender_id, first.header.counter) == (77, 1)
    assert second.header.counter == 2
    assert second.header.timestamp_ms - first.header.timestamp_ms == 1500
    assert second.datagram_len == 500


# ------------------------------------------------------------------ authentication, totality


def test_wrong_key_is_bad_auth() -> None:
    for data in packets():
        with pytest.raises(BadAuth):
            decode(data, OTHER_KEY)


def test_tampering_with_any_byte_is_detected() -> None:
    for data in packets():
        for i in range(len(data)):
            tampered = bytearray(data)
            tampered[i] ^= 0x01
            with pytest.raises(WireError) as info:
                decode(bytes(tampered), KEY)
            # The version byte is read before the tag (a newer peer is "unsupported").
            expected = Unsupported if i == 3 else (Malformed if i < 3 else BadAuth)
            assert type(info.value) is expected, (i, info.value)


def test_truncation_at_every_length_is_a_wire_error() -> None:
    for data in packets():
        for n in range(len(data)):
            with pytest.raises((Malformed, BadAuth)):
                decode(data[:n], KEY)


def _authentic(raw_without_tag: bytes) -> bytes:
    return raw_without_tag + wire._tag(KEY, raw_without_tag)


def test_authenticated_but_invalid_content_is_unsupported_or_malformed() -> None:
    good = encode(Fire(1, 0, 3, False), HEADER, KEY)[: -wire.TAG_LEN]
    cases = {
        Unsupported: [
            good[:4] + bytes([99]) + good[5:],  # unknown type
            good[:5] + bytes([0x80]) + good[6:],  # unknown flag
            encode(PmtuProbe(1), HEADER, KEY)[:5] + b"\x01" + good[6:32] + b"\0" * 6,
        ],
        Malformed: [
            good[:6] + (99).to_bytes(2, "big") + good[8:],  # body length
            good[:32] + (1).to_bytes(8, "big") + bytes([3, 3]),  # copy_index >= copies
            good + b"\0",  # a reply with padding
        ],
    }
    for error, raws in cases.items():
        for raw in raws:
            with pytest.raises(error):
                decode(_authentic(raw), KEY)


def test_binding_reply_bad_family_or_address_padding_is_malformed() -> None:
    good = encode(BindingReply(1, V4, 5), HEADER, KEY)[: -wire.TAG_LEN]
    family_off = wire.HEADER_LEN + 8
    bad_family = good[:family_off] + bytes([5]) + good[family_off + 1 :]
    bad_pad = good[:-1] + b"\x01"
    for raw in (bad_family, bad_pad):
        with pytest.raises(Malformed):
            decode(_authentic(raw), KEY)


def test_unknown_version_and_magic() -> None:
    data = encode(PmtuProbe(1), HEADER, KEY)
    with pytest.raises(Unsupported):
        decode(data[:3] + b"\x02" + data[4:], KEY)
    with pytest.raises(Malformed):
        decode(b"XYZ" + data[3:], KEY)
    with pytest.raises(Malformed):
        decode("not bytes", KEY)  # type: ignore[arg-type]


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes_only_wire_errors(data: bytes) -> None:
    with contextlib.suppress(WireError):
        decode(data, KEY)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    index=st.integers(min_value=0, max_value=len(BODIES)),
    edits=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=4),
    cut=st.integers(min_value=0, max_value=2000),
    extra=st.binary(max_size=20),
    retag=st.booleans(),
)
def test_fuzz_mutated_valid_packets_only_wire_errors(
    index: int, edits: list[tuple[int, int]], cut: int, extra: bytes, retag: bool
) -> None:
    data = bytearray(packets()[index])
    for pos, value in edits:
        data[pos % len(data)] = value
    data = data[: max(cut, wire.OVERHEAD)] + extra
    raw = bytes(data)
    if retag:  # exercise the parser behind the tag, as a key holder could
        raw = _authentic(raw[: -wire.TAG_LEN])
    try:
        msg = decode(raw, KEY)
    except WireError:
        return
    assert isinstance(msg, Message)
    assert msg.datagram_len == len(raw)


# ------------------------------------------------------------------ not an amplifier


def test_replies_are_never_larger_than_requests() -> None:
    requests: list[tuple[Body, int | None]] = [
        (PmtuProbe(1), None),
        (PmtuProbe(1), 1472),
        (BindingRequest(5), None),
        *[(ArmRequest(9, 1.0, copies=c, other_port=True), None) for c in range(1, 9)],
    ]
    for body, pad in requests:
        request = encode(body, HEADER, KEY, pad_to=pad)
        msg = decode(request, KEY)
        reply = wire.reply_to(msg, ipaddress.IPv6Address("2001:db8::1"), 65535)
        assert reply is not None
        reply_bytes = len(encode(reply, HEADER, KEY))
        if isinstance(body, ArmRequest):
            reply_bytes += sum(len(encode(f, HEADER, KEY)) for f in wire.fires_for(body))
        assert reply_bytes <= len(request), body
    assert wire.reply_to(decode(encode(PmtuAck(1, 2), HEADER, KEY), KEY), V4, 1) is None


def test_pmtu_ack_reports_the_received_length() -> None:
    msg = decode(encode(PmtuProbe(11), HEADER, KEY, pad_to=1232), KEY)
    assert wire.reply_to(msg, V6, 4000) == PmtuAck(11, 1232)


def test_binding_reply_reports_the_observed_source() -> None:
    msg = decode(encode(BindingRequest(3), HEADER, KEY), KEY)
    assert wire.reply_to(msg, V4, 40000) == BindingReply(3, V4, 40000)


def test_short_requests_are_refused_even_when_authentic() -> None:
    arm = encode(ArmRequest(1, 2.0, copies=8), HEADER, KEY)[: -wire.TAG_LEN]
    with pytest.raises(Malformed, match="shorter than its replies"):
        decode(_authentic(arm[: wire.HEADER_LEN + 13]), KEY)
    binding = encode(BindingRequest(1), HEADER, KEY)[: -wire.TAG_LEN]
    with pytest.raises(Malformed, match="shorter than its replies"):
        decode(_authentic(binding[: wire.HEADER_LEN + 8]), KEY)


def test_fires_for_arm() -> None:
    fires = wire.fires_for(ArmRequest(5, 30.0, copies=3, other_port=True))
    assert [f.copy_index for f in fires] == [0, 1, 2]
    assert all(f.token == 5 and f.other_port and f.copies == 3 for f in fires)


# ------------------------------------------------------------------ replay


def test_replay_window_basics() -> None:
    window = ReplayWindow(size=64)
    assert window.accept(10)
    assert not window.accept(10)
    assert window.accept(5)  # late but inside the window
    assert not window.accept(5)
    assert window.accept(100)
    assert not window.accept(36)  # 100 - 36 = 64: outside
    assert window.accept(37)
    assert window.accept(10_000)  # jump larger than the window clears it
    assert not window.accept(10_000)
    assert window.accept(9_999)
    assert not window.accept(-1)


@given(st.lists(st.integers(min_value=0, max_value=300), max_size=200))
@settings(max_examples=200, deadline=None)
def test_replay_window_matches_a_model(counters: list[int]) -> None:
    window = ReplayWindow(size=32)
    seen: set[int] = set()
    top = -1
    for c in counters:
        expected = c not in seen and c > top - 32
        assert window.accept(c) == expected
        if expected:
            seen.add(c)
            top = max(top, c)


def test_guard_rejects_same_packet_twice_and_old_counters() -> None:
    guard = ReplayGuard(window=64)
    sealer = Sealer(KEY, sender_id=1)
    packets_ = [decode(sealer.seal(PmtuProbe(i), NOW), KEY) for i in range(100)]
    guard.check(packets_[99], NOW)
    with pytest.raises(Replayed):
        guard.check(packets_[99], NOW)  # same packet twice
    with pytest.raises(Replayed):
        guard.check(packets_[10], NOW)  # counter 11, outside the 64-wide window below 100
    guard.check(packets_[60], NOW)  # reordered but inside: fine once
    other = Sealer(KEY, sender_id=2)
    guard.check(decode(other.seal(PmtuProbe(1), NOW), KEY), NOW)  # independent window
    assert len(guard) == 2


def test_guard_rejects_stale_captures_after_a_restart() -> None:
    captured = decode(Sealer(KEY, sender_id=9).seal(PmtuProbe(1), NOW), KEY)
    fresh_guard = ReplayGuard(max_skew_s=30.0)  # a restarted responder: empty windows
    with pytest.raises(Stale):
        fresh_guard.check(captured, NOW + 31.0)
    with pytest.raises(Stale):
        fresh_guard.check(captured, NOW - 31.0)  # from the future
    fresh_guard.check(captured, NOW + 29.0)
    assert issubclass(Stale, Replayed)


def test_guard_forgets_least_recent_sender_when_full() -> None:
    guard = ReplayGuard(max_senders=3)
    for sender in range(5):
        guard.check(decode(Sealer(KEY, sender).seal(PmtuProbe(1), NOW), KEY), NOW)
    assert len(guard) == 3


# ------------------------------------------------------------------ rate limiter, counters


def test_rate_limiter_token_bucket_on_virtual_time() -> None:
    limiter = RateLimiter(rate_per_s=10.0, burst=5.0)
    src = ("198.18.0.1", 4000)
    assert [limiter.allow(src, 0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert limiter.allow(("198.18.0.2", 1), 0.0)  # other sources have their own bucket
    assert not limiter.allow(src, 0.05)  # half a token
    assert limiter.allow(src, 0.1)
    assert not limiter.allow(src, 0.1)
    assert [limiter.allow(src, 100.0) for _ in range(6)] == [True] * 5 + [False]  # capped
    assert not limiter.allow(src, 50.0)  # time going backwards refills nothing
    assert not limiter.allow(src, 0.0, cost=0.5)


def test_rate_limiter_memory_is_bounded() -> None:
    limiter = RateLimiter(rate_per_s=1.0, burst=1.0, max_sources=100)
    for i in range(1000):
        limiter.allow(i, 0.0)
    assert len(limiter) == 100


def test_counters() -> None:
    counters = Counters()
    for error in (None, None, Malformed(), BadAuth(), Replayed(), Stale(), Unsupported()):
        counters.record(error)
    counters.record_rate_limited()
    assert counters.as_dict() == {
        "accepted": 2,
        "malformed": 1,
        "bad_auth": 1,
        "replayed": 2,
        "unsupported": 1,
        "rate_limited": 1,
        "dropped": 6,
    }


def test_responder_pipeline_counts_everything() -> None:
    """What the responder adapter does with each datagram, end to end, without sockets."""
    guard, limiter, counters = ReplayGuard(), RateLimiter(100.0, 6.0), Counters()
    sealer = Sealer(KEY, sender_id=5)
    good = sealer.seal(BindingRequest(1), NOW)
    datagrams = [good, good, b"junk", sealer.seal(BindingRequest(2), NOW)[:-1] + b"\0"]
    datagrams += [sealer.seal(BindingRequest(i), NOW) for i in range(3, 6)]
    replies = []
    for data in datagrams:
        if not limiter.allow("198.18.0.9", 0.0):
            counters.record_rate_limited()
            continue
        try:
            msg = decode(data, KEY)
            guard.check(msg, NOW)
        except WireError as error:
            counters.record(error)
            continue
        counters.record(None)
        replies.append(wire.reply_to(msg, V4, 1234))
    assert counters.as_dict() == {
        "accepted": 3,
        "malformed": 1,
        "bad_auth": 1,
        "replayed": 1,
        "unsupported": 0,
        "rate_limited": 1,
        "dropped": 4,
    }
    assert replies == [BindingReply(i, V4, 1234) for i in (1, 3, 4)]


def test_a_key_ring_seals_with_its_first_key_and_accepts_every_key() -> None:
    old, new, other = b"o" * 32, b"n" * 32, b"x" * 32
    ring = wire.KeyRing((new, old))
    probe = wire.PmtuProbe(7)
    from_old = wire.Sealer(old, 1).seal(probe, 1.0, pad_to=100)
    from_ring = wire.Sealer(ring, 2).seal(probe, 1.0, pad_to=100)
    assert wire.decode_keyed(from_old, ring)[1] == old
    assert wire.decode_keyed(from_ring, ring)[1] == new
    assert wire.decode(from_ring, new).body == probe
    with pytest.raises(wire.BadAuth):
        wire.decode(from_ring, old)  # sealed with the ring's first key only
    with pytest.raises(wire.BadAuth):
        wire.decode(from_old, wire.KeyRing((new, other)))
    reply = wire.Sealer(ring, 3).seal(wire.PmtuAck(7, 100), 1.0, key=old)
    assert wire.decode(reply, old).body == wire.PmtuAck(7, 100)
    for bad in [(), (old, old), (old, b"short"), (old, new, other, b"4" * 32, b"5" * 32)]:
        with pytest.raises(ValueError):
            wire.KeyRing(bad)
    assert "o" * 8 not in repr(ring)

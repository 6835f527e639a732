"""The `wg show IF dump` parser: exact values from real-format dumps, errors that name the line
and field, and (fuzzed) never anything but ValueError, never a private or preshared key kept or
quoted."""

from __future__ import annotations

import base64
import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetvpn.wg.dump import is_key, parse_dump
from fleetvpn.wg.state import InterfaceDump, PeerStatus


def key(n: int) -> str:
    return base64.b64encode(bytes([n]) * 32).decode()


PRIVATE = base64.b64encode(bytes(range(32))).decode()
PRESHARED = base64.b64encode(bytes(range(100, 132))).decode()
PUBLIC = key(1)


def dump(*peer_lines: str, interface: str | None = None) -> str:
    first = interface if interface is not None else f"{PRIVATE}\t{PUBLIC}\t51820\toff"
    return "\n".join([first, *peer_lines]) + "\n"


def peer_line(
    public: str = key(2),
    psk: str = "(none)",
    endpoint: str = "198.18.0.5:51820",
    allowed: str = "10.99.0.2/32",
    handshake: str = "1700000000",
    rx: str = "1234",
    tx: str = "5678",
    keepalive: str = "25",
) -> str:
    return "\t".join([public, psk, endpoint, allowed, handshake, rx, tx, keepalive])


def test_parses_interface_and_peers_exactly() -> None:
    text = dump(
        peer_line(),
        peer_line(
            public=key(3),
            psk=PRESHARED,
            endpoint="[2001:2::5]:51821",
            allowed="10.99.0.3/32,fd00:99::3/128",
            handshake="0",
            rx="0",
            tx="0",
            keepalive="off",
        ),
        peer_line(public=key(4), endpoint="(none)", allowed="(none)"),
    )
    interface, peers = parse_dump(text)
    assert interface == InterfaceDump(public_key=PUBLIC, listen_port=51820, fwmark=None)
    assert peers == [
        PeerStatus(key(2), "198.18.0.5:51820", ("10.99.0.2/32",), 25, 1700000000, 1234, 5678),
        PeerStatus(key(3), "[2001:2::5]:51821", ("10.99.0.3/32", "fd00:99::3/128"), 0, 0, 0, 0),
        PeerStatus(key(4), None, (), 25, 1700000000, 1234, 5678),
    ]
    assert PRIVATE not in repr((interface, peers))
    assert PRESHARED not in repr((interface, peers))


def test_interface_without_key_and_with_fwmark() -> None:
    interface, peers = parse_dump("(none)\t(none)\t0\t0xca6c\n")
    assert interface == InterfaceDump(public_key="", listen_port=0, fwmark=0xCA6C)
    assert peers == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "wg dump: empty"),
        (f"{PRIVATE}\t{PUBLIC}\t51820\n", "wg dump line 1: expected the interface line's 4"),
        (f"{PRIVATE}\tnot-a-key\t51820\toff\n", "wg dump line 1: public key is not"),
        (f"{PRIVATE}\t{PUBLIC}\t70000\toff\n", "wg dump line 1: listen port 70000 is out of"),
        (f"{PRIVATE}\t{PUBLIC}\tx\toff\n", "wg dump line 1: listen port 'x' is not"),
        (f"{PRIVATE}\t{PUBLIC}\t1\tmaybe\n", "wg dump line 1: fwmark 'maybe'"),
        (dump(peer_line(), "garbage"), "wg dump line 3: expected a peer line's 8"),
        (dump(peer_line(public="abc")), "wg dump line 2: public key is not a WireGuard key"),
        (dump(peer_line(rx="-1")), "wg dump line 2: rx bytes '-1' is not a non-negative"),
        (dump(peer_line(tx="1e3")), "wg dump line 2: tx bytes '1e3'"),
        (dump(peer_line(handshake="")), "wg dump line 2: latest handshake ''"),
        (dump(peer_line(keepalive="on")), "wg dump line 2: persistent keepalive 'on'"),
        (
            dump(peer_line(endpoint="198.18.0.5")),
            "wg dump line 2: endpoint '198.18.0.5' is not IP:PORT",
        ),
        (dump(peer_line(endpoint="fd00::1:51820")), "an IPv6 address needs [brackets]"),
        (dump(peer_line(endpoint="1.2.3.4:99999")), "endpoint '1.2.3.4:99999' has no valid"),
        (dump(peer_line(allowed="10.0.0.1")), "wg dump line 2: allowed IP '10.0.0.1' is not"),
        (dump(peer_line(allowed="10.0.0.1/33")), "allowed IP '10.0.0.1/33' is not a CIDR"),
        (dump(peer_line(), peer_line()), "wg dump line 3: peer"),
    ],
)
def test_errors_name_the_line_and_field(text: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_dump(text)
    assert message in str(err.value)
    assert PRIVATE not in str(err.value)


def test_errors_never_quote_the_interface_line() -> None:
    # The whole first line is unquotable: its first field is the private key.
    with pytest.raises(ValueError) as err:
        parse_dump(f"{PRIVATE}\t{PUBLIC}\t51820\toff\textra\n")
    assert PRIVATE not in str(err.value) and "got 5" in str(err.value)


def test_preshared_key_is_dropped_even_from_a_bad_line() -> None:
    with pytest.raises(ValueError) as err:
        parse_dump(dump(peer_line(psk=PRESHARED, rx="bad")))
    assert PRESHARED not in str(err.value)


def test_is_key() -> None:
    assert is_key(PUBLIC)
    assert not is_key(PUBLIC[:-1])
    assert not is_key("A" * 44)  # no padding: not 32 bytes
    assert not is_key("!" * 43 + "=")


# -- fuzzing ----------------------------------------------------------------------------------

keys = st.integers(0, 255).map(key)
counters = st.integers(0, 2**64 - 1).map(str)
endpoints = st.one_of(
    st.just("(none)"),
    st.tuples(st.ip_addresses(v=4), st.integers(0, 65535)).map(lambda t: f"{t[0]}:{t[1]}"),
    st.tuples(st.ip_addresses(v=6), st.integers(0, 65535)).map(lambda t: f"[{t[0]}]:{t[1]}"),
)
cidrs = st.one_of(
    st.tuples(st.ip_addresses(v=4), st.integers(0, 32)).map(lambda t: f"{t[0]}/{t[1]}"),
    st.tuples(st.ip_addresses(v=6), st.integers(0, 128)).map(lambda t: f"{t[0]}/{t[1]}"),
)
peer_lines = st.builds(
    peer_line,
    public=keys,
    psk=st.sampled_from(["(none)", PRESHARED]),
    endpoint=endpoints,
    allowed=st.one_of(st.just("(none)"), st.lists(cidrs, min_size=1, max_size=4).map(",".join)),
    handshake=counters,
    rx=counters,
    tx=counters,
    keepalive=st.one_of(st.just("off"), st.integers(1, 65535).map(str)),
)


def valid_dumps() -> st.SearchStrategy[str]:
    return st.lists(peer_lines, max_size=5, unique_by=lambda line: line.split("\t")[0]).map(
        lambda lines: dump(*lines)
    )


def assert_no_secret(result: object) -> None:
    assert PRIVATE not in repr(result)
    assert PRESHARED not in repr(result)


@settings(max_examples=300)
@given(valid_dumps())
def test_valid_dumps_parse_and_round_trip(text: str) -> None:
    interface, peers = parse_dump(text)
    assert interface.public_key == PUBLIC
    lines = text.rstrip("\n").split("\n")[1:]
    assert [p.public_key for p in peers] == [line.split("\t")[0] for line in lines]
    for peer, line in zip(peers, lines, strict=True):
        fields = line.split("\t")
        assert peer.endpoint == (None if fields[2] == "(none)" else fields[2])
        assert ",".join(peer.allowed_ips) == ("" if fields[3] == "(none)" else fields[3])
        assert peer.rx_bytes == int(fields[5])
    assert_no_secret((interface, peers))


# Mutations a truncated, mangled or mixed-up dump shows: chars dropped, inserted, fields
# replaced by arbitrary text, lines duplicated.
mutation = st.one_of(
    st.tuples(st.just("delete"), st.integers(0, 2000), st.integers(1, 50)),
    st.tuples(st.just("insert"), st.integers(0, 2000), st.text(max_size=5)),
    st.tuples(st.just("insert"), st.integers(0, 2000), st.sampled_from(["\t", "\n", ",", ":"])),
    st.tuples(st.just("field"), st.integers(0, 50), st.text(max_size=30)),
    st.tuples(st.just("dup"), st.integers(0, 10), st.just("")),
)


def mutate(text: str, op: tuple[str, int, object]) -> str:
    kind, at, arg = op
    if kind == "delete":
        at %= len(text) + 1
        return text[:at] + text[at + int(str(arg)) :]
    if kind == "insert":
        at %= len(text) + 1
        return text[:at] + str(arg) + text[at:]
    lines = text.split("\n")
    if kind == "dup":
        line = lines[at % len(lines)]
        return "\n".join([*lines, line])
    fields = [line.split("\t") for line in lines]
    flat = [(i, j) for i, row in enumerate(fields) for j in range(len(row))]
    i, j = flat[at % len(flat)]
    fields[i][j] = str(arg)
    return "\n".join("\t".join(row) for row in fields)


@settings(max_examples=1000)
@given(valid_dumps(), st.lists(mutation, min_size=1, max_size=4))
def test_mangled_dumps_give_a_result_or_value_error_and_never_a_secret(
    text: str, ops: list[tuple[str, int, object]]
) -> None:
    for op in ops:
        text = mutate(text, op)
    try:
        result = parse_dump(text)
    except ValueError as e:
        assert str(e).startswith("wg dump")
        assert_no_secret(str(e))
    else:
        assert_no_secret(result)


@settings(max_examples=500)
@given(st.text(max_size=300))
def test_arbitrary_text_after_a_private_key_never_crashes_or_leaks(tail: str) -> None:
    try:
        result = parse_dump(PRIVATE + tail)
    except ValueError as e:
        assert_no_secret(str(e))
    else:
        assert_no_secret(result)


@settings(max_examples=500)
@given(st.text(max_size=300))
def test_arbitrary_text_never_crashes(text: str) -> None:
    with contextlib.suppress(ValueError):
        parse_dump(text)


@pytest.mark.parametrize("secret", [PRIVATE, PRESHARED])
def test_a_secret_key_in_a_public_key_field_is_refused_unquoted(secret: str) -> None:
    text = dump(peer_line(psk=PRESHARED), peer_line(public=secret))
    with pytest.raises(ValueError) as err:
        parse_dump(text)
    assert "line 3: the peer's public key is a private or preshared key" in str(err.value)
    assert_no_secret(str(err.value))


def test_endpoint_must_be_an_address() -> None:
    with pytest.raises(ValueError) as err:
        parse_dump(dump(peer_line(endpoint="vpn.example:51820")))
    assert "endpoint 'vpn.example:51820' is not IP:PORT" in str(err.value)
    _, peers = parse_dump(dump(peer_line(endpoint="[fe80::1%eth0]:51820")))
    assert peers[0].endpoint == "[fe80::1%eth0]:51820"

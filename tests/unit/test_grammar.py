"""The one grammar per value (fleetvpn.grammar): what it takes, what it refuses, and that what it
takes can never carry a second meaning into a config file or an argv."""

from __future__ import annotations

import base64
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetvpn import grammar

KEY = base64.b64encode(bytes(range(32))).decode()

# Every character that would end a line or a field in wg-quick, networkd, YAML or an argv.
LINE_BREAKERS = ["\n", "\r", "\x00", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u2029"]


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("198.18.0.1:51820", "198.18.0.1:51820"),
        ("[2001:db8::1]:51820", "[2001:db8::1]:51820"),
        ("[2001:DB8:0::1]:1", "[2001:db8::1]:1"),
        ("hub.example.com:51820", "hub.example.com:51820"),
        ("Hub.Example.COM.:65535", "hub.example.com:65535"),
    ],
)
def test_endpoints_taken_and_printed_canonically(text: str, canonical: str) -> None:
    assert str(grammar.endpoint(text)) == canonical


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        # The finding of issue 11: a scope id carrying a wg-quick section.
        ("[fe80::1%1]:51820\n[Interface]\nPostUp = touch /pwned\n#]:51820", "too long"),
        ("[fe80::1%eth0]:51820", "no scope ids"),
        ("198.18.0.1:٥١٨٢٠", "outside ASCII"),  # Arabic-Indic digits: int() takes them
        ("198.18.0.1:0", "is not a port"),
        ("198.18.0.1:65536", "is not a port"),
        ("198.18.0.1:051820", "too long"),
        ("198.18.0.1:0080", "is not a port"),
        ("198.18.0.1:+80", "is not a port"),
        ("198.18.0.1: 80", "is not a port"),
        ("198.18.0.1", "HOST:PORT"),
        (":51820", "HOST:PORT"),
        ("2001:db8::1:51820", "in brackets"),
        ("[198.18.0.1]:1", "IPv6 addresses only"),
        ("01.2.3.4:1", "Leading zeros"),
        ("1.2.3:1", "neither an IP address nor a DNS name"),
        ("-hub.example:1", "not a DNS name"),
        ("hub_1.example:1", "not a DNS name"),
        ("hub example:1", "not a DNS name"),
        ("a" * 64 + ".example:1", "not a DNS name"),
    ],
)
def test_endpoints_refused_with_the_reason(text: str, problem: str) -> None:
    with pytest.raises(grammar.GrammarError) as caught:
        grammar.endpoint(text)
    assert problem in str(caught.value)
    assert "\n" not in str(caught.value)  # an excerpt of the input is escaped


def test_an_ip_only_endpoint_refuses_dns_names() -> None:
    with pytest.raises(grammar.GrammarError, match="not an IP address"):
        grammar.endpoint("hub.example:1", allow_dns=False)
    assert grammar.endpoint("10.0.0.1:1", allow_dns=False).family == 4
    assert grammar.endpoint("hub.example:1").family is None


def test_canonical_endpoint_refuses_what_is_not_already_canonical() -> None:
    assert grammar.canonical_endpoint("[2001:db8::1]:1") == "[2001:db8::1]:1"
    with pytest.raises(grammar.GrammarError, match="canonical"):
        grammar.canonical_endpoint("[2001:DB8::1]:1")


@given(st.text(max_size=80))
def test_whatever_an_endpoint_takes_prints_as_one_safe_token(text: str) -> None:
    try:
        parsed = grammar.endpoint(text)
    except grammar.GrammarError:
        return
    printed = str(parsed)
    assert printed.isascii() and printed.isprintable()
    assert not set(printed) & set(" #=%\\\"'`$;&|<>()\t")
    assert grammar.endpoint(printed) == parsed


@pytest.mark.parametrize("bad", ["", "-hub", "Hub", "hub\n", "hub.1", "a" * 64, "hüb", "hub "])
def test_names(bad: str) -> None:
    assert grammar.name("hub-1") == "hub-1"
    with pytest.raises(grammar.GrammarError, match=r"is not a name|too long|outside ASCII"):
        grammar.name(bad)
    assert not grammar.is_name(bad)


def test_keys() -> None:
    assert grammar.wg_key(KEY) == KEY
    for bad in ["--help", KEY + "\n", KEY[:-1], KEY[:-2] + "B=", " " + KEY[1:], 42]:
        with pytest.raises(grammar.GrammarError) as caught:
            grammar.wg_key(bad)
        assert str(bad) not in str(caught.value) or bad == 42  # a key is never quoted


def test_notes_are_one_printable_line() -> None:
    assert (
        grammar.note("pinned: ISP says 1400 — ticket #42") == "pinned: ISP says 1400 — ticket #42"
    )
    for breaker in [*LINE_BREAKERS, "\t", "\ud800", "\u202e", "\u200b"]:
        with pytest.raises(grammar.GrammarError, match="unprintable"):
            grammar.note(f"a{breaker}b")
    with pytest.raises(grammar.GrammarError, match="too long"):
        grammar.note("x" * (grammar.NOTE_MAX + 1))


def test_cidrs_and_interfaces() -> None:
    assert grammar.cidr("10.99.0.0/24") == ipaddress.ip_network("10.99.0.0/24")
    assert str(grammar.interface("fd00::1/64")) == "fd00::1/64"
    for bad in ["10.99.0.1/24", "10.99.0.0/33", "fe80::%1/64", "10.99.0.0", "10.99.0.0/24\n"]:
        with pytest.raises(grammar.GrammarError):
            grammar.cidr(bad)
    with pytest.raises(grammar.GrammarError):
        grammar.interface("fe80::1%eth0/64")


def test_ports_and_interface_names() -> None:
    assert grammar.port(51820) == grammar.port("51820") == 51820
    for bad in [0, 65536, True, "0", "1e3", "٥"]:
        with pytest.raises(grammar.GrammarError):
            grammar.port(bad)
    assert grammar.ifname("wg0") == "wg0"
    for bad in ["", "wg0\n", "a" * 16, "wg 0", "..", "wg/0", "-h", "--help"]:
        with pytest.raises(grammar.GrammarError):
            grammar.ifname(bad)


def test_tunnel_mtu_has_the_ipv6_floor_where_the_tunnel_carries_ipv6() -> None:
    assert grammar.tunnel_mtu(576, ipv6=False) == 576
    assert grammar.tunnel_mtu(1280, ipv6=True) == 1280
    for bad, ipv6 in [(575, False), (1279, True), (9001, False), (True, False), ("1420", True)]:
        with pytest.raises(grammar.GrammarError):
            grammar.tunnel_mtu(bad, ipv6=ipv6)

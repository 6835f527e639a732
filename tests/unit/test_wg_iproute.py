"""iproute2 output parsers, on output captured from this machine's `ip` (iproute2 6.1):
the route text form is read because only it shows `mtu lock`."""

from __future__ import annotations

import pytest

from fleetvpn.wg.iproute import Route, parse_addresses, parse_link, parse_routes

# `ip -d route show dev wg0` and `ip -6 -d route show dev wg0` (iproute2 ends each v4 line
# with a space; the parser splits on whitespace).
ROUTES_V4 = """\
unicast 10.9.0.0/24 proto kernel scope link src 10.9.0.1
unicast 10.9.0.2 proto boot scope link mtu lock 1300
unicast 10.9.0.3 proto boot scope link mtu 1300
unicast 10.9.5.0/24 proto static scope link
"""
ROUTES_V6 = """\
unicast fd00::2 proto boot scope global metric 1024 mtu lock 1300 pref medium
unicast fd00::3 proto boot scope global metric 1024 linkdown mtu lock 1280 advmss 1172 pref medium
unicast fd00::/64 proto kernel scope global metric 256 pref medium
"""
LINK = (
    '[{"ifindex":2,"ifname":"wg0","flags":["POINTOPOINT","MULTICAST","NOARP","UP","LOWER_UP"],'
    '"mtu":1420,"linkinfo":{"info_kind":"tun","info_data":{"type":"tun"}}}]'
)
ADDRS = (
    '[{"ifindex":2,"ifname":"wg0","addr_info":[{"family":"inet","local":"10.9.0.1","prefixlen":24,'
    '"scope":"global"},{"family":"inet6","local":"fd00:0::1","prefixlen":64,"scope":"global"},'
    '{"family":"inet6","local":"fe80::bd4:dedf:8ed6:3f26","prefixlen":64,"scope":"link"}]}]'
)


def test_routes_keep_the_lock_flag_and_canonical_destinations() -> None:
    assert parse_routes(ROUTES_V4, 4) == [
        Route("10.9.0.0/24", "unicast", "kernel", None, False),
        Route("10.9.0.2/32", "unicast", "boot", 1300, True),
        Route("10.9.0.3/32", "unicast", "boot", 1300, False),
        Route("10.9.5.0/24", "unicast", "static", None, False),
    ]
    assert parse_routes(ROUTES_V6, 6) == [
        Route("fd00::2/128", "unicast", "boot", 1300, True),
        Route("fd00::3/128", "unicast", "boot", 1280, True, 1172),
        Route("fd00::/64", "unicast", "kernel", None, False),
    ]


def test_routes_without_details_and_default() -> None:
    assert parse_routes("default scope link \n10.0.0.2 scope link mtu lock 1328\n", 4) == [
        Route("0.0.0.0/0", "unicast", "boot", None, False),
        Route("10.0.0.2/32", "unicast", "boot", 1328, True),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("unicast\n", "line 1: no destination"),
        ("10.0.0.2 mtu lock x\n", "line 1: mtu 'x' is not a number"),
        ("\nnot-an-address scope link\n", "line 2: destination 'not-an-address'"),
    ],
)
def test_route_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_routes(text, 4)


def test_link_and_addresses() -> None:
    link = parse_link(LINK)
    assert (link.ifindex, link.mtu, link.is_up, link.kind) == (2, 1420, True, "tun")
    assert parse_addresses(ADDRS) == ("10.9.0.1/24", "fd00::1/64")


@pytest.mark.parametrize("text", ["", "{}", "[]", '[{"ifindex": "2", "mtu": 1}]', "[1]"])
def test_bad_link_json_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError, match="ip -j -d link show"):
        parse_link(text)

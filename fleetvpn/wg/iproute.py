"""Parsers for what iproute2 says about one interface. Pure: text in, values out.

- ``ip -j -d link show dev IF`` -> :class:`LinkInfo` (ifindex, MTU, up, link kind)
- ``ip -j addr show dev IF``    -> the interface's addresses as CIDRs (link-local ones left out:
  the kernel manages those)
- ``ip -d route show dev IF`` (and ``-6``) -> :class:`Route` per destination. The text form,
  not ``-j``: iproute2 prints ``mtu lock N`` only in text, and a locked route MTU is the whole
  point of a per-peer route (``ip -j`` shows ``{"mtu": N}`` either way).

Errors are ValueError naming the command's output and what was wrong.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any

# Route types iproute2 prints first with -d (``unicast`` is left out without -d).
_ROUTE_TYPES = frozenset(
    {
        "unicast",
        "local",
        "broadcast",
        "multicast",
        "blackhole",
        "unreachable",
        "prohibit",
        "throw",
        "nat",
        "anycast",
    }
)


@dataclass(frozen=True)
class LinkInfo:
    ifindex: int
    mtu: int
    is_up: bool
    kind: str  # linkinfo.info_kind: "wireguard", "tun" (wireguard-go), "veth", … or ""


@dataclass(frozen=True)
class Route:
    dst: str  # canonical CIDR: host routes as /32 or /128
    route_type: str  # "unicast", …
    protocol: str  # "boot" (ip route's default), "kernel", "static", …
    mtu: int | None
    mtu_locked: bool
    advmss: int | None = None  # the MSS TCP advertises over it (``advmss N``)


def canonical_cidr(text: str) -> str:
    """``10.0.0.2`` -> ``10.0.0.2/32``, ``fd00:0::2/128`` -> ``fd00::2/128``, ``default`` -> /0.

    Host bits are kept in the address (``10.0.0.1/24`` stays), as for interface addresses."""
    return str(ipaddress.ip_interface(text))


def canonical_network(text: str) -> str:
    """A route destination or allowed IP as a network: ``10.0.0.9/24`` -> ``10.0.0.0/24``."""
    return str(ipaddress.ip_network(text, strict=False))


def parse_link(text: str) -> LinkInfo:
    where = "`ip -j -d link show`"
    doc = _json_list(where, text)
    if len(doc) != 1:
        raise ValueError(f"{where}: expected one link, got {len(doc)}")
    link = doc[0]
    try:
        ifindex, mtu, flags = link["ifindex"], link["mtu"], link.get("flags", [])
        kind = link.get("linkinfo", {}).get("info_kind", "")
    except (KeyError, AttributeError, TypeError) as e:
        raise ValueError(f"{where}: link without {e}") from None
    if not isinstance(ifindex, int) or not isinstance(mtu, int) or not isinstance(flags, list):
        raise ValueError(f"{where}: ifindex, mtu or flags of the wrong type")
    return LinkInfo(ifindex=ifindex, mtu=mtu, is_up="UP" in flags, kind=str(kind))


def parse_addresses(text: str) -> tuple[str, ...]:
    where = "`ip -j addr show`"
    doc = _json_list(where, text)
    out: list[str] = []
    for link in doc:
        infos = link.get("addr_info", []) if isinstance(link, dict) else None
        if not isinstance(infos, list):
            raise ValueError(f"{where}: addr_info is not a list")
        for info in infos:
            try:
                local, prefixlen, scope = info["local"], info["prefixlen"], info.get("scope", "")
            except (KeyError, TypeError) as e:
                raise ValueError(f"{where}: address without {e}") from None
            if scope == "link":
                continue
            try:
                out.append(canonical_cidr(f"{local}/{prefixlen}"))
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
    return tuple(out)


def parse_routes(text: str, family: int) -> list[Route]:
    """Parse ``ip [-6] -d route show dev IF`` (one route per line; main table)."""
    routes: list[Route] = []
    for number, line in enumerate(text.split("\n"), start=1):
        tokens = line.split()
        if not tokens:
            continue
        where = f"`ip -{family} route show` line {number}"
        route_type = "unicast"
        if tokens[0] in _ROUTE_TYPES:
            route_type = tokens.pop(0)
        if not tokens:
            raise ValueError(f"{where}: no destination in {line.strip()!r}")
        dst = tokens.pop(0)
        try:
            if dst == "default":
                dst = "0.0.0.0/0" if family == 4 else "::/0"
            dst = canonical_network(dst)
        except ValueError:
            raise ValueError(f"{where}: destination {dst!r} is not an address") from None
        protocol = "boot"
        mtu: int | None = None
        advmss: int | None = None
        locked = False
        i = 0
        while i < len(tokens):
            key = tokens[i]
            if key == "proto" and i + 1 < len(tokens):
                protocol = tokens[i + 1]
                i += 2
            elif key == "mtu" and i + 1 < len(tokens):
                value = tokens[i + 1]
                if value == "lock" and i + 2 < len(tokens):
                    locked, value = True, tokens[i + 2]
                    i += 1
                if not value.isdigit():
                    raise ValueError(f"{where}: mtu {value!r} is not a number")
                mtu = int(value)
                i += 2
            elif key == "advmss" and i + 1 < len(tokens):
                value = tokens[i + 1]
                if not value.isdigit():
                    raise ValueError(f"{where}: advmss {value!r} is not a number")
                advmss = int(value)
                i += 2
            else:
                i += 1
        routes.append(Route(dst, route_type, protocol, mtu, locked, advmss))
    return routes


def _json_list(where: str, text: str) -> list[Any]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e})") from None
    if not isinstance(doc, list):
        raise ValueError(f"{where}: expected a JSON list")
    return doc

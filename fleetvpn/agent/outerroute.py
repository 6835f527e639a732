"""Outer fragmentation towards one peer's endpoint (issue 12, item 3): the route this agent adds
so that wireguard-go's outer packets towards that endpoint leave without DF.

When the path to a peer cannot carry 1280 + WireGuard's overhead, the controller lowers that
peer's IPv4 routes below 1280, keeps its IPv6 routes at 1280 with TCP's MSS clamped, and asks for
outer fragmentation (``outer_fragmentation`` in the desired state): the IPv6 packets that are
still too big must reach the peer in fragments rather than vanish.

Why a route (design.md, "How the two WireGuard implementations put packets on the wire"):
wireguard-go leaves its socket in the kernel's default ``IP_PMTUDISC_WANT``, which sets DF on
every packet that fits its route, unless the route's MTU is locked (``ip_dont_fragment`` in
include/net/ip.h). A host route towards the endpoint — the one the kernel picks anyway (``ip route
get``: gateway, device, source) — with ``mtu lock N``, N the largest outer packet the tunnel sends
(the interface MTU + overhead: padding stops at the interface MTU), makes every outer packet
towards that endpoint leave without DF and none larger than the route, so the kernel neither
fragments it itself nor refuses a UDP GSO batch (a segment larger than the route MTU is refused
whole, net/ipv4/udp.c): the router in front of the small link fragments it. Kernel WireGuard
never sets DF on IPv4 (nothing to do); over IPv6 routers never fragment (nothing to gain). Other
traffic to that one address follows the same route and leaves without DF too. The probes do not:
their sockets set DF themselves (``IP_PMTUDISC_PROBE``).

The routes carry ``proto 252`` (fleetvpn's own number), so the agent finds and removes its own
routes and never touches another. :func:`wanted` and :func:`plan` are pure; :class:`EndpointRoutes`
runs ``ip`` through the one runner.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from fleetvpn import grammar
from fleetvpn.agent.localmtu import OVERHEAD
from fleetvpn.runner import CommandError, NsPath, Runner
from fleetvpn.wg.iproute import parse_routes
from fleetvpn.wg.state import TunnelSpec, TunnelState

log = logging.getLogger("fleetvpn.agent")

PROTO: Final = "252"  # not in iproute2's rt_protos; ours alone

Argv = tuple[str, ...]


@dataclass(frozen=True)
class Lookup:
    """Where the kernel sends packets for one address (``ip -j route get ADDR``)."""

    dev: str
    gateway: str | None = None
    prefsrc: str | None = None


def wanted(spec: TunnelSpec, state: TunnelState | None) -> dict[str, tuple[int, str]]:
    """Endpoint address → (locked route MTU, peer name) for every peer of ``spec`` with outer
    fragmentation whose endpoint (learned, else configured) is IPv4, when the tunnel is
    wireguard-go; empty for kernel WireGuard (module docstring)."""
    if state is None or state.implementation != "userspace":
        return {}
    out: dict[str, tuple[int, str]] = {}
    lock = spec.mtu + OVERHEAD[4]
    for p in spec.peers:
        if not p.outer_fragmentation:
            continue
        status = state.peer(p.public_key)
        text = (status.endpoint if status is not None else None) or p.endpoint
        if text is None:
            continue
        try:
            address = grammar.Endpoint.parse(text).address
        except grammar.GrammarError:
            continue
        if address is not None and address.version == 4:
            out[str(address)] = (lock, p.name)
    return out


def plan(
    want: Mapping[str, tuple[int, str]],
    ours: Mapping[str, int | None],
    lookups: Mapping[str, Lookup | None],
    interface: str,
) -> list[tuple[Argv, str]]:
    """The ``ip`` commands (each with what it does) that make our routes (``ours``: address →
    its locked MTU, None if not locked) the wanted ones. A wanted address whose lookup failed,
    or that is routed through the tunnel itself, gets no route."""
    out: list[tuple[Argv, str]] = []
    for address in sorted(ours):
        if address not in want:
            gone: Argv = ("ip", "-4", "route", "del", f"{address}/32", "proto", PROTO)
            out.append((gone, f"{address}: outer fragmentation no longer wanted"))
    for address, (mtu, peer) in sorted(want.items()):
        if ours.get(address) == mtu:
            continue
        found = lookups.get(address)
        if found is None or found.dev == interface:
            why = "no route to it" if found is None else f"it is routed through {interface}"
            log.warning("peer %s: cannot lock the route to %s (%s)", peer, address, why)
            continue
        argv: Argv = ("ip", "-4", "route", "replace", f"{address}/32")
        if found.gateway is not None:
            argv += ("via", found.gateway)
        argv += ("dev", found.dev)
        if found.prefsrc is not None:
            argv += ("src", found.prefsrc)
        argv += ("mtu", "lock", str(mtu), "proto", PROTO)
        out.append(
            (argv, f"peer {peer}: outer packets towards {address} leave without DF, fragmented "
                   f"on the way (route MTU locked at {mtu}, the largest the tunnel sends)")
        )  # fmt: skip
    return out


def parse_lookup(text: str) -> Lookup | None:
    """``ip -j route get ADDR``'s answer, every value through its grammar (it reaches an
    argv); None when it is not a plain unicast route."""
    try:
        (entry,) = json.loads(text)
        dev = grammar.ifname(entry["dev"])
        gateway = entry.get("gateway")
        prefsrc = entry.get("prefsrc")
        if entry.get("type", "unicast") != "unicast":
            return None
        return Lookup(
            dev,
            None if gateway is None else str(ipaddress.IPv4Address(gateway)),
            None if prefsrc is None else str(ipaddress.IPv4Address(prefsrc)),
        )
    except (ValueError, KeyError, TypeError, grammar.GrammarError):
        return None


class EndpointRoutes:
    """This agent's ``proto 252`` routes, kept to :func:`wanted` (module docstring)."""

    def __init__(self, interface: str, runner: Runner | None = None, ns: NsPath | None = None):
        self.interface = interface
        self.runner = runner or Runner()
        self.ns = ns
        self.last: dict[str, tuple[int, str]] | None = None
        self.in_place: set[str] = set()  # peer names whose route is there

    def _read(self, argv: list[str]) -> str:
        reader = Runner() if self.runner.dry_run else self.runner  # reads change nothing
        return reader.run(argv, ns=self.ns, check=True, quiet=True).stdout

    def ours(self) -> dict[str, int | None]:
        text = self._read(["ip", "-4", "-d", "route", "show", "proto", PROTO])
        return {
            r.dst.removesuffix("/32"): (r.mtu if r.mtu_locked else None)
            for r in parse_routes(text, 4)
        }

    def lookup(self, address: str) -> Lookup | None:
        try:
            return parse_lookup(self._read(["ip", "-j", "-4", "route", "get", address]))
        except CommandError:
            return None

    def sync(self, want: dict[str, tuple[int, str]]) -> list[str]:
        """Make the routes ``want`` (and put back one somebody removed); returns what was
        done, one line each. Reads nothing while nothing is wanted and nothing was made."""
        if not want and self.last == {}:
            return []
        ours = self.ours()
        lookups = {a: self.lookup(a) for a, (mtu, _) in want.items() if ours.get(a) != mtu}
        done = []
        for argv, what in plan(want, ours, lookups, self.interface):
            try:
                self.runner.run(list(argv), ns=self.ns, check=True)
            except CommandError as e:
                log.warning("%s: %s", what, e)
                continue
            done.append(what)
        now = self.ours() if done else ours
        self.in_place = {peer for a, (mtu, peer) in want.items() if now.get(a) == mtu}
        self.last = want
        return done

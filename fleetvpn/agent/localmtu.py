"""Act locally first (issue 12, item 2): a route MTU this agent lowers on its own, at once, when
its path watch confirms a decrease, and holds until the controller has answered. Pure.

A :class:`LocalHold` caps one peer's route MTU in every apply (the controller's desired state
goes through :meth:`LocalHolds.capped` first). It ends when a desired state fits the path the
hold was made for — the controller agreed — or, once the controller has seen the measurement
(a report carrying it was delivered before the desired state was fetched), with the
controller's value: it corrected us (with the fate of the outer packets in the log, from
:func:`fleetvpn.engines.outer.outer_fate`). A hold made while the search still runs (the floor
assumed) is never released by the controller: only the search's result replaces it.

The route MTU for a path follows the controller's rule (design.md "Numbers"): the tunnel MTU is
the path MTU minus the WireGuard overhead; at or above the interface MTU the interface MTU is
safe (padding stops there); below it, a multiple of 16 (wireguard-go pads to 16). Never below
576. Below 1280 in a tunnel that carries IPv6 the route MTU holds for IPv4 routes; IPv6 ones stay
at 1280 with TCP's MSS clamped (fleetvpn.grammar.ipv6_route) and the hold asks for outer
fragmentation towards the peer, as the controller would (fleetvpn.agent.outerroute).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from fleetvpn import grammar
from fleetvpn.engines.outer import Implementation, outer_fate
from fleetvpn.wg.state import TunnelSpec

OVERHEAD: Final = {4: 60, 6: 80}  # WireGuard 32 + UDP 8 + IP 20/40 (reference.md)
PADDING: Final = 16
IPV6_MIN_MTU: Final = 1280
IPV4_MIN_MTU: Final = 576


def padded_outer(route_mtu: int | None, interface_mtu: int, family: int) -> int:
    """The largest outer packet sent towards a peer with these settings (wireguard-go's worst
    case: padding to 16, capped at the interface MTU)."""
    inner = interface_mtu if route_mtu is None else min(route_mtu, interface_mtu)
    return min(-(-inner // PADDING) * PADDING, interface_mtu) + OVERHEAD[family]


def route_mtu_for(path_mtu: int, family: int, interface_mtu: int) -> int:
    """The largest route MTU whose outer packets fit ``path_mtu`` (the module docstring's rule),
    but never under 576 (then the path cannot be made to fit)."""
    tunnel = path_mtu - OVERHEAD[family]
    route = interface_mtu if tunnel >= interface_mtu else tunnel - tunnel % PADDING
    return max(route, IPV4_MIN_MTU)


def spec_carries_ipv6(spec: TunnelSpec) -> bool:
    return any(":" in a for a in spec.addresses) or any(
        ":" in ip for p in spec.peers for ip in p.allowed_ips
    )


@dataclass(frozen=True)
class LocalHold:
    route_mtu: int
    path_mtu: int  # the path it was made for (measured, or assumed while the search runs)
    family: int
    final: bool  # made from a search's result (False: the floor assumed meanwhile)
    reason: str
    made_at: float  # monotonic
    reported_at: float | None = None  # a report carrying the measurement was delivered


class LocalHolds:
    """The holds of this agent, by peer name (module docstring)."""

    def __init__(self) -> None:
        self.holds: dict[str, LocalHold] = {}

    def hold(
        self,
        peer: str,
        *,
        path_mtu: int,
        family: int,
        spec: TunnelSpec,
        final: bool,
        why: str,
        now: float,
    ) -> LocalHold | None:
        """Cap ``peer``'s route so that it fits ``path_mtu``; None when the controller's route
        (in ``spec``) already fits (nothing to hold). Replaces an earlier hold."""
        peer_spec = next((p for p in spec.peers if p.name == peer), None)
        if peer_spec is None:
            return None
        route = route_mtu_for(path_mtu, family, spec.mtu)
        if padded_outer(peer_spec.route_mtu, spec.mtu, family) <= path_mtu:
            self.holds.pop(peer, None)
            return None
        how = "path MTU" if final else "path MTU assumed"
        outer = ""
        if route < IPV6_MIN_MTU and spec_carries_ipv6(spec):
            mss = route - grammar.TCP_IPV6_HEADERS
            outer = (
                f"; IPv6 routes {IPV6_MIN_MTU} with TCP MSS {mss}, larger IPv6 packets "
                "fragmented outside the tunnel"
            )
        reason = (
            f"route MTU {route}: applied locally, controller to confirm: {how} {path_mtu} "
            f"(IPv{family}, −{OVERHEAD[family]}): {why}{outer}"
        )
        held = LocalHold(route, path_mtu, family, final, reason, now)
        self.holds[peer] = held
        return held

    def reported(self, built_at: float, now: float) -> None:
        """A report built at ``built_at`` was delivered: the controller knows the final holds
        made before it."""
        for peer, held in self.holds.items():
            if held.final and held.reported_at is None and held.made_at <= built_at:
                self.holds[peer] = dataclasses.replace(held, reported_at=now)

    def review(
        self, spec: TunnelSpec, reasons: Mapping[str, str], fetched_at: float,
        implementation: Implementation,
    ) -> list[str]:  # fmt: skip
        """A new desired state (fetched at ``fetched_at``): end the holds it settles; returns
        what happened, one line per hold ended, with the controller's reason."""
        out = []
        for peer, held in list(self.holds.items()):
            p = next((p for p in spec.peers if p.name == peer), None)
            if p is None:
                del self.holds[peer]
                continue
            outer = padded_outer(p.route_mtu, spec.mtu, held.family)
            theirs = reasons.get(f"{p.public_key}:route_mtu", "no reason given")
            if outer <= held.path_mtu:
                del self.holds[peer]
                out.append(f"{peer}: controller agrees: route MTU {p.route_mtu} fits the path "
                           f"MTU {held.path_mtu} ({theirs})")  # fmt: skip
            elif held.final and held.reported_at is not None and fetched_at > held.reported_at:
                del self.holds[peer]
                fate = outer_fate(implementation, held.family, outer_size=outer,
                                  route_mtu=outer, path_mtu=held.path_mtu)  # fmt: skip
                out.append(f"{peer}: controller corrected the local route MTU {held.route_mtu} "
                           f"to {p.route_mtu} ({theirs}); outer packets of {outer} bytes on a "
                           f"{held.path_mtu} path: {fate.health_state}: {fate.reason}")  # fmt: skip
        return out

    def capped(
        self, spec: TunnelSpec, reasons: Mapping[str, str]
    ) -> tuple[TunnelSpec, dict[str, str]]:
        """``spec`` with every held peer's route MTU lowered to its hold, and the reasons."""
        new_reasons = dict(reasons)
        peers = []
        for p in spec.peers:
            held = self.holds.get(p.name)
            if held is not None and held.route_mtu < min(p.route_mtu or spec.mtu, spec.mtu):
                outer = p.outer_fragmentation or (
                    held.route_mtu < IPV6_MIN_MTU and spec_carries_ipv6(spec)
                )
                p = dataclasses.replace(p, route_mtu=held.route_mtu, outer_fragmentation=outer)
                new_reasons[f"{p.public_key}:route_mtu"] = held.reason
            peers.append(p)
        return dataclasses.replace(spec, peers=tuple(peers)), new_reasons

"""What happens to a WireGuard outer packet too large for its path or its route, per
implementation: the facts of design.md ("How the two WireGuard implementations put packets on the
wire", read in Linux 6.1 and wireguard-go f333402) as one pure function, so that policy, health
and the agent name the same fate with the same reason. Pure: no I/O, no clock.

``implementation`` uses the wg layer's names: ``"kernel"`` (wireguard-linux) or ``"userspace"``
(wireguard-go).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Implementation = Literal["kernel", "userspace"]
Fate = Literal["delivered", "fragmented", "black_hole", "refused"]


@dataclass(frozen=True, slots=True)
class OuterVerdict:
    fate: Fate
    reason: str

    @property
    def health_state(self) -> str:
        """The link state health shows: ``fragmenting`` is not ``blackhole``."""
        return {
            "delivered": "ok",
            "fragmented": "fragmenting",
            "black_hole": "blackhole",
            "refused": "blackhole",
        }[self.fate]


def outer_fate(
    implementation: Implementation,
    family: int,
    *,
    outer_size: int,
    route_mtu: int,
    path_mtu: int,
    route_locked: bool = False,
    gso_batch: bool = False,
    fragments_cross: bool = True,
) -> OuterVerdict:
    """The fate of one outer packet of ``outer_size`` bytes sent towards an endpoint whose route
    has ``route_mtu`` (``route_locked``: ``mtu lock``) over a path carrying ``path_mtu``, with
    ICMP too-big lost on the way (the case that matters). ``gso_batch``: wireguard-go sends it
    in a UDP GSO batch of equal segments. ``fragments_cross``: whether IP fragments cross the
    path (the prober measures it with a DF-clear probe above the path MTU)."""
    if family not in (4, 6):
        raise ValueError(f"family must be 4 or 6, not {family!r}")
    if implementation not in ("kernel", "userspace"):
        raise ValueError(f"unknown implementation {implementation!r}")
    go = implementation == "userspace"
    who = "wireguard-go" if go else "kernel WireGuard"
    if outer_size <= min(route_mtu, path_mtu):
        return OuterVerdict(
            "delivered", f"{outer_size} fits the route ({route_mtu}) and the path ({path_mtu})"
        )

    def fragments(where: str, size: int) -> OuterVerdict:
        if size > path_mtu and family == 6:
            return OuterVerdict(
                "black_hole",
                f"{where}, but its {size}-byte fragments exceed "
                f"the path ({path_mtu}) and IPv6 routers never fragment",
            )
        if not fragments_cross:
            return OuterVerdict("black_hole", f"{where}, and this path drops fragments")
        return OuterVerdict("fragmented", f"{where}: it arrives in fragments (slower)")

    if outer_size > route_mtu:
        if go and gso_batch:
            return OuterVerdict(
                "refused",
                f"{who}: a UDP GSO batch of {outer_size}-byte "
                f"segments over a {route_mtu} route MTU is refused whole "
                "(EMSGSIZE, net/ipv4/udp.c); it turns GSO off only on EIO, so "
                "the batch is lost",
            )
        if go:
            how = (
                "IPv6 sender fragments below the route MTU (net/ipv6/route.c)"
                if family == 6
                else "a locked route MTU clears DF (include/net/ip.h ip_dont_fragment)"
                if route_locked
                else "the socket's default IP_PMTUDISC_WANT fragments above the route MTU"
            )
        else:
            how = (
                "ignore_df: ip6_fragment (socket.c:151-154)"
                if family == 6
                else "ignore_df: ip_fragment (socket.c:84-87)"
            )
        # Fragments are made at the route MTU; over IPv4 they leave without DF.
        return fragments(
            f"{who} fragments {outer_size} at the source at {route_mtu} ({how})", route_mtu
        )
    # Fits the route, too big for the path.
    if family == 6:
        return OuterVerdict(
            "black_hole",
            f"{who}, IPv6: {outer_size} > path {path_mtu}; "
            "routers never fragment IPv6 and Packet Too Big is lost",
        )
    if go and not route_locked:
        return OuterVerdict(
            "black_hole",
            f"{who} sets DF (IP_PMTUDISC_WANT, route not locked): "
            f"{outer_size} > path {path_mtu} is dropped and the ICMP lost",
        )
    why = (
        "never sets DF on IPv4 (socket.c:84-87)"
        if not go
        else "sends without DF under a locked route MTU"
    )
    return fragments(
        f"{who} {why}: routers fragment {outer_size} for the {path_mtu} path", path_mtu
    )

"""The WireGuard boundary's data model: what we want (``*Spec``) and what is there (``*State``).

Pure, frozen dataclasses, shared by the dump parser, the diff and the tunnel adapter. Nothing
here ever holds a private or preshared key: the parser drops them on the line it reads them.

Absence is ``None`` (an endpoint nobody set, a route without an MTU of its own); the tools'
``(none)`` / ``off`` become ``None`` / ``0`` at the text boundary (:mod:`fleetvpn.wg.dump`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Implementation = Literal["kernel", "userspace"]


@dataclass(frozen=True)
class PeerSpec:
    """One desired peer.

    ``endpoint`` None: the peer reaches us (we keep whatever endpoint WireGuard learned).
    ``allowed_ips``: CIDRs; each gets a route on the interface (except ``/0`` ones, which need
    policy routing that this module does not do).
    ``keepalive_s``: 0 = off.
    ``route_mtu``: the MTU of this peer's routes (``ip route replace CIDR dev IF mtu lock N``);
    None = the routes follow the interface MTU. An IPv6 route never goes below 1280: under a
    lower ``route_mtu`` it gets 1280 and ``advmss`` (:func:`fleetvpn.grammar.ipv6_route`).
    ``outer_fragmentation``: outer packets towards this peer may be fragmented on the way (the
    agent locks the route towards its endpoint: fleetvpn.agent.outerroute); not a tunnel
    setting, carried here so that what was applied can be reported.
    """

    public_key: str
    endpoint: str | None
    allowed_ips: tuple[str, ...]
    keepalive_s: int = 0
    route_mtu: int | None = None
    name: str = ""  # for logs only
    outer_fragmentation: bool = False


@dataclass(frozen=True)
class TunnelSpec:
    """The desired interface: addresses (CIDRs), UDP listen port, interface MTU, peers."""

    interface: str
    listen_port: int
    addresses: tuple[str, ...]
    mtu: int
    peers: tuple[PeerSpec, ...]


@dataclass(frozen=True)
class PeerStatus:
    """One peer as ``wg show IF dump`` reports it (the preshared key is dropped)."""

    public_key: str
    endpoint: str | None
    allowed_ips: tuple[str, ...]
    keepalive_s: int  # 0 = off
    latest_handshake: int  # unix seconds, 0 = never
    rx_bytes: int
    tx_bytes: int


@dataclass(frozen=True)
class InterfaceDump:
    """The interface line of ``wg show IF dump``, without its private key.

    ``public_key`` is "" when no private key is set; ``fwmark`` is None when off.
    """

    public_key: str
    listen_port: int
    fwmark: int | None


@dataclass(frozen=True)
class TunnelState:
    """The actual interface.

    ``route_mtus``: every route of the main table on the interface that the kernel did not add
    itself (``proto kernel`` routes for the interface's own subnets are left out), by destination
    CIDR (host routes as ``/32`` / ``/128``) -> its locked MTU, or None when it has none.
    ``unlocked_route_mtus``: routes whose MTU is set but not locked (``mtu N`` without ``lock``);
    ``ip -j`` cannot show the lock, so this comes from the text form. ``route_advmss``: the
    routes that carry an ``advmss``.
    ``public_key`` is "" when the interface has no private key yet.
    """

    interface: str
    public_key: str
    listen_port: int
    mtu: int
    addresses: tuple[str, ...]
    peers: tuple[PeerStatus, ...]
    route_mtus: Mapping[str, int | None] = field(default_factory=dict)
    ifindex: int = 0
    implementation: Implementation = "kernel"
    is_up: bool = True
    unlocked_route_mtus: Mapping[str, int] = field(default_factory=dict)
    route_advmss: Mapping[str, int] = field(default_factory=dict)  # routes with ``advmss N``

    def peer(self, public_key: str) -> PeerStatus | None:
        for p in self.peers:
            if p.public_key == public_key:
                return p
        return None

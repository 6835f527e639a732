"""The WireGuard boundary: the ``wg show dump`` parser, the desired-vs-actual diff, and the
adapter that reads and applies through the one runner. See each module's docstring."""

from .diff import Change, plan, plan_restore
from .dump import parse_dump
from .keys import generate_private_key, public_key_of
from .state import InterfaceDump, PeerSpec, PeerStatus, TunnelSpec, TunnelState
from .tunnel import ApplyError, NotWireGuardError, WgTunnel

__all__ = [
    "ApplyError",
    "Change",
    "InterfaceDump",
    "NotWireGuardError",
    "PeerSpec",
    "PeerStatus",
    "TunnelSpec",
    "TunnelState",
    "WgTunnel",
    "generate_private_key",
    "parse_dump",
    "plan",
    "plan_restore",
    "public_key_of",
]

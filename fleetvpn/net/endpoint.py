"""``ADDR:PORT`` on the command line and in config files (pure; no networking imports, so
every ``fleetvpn`` command can use it without paying for asyncio at start-up)."""

from __future__ import annotations

import ipaddress

Addr = tuple[str, int]


def parse_endpoint(text: str) -> Addr:
    """``ADDR:PORT`` or ``[V6ADDR]:PORT`` → (addr, port). ValueError with the reason."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not ADDR:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{port!r} is not a port (1-65535)")
    return host, int(port)

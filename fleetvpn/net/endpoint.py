"""``ADDR:PORT`` on the command line and in config files (pure; no networking imports, so
every ``fleetvpn`` command can use it without paying for asyncio at start-up)."""

from __future__ import annotations

from fleetvpn import grammar

Addr = tuple[str, int]


def parse_endpoint(text: str) -> Addr:
    """``ADDR:PORT`` or ``[V6ADDR]:PORT`` → (addr, port): IP literals only, by
    :mod:`fleetvpn.grammar`. ValueError with the reason."""
    parsed = grammar.Endpoint.parse(text, allow_dns=False)
    return str(parsed.host), parsed.port

"""Parser for ``wg show IF dump`` (wireguard-tools ``src/show.c``, ``dump_print``).

Pure: text in, dataclasses out; it never runs ``wg``.

The format, tab-separated, one line per record:

- line 1, the interface: private-key, public-key, listen-port, fwmark (``off`` or ``0x…``)
- one line per peer: public-key, preshared-key, endpoint, allowed-ips (comma-separated),
  latest-handshake, transfer-rx, transfer-tx, persistent-keepalive (``off`` or seconds)

``(none)`` marks an absent key, endpoint or allowed-ips list.

Secrets: the private key (interface line, field 1) and every preshared key (peer lines,
field 2) are dropped as each line is split; no result and no error message ever carries them.
Errors are :class:`ValueError` naming the line number and the field, and quoting only
non-secret values.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress

from .state import InterfaceDump, PeerStatus

_NONE = "(none)"
_PEER_FIELDS = (
    "public key",
    "preshared key",
    "endpoint",
    "allowed ips",
    "latest handshake",
    "rx bytes",
    "tx bytes",
    "persistent keepalive",
)


def parse_dump(text: str) -> tuple[InterfaceDump, list[PeerStatus]]:
    """Parse the output of ``wg show IF dump``.

    Raises ValueError ("wg dump line N: …") on anything that is not that format.
    """
    # Split on "\n" only, as wg writes it: str.splitlines() would also split inside a field.
    lines = text.split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ValueError("wg dump: empty (expected an interface line)")
    interface = _interface_line(lines[0])
    # The secret keys of this dump, held only until the end of this call: a mangled dump could
    # put one where a public key belongs, and a public key is kept and quoted.
    secrets = {lines[0].split("\t", 1)[0]}
    peers: list[PeerStatus] = []
    seen: set[str] = set()
    for number, line in enumerate(lines[1:], start=2):
        secrets.add(line.split("\t", 2)[1] if line.count("\t") >= 1 else "")
        peer = _peer_line(number, line)
        if peer.public_key in seen:
            raise ValueError(f"wg dump line {number}: peer {peer.public_key} appears twice")
        seen.add(peer.public_key)
        peers.append(peer)
    for number, peer in enumerate(peers, start=2):
        if peer.public_key in secrets:
            secrets.clear()
            raise ValueError(
                f"wg dump line {number}: the peer's public key is a private or preshared key"
                " of this dump (mangled output?)"
            )
    secrets.clear()
    return interface, peers


def is_key(text: str) -> bool:
    """A WireGuard key as the tools print it: 44 characters of base64 for 32 bytes."""
    if len(text) != 44 or not text.endswith("="):
        return False
    try:
        return len(base64.b64decode(text, validate=True)) == 32
    except (binascii.Error, ValueError):
        return False


def _interface_line(line: str) -> InterfaceDump:
    fields = line.split("\t")
    # Forget the private key at once; never quote this line.
    if fields:
        fields[0] = ""
    if len(fields) != 4:
        raise ValueError(
            f"wg dump line 1: expected the interface line's 4 tab-separated fields "
            f"(private key, public key, listen port, fwmark), got {len(fields)}"
        )
    _, public_key, port, fwmark = fields
    if public_key != _NONE and not is_key(public_key):
        raise ValueError("wg dump line 1: public key is not a WireGuard key")
    return InterfaceDump(
        public_key="" if public_key == _NONE else public_key,
        listen_port=_port(1, "listen port", port),
        fwmark=_fwmark(fwmark),
    )


def _peer_line(number: int, line: str) -> PeerStatus:
    fields = line.split("\t")
    if len(fields) >= 2:
        fields[1] = ""  # the preshared key: forget it at once
    where = f"wg dump line {number}"
    if len(fields) != len(_PEER_FIELDS):
        raise ValueError(
            f"{where}: expected a peer line's {len(_PEER_FIELDS)} tab-separated fields "
            f"({', '.join(_PEER_FIELDS)}), got {len(fields)}"
        )
    public_key, _, endpoint, allowed, handshake, rx, tx, keepalive = fields
    if not is_key(public_key):
        # Never quoted: on a mangled dump this field could hold part of another line.
        raise ValueError(f"{where}: public key is not a WireGuard key (44 base64 characters)")
    return PeerStatus(
        public_key=public_key,
        endpoint=_endpoint(where, endpoint),
        allowed_ips=_allowed_ips(where, allowed),
        keepalive_s=0 if keepalive == "off" else _uint(where, "persistent keepalive", keepalive),
        latest_handshake=_uint(where, "latest handshake", handshake),
        rx_bytes=_uint(where, "rx bytes", rx),
        tx_bytes=_uint(where, "tx bytes", tx),
    )


def _uint(where: str, name: str, text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"{where}: {name} {text[:60]!r} is not a non-negative integer")
    if len(text) > 20:  # beyond any u64 the tools print
        raise ValueError(f"{where}: {name} {text[:60]!r} is too large")
    return int(text)


def _port(number: int, name: str, text: str) -> int:
    port = _uint(f"wg dump line {number}", name, text)
    if port > 65535:
        raise ValueError(f"wg dump line {number}: {name} {port} is out of range 0-65535")
    return port


def _fwmark(text: str) -> int | None:
    if text == "off":
        return None
    if len(text) > 12:
        raise ValueError(f"wg dump line 1: fwmark {text[:60]!r} is out of range")
    try:
        value = int(text, 16) if text.lower().startswith("0x") else int(text)
    except ValueError:
        raise ValueError(
            f"wg dump line 1: fwmark {text[:60]!r} is neither 'off' nor a number"
        ) from None
    if not 0 <= value < 2**32:
        raise ValueError(f"wg dump line 1: fwmark {text[:60]!r} is out of range")
    return value


def _endpoint(where: str, text: str) -> str | None:
    if text == _NONE:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{where}: endpoint {text[:60]!r} is not IP:PORT")
    if host.startswith("[") != host.endswith("]"):
        raise ValueError(f"{where}: endpoint {text[:60]!r} has an unbalanced [IPv6] bracket")
    if ":" in host and not host.startswith("["):
        raise ValueError(f"{where}: endpoint {text[:60]!r}: an IPv6 address needs [brackets]")
    address = host[1:-1] if host.startswith("[") else host
    try:  # wg prints resolved addresses only (an IPv6 one may carry a %scope)
        ipaddress.ip_address(address.split("%", 1)[0] if host.startswith("[") else address)
    except ValueError:
        raise ValueError(f"{where}: endpoint {text[:60]!r} is not IP:PORT") from None
    if not port.isascii() or not port.isdigit() or len(port) > 5 or int(port) > 65535:
        raise ValueError(f"{where}: endpoint {text[:60]!r} has no valid port")
    return text


def _allowed_ips(where: str, text: str) -> tuple[str, ...]:
    if text == _NONE:
        return ()
    cidrs = tuple(text.split(","))
    for cidr in cidrs:
        _, sep, length = cidr.partition("/")
        if not sep or not length.isascii() or not length.isdigit():
            raise ValueError(f"{where}: allowed IP {cidr[:60]!r} is not a CIDR")
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ValueError(f"{where}: allowed IP {cidr[:60]!r} is not a CIDR") from None
    return cidrs

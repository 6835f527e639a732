"""The grammar of every value that crosses a trust boundary: one module, every layer calls it.

fleetvpn runs as root on every node and writes files that ``wg-quick`` evaluates (``PostUp``),
that systemd-networkd and ``wg`` parse, and argvs for ``wg`` and ``ip``. A value one node sends
reaches those files on every other node, so each value is parsed into a type where it enters
(the API, the agent's config and desired state, the inventory plugin) and checked again where it
leaves (templates refuse, the agent refuses before ``wg``/``ip``). Parse, don't validate
(style.md 5a): :class:`Endpoint` is a host and a port; ``str()`` of it is the only way back to
text, so nothing downstream can carry a newline, a scope id or a second meaning.

The grammars (ASCII only everywhere: ``str.isdigit`` and ``int()`` take ``"٥١٨٢٠"``, and
``ipaddress`` takes scope ids of any character but ``/`` and ``%``):

  name       node and site names: ``[a-z0-9][a-z0-9-]{0,62}`` (a DNS label, lower case)
  endpoint   ``A.B.C.D:PORT``, ``[IPV6]:PORT`` or ``dns.name:PORT``; PORT 1..65535 in ASCII
             digits, no leading zero. IPv6 scope ids (``%eth0``) are refused: a link-local
             address names a different link on every node, so it means nothing to the fleet.
  dns name   RFC 1123 labels of ``[a-z0-9-]`` (no leading or trailing hyphen), at most 253
             characters, the last label not all digits (so ``1.2.3`` is not a name); lower case.
  wg key     base64 of exactly 32 bytes in the form the tools print: 44 characters, one ``=``.
  cidr       an IPv4 or IPv6 network in canonical form (host bits zero), ASCII, no scope id.
  interface  an address with its prefix (a tunnel address: ``10.99.0.1/24``).
  note       one line of printable text (no control, format, line or paragraph separator
             characters, no lone surrogates), at most :data:`NOTE_MAX` characters.
  ifname     a Linux interface name as wg-quick accepts it: ``[a-zA-Z0-9_=+.-]{1,15}``, not
             starting with ``-`` (an argv of ``ip``/``wg`` would take it for an option).
  tunnel mtu an int (not a bool) in 1280..9000 where the tunnel carries IPv6 (RFC 8200 §5; Linux
             drops IPv6 from a device below 1280), else 576..9000 (RFC 791: every IPv4 host
             accepts 576; 9000: jumbo frames, the largest underlay the MTU policy plans for).

Every parser raises :class:`GrammarError` (a ValueError) whose message says what is wrong
without echoing more than a bounded, escaped excerpt of the input.
Pure: no I/O, no clock.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from dataclasses import dataclass
from typing import Final

NAME_PATTERN: Final = "[a-z0-9][a-z0-9-]{0,62}"
NOTE_MAX: Final = 2000
TUNNEL_MTU_IPV4: Final = (576, 9000)
TUNNEL_MTU_IPV6: Final = (1280, 9000)
# An IPv6 route never goes below 1280; under a smaller route MTU (a path that cannot carry
# 1280 + WireGuard's overhead) it stays at 1280 and TCP's advertised MSS is the route MTU minus
# these headers (IPv6 40 + TCP 20), so no TCP segment needs fragmenting.
TCP_IPV6_HEADERS: Final = 60


def ipv6_route(route_mtu: int) -> tuple[int, int | None]:
    """(MTU, advertised MSS or None) of an IPv6 route that should carry ``route_mtu``."""
    if route_mtu < TUNNEL_MTU_IPV6[0]:
        return TUNNEL_MTU_IPV6[0], route_mtu - TCP_IPV6_HEADERS
    return route_mtu, None


# A fleet keepalive: beyond 120 s a NAT mapping is long gone (RFC 4787 asks NATs for >= 120 s;
# most keep less), so a larger value is a mistake, whoever sends it. wg(8) itself takes 65535.
KEEPALIVE_MAX_S: Final = 120
WG_KEY_BYTES: Final = 32

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

_NAME_RE: Final = re.compile(NAME_PATTERN, re.ASCII)
_PORT_RE: Final = re.compile(r"[1-9][0-9]{0,4}", re.ASCII)
_LABEL: Final = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DNS_RE: Final = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?", re.ASCII)
_IPV4_RE: Final = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}", re.ASCII)
_IPV6_RE: Final = re.compile(r"[0-9a-fA-F:.]{2,45}", re.ASCII)
_KEY_RE: Final = re.compile(r"[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=", re.ASCII)
_IFNAME_RE: Final = re.compile(r"[a-zA-Z0-9_=+.-]{1,15}", re.ASCII)
_CIDR_RE: Final = re.compile(r"[0-9a-fA-F:.]{2,45}/[0-9]{1,3}", re.ASCII)


class GrammarError(ValueError):
    """A value that does not fit its grammar; ``str()`` says which grammar and why."""


def shown(value: object, limit: int = 40) -> str:
    """A bounded, escaped excerpt of untrusted input for an error message (``repr`` escapes
    newlines, control characters and lone surrogates)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _text(value: object, what: str, limit: int = 255) -> str:
    if not isinstance(value, str):
        raise GrammarError(f"{what}: expected a string, got {type(value).__name__}")
    if len(value) > limit:
        raise GrammarError(f"{what}: {len(value)} characters is too long (at most {limit})")
    if not value.isascii():
        raise GrammarError(f"{what}: {shown(value)} has characters outside ASCII")
    return value


# --- names, ports, keys --------------------------------------------------------------------


def name(value: object, what: str = "name") -> str:
    """A node or site name (:data:`NAME_PATTERN`)."""
    text = _text(value, what, 63)
    if not _NAME_RE.fullmatch(text):
        raise GrammarError(f"{what}: {shown(text)} is not a name ({NAME_PATTERN})")
    return text


def is_name(value: object) -> bool:
    return isinstance(value, str) and value.isascii() and _NAME_RE.fullmatch(value) is not None


def port(value: object, what: str = "port") -> int:
    """A UDP port, 1..65535: an int (not a bool), or ASCII digits without a leading zero."""
    if isinstance(value, bool):
        raise GrammarError(f"{what}: expected a port number, got a boolean")
    if isinstance(value, int):
        if 1 <= value <= 65535:
            return value
        raise GrammarError(f"{what}: {value} is out of range (1..65535)")
    text = _text(value, what, 5)
    if not _PORT_RE.fullmatch(text) or int(text) > 65535:
        raise GrammarError(f"{what}: {shown(text)} is not a port (1..65535, ASCII digits)")
    return int(text)


def wg_key(value: object, what: str = "key") -> str:
    """A WireGuard key as the tools print it: base64 of exactly 32 bytes, 44 characters."""
    text = _text(value, what, 64)
    if _KEY_RE.fullmatch(text):
        try:
            if len(base64.b64decode(text, validate=True)) == WG_KEY_BYTES:
                return text
        except (binascii.Error, ValueError):
            pass
    # Never quote the value: a private key pasted in the wrong place must not reach a log.
    raise GrammarError(f"{what}: not a WireGuard key (base64 of {WG_KEY_BYTES} bytes, 44 chars)")


def is_wg_key(value: object) -> bool:
    try:
        wg_key(value)
    except GrammarError:
        return False
    return True


def tunnel_mtu(value: object, what: str = "mtu", *, ipv6: bool) -> int:
    """A tunnel's interface or route MTU; ``ipv6``: the tunnel carries IPv6."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise GrammarError(f"{what}: expected an integer MTU, got {type(value).__name__}")
    low, high = TUNNEL_MTU_IPV6 if ipv6 else TUNNEL_MTU_IPV4
    if not low <= value <= high:
        carries = ": the tunnel carries IPv6" if ipv6 else ""
        raise GrammarError(f"{what}: {value} out of range ({low}..{high}{carries})")
    return value


def keepalive(value: object, what: str = "keepalive_s") -> int:
    """A PersistentKeepalive the fleet sets: 0 (off) .. :data:`KEEPALIVE_MAX_S` seconds."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise GrammarError(f"{what}: expected an integer number of seconds")
    if not 0 <= value <= KEEPALIVE_MAX_S:
        raise GrammarError(f"{what}: {value} out of range (0..{KEEPALIVE_MAX_S} s, 0 = off)")
    return value


def ifname(value: object, what: str = "interface") -> str:
    text = _text(value, what, 15)
    # A leading "-" would be read as an option by ``ip`` and ``wg`` (``ip link add -h …``).
    if not _IFNAME_RE.fullmatch(text) or text in (".", "..") or text.startswith("-"):
        raise GrammarError(
            f"{what}: {shown(text)} is not an interface name ([a-zA-Z0-9_=+.-]{{1,15}})"
        )
    return text


# --- free text -----------------------------------------------------------------------------


def note(value: object, what: str = "note", limit: int = NOTE_MAX) -> str:
    """One line of printable text (Unicode allowed; no control, format or separator characters
    other than the plain space, no lone surrogates)."""
    if not isinstance(value, str):
        raise GrammarError(f"{what}: expected a string, got {type(value).__name__}")
    if len(value) > limit:
        raise GrammarError(f"{what}: {len(value)} characters is too long (at most {limit})")
    # str.isprintable() is False for every character in Unicode's "Other" and "Separator"
    # categories except the ASCII space: controls, newlines, U+2028/U+2029, bidi and other
    # format characters, lone surrogates.
    if not value.isprintable():
        bad = next(c for c in value if not c.isprintable())
        raise GrammarError(f"{what}: has an unprintable character {bad!r} (one printable line)")
    return value


def is_line(value: object) -> bool:
    try:
        note(value)
    except GrammarError:
        return False
    return True


# --- addresses -----------------------------------------------------------------------------


def ip_address(value: object, what: str = "address") -> IPAddress:
    """An IPv4 or IPv6 literal, ASCII, no scope id; IPv4 in dotted quad without leading zeros."""
    text = _text(value, what, 45)
    try:
        if _IPV4_RE.fullmatch(text):
            return ipaddress.IPv4Address(text)
        if _IPV6_RE.fullmatch(text) and ":" in text:
            return ipaddress.IPv6Address(text)
    except ValueError as e:
        raise GrammarError(f"{what}: {e}") from None
    raise GrammarError(f"{what}: {shown(text)} is not an IPv4 or IPv6 address (no scope ids)")


def dns_name(value: object, what: str = "host") -> str:
    """A DNS name (RFC 1123), returned in lower case without a trailing dot."""
    text = _text(value, what, 254).lower()
    if not _DNS_RE.fullmatch(text) or len(text.rstrip(".")) > 253:
        raise GrammarError(f"{what}: {shown(text)} is not a DNS name")
    text = text.rstrip(".")
    if text.rsplit(".", 1)[-1].isdigit():
        raise GrammarError(f"{what}: {shown(text)} is neither an IP address nor a DNS name")
    return text


def cidr(value: object, what: str = "cidr") -> IPNetwork:
    """A network in canonical form: ``10.99.0.0/24``, ``fd00::/64`` (host bits must be zero)."""
    text = _text(value, what, 49)
    if not _CIDR_RE.fullmatch(text):
        raise GrammarError(f"{what}: {shown(text)} is not a CIDR (ADDRESS/PREFIX)")
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        raise GrammarError(f"{what}: {e}") from None


def interface(value: object, what: str = "address") -> IPInterface:
    """An address with its prefix length: ``10.99.0.1/24``, ``fd00::1/64``."""
    text = _text(value, what, 49)
    if not _CIDR_RE.fullmatch(text):
        raise GrammarError(f"{what}: {shown(text)} is not ADDRESS/PREFIX")
    try:
        return ipaddress.ip_interface(text)
    except ValueError as e:
        raise GrammarError(f"{what}: {e}") from None


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a peer is reached: an IP address or a DNS name, and a UDP port.
    ``str()`` is the canonical text (``[v6]:port`` for IPv6) and the only way back to text."""

    host: IPAddress | str  # a str host is a DNS name checked by :func:`dns_name`
    port: int

    @classmethod
    def parse(cls, value: object, what: str = "endpoint", *, allow_dns: bool = True) -> Endpoint:
        text = _text(value, what, 260)
        host_text, sep, port_text = text.rpartition(":")
        if not sep or not host_text:
            raise GrammarError(f"{what}: {shown(text)} is not HOST:PORT")
        number = port(port_text, "port")
        if host_text.startswith("[") and host_text.endswith("]"):
            address = ip_address(host_text[1:-1], what)
            if address.version != 6:
                raise GrammarError(f"{what}: brackets are for IPv6 addresses only")
            return cls(address, number)
        if ":" in host_text:
            raise GrammarError(f"{what}: an IPv6 address goes in brackets: [ADDRESS]:PORT")
        if _IPV4_RE.fullmatch(host_text):
            return cls(ip_address(host_text, what), number)
        if not allow_dns:
            raise GrammarError(f"{what}: {shown(host_text)} is not an IP address")
        return cls(dns_name(host_text, what), number)

    @property
    def family(self) -> int | None:
        """4 or 6 for an IP address; None for a DNS name (resolved where it is used)."""
        return None if isinstance(self.host, str) else self.host.version

    @property
    def address(self) -> IPAddress | None:
        return None if isinstance(self.host, str) else self.host

    def __str__(self) -> str:
        if isinstance(self.host, ipaddress.IPv6Address):
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def endpoint(value: object, what: str = "endpoint", *, allow_dns: bool = True) -> Endpoint:
    return Endpoint.parse(value, what, allow_dns=allow_dns)


def canonical_endpoint(value: object, what: str = "endpoint", *, allow_dns: bool = True) -> str:
    """The endpoint's canonical text; refuses anything that is not already canonical, so a
    value checked where it leaves is exactly the value that was parsed where it entered."""
    parsed = Endpoint.parse(value, what, allow_dns=allow_dns)
    if str(parsed) != value:
        raise GrammarError(f"{what}: {shown(value)} is not in canonical form ({parsed})")
    return str(parsed)

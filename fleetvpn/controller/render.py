"""Config files from a node's desired state (Jinja2 templates that only format).

Every value — MTUs, keepalives, routes, and the reason for each — is computed in Python
(:func:`fleetvpn.controller.fleet.desired_json`); templates only loop over precomputed lists
(style.md rule 11). No template ever sees a private key: nodes keep theirs in their own file.

These files are evaluated as root by ``wg-quick`` (``PostUp``) and parsed by ``wg`` and
systemd-networkd, so rendering refuses, never escapes-and-hopes (issue 11):

1. :func:`check_desired` parses every value of the document by :mod:`fleetvpn.grammar` before
   anything is rendered: names, site, interface, keys, endpoints, CIDRs, MTUs and keepalives as
   integers in range, reasons as one printable line. :class:`RenderError` names the field.
2. The Jinja environment's ``finalize`` refuses every printed value that is not one printable
   line, so a value nobody thought of (a new field, a template change) cannot add a line either.
3. No rendered line may end in a backslash: systemd's parser joins the next line to a key line
   ending in ``\\``, so ``Address = … \\`` would swallow the ``[Route]`` header after it
   (measured with systemd-networkd 252: "Unknown key 'Destination' in section [Network]").
   Comment lines are not joined by systemd 252, but they are refused as well: one rule for every
   line, whatever the parser's version.

Contract: ``render(desired, kind)`` returns ``{file name: text}``; ``kind`` is one of
:data:`KINDS`; an unknown kind raises ``KeyError``; a document that fails any check raises
:class:`RenderError` (a ``ValueError``) and nothing is rendered.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import cache
from typing import Any, Final

import jinja2

from fleetvpn import grammar
from fleetvpn.controller.policy_keepalive import KEEPALIVE_MAX_S
from fleetvpn.controller.policy_mtu import IPV4_MIN_MTU, IPV6_MIN_MTU, MAX_PATH_MTU

KINDS: dict[str, tuple[tuple[str, str], ...]] = {
    # kind → (template, file name pattern) pairs
    "wg-quick": (("wg-quick.conf.j2", "{interface}.conf"),),
    "networkd": (
        ("networkd.netdev.j2", "{interface}.netdev"),
        ("networkd.network.j2", "{interface}.network"),
    ),
    "host_vars": (("host_vars.yml.j2", "{node}.yml"),),
}

SCHEMA_VERSION: Final = 1
# A printed value longer than this is not a config value (a whole fleet's allowed IPs on one
# line stays far below it).
LINE_MAX: Final = 1 << 20


class RenderError(ValueError):
    """A desired state that cannot be rendered safely; ``str()`` reads ``FIELD: PROBLEM``."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


# --- the document's grammar ----------------------------------------------------------------


def _get(doc: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in doc:
        raise RenderError(where + key, "missing")
    return doc[key]


def _int(value: object, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RenderError(field, f"expected an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise RenderError(field, f"{value} is out of range ({low}..{high})")
    return value


def _list(value: object, field: str) -> list[Any]:
    if not isinstance(value, list):
        raise RenderError(field, f"expected a list, got {type(value).__name__}")
    return value


def _by(parse: Callable[[object, str], object], value: object, field: str) -> None:
    try:
        parse(value, field)
    except grammar.GrammarError as e:
        # The grammar's message starts with the field already ("FIELD: problem").
        raise RenderError(field, str(e).removeprefix(f"{field}: ")) from None


def _canonical(parsed: object, value: object, field: str) -> None:
    if str(parsed) != value:
        raise RenderError(field, f"{grammar.shown(value)} is not in canonical form ({parsed})")


def _mtu(value: object, field: str, *, carries_ipv6: bool) -> int:
    low = IPV6_MIN_MTU if carries_ipv6 else IPV4_MIN_MTU
    return _int(value, field, low, MAX_PATH_MTU)


def check_desired(desired: object) -> None:
    """Raise :class:`RenderError` naming the first field of ``desired`` (the document of
    ``GET /v1/nodes/NAME/desired``) that does not fit its grammar. Keys the templates do not
    print are not checked (and cannot be printed: see :func:`_one_line`)."""
    if not isinstance(desired, Mapping):
        raise RenderError("desired state", "not an object")
    version = _get(desired, "schema_version", "")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise RenderError("schema_version", f"{grammar.shown(version)} is not {SCHEMA_VERSION}")
    _by(grammar.name, _get(desired, "node", ""), "node")
    _by(grammar.name, _get(desired, "site", ""), "site")
    _by(grammar.note, _get(desired, "generated_at", ""), "generated_at")
    _by(grammar.ifname, _get(desired, "interface", ""), "interface")
    addresses = _list(_get(desired, "addresses", ""), "addresses")
    carries_ipv6 = False
    for i, text in enumerate(addresses):
        field = f"addresses[{i}]"
        try:
            address = grammar.interface(text, field)
        except grammar.GrammarError as e:
            raise RenderError(field, str(e).removeprefix(f"{field}: ")) from None
        _canonical(address.with_prefixlen, text, field)
        carries_ipv6 |= address.version == 6
    listen_port = _get(desired, "listen_port", "")
    _int(listen_port, "listen_port", 1, 65535)
    _mtu(_get(desired, "interface_mtu", ""), "interface_mtu", carries_ipv6=carries_ipv6)
    _by(grammar.note, _get(desired, "interface_mtu_reason", ""), "interface_mtu_reason")
    keys: set[str] = set()
    names: set[str] = set()
    for i, peer in enumerate(_list(_get(desired, "peers", ""), "peers")):
        where = f"peers[{i}]."
        if not isinstance(peer, Mapping):
            raise RenderError(f"peers[{i}]", "not an object")
        _check_peer(peer, where)
        if peer["public_key"] in keys:
            raise RenderError(where + "public_key", "two peers with the same key")
        if peer["peer"] in names:
            raise RenderError(where + "peer", f"two peers named {peer['peer']}")
        keys.add(peer["public_key"])
        names.add(peer["peer"])


def _check_peer(peer: Mapping[str, Any], where: str) -> None:
    _by(grammar.name, _get(peer, "peer", where), where + "peer")
    _by(grammar.name, _get(peer, "site", where), where + "site")
    _by(grammar.wg_key, _get(peer, "public_key", where), where + "public_key")
    endpoint = _get(peer, "endpoint", where)
    if endpoint is not None:
        _by(grammar.canonical_endpoint, endpoint, where + "endpoint")
    allowed = _list(_get(peer, "allowed_ips", where), where + "allowed_ips")
    if not allowed:
        raise RenderError(where + "allowed_ips", "empty (a peer without addresses)")
    carries_ipv6 = False
    for j, text in enumerate(allowed):
        field = f"{where}allowed_ips[{j}]"
        try:
            network = grammar.cidr(text, field)
        except grammar.GrammarError as e:
            raise RenderError(field, str(e).removeprefix(f"{field}: ")) from None
        _canonical(network, text, field)
        carries_ipv6 |= network.version == 6
    _int(_get(peer, "keepalive_s", where), where + "keepalive_s", 0, KEEPALIVE_MAX_S)
    _by(grammar.note, _get(peer, "keepalive_reason", where), where + "keepalive_reason")
    # Each allowed IP gets a route with this MTU; an IPv6 route stays at 1280 with TCP's MSS
    # clamped when it is lower (:func:`routes`), so only the IPv4 floor applies here.
    _mtu(_get(peer, "route_mtu", where), where + "route_mtu", carries_ipv6=False)
    fragment = peer.get("outer_fragmentation", False)
    if not isinstance(fragment, bool):
        problem = f"{grammar.shown(fragment)} is not a boolean"
        raise RenderError(where + "outer_fragmentation", problem)
    _by(grammar.note, _get(peer, "route_mtu_reason", where), where + "route_mtu_reason")


# --- the templates -------------------------------------------------------------------------


def _one_line(value: object) -> object:
    """Jinja's ``finalize``: every ``{{ … }}`` passes here. Refuses (raises) a value that would
    print as anything but one printable line, and ``None`` (it would print as ``None``)."""
    if value is None:
        raise RenderError("template", "a value to print is None")
    try:
        grammar.note(str(value), "template", limit=LINE_MAX)
    except grammar.GrammarError as e:
        problem = str(e).removeprefix("template: ")
        raise RenderError("template", f"a printed value {problem}") from None
    return value


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("fleetvpn.controller", "templates"),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,  # config files, not HTML
        finalize=_one_line,
    )


def routes(desired: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One route per peer address, carrying that link's MTU (the kernel and TCP follow it).
    An IPv6 route never goes below 1280 (RFC 8200): under a smaller route MTU it stays at 1280
    and TCP's advertised MSS (``advmss``) is clamped to fit the route MTU instead."""
    out = []
    for peer in desired["peers"]:
        for ip in peer["allowed_ips"]:
            mtu, advmss = route_values(ip, peer["route_mtu"])
            out.append({
                "destination": ip,
                "mtu": mtu,
                "advmss": advmss,
                "reason": f"{peer['peer']}: {peer['route_mtu_reason']}",
            })  # fmt: skip
    return out


def route_values(destination: str, route_mtu: int) -> tuple[int, int | None]:
    """(route MTU, advertised MSS or None) of one route towards ``destination``."""
    return grammar.ipv6_route(route_mtu) if ":" in destination else (route_mtu, None)


def _no_continuation(file_name: str, text: str) -> str:
    for number, line in enumerate(text.splitlines(), 1):
        if line.endswith("\\"):
            raise RenderError(
                f"{file_name} line {number}",
                "ends in a backslash (systemd's parser joins the next line to such a line)",
            )
    return text


def render(desired: Mapping[str, Any], kind: str) -> dict[str, str]:
    templates = KINDS[kind]
    check_desired(desired)
    context = {**desired, "routes": routes(desired)}
    env = _environment()
    files = {}
    for template, pattern in templates:
        file_name = pattern.format(**desired)
        text = env.get_template(template).render(context)
        files[file_name] = _no_continuation(file_name, text)
    return files

# Copyright: fleetvpn developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Filters that refuse a value which does not fit its grammar (fleetvpn.grammar), so that a
template never writes a hostile inventory value into a config file: the task fails instead,
naming the variable. Ansible has no per-template ``finalize``; every printed inventory value
goes through one of these (issue 11: templates refuse, never escape-and-hope)."""

from __future__ import annotations

# Documentation: one <filter>.yml beside this file per filter.
from ansible.errors import AnsibleFilterError

try:
    from fleetvpn import grammar
except ImportError as e:  # the collection ships inside the fleetvpn wheel
    raise ImportError(f"fleetvpn.fleet filters need the fleetvpn package: {e}") from None

LINE_MAX = 1 << 16

# kind -> (parser, text of the parsed value)
_KINDS = {
    "name": (grammar.name, str),
    "endpoint": (grammar.canonical_endpoint, str),
    "wg_key": (grammar.wg_key, str),
    "cidr": (grammar.cidr, str),
    "interface": (grammar.interface, lambda parsed: parsed.with_prefixlen),
    "ifname": (grammar.ifname, str),
    "port": (grammar.port, int),
    "note": (grammar.note, str),
}


def line(value, what="value"):
    """``value`` unchanged if it prints as one printable line (no newline, control, format or
    separator character); else the task fails naming ``what``."""
    if value is None or isinstance(value, (dict, list)):
        raise AnsibleFilterError(f"{what}: expected one line of text, got {type(value).__name__}")
    try:
        grammar.note(str(value), what, limit=LINE_MAX)
    except grammar.GrammarError as e:
        raise AnsibleFilterError(str(e)) from None
    return value


def checked(value, kind, what="value"):
    """``value`` parsed by fleetvpn.grammar's ``kind`` (name, endpoint, wg_key, cidr,
    interface, ifname, port, note) and returned in canonical form; else the task fails naming
    ``what``. An endpoint or CIDR not already in canonical form is refused, not rewritten."""
    if kind not in _KINDS:
        raise AnsibleFilterError(f"checked: unknown kind {kind!r} (known: {', '.join(_KINDS)})")
    parse, text = _KINDS[kind]
    try:
        parsed = parse(value, what)
    except grammar.GrammarError as e:
        raise AnsibleFilterError(str(e)) from None
    out = text(parsed)
    if kind in ("cidr", "interface") and out != value:
        raise AnsibleFilterError(f"{what}: {grammar.shown(value)} is not in canonical form ({out})")
    return out


def tls_san(names, what="fleetvpn_controller_tls_names"):
    """IP addresses and DNS names -> an X.509 subjectAltName value for openssl
    (``IP:198.19.1.10,IP:127.0.0.1,DNS:localhost``); a name that is neither fails the task."""
    if isinstance(names, str) or not names:
        raise AnsibleFilterError(f"{what}: expected a non-empty list of addresses and DNS names")
    out = []
    for i, host in enumerate(names):
        try:
            out.append(f"IP:{grammar.ip_address(host, f'{what}[{i}]')}")
        except grammar.GrammarError:
            try:
                out.append(f"DNS:{grammar.dns_name(host, f'{what}[{i}]')}")
            except grammar.GrammarError as e:
                raise AnsibleFilterError(f"{e} (nor an IP address)") from None
    return ",".join(out)


class FilterModule:
    def filters(self):
        return {"line": line, "checked": checked, "tls_san": tls_san}

# Copyright: fleetvpn developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Filters that shape a node's desired tunnel (Python, so the roles' templates stay dumb).

Every value they take or make is parsed by fleetvpn.grammar first (issue 11): a hostile value
from the controller or the inventory fails the task, naming the field, before anything reaches
the wireguard module or a file."""

from __future__ import annotations

# Documentation: one <filter>.yml beside this file per filter.
from ansible.errors import AnsibleFilterError

try:
    from fleetvpn import grammar
except ImportError as e:  # the collection ships inside the fleetvpn wheel
    raise ImportError(f"fleetvpn.fleet filters need the fleetvpn package: {e}") from None

# The ranges the controller's policy decides within and the agent accepts: fleetvpn.grammar's.
MTU_MIN = {4: grammar.TUNNEL_MTU_IPV4[0], 6: grammar.TUNNEL_MTU_IPV6[0]}
MTU_MAX = grammar.TUNNEL_MTU_IPV4[1]
KEEPALIVE_MAX_S = grammar.KEEPALIVE_MAX_S


def _fail(field, problem):
    raise AnsibleFilterError(f"{field}: {problem}")


def _parse(parse, value, field, **kwargs):
    try:
        return parse(value, field, **kwargs)
    except grammar.GrammarError as e:
        raise AnsibleFilterError(str(e)) from None


def _int(value, field, low, high, *, optional=False):
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(field, f"expected an integer, got {type(value).__name__}")
    if not low <= value <= high:
        _fail(field, f"{value} is out of range ({low}..{high})")
    return value


def check_tunnel(desired, where="desired"):
    """Raise AnsibleFilterError naming the first field of a desired tunnel (the controller's
    shape, or the inventory's) that does not fit fleetvpn.grammar; return it unchanged."""
    if not isinstance(desired, dict):
        _fail(where, "not a mapping")
    _parse(grammar.ifname, desired.get("interface"), f"{where}.interface")
    _int(desired.get("listen_port"), f"{where}.listen_port", 1, 65535)
    addresses = desired.get("addresses")
    if not isinstance(addresses, list) or not addresses:
        _fail(f"{where}.addresses", "expected a non-empty list")
    families = {_parse(grammar.interface, a, f"{where}.addresses[{i}]").version
                for i, a in enumerate(addresses)}  # fmt: skip
    low = MTU_MIN[6 if 6 in families else 4]
    _int(desired.get("interface_mtu"), f"{where}.interface_mtu", low, MTU_MAX)
    _parse(grammar.note, desired.get("interface_mtu_reason", ""), f"{where}.interface_mtu_reason")
    peers = desired.get("peers")
    if not isinstance(peers, list):
        _fail(f"{where}.peers", "expected a list")
    for i, peer in enumerate(peers):
        at = f"{where}.peers[{i}]"
        if not isinstance(peer, dict):
            _fail(at, "not a mapping")
        _parse(grammar.note, peer.get("peer") or peer.get("name") or "", f"{at}.peer")
        _parse(grammar.wg_key, peer.get("public_key"), f"{at}.public_key")
        if peer.get("endpoint") is not None:
            _parse(grammar.canonical_endpoint, peer["endpoint"], f"{at}.endpoint")
        allowed = peer.get("allowed_ips")
        if not isinstance(allowed, list) or not allowed:
            _fail(f"{at}.allowed_ips", "expected a non-empty list")
        for j, a in enumerate(allowed):
            _parse(grammar.cidr, a, f"{at}.allowed_ips[{j}]")
        _int(peer.get("keepalive_s"), f"{at}.keepalive_s", 0, KEEPALIVE_MAX_S)
        # a route MTU below 1280 holds for IPv4 routes; IPv6 ones stay at 1280 with TCP's MSS
        # clamped (fleetvpn.grammar.ipv6_route, applied by the wg layer)
        _int(peer.get("route_mtu"), f"{at}.route_mtu", MTU_MIN[4], MTU_MAX, optional=True)
        for reason in ("keepalive_reason", "route_mtu_reason"):
            _parse(grammar.note, peer.get(reason, ""), f"{at}.{reason}")
    return desired


def fixed_settings(desired, mtu=None, keepalive_s=None):
    check_tunnel(desired)
    out = dict(desired)
    peers = [dict(peer) for peer in desired.get("peers", [])]
    if mtu is not None:
        mtu = int(mtu)
        out["interface_mtu"] = mtu
        out["interface_mtu_reason"] = f"fixed at {mtu} by fleetvpn_wireguard_mtu"
        for peer in peers:
            peer["route_mtu"] = None
            peer["route_mtu_reason"] = "follows the interface MTU (fleetvpn_wireguard_mtu)"
    if keepalive_s is not None:
        keepalive_s = int(keepalive_s)
        for peer in peers:
            peer["keepalive_s"] = keepalive_s
            peer["keepalive_reason"] = f"fixed at {keepalive_s} s by fleetvpn_wireguard_keepalive_s"
    out["peers"] = peers
    return check_tunnel(out, "fixed settings")


def _host_route(cidr):
    address = cidr.split("/")[0]
    return f"{address}/{128 if ':' in address else 32}"


def inventory_peers(hostvars, hosts, me, keepalive_s=25):
    """Peers of ``me`` among ``hosts`` from inventory variables, by the controller's rule: two
    nodes peer when at least one has an endpoint the other can dial (WireGuard has no NAT
    traversal). A node without an endpoint (NATed, firewalled) keeps ``keepalive_s`` towards
    the peers it can dial; the others get none.

    Each host's ``fleetvpn__wireguard_self`` (public key, endpoint, addresses) is set by the
    wireguard role earlier in the same play."""

    def self_of(host):
        info = hostvars[host].get("fleetvpn__wireguard_self")
        if not info or not info.get("public_key"):
            raise AnsibleFilterError(
                f"inventory_peers: {host} has no public key yet (run the wireguard role on it in "
                "the same play, or give fleetvpn_peers)"
            )
        _parse(grammar.note, host, "inventory_peers: host")
        _parse(grammar.wg_key, info["public_key"], f"inventory_peers: {host}: public key")
        if info.get("endpoint"):
            _parse(grammar.canonical_endpoint, info["endpoint"], f"{host}: fleetvpn_endpoint")
        for i, address in enumerate(info.get("addresses") or []):
            _parse(grammar.interface, address, f"{host}: fleetvpn_addresses[{i}]")
        return info

    _int(keepalive_s, "inventory_peers: keepalive_s", 0, KEEPALIVE_MAX_S)

    mine = self_of(me)
    my_endpoint = mine.get("endpoint") or None
    peers = []
    for host in hosts:
        if host == me:
            continue
        other = self_of(host)
        endpoint = other.get("endpoint") or None
        if my_endpoint is None and endpoint is None:
            continue
        if not other.get("addresses"):
            raise AnsibleFilterError(f"inventory_peers: {host}: fleetvpn_addresses is empty")
        nated = my_endpoint is None
        peers.append(
            {
                "peer": host,
                "public_key": other["public_key"],
                "endpoint": endpoint,
                "allowed_ips": [_host_route(a) for a in other["addresses"]],
                "keepalive_s": keepalive_s if nated else 0,
                "keepalive_reason": (
                    f"{me} has no endpoint (NAT or firewall): keepalive {keepalive_s} s "
                    f"(fleetvpn_keepalive_s) keeps the path {host} reaches it through"
                    if nated
                    else f"{me} is reachable at its endpoint: no keepalive needed"
                ),
                "route_mtu": None,
                "route_mtu_reason": "follows the interface MTU (inventory)",
            }
        )
    return peers


def change_lines(changes):
    """``[{summary, reason}]`` -> ``["summary — reason"]`` for printing."""
    return [f"{c['summary']} — {c['reason']}" for c in changes]


def applied_lines(hostvars, hosts):
    """Every host's applied changes (the wireguard role's result) as ``host: summary — reason``;
    a host whose tunnel already matched says so."""
    lines = []
    for host in hosts:
        result = hostvars[host].get("fleetvpn__wireguard_applied")
        if not result or result.get("skipped"):
            continue
        changes = result.get("changes") or []
        if not changes:
            lines.append(f"{host}: unchanged (already as recommended)")
        lines += [f"{host}: {c['summary']} — {c['reason']}" for c in changes]
    return lines or ["no tunnel was applied by Ansible (agents apply their own settings)"]


class FilterModule:
    def filters(self):
        return {
            "fixed_settings": fixed_settings,
            "check_tunnel": check_tunnel,
            "inventory_peers": inventory_peers,
            "change_lines": change_lines,
            "applied_lines": applied_lines,
        }

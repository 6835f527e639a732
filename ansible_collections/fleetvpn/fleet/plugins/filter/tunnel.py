# Copyright: fleetvpn developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Filters that shape a node's desired tunnel (Python, so the roles' templates stay dumb)."""

from __future__ import annotations

# Documentation: one <filter>.yml beside this file per filter.
from ansible.errors import AnsibleFilterError


def fixed_settings(desired, mtu=None, keepalive_s=None):
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
    return out


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
        return info

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
            "inventory_peers": inventory_peers,
            "change_lines": change_lines,
            "applied_lines": applied_lines,
        }

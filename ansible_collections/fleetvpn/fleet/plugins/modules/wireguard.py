#!/usr/bin/python
# Copyright: fleetvpn developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Apply a WireGuard tunnel live with fleetvpn.wg's reconcile (the smallest set of changes)."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: wireguard
short_description: Apply a WireGuard interface, its peers and per-peer route MTUs, live
description:
  - Brings the node's WireGuard interface to the desired state with the smallest set of live
    changes (fleetvpn.wg's reconcile) -- a keepalive, endpoint or allowed-IPs change is one
    C(wg set) of that peer; an MTU change is C(ip link set mtu) or C(ip route replace ... mtu lock);
    the interface is created only when it does not exist and is never restarted for a setting.
    A failed step rolls back to the state read before the apply.
  - Generates the private key on the node when O(private_key_file) does not exist (mode 0600,
    never overwritten). The private key never leaves the node and is never read by this module;
    WireGuard is given the file's path; the diff and the results show public keys only.
  - Every change carries its reason (from the C(*_reason) fields of the desired state).
  - Runs under a Python that can import fleetvpn (set C(ansible_python_interpreter) for this task,
    for example to fleetvpn's virtualenv).
version_added: 0.1.0
author: fleetvpn developers
options:
  interface:
    description: The WireGuard interface.
    type: str
    default: wg0
  private_key_file:
    description: The node's private key file (generated when absent).
    type: path
    required: true
  state:
    description:
      - C(present) applies the tunnel; C(absent) deletes the interface; C(key) only makes sure
        the key exists and returns the public key.
    type: str
    choices: [present, absent, key]
    default: present
  listen_port:
    description: UDP listen port.
    type: int
    default: 51820
  addresses:
    description: The interface's addresses (CIDRs).
    type: list
    elements: str
    default: []
  mtu:
    description: The interface MTU.
    type: int
    default: 1420
  mtu_reason:
    description: Why this interface MTU.
    type: str
    default: ""
  peers:
    description:
      - Desired peers, in the controller's desired-state shape (C(GET /v1/nodes/NAME/desired)).
    type: list
    elements: dict
    default: []
    suboptions:
      name:
        description: The peer's name (logs and diffs only).
        type: str
      peer:
        description: The peer's name, as the controller's desired state calls it.
        type: str
      site:
        description: The peer's site (informational).
        type: str
      public_key:
        description: The peer's public key.
        type: str
        required: true
      endpoint:
        description: C(IP:port) to dial, or null when the peer dials us.
        type: str
      allowed_ips:
        description: CIDRs routed to this peer.
        type: list
        elements: str
      keepalive_s:
        description: Persistent keepalive in seconds, 0 for off.
        type: int
      keepalive_reason:
        description: Why this keepalive.
        type: str
      route_mtu:
        description: MTU of this peer's routes, null to follow the interface MTU.
        type: int
      route_mtu_reason:
        description: Why this route MTU.
        type: str
      outer_fragmentation:
        description:
          - Let outer packets towards this peer be fragmented on the way (the controller asks
            for it under a path that cannot carry 1280 + WireGuard's overhead). With wireguard-go
            the route towards the peer's IPv4 endpoint gets its MTU locked at the largest outer
            packet (C(proto 252)), which clears DF; kernel WireGuard never sets DF over IPv4.
        type: bool
        default: false
      peer_keepalive_s:
        description: The keepalive the peer sends us (in the controller's desired state; unused).
        type: int
        default: 0
  reasons:
    description:
      - Reasons for the interface-level settings, by fleetvpn.wg's keys (C(listen_port),
        C(addresses), C(interface), C(private_key)); peer reasons come with the peers.
    type: dict
    default: {}
  implementation:
    description: Kernel WireGuard, wireguard-go, or whichever works (kernel first).
    type: str
    choices: [auto, kernel, userspace]
    default: auto
"""

EXAMPLES = r"""
- name: Apply the tunnel the controller recommends
  fleetvpn.fleet.wireguard:
    interface: wg0
    private_key_file: /var/lib/fleetvpn/wg.key
    listen_port: "{{ desired.listen_port }}"
    addresses: "{{ desired.addresses }}"
    mtu: "{{ desired.interface_mtu }}"
    mtu_reason: "{{ desired.interface_mtu_reason }}"
    peers: "{{ desired.peers }}"
  vars:
    ansible_python_interpreter: /opt/fleetvpn/bin/python
"""

RETURN = r"""
public_key:
  description: The node's public key ("" in check mode before the key exists).
  returned: always
  type: str
changes:
  description: What was (or, in check mode, would be) done, each with its reason.
  returned: always
  type: list
  elements: dict
  sample: [{summary: "peer hub: keepalive 25 => 8", reason: "branch1 is behind NAT: ..."}]
"""

import contextlib
import os
import sys

from ansible.module_utils.basic import AnsibleModule

try:
    from fleetvpn import grammar
    from fleetvpn.agent.outerroute import EndpointRoutes, wanted
    from fleetvpn.wg import diff as wg_diff
    from fleetvpn.wg.keys import generate_private_key, public_key_of
    from fleetvpn.wg.state import PeerSpec, TunnelSpec
    from fleetvpn.wg.tunnel import ApplyError, NotWireGuardError, WgTunnel

    IMPORT_ERROR = None
except ImportError as e:  # reported by main(), with what to do about it
    IMPORT_ERROR = e


def peer_name(peer):
    return peer.get("name") or peer.get("peer") or peer["public_key"][:8] + "…"


def grammar_problem(p):
    """The first value that does not fit fleetvpn.grammar, as ``FIELD: PROBLEM``; None when all
    fit. Checked on the node before anything reaches ``wg`` or ``ip`` (issue 11)."""
    try:
        grammar.ifname(p["interface"], "interface")
        for i, address in enumerate(p["addresses"] or []):
            grammar.interface(address, f"addresses[{i}]")
        grammar.note(p["mtu_reason"] or "", "mtu_reason")
        for key, reason in (p["reasons"] or {}).items():
            grammar.note(str(reason), f"reasons.{key}")
        for i, peer in enumerate(p["peers"]):
            grammar.note(str(peer.get("name") or peer.get("peer") or ""), f"peers[{i}].peer")
            grammar.wg_key(peer.get("public_key"), f"peers[{i}].public_key")
            if peer.get("endpoint"):
                grammar.canonical_endpoint(peer["endpoint"], f"peers[{i}].endpoint")
            for j, cidr in enumerate(peer.get("allowed_ips") or []):
                grammar.cidr(cidr, f"peers[{i}].allowed_ips[{j}]")
            for reason in ("keepalive_reason", "route_mtu_reason"):
                grammar.note(str(peer.get(reason) or ""), f"peers[{i}].{reason}")
    except grammar.GrammarError as e:
        return str(e)
    return None


def desired_spec(p):
    peers = []
    for peer in p["peers"]:
        peers.append(
            PeerSpec(
                public_key=peer["public_key"],
                endpoint=peer.get("endpoint") or None,
                allowed_ips=tuple(peer.get("allowed_ips") or ()),
                keepalive_s=int(peer.get("keepalive_s") or 0),
                route_mtu=None if peer.get("route_mtu") is None else int(peer["route_mtu"]),
                name=peer_name(peer),
                outer_fragmentation=bool(peer.get("outer_fragmentation")),
            )
        )
    return TunnelSpec(
        interface=p["interface"],
        listen_port=p["listen_port"],
        addresses=tuple(p["addresses"]),
        mtu=p["mtu"],
        peers=tuple(peers),
    )


def reasons_of(p):
    reasons = {k: str(v) for k, v in p["reasons"].items()}
    if p["mtu_reason"]:
        reasons["interface_mtu"] = p["mtu_reason"]
    for peer in p["peers"]:
        key = peer["public_key"]
        if peer.get("keepalive_reason"):
            reasons[f"{key}:keepalive"] = peer["keepalive_reason"]
        if peer.get("route_mtu_reason"):
            reasons[f"{key}:route_mtu"] = peer["route_mtu_reason"]
        # A new peer gets its keepalive in the same `wg set`: say why too.
        add = f"{peer_name(peer)} is a desired peer"
        if peer.get("keepalive_reason"):
            add += f"; {peer['keepalive_reason']}"
        reasons[f"{key}:add"] = add
    return reasons


def render(spec_like, desired, public_key):
    """One text for both sides of the diff: only what this module manages, public keys only.
    A peer that dials us (desired endpoint null) keeps whatever endpoint WireGuard learned, so
    its endpoint is not compared."""
    dials_in = {peer.public_key for peer in desired.peers if peer.endpoint is None}
    names = {peer.public_key: peer.name for peer in desired.peers}
    if spec_like is None:
        return "(no interface)\n"
    lines = [f"interface {spec_like['interface']}"]
    if public_key is not None:
        lines.append(f"  public_key {public_key or '(new key)'}")
    lines.append(f"  listen_port {spec_like['listen_port']}")
    lines.append(f"  mtu {spec_like['mtu']}")
    for address in sorted(spec_like["addresses"]):
        lines.append(f"  address {address}")
    for peer in sorted(
        spec_like["peers"], key=lambda q: (names.get(q["public_key"], "~"), q["public_key"])
    ):
        key = peer["public_key"]
        name = names.get(key, "")
        lines.append(f"peer {name + ' ' if name else ''}{key}")
        endpoint = "(learned from the peer)" if key in dials_in else (peer["endpoint"] or "-")
        lines.append(f"  endpoint {endpoint}")
        lines.append(f"  allowed_ips {', '.join(sorted(peer['allowed_ips'])) or '-'}")
        lines.append(f"  keepalive {peer['keepalive_s'] or 'off'}")
        route_mtus = sorted({str(m) if m is not None else "interface" for m in peer["route_mtus"]})
        lines.append(f"  route_mtu {', '.join(route_mtus) or '-'}")
    return "\n".join(lines) + "\n"


def spec_view(spec):
    return {
        "interface": spec.interface,
        "listen_port": spec.listen_port,
        "mtu": spec.mtu,
        "addresses": list(spec.addresses),
        "peers": [
            {
                "public_key": q.public_key,
                "endpoint": q.endpoint,
                "allowed_ips": list(q.allowed_ips),
                "keepalive_s": q.keepalive_s,
                "route_mtus": [q.route_mtu for _ in q.allowed_ips],
            }
            for q in spec.peers
        ],
    }


def state_view(state):
    if state is None:
        return None

    def host(cidr):
        return cidr if "/" in cidr else cidr + ("/128" if ":" in cidr else "/32")

    return {
        "interface": state.interface,
        "listen_port": state.listen_port,
        "mtu": state.mtu,
        "addresses": list(state.addresses),
        "peers": [
            {
                "public_key": q.public_key,
                "endpoint": q.endpoint,
                "allowed_ips": list(q.allowed_ips),
                "keepalive_s": q.keepalive_s,
                "route_mtus": [state.route_mtus.get(host(a)) for a in q.allowed_ips],
            }
            for q in state.peers
        ],
    }


def main():
    peer_options = {
        "name": {"type": "str"},
        # The controller's desired state names a peer `peer`, and says which site it is in.
        "peer": {"type": "str"},
        "site": {"type": "str"},
        "public_key": {"type": "str", "required": True, "no_log": False},
        "endpoint": {"type": "str"},
        "allowed_ips": {"type": "list", "elements": "str"},
        "keepalive_s": {"type": "int"},
        "keepalive_reason": {"type": "str"},
        "route_mtu": {"type": "int"},
        "route_mtu_reason": {"type": "str"},
        "outer_fragmentation": {"type": "bool", "default": False},
        "peer_keepalive_s": {"type": "int", "default": 0},
    }
    module = AnsibleModule(
        argument_spec={
            "interface": {"type": "str", "default": "wg0"},
            "private_key_file": {"type": "path", "required": True, "no_log": False},
            "state": {"type": "str", "default": "present", "choices": ["present", "absent", "key"]},
            "listen_port": {"type": "int", "default": 51820},
            "addresses": {"type": "list", "elements": "str", "default": []},
            "mtu": {"type": "int", "default": 1420},
            "mtu_reason": {"type": "str", "default": ""},
            "peers": {
                "type": "list",
                "elements": "dict",
                "default": [],
                "options": peer_options,
            },
            "reasons": {"type": "dict", "default": {}},
            "implementation": {
                "type": "str",
                "default": "auto",
                "choices": ["auto", "kernel", "userspace"],
            },
        },
        supports_check_mode=True,
    )
    if IMPORT_ERROR is not None:
        module.fail_json(
            msg=(
                f"fleetvpn.wg cannot be imported by {sys.executable} ({IMPORT_ERROR}); run this "
                "task with the Python fleetvpn is installed for (fleetvpn_python / "
                "ansible_python_interpreter)"
            )
        )
    p = module.params
    key_file = p["private_key_file"]
    # wireguard-go stays behind as a daemon of its own; it must not share our session, whose
    # terminal (Ansible asks for a pty) hangs up, with a SIGHUP, when the connection closes.
    with contextlib.suppress(OSError):  # already a session leader
        os.setsid()
    tunnel = WgTunnel(p["interface"], key_file, implementation=p["implementation"])
    result = {"changed": False, "changes": [], "public_key": ""}

    if p["state"] == "absent":
        try:
            present = tunnel.read() is not None
        except NotWireGuardError:
            present = True
        if present and not module.check_mode:
            tunnel.down()
        result["changed"] = present
        if present:
            result["changes"] = [{"summary": f"{p['interface']}: delete", "reason": "state=absent"}]
        module.exit_json(**result)

    key_exists = os.path.exists(key_file)
    if not key_exists:
        result["changed"] = True
        result["changes"].append(
            {
                "summary": f"generate a private key in {key_file}",
                "reason": "the node has no key yet",
            }
        )
        if not module.check_mode:
            os.makedirs(os.path.dirname(key_file) or "/", mode=0o700, exist_ok=True)
            try:
                generate_private_key(key_file)
            except (OSError, ValueError) as e:
                module.fail_json(msg=f"{key_file}: cannot generate the private key: {e}")
            key_exists = True
    if key_exists:
        try:
            result["public_key"] = public_key_of(key_file)
        except (OSError, ValueError) as e:
            module.fail_json(msg=str(e))
    if p["state"] == "key":
        module.exit_json(**result)

    # Check every peer's fields here, so bad input fails before anything is touched.
    for i, peer in enumerate(p["peers"]):
        for field in ("public_key", "allowed_ips"):
            if not peer.get(field):
                who = peer_name(peer) if peer.get("public_key") else "?"
                module.fail_json(msg=f"peers[{i}] ({who}): {field} is required")
    problem = grammar_problem(p)
    if problem is not None:
        module.fail_json(msg=f"refused before touching {grammar.shown(p['interface'])}: {problem}")
    desired = desired_spec(p)
    reasons = reasons_of(p)
    try:
        before = tunnel.read()
    except NotWireGuardError:
        before = None
    diff = {
        "before_header": f"{p['interface']} (live)",
        "after_header": f"{p['interface']} (desired)",
        "before": render(state_view(before), desired, before.public_key if before else None),
        "after": render(spec_view(desired), desired, result["public_key"]),
    }
    try:
        if key_exists:
            changes = tunnel.reconcile(desired, reasons, dry_run=module.check_mode)
        else:  # check mode before the key exists: plan against a key that will be made
            changes = wg_diff.plan(
                desired,
                before,
                reasons,
                private_key_file=key_file,
                implementation=p["implementation"],
            )
    except ApplyError as e:
        module.fail_json(msg=str(e), rolled_back=e.rolled_back, changes=result["changes"])
    except (NotWireGuardError, ValueError, OSError, RuntimeError) as e:
        module.fail_json(msg=f"{p['interface']}: {e}", changes=result["changes"])
    result["changes"] += [{"summary": c.summary, "reason": c.reason} for c in changes]
    outer = []
    if key_exists and not module.check_mode:
        try:
            outer = EndpointRoutes(p["interface"], tunnel.runner).sync(
                wanted(desired, tunnel.read())
            )
        except (NotWireGuardError, ValueError, OSError, RuntimeError) as e:
            module.fail_json(
                msg=f"{p['interface']}: endpoint routes: {e}", changes=result["changes"]
            )
        result["changes"] += [{"summary": line, "reason": "outer_fragmentation"} for line in outer]
    result["changed"] = result["changed"] or bool(changes) or bool(outer)
    if result["changed"]:
        result["diff"] = diff
    module.exit_json(**result)


if __name__ == "__main__":
    main()

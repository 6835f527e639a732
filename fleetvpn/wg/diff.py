"""Desired vs actual -> the smallest list of live changes (after wireguard-tools ``sync_conf``).

Pure: :func:`plan` takes a :class:`TunnelSpec` and a :class:`TunnelState` (or None when the
interface does not exist) and returns :class:`Change` objects in the order they must run. It
never runs anything; :class:`fleetvpn.wg.tunnel.WgTunnel` does.

What is minimal:

- a peer's keepalive, endpoint or allowed IPs: one ``wg set IF peer KEY …`` each, touching only
  that attribute; a new peer: one ``wg set`` with everything; a gone peer: ``… remove``
- the interface MTU: ``ip link set IF mtu N``; a peer's route MTU: ``ip route replace CIDR dev IF
  mtu lock N`` for each of its routes that differs (``ip route replace CIDR dev IF`` for None);
  an IPv6 route under a route MTU below 1280 gets ``mtu lock 1280 advmss M``
  (:func:`fleetvpn.grammar.ipv6_route`)
- addresses: ``ip addr add`` / ``del`` of exactly the ones that differ
- the interface is created only when ``actual`` is None (absent); nothing here ever deletes and
  re-creates it for a setting.

Routes: every allowed IP of every desired peer gets a route on the interface (``/0`` ones are
skipped: a default route through the tunnel needs policy routing, which this does not do). Any
other non-kernel route on the interface (``TunnelState.route_mtus``) is removed. A desired peer
with ``endpoint=None`` keeps whatever endpoint WireGuard learned from it.

Preshared keys are not managed (never read, never set).

Refuse, never escape (issue 11). Every value that reaches an argv is parsed again by
:mod:`fleetvpn.grammar` here, whoever built the spec (the agent, the Ansible module, a test),
and the argv carries the parsed value's canonical text: the interface name
(:func:`~fleetvpn.grammar.ifname`), the listen port, addresses and allowed IPs
(``ADDRESS/PREFIX``, ASCII, no scope id), keys (base64 of 32 bytes: never a ``--flag``),
endpoints (:class:`~fleetvpn.grammar.Endpoint`), MTUs (:func:`~fleetvpn.grammar.tunnel_mtu`,
the interface's with the IPv6 floor when the spec carries IPv6; a route's with the IPv4 one,
since IPv6 routes are raised to 1280), keepalive (0..65535, wg(8)'s range), the
private key file (an absolute path on one printable line) and peer names (one printable line:
they reach logs). A value that does not parse is :class:`SpecError` (a ValueError naming the
field) before any command is planned. Values read back from the interface (used to roll back)
go through the same grammars; a learned endpoint that does not parse (a link-local address
with a scope id) is left alone rather than written back.

Reasons. Every change carries a one-line ``reason``, taken from the caller's ``reasons`` mapping
when it has the key, else a plain default that says no reason was given. Keys:

================================  =========================================================
``"interface"``                   the interface is created
``"private_key"``                 the private key is (re)set
``"listen_port"``                 the UDP listen port changes
``"interface_mtu"``               the interface MTU changes
``"addresses"``                   an address is added or removed
``f"{public_key}:add"``           the peer is added
``f"{public_key}:remove"``        the peer is removed (and its routes)
``f"{public_key}:endpoint"``      the peer's endpoint changes
``f"{public_key}:allowed_ips"``   the peer's allowed IPs change
``f"{public_key}:keepalive"``     the peer's persistent keepalive changes
``f"{public_key}:route_mtu"``     the MTU of the peer's routes changes (or they are added)
``"routes"``                      a route that belongs to no desired peer is removed
================================  =========================================================
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from .. import grammar
from .iproute import canonical_cidr, canonical_network
from .state import TunnelSpec, TunnelState

Argv = tuple[str, ...]

#: What ``wireguard-go`` needs in its environment to run where a kernel module could exist.
USERSPACE_ENV = "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1"

ChangeKind = Literal[
    "create",
    "delete",
    "private_key",
    "listen_port",
    "interface_mtu",
    "address_del",
    "address_add",
    "link_up",
    "link_down",
    "peer_remove",
    "peer_add",
    "endpoint",
    "allowed_ips",
    "keepalive",
    "route_del",
    "route",
]


@dataclass(frozen=True)
class Change:
    """One live change: what it does (``summary``, one line for logs), why (``reason``), and
    the commands that do it (``argvs``, run in order). ``fallback`` (creation with
    ``implementation="auto"`` only): commands to run instead when ``argvs[0]`` fails."""

    kind: ChangeKind
    summary: str
    reason: str
    argvs: tuple[Argv, ...]
    fallback: tuple[Argv, ...] = field(default=())

    @property
    def argv(self) -> Argv:
        return self.argvs[0]

    def __str__(self) -> str:
        return f"{self.summary} ({self.reason})"


class SpecError(ValueError):
    """A value of a spec (or of the state read back) that must not reach ``wg``/``ip``."""


KEEPALIVE_MAX_S = 65535  # wg(8): persistent-keepalive 1..65535, or off


def _checked(parse: object, value: object, what: str) -> object:
    try:
        return parse(value, what)  # type: ignore[operator]
    except grammar.GrammarError as e:
        text = str(e)
        raise SpecError(text if text.startswith(what) else f"{what}: {text}") from None


def check_spec(spec: TunnelSpec) -> None:
    """Refuse a spec any value of which does not fit its grammar (module docstring)."""
    _checked(grammar.ifname, spec.interface, "interface")
    _checked(grammar.port, spec.listen_port, "listen_port")
    ipv6 = False
    for i, address in enumerate(spec.addresses):
        ipv6 |= _interface_of(address, f"addresses[{i}]").version == 6
    for i, p in enumerate(spec.peers):
        where = f"peers[{i}]"
        _checked(grammar.wg_key, p.public_key, f"{where}.public_key")
        if p.name:
            _checked(lambda v, w: grammar.note(v, w, 100), p.name, f"{where}.name")
        if p.endpoint is not None:
            _checked(grammar.endpoint, p.endpoint, f"{where}.endpoint")
        if isinstance(p.allowed_ips, str):
            raise SpecError(f"{where}.allowed_ips: a tuple of CIDRs, not a string")
        for j, cidr in enumerate(p.allowed_ips):
            ipv6 |= _interface_of(cidr, f"{where}.allowed_ips[{j}]").version == 6
        keepalive = p.keepalive_s
        if isinstance(keepalive, bool) or not isinstance(keepalive, int):
            raise SpecError(f"{where}.keepalive_s: not an integer")
        if not 0 <= keepalive <= KEEPALIVE_MAX_S:
            raise SpecError(f"{where}.keepalive_s: {keepalive} out of range (0..65535)")
    _checked(lambda v, w: grammar.tunnel_mtu(v, w, ipv6=ipv6), spec.mtu, "mtu")
    for i, p in enumerate(spec.peers):
        if p.route_mtu is not None:
            route_mtu_of = lambda v, w: grammar.tunnel_mtu(v, w, ipv6=False)  # noqa: E731
            _checked(route_mtu_of, p.route_mtu, f"peers[{i}].route_mtu")


def _interface_of(text: object, what: str) -> grammar.IPInterface:
    """An address or allowed IP: ``ADDRESS/PREFIX`` by the grammar (host bits allowed, as wg
    and ip take them; the argv gets the canonical form)."""
    return _checked(grammar.interface, text, what)  # type: ignore[return-value]


def _private_key_file(path: str) -> str:
    _checked(grammar.note, path, "private_key_file")
    if not path.startswith("/"):
        raise SpecError(f"private_key_file: {grammar.shown(path)} is not an absolute path")
    return path


# The shape both sides are compared in: canonical CIDRs, routes as (mtu, locked, advmss).
RouteValue = tuple[int | None, bool, int | None]


@dataclass(frozen=True)
class _Peer:
    endpoint: str | None  # None: leave as is
    allowed_ips: tuple[str, ...]  # canonical networks, in the caller's order
    keepalive_s: int
    label: str


@dataclass(frozen=True)
class _Shape:
    listen_port: int | None  # None: unknown (a fresh interface)
    mtu: int | None
    addresses: tuple[str, ...]
    is_up: bool
    public_key: str
    peers: dict[str, _Peer]
    routes: dict[str, RouteValue]
    route_owner: dict[str, str]  # route CIDR -> public key


def label(public_key: str, name: str = "") -> str:
    """How a peer is named in summaries: its name, else the start of its public key."""
    return name or f"{public_key[:8]}…"


def plan(
    desired: TunnelSpec,
    actual: TunnelState | None,
    reasons: Mapping[str, str] | None = None,
    *,
    private_key_file: str | None = None,
    public_key: str | None = None,
    implementation: Literal["auto", "kernel", "userspace"] = "auto",
) -> list[Change]:
    """The changes that turn ``actual`` into ``desired``, in order; [] when nothing differs.

    ``private_key_file``: the key file (a path, never the key) to set on a fresh interface, or
    on an existing one whose public key differs from ``public_key`` (when that is given).
    ``implementation`` decides how an absent interface is created.
    """
    reasons = reasons or {}
    check_spec(desired)
    if private_key_file is not None:
        _private_key_file(private_key_file)
    target = _shape_of_spec(desired)
    changes: list[Change] = []
    if actual is None:
        changes.append(_create(desired.interface, implementation, reasons))
        now = _Shape(None, None, (), False, "", {}, {}, {})
    else:
        now = _shape_of_state(actual)
    if private_key_file is not None and (
        actual is None or (public_key is not None and public_key != now.public_key)
    ):
        changes.append(
            Change(
                "private_key",
                f"{desired.interface}: private key from {private_key_file}",
                reasons.get(
                    "private_key",
                    "new interface" if actual is None else "the interface has another key",
                ),
                (("wg", "set", desired.interface, "private-key", private_key_file),),
            )
        )
    changes += _diff(desired.interface, target, now, reasons)
    return changes


def plan_restore(before: TunnelState | None, now: TunnelState | None) -> list[Change]:
    """The changes that bring the interface back to ``before`` (used to roll back a failed
    apply). ``before`` None: delete the interface. The private key cannot be restored (only
    its file is known, and the file holds the new key)."""
    if before is None:
        if now is None:
            return []
        return [delete_change(now.interface, "rollback: the interface did not exist before")]
    reasons: dict[str, str] = {}
    target = _shape_of_state(before)
    if now is None:
        raise ValueError(f"{before.interface}: cannot restore a deleted interface in place")
    current = _shape_of_state(now)
    for kind in ("listen_port", "interface_mtu", "addresses", "routes"):
        reasons[kind] = "rollback"
    for key in {*target.peers, *current.peers}:
        for what in ("add", "remove", "endpoint", "allowed_ips", "keepalive", "route_mtu"):
            reasons[f"{key}:{what}"] = "rollback"
    return _diff(before.interface, target, current, reasons)


def delete_change(interface: str, reason: str) -> Change:
    return Change(
        "delete", f"{interface}: delete the interface", reason, (("ip", "link", "del", interface),)
    )


def create_argvs(interface: str) -> tuple[Argv, Argv]:
    """(kernel, userspace) commands that create the interface. wireguard-go daemonizes once
    its TUN device and control socket exist, so the next ``wg set`` finds it."""
    return (
        ("ip", "link", "add", interface, "type", "wireguard"),
        ("env", USERSPACE_ENV, "wireguard-go", interface),
    )


def _create(interface: str, implementation: str, reasons: Mapping[str, str]) -> Change:
    kernel, userspace = create_argvs(interface)
    reason = reasons.get("interface", "the interface does not exist")
    if implementation == "kernel":
        return Change("create", f"{interface}: create (kernel WireGuard)", reason, (kernel,))
    if implementation == "userspace":
        return Change("create", f"{interface}: create (wireguard-go)", reason, (userspace,))
    return Change(
        "create",
        f"{interface}: create (kernel WireGuard, else wireguard-go)",
        reason,
        (kernel,),
        fallback=(userspace,),
    )


def _shape_of_spec(spec: TunnelSpec) -> _Shape:
    peers: dict[str, _Peer] = {}
    routes: dict[str, RouteValue] = {}
    owner: dict[str, str] = {}
    for p in spec.peers:
        if p.public_key in peers:
            raise ValueError(f"{spec.interface}: peer {label(p.public_key, p.name)} listed twice")
        allowed = tuple(dict.fromkeys(_network(spec.interface, c) for c in p.allowed_ips))
        peers[p.public_key] = _Peer(p.endpoint, allowed, p.keepalive_s, label(p.public_key, p.name))
        for cidr in allowed:
            if ipaddress.ip_network(cidr).prefixlen == 0:
                continue
            if p.route_mtu is None:
                routes[cidr] = (None, False, None)
            elif ":" in cidr:
                mtu6, advmss = grammar.ipv6_route(p.route_mtu)
                routes[cidr] = (mtu6, True, advmss)
            else:
                routes[cidr] = (p.route_mtu, True, None)
            owner[cidr] = p.public_key
    addresses = tuple(dict.fromkeys(_address(spec.interface, a) for a in spec.addresses))
    return _Shape(spec.listen_port, spec.mtu, addresses, True, "", peers, routes, owner)


def _shape_of_state(state: TunnelState) -> _Shape:
    _checked(grammar.ifname, state.interface, "interface (read back)")
    peers = {
        str(_checked(grammar.wg_key, p.public_key, "peer key (read back)")): _Peer(
            _learned_endpoint(p.endpoint),
            tuple(_state_network(c, "allowed IP (read back)") for c in p.allowed_ips),
            p.keepalive_s,
            label(p.public_key),
        )
        for p in state.peers
    }
    routes: dict[str, RouteValue] = {}
    for cidr, mtu in state.route_mtus.items():
        key = _state_network(cidr, "route (read back)")
        unlocked = state.unlocked_route_mtus.get(cidr)
        advmss = state.route_advmss.get(cidr)
        routes[key] = (mtu, True, advmss) if mtu is not None else (unlocked, False, advmss)
    owner = {c: key for key, p in peers.items() for c in p.allowed_ips}
    addresses = tuple(str(_interface_of(a, "address (read back)")) for a in state.addresses)
    return _Shape(
        state.listen_port,
        state.mtu,
        addresses,
        state.is_up,
        state.public_key,
        peers,
        routes,
        owner,
    )


def _learned_endpoint(endpoint: str | None) -> str | None:
    """An endpoint read back: its canonical text, or None (left alone, never written back)
    when the grammar refuses it (a link-local address with a scope id)."""
    if endpoint is None:
        return None
    try:
        return str(grammar.endpoint(endpoint, allow_dns=False))
    except grammar.GrammarError:
        return None


def _state_network(cidr: str, what: str) -> str:
    return str(_interface_of(cidr, what).network)


def _network(interface: str, cidr: str) -> str:
    try:
        return canonical_network(cidr)
    except ValueError:
        raise ValueError(f"{interface}: allowed IP {cidr!r} is not a CIDR") from None


def _address(interface: str, cidr: str) -> str:
    try:
        return canonical_cidr(cidr)
    except ValueError:
        raise ValueError(f"{interface}: address {cidr!r} is not a CIDR") from None


def _describe_route(value: RouteValue | None) -> str:
    if value is None:
        return "absent"
    mtu, locked, advmss = value
    text = "no mtu" if mtu is None else f"mtu lock {mtu}" if locked else f"mtu {mtu}"
    return text if advmss is None else f"{text} advmss {advmss}"


def _route_argv(interface: str, cidr: str, value: RouteValue) -> Argv:
    mtu, locked, advmss = value
    argv: Argv = ("ip", "route", "replace", cidr, "dev", interface)
    if mtu is not None:
        argv += ("mtu", "lock", str(mtu)) if locked else ("mtu", str(mtu))
    if advmss is not None:
        argv += ("advmss", str(advmss))
    return argv


def _keepalive(seconds: int) -> str:
    return "off" if seconds == 0 else f"{seconds} s"


def _diff(interface: str, target: _Shape, now: _Shape, reasons: Mapping[str, str]) -> list[Change]:
    out: list[Change] = []
    wg_set = ("wg", "set", interface)

    def why(key: str, default: str) -> str:
        return reasons.get(key, default)

    if target.listen_port is not None and target.listen_port != now.listen_port:
        was = "unset" if now.listen_port is None else str(now.listen_port)
        out.append(
            Change(
                "listen_port",
                f"{interface}: listen port {was} => {target.listen_port}",
                why("listen_port", "desired listen port; no reason given"),
                ((*wg_set, "listen-port", str(target.listen_port)),),
            )
        )
    if target.mtu is not None and target.mtu != now.mtu:
        was = "default" if now.mtu is None else str(now.mtu)
        out.append(
            Change(
                "interface_mtu",
                f"{interface}: mtu {was} => {target.mtu}",
                why("interface_mtu", "desired interface MTU; no reason given"),
                (("ip", "link", "set", "dev", interface, "mtu", str(target.mtu)),),
            )
        )
    for address in now.addresses:
        if address not in target.addresses:
            out.append(
                Change(
                    "address_del",
                    f"{interface}: remove address {address}",
                    why("addresses", "not a desired address"),
                    (("ip", "address", "del", address, "dev", interface),),
                )
            )
    for address in target.addresses:
        if address not in now.addresses:
            out.append(
                Change(
                    "address_add",
                    f"{interface}: add address {address}",
                    why("addresses", "a desired address"),
                    (("ip", "address", "add", address, "dev", interface),),
                )
            )
    if target.is_up != now.is_up:
        state = "up" if target.is_up else "down"
        out.append(
            Change(
                "link_up" if target.is_up else "link_down",
                f"{interface}: link {state}",
                why("interface", "the interface was down" if target.is_up else "rollback"),
                (("ip", "link", "set", "dev", interface, state),),
            )
        )
    for key, old_peer in now.peers.items():
        if key not in target.peers:
            out.append(
                Change(
                    "peer_remove",
                    f"remove peer {old_peer.label}",
                    why(f"{key}:remove", "not a desired peer"),
                    ((*wg_set, "peer", key, "remove"),),
                )
            )
    for key, peer in target.peers.items():
        have = now.peers.get(key)
        if have is None:
            argv: Argv = (*wg_set, "peer", key)
            parts = []
            if peer.endpoint is not None:
                argv += ("endpoint", peer.endpoint)
                parts.append(f"endpoint {peer.endpoint}")
            argv += ("allowed-ips", ",".join(peer.allowed_ips))
            argv += ("persistent-keepalive", _keepalive_arg(peer.keepalive_s))
            parts.append(f"allowed-ips {','.join(peer.allowed_ips) or '(none)'}")
            parts.append(f"keepalive {_keepalive(peer.keepalive_s)}")
            out.append(
                Change(
                    "peer_add",
                    f"add peer {peer.label}: {', '.join(parts)}",
                    why(f"{key}:add", "a desired peer"),
                    (argv,),
                )
            )
            continue
        if peer.endpoint is not None and peer.endpoint != have.endpoint:
            out.append(
                Change(
                    "endpoint",
                    f"peer {peer.label}: endpoint {have.endpoint or '(none)'} => {peer.endpoint}",
                    why(f"{key}:endpoint", "desired endpoint; no reason given"),
                    ((*wg_set, "peer", key, "endpoint", peer.endpoint),),
                )
            )
        if set(peer.allowed_ips) != set(have.allowed_ips):
            out.append(
                Change(
                    "allowed_ips",
                    f"peer {peer.label}: allowed-ips {','.join(have.allowed_ips) or '(none)'}"
                    f" => {','.join(peer.allowed_ips) or '(none)'}",
                    why(f"{key}:allowed_ips", "desired allowed IPs; no reason given"),
                    ((*wg_set, "peer", key, "allowed-ips", ",".join(peer.allowed_ips)),),
                )
            )
        if peer.keepalive_s != have.keepalive_s:
            out.append(
                Change(
                    "keepalive",
                    f"peer {peer.label}: keepalive {_keepalive(have.keepalive_s)}"
                    f" => {_keepalive(peer.keepalive_s)}",
                    why(f"{key}:keepalive", "desired keepalive; no reason given"),
                    (
                        (
                            *wg_set,
                            "peer",
                            key,
                            "persistent-keepalive",
                            _keepalive_arg(peer.keepalive_s),
                        ),
                    ),
                )
            )
    for cidr in now.routes:
        if cidr not in target.routes:
            owner = now.route_owner.get(cidr)
            reason = (
                why(f"{owner}:remove", "its peer is no longer desired")
                if owner is not None and owner not in target.peers
                else why("routes", "not among the desired peers' allowed IPs")
            )
            out.append(
                Change(
                    "route_del",
                    f"{interface}: remove route {cidr}",
                    reason,
                    (("ip", "route", "del", cidr, "dev", interface),),
                )
            )
    by_peer: dict[str, list[str]] = {}
    for cidr, value in target.routes.items():
        if now.routes.get(cidr) != value:
            by_peer.setdefault(target.route_owner.get(cidr, ""), []).append(cidr)
    for key, cidrs in by_peer.items():
        first = cidrs[0]
        olds = {_describe_route(now.routes.get(c)) for c in cidrs}
        new = _describe_route(target.routes[first])
        peer_label = target.peers[key].label if key in target.peers else interface
        same_value = all(target.routes[c] == target.routes[first] for c in cidrs)
        summary = f"peer {peer_label}: route {', '.join(cidrs)} {' / '.join(sorted(olds))} => "
        summary += new if same_value else "per route"
        mtu = target.routes[first][0]
        out.append(
            Change(
                "route",
                summary,
                why(
                    f"{key}:route_mtu",
                    f"route MTU {mtu}; no reason given"
                    if mtu is not None
                    else "routes for the peer's allowed IPs",
                ),
                tuple(_route_argv(interface, c, target.routes[c]) for c in cidrs),
            )
        )
    return out


def _keepalive_arg(seconds: int) -> str:
    return "off" if seconds == 0 else str(seconds)

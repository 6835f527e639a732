"""The controller's desired state (``GET /v1/nodes/NAME/desired``) → what the tunnel layer applies.

Pure. :func:`parse_desired` validates the document (``DesiredError`` names the field) and returns
a :class:`Desired`: the :class:`~fleetvpn.wg.state.TunnelSpec` for ``WgTunnel.reconcile``, the
reason of every value (logged with each change), and per peer what the agent needs to probe it
(name, site, endpoint, tunnel address). The agent keeps the last document it applied without
error on disk and starts from it, so a restart or a controller outage re-applies the same thing
(a no-op on an established tunnel: reconcile applies only differences).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fleetvpn.model import MTU_RANGE, NAME_PATTERN, parse_endpoint
from fleetvpn.wg.state import PeerSpec, TunnelSpec

_NAME_RE = re.compile(NAME_PATTERN)


class DesiredError(ValueError):
    """``str()`` reads ``desired state: FIELD: PROBLEM``."""


@dataclass(frozen=True)
class PeerPlan:
    name: str
    site: str
    public_key: str
    endpoint: str | None  # where this node dials the peer; None: the peer dials us
    tunnel_ipv4: str | None  # the peer's tunnel address (RTT/loss probes go there)
    route_mtu: int
    keepalive_s: int


@dataclass(frozen=True)
class Desired:
    node: str
    site: str
    spec: TunnelSpec
    reasons: Mapping[str, str]
    peers: tuple[PeerPlan, ...]
    document: Mapping[str, Any]  # as received: what is saved as the last good state

    def peer_by_key(self) -> dict[str, PeerPlan]:
        return {p.public_key: p for p in self.peers}


def _get(doc: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in doc:
        raise DesiredError(f"desired state: {where}{key}: missing")
    value = doc[key]
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise DesiredError(f"desired state: {where}{key}: unexpected value {value!r}")
    return value


def parse_desired(doc: Any, *, interface: str, listen_port: int) -> Desired:
    """``interface`` and ``listen_port`` come from the agent's own config (it owns them)."""
    if not isinstance(doc, Mapping):
        raise DesiredError("desired state: not a JSON object")
    node = _get(doc, "node", str, "")
    site = _get(doc, "site", str, "")
    mtu = _get(doc, "interface_mtu", int, "")
    if not MTU_RANGE[0] <= mtu <= MTU_RANGE[1]:
        raise DesiredError(f"desired state: interface_mtu: {mtu} out of range")
    addresses = _get(doc, "addresses", list, "")
    for i, cidr in enumerate(addresses):
        try:
            ipaddress.ip_interface(str(cidr))
        except ValueError:
            raise DesiredError(f"desired state: addresses[{i}]: {cidr!r} is not a CIDR") from None
    reasons: dict[str, str] = {
        "interface_mtu": str(doc.get("interface_mtu_reason", "")),
        "addresses": "this node's tunnel addresses in the desired state",
        "listen_port": "listen_port in the agent's config",
    }
    specs: list[PeerSpec] = []
    plans: list[PeerPlan] = []
    for i, raw in enumerate(_get(doc, "peers", list, "")):
        where = f"peers[{i}]."
        if not isinstance(raw, Mapping):
            raise DesiredError(f"desired state: peers[{i}]: not an object")
        name = _get(raw, "peer", str, where)
        key = _get(raw, "public_key", str, where)
        endpoint = raw.get("endpoint")
        if endpoint is not None:
            try:
                parse_endpoint(str(endpoint))
            except ValueError as e:
                raise DesiredError(f"desired state: {where}endpoint: {e}") from None
        allowed = tuple(str(a) for a in _get(raw, "allowed_ips", list, where))
        for cidr in allowed:
            try:
                ipaddress.ip_network(cidr)
            except ValueError:
                raise DesiredError(
                    f"desired state: {where}allowed_ips: {cidr!r} is not a CIDR"
                ) from None
        keepalive = _get(raw, "keepalive_s", int, where)
        route_mtu = _get(raw, "route_mtu", int, where)
        if not 0 <= keepalive <= 65535:
            raise DesiredError(f"desired state: {where}keepalive_s: {keepalive} out of range")
        if not MTU_RANGE[0] <= route_mtu <= MTU_RANGE[1]:
            raise DesiredError(f"desired state: {where}route_mtu: {route_mtu} out of range")
        specs.append(PeerSpec(key, endpoint, allowed, keepalive, route_mtu, name))
        v4 = [a.split("/")[0] for a in allowed if ":" not in a]
        plans.append(
            PeerPlan(name, str(raw.get("site", "")), key, endpoint, v4[0] if v4 else None,
                     route_mtu, keepalive)
        )  # fmt: skip
        route_why = str(raw.get("route_mtu_reason", ""))
        keepalive_why = str(raw.get("keepalive_reason", ""))
        reasons[f"{key}:keepalive"] = f"{name}: {keepalive_why}"
        reasons[f"{key}:route_mtu"] = f"{name}: {route_why}"
        reasons[f"{key}:add"] = (
            f"{name} (site {raw.get('site', '?')}) is a peer in the desired state"
        )
        reasons[f"{key}:endpoint"] = f"{name}'s endpoint in the desired state"
        reasons[f"{key}:allowed_ips"] = f"{name}'s tunnel addresses in the desired state"
    if not _valid_name(node) or not _valid_name(site):
        raise DesiredError(f"desired state: node/site: {node!r}/{site!r} are not names")
    spec = TunnelSpec(interface, listen_port, tuple(str(a) for a in addresses), mtu, tuple(specs))
    return Desired(node, site, spec, reasons, tuple(plans), doc)


def _valid_name(text: str) -> bool:
    return _NAME_RE.fullmatch(text) is not None

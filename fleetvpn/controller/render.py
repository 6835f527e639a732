"""Config files from a node's desired state (Jinja2 templates that only format).

Every value — MTUs, keepalives, routes, and the reason for each — is computed in Python
(:func:`fleetvpn.controller.fleet.desired_json`); templates only loop over precomputed lists
(style.md rule 11). No template ever sees a private key: nodes keep theirs in their own file.

Contract: ``render(desired, kind)`` returns ``{file name: text}``; ``kind`` is one of
:data:`KINDS`; an unknown kind raises ``KeyError``.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import jinja2

KINDS: dict[str, tuple[tuple[str, str], ...]] = {
    # kind → (template, file name pattern) pairs
    "wg-quick": (("wg-quick.conf.j2", "{interface}.conf"),),
    "networkd": (
        ("networkd.netdev.j2", "{interface}.netdev"),
        ("networkd.network.j2", "{interface}.network"),
    ),
    "host_vars": (("host_vars.yml.j2", "{node}.yml"),),
}


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("fleetvpn.controller", "templates"),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,  # config files, not HTML
    )


def routes(desired: dict[str, Any]) -> list[dict[str, Any]]:
    """One route per peer address, carrying that link's MTU (the kernel and TCP follow it)."""
    return [
        {
            "destination": ip,
            "mtu": peer["route_mtu"],
            "reason": f"{peer['peer']}: {peer['route_mtu_reason']}",
        }
        for peer in desired["peers"]
        for ip in peer["allowed_ips"]
    ]


def render(desired: dict[str, Any], kind: str) -> dict[str, str]:
    context = {**desired, "routes": routes(desired)}
    env = _environment()
    return {
        pattern.format(**desired): env.get_template(template).render(context)
        for template, pattern in KINDS[kind]
    }

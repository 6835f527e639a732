"""Which admin override applies to a setting of one node towards one peer.  Pure."""

from __future__ import annotations

from collections.abc import Iterable

from fleetvpn.model import Override, Setting


def find_override(
    overrides: Iterable[Override], setting: Setting, node: str, peer: str | None, site: str | None
) -> Override | None:
    """The override for ``setting`` applied by ``node`` (towards ``peer``), or None.

    The most specific wins: link ``node>peer``, then node ``node``, then site ``site``.
    ``peer`` None skips link overrides; ``site`` None skips site overrides.
    """
    wanted = [("link", f"{node}>{peer}")] if peer is not None else []
    wanted.append(("node", node))
    if site is not None:
        wanted.append(("site", site))
    found = {(o.scope, o.target): o for o in overrides if o.setting == setting}
    for key in wanted:
        if key in found:
            return found[key]
    return None


def describe(override: Override) -> str:
    """``override by admin (link hub>branch1, "note")``: the part of a reason naming it."""
    note = f', "{override.note}"' if override.note else ""
    return f"override by admin ({override.scope} {override.target}{note})"

"""Which admin override applies to a setting of one node towards one peer.  Pure."""

from __future__ import annotations

from collections.abc import Iterable

from fleetvpn.model import Override, Setting


class OverrideIndex:
    """Overrides indexed by (setting, scope, target): one lookup per decision, whatever their
    number (a fleet of 100,000 links asks 200,000 times)."""

    __slots__ = ("_by_key", "_link_settings", "_node_settings")

    def __init__(self, overrides: Iterable[Override]) -> None:
        self._by_key = {(o.setting, o.scope, o.target): o for o in overrides}
        # settings with any link (node) override: the others skip that lookup and its key
        self._link_settings = {s for s, scope, _ in self._by_key if scope == "link"}
        self._node_settings = {s for s, scope, _ in self._by_key if scope == "node"}

    def find(
        self, setting: Setting, node: str, peer: str | None, site: str | None
    ) -> Override | None:
        """The override for ``setting`` applied by ``node`` (towards ``peer``), or None.

        The most specific wins: link ``node>peer``, then node ``node``, then site ``site``.
        ``peer`` None skips link overrides; ``site`` None skips site overrides.
        """
        by_key = self._by_key
        if not by_key:
            return None
        if (
            peer is not None
            and setting in self._link_settings
            and (found := by_key.get((setting, "link", f"{node}>{peer}")))
        ):
            return found
        if setting in self._node_settings and (found := by_key.get((setting, "node", node))):
            return found
        return by_key.get((setting, "site", site)) if site is not None else None

    def has_links(self, setting: Setting) -> bool:
        """Whether any link override of ``setting`` exists (if not, :meth:`find` gives the same
        answer for every peer of a node)."""
        return setting in self._link_settings

    def site(self, setting: Setting, site: str) -> Override | None:
        """The site-scope override of ``setting`` for ``site`` only, or None."""
        return self._by_key.get((setting, "site", site))


def find_override(
    overrides: Iterable[Override], setting: Setting, node: str, peer: str | None, site: str | None
) -> Override | None:
    """One lookup without an index (see :meth:`OverrideIndex.find`)."""
    return OverrideIndex(overrides).find(setting, node, peer, site)


def describe(override: Override) -> str:
    """``override by admin (link hub>branch1, "note")``: the part of a reason naming it."""
    note = f', "{override.note}"' if override.note else ""
    return f"override by admin ({override.scope} {override.target}{note})"

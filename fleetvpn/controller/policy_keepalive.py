"""Keepalive policy: per site from measured NAT lifetimes, per (node, peer) where it is needed.

Pure: every input is an argument, ``now`` included; history comes in as the previous
:class:`KeepaliveState` and goes out as the next one (the store keeps it between evaluations).

Per site (:func:`decide_site_keepalive`):
1. Proposal.  T = the smallest established-flow mapping lifetime measured at the site's NATed or
   filtered nodes within ``LIFETIME_WINDOW_S`` (a node's latest measurement if none is that
   recent); K = ``keepalive_for(T)`` = ⌊(T − d)/2⌋, d = max(2 s, T/10), clamped to
   [KEEPALIVE_MIN_S, KEEPALIVE_MAX_S].  0 when every measured node has neither NAT nor a
   stateful filter; the default 25 s while nothing is measured.
2. Hysteresis (noise must not flap the setting).  The proposal replaces the current value only
   when it differs by more than max(HYSTERESIS_MIN_S, HYSTERESIS_RATIO × current).  A lower value
   applies at once (a keepalive above the lifetime loses reachability); a higher one (and "off")
   only after it has been proposed continuously for RAISE_CONFIRM_S — the lowest value proposed
   meanwhile is the one adopted.  The first measurement after the default applies at once.
3. Eviction.  A link that dies although its keepalive K was below T (a NAT evicting assured
   flows under table pressure, or a NAT reboot) caps the site's keepalive at max(EVICTION_FLOOR_S,
   ⌊K/2⌋) (never above K); a loss reported with a K at or above the current cap (the agent had not
   applied it yet) changes nothing.  A loss with K ≥ T is an expected expiry: the rule already
   fixes it.  After RAISE_INTERVAL_S without a further lowering the cap grows by RAISE_FACTOR
   (at least 1 s) per interval, and is lifted once it reaches the measured value: 27 → 34 → 43
   → 54 takes three quiet hours, 5 → 7 → 9 → 12 → 15 → 19 → 24 → 30 → 38 → 48 → 54 ten.
Applied = min(filtered value, cap).  Overrides (link > node > site) beat all of it.

Per (node, peer) (:func:`peer_keepalives`): a NATed or filtered node sends its site's keepalive to
every peer (any peer may need to reach it first; each 5-tuple has its own NAT timer); a node with
neither sends none (0) — the public hub gets 0 towards a NATed branch; a node whose NAT is not
measured yet gets the site's value, or the default 25 s.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Final

from fleetvpn import grammar
from fleetvpn.controller.policy_overrides import OverrideIndex, describe
from fleetvpn.controller.trusted import fast_constructor
from fleetvpn.engines.natlife import DEFAULT_KEEPALIVE_S, keepalive_for
from fleetvpn.model import (
    KeepaliveState,
    MappingLoss,
    NatMeasurement,
    Override,
    PeerKeepalive,
    Report,
    SiteKeepalive,
    Source,
    format_time,
    parse_endpoint,
)

KEEPALIVE_MIN_S: Final = 1  # wg(8)'s smallest; the rule itself decides how low to go
# A lost mapping (NAT reboot, eviction) is re-created by the next keepalive, so K bounds how long
# a node stays unreachable from outside; 120 s (REKEY_AFTER_TIME) keeps that under the 180 s
# after which WireGuard drops a session.  Also the top of keepalive_for's default range.
KEEPALIVE_MAX_S: Final = grammar.KEEPALIVE_MAX_S
LIFETIME_WINDOW_S: Final = 86400.0  # "recent": a day covers the busy hour's table pressure
HYSTERESIS_MIN_S: Final = 2  # below the rule's own margin d >= 2 s, so a kept value stays safe
HYSTERESIS_RATIO: Final = 0.10  # ≈ the rule's margin T/10, halved by the /2
RAISE_CONFIRM_S: Final = 3600.0  # raising is never urgent: an hour of consistent proposals
EVICTION_FLOOR_S: Final = 5  # below this, keepalives do not beat a table that evicts by pressure
RAISE_INTERVAL_S: Final = 3600.0  # a quiet hour per step of the eviction cap
RAISE_FACTOR: Final = 1.25

_new_peer = fast_constructor(PeerKeepalive)  # 200,000 per recompute of a large fleet


@dataclass(frozen=True, slots=True)
class NodeNat:
    """One node's NAT history: its recent measurements, any order (empty: never measured)."""

    node: str
    site: str
    measurements: tuple[NatMeasurement, ...] = ()

    @property
    def latest(self) -> NatMeasurement | None:
        return max(self.measurements, key=lambda m: m.measured_at, default=None)


@dataclass(frozen=True, slots=True)
class _Proposal:
    keepalive_s: int
    source: Source
    reason: str
    lifetime_s: float | None  # the smallest measured T
    lifetime_bound_s: float | None  # T, or the bound T is known to exceed (judges evictions)


def _age(now: datetime, then: datetime) -> float:
    return (now - then).total_seconds()


def _propose(site: str, nodes: Sequence[NodeNat], now: datetime) -> _Proposal:
    expiring: list[tuple[NodeNat, list[NatMeasurement], bool]] = []
    open_nodes = 0
    for n in nodes:
        latest = n.latest
        if latest is None:
            continue
        if not (latest.nat or latest.stateful_filter):
            open_nodes += 1
            continue
        recent = [
            m
            for m in n.measurements
            if (m.nat or m.stateful_filter) and _age(now, m.measured_at) <= LIFETIME_WINDOW_S
        ]
        expiring.append((n, recent or [latest], not recent))
    if not expiring:
        if open_nodes:
            why = f"no NAT and no stateful filter at any of {open_nodes} measured node(s): off"
            return _Proposal(0, "measured", why, None, None)
        why = f"NAT not measured yet: default keepalive {DEFAULT_KEEPALIVE_S} s"
        return _Proposal(DEFAULT_KEEPALIVE_S, "default", why, None, None)
    lifetimes = [
        (m.mapping_lifetime_s, n.node, m, stale)
        for n, ms, stale in expiring
        for m in ms
        if m.mapping_lifetime_s is not None
    ]
    bounds = [
        (m.max_lifetime_s, n.node, m, stale)
        for n, ms, stale in expiring
        for m in ms
        if m.mapping_lifetime_s is None and m.max_lifetime_s is not None
    ]
    of = f"of {len(expiring)} NATed/filtered node(s)"
    if lifetimes:
        lifetime, node, m, stale = min(lifetimes, key=lambda x: x[0])
        keepalive, why = keepalive_for(lifetime, m.nat, m.stateful_filter)
        where = f"smallest recent lifetime: {node}, {of}"
        bound: float | None = lifetime
        source: Source = "measured"
    elif bounds:
        bound, node, m, stale = min(bounds, key=lambda x: x[0])
        keepalive, why = keepalive_for(None, m.nat, m.stateful_filter, lower_bound_s=bound)
        where = f"smallest search bound: {node}, {of}"
        source = "measured"
    else:
        n, ms, stale = expiring[0]
        keepalive, why = keepalive_for(None, ms[0].nat, ms[0].stateful_filter)
        where, bound, source = f"{n.node}, lifetime not measured", None, "default"
        m = ms[0]
    if stale:
        where += f"; last measured {_age(now, m.measured_at) / 3600:.0f} h ago"
    clamped = min(max(keepalive, KEEPALIVE_MIN_S), KEEPALIVE_MAX_S)
    if clamped != keepalive:
        why += f"; clamped to {clamped} s ({KEEPALIVE_MIN_S}..{KEEPALIVE_MAX_S})"
    lifetime_s = min((x[0] for x in lifetimes), default=None)
    return _Proposal(clamped, source, f"{why} ({where})", lifetime_s, bound)


def _order(keepalive_s: int) -> float:
    """Compare keepalives by how long a mapping may idle: off (0) is the longest."""
    return math.inf if keepalive_s == 0 else keepalive_s


def _band(keepalive_s: int) -> int:
    return max(HYSTERESIS_MIN_S, math.ceil(HYSTERESIS_RATIO * keepalive_s))


def _filter(
    previous: KeepaliveState | None, proposal: _Proposal, now: datetime
) -> tuple[int, Source, int | None, datetime | None, str | None]:
    """Hysteresis: (value, source, pending value, pending since, note for the reason)."""
    wanted = proposal.keepalive_s
    if previous is None:
        return wanted, proposal.source, None, None, None
    current = previous.measured_keepalive_s
    if previous.measured_source == "default" and proposal.source == "measured":
        return wanted, proposal.source, None, None, None
    if wanted == current:
        return current, proposal.source, None, None, None
    within = wanted != 0 and current != 0 and abs(wanted - current) <= _band(current)
    if within:
        note = f"kept {current} s: {wanted} s is within the hysteresis band ±{_band(current)} s"
        return current, previous.measured_source, None, None, note
    if _order(wanted) < _order(current):
        return wanted, proposal.source, None, None, f"lowered from {_shown(current)} at once"
    pending = wanted
    if previous.pending_keepalive_s is not None:
        pending = min(previous.pending_keepalive_s, wanted, key=_order)
    since = previous.pending_since or now
    held = _age(now, since)
    if held >= RAISE_CONFIRM_S:
        note = f"raised from {_shown(current)} after {held:.0f} s of consistent proposals"
        return pending, proposal.source, None, None, note
    note = (
        f"kept {current} s: {_shown(wanted)} must hold for {RAISE_CONFIRM_S:.0f} s before "
        f"raising ({held:.0f} s so far)"
    )
    return current, previous.measured_source, pending, since, note


def _shown(keepalive_s: int) -> str:
    return "off" if keepalive_s == 0 else f"{keepalive_s} s"


def decide_site_keepalive(
    site: str,
    nodes: Sequence[NodeNat],
    previous: KeepaliveState | None,
    losses: Iterable[MappingLoss],
    now: datetime,
) -> tuple[KeepaliveState, SiteKeepalive]:
    """The site's measured keepalive (no overrides; see :func:`apply_keepalive_override`).

    ``nodes``: the site's nodes with their NAT history.  ``previous``: the state this function
    returned last time (None the first time).  ``losses``: mapping losses (any node; those of
    other sites and those at or before ``previous.last_loss_at`` are ignored, so passing the same
    loss twice is harmless).  ``now``: aware datetime.  Returns (next state, decision); the
    schedule is in the module docstring.  Never raises.
    """
    proposal = _propose(site, nodes, now)
    value, source, pending, since, note = _filter(previous, proposal, now)
    notes = [note] if note else []
    cap = previous.eviction_cap_s if previous else None
    cap_at = previous.cap_changed_at if previous else None
    last_loss = previous.last_loss_at if previous else None
    names = {n.node for n in nodes}
    bound = proposal.lifetime_bound_s
    for loss in sorted(losses, key=lambda x: x.observed_at):
        if loss.node not in names or (last_loss is not None and loss.observed_at <= last_loss):
            continue
        last_loss = loss.observed_at
        k = loss.configured_keepalive_s
        what = f"{loss.node}'s mapping towards {loss.peer} was lost ({loss.evidence})"
        if k == 0 or bound is None or k >= bound:
            why = "keepalive off" if k == 0 else f"keepalive {k} s"
            known = "lifetime unknown" if bound is None else f"lifetime {bound:g} s"
            notes.append(f"{what} with {why}, {known}: not judged an eviction")
            continue
        lowered = min(k, max(EVICTION_FLOOR_S, k // 2))
        if cap is None or lowered < cap:
            cap, cap_at = lowered, now
            notes.append(
                f"lowered to {lowered} s: {what} with keepalive {k} s below the lifetime "
                f"{bound:g} s — small-table eviction suspected; halved (floor "
                f"{EVICTION_FLOOR_S} s), raised by {RAISE_FACTOR - 1:.0%} per quiet hour"
            )
    if cap is not None and cap_at is not None:
        cap, cap_at, raise_note = _raise_cap(cap, cap_at, value, now)
        if raise_note:
            notes.append(raise_note)
        if cap is not None and cap_at is not None:
            next_raise = cap_at + timedelta(seconds=RAISE_INTERVAL_S)
            notes.append(f"eviction cap {cap} s, next raise at {format_time(next_raise)}")
    applied = min(value, cap) if cap is not None and value != 0 else value
    if value == 0:
        cap = cap_at = None
    state = KeepaliveState(
        site=site,
        updated_at=now,
        measured_keepalive_s=value,
        measured_source=source,
        pending_keepalive_s=pending,
        pending_since=since,
        eviction_cap_s=cap,
        cap_changed_at=cap_at,
        last_loss_at=last_loss,
    )
    head = f"keepalive {_shown(applied)} at site {site}"
    if applied != value:
        head += f" (eviction cap; lifetimes alone give {value} s)"
    reason = "; ".join([f"{head}: {proposal.reason}", *notes])
    decision = SiteKeepalive(site, applied, source, reason, proposal.lifetime_s)
    return state, decision


def _raise_cap(
    cap: int, cap_at: datetime, measured: int, now: datetime
) -> tuple[int | None, datetime | None, str | None]:
    if measured != 0 and cap >= measured:
        return None, None, f"eviction cap lifted: the measured value {measured} s is lower"
    steps = int(_age(now, cap_at) // RAISE_INTERVAL_S)
    if steps <= 0:
        return cap, cap_at, None
    for _ in range(steps):
        cap = max(cap + 1, math.ceil(cap * RAISE_FACTOR))
        cap_at += timedelta(seconds=RAISE_INTERVAL_S)
        if measured == 0 or cap >= measured:
            return None, None, "eviction cap lifted after quiet hours: back to the measured value"
    return cap, cap_at, f"eviction cap raised to {cap} s after quiet hours"


def apply_keepalive_override(decision: SiteKeepalive, override: Override | None) -> SiteKeepalive:
    """``decision`` replaced by a site ``override`` (source "override"), or unchanged."""
    if override is None:
        return decision
    reason = (
        f"{describe(override)}: keepalive {_shown(override.value)} "
        f"(measured would be {_shown(decision.keepalive_s)})"
    )
    return replace(decision, keepalive_s=override.value, source="override", reason=reason)


def peer_keepalives(
    links: Iterable[tuple[str, str]],
    node_sites: Mapping[str, str],
    latest_nat: Mapping[str, NatMeasurement | None],
    sites: Mapping[str, SiteKeepalive],
    overrides: Iterable[Override] = (),
) -> dict[tuple[str, str], PeerKeepalive]:
    """(node, peer) → the PersistentKeepalive node sets for peer, both directions of each link.

    ``node_sites``: node → site; ``latest_nat``: node → its latest NAT measurement (missing or
    None: not measured); ``sites``: site → its *measured* decision (before overrides);
    ``overrides``: all of them (link > node > site, keepalive settings only).  Never raises.
    """
    index = OverrideIndex(overrides)
    per_peer = index.has_links("keepalive_s")
    # What a node sets is the same towards each peer but for the peer's name in the reason: one
    # (value, source, reason around the name, override) per node, not per direction.
    made: dict[str, tuple[int, Source, tuple[str, ...], Override | None]] = {}
    result: dict[tuple[str, str], PeerKeepalive] = {}
    for a, b in links:
        for node, peer in ((a, b), (b, a)):
            try:
                keepalive_s, source, parts, found = made[node]
            except KeyError:
                site = node_sites.get(node)
                keepalive_s, source, parts = _node_measured(node, site, latest_nat.get(node), sites)
                found = None if per_peer else index.find("keepalive_s", node, None, site)
                made[node] = keepalive_s, source, parts, found
            if per_peer:
                found = index.find("keepalive_s", node, peer, node_sites.get(node))
            if found is not None:
                reason = (
                    f"{describe(found)}: keepalive {_shown(found.value)} towards {peer} "
                    f"(measured would be {_shown(keepalive_s)})"
                )
                result[node, peer] = _new_peer(node, peer, found.value, "override", reason)
            else:
                result[node, peer] = PeerKeepalive(
                    node, peer, keepalive_s, source, peer.join(parts)
                )
    return result


def _node_measured(
    node: str, site: str | None, nat: NatMeasurement | None, sites: Mapping[str, SiteKeepalive]
) -> tuple[int, Source, tuple[str, ...]]:
    """(keepalive, source, the reason's parts) of what ``node`` sets towards any peer, before
    overrides: the reason is the parts joined by the peer's name."""
    site_decision = sites.get(site) if site is not None else None
    why: tuple[str, ...]
    if nat is not None and not (nat.nat or nat.stateful_filter):
        why = (
            f"{node} has no NAT and no stateful filter: keepalive off towards ",
            " (nothing to keep open)",
        )
        return 0, "measured", why
    if site_decision is None or site_decision.keepalive_s == 0:
        known = "not measured yet" if nat is None else "measured, its site has no value"
        why = (f"{node}'s NAT {known}: default keepalive {DEFAULT_KEEPALIVE_S} s towards ", "")
        return DEFAULT_KEEPALIVE_S, "default", why
    k = site_decision.keepalive_s
    if nat is None:
        why = (f"{node}'s NAT not measured yet: site {site}'s keepalive {k} s towards ", "")
        return k, "default", why
    behind = "NAT" if nat.nat else "a stateful filter"
    why = (
        f"{node} is behind {behind}: keepalive {k} s towards ",
        " keeps the mapping ",
        f" reaches it through (site {site}'s keepalive)",
    )
    return k, site_decision.source, why


@dataclass(frozen=True, slots=True)
class FleetKeepalive:
    states: dict[str, KeepaliveState]  # site → next state, to store
    sites: dict[str, SiteKeepalive]  # site → decision, site overrides applied
    peers: dict[tuple[str, str], PeerKeepalive]  # (node, peer) → what node sets for peer


def decide_keepalives(
    nodes: Sequence[NodeNat],
    links: Iterable[tuple[str, str]],
    previous: Mapping[str, KeepaliveState],
    losses: Sequence[MappingLoss],
    overrides: Sequence[Override],
    now: datetime,
) -> FleetKeepalive:
    """Every keepalive decision of a fleet: per site (with state) and per (node, peer).

    ``nodes``: every node with its site and NAT history; ``links``: unordered peerings;
    ``previous``: site → last state; ``losses``: recent mapping losses (repeats are harmless).
    Never raises.
    """
    index = OverrideIndex(overrides)
    node_sites = {n.node: n.site for n in nodes}
    by_site: dict[str, list[NodeNat]] = {}
    for n in nodes:
        by_site.setdefault(n.site, []).append(n)
    losses_by_site: dict[str, list[MappingLoss]] = {}
    for lost in losses:
        if lost.node in node_sites:
            losses_by_site.setdefault(node_sites[lost.node], []).append(lost)
    states: dict[str, KeepaliveState] = {}
    measured: dict[str, SiteKeepalive] = {}
    shown: dict[str, SiteKeepalive] = {}
    for site, members in sorted(by_site.items()):
        site_losses = losses_by_site.get(site, [])
        state, decision = decide_site_keepalive(site, members, previous.get(site), site_losses, now)
        states[site], measured[site] = state, decision
        shown[site] = apply_keepalive_override(decision, index.site("keepalive_s", site))
    latest = {n.node: n.latest for n in nodes}
    peers = peer_keepalives(links, node_sites, latest, measured, overrides)
    return FleetKeepalive(states, shown, peers)


def detect_mapping_losses(
    previous: Report, current: Report, keepalives: Mapping[tuple[str, str], int]
) -> list[MappingLoss]:
    """Mapping losses an observer's two consecutive reports reveal.

    A peer whose endpoint, as seen by the observer, kept its IP address but changed port was
    given a new mapping by its NAT: the old one was gone.  (A new IP is roaming, not a loss.)
    ``keepalives``: (node, peer) → the keepalive node applied then (from node's own report;
    missing = 0).  Returns one loss per such peer, observed at ``current.created_at``.
    """
    before = {m.peer: m.endpoint for m in previous.measurements if m.endpoint is not None}
    losses = []
    for m in current.measurements:
        old = before.get(m.peer)
        if m.endpoint is None or old is None or old == m.endpoint:
            continue
        (old_ip, _), (new_ip, _) = parse_endpoint(old), parse_endpoint(m.endpoint)
        if old_ip != new_ip:
            continue
        evidence = f"{current.node} saw its endpoint move {old} → {m.endpoint}"
        k = keepalives.get((m.peer, current.node), 0)
        losses.append(MappingLoss(m.peer, current.node, current.created_at, k, evidence))
    return losses

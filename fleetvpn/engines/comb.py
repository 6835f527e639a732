"""Which idle gaps the NAT lifetime search tests, and in which order: arithmetic on seconds.

Pure: no I/O, no clock, no state.  ``first_comb`` lays out the search's start (canaries, a
tight pair around each likely lifetime, a fine step window, far points for later);
``step_window`` fills runs one step apart; ``gap_comb`` is a plain comb (fine where that fits,
else geometric).
"""

from __future__ import annotations

import math
from itertools import pairwise

_EPS = 1e-9

# Lifetimes NATs and stateful firewalls are configured with (whole seconds, and timers tick in
# whole seconds): a pair of tests around each answers at T + 3..5 s when T is one of them.
#   10   MikroTik RouterOS udp-timeout (reference.md)
#   15   Nokia CGN initial UDP timeout (reference.md)
#   20   the lab's NAT (reference.md, "Measured here")
#   30   Linux conntrack nf_conntrack_udp_timeout (unreplied); RFC 9308's assumption; GCP
#        Cloud NAT; AWS security groups, unconfirmed flows (reference.md)
#   60   OpenWrt's nf_conntrack_udp_timeout (sysctl-nf-conntrack.conf); pf udp.first/multiple
#   120  Linux nf_conntrack_udp_timeout_stream, current kernels' default; RFC 4787 REQ-5's floor
#   180  the same in older kernels (Linux 3.0: 180*HZ) and in OpenWrt; MikroTik
#        udp-stream-timeout; AWS security groups, tracked flows (reference.md)
#   300  RFC 4787 REQ-5's recommended minimum
#   45, 90  no single source: the middles of the 30..60 and 60..120 s holes, near where carrier
#        NATs' medians fall (~35 s fixed, ~65 s mobile; reference.md)
# Each value costs two first-round slots and delays every later one by two creations (0.2 s at
# 10/s): the 9th answers at T + 4.8 s, an 11th would pass T + 5 s.  Left out for that: 25 (a
# usual WireGuard keepalive, not a timeout), 40, 240.
LIKELY_LIFETIMES_S: tuple[float, ...] = (10, 15, 20, 30, 45, 60, 90, 120, 180, 300)


def gap_comb(
    low_s: float,
    high_s: float,
    count: int,
    resolution_s: float = 1.0,
    max_step_s: float = math.inf,
) -> list[float]:
    """At most ``count`` increasing gaps from ``low_s`` to ``high_s`` (both included).

    ``resolution_s`` apart when that fits (one round brackets T); else geometric, each step at
    least ``resolution_s`` and at most ``max_step_s`` (linear if even that cannot reach
    ``high_s``), with the ratio solved so that the last gap lands on ``high_s``.
    """
    if count < 2 or high_s - low_s <= _EPS:
        return [high_s]
    steps = math.ceil((high_s - low_s) / resolution_s - _EPS)
    if steps <= count - 1:
        return [round(low_s + i * resolution_s, 3) for i in range(steps)] + [high_s]
    max_step_s = max(max_step_s, (high_s - low_s) / (count - 1), resolution_s)

    def comb(ratio: float) -> list[float]:
        gaps = [low_s]
        for _ in range(count - 1):
            gaps.append(gaps[-1] + min(max(gaps[-1] * (ratio - 1), resolution_s), max_step_s))
        return gaps

    slow, fast = 1.0, high_s / low_s
    for _ in range(60):
        middle = (slow + fast) / 2
        slow, fast = (slow, middle) if comb(middle)[-1] >= high_s - _EPS else (middle, fast)
    return [round(g, 2) for g in comb(fast)[:-1] if g < high_s - _EPS] + [high_s]


def likely_pairs(
    likely_s: tuple[float, ...], start_s: float, top_s: float, step_s: float
) -> list[tuple[float, float]]:
    """(lower, upper) around each likely lifetime c in [start_s, top_s], ascending.

    ``upper - lower <= step_s`` (whole milliseconds, what the wire carries): when c is the
    lifetime, the lower gap survives and the upper dies, which is a finished bracket.  The
    pair is c -/+ half a step, clipped to the range; a pair that would reach below
    ``start_s`` is left out.
    """
    half = math.floor(step_s / 2 * 1000 + _EPS) / 1000
    pairs: list[tuple[float, float]] = []
    for c in sorted(set(likely_s)):
        lower, upper = round(c - half, 3), round(min(c + half, top_s), 3)
        if lower >= start_s - _EPS and c <= top_s + _EPS:
            pairs.append((lower, upper))
    return pairs


def split_runs(anchors: list[float], count: int, max_run_s: float) -> list[float]:
    """At most ``count`` points that split the runs between sorted ``anchors``, the longest
    run first, until no run is longer than ``max_run_s``; each run is split evenly."""
    runs = [(a, b) for a, b in pairwise(anchors) if b - a > _EPS]
    parts = [1] * len(runs)
    for _ in range(count):
        if not runs:
            break
        i = max(range(len(runs)), key=lambda j: (runs[j][1] - runs[j][0]) / parts[j])
        if (runs[i][1] - runs[i][0]) / parts[i] <= max_run_s + _EPS:
            break
        parts[i] += 1
    return [
        round(a + (b - a) * k / n, 2)
        for (a, b), n in zip(runs, parts, strict=True)
        for k in range(1, n)
    ]


def step_window(anchors: list[float], step_s: float, count: int) -> list[float]:
    """Up to ``count`` gaps ``step_s`` apart filling, from the lowest up, the runs between sorted
    ``anchors`` that are longer than ``step_s``; rounded to milliseconds (the wire's unit)."""
    window: list[float] = []
    for low, high in pairwise(anchors):
        gap = low + step_s
        while high - low > step_s + _EPS and len(window) < count:
            window.append(round(gap, 3))
            low, gap = gap, gap + step_s
    return window


def first_comb(
    start_s: float,
    top_s: float,
    slots: int,
    step_s: float,
    likely_s: tuple[float, ...] = (),
) -> tuple[list[float], list[float]]:
    """The first gaps to test over [start_s, top_s]: (first round, later), most urgent first.

    One round ``step_s`` apart when ``slots`` suffice.  Otherwise the first round, in the
    order the slots become ready: ``start_s`` and one step above (canaries for eviction); the
    likely pairs clear of them (the shortest first, each pair's upper gap first: its death is
    known last), on at most 5/8 of the slots; the step window up from the canaries on the
    slots left (short lifetimes in one round).  Later, on slots freed by results (a few
    seconds late is little for a long gap): ``top_s`` and points splitting the longest runs
    until none exceeds ``window_s``, so that the window reaches the next point.
    """
    if start_s >= top_s - _EPS:
        return [top_s], []
    if (top_s - start_s) / step_s <= slots - 1 + _EPS:
        return gap_comb(start_s, top_s, slots, step_s), []  # one round is enough
    # Canaries on the two oldest slots: a NAT short of table space evicts its oldest mappings,
    # and their deaths below later survivals are what reveals the eviction.
    first = [start_s, round(start_s + step_s, 3)]
    pairs = likely_pairs(likely_s, first[-1] + step_s, top_s, step_s)
    first += [
        gap for lower, upper in pairs[: max(2, slots * 5 // 8) // 2] for gap in (upper, lower)
    ]
    anchors = sorted({top_s, *first})
    first += step_window(anchors, step_s, max(0, slots - len(first)))
    later = [top_s] if top_s not in first else []
    fill = split_runs(sorted({*anchors, *first}), slots, window_s(slots, step_s))
    return first, later + [g for g in fill if g not in later]


def window_s(slots: int, step_s: float) -> float:
    """How far above the largest survival the freed slots' step window reaches (~3/4 of
    them); the search tests the holes within it before points farther up."""
    return 0.75 * slots * step_s

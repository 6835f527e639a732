"""Small pieces shared by the sans-IO probe engines: RTT/timeout estimation, probe ids, and the
k-ary split of an integer interval. Pure: no I/O, no clock, randomness only when injected.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass


@dataclass(slots=True)
class RttEstimator:
    """Smoothed RTT (RFC 6298 style EWMA, gain 1/8) and the loss timeout derived from it.

    ``timeout(backoff)`` is ``initial_s`` before the first sample, else ``max(3 x srtt,
    min_s)``; capped at ``max_s``, then doubled ``backoff`` times (backoff itself capped at 3).
    Negative samples (clock confusion in the caller) are ignored.
    """

    initial_s: float = 1.0
    min_s: float = 0.2
    max_s: float = 10.0
    srtt: float | None = None

    def sample(self, rtt_s: float) -> None:
        if rtt_s < 0:
            return
        self.srtt = rtt_s if self.srtt is None else self.srtt + (rtt_s - self.srtt) / 8

    def timeout(self, backoff: int = 0) -> float:
        base = self.initial_s if self.srtt is None else max(3 * self.srtt, self.min_s)
        return min(base, self.max_s) * (1 << min(max(backoff, 0), 3))

    def reset(self) -> None:
        self.srtt = None


class ProbeIds:
    """32-bit probe ids: a random start (from the injected rng), then consecutive, wrapping."""

    def __init__(self, rng: random.Random) -> None:
        self._next = rng.getrandbits(32)

    def new(self) -> int:
        probe_id = self._next
        self._next = (self._next + 1) & 0xFFFFFFFF
        return probe_id


def split_points(base: int, upper: int, fixed: list[int], k: int) -> list[int]:
    """Up to k new integers in the open interval (base, upper) that, together with ``fixed``
    (probed anyway), minimise the largest run of untried integers.

    The k points go to the runs between fixed points greedily (always to the run whose worst
    sub-run is largest, which is optimal for a max objective), then evenly inside each run.
    Returned unsorted, without duplicates of ``fixed``; fewer than k when every integer is taken.
    """
    points = sorted({base, upper, *(f for f in fixed if base < f < upper)})
    runs = [(a, b) for a, b in itertools.pairwise(points) if b - a > 1]
    alloc = [0] * len(runs)
    for _ in range(k):
        best, best_len = -1, 0
        for i, (a, b) in enumerate(runs):
            width, m = b - a - 1, alloc[i]
            if m < width:
                worst = -(-(width - m) // (m + 1))
                if worst > best_len:
                    best, best_len = i, worst
        if best < 0:
            break
        alloc[best] += 1
    out: list[int] = []
    for (a, b), m in zip(runs, alloc, strict=True):
        out.extend(a + (2 * j * (b - a) + m + 1) // (2 * (m + 1)) for j in range(1, m + 1))
    return out


def budgeted_round(
    base: int,
    upper: int,
    mandatory: list[tuple[int, int]],
    optional: list[int],
    k: int,
    max_bytes: int,
) -> list[tuple[int, int]]:
    """Compose one probe round as ``(size, copies)`` pairs within a byte budget.

    ``mandatory`` pairs are always included (the caller makes sure they fit). ``optional``
    sizes (hints, plateaus; in order of preference) outside (base, upper) are dropped; then up
    to ``k`` split points of (base, upper) are added. When the total exceeds ``max_bytes``,
    split points are shed first, then optional sizes from the end of the list. A round keeps
    at least one size of (base, upper) when the interval has any and the budget allows.
    """
    anchors = [size for size, _ in mandatory if base < size < upper]
    wanted = [s for s in dict.fromkeys(optional) if base < s < upper and s not in anchors]
    budget = max_bytes - sum(size * copies for size, copies in mandatory)
    for n_optional in range(len(wanted), -1, -1):
        fixed = wanted[:n_optional]
        for n_splits in range(k, -1, -1):
            if n_splits == 0 and not fixed and not anchors and upper - base > 1:
                break
            splits = split_points(base, upper, anchors + fixed, n_splits)
            if sum(fixed) + sum(splits) <= budget:
                return mandatory + [(s, 1) for s in fixed + splits]
    return mandatory

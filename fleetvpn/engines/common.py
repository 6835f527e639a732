"""Small pieces shared by the sans-IO probe engines: RTT/timeout estimation, the book of sent
probes, and the k-ary split of an integer interval.

Pure: no I/O, no clock; randomness only from an injected ``random.Random``.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable
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


@dataclass(frozen=True, slots=True)
class Probe:
    """Send one datagram whose whole IP packet is ``size`` bytes, tagged with ``probe_id``.

    ``probe_id`` fits in 32 bits. Payload bytes = size - 28 (IPv4) or size - 48 (IPv6).
    """

    probe_id: int
    size: int


@dataclass(slots=True)
class SentProbe:
    size: int
    sent_at: float
    acked: bool = False
    refused: bool = False  # the local stack refused it (EMSGSIZE): it never left the host

    @property
    def lost(self) -> bool:
        """Not (yet) acked and not refused; final only once its round is over."""
        return not self.acked and not self.refused


class ProbeBook:
    """Probes queued for sending and the fate of each one sent, by 32-bit probe id.

    ``queue`` registers copies of sizes under fresh ids (random start from the injected rng,
    then consecutive) in random order: a burst that overflows a queue loses its tail, and a
    fixed order would make that tail drop look like a size limit. ``drain`` hands them out and
    stamps the send time. ``get`` finds a probe for an ack (None if unknown or forgotten).
    """

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._next_id = rng.getrandbits(32)
        self._queued: list[Probe] = []
        self._sent: dict[int, SentProbe] = {}
        self.probes_sent = 0
        self.bytes_sent = 0

    def queue(self, sizes: Iterable[tuple[int, int]], now: float) -> list[int]:
        """Queue ``copies`` probes of each ``(size, copies)``; returns their ids."""
        probes: list[Probe] = []
        for size, copies in sizes:
            for _ in range(copies):
                probes.append(Probe(self._next_id, size))
                self._sent[self._next_id] = SentProbe(size, now)
                self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        self._rng.shuffle(probes)
        self._queued.extend(probes)
        return [p.probe_id for p in probes]

    def drain(self, now: float) -> list[Probe]:
        out, self._queued = self._queued, []
        for probe in out:
            sent = self._sent.get(probe.probe_id)
            if sent is not None:
                sent.sent_at = now
            self.probes_sent += 1
            self.bytes_sent += probe.size
        return out

    @property
    def has_queued(self) -> bool:
        return bool(self._queued)

    def get(self, probe_id: int) -> SentProbe | None:
        return self._sent.get(probe_id)

    def of(self, probe_ids: Iterable[int]) -> list[SentProbe]:
        return [self._sent[i] for i in probe_ids if i in self._sent]

    def forget_before(self, t: float) -> None:
        """Drop records of probes sent before ``t``: late acks for them are then ignored."""
        self._sent = {i: p for i, p in self._sent.items() if p.sent_at >= t}

    def drop_queued(self) -> None:
        for probe in self._queued:
            self._sent.pop(probe.probe_id, None)
        self._queued.clear()

    def clear(self) -> None:
        """Drop the queue and every record (e.g. the path changed)."""
        self._queued.clear()
        self._sent.clear()


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

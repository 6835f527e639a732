"""When the agent does what: jittered periodic jobs, re-probe triggers, a probe budget. Sans-IO,
sans-clock: every method takes ``now`` (seconds, any monotonic origin); randomness is an injected
``random.Random``.

- :class:`Scheduler` — named periodic jobs. A job's first run lands uniformly in
  ``[0, first_within_s]`` after it is added, and each next run one period later with ±``jitter``
  of the period, so a fleet started at once (a reboot, an Ansible run) does not probe in
  lock-step and stays spread. ``trigger`` brings a job forward (a re-probe), never back.
- :class:`PeerWatch` — decides when a peer's path must be measured again before its period is
  up: its WireGuard endpoint changed (NAT rebinding, roaming: a new path), or its handshake went
  stale (older than 180 s, REJECT_AFTER_TIME: the path may have broken). Each decision carries
  its reason.
- :class:`ProbeBudget` — bounds PMTU searches per peer: at most ``max_per_hour`` in any sliding
  hour and at least ``min_gap_s`` apart, whatever triggers them (the path watch, re-probes, a
  peer asking to be probed back); ``next_allowed`` says when the next one may start.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Final

STALE_HANDSHAKE_S: Final = 180.0  # WireGuard's REJECT_AFTER_TIME
JITTER: Final = 0.1


@dataclass
class _Job:
    period_s: float
    due: float


@dataclass
class Scheduler:
    rng: random.Random
    jitter: float = JITTER
    jobs: dict[str, _Job] = field(default_factory=dict)

    def add(self, name: str, period_s: float, now: float, *, first_within_s: float = 0.0) -> None:
        """(Re)define a job. Its first run: ``now`` + uniform(0, first_within_s)."""
        self.jobs[name] = _Job(period_s, now + self.rng.uniform(0.0, max(0.0, first_within_s)))

    def set_period(self, name: str, period_s: float, now: float) -> None:
        """A new period (config reload): the next run moves no later than one new period."""
        job = self.jobs[name]
        job.period_s = period_s
        job.due = min(job.due, now + self._spaced(period_s))

    def remove(self, name: str) -> None:
        self.jobs.pop(name, None)

    def _spaced(self, period_s: float) -> float:
        return period_s * (1.0 + self.rng.uniform(-self.jitter, self.jitter))

    def due(self, now: float) -> list[str]:
        """Jobs due at ``now``, oldest due first; each is rescheduled one jittered period on."""
        ready = sorted((job.due, name) for name, job in self.jobs.items() if job.due <= now)
        for _, name in ready:
            job = self.jobs[name]
            job.due = now + self._spaced(job.period_s)
        return [name for _, name in ready]

    def trigger(self, name: str, now: float, within_s: float = 0.0) -> None:
        """Run ``name`` within ``within_s`` (uniform), unless it is due sooner anyway."""
        job = self.jobs.get(name)
        if job is not None:
            job.due = min(job.due, now + self.rng.uniform(0.0, max(0.0, within_s)))

    def next_deadline(self) -> float | None:
        return min((job.due for job in self.jobs.values()), default=None)


@dataclass
class _Seen:
    endpoint: str | None
    stale: bool


@dataclass
class PeerWatch:
    """Re-probe decisions from what ``wg show`` says about each peer (module docstring)."""

    seen: dict[str, _Seen] = field(default_factory=dict)

    def observe(self, peer: str, endpoint: str | None, handshake_age_s: float | None) -> str | None:
        """Record the peer's state; return why it needs a re-probe now, or None."""
        stale = handshake_age_s is None or handshake_age_s > STALE_HANDSHAKE_S
        before = self.seen.get(peer)
        self.seen[peer] = _Seen(endpoint, stale)
        if before is None:
            return None  # the first sight: the start-up probe covers it
        if endpoint is not None and before.endpoint is not None and endpoint != before.endpoint:
            return f"{peer}'s endpoint changed {before.endpoint} -> {endpoint}: a new path"
        if stale and not before.stale:
            age = "never" if handshake_age_s is None else f"{handshake_age_s:.0f} s ago"
            return f"{peer}'s last handshake was {age} (> {STALE_HANDSHAKE_S:.0f} s): path check"
        return None

    def forget(self, peer: str) -> None:
        self.seen.pop(peer, None)


@dataclass
class ProbeBudget:
    max_per_hour: int = 12
    min_gap_s: float = 30.0
    # An urgent run — the evidence says the path changed now: a decrease the path watch
    # confirmed, a peer's hello asking to be probed back before its NAT mapping for the hello
    # expires (10-30 s) — needs only this gap; the hourly bound holds for every run.
    urgent_gap_s: float = 5.0
    runs: dict[str, deque[float]] = field(default_factory=dict)

    def allow(self, peer: str, now: float, *, urgent: bool = False) -> str | None:
        """None if a PMTU run towards ``peer`` may start now, else why not."""
        runs = self.runs.setdefault(peer, deque())
        while runs and runs[0] <= now - 3600.0:
            runs.popleft()
        gap = self.urgent_gap_s if urgent else self.min_gap_s
        if runs and now - runs[-1] < gap:
            return f"last PMTU run towards {peer} {now - runs[-1]:.0f} s ago (< {gap:g} s)"
        if len(runs) >= self.max_per_hour:
            return f"{len(runs)} PMTU runs towards {peer} in the last hour (the bound)"
        return None

    def next_allowed(self, peer: str, now: float, *, urgent: bool = False) -> float:
        """The earliest time at or after ``now`` when :meth:`allow` says yes (no new spending)."""
        runs = self.runs.get(peer) or deque()
        at = now
        if runs:
            at = max(at, runs[-1] + (self.urgent_gap_s if urgent else self.min_gap_s))
        recent = [t for t in runs if t > now - 3600.0]
        if len(recent) >= self.max_per_hour:
            at = max(at, recent[len(recent) - self.max_per_hour] + 3600.0)
        return at

    def spend(self, peer: str, now: float) -> None:
        self.runs.setdefault(peer, deque()).append(now)

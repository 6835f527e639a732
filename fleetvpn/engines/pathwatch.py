"""Path watch: a sans-IO, sans-clock engine that keeps one peer's path MTU honest between searches.

The PMTU search (:mod:`fleetvpn.engines.pmtu`) finds a value; this engine watches that the path
still carries it (black-hole watch: a *decrease*), notices when it carries more (upkeep: an
*increase*), and says when a full search is due — cheaply, and without ever deciding on random
loss. It never sends a byte on its own account: it hands out probes (a size and an id) and
decisions (events, each with a reason).

Contract (the adapter's side; one engine per peer and direction)::

    watch = PathWatch(ceiling=1420, rng=random.Random(seed))
    watch.set_value(path_mtu, now)                   # after every search (first one included)
    loop:
        for probe in watch.probes_to_send(now):      # DF set, probe.size bytes of IP packet
            ...  # EMSGSIZE at send -> watch.on_local_too_big(probe.probe_id, now, mtu_hint)
        while (event := watch.next_event()) is not None: ...
        arm one timer at watch.get_timer(); when it fires -> watch.handle_timer(now)
        peer ack carrying probe_id      -> watch.on_ack(probe_id, now)
        ICMP frag-needed / too-big      -> watch.on_icmp_too_big(reported_mtu, now)
        a `wg show dump` sample         -> watch.on_sample(now, tx_bytes=…, rx_bytes=…,
                                                           latest_handshake=…)

Inputs for unknown, duplicate or forgotten probe ids are ignored. Nothing raises after
construction (``ValueError`` for bad configuration only).

Evidence and decisions. *Cheap evidence only triggers probes; only probes decide.*

* Triggers (at most one per ``trigger_gap_s``), from samples where the tunnel sent at least
  ``stall_tx_bytes`` (more than keepalives): it received at most ``stall_rx_bytes`` (tx
  growing while rx stalls: packets vanish; each such stall that proves harmless doubles a
  hold-off, 5 s up to 300 s, so a one-way stream costs little; any rx resets it); or a
  handshake completed sooner than ``early_handshake_s`` after the previous one (WireGuard
  re-initiates after 15 s of unanswered data; its normal rekey is every 120 s); or the value
  was last proven more than ``fresh_s`` ago (a *wake* check: traffic after a quiet spell).
  An ICMP too-big below the value is a trigger too. Stall, handshake and ICMP episodes start
  at the *verify* step; the wake check is one probe.
* Scheduled checks: one probe at the value every ``active_check_s`` while the link is busy
  (a sample with >= ``active_tx_bytes`` sent within the last ``active_hold_s``), and the
  *upkeep* every ``upkeep_s`` (the PMTU interval, ±10 % jitter): one probe at the value and
  one at value + 1 (none above the ceiling). An ack of value + 1 (or more) is proof:
  :class:`IncreaseSeen`, the adapter runs a search from the value up.
* A decrease needs, in one episode: the value lost with no ack at all (check), then a *verify*
  round (value x ``verify_copies`` all lost while a control probe of ``control_size`` is acked),
  then ``confirm_rounds`` *confirm* rounds (value x ``confirm_copies`` all lost, a control
  acked). A round where no control probe comes back says nothing about size (the peer or the
  path is down): it is retried with a doubled timeout, and after ``max_silent_rounds`` the
  episode is dropped (:class:`DecreaseCleared`, "peer silent"). Any ack of a probe at the value
  or above, even late, clears the episode. At 5 % loss in each direction (9.75 % per round
  trip) a false decrease needs 1 + 2 + 3 + 3 = 9 value probes lost in a row with controls
  acked: ~ 8e-10 per scheduled check; the tests run days of virtual time at 5 % loss with none.
* Proof without rounds: a local EMSGSIZE for a probe at the value (the local route shrank).

Events: :class:`DecreaseSuspected` (after the verify round: informational),
:class:`DecreaseConfirmed` (the adapter lowers its route MTU at once to a safe value and runs a
search bounded above by ``size - 1``, then calls :meth:`set_value`), :class:`DecreaseCleared`,
:class:`IncreaseSeen` and :class:`FullSearchDue` (the long schedule, ``full_search_s``). After a
confirmed decrease the engine waits (no probes) for :meth:`set_value`.

Timing (virtual time, 50 ms RTT, defaults): a check, verify and two confirm rounds take
4 x max(3 x srtt, 0.5 s) = 2 s; a decrease on a busy link is confirmed within
``active_check_s`` + 2 s of the change (earlier when the stall trigger fires). Cost: see
:func:`upkeep_bytes_per_hour`.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from dataclasses import dataclass
from typing import Final

from fleetvpn.engines.common import Probe as Probe  # re-exported: part of this API
from fleetvpn.engines.common import ProbeBook, RttEstimator, SentProbe

# WireGuard's REKEY_AFTER_TIME is 120 s (wireguard-linux timers.c / messages.h): a session rekeys
# no sooner while data flows. A new handshake well before that follows 15 s of unanswered data
# (KEEPALIVE_TIMEOUT + REKEY_TIMEOUT), a roam or a restart: worth a check, never a decision.
REKEY_AFTER_TIME_S: Final = 120.0
_LATE_ACK_HORIZON_S: Final = 60.0


@dataclass(frozen=True, slots=True)
class WatchConfig:
    """Knobs of :class:`PathWatch` (defaults are the documented figures)."""

    control_size: int = 82  # smallest authenticated probe (IPv4 28 + 54 bytes); IPv6: 102
    upkeep_s: float = 600.0  # RFC 8899 PMTU_RAISE_TIMER; value and value + 1 once each
    active_check_s: float = 5.0
    active_hold_s: float = 10.0
    fresh_s: float = 20.0
    active_tx_bytes: int = 6000  # per sample: a link carrying >= ~3 kB/s at 2 s samples
    stall_tx_bytes: int = 1024  # per sample: more than keepalives and handshakes
    stall_rx_bytes: int = 256  # per sample: at most keepalives / a handshake response
    stall_holdoff_s: tuple[float, float] = (5.0, 300.0)  # doubles per stall cleared, reset on rx
    early_handshake_s: float = REKEY_AFTER_TIME_S - 10.0
    trigger_gap_s: float = 2.0
    verify_copies: int = 2
    confirm_copies: int = 3
    control_copies: int = 2
    confirm_rounds: int = 2
    max_silent_rounds: int = 3
    initial_timeout_s: float = 1.0
    min_timeout_s: float = 0.5
    full_search_s: float = 86400.0  # 0: never on a schedule
    jitter: float = 0.1

    def __post_init__(self) -> None:
        counts = (self.verify_copies, self.confirm_copies, self.control_copies,
                  self.confirm_rounds, self.max_silent_rounds)  # fmt: skip
        if min(counts) < 1:
            raise ValueError("copies, rounds and max_silent_rounds must be >= 1")
        times = (self.upkeep_s, self.active_check_s, self.initial_timeout_s, self.min_timeout_s)
        if min(times) <= 0 or self.full_search_s < 0 or not 0 <= self.jitter < 1:
            raise ValueError("intervals and timeouts must be > 0, jitter in [0, 1)")
        if self.control_size < 1:
            raise ValueError("control_size must be >= 1")


class WatchState(enum.Enum):
    IDLE = "idle"  # no value yet: set_value not called
    WATCHING = "watching"  # value believed; checks on schedule or on evidence
    CHECKING = "checking"  # a check (or upkeep) round in flight
    VERIFYING = "verifying"  # the value was lost once: verify round with controls
    CONFIRMING = "confirming"  # verified: confirm rounds
    DECREASED = "decreased"  # confirmed; waiting for set_value after the adapter's search


@dataclass(frozen=True, slots=True)
class DecreaseSuspected:
    size: int  # the value that failed the verify round
    reason: str


@dataclass(frozen=True, slots=True)
class DecreaseConfirmed:
    size: int  # the path no longer carries this size: search below it
    known_good: int | None  # largest size acked during the episode (a control), or an EMSGSIZE hint
    elapsed_s: float  # from the episode's first probe (or trigger) to the decision
    probes_sent: int  # probes of the episode
    reason: str


@dataclass(frozen=True, slots=True)
class DecreaseCleared:
    size: int
    reason: str


@dataclass(frozen=True, slots=True)
class IncreaseSeen:
    size: int  # acked, above the value: search upwards from here
    reason: str


@dataclass(frozen=True, slots=True)
class FullSearchDue:
    reason: str


WatchEvent = DecreaseSuspected | DecreaseConfirmed | DecreaseCleared | IncreaseSeen | FullSearchDue


class _Kind(enum.Enum):
    CHECK = "check"
    VERIFY = "verify"
    CONFIRM = "confirm"


@dataclass(slots=True)
class _Round:
    kind: _Kind
    probe_ids: list[int]
    sent_at: float


@dataclass(slots=True)
class _Episode:
    """One suspicion of a decrease, from its trigger to a decision."""

    trigger: str
    started_at: float
    hits: int = 0  # verify/confirm rounds that lost every value copy while a control came back
    silent: int = 0  # rounds in a row where not even a control came back
    value_lost: int = 0
    control_acked: int = 0
    probes: int = 0


class PathWatch:
    """Black-hole watch and cheap upkeep of one path MTU value (module docstring).

    Arguments:
        ceiling: the local MTU towards the peer (value + 1 is never probed above it).
        rng: the only source of randomness (probe ids, send order, jitter).
        config: :class:`WatchConfig`.
    """

    def __init__(
        self,
        *,
        ceiling: int,
        rng: random.Random | None = None,
        config: WatchConfig | None = None,
    ) -> None:
        self._config = config if config is not None else WatchConfig()
        if ceiling <= self._config.control_size:
            raise ValueError(f"ceiling {ceiling} must exceed control_size")
        self._ceiling = ceiling
        self._rng = rng if rng is not None else random.Random()
        self._book = ProbeBook(self._rng)
        self._rtt = RttEstimator(self._config.initial_timeout_s, self._config.min_timeout_s)
        self._events: deque[WatchEvent] = deque()
        self._state = WatchState.IDLE
        self._value: int | None = None
        self._round: _Round | None = None
        self._episode: _Episode | None = None
        self._epoch_at = 0.0  # set_value time: older probes say nothing about this value
        self._last_good_at: float | None = None  # last ack at or above the value
        self._last_check_at = float("-inf")  # last round started (any kind)
        self._last_trigger_at = float("-inf")
        self._upkeep_at: float | None = None
        self._full_search_at: float | None = None
        self._check_at: float | None = None  # a check asked for by a trigger / wake-up
        self._check_why = ""
        self._check_kind = _Kind.CHECK
        self._active_until = float("-inf")
        self._increase_told = False
        self._counters: tuple[int, int] | None = None
        self._stall_holdoff_s = self._config.stall_holdoff_s[0]
        self._stall_quiet_until = float("-inf")
        self._episode_by_stall = False
        self._handshake: float | None = None

    # ----------------------------------------------------------------- read-only view

    @property
    def state(self) -> WatchState:
        return self._state

    @property
    def path_mtu(self) -> int | None:
        return self._value

    @property
    def probes_sent(self) -> int:
        return self._book.probes_sent

    @property
    def bytes_sent(self) -> int:
        return self._book.bytes_sent

    def active(self, now: float) -> bool:
        """Whether the link counts as carrying traffic at ``now``."""
        return now < self._active_until

    # ----------------------------------------------------------------- inputs

    def set_value(self, path_mtu: int, now: float, *, ceiling: int | None = None) -> None:
        """Watch ``path_mtu`` from now on (a search concluded). Ends any episode."""
        if ceiling is not None:
            self._ceiling = ceiling
        self._value = min(path_mtu, self._ceiling)
        self._state = WatchState.WATCHING
        self._round = None
        self._episode = None
        self._book.drop_queued()
        self._epoch_at = now
        self._last_good_at = now  # the search just proved it
        self._check_at = None
        self._increase_told = False
        self._upkeep_at = now + self._jittered(self._config.upkeep_s)
        if self._config.full_search_s > 0:
            self._full_search_at = now + self._jittered(self._config.full_search_s)

    def on_sample(
        self, now: float, *, tx_bytes: int, rx_bytes: int, latest_handshake: float | None
    ) -> None:
        """A ``wg show dump`` sample of this peer: transfer counters (cumulative) and the time of
        its latest handshake (same clock as ``now``, or None for never). Samples every 1-5 s."""
        before, self._counters = self._counters, (tx_bytes, rx_bytes)
        handshake_before, self._handshake = self._handshake, latest_handshake
        if before is None or tx_bytes < before[0] or rx_bytes < before[1]:
            return  # first sample, or the counters restarted (interface re-created)
        tx, rx = tx_bytes - before[0], rx_bytes - before[1]
        cfg = self._config
        sending = tx >= cfg.stall_tx_bytes  # more than keepalives: large packets may be involved
        if tx >= cfg.active_tx_bytes:
            self._active_until = now + cfg.active_hold_s
        if rx > cfg.stall_rx_bytes:
            self._stall_holdoff_s = cfg.stall_holdoff_s[0]
            self._stall_quiet_until = float("-inf")
        if self._state is not WatchState.WATCHING or self._value is None:
            return
        since = None if handshake_before is None else (latest_handshake or 0.0) - handshake_before
        if sending and rx <= cfg.stall_rx_bytes and now >= self._stall_quiet_until:
            why = f"{tx} bytes sent and {rx} received since the last sample (rx stalls)"
            self._trigger(now, why, _Kind.VERIFY, stall=True)
        elif sending and since is not None and 0 < since < cfg.early_handshake_s:
            why = f"handshake renewed {since:.0f} s after the previous one while sending"
            self._trigger(now, why, _Kind.VERIFY)
        elif sending and self._last_good_at is not None:
            proven_s = now - self._last_good_at
            if proven_s > cfg.fresh_s:
                why = f"traffic, and {self._value} last proven {proven_s:.0f} s ago"
                self._trigger(now, why, _Kind.CHECK)

    def on_ack(self, probe_id: int, now: float) -> None:
        sent = self._book.get(probe_id)
        if sent is None or not sent.lost:
            return
        sent.acked = True
        self._rtt.sample(now - sent.sent_at)
        value = self._value
        if value is None or sent.sent_at < self._epoch_at or self._state is WatchState.DECREASED:
            return
        if sent.size >= value:
            self._last_good_at = now
            if self._episode is not None:
                self._clear(now, f"{sent.size} acked")
            if sent.size > value and not self._increase_told:
                self._increase_told = True
                self._events.append(IncreaseSeen(sent.size, f"{sent.size} acked, above the "
                                                 f"path MTU {value}: the path grew"))  # fmt: skip
        elif self._episode is not None:
            self._episode.control_acked += 1
        rnd = self._round
        if rnd is not None and rnd.kind is _Kind.CHECK and sent.size == value:
            self._round = None  # the value is fine; a value + 1 still in flight counts if acked
            self._state = WatchState.WATCHING
        elif rnd is not None and all(not p.lost for p in self._book.of(rnd.probe_ids)):
            self._end_round(now)

    def on_local_too_big(self, probe_id: int, now: float, mtu_hint: int | None = None) -> None:
        """Sending ``probe_id`` failed locally with EMSGSIZE: proof that its size is too big."""
        sent = self._book.get(probe_id)
        if sent is None or not sent.lost:
            return
        sent.refused = True
        value = self._value
        if value is None or self._state is WatchState.DECREASED or sent.size > value:
            return  # value + 1 refused: the ceiling, nothing new
        hint = mtu_hint if mtu_hint is not None and mtu_hint < sent.size else None
        episode = self._episode or _Episode("local send", now)
        self._decrease(
            now, episode, sent.size, hint,
            f"{sent.size} refused locally (EMSGSIZE"
            + (f", route MTU {mtu_hint})" if hint is not None else ")"),
        )  # fmt: skip

    def on_icmp_too_big(self, mtu: int, now: float) -> None:
        """ICMP frag-needed / packet-too-big reporting ``mtu``: a hint (it may be forged)."""
        if self._value is not None and mtu < self._value and self._state is WatchState.WATCHING:
            self._trigger(now, f"ICMP reports next-hop MTU {mtu}", _Kind.VERIFY)

    def handle_timer(self, now: float) -> None:
        """Call at (or after) ``get_timer()``; early calls are harmless."""
        rnd = self._round
        if rnd is not None:
            if now >= self._deadline(rnd):
                self._end_round(now)
            return
        if self._state is not WatchState.WATCHING or self._value is None:
            return
        if self._full_search_at is not None and now >= self._full_search_at:
            self._full_search_at = now + self._jittered(self._config.full_search_s)
            self._events.append(FullSearchDue(
                f"full search every {self._config.full_search_s:g} s (long schedule)"))  # fmt: skip
        if self._check_at is not None and now >= self._check_at:
            self._check_at = None
            self._begin(now, self._check_why, self._check_kind)
        elif self._upkeep_at is not None and now >= self._upkeep_at:
            self._upkeep_at = now + self._jittered(self._config.upkeep_s)
            self._start_check(now, upkeep=True)
        elif self.active(now) and now >= self._last_check_at + self._config.active_check_s:
            self._start_check(now, upkeep=False)

    # ----------------------------------------------------------------- outputs

    def probes_to_send(self, now: float) -> list[Probe]:
        out = self._book.drain(now)
        if out and self._round is not None:
            self._round.sent_at = now
        return out

    def next_event(self) -> WatchEvent | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        if self._round is not None:
            return self._deadline(self._round)
        if self._state is not WatchState.WATCHING:
            return None
        times = [
            t for t in (self._check_at, self._upkeep_at, self._full_search_at) if t is not None
        ]
        if self._active_until > self._last_check_at + self._config.active_check_s:
            times.append(self._last_check_at + self._config.active_check_s)
        return min(times, default=None)

    # ----------------------------------------------------------------- internals

    def _jittered(self, interval_s: float) -> float:
        j = self._config.jitter
        return interval_s * (1.0 + self._rng.uniform(-j, j))

    def _deadline(self, rnd: _Round) -> float:
        silent = self._episode.silent if self._episode is not None else 0
        return rnd.sent_at + self._rtt.timeout(silent)

    def _trigger(self, now: float, why: str, kind: _Kind, *, stall: bool = False) -> None:
        """Evidence asks for a check: at once, unless one was asked within ``trigger_gap_s``."""
        if self._check_at is not None:
            return
        self._episode_by_stall = stall
        self._check_at = max(now, self._last_trigger_at + self._config.trigger_gap_s)
        self._last_trigger_at = self._check_at
        self._check_why, self._check_kind = why, kind

    def _start_check(self, now: float, *, upkeep: bool) -> None:
        value = self._value
        assert value is not None
        sizes = [(value, 1)]
        if upkeep and value < self._ceiling and not self._increase_told:
            sizes.append((value + 1, 1))
        why = "upkeep" if upkeep else "active-link check"
        self._send_round(now, _Kind.CHECK, sizes, why)

    def _begin(self, now: float, why: str, kind: _Kind) -> None:
        if kind is _Kind.CHECK:
            self._episode_by_stall = False
            self._send_round(now, _Kind.CHECK, [(self._value or 0, 1)], why)
        else:
            self._episode = _Episode(why, now)
            self._verify(now)

    def _verify(self, now: float) -> None:
        cfg = self._config
        assert self._value is not None
        sizes = [(self._value, cfg.verify_copies), (cfg.control_size, cfg.control_copies)]
        self._send_round(now, _Kind.VERIFY, sizes, "")

    def _send_round(self, now: float, kind: _Kind, sizes: list[tuple[int, int]], why: str) -> None:
        self._book.forget_before(now - max(_LATE_ACK_HORIZON_S, 10 * self._rtt.timeout(3)))
        ids = self._book.queue(sizes, now)
        self._round = _Round(kind, ids, now)
        self._last_check_at = now
        if kind is _Kind.CHECK:
            self._check_why = why
            self._state = WatchState.CHECKING
        else:
            assert self._episode is not None
            self._episode.probes += len(ids)
            self._state = WatchState.VERIFYING if kind is _Kind.VERIFY else WatchState.CONFIRMING

    def _end_round(self, now: float) -> None:
        rnd = self._round
        assert rnd is not None and self._value is not None
        self._round = None
        value = self._value
        probes = [p for p in self._book.of(rnd.probe_ids) if p.size <= value]
        at_value = [p for p in probes if p.size == value]
        if any(p.acked and p.size >= value for p in self._book.of(rnd.probe_ids)):
            self._state = WatchState.WATCHING  # (an episode was cleared in on_ack)
            return
        if rnd.kind is _Kind.CHECK:
            self._episode = _Episode(f"{self._check_why}: {value} lost", rnd.sent_at, probes=1)
            self._episode.value_lost = 1
            self._verify(now)
            return
        episode = self._episode
        assert episode is not None
        controls = sum(1 for p in probes if p.acked and p.size < value)
        lost = sum(1 for p in at_value if p.lost)
        if controls == 0:
            episode.silent += 1
            if episode.silent >= self._config.max_silent_rounds:
                self._clear(now, f"no probe acked in {episode.silent} rounds: peer or path "
                            "down, nothing learnt about size")  # fmt: skip
                return
            self._send_again(now, rnd.kind)
            return
        episode.silent = 0
        episode.hits += 1
        episode.value_lost += lost
        if rnd.kind is _Kind.VERIFY:
            self._events.append(DecreaseSuspected(value, f"{episode.trigger}; {value} lost "
                                                  f"×{lost} while {self._config.control_size} "
                                                  f"acked ×{controls}"))  # fmt: skip
        if episode.hits > self._config.confirm_rounds:
            self._decrease(
                now, episode, value, self._config.control_size,
                f"{episode.trigger}; {value} lost ×{episode.value_lost} in "
                f"{episode.hits} rounds while {self._config.control_size} acked "
                f"×{episode.control_acked}",
            )  # fmt: skip
            return
        self._send_again(now, _Kind.CONFIRM)

    def _send_again(self, now: float, kind: _Kind) -> None:
        cfg = self._config
        assert self._value is not None
        copies = cfg.verify_copies if kind is _Kind.VERIFY else cfg.confirm_copies
        self._send_round(now, kind, [(self._value, copies), (cfg.control_size, cfg.control_copies)],
                         "")  # fmt: skip

    def _decrease(
        self, now: float, episode: _Episode, size: int, known_good: int | None, reason: str
    ) -> None:
        self._events.append(
            DecreaseConfirmed(size, known_good, now - episode.started_at, episode.probes, reason)
        )
        self._state = WatchState.DECREASED
        self._round = None
        self._episode = None
        self._check_at = None
        self._book.drop_queued()

    def _clear(self, now: float, why: str) -> None:
        episode = self._episode
        assert episode is not None and self._value is not None
        self._events.append(DecreaseCleared(self._value, f"{episode.trigger}; cleared: {why}"))
        if self._episode_by_stall:
            # A stream that only sends (no answers expected) looks stalled in every sample:
            # each stall that proved harmless doubles the wait before the next one counts.
            self._stall_quiet_until = now + self._stall_holdoff_s
            self._stall_holdoff_s = min(2 * self._stall_holdoff_s, self._config.stall_holdoff_s[1])
            self._episode_by_stall = False
        self._episode = None
        self._round = None
        self._book.drop_queued()
        self._state = WatchState.WATCHING


def upkeep_bytes_per_hour(
    path_mtu: int,
    ceiling: int,
    config: WatchConfig | None = None,
    *,
    full_search_bytes: int = 0,
) -> float:
    """Probe bytes one idle, loss-free link costs per hour (the prober's side, IP bytes):
    the upkeep (value, and value + 1 below the ceiling, every ``upkeep_s``) plus the long-schedule
    full search of ``full_search_bytes``. Acks (82-byte IPv4 packets from the peer) are extra."""
    cfg = config if config is not None else WatchConfig()
    per_upkeep = path_mtu + (path_mtu + 1 if path_mtu < ceiling else 0)
    total = 3600.0 / cfg.upkeep_s * per_upkeep
    if cfg.full_search_s > 0:
        total += 3600.0 / cfg.full_search_s * full_search_bytes
    return total


__all__ = [
    "DecreaseCleared",
    "DecreaseConfirmed",
    "DecreaseSuspected",
    "FullSearchDue",
    "IncreaseSeen",
    "PathWatch",
    "Probe",
    "SentProbe",
    "WatchConfig",
    "WatchEvent",
    "WatchState",
]

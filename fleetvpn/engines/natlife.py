"""NAT mapping lifetime search: a sans-IO, sans-clock engine.

Measures: is there a NAT (the responder sees another address than the local one), a stateful
filter (a packet from a never-contacted responder port is dropped), and the idle time T after
which an *established* UDP mapping stops letting the responder's packets in.  Established =
traffic both ways plus a packet >= 2 s after creation, when Linux conntrack moves a flow to
``udp_timeout_stream``; a WireGuard flow is in this state.  The *unreplied* timeout is not
measured: after a new mapping the first keepalive must still arrive within it (reference.md).

Contract.  Inputs carry ``now`` (seconds, one monotonic clock; the engine reads no clock):
    start(now)                                       once
    on_binding(slot, mapped_addr, local_addr, now)   answer to SendBinding: the responder's view
    on_reply(slot, now)                              answer to SendCondition
    on_armed(slot, token, now)                       the responder's ack of an Arm
    on_fire(slot, token, now, from_other_port)       one copy of a fire
    on_send_error(slot, now)                         the adapter could not send on ``slot``
    handle_timer(now)                                at (or after) get_timer()
  Outputs: actions_to_send(now) -> [OpenSlot | CloseSlot (a UDP socket) | SendBinding |
    SendCondition (any request answered at once, e.g. a binding request) | Arm], to perform in
    order; get_timer() -> float | None; next_event() -> NatResult | NatFailed | None (exactly
    one, after every slot was closed).
  Errors: ValueError (bad config), RuntimeError (start twice); inputs for unknown or closed
    slots, stale tokens and duplicate copies are ignored (normal on UDP).  NatFailed when the
    binding request goes unanswered ``binding_tries`` times (1, 2, 4, 4, 4 s) or 8 slots in a
    row do.  Other requests are re-sent ``tries`` times, then the slot closes, its gap queued.
  Slot = one local UDP socket = one mapping once it sends; ids are never reused.  Fires come from
    the address the slot talks to, unless ``from_other_port``.  The responder must echo the Arm's
    token in the ack and each fire, and let an Arm *replace* its schedule for that source.

Clock reference: the responder acks on receipt and fires ``gap_s`` after receipt; the engine
starts the gap at the ack's arrival.  Ack and fire cross the NAT on the same path, so the NAT
idles exactly ``gap_s`` whatever the one-way delays.  A gap survived if any copy arrives, died
if none arrived by ack + gap + copy spread + grace (``grace_s`` + the largest RTT seen).  A
survival proves T > gap; a death may be loss.

Schedule.  Slot 0: binding request, then an Arm ``from_other_port`` (filter check); no NAT and
that fire arrives: done, nothing searched.  Otherwise new slots send a condition request and,
``stream_delay_s`` after creation, their Arm, whose ack completes the conditioning; at most
``max_slots`` open, at most ``max_new_per_s`` created in any 1 s window, only while there is
work.  Points are ``step`` = resolution_s - copy spread apart (a death at g only proves T <= g +
spread).  First comb (comb.first_comb) over [min_gap_s, max_lifetime_s], armed in this order as
slots become ready: a step apart on all slots when that fits (one round); else two canaries
(min_gap_s and a step above: a NAT short of table space evicts its oldest mappings), a pair
c -/+ step/2 around each of ``likely_lifetimes_s`` (the shortest first, on at most 5/8 of the
slots: when T = c the pair alone is the bracket), and the step window up from the canaries.
Far points (max_lifetime_s, and points splitting runs longer than 3/4 slots x step, the window
freed slots build) wait for freed slots: each is due 0.1 x its gap after the start, until then
the holes within that window above the largest survival L go first.  Refinement is continuous:
a slot whose fire arrived is still established and alive, so it is re-armed at once with the
lowest untested point one step above L (one gap per slot at a time: inbound packets refresh a
mapping).  Tests made moot by a survival are re-armed; tests above a death are reused if
provably alive (idle < L), else closed, or once table pressure is suspected kept until their
mapping surely expired (a closed socket leaves it in the NAT, and the slot opened instead
would evict a test).  Done when the smallest death above L is within a step: the lifetime
reported is L, a lower bound, and T lies in (L, L + the reported resolution_s <= resolution_s];
None if nothing died up to max_lifetime_s.  A death below a survival is re-tested; two, or every
gap dying down to min_gap_s, suggest eviction (table pressure): all slots close, deaths are
forgotten (survivals stay proven), max_slots halves and a new comb starts above L.

Wall time (virtual, 20 ms RTT, default config, the unit tests' simulated conntrack), known
when the smallest dying gap has died.  T a likely value (or within 0.45 s of one): T + 3.2 s
(T = 10) rising 0.2 s per earlier pair to T + 4.8 s (T = 180); T = 300: T + 4.5 s.  At 5 %
loss each way (50 seeds) the median is the same, the worst T + 6.5 s (a lost Arm or ack costs
a 1 s retry): 10..18 % of runs exceed T + 5 s for T >= 60 s, <= 2 % below.  Other T: T + 4.7
to 6.3 s up to 17 s (the first round's step window), T + 8..14 s for 17..24 s; beyond, a gap
armed at time a answers at a + gap and the window above L moves up with the survivals: ~2 T
(37 s: 1.91 T, 52 s: 1.94 T, 100 s: 1.94 T, 250 s: 2.10 T; mean 1.96 T over 5..300 s, worst
2.2 T); 5 % loss adds up to 2 s.  32 slots open at most; 32..36 mappings used.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from enum import Enum, auto
from random import Random

from fleetvpn.engines.comb import LIKELY_LIFETIMES_S as LIKELY_LIFETIMES_S
from fleetvpn.engines.comb import first_comb, step_window, window_s
from fleetvpn.engines.comb import gap_comb as gap_comb
from fleetvpn.engines.keepalive import DEFAULT_KEEPALIVE_S as DEFAULT_KEEPALIVE_S
from fleetvpn.engines.keepalive import keepalive_for as keepalive_for
from fleetvpn.engines.natevents import Action as Action
from fleetvpn.engines.natevents import Address as Address
from fleetvpn.engines.natevents import Arm as Arm
from fleetvpn.engines.natevents import CloseSlot as CloseSlot
from fleetvpn.engines.natevents import NatEvent as NatEvent
from fleetvpn.engines.natevents import NatFailed as NatFailed
from fleetvpn.engines.natevents import NatResult as NatResult
from fleetvpn.engines.natevents import OpenSlot as OpenSlot
from fleetvpn.engines.natevents import SendBinding as SendBinding
from fleetvpn.engines.natevents import SendCondition as SendCondition

_EPS = 1e-9
_PREEMPT_GUARD_S = 0.5  # never re-arm a slot whose fire is this close: copies may be in flight
_REUSE_MARGIN_S = 1.0
_FAR_DUE_RATIO = 0.1
_MIN_SLOTS = 4
_MAX_FAILED_SLOTS = 8
_INCONSISTENT_BEFORE_RESET = 2


class _Phase(Enum):
    IDLE = auto()
    DISCOVERY = auto()
    SEARCH = auto()
    DONE = auto()


class _State(Enum):
    BINDING = auto()  # discovery slot: binding request out
    FILTER = auto()  # discovery slot: other-port check running
    CONDITIONING = auto()  # first request out, waiting for its reply
    WAITING = auto()  # replied; waiting for created + stream_delay_s
    READY = auto()  # established and idle: may be armed now
    ARMING = auto()  # Arm out, waiting for the ack
    TESTING = auto()  # armed; waiting for a fire or the deadline
    EXPIRING = auto()  # moot test kept open until its mapping has surely expired


@dataclass(slots=True)
class _Slot:
    slot: int
    created_at: float
    state: _State
    due: float | None = None
    sent_at: float = 0.0
    tries: int = 1
    token: int = 0
    gap_s: float = 0.0
    armed_at: float = 0.0
    repeat: bool = False  # a re-test below the largest survival: exempt from pre-emption


@dataclass(frozen=True, slots=True)
class NatSearchConfig:
    """The search's knobs; the defaults are the product's."""

    max_lifetime_s: float = 300.0  # top of the range: nothing dies below it -> lifetime None
    min_gap_s: float = 5.0  # first gap; shorter ones are tried only once it has died
    resolution_s: float = 1.0  # width of the final bracket
    max_slots: int = 32  # mappings open at once
    max_new_per_s: int = 10  # new mappings in any 1 s window (RFC 5780 §5)
    # Fires per gap, over ~100 ms.  A death is wrong when every copy is lost: at 5 % loss that
    # is 1.3e-4 per gap with 3 copies, which ended ~1 in 600 simulated runs a step early.
    copies: int = 4
    copy_spacing_s: float = 0.033
    grace_s: float = 0.3  # wait this (plus the largest RTT seen) after the last copy is due
    reply_timeout_s: float = 1.0  # per try; the binding request backs off 1, 2, 4, 4, ... s
    tries: int = 3
    stream_delay_s: float = 2.1  # conntrack: stream timer after a packet >= 2 s from creation
    default_keepalive_s: int = DEFAULT_KEEPALIVE_S
    # Tries of the binding request, the one exchange whose loss ends the search: at 5 % loss
    # each way a try fails 9.75 % of the time; 3 tries failed 1 run in ~1,000, 5 in ~100,000.
    binding_tries: int = 5
    # Tested first, as a tight pair each (see comb.LIKELY_LIFETIMES_S); () for none.
    likely_lifetimes_s: tuple[float, ...] = LIKELY_LIFETIMES_S

    def __post_init__(self) -> None:
        counts = (
            self.resolution_s,
            self.reply_timeout_s,
            self.max_new_per_s,
            self.copies,
            self.tries,
            self.binding_tries,
            *self.likely_lifetimes_s,
        )
        if not 0 < self.min_gap_s < self.max_lifetime_s or self.max_slots < 2 or min(counts) <= 0:
            raise ValueError("need 0 < min_gap_s < max_lifetime_s, max_slots >= 2, others > 0")
        if min(self.copy_spacing_s, self.grace_s, self.stream_delay_s) < 0:
            raise ValueError("copy_spacing_s, grace_s and stream_delay_s must be >= 0")
        if (self.copies - 1) * self.copy_spacing_s > self.resolution_s / 2:
            raise ValueError("the copies' spread must stay within half the resolution")


class NatLifetimeSearch:
    """One NAT mapping lifetime measurement against one cooperating responder."""

    def __init__(self, rng: Random, config: NatSearchConfig | None = None) -> None:
        self._rng = rng
        self._cfg = cfg = config or NatSearchConfig()
        self._cap = cfg.max_slots  # halved on suspected table pressure
        self._spread_s = (cfg.copies - 1) * cfg.copy_spacing_s
        self._step_s = cfg.resolution_s - self._spread_s  # so that death + spread - L <= resolution
        self._phase = _Phase.IDLE
        self._started_at = 0.0
        self._slots: dict[int, _Slot] = {}
        self._next_slot = 0
        self._created: deque[float] = deque(maxlen=cfg.max_new_per_s)
        self._next_open_at: float | None = None
        self._actions: list[Action] = []
        self._events: deque[NatEvent] = deque()
        self._rtt_s = 0.0
        self._failed_in_row = 0
        self._mappings_used = 0
        self._gap_tests = 0

        self._mapped: Address = ("", 0)
        self._local: Address = ("", 0)
        self._nat = False
        self._filter: bool | None = None
        self._filter_acked = False
        self._filter_note = ""

        self._queue: list[float] = []  # the first round, and gaps whose slot was lost
        self._later: list[float] = []  # the comb's far points, after the holes near L
        self._repeats: list[float] = []
        self._repeated: set[float] = set()
        self._survived: list[float] = []
        self._died: list[float] = []
        self._flagged: set[int] = set()  # indexes into _died already counted as inconsistent
        self._inconsistent = 0
        self._inconsistent_this_round = 0
        self._reset_notes: list[str] = []

    # ---- inputs -------------------------------------------------------------------------

    def start(self, now: float) -> None:
        if self._phase is not _Phase.IDLE:
            raise RuntimeError("start() called twice")
        self._phase = _Phase.DISCOVERY
        self._started_at = now
        self._request(self._open(now, _State.BINDING), now)

    def on_binding(self, slot: int, mapped_addr: Address, local_addr: Address, now: float) -> None:
        s = self._slots.get(slot)
        if s is None or s.state is not _State.BINDING:
            return
        self._sample_rtt(s, now)
        self._mapped, self._local = mapped_addr, local_addr
        self._nat = mapped_addr != local_addr
        s.state, s.tries, s.gap_s = _State.FILTER, 1, 0.0
        self._request(s, now)
        if self._nat:  # the filter check only matters for the report: search right away
            self._begin_search(now)

    def on_reply(self, slot: int, now: float) -> None:
        s = self._slots.get(slot)
        if s is None or s.state is not _State.CONDITIONING:
            return
        self._sample_rtt(s, now)
        self._failed_in_row = 0
        s.state, s.due = _State.WAITING, max(now, s.created_at + self._cfg.stream_delay_s)
        self._plan(now)

    def on_armed(self, slot: int, token: int, now: float) -> None:
        s = self._slots.get(slot)
        if s is None or token != s.token:
            return
        if s.state is _State.FILTER and not self._filter_acked:
            self._sample_rtt(s, now)
            self._filter_acked = True
            s.due = now + self._fire_wait_s()
        elif s.state is _State.ARMING:
            self._sample_rtt(s, now)
            self._failed_in_row = 0
            s.state, s.armed_at = _State.TESTING, now
            s.due = now + s.gap_s + self._fire_wait_s()
            self._plan(now)

    def on_fire(self, slot: int, token: int, now: float, from_other_port: bool = False) -> None:
        s = self._slots.get(slot)
        if s is None or token != s.token:
            return
        if s.state is _State.FILTER:
            if from_other_port:
                self._filter_note = "a packet from a never-contacted responder port arrived"
                self._filter_done(now, filtered=False)
        elif s.state in (_State.ARMING, _State.TESTING, _State.EXPIRING) and not from_other_port:
            # Also valid while ARMING (ack lost): the NAT then idled at least gap_s too.
            self._survived.append(s.gap_s)
            self._gap_tests += 1
            s.state, s.due, s.repeat = _State.READY, None, False
            self._after_result(now)

    def on_send_error(self, slot: int, now: float) -> None:
        s = self._slots.get(slot)
        if s is None:
            return
        waiting = (_State.BINDING, _State.CONDITIONING, _State.ARMING)
        if s.state in waiting or (s.state is _State.FILTER and not self._filter_acked):
            s.due = now
            self.handle_timer(now)

    def handle_timer(self, now: float) -> None:
        if self._phase in (_Phase.IDLE, _Phase.DONE):
            return
        for s in list(self._slots.values()):
            if s.due is not None and s.due <= now and self._slots.get(s.slot) is s:
                self._expire(s, now)
                if self.done:
                    return
        self._plan(now)

    # ---- outputs ------------------------------------------------------------------------

    def actions_to_send(self, now: float) -> list[Action]:
        self._plan(now)
        actions, self._actions = self._actions, []
        return actions

    def next_event(self) -> NatEvent | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        if self._phase in (_Phase.IDLE, _Phase.DONE):
            return None
        dues = [s.due for s in self._slots.values() if s.due is not None]
        if self._next_open_at is not None:
            dues.append(self._next_open_at)
        return min(dues, default=None)

    @property
    def done(self) -> bool:
        return self._phase is _Phase.DONE

    # ---- slot life ----------------------------------------------------------------------

    def _open(self, now: float, state: _State) -> _Slot:
        s = _Slot(self._next_slot, now, state)
        self._next_slot += 1
        self._slots[s.slot] = s
        self._created.append(now)
        self._mappings_used += 1
        self._actions.append(OpenSlot(s.slot))
        return s

    def _close(self, s: _Slot) -> None:
        if self._slots.pop(s.slot, None) is not None:
            self._actions.append(CloseSlot(s.slot))

    def _request(self, s: _Slot, now: float) -> None:
        """(Re)send the request the slot's state waits on; an Arm gets a fresh token."""
        backoff = min(2 ** (s.tries - 1), 4) if s.state is _State.BINDING else 1
        s.sent_at, s.due = now, now + self._cfg.reply_timeout_s * backoff
        if s.state is _State.BINDING:
            self._actions.append(SendBinding(s.slot))
        elif s.state is _State.CONDITIONING:
            self._actions.append(SendCondition(s.slot))
        else:
            s.token = self._rng.getrandbits(64)
            copies, spacing = self._cfg.copies, self._cfg.copy_spacing_s
            other_port = s.state is _State.FILTER
            self._actions.append(Arm(s.slot, s.token, s.gap_s, copies, spacing, other_port))

    def _next_creation_at(self) -> float:
        if not self._created:
            return -math.inf
        at = self._created[-1] + 1.0 / self._cfg.max_new_per_s
        if len(self._created) == self._cfg.max_new_per_s:
            at = max(at, self._created[0] + 1.0)
        return at

    def _sample_rtt(self, s: _Slot, now: float) -> None:
        if s.tries == 1:  # Karn: a retried exchange says nothing about the RTT
            self._rtt_s = max(self._rtt_s, min(now - s.sent_at, self._cfg.reply_timeout_s))

    def _fire_wait_s(self) -> float:
        """From the expected first copy to giving up: the copies' spread plus grace."""
        return self._spread_s + self._cfg.grace_s + self._rtt_s

    def _expire(self, s: _Slot, now: float) -> None:
        cfg = self._cfg
        if s.state is _State.WAITING:
            s.state, s.due = _State.READY, None
        elif s.state is _State.EXPIRING:
            self._close(s)
        elif s.state is _State.TESTING:
            self._died.append(s.gap_s)
            self._gap_tests += 1
            self._close(s)
            self._after_result(now)
        elif s.state is _State.FILTER and self._filter_acked:
            self._filter_note = "no packet from a never-contacted responder port arrived"
            self._filter_done(now, filtered=True)
        elif s.tries < (cfg.binding_tries if s.state is _State.BINDING else cfg.tries):
            s.tries += 1
            self._request(s, now)
        elif s.state is _State.BINDING:
            self._fail(now, f"responder never answered the binding request ({s.tries} tries)")
        elif s.state is _State.FILTER:
            self._filter_note = "assumed: the responder never acknowledged the other-port check"
            self._filter_done(now, filtered=True)
        else:
            if s.state is _State.ARMING and not s.repeat and s.gap_s not in self._queue:
                self._queue.insert(0, s.gap_s)  # it was armed first: it stays urgent
            self._drop(s, now)

    def _drop(self, s: _Slot, now: float) -> None:
        self._close(s)
        self._failed_in_row += 1
        if self._failed_in_row >= _MAX_FAILED_SLOTS:
            self._fail(now, f"responder stopped answering: {self._failed_in_row} slots in a row")

    # ---- discovery ----------------------------------------------------------------------

    def _filter_done(self, now: float, filtered: bool) -> None:
        self._filter = filtered
        if (s := self._slots.get(0)) is not None:
            s.state, s.due = _State.WAITING, max(now, s.created_at + self._cfg.stream_delay_s)
        if self._phase is _Phase.DISCOVERY:
            if not filtered:
                self._finish(now)
                return
            self._begin_search(now)
        self._plan(now)

    def _begin_search(self, now: float) -> None:
        self._phase = _Phase.SEARCH
        self._queue, self._later = self._first_comb(self._cfg.min_gap_s)
        self._plan(now)

    def _first_comb(self, start_s: float) -> tuple[list[float], list[float]]:
        cfg = self._cfg
        return first_comb(
            start_s, cfg.max_lifetime_s, self._cap, self._step_s, cfg.likely_lifetimes_s
        )

    # ---- search -------------------------------------------------------------------------

    def _lo(self) -> float:
        return max(self._survived, default=0.0)

    def _hi(self, lo: float) -> float | None:
        return min((g for g in self._died if g > lo), default=None)

    def _after_result(self, now: float) -> None:
        lo = self._lo()
        for i, gap in enumerate(self._died):
            if gap <= lo and i not in self._flagged:
                self._flagged.add(i)
                self._inconsistent += 1
                self._inconsistent_this_round += 1
                if gap not in self._repeated:
                    self._repeated.add(gap)
                    self._repeats.append(gap)
        # Everything dying down to min_gap_s is more likely eviction than a real lifetime.
        implausible = (
            not self._survived and min(self._died, default=math.inf) <= self._cfg.min_gap_s
        )
        suspect = implausible or self._inconsistent_this_round >= _INCONSISTENT_BEFORE_RESET
        if suspect and self._cap > _MIN_SLOTS:
            self._reset_notes.append(
                f"every gap down to {self._cfg.min_gap_s:g} s died"
                if implausible
                else f"{self._inconsistent_this_round} inconsistent results"
            )
            self._reset(lo)
        self._plan(now)

    def _reset(self, lo: float) -> None:
        """Suspected table pressure: start over above ``lo`` with half the mappings."""
        for s in list(self._slots.values()):
            self._close(s)
        self._cap = max(_MIN_SLOTS, self._cap // 2)
        self._died.clear()
        self._flagged.clear()
        self._repeats.clear()
        self._inconsistent_this_round = 0
        self._queue, self._later = self._first_comb(max(self._cfg.min_gap_s, lo + self._step_s))

    def _plan(self, now: float) -> None:
        if self._phase is not _Phase.SEARCH:
            return
        lo = self._lo()
        hi = self._hi(lo)
        settled = lo >= self._cfg.max_lifetime_s or (
            hi is not None and hi - lo <= self._step_s + _EPS
        )
        if settled and self._filter is not None:
            self._finish(now)
            return
        self._queue = [g for g in self._queue if g > lo and (hi is None or g < hi)]
        self._later = [g for g in self._later if g > lo and (hi is None or g < hi)]
        for s in list(self._slots.values()):
            if s.state not in (_State.TESTING, _State.EXPIRING) or s.repeat:
                continue
            if s.gap_s <= lo and s.armed_at + s.gap_s - now > _PREEMPT_GUARD_S:
                s.state, s.due = _State.READY, None  # known to survive: re-arm it
            elif hi is not None and s.gap_s >= hi:
                if now - s.armed_at < lo - _REUSE_MARGIN_S:  # idle < L < T: still alive
                    s.state, s.due = _State.READY, None
                elif self._reset_notes:
                    # Table pressure: closing would leave the mapping in the NAT, and the slot
                    # opened instead would evict a test.  Keep it until T <= hi + spread is over.
                    s.state, s.due = _State.EXPIRING, s.armed_at + hi + self._fire_wait_s()
                else:
                    self._close(s)
        ready = [s for s in self._slots.values() if s.state is _State.READY]
        wanted = self._wanted(lo, hi, now, limit=len(ready) + self._cap)
        for s in ready:
            if not wanted or len(self._slots) > self._cap:
                self._close(s)
                continue
            gap = wanted.pop(0)
            if gap in self._repeats:
                self._repeats.remove(gap)
            elif gap in self._queue:
                self._queue.remove(gap)
            elif gap in self._later:
                self._later.remove(gap)
            s.state, s.tries, s.gap_s, s.repeat = _State.ARMING, 1, gap, gap <= lo
            self._request(s, now)
        pending = (_State.FILTER, _State.CONDITIONING, _State.WAITING)
        needed = len(wanted) - sum(1 for s in self._slots.values() if s.state in pending)
        self._next_open_at = None
        while needed > 0 and len(self._slots) < self._cap:
            at = self._next_creation_at()
            if at > now:
                self._next_open_at = at
                break
            self._request(self._open(now, _State.CONDITIONING), now)
            needed -= 1

    def _wanted(self, lo: float, hi: float | None, now: float, limit: int) -> list[float]:
        """Gaps worth a test now, most urgent first: repeats, the first round, far comb points
        whose time has come, the holes within the window above ``lo``, the other far points,
        the other holes.  A far point f is due ``_FAR_DUE_RATIO`` x f after the start: later
        would delay a lifetime above f by that much, earlier takes slots from the holes."""
        top = hi if hi is not None else self._cfg.max_lifetime_s
        testing = (_State.ARMING, _State.TESTING)
        active = {s.gap_s for s in self._slots.values() if s.state in testing and not s.repeat}
        # Below min_gap_s only once a gap that small has died.
        start = max(lo, self._cfg.min_gap_s if hi is None or hi > self._cfg.min_gap_s else 0.0)
        comb = {*active, *self._queue, *self._later}
        points = sorted({start, top} | {g for g in comb if start < g < top})
        elapsed = now - self._started_at
        due = [g for g in self._later if g * _FAR_DUE_RATIO <= elapsed]
        wanted = [*self._repeats, *self._queue, *due]
        holes = step_window(points, self._step_s, max(0, limit - len(wanted)))
        horizon = lo + window_s(self._cap, self._step_s)
        far = [g for g in self._later if g not in due]
        near = sorted([g for g in holes if g <= horizon] + [g for g in far if g <= horizon])
        wanted += near + [g for g in far if g > horizon] + [g for g in holes if g > horizon]
        return wanted[: max(limit, len(self._repeats) + len(self._queue))]

    # ---- the end ------------------------------------------------------------------------

    def _finish(self, now: float) -> None:
        searched, lo, cfg = self._phase is _Phase.SEARCH, self._lo(), self._cfg
        lifetime = lo if searched and lo < cfg.max_lifetime_s else None
        # A death at g only proves T <= g + spread: the copies after a lost first one may be late.
        width = (self._hi(lo) or lo) - lo + self._spread_s
        resolution = None if lifetime is None else round(width, 6)
        bound = cfg.max_lifetime_s if searched and lifetime is None else None
        filtered = bool(self._filter)
        keepalive, why = keepalive_for(
            lifetime, self._nat, filtered, default_s=cfg.default_keepalive_s, lower_bound_s=bound
        )
        (lip, lport), (mip, mport) = self._local, self._mapped
        parts = [
            f"NAT ({lip}:{lport} seen as {mip}:{mport})" if self._nat else f"no NAT ({lip})",
            f"{'a' if filtered else 'no'} stateful filter: {self._filter_note}",
            f"{self._gap_tests} gap tests on {self._mappings_used} mappings"
            if searched
            else "no lifetime search",
        ]
        if lifetime is not None:
            parts.append(
                f"mapping lifetime {lifetime:g} s: the largest idle gap that survived; it "
                f"expires within ({lifetime:g}, {lifetime + (resolution or 0.0):g}] s idle"
            )
        parts.append(why)
        if self._inconsistent:
            parts.append(
                f"{self._inconsistent} inconsistent result(s) (a gap died while a longer one "
                "survived: loss or table pressure), re-tested"
            )
        if self._reset_notes:
            parts.append(
                f"table pressure suspected ({'; then '.join(self._reset_notes)}): restarted "
                f"{len(self._reset_notes)} time(s), at most {self._cap} mappings at once"
            )
        self._end(
            NatResult(
                nat=self._nat,
                mapped_address=self._mapped,
                local_address=self._local,
                port_preserved=mport == lport,
                stateful_filter=filtered,
                mapping_lifetime_s=lifetime,
                resolution_s=resolution,
                keepalive_s=keepalive,
                elapsed_s=now - self._started_at,
                mappings_used=self._mappings_used,
                gap_tests=self._gap_tests,
                inconsistent_results=self._inconsistent,
                restarts=len(self._reset_notes),
                reason="; ".join(parts),
            )
        )

    def _fail(self, now: float, reason: str) -> None:
        self._end(NatFailed(reason=reason, elapsed_s=now - self._started_at))

    def _end(self, event: NatEvent) -> None:
        for s in list(self._slots.values()):
            self._close(s)
        self._phase = _Phase.DONE
        self._next_open_at = None
        self._events.append(event)

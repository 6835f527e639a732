"""NAT watch: a sans-IO, sans-clock engine that notices, from a tunnel's own evidence, that a NAT
mapping lifetime shrank below the keepalive that should hold it, and asks for a re-measurement.

One engine per WireGuard peer of a link where one side is behind a NAT and sends a keepalive of
``keepalive_s`` towards the other (the keepalive rule, keepalive.py). It reads `wg show dump`
samples only; it sends nothing and decides nothing about the keepalive itself: the NAT
lifetime search (natlife.py) measures again, the policy re-tunes.

Contract::

    watch = NatWatch(keepalive_s=9, side="outside")   # or side="nated"
    on each `wg show dump` sample of the peer (every 1-5 s):
        watch.on_sample(now, tx_bytes=…, rx_bytes=…, latest_handshake=…, endpoint=…)
        while (event := watch.next_event()) is not None: ...
    after a re-measurement / a new keepalive: watch.set_keepalive(keepalive_s, now)

``get_timer()`` is always None (evidence comes with samples). Nothing raises after
construction (ValueError for bad arguments).

What a mapping that expires under the keepalive looks like (T < K; keepalive.py wants T >= 2K):
the mapping dies T s after the NATed side's last packet and a new one is made by its next
keepalive, K s after it. Packets from outside that arrive in between are dropped.

* ``side="outside"`` (this node is the peer the NATed node keeps its mapping towards):
  - the peer's *endpoint changes* (address or port) although its keepalive should hold the
    mapping: a NAT that does not preserve ports made a new mapping. Random loss cannot do this;
    a NAT reboot or a roam can, and a re-measurement is worth it then too: decisive,
    :class:`NatRemeasure` at once.
  - an *unanswered spell*: after a quiet sample, we sent (tx > ``quiet_bytes``) and got
    nothing but keepalive-sized packets back (rx <= ``quiet_bytes``) for at least one whole
    sample, and answers resumed within K + ``slack_s`` of the spell's start (the peer's
    keepalive re-opened its mapping: a path problem does not heal by itself on that clock).
    Random loss makes such spells too, and a port-preserving NAT fails only the sends that
    fall between T and K after the last packet, so spells are never decisive:
    ``episodes_needed`` of them in a row (no answered send after a quiet sample in between)
    within ``2 K + 30 s`` are :class:`NatShrinkSuspected` (the agent may run a re-measurement
    bounded by 2 K + 2 s, budget permitting).
* ``side="nated"`` (this node is behind the NAT): a handshake sooner than
  ``early_handshake_s`` after the previous one while this node sent nothing but keepalives —
  the peer re-initiated (its data went unanswered for 15 s: WireGuard's KEEPALIVE_TIMEOUT +
  REKEY_TIMEOUT) and got through only after our keepalive: suspected; two within the window:
  decisive (random loss would have to eat 15 s of the peer's packets, twice).

Requests and suspicions are each rate-limited to one per ``min_gap_s`` (a re-measurement
opens ~36 mappings).
Growth of a NAT timer is left to the measurement schedule (hysteresis as in the policy).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Final, Literal

REKEY_AFTER_TIME_S: Final = 120.0  # wireguard-linux messages.h
Side = Literal["outside", "nated"]


@dataclass(frozen=True, slots=True)
class NatShrinkSuspected:
    reason: str


@dataclass(frozen=True, slots=True)
class NatRemeasure:
    """Measure the NAT mapping lifetime again (the NATed node's NAT); ``reason`` says why."""

    keepalive_s: float
    reason: str


NatWatchEvent = NatShrinkSuspected | NatRemeasure


class NatWatch:
    """Evidence that a NAT mapping expires under the keepalive (module docstring)."""

    def __init__(
        self,
        *,
        keepalive_s: float,
        side: Side,
        quiet_bytes: int = 64,  # per sample: a keepalive is 32 bytes on WireGuard's counters
        slack_s: float = 5.0,
        episodes_needed: int = 3,
        early_handshake_s: float = REKEY_AFTER_TIME_S - 10.0,
        min_gap_s: float = 600.0,
    ) -> None:
        if side not in ("outside", "nated"):
            raise ValueError(f"side must be 'outside' or 'nated', not {side!r}")
        if keepalive_s < 0 or episodes_needed < 1 or min_gap_s < 0:
            raise ValueError("keepalive_s and min_gap_s must be >= 0, episodes_needed >= 1")
        self._side = side
        self._keepalive_s = keepalive_s
        self._quiet = quiet_bytes
        self._slack_s = slack_s
        self._needed = episodes_needed
        self._early_s = early_handshake_s
        self._min_gap_s = min_gap_s
        self._events: deque[NatWatchEvent] = deque()
        self._last: tuple[float, int, int] | None = None  # (time, tx, rx) of the last sample
        self._handshake: float | None = None
        self._endpoint: str | None = None
        self._quiet_before = False  # the previous sample was quiet both ways
        self._spell_from: float | None = None  # unanswered spell in progress since
        self._spell_len = 0  # samples in the spell
        self._evidence: list[tuple[float, str]] = []
        self._last_request = float("-inf")
        self._last_suspect = float("-inf")

    @property
    def keepalive_s(self) -> float:
        return self._keepalive_s

    @property
    def window_s(self) -> float:
        """Evidence older than this is forgotten: the issue's bound, 2 K + 30 s."""
        return 2 * self._keepalive_s + 30.0

    def set_keepalive(self, keepalive_s: float, now: float) -> None:
        """A new keepalive applies (or a re-measurement finished): forget the evidence."""
        self._keepalive_s = keepalive_s
        self._evidence.clear()
        self._spell_from = None

    def get_timer(self) -> float | None:
        return None

    def next_event(self) -> NatWatchEvent | None:
        return self._events.popleft() if self._events else None

    def on_sample(
        self,
        now: float,
        *,
        tx_bytes: int,
        rx_bytes: int,
        latest_handshake: float | None,
        endpoint: str | None,
    ) -> None:
        last, self._last = self._last, (now, tx_bytes, rx_bytes)
        handshake_before, self._handshake = self._handshake, latest_handshake
        endpoint_before = self._endpoint
        if endpoint is not None:
            self._endpoint = endpoint
        if last is None or tx_bytes < last[1] or rx_bytes < last[2]:
            return
        if self._keepalive_s <= 0:
            return  # no keepalive holds a mapping on this link: nothing to watch
        tx, rx = tx_bytes - last[1], rx_bytes - last[2]
        self._evidence = [(t, w) for t, w in self._evidence if t > now - self.window_s]
        if self._side == "outside":
            self._outside(now, tx, rx, endpoint_before, endpoint)
        else:
            self._nated(now, tx, handshake_before, latest_handshake)
        self._quiet_before = tx <= self._quiet and rx <= self._quiet

    def _outside(
        self, now: float, tx: int, rx: int, endpoint_before: str | None, endpoint: str | None
    ) -> None:
        k = self._keepalive_s
        if endpoint is not None and endpoint_before is not None and endpoint != endpoint_before:
            why = (f"the peer's endpoint moved {endpoint_before} -> {endpoint} although its "
                   f"keepalive {k:g} s should hold its NAT mapping")  # fmt: skip
            self._request(now, why)
            return
        answered = rx > self._quiet
        if self._spell_from is None:
            if tx > self._quiet and not answered and self._quiet_before:
                self._spell_from, self._spell_len = now, 1
            elif tx > self._quiet and answered and self._quiet_before:
                self._evidence.clear()  # a send after a quiet spell was answered at once
            return
        if not answered:
            self._spell_len += 1
            if now - self._spell_from > k + self._slack_s:
                self._spell_from = None  # too long for a keepalive to end it: not the NAT
            return
        spell_s, self._spell_from = now - self._spell_from, None
        what = (f"sends after a quiet spell unanswered for {spell_s:.0f} s until the peer's "
                f"keepalive ({k:g} s) re-opened its mapping")  # fmt: skip
        self._evidence.append((now, what))
        if len(self._evidence) >= self._needed:
            self._suspect(now, f"{what} ({len(self._evidence)} times in a row)")
            self._evidence.clear()

    def _nated(self, now: float, tx: int, before: float | None, latest: float | None) -> None:
        if before is None or latest is None or not 0 < latest - before < self._early_s:
            return
        if tx > self._quiet:
            return  # we were sending: our own re-initiation or rekey, not the peer locked out
        what = (
            f"the peer renewed the handshake {latest - before:.0f} s after the previous "
            "one while this node only sent keepalives (its packets were not getting in)"
        )
        self._evidence.append((now, what))
        if len(self._evidence) >= 2:
            self._request(now, f"{what} ({len(self._evidence)} times within {self.window_s:g} s)")
        else:
            self._suspect(now, what)

    def _suspect(self, now: float, what: str) -> None:
        if now - self._last_suspect < self._min_gap_s:
            return
        self._last_suspect = now
        k = self._keepalive_s
        self._events.append(
            NatShrinkSuspected(f"mapping lifetime may be below the keepalive {k:g} s: {what}")
        )

    def _request(self, now: float, why: str) -> None:
        if now - self._last_request < self._min_gap_s:
            return
        self._last_request = now
        self._evidence.clear()
        self._events.append(NatRemeasure(self._keepalive_s, f"re-measure the NAT: {why}"))

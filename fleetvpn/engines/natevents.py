"""What the NAT lifetime engine asks its adapter to do (actions) and what it reports (events).

Plain frozen values, no behaviour; the contract is in ``fleetvpn.engines.natlife``, which
re-exports every name here.
"""

from __future__ import annotations

from dataclasses import dataclass

Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class OpenSlot:
    """Open a new local UDP socket; its first packet creates a new NAT mapping."""

    slot: int


@dataclass(frozen=True, slots=True)
class CloseSlot:
    slot: int


@dataclass(frozen=True, slots=True)
class SendBinding:
    """Ask the responder which address it sees (answer: on_binding)."""

    slot: int


@dataclass(frozen=True, slots=True)
class SendCondition:
    """A request the responder answers at once (answer: on_reply)."""

    slot: int


@dataclass(frozen=True, slots=True)
class Arm:
    """Responder: ack now, then send ``copies`` fires starting ``gap_s`` after receipt."""

    slot: int
    token: int
    gap_s: float
    copies: int
    spacing_s: float
    from_other_port: bool = False


Action = OpenSlot | CloseSlot | SendBinding | SendCondition | Arm


@dataclass(frozen=True, slots=True)
class NatResult:
    nat: bool
    mapped_address: Address
    local_address: Address
    port_preserved: bool
    stateful_filter: bool
    mapping_lifetime_s: float | None  # lower bound L; None: nothing expired (or nothing to expire)
    resolution_s: float | None  # the lifetime lies in (L, L + resolution_s]
    keepalive_s: int
    elapsed_s: float
    mappings_used: int
    gap_tests: int
    inconsistent_results: int  # a gap died while a longer one survived
    restarts: int  # with half the mappings, on suspected table pressure
    reason: str


@dataclass(frozen=True, slots=True)
class NatFailed:
    reason: str
    elapsed_s: float


NatEvent = NatResult | NatFailed

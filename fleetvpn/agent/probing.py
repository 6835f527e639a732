"""The agent's probing jobs and the path supervisor's port (split from daemon.py, style rule
13): the light `wg show dump` sample for the watches, the NAT measurement, RTT/loss through the
tunnel, reverse PMTU runs for the peers that dial this node ("probe me back", probes.py), and
the :class:`~fleetvpn.agent.paths.AgentPort` methods (record a path MTU, apply the holds at once,
report at once, re-measure the NAT, say hello after a forward search).

:class:`ProbingJobs` is a mixin of :class:`fleetvpn.agent.daemon.Agent`: the attributes and the
three methods it declares are the agent's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import time
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any, Final

from fleetvpn import grammar
from fleetvpn.agent import startup
from fleetvpn.agent.config import AgentConfig
from fleetvpn.agent.desired import Desired, PeerPlan
from fleetvpn.agent.paths import PathSupervisor
from fleetvpn.agent.probes import ResponderSet, measure_reverse, measure_rtt
from fleetvpn.agent.report import PathMtu
from fleetvpn.agent.schedule import ProbeBudget, Scheduler
from fleetvpn.model import Family, NatMeasurement
from fleetvpn.net.wire import KeyLike
from fleetvpn.runner import Runner
from fleetvpn.wg.dump import parse_dump
from fleetvpn.wg.state import TunnelSpec

log = logging.getLogger("fleetvpn.agent")

PMTU_TIMEOUT_S: Final = 30.0
HELLO_REPEAT_S: Final = 60.0  # the first hello to a peer is sent again once, this much later
HELLO_DEFER_MAX_S: Final = 120.0  # a hello the probe budget refuses waits at most this long
NAT_CHECK_MIN_GAP_S: Final = 120.0  # peers' NAT-check requests: one measurement per this


async def resolve(endpoint: str) -> tuple[tuple[str, int] | None, str]:
    """``endpoint`` (canonical, from the desired state) → ((address, port), "") or (None, why).
    A DNS name is resolved by ``getaddrinfo`` in the loop's executor (never on the loop)."""
    parsed = grammar.Endpoint.parse(endpoint)
    if parsed.address is not None:
        return (str(parsed.address), parsed.port), ""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(str(parsed.host), parsed.port, type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError) as e:
        return None, f"{parsed.host} does not resolve ({e})"
    for _family, _type, _proto, _name, sockaddr in infos:
        try:
            address = grammar.ip_address(str(sockaddr[0]))
        except grammar.GrammarError:
            continue  # a scoped IPv6 address: not one the fleet can use
        return (str(address), parsed.port), ""
    return None, f"{parsed.host} resolves to no usable address"


def _endpoint_text(address: str, port: int) -> str:
    return str(grammar.Endpoint(grammar.ip_address(address), port))


class ProbingJobs:
    config: AgentConfig
    node: str
    desired: Desired | None
    paths: PathSupervisor | None
    tunnel: Any
    probe_key: KeyLike
    pmtu: dict[str, PathMtu]
    rtt: dict[str, Any]
    nat: NatMeasurement | None
    scheduler: Scheduler
    wake: asyncio.Event
    responder: ResponderSet | None
    hellos_repeated: set[str]
    deferred_hellos: dict[str, asyncio.TimerHandle]
    budget: ProbeBudget
    pmtu_slots: asyncio.Semaphore
    tasks: dict[str, asyncio.Task[None]]
    stopping: bool
    nat_check_at: float
    save_again: bool

    def _start(self, job: str) -> None:
        raise NotImplementedError

    async def _guarded(self, job: str, coro: Awaitable[None]) -> None:
        raise NotImplementedError

    async def _apply(self, desired: Desired, *, save: bool) -> None:
        raise NotImplementedError

    async def _job_watch(self) -> None:
        """`wg show dump` alone (one command, not the five of a full read) for the watches."""
        if self.desired is None or self.paths is None or self.tunnel is None:
            return
        argv = ["wg", "show", self.config.interface, "dump"]
        proc = await asyncio.to_thread(Runner().run, argv, check=False, quiet=True)
        if proc.returncode != 0:
            return  # no interface (yet): the full sample logs it
        try:
            _, statuses = parse_dump(proc.stdout)
        except ValueError as e:
            log.warning("wg show dump: %s", e)
            return
        finally:
            del proc  # its stdout holds the private key
        self.paths.sample(statuses, {p.public_key: p.name for p in self.desired.peers})

    async def _job_nat(self) -> None:
        from fleetvpn.net.natprobe import measure_nat
        from fleetvpn.net.pmtuprobe import ProbeError

        target = self.config.probe.nat_responder
        if target is None:
            return
        try:
            result = await measure_nat(
                target, self.probe_key, max_lifetime_s=self.config.probe.nat_max_lifetime_s
            )
        except (ProbeError, OSError) as e:
            log.warning("NAT measurement against %s:%d failed: %s", *target, e)
            return
        self.nat = NatMeasurement(
            measured_at=datetime.now(UTC).replace(microsecond=0),
            nat=result.nat,
            stateful_filter=result.stateful_filter,
            mapped_address=result.mapped_address,
            mapping_lifetime_s=result.mapping_lifetime_s,
            resolution_s=result.resolution_s,
            max_lifetime_s=self.config.probe.nat_max_lifetime_s,
        )
        log.info("NAT: %s", result.reason)
        await asyncio.to_thread(startup.save_measurements, self.config, dict(self.pmtu), self.nat)

    async def _job_rtt(self) -> None:
        if self.desired is None:
            return
        port = self.config.probe.listen_port
        peers = [p for p in self.desired.peers if p.tunnel_ipv4]

        async def one(plan: PeerPlan) -> None:
            with contextlib.suppress(OSError):
                self.rtt[plan.name] = await measure_rtt((plan.tunnel_ipv4 or "", port),
                                                        self.probe_key)  # fmt: skip

        await asyncio.gather(*(one(p) for p in peers))

    # --- the path supervisor's port (paths.AgentPort) ----------------------------------------
    def spec(self) -> TunnelSpec | None:
        return self.desired.spec if self.desired is not None else None

    async def resolve(self, endpoint: str) -> tuple[tuple[str, int] | None, str]:
        return await resolve(endpoint)

    def record(self, peer: str, family: int, path_mtu: int, reason: str, how: str) -> None:
        fam: Family = 6 if family == 6 else 4
        before = self.pmtu.get(peer)
        same = before is not None and (before.family, before.path_mtu) == (fam, path_mtu)
        fragments = before.fragments_cross if same and before is not None else None
        self.pmtu[peer] = PathMtu(fam, path_mtu, False, time.time(), how, reason, fragments)
        self._request_save()

    def record_fragments(self, peer: str, crossed: bool) -> None:
        known = self.pmtu.get(peer)
        if known is not None:
            self.pmtu[peer] = dataclasses.replace(known, fragments_cross=crossed)
            self._request_save()

    def _request_save(self) -> None:
        self.save_again = True
        self._start("save")

    async def _job_save(self) -> None:
        # a record made while a save runs asks for one more: _start drops a request for a job
        # already running, and this save's snapshot was taken before that record
        self.save_again = True
        while self.save_again:
            self.save_again = False
            pmtu, nat = dict(self.pmtu), self.nat
            await asyncio.to_thread(startup.save_measurements, self.config, pmtu, nat)

    def apply_local(self, why: str) -> None:
        if self.desired is None or not self.config.apply:
            log.info("would lower locally (apply: false): %s", why)
            return
        log.warning("applying locally: %s", why)
        desired = self.desired
        self.tasks[f"local:{time.monotonic()}"] = asyncio.ensure_future(
            self._guarded("local apply", self._apply(desired, save=False))
        )

    def report_now(self) -> None:
        self._start("report")

    def remeasure_nat(self, why: str) -> None:
        if "nat" in self.scheduler.jobs:
            log.warning("NAT re-measurement now: %s", why)
            self.scheduler.trigger("nat", time.monotonic())
            self.wake.set()

    def ask_nat_check(self, peer: str, why: str) -> None:
        """A NATed peer's mapping seems to expire under its keepalive (our NAT watch, side
        "outside"): ask it, through the tunnel, to measure its NAT again."""
        plan = (
            next((p for p in self.desired.peers if p.name == peer), None) if self.desired else None
        )
        if plan is None or plan.tunnel_ipv4 is None or self.responder is None:
            return
        log.warning("asking %s to measure its NAT again: %s", peer, why)
        self.responder.send_nat_check((plan.tunnel_ipv4, self.config.probe.listen_port))

    def _on_nat_check(self, peer: str) -> None:
        """A peer asks us to measure our NAT again (its NAT watch saw our mapping expire under
        our keepalive): at most once per NAT_CHECK_MIN_GAP_S, whoever asks."""
        now = time.monotonic()
        if now - self.nat_check_at < NAT_CHECK_MIN_GAP_S:
            log.info("%s asks for a NAT measurement; the last one was asked %.0f s ago", peer,
                     now - self.nat_check_at)  # fmt: skip
            return
        self.nat_check_at = now
        self.remeasure_nat(f"{peer} sees its packets to us go unanswered between our keepalives")

    def measured_forward(self, peer: str, target: tuple[str, int]) -> None:
        """A forward search concluded: a node without an endpoint asks to be probed back."""
        if self.config.endpoint is None and self.responder is not None:
            self.responder.send_hello(target)  # "probe me back": b → this node
            if peer not in self.hellos_repeated:  # a peer that learns of us later gets a 2nd
                self.hellos_repeated.add(peer)
                asyncio.get_running_loop().call_later(
                    HELLO_REPEAT_S, self.responder.send_hello, target
                )

    def _on_unknown_hello(self) -> None:
        """A hello from a node not in our desired state yet: fetch it now (probes.py)."""
        self.scheduler.trigger("desired", time.monotonic())
        self.wake.set()

    def _on_hello(self, peer: str, addr: tuple[str, int]) -> None:
        if self.stopping:
            return
        now = time.monotonic()
        # A peer says its path changed (it concluded a search and asks to be probed back):
        # urgent, since its NAT's mapping for the hello lives only 10-30 s (ProbeBudget); and
        # if refused, kept for when the budget allows, if that is soon, never dropped (the
        # hub's direction towards a peer without an endpoint is measured only on its hellos).
        why_not = self.budget.allow(peer, now, urgent=True)
        if why_not is not None:
            wait_s = self.budget.next_allowed(peer, now, urgent=True) - now
            if wait_s > HELLO_DEFER_MAX_S:
                log.debug("hello from %s at %s:%d ignored: %s", peer, *addr, why_not)
                return
            pending = self.deferred_hellos.pop(peer, None)
            if pending is not None:
                pending.cancel()
            log.debug("hello from %s at %s:%d in %.0f s: %s", peer, *addr, wait_s, why_not)
            self.deferred_hellos[peer] = asyncio.get_running_loop().call_later(
                wait_s + 0.5, self._on_hello, peer, addr
            )
            return
        self.deferred_hellos.pop(peer, None)
        key = f"reverse:{peer}"
        if key in self.tasks and not self.tasks[key].done():
            return
        self.tasks[key] = asyncio.ensure_future(self._guarded(key, self._measure(peer, addr)))

    async def _measure(self, peer: str, target: tuple[str, int]) -> None:
        """A reverse run (probes.py): this node's direction towards a peer that dials it."""
        from fleetvpn.net.pmtuprobe import ProbeError

        self.budget.spend(peer, time.monotonic())
        async with self.pmtu_slots:
            try:
                result = await measure_reverse(
                    target, self.probe_key, self.config.probe.listen_port, PMTU_TIMEOUT_S
                )
            except (ProbeError, OSError) as e:
                log.warning("PMTU %s → %s (reverse %s:%d) failed: %s", self.node, peer, *target, e)
                return
        before = self.pmtu.get(peer)
        log.info("path MTU %s → %s: %d (reverse, IPv%d, %d probes, %.2f s): %s", self.node, peer,
                 result.path_mtu, result.family, result.probes_sent, result.elapsed_s,
                 result.reason)  # fmt: skip
        if self.paths is not None:
            previous = before.path_mtu if before else None
            self.paths.measured(
                peer, result.family, result.path_mtu, previous, result.reason, "reverse"
            )

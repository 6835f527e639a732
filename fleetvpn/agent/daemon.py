"""``fleetvpn agent run``: the node agent's one asyncio loop. The wiring, not the logic: what to do
when comes from :mod:`~fleetvpn.agent.schedule`, what to report from
:mod:`~fleetvpn.agent.report`, the tunnel's changes from :mod:`fleetvpn.wg`, the measurements from
:mod:`fleetvpn.net` and :mod:`~fleetvpn.agent.probes`.

Life of an agent:
1. Start-up: the WireGuard private key in ``state_dir/wg.key`` (generated, mode 0600, unless it
   exists), the node token in ``state_dir/node.json`` (enrolled with the enrollment token unless
   it exists; retried while the controller is unreachable). With ``apply: true`` the last good
   desired state (``desired.json``) is reconciled at once — a no-op on an established tunnel, so
   a restart (even after SIGKILL mid-apply) leaves a working tunnel as it was, and repairs a
   half-applied one. Then the probe responder starts.
2. The loop runs jittered jobs: ``desired`` (fetch, reconcile when ``apply``, save as last good
   after a clean apply; a failed apply was rolled back by the wg layer and is logged with the
   step that failed), ``report`` (snapshot → spool → send in order), ``nat``, ``rtt`` (with a
   full-size probe through the tunnel every ``FULL_SIZE_EVERY`` rounds: lost twice while the
   small ones arrive, the peer is re-probed at once), one ``pmtu:PEER`` job per peer (see
   probes.py for the directions), and a wg sample every ``SAMPLE_S`` that feeds the re-probe
   triggers (endpoint changed, handshake stale).
3. Controller unreachable: nothing changes on the tunnel; reports queue in the spool (bounded)
   and leave in order when it answers again. A 429 (``client.Throttled``) holds every request
   to the controller (desired state, reports) until its Retry-After has passed; reports made
   meanwhile wait in the spool.
   A desired state that fails :mod:`~fleetvpn.agent.desired` is refused and logged with the
   field at fault; the last good one stays applied (nothing is reconciled). Its trust anchor:
   the config's ``tunnel_networks``, else the networks of the last good state at start, else
   (first start) of the first document accepted — fixed for the life of the process.
   A peer endpoint that is a DNS name is resolved (``getaddrinfo`` in a worker thread) before
   each apply and probe: WireGuard gets the address (so the diff compares what ``wg show``
   prints), an unresolvable name leaves the peer's endpoint as it is and skips its probes, with
   the reason logged.
4. SIGHUP: the config file is read again (an invalid one is logged and ignored); SIGTERM/SIGINT:
   the tunnel stays up unless ``on_stop: down``.

Blocking work (HTTP, ``wg``/``ip`` commands, file writes of the spool) runs in worker threads,
one job of a kind at a time; probes are asyncio. Nothing here logs a key or a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import signal
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from fleetvpn import grammar
from fleetvpn.agent import client as api
from fleetvpn.agent import startup
from fleetvpn.agent.config import AgentConfig, ConfigError, load, reloaded
from fleetvpn.agent.desired import Acceptance, Desired, DesiredError, PeerPlan
from fleetvpn.agent.probes import (
    ResponderSet,
    hello_tag,
    measure_forward,
    measure_reverse,
    measure_rtt,
    serve_responders,
)
from fleetvpn.agent.replay import replay
from fleetvpn.agent.report import (
    PathMtu,
    PeerObservation,
    build_report,
    configured_from,
    status_document,
)
from fleetvpn.agent.schedule import BlackHoleWatch, PeerWatch, ProbeBudget, Scheduler
from fleetvpn.agent.spool import Spool
from fleetvpn.agent.startup import FatalError
from fleetvpn.model import Family, NatMeasurement
from fleetvpn.net.keys import KeyFileError, load_key
from fleetvpn.net.wire import KeyLike
from fleetvpn.runner import Runner
from fleetvpn.wg.state import TunnelSpec, TunnelState

log = logging.getLogger("fleetvpn.agent")

SAMPLE_S: Final = 10.0  # wg show: handshakes, endpoints, counters (re-probe triggers)
PMTU_TIMEOUT_S: Final = 30.0
MAX_PMTU_RUNS: Final = 2  # at once, whatever the number of peers
FULL_SIZE_EVERY: Final = 4  # a full-size tunnel probe every 4th RTT round (and after a loss)
HELLO_REPEAT_S: Final = 60.0  # the first hello to a peer is sent again once, this much later


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


class Agent:
    def __init__(self, config: AgentConfig, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.rng = random.Random()
        self.scheduler = Scheduler(self.rng)
        self.watch = PeerWatch()
        self.budget = ProbeBudget()
        self.desired: Desired | None = None
        self.node = config.node
        self.site: str | None = None
        self.token: str | None = None
        self.public_key = ""
        self.probe_key: KeyLike = b""
        self.pmtu: dict[str, PathMtu] = {}
        self.rtt: dict[str, Any] = {}
        self.nat: NatMeasurement | None = None
        self.state: TunnelState | None = None
        self.controller: dict[str, Any] = {"reachable": None, "last_ok_at": None, "error": None}
        self.last_apply: dict[str, Any] | None = None
        self.responder: ResponderSet | None = None
        self.transports: list[asyncio.DatagramTransport] = []
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.pmtu_slots = asyncio.Semaphore(MAX_PMTU_RUNS)
        self.hellos_repeated: set[str] = set()
        self.black_holes = BlackHoleWatch(every=FULL_SIZE_EVERY)
        self.wake = asyncio.Event()
        self.stopping = False
        config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.spool = Spool(config.spool_dir, config.spool_max_reports, log.warning)
        self.batches = True  # False once the controller answered 404/405 for the batch path
        self.tunnel: Any = None
        self.throttled_until = 0.0  # monotonic: no request to the controller before (a 429)
        self.trusted_networks: tuple[Any, ...] = ()  # see the module docstring, step 3

    # --- start-up --------------------------------------------------------------------------
    def _client(self) -> api.Client:
        return api.Client(self.config.controller, ca_file=self.config.ca_file, token=self.token)

    def _make_tunnel(self) -> Any:
        from fleetvpn.wg.tunnel import WgTunnel

        runner = Runner(echo=lambda line: log.debug("%s", line))
        return WgTunnel(
            self.config.interface,
            self.config.private_key_file,
            runner=runner,
            implementation=self.config.wireguard,
        )

    def _parse(self, doc: Any) -> Desired:
        accept = startup.acceptance(self.config, self.trusted_networks)
        accept = Acceptance(
            accept.tunnel_networks,
            accept.routed_subnets,
            own_public_key=self.public_key or None,
            node=self.node,
        )
        desired = startup.parse(self.config, doc, accept)
        for warning in desired.warnings:
            log.warning("%s", warning)
        if not accept.tunnel_networks:
            self.trusted_networks = desired.tunnel_networks
            log.warning("tunnel networks %s taken from the first desired state (set "
                        "tunnel_networks in the agent config to pin them)",
                        ", ".join(map(str, self.trusted_networks)))  # fmt: skip
        return desired

    def _throttled(self, job: str) -> bool:
        wait_s = self.throttled_until - time.monotonic()
        if wait_s > 0:
            log.info("%s: held %.0f s more: the controller answered 429", job, wait_s)
        return wait_s > 0

    # --- the loop ---------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig, handler in ((signal.SIGTERM, self.stop), (signal.SIGINT, self.stop),
                             (signal.SIGHUP, self.reload)):  # fmt: skip
            loop.add_signal_handler(sig, handler)
        self.public_key, self.probe_key = startup.prepare_keys(self.config)
        self.tunnel = self._make_tunnel()
        self.pmtu, self.nat = startup.load_measurements(self.config)
        last_good = startup.load_last_good(self.config)
        if last_good is not None:
            self.trusted_networks = last_good.tunnel_networks
            self._adopt(last_good)
            if self.config.apply:
                log.info("re-applying the last good desired state (%s)",
                         last_good.document.get("generated_at"))  # fmt: skip
                await self._apply(last_good, save=False)
        identity = await startup.enroll(self.config, self.public_key, lambda: self.stopping)
        if identity is None:
            return 0
        self.node, self.site, self.token = identity.node, identity.site, identity.token
        self.responder, self.transports = await serve_responders(
            self.config.probe.listen_port, self.probe_key, self._on_hello
        )
        self.responder.set_own_tag(hello_tag(self.public_key))
        self.responder.set_on_unknown(self._on_unknown_hello)
        if self.desired is not None:
            self._adopt(self.desired)
        log.info("agent %s (site %s) running: interface %s, apply %s, responder on UDP %d",
                 self.node, self.site, self.config.interface, self.config.apply,
                 self.config.probe.listen_port)  # fmt: skip
        self._schedule_jobs(time.monotonic())
        try:
            while not self.stopping:
                now = time.monotonic()
                for job in self.scheduler.due(now):
                    self._start(job)
                deadline = self.scheduler.next_deadline()
                wait = 60.0 if deadline is None else max(0.0, deadline - time.monotonic())
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), min(wait, 60.0))
        finally:
            await self._shutdown()
        return 0

    def _schedule_jobs(self, now: float) -> None:
        i = self.config.intervals
        self.scheduler.add("desired", i.desired_s, now)
        self.scheduler.add("report", i.report_s, now, first_within_s=min(i.report_s, 5.0))
        self.scheduler.add("sample", SAMPLE_S, now, first_within_s=SAMPLE_S)
        self.scheduler.add("rtt", i.rtt_s, now, first_within_s=min(i.rtt_s, 10.0))
        self.scheduler.add("status", 5.0, now, first_within_s=1.0)
        if self.config.probe.nat_responder is not None:
            self.scheduler.add("nat", i.nat_s, now, first_within_s=min(i.nat_s, 5.0))
        else:
            self.scheduler.remove("nat")
        if self.desired is not None:
            self._schedule_peers(self.desired, now)

    def _schedule_peers(self, desired: Desired, now: float) -> None:
        wanted = {f"pmtu:{p.name}" for p in desired.peers}
        for name in [n for n in self.scheduler.jobs if n.startswith("pmtu:")]:
            if name not in wanted:
                self.scheduler.remove(name)
        for peer in desired.peers:
            name = f"pmtu:{peer.name}"
            if name not in self.scheduler.jobs:
                self.scheduler.add(
                    name,
                    self.config.intervals.pmtu_s,
                    now,
                    first_within_s=min(10.0, self.config.intervals.pmtu_s),
                )

    def _start(self, job: str) -> None:
        if job in self.tasks and not self.tasks[job].done():
            return  # one at a time per job; the schedule comes round again
        runs: dict[str, Callable[[], Awaitable[None]]] = {
            "desired": self._job_desired,
            "report": self._job_report,
            "sample": self._job_sample,
            "rtt": self._job_rtt,
            "nat": self._job_nat,
            "status": self._job_status,
        }
        if job.startswith("pmtu:"):
            peer = job.removeprefix("pmtu:")
            coro: Awaitable[None] = self._job_pmtu(peer)
        else:
            coro = runs[job]()
        self.tasks[job] = asyncio.ensure_future(self._guarded(job, coro))

    async def _guarded(self, job: str, coro: Awaitable[None]) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:  # a job's bug must not stop the tunnel's agent
            log.exception("job %s failed", job)

    # --- jobs -------------------------------------------------------------------------------
    async def _job_desired(self) -> None:
        if self._throttled("desired state"):
            return
        client = self._client()
        try:
            doc = await asyncio.to_thread(client.desired, self.node)
        except api.ControllerError as e:
            self._controller_failed(e)
            return
        self._controller_ok()
        try:
            desired = self._parse(doc)
        except DesiredError as e:
            log.error("refused %s; keeping the last good desired state", e)
            return
        self._adopt(desired)
        self._schedule_peers(desired, time.monotonic())
        if self.config.apply:
            await self._apply(desired, save=True)
        else:
            await asyncio.to_thread(
                startup.write_json, self.config.desired_file, dict(desired.document)
            )
        if len(self.spool):
            self._start("report")  # the controller answers: replay what waited

    def _adopt(self, desired: Desired) -> None:
        self.desired = desired
        if self.site is None:
            self.site = desired.site
        if self.responder is not None:
            self.responder.set_hello_tags({hello_tag(p.public_key): p.name for p in desired.peers})

    async def _apply(self, desired: Desired, *, save: bool) -> None:
        from fleetvpn.wg.tunnel import ApplyError

        started = datetime.now(UTC)
        spec = await self._resolved(desired.spec)
        try:
            changes = await asyncio.to_thread(self.tunnel.reconcile, spec, desired.reasons)
        except ApplyError as e:
            log.error("apply failed and was rolled back: %s", e)
            self.last_apply = {"at": started.isoformat(), "ok": False, "error": str(e),
                               "changes": []}  # fmt: skip
            return
        except Exception as e:
            log.error("apply failed: %s", e)
            self.last_apply = {"at": started.isoformat(), "ok": False, "error": str(e),
                               "changes": []}  # fmt: skip
            return
        # The wg layer logged each change with its reason as it applied it.
        if changes or self.last_apply is None:
            self.last_apply = {
                "at": started.isoformat(),
                "ok": True,
                "error": None,
                "changes": [f"{c.summary} — {c.reason}" for c in changes],
            }
        if save:
            await asyncio.to_thread(
                startup.write_json, self.config.desired_file, dict(desired.document)
            )

    async def _resolved(self, spec: TunnelSpec) -> TunnelSpec:
        """``spec`` with every DNS endpoint replaced by its address (module docstring, 3.)."""
        peers = []
        for peer in spec.peers:
            if peer.endpoint is not None and grammar.Endpoint.parse(peer.endpoint).address is None:
                target, why = await resolve(peer.endpoint)
                if target is None:
                    log.warning("peer %s: endpoint %s left as it is: %s", peer.name,
                                peer.endpoint, why)  # fmt: skip
                    peer = dataclasses.replace(peer, endpoint=None)
                else:
                    peer = dataclasses.replace(peer, endpoint=_endpoint_text(*target))
            peers.append(peer)
        return dataclasses.replace(spec, peers=tuple(peers))

    def _controller_ok(self) -> None:
        if self.controller["reachable"] is False:
            log.info("controller %s answers again", self.config.controller)
        self.controller.update(reachable=True, error=None,
                               last_ok_at=datetime.now(UTC).isoformat())  # fmt: skip

    def _controller_failed(self, e: Exception) -> None:
        if isinstance(e, api.Throttled):
            self.throttled_until = max(self.throttled_until, time.monotonic() + e.retry_after_s)
        if self.controller["reachable"] is not False or self.controller["error"] != str(e):
            log.warning("controller: %s (tunnel keeps its settings; reports are spooled)", e)
        self.controller.update(reachable=False, error=str(e))

    async def _sample(self) -> None:
        if self.tunnel is None:
            return
        try:
            self.state = await asyncio.to_thread(self.tunnel.read)
        except Exception as e:
            log.warning("cannot read %s: %s", self.config.interface, e)
            self.state = None

    def _observations(self) -> list[PeerObservation]:
        if self.desired is None:
            return []
        out = []
        for plan in self.desired.peers:
            status = self.state.peer(plan.public_key) if self.state else None
            out.append(
                PeerObservation(
                    name=plan.name,
                    public_key=plan.public_key,
                    planned_endpoint=plan.endpoint,
                    endpoint=status.endpoint if status else None,
                    latest_handshake=status.latest_handshake if status else 0,
                    rx_bytes=status.rx_bytes if status else 0,
                    tx_bytes=status.tx_bytes if status else 0,
                    pmtu=self.pmtu.get(plan.name),
                    rtt=self.rtt.get(plan.name),
                )
            )
        return out

    async def _job_sample(self) -> None:
        await self._sample()
        now = time.monotonic()
        for obs in self._observations():
            age = time.time() - obs.latest_handshake if obs.latest_handshake else None
            why = self.watch.observe(obs.name, obs.endpoint, age)
            if why is not None:
                log.info("re-probe %s: %s", obs.name, why)
                self.scheduler.trigger(f"pmtu:{obs.name}", now, within_s=5.0)
                self.wake.set()

    async def _job_report(self) -> None:
        await self._sample()
        if self.site is None:
            return
        names = {p.public_key: p.name for p in self.desired.peers} if self.desired else {}
        report = build_report(
            report_id=str(uuid.uuid4()),
            node=self.node,
            site=self.site,
            created_at=datetime.now(UTC).replace(microsecond=0),
            peers=self._observations(),
            nat=self.nat,
            configured=configured_from(self.state, names),
        )
        await asyncio.to_thread(self.spool.put, report)
        if self._throttled("reports"):
            await self._job_status()
            return  # they wait in the spool
        sent, self.batches = await asyncio.to_thread(
            replay,
            self.spool,
            self._client(),
            batches=self.batches,
            failed=self._controller_failed,
        )
        if sent:
            self._controller_ok()
            if sent > 1:
                log.info("replayed %d spooled reports in order", sent)
        await self._job_status()

    async def _job_status(self) -> None:
        doc = status_document(
            node=self.node,
            site=self.site,
            interface=self.config.interface,
            apply=self.config.apply,
            now=datetime.now(UTC),
            peers=self._observations(),
            nat=self.nat,
            configured=configured_from(
                self.state,
                {p.public_key: p.name for p in self.desired.peers} if self.desired else {},
            ),
            controller=self.controller,
            last_apply=self.last_apply,
            spool=self.spool.stats(),
            pid=os.getpid(),
        )
        await asyncio.to_thread(
            startup.write_json, self.config.status_file, doc, 0o644, durable=False
        )

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
            full = self._full_size(plan) if self.black_holes.want_full_size(plan.name) else None
            try:
                rtt = await measure_rtt((plan.tunnel_ipv4 or "", port), self.probe_key,
                                        full_size=full)  # fmt: skip
            except OSError:
                return
            self.rtt[plan.name] = rtt
            if rtt.full_size is None or rtt.full_size_lost is None:
                return
            why = self.black_holes.observe(
                plan.name, rtt.full_size, rtt.full_size_lost, rtt.rtt_s is not None
            )
            if why is not None:
                log.warning("re-probe %s: %s", plan.name, why)
                self.scheduler.trigger(f"pmtu:{plan.name}", time.monotonic(), within_s=2.0)
                self.wake.set()

        await asyncio.gather(*(one(p) for p in peers))

    def _full_size(self, plan: PeerPlan) -> int | None:
        """The route MTU towards ``plan``'s tunnel address as applied (None: no tunnel)."""
        if self.state is None:
            return None
        status = self.state.peer(plan.public_key)
        if status is None or not status.latest_handshake:
            return None
        for cidr in status.allowed_ips:
            mtu = self.state.route_mtus.get(cidr)
            if mtu is not None:
                return mtu
        return self.state.mtu

    async def _job_pmtu(self, peer: str) -> None:
        plan = (
            next((p for p in self.desired.peers if p.name == peer), None) if self.desired else None
        )
        if plan is None or plan.endpoint is None:
            return  # it dials us: it asks for a reverse run with a hello (probes.py)
        why_not = self.budget.allow(peer, time.monotonic())
        if why_not is not None:
            log.info("PMTU towards %s postponed: %s", peer, why_not)
            return
        address, why = await resolve(plan.endpoint)
        if address is None:
            log.warning("PMTU towards %s skipped: %s", peer, why)
            return
        target = (address[0], self.config.probe.listen_port)
        await self._measure(peer, target, "forward")
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
        why_not = self.budget.allow(peer, time.monotonic())
        if why_not is not None:
            log.debug("hello from %s at %s:%d ignored: %s", peer, *addr, why_not)
            return
        key = f"reverse:{peer}"
        if key in self.tasks and not self.tasks[key].done():
            return
        self.tasks[key] = asyncio.ensure_future(
            self._guarded(key, self._measure(peer, addr, "reverse"))
        )

    async def _measure(self, peer: str, target: tuple[str, int], how: str) -> None:
        from fleetvpn.net.pmtuprobe import ProbeError

        self.budget.spend(peer, time.monotonic())
        async with self.pmtu_slots:
            try:
                if how == "reverse":
                    result = await measure_reverse(
                        target, self.probe_key, self.config.probe.listen_port, PMTU_TIMEOUT_S
                    )
                else:
                    result = await measure_forward(target, self.probe_key, PMTU_TIMEOUT_S)
            except (ProbeError, OSError) as e:
                log.warning("PMTU %s → %s (%s %s:%d) failed: %s", self.node, peer, how, *target, e)
                return
        family: Family = 6 if result.family == 6 else 4
        before = self.pmtu.get(peer)
        self.pmtu[peer] = PathMtu(family, result.path_mtu, result.icmp_seen, time.time(), how,
                                  result.reason)  # fmt: skip
        await asyncio.to_thread(startup.save_measurements, self.config, dict(self.pmtu), self.nat)
        if before is None or before.path_mtu != result.path_mtu:
            log.info("path MTU %s → %s: %d (%s, IPv%d, %d probes, %.2f s): %s", self.node, peer,
                     result.path_mtu, how, family, result.probes_sent, result.elapsed_s,
                     result.reason)  # fmt: skip
        if before is not None and before.path_mtu != result.path_mtu:
            self._start("report")  # a changed path: tell the controller now

    # --- signals ----------------------------------------------------------------------------
    def stop(self) -> None:
        if not self.stopping:
            log.info("stopping (on_stop: %s)", self.config.on_stop)
        self.stopping = True
        self.wake.set()

    def reload(self) -> None:
        if self.config_path is None:
            return
        try:
            new = load(self.config_path)
        except ConfigError as e:
            log.error("SIGHUP: %s; keeping the running config", e)
            return
        new, changed = reloaded(self.config, new)
        if changed:
            log.warning("SIGHUP: %s changed: takes effect at the next restart", ", ".join(changed))
        self.config = new
        logging.getLogger("fleetvpn").setLevel(new.log_level.upper())
        try:
            self.probe_key = load_key(new.probe.key_file)
        except KeyFileError as e:
            log.error("SIGHUP: probe.key_file: %s; keeping the old probe key", e)
        now = time.monotonic()
        i = new.intervals
        for job, period in (("desired", i.desired_s), ("report", i.report_s), ("rtt", i.rtt_s)):
            self.scheduler.set_period(job, period, now)
        for job in [n for n in self.scheduler.jobs if n.startswith("pmtu:")]:
            self.scheduler.set_period(job, i.pmtu_s, now)
        if new.probe.nat_responder is not None:
            if "nat" in self.scheduler.jobs:
                self.scheduler.set_period("nat", new.intervals.nat_s, now)
            else:
                self.scheduler.add("nat", new.intervals.nat_s, now, first_within_s=5.0)
        else:
            self.scheduler.remove("nat")
        log.info("SIGHUP: config %s reloaded", self.config_path)
        self.scheduler.trigger("desired", now)
        self.wake.set()

    async def _shutdown(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        for task in self.tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for transport in self.transports:
            transport.close()
        if self.config.on_stop == "down" and self.tunnel is not None:
            log.info("on_stop: down: removing %s", self.config.interface)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.tunnel.down)
        else:
            log.info("the tunnel stays up (on_stop: keep)")
        with contextlib.suppress(Exception):
            await self._job_status()


def run(config_path: Path) -> int:
    """Entry point of ``fleetvpn agent run``; returns the exit status."""
    try:
        config = load(config_path)
    except ConfigError as e:
        raise FatalError(str(e)) from None
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
    )
    agent = Agent(config, config_path)
    return asyncio.run(agent.run())

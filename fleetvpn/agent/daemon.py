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
   step that failed), ``report`` (snapshot → spool → send in order), ``nat``, ``rtt``, a wg
   sample every ``SAMPLE_S`` that feeds the re-probe triggers (endpoint changed, handshake
   stale), and a light one (`wg show dump` only) every ``WATCH_SAMPLE_S`` for the path and NAT
   watches of :mod:`~fleetvpn.agent.paths`: a standing PMTU search and black-hole watch per
   peer with an endpoint (probes.py for the reverse direction), which lowers a route MTU at
   once on a confirmed decrease (:mod:`~fleetvpn.agent.localmtu`) and reports it.
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
from fleetvpn.agent.desired import Acceptance, Desired, DesiredError
from fleetvpn.agent.outerroute import EndpointRoutes, wanted
from fleetvpn.agent.paths import PathSupervisor
from fleetvpn.agent.probes import (
    ResponderSet,
    hello_tag,
    nat_check_tag,
    serve_responders,
)
from fleetvpn.agent.probing import NAT_CHECK_MIN_GAP_S, ProbingJobs, _endpoint_text, resolve
from fleetvpn.agent.replay import replay
from fleetvpn.agent.report import (
    PathMtu,
    PeerObservation,
    build_report,
    configured_from,
    status_document,
)
from fleetvpn.agent.schedule import PeerWatch, ProbeBudget, Scheduler
from fleetvpn.agent.spool import Spool
from fleetvpn.agent.startup import FatalError
from fleetvpn.model import NatMeasurement
from fleetvpn.net.keys import KeyFileError, KeyFollower, load_key
from fleetvpn.net.wire import KeyLike, KeyRing
from fleetvpn.runner import Runner
from fleetvpn.wg.state import TunnelSpec, TunnelState

log = logging.getLogger("fleetvpn.agent")

SAMPLE_S: Final = 10.0  # wg show: handshakes, endpoints, counters (re-probe triggers)
WATCH_SAMPLE_S: Final = 2.0  # wg show dump only: the path and NAT watches' evidence
MAX_PMTU_RUNS: Final = 2  # at once, whatever the number of peers


class Agent(ProbingJobs):
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
        self.keys: KeyFollower | None = None  # the probe key file's ring and retired keys
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
        self.deferred_hellos: dict[
            str, asyncio.TimerHandle
        ] = {}  # refused by the budget, for later
        self.paths: PathSupervisor | None = None  # once the probe key is known (run)
        self.apply_lock: asyncio.Lock | None = None
        self.wake = asyncio.Event()
        self.stopping = False
        config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.spool = Spool(config.spool_dir, config.spool_max_reports, log.warning)
        self.batches = True  # False once the controller answered 404/405 for the batch path
        self.tunnel: Any = None
        self.applied: TunnelSpec | None = None  # the spec the last good apply made
        self.endpoint_routes: EndpointRoutes | None = None  # outer fragmentation (outerroute)
        self.nat_check_at = -NAT_CHECK_MIN_GAP_S  # a peer's last NAT-check request (monotonic)
        self.save_again = False  # a save of measurements.json asked for while one runs
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
        self.keys = KeyFollower(self.probe_key)
        self.tunnel = self._make_tunnel()
        self.endpoint_routes = EndpointRoutes(
            self.config.interface, getattr(self.tunnel, "runner", None)
        )
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
        self.responder.set_own_tag(hello_tag(self.public_key), nat_check_tag(self.public_key))
        self.apply_lock = asyncio.Lock()
        self.paths = PathSupervisor(self, key=self.probe_key,
                                    probe_port=self.config.probe.listen_port,
                                    upkeep_s=self.config.intervals.pmtu_s, budget=self.budget,
                                    rng=self.rng, nated=self.config.endpoint is None)  # fmt: skip
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
        self.scheduler.add("watch", WATCH_SAMPLE_S, now, first_within_s=WATCH_SAMPLE_S)
        self.scheduler.add("rtt", i.rtt_s, now, first_within_s=min(i.rtt_s, 10.0))
        self.scheduler.add("status", 5.0, now, first_within_s=1.0)
        if self.config.probe.nat_responder is not None:
            self.scheduler.add("nat", i.nat_s, now, first_within_s=min(i.nat_s, 5.0))
        else:
            self.scheduler.remove("nat")
        if self.desired is not None:
            self._schedule_peers(self.desired, now)

    def _schedule_peers(self, desired: Desired, now: float) -> None:
        if self.paths is not None:
            self.tasks["paths"] = asyncio.ensure_future(
                self._guarded("paths", self.paths.sync(desired))
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
            "watch": self._job_watch,
            "save": self._job_save,
        }
        self.tasks[job] = asyncio.ensure_future(self._guarded(job, runs[job]()))

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
        fetched_at = time.monotonic()
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
        if self.paths is not None:
            impl = self.state.implementation if self.state is not None else "userspace"
            for line in self.paths.holds.review(desired.spec, desired.reasons, fetched_at, impl):
                (log.warning if "corrected" in line else log.info)("%s", line)
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
            self.responder.set_nat_check(
                {nat_check_tag(p.public_key): p.name for p in desired.peers}, self._on_nat_check
            )

    async def _apply(self, desired: Desired, *, save: bool) -> None:
        started = datetime.now(UTC)
        async with self.apply_lock or contextlib.nullcontext():
            spec, reasons = desired.spec, desired.reasons
            if self.paths is not None:  # a route lowered locally stays so (localmtu.py)
                spec, reasons = self.paths.holds.capped(spec, reasons)
            spec = await self._resolved(spec)
            ok = await self._reconcile(spec, reasons, started)
            if ok:
                self.applied = spec
                await self._sample()
                await self._sync_endpoint_routes()
        if save and ok:
            await asyncio.to_thread(
                startup.write_json, self.config.desired_file, dict(desired.document)
            )

    async def _reconcile(self, spec: TunnelSpec, reasons: Any, started: datetime) -> bool:
        from fleetvpn.wg.tunnel import ApplyError

        try:
            changes = await asyncio.to_thread(self.tunnel.reconcile, spec, reasons)
        except ApplyError as e:
            log.error("apply failed and was rolled back: %s", e)
            self.last_apply = {"at": started.isoformat(), "ok": False, "error": str(e),
                               "changes": []}  # fmt: skip
            return False
        except Exception as e:
            log.error("apply failed: %s", e)
            self.last_apply = {"at": started.isoformat(), "ok": False, "error": str(e),
                               "changes": []}  # fmt: skip
            return False
        # The wg layer logged each change with its reason as it applied it.
        if changes or self.last_apply is None:
            self.last_apply = {
                "at": started.isoformat(),
                "ok": True,
                "error": None,
                "changes": [f"{c.summary} — {c.reason}" for c in changes],
            }
        return True

    async def _sync_endpoint_routes(self) -> None:
        """The routes towards peers' endpoints that let outer packets fragment (outerroute.py),
        after each apply and each sample (a NATed peer's endpoint may move)."""
        if self.endpoint_routes is None or self.applied is None or not self.config.apply:
            return
        want = wanted(self.applied, self.state)
        try:
            done = await asyncio.to_thread(self.endpoint_routes.sync, want)
        except Exception as e:
            log.warning("cannot read or set the routes towards peers' endpoints: %s", e)
            return
        for line in done:
            log.info("%s", line)

    def _outer_fragmenting(self) -> set[str]:
        """The peers whose outer packets may fragment on the way, as applied: kernel WireGuard
        never sets DF on IPv4; wireguard-go only where our endpoint route is in place."""
        if self.applied is None or self.state is None:
            return set()
        asked = {p.name for p in self.applied.peers if p.outer_fragmentation}
        if self.state.implementation == "kernel":
            return asked
        return asked & (self.endpoint_routes.in_place if self.endpoint_routes else set())

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
        await self._sync_endpoint_routes()
        for obs in self._observations():
            age = time.time() - obs.latest_handshake if obs.latest_handshake else None
            why = self.watch.observe(obs.name, obs.endpoint, age)
            if why is not None and self.paths is not None:
                log.info("re-probe %s: %s", obs.name, why)
                self.paths.recheck(obs.name, why)

    async def _job_report(self) -> None:
        await self._sample()
        built_at = time.monotonic()
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
            configured=configured_from(self.state, names, self._outer_fragmenting()),
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
            if self.paths is not None and not len(self.spool):
                self.paths.reported(built_at)
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

    # --- signals ----------------------------------------------------------------------------
    def stop(self) -> None:
        if not self.stopping:
            log.info("stopping (on_stop: %s)", self.config.on_stop)
        self.stopping = True
        self.wake.set()

    def _use_keys(self, ring: KeyRing) -> None:
        """The probe key ring from now on (a rotation's step; a retired key's grace over):
        for the responder at once, for probes from their next run. While a key the file
        dropped is still accepted, come back when its grace ends."""
        if ring == self.probe_key:
            return
        self.probe_key = ring
        if self.responder is not None:
            self.responder.set_key(ring)
        if self.paths is not None:
            self.paths.set_key(ring)
        keys = self.keys
        expiry = keys.next_expiry() if keys is not None else None
        if keys is not None and expiry is not None:
            asyncio.get_running_loop().call_later(
                expiry - time.monotonic() + 1.0,
                lambda: self._use_keys(keys.ring(time.monotonic())),
            )

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
            ring = load_key(new.probe.key_file)
        except KeyFileError as e:
            log.error("SIGHUP: probe.key_file: %s; keeping the old probe key", e)
        else:
            self.keys = self.keys or KeyFollower(ring)
            self._use_keys(self.keys.update(ring, time.monotonic()))
        now = time.monotonic()
        i = new.intervals
        for job, period in (("desired", i.desired_s), ("report", i.report_s), ("rtt", i.rtt_s)):
            self.scheduler.set_period(job, period, now)
        # intervals.pmtu_s: at the next restart
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
        if self.paths is not None:
            self.paths.close()
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

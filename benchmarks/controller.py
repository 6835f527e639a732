"""The controller at fleet scale: report ingest, recompute, `health` latency, peak memory.

    .venv/bin/python benchmarks/controller.py [--quick] [--postgres] [--nodes N] [--sites S]
        [--links-per-node L] [--clients C] [--history R] [--hubs H] [--profile]

Builds a synthetic fleet (default: issue 4's 10,000 nodes in 500 sites, 100,000 links; --quick:
ten times smaller), enrolls it through the store and prints figures with their ratio to the
issue's goals — never assertions:

  ingest     `POST /v1/reports` over HTTP to the real `fleetvpn controller serve` (a subprocess
             on 127.0.0.1, with its view worker process), C connections here (default 16, one
             thread each, http.client: real agents post from their own machines, so the load
             generator here takes as little of the shared cores as it can) posting
             pre-encoded bodies: link measurements/s (goal >= 20,000/s), reports/s, the
             server's CPU per report (API and view worker: its recomputes included) and the
             CPU the clients here took from the same cores. The round before goes straight
             into the store (one thread), timed stage by stage. At the end, a fifth of the
             nodes replay a spool of 5 older reports each through `POST /v1/reports/batch`
             (one request per node), as agents do after an outage.
  recompute  here, as the server's view worker does it: fleet.compute cold (every stored
             body parsed, every site's keepalive state saved) and warm (bodies already
             parsed), views.render_view (every link row's health JSON, the sites, every node's
             desired state, tune), metrics.render, and the config files of every node (the API
             renders one on request) — goal <= 10 s for all of it; and what per-site, paged
             and whole-fleet health answers cost the API from a published view.
  health     p50/p99 (goal p99 <= 200 ms) of the queries `fleetvpn health` makes — `GET
             /v1/health?site=S`, and without --site one page `?limit=100`, then
             `?problems=true&limit=100` — with no reports arriving and while agents report at
             the fleet's steady rate (each node once a minute, 4 threads), with the age of the
             view each answer came from and what it took the server's worker; and, for
             comparison, the whole-fleet `GET /v1/health` (170 MB at 10,000 nodes: only
             `health --json` without --site asks for it), with httpx and with curl (which reads
             as fast as the server sends). Queries are made by a small child process, as the CLI
             is one. A query stops after 50 requests or 60 s (--quick: 10 s); the count is
             printed.
  memory     peak RSS (the high-water marks) of the API process, of its view worker and of this
             process.

The fleet: public sites (no NAT; a third with 9000-byte paths inside), NAT sites (mapping
lifetimes 10-300 s), firewall sites (stateful filter). Each node starts L links to distinct
peers (40 % a site-mate, 30 % one of the two hubs of a random site, 30 % any node) and both ends
measure each link, as agents do: a report has about 2 L measurements. Path MTUs 1280..1500 (a
tenth asymmetric) or 9000, 5 % of links over IPv6. Nodes apply what the policy recommends,
except: 1 % of links black holes one way (route MTU 1420 over 1400, no ICMP), 1 % down (old
handshakes), 2 % lossy, 10 % of NATed nodes on the default 25 s keepalive. 1 % of nodes are
stale (their reports' arrival set 15 min back in the database: put_report stamps the
controller's clock), 0.5 % never report, 2 % of NATed nodes change NAT port between the rounds
(mapping losses). The seed is fixed: runs are comparable.

Nodes enroll without an endpoint, so links are the measured pairs and desired states list no
peers. --hubs H enrolls H public nodes with theirs: compute() then plans a tunnel from each to
every node (fleet.peerings). --history R stores R older rounds first (an hour is 60).

SQLite (WAL, a temp file) by default, --postgres a throwaway PostgreSQL server (Debian's, Unix
socket only); both commit durably, as in production. --profile runs the server under cProfile
and profiles the store round and a warm compute here (figures are then slower). Everything
started here (server, PostgreSQL, temp dir) is removed on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import gc
import hashlib
import http.client
import io
import ipaddress
import json
import math
import os
import pstats
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, redirect_stdout
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import sqlalchemy as sa

from fleetvpn.controller import fleet as fleetview
from fleetvpn.controller import metrics, render, views
from fleetvpn.controller.config import TunnelConfig
from fleetvpn.controller.store import Store, nodes, reports, sqlite_url
from fleetvpn.controller.trusted import stored_report
from fleetvpn.engines.keepalive import keepalive_for
from fleetvpn.lab import postgres
from fleetvpn.model import Report, format_time, parse_report

GOAL_INGEST_PER_S = 20_000
GOAL_RECOMPUTE_S = 10.0
GOAL_HEALTH_P99_S = 0.200
RENDER_BUDGET_S = 30.0  # per-node documents beyond this are extrapolated

PATH_MTUS = (1280, 1360, 1400, 1420, 1440, 1472, 1480, 1492, 1500)
PATH_WEIGHTS = (1, 2, 4, 3, 2, 3, 4, 5, 40)
OVERHEAD_BYTES = {4: 60, 6: 80}
LINK_COLUMNS = ("peer", "family", "path_mtu", "icmp_seen", "rtt_s", "loss_ratio",
                "handshake_age_s", "rx_bytes", "tx_bytes", "endpoint")  # fmt: skip


# --- the synthetic fleet -------------------------------------------------------------------------


@dataclass
class Node:
    name: str
    site: str
    kind: str  # public | nat | firewall
    address: str  # where peers see it: its own IPv4 address, or its site's NAT address
    port: int
    address6: str
    lifetime_s: float | None  # established-flow mapping lifetime (NAT, firewall)
    silent: bool  # never reports
    stale: bool  # its reports arrived 15 min ago
    remapped: bool  # its NAT gives it a new port before the second round


class Measured(NamedTuple):
    """node -> peer as node measures it (the fields of a report's measurement)."""

    family: int
    path_mtu: int
    icmp_seen: bool
    rtt_s: float
    loss_ratio: float
    handshake_age_s: float


@dataclass
class Fleet:
    sites: dict[str, str]  # site -> kind
    nodes: list[Node]
    out: list[dict[int, Measured]]  # node -> peer -> what node measures
    black_holes: set[tuple[int, int]]  # (node, peer): route MTU 1420 over a 1400-byte path

    @property
    def links(self) -> int:
        return sum(len(peers) for peers in self.out) // 2


def build_fleet(n_nodes: int, n_sites: int, links_per_node: int, rng: random.Random) -> Fleet:
    sites = {f"site{s:03d}": rng.choices(("public", "nat", "firewall"), (3, 5, 2))[0]
             for s in range(n_sites)}  # fmt: skip
    jumbo = {site for site, kind in sites.items() if kind == "public" and rng.random() < 0.3}
    lifetimes = {site: float(rng.randint(10, 300)) for site in sites}
    members: list[list[int]] = [[] for _ in sites]
    fleet = Fleet(sites, [], [{} for _ in range(n_nodes)], set())
    for i in range(n_nodes):
        s = i * n_sites // n_nodes
        site = f"site{s:03d}"
        kind, lifetime_s = sites[site], lifetimes[site]
        host = (198 << 24 | 20 << 16) + s + 1 if kind == "nat" else (198 << 24 | 18 << 16) + i + 1
        fleet.nodes.append(
            Node(
                name=f"{site}-n{len(members[s]):02d}",
                site=site,
                kind=kind,
                address=str(ipaddress.IPv4Address(host)),
                port=40000 + len(members[s]) if kind == "nat" else 51820,
                address6=f"2001:db8::{i + 1:x}",
                lifetime_s=None if kind == "public" else round(lifetime_s * rng.uniform(1, 1.3), 2),
                silent=rng.random() < 0.005,
                stale=rng.random() < 0.01,
                remapped=kind == "nat" and rng.random() < 0.02,
            )
        )  # fmt: skip
        members[s].append(i)
    for a in range(n_nodes):
        s = a * n_sites // n_nodes
        for _ in range(links_per_node):
            for _attempt in range(20):  # pairs are distinct: draw again on a repeat
                roll = rng.random()
                if roll < 0.4 and len(members[s]) > 1:
                    b = rng.choice(members[s])
                elif roll < 0.7:
                    b = rng.choice(members[rng.randrange(n_sites)][:2])
                else:
                    b = rng.randrange(n_nodes)
                if b != a and b not in fleet.out[a]:
                    _link(fleet, a, b, {fleet.nodes[a].site, fleet.nodes[b].site} <= jumbo, rng)
                    break
    return fleet


def _link(fleet: Fleet, a: int, b: int, jumbo: bool, rng: random.Random) -> None:
    family = 6 if rng.random() < 0.05 else 4
    same_site = fleet.nodes[a].site == fleet.nodes[b].site
    rtt_s = round(rng.uniform(0.0005, 0.003) if same_site else rng.uniform(0.01, 0.15), 4)
    forward = 9000 if jumbo else rng.choices(PATH_MTUS, PATH_WEIGHTS)[0]
    backward = forward if rng.random() < 0.9 else rng.choices(PATH_MTUS, PATH_WEIGHTS)[0]
    trouble = rng.random()
    for node, peer, path_mtu in ((a, b, forward), (b, a, backward)):
        loss, handshake_s = 0.0, round(rng.uniform(0, 120), 1)
        if trouble < 0.01:  # a black hole one way
            if node == a:
                path_mtu = 1400
                fleet.black_holes.add((a, b))
        elif trouble < 0.02:
            handshake_s = round(rng.uniform(400, 900), 1)
        elif trouble < 0.04 and node == a:
            loss = round(rng.uniform(0.03, 0.2), 3)
        icmp_seen = rng.random() < 0.3 and (node, peer) not in fleet.black_holes
        fleet.out[node][peer] = Measured(family, path_mtu, icmp_seen, rtt_s, loss, handshake_s)


def _configured(fleet: Fleet, i: int, rng: random.Random) -> dict[str, Any]:
    """What node i applies: the policy's MTUs (interface = the largest tunnel MTU, floor16 route
    MTUs below it) and the keepalive rule where NAT or a filter needs it."""
    node = fleet.nodes[i]
    tunnels = {p: min(d.path_mtu, 9000) - OVERHEAD_BYTES[d.family] for p, d in fleet.out[i].items()}
    interface = max(tunnels.values(), default=1420)
    keepalive = 0
    if node.kind != "public":
        keepalive = keepalive_for(node.lifetime_s, node.kind == "nat", True)[0]
        if node.kind == "nat" and rng.random() < 0.1:
            keepalive = 25
    peers = []
    for p in fleet.out[i]:
        route = None if tunnels[p] == interface else tunnels[p] - tunnels[p] % 16
        if (i, p) in fleet.black_holes:
            route = 1420
        peers.append({"peer": fleet.nodes[p].name, "route_mtu": route, "keepalive_s": keepalive})
    return {"interface_mtu": interface, "peers": peers}


def _endpoint(node: Node, family: int, second_round: bool) -> str:
    if family == 6:
        return f"[{node.address6}]:51820"
    return f"{node.address}:{node.port + (1000 if second_round and node.remapped else 0)}"


def report(fleet: Fleet, i: int, created_at: datetime, second: bool, rng: random.Random) -> Any:
    node = fleet.nodes[i]
    nat: dict[str, Any] = {
        "measured_at": format_time(created_at - timedelta(seconds=rng.randint(0, 600))),
        "nat": node.kind == "nat",
        "stateful_filter": node.kind != "public",
        "mapped_address": _endpoint(node, 4, second),
    }
    if node.lifetime_s is not None:
        nat |= {"mapping_lifetime_s": node.lifetime_s, "resolution_s": 1.0, "max_lifetime_s": 600.0}
    return {
        "schema_version": 1,
        "report_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "node": node.name,
        "site": node.site,
        "created_at": format_time(created_at),
        "measurements": [
            {
                "peer": fleet.nodes[p].name,
                "endpoint": _endpoint(fleet.nodes[p], d.family, second),
                "rx_bytes": rng.randrange(1 << 40),
                "tx_bytes": rng.randrange(1 << 40),
                **d._asdict(),
            }
            for p, d in fleet.out[i].items()
        ],
        "nat": nat,
        "configured": _configured(fleet, i, rng),
    }


@dataclass
class Round:
    """One report from every node that reports, encoded as agents send them."""

    bodies: list[bytes]
    tokens: list[str]
    measurements: int


def build_round(
    fleet: Fleet, tokens: list[str], created_at: datetime, second: bool, rng: random.Random
) -> Round:
    """A report from every node but the silent ones; after the second round (``created_at`` in
    the future) not from the stale ones either."""
    batch = Round([], [], 0)
    later = created_at > datetime.now(UTC)
    for i, node in enumerate(fleet.nodes):
        if not (node.silent or (node.stale and later)):
            doc = report(fleet, i, created_at, second, rng)
            batch.bodies.append(json.dumps(doc).encode())
            batch.tokens.append(tokens[i])
            batch.measurements += len(doc["measurements"])
    return batch


def public_key(name: str) -> str:
    return base64.b64encode(hashlib.sha256(name.encode()).digest()).decode()


# --- servers -------------------------------------------------------------------------------------


@dataclass
class Controller:
    url: str
    process: subprocess.Popen[bytes]

    def pids(self) -> list[int]:
        """The API process and its children (the fleet view worker)."""
        found = [self.process.pid]
        for task in Path(f"/proc/{self.process.pid}/task").iterdir():
            found += [int(c) for c in (task / "children").read_text().split()]
        return found

    def cpu_s(self) -> float:
        """User + system CPU seconds the server's processes have used so far (a worker that
        was started again loses its earlier seconds: none is, in a run that goes well)."""
        total = 0
        for pid in self.pids():
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(stat[11]) + int(stat[12])
        return total / os.sysconf("SC_CLK_TCK")

    def wait_idle(self, timeout_s: float = 120.0) -> float:
        """Wait until the server's processes (its view worker's recompute, above all) stop
        using the CPU — under 5 % of a core for a second — so that what is timed in this
        process next does not share the cores with them; seconds waited."""
        started = time.monotonic()
        before = self.cpu_s()
        while time.monotonic() - started < timeout_s:
            time.sleep(1.0)
            now = self.cpu_s()
            if now - before < 0.05:
                break
            before = now
        return time.monotonic() - started

    def peak_rss_bytes(self) -> list[int]:
        """Each process's high-water mark: the API's, then the worker's."""
        peaks = []
        for pid in self.pids():
            status = Path(f"/proc/{pid}/status").read_text()
            peaks += [int(line.split()[1]) * 1024 for line in status.splitlines()
                      if line.startswith("VmHWM:")]  # fmt: skip
        return peaks


@contextmanager
def controller_server(base: Path, database: str, profile: Path | None) -> Iterator[Controller]:
    """`fleetvpn controller serve` on 127.0.0.1 and a free port, as an operator runs it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = base / "controller.yml"
    config.write_text(f"listen: 127.0.0.1:{port}\ndatabase: '{database}'\n")
    profiler = ["-m", "cProfile", "-o", str(profile)] if profile else []
    serve = ["-m", "fleetvpn", "controller", "serve", "--config", str(config)]
    log = base / "controller.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, *profiler, *serve], stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _answers(url):
            if process.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"the controller did not start:\n{log.read_text()}")
            time.sleep(0.1)
        yield Controller(url, process)
    finally:
        process.send_signal(signal.SIGINT)  # uvicorn stops; cProfile then writes its file
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


# --- measurements --------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[round(q * (len(ordered) - 1))]


def ingest_store(store: Store, batch: Round) -> None:
    """Feed a round straight into the store as the API does (api.put_report), stage by stage."""
    stages = dict.fromkeys(
        ("JSON decode", "parse_report", "authenticate", "rows", "put_report"), 0.0
    )
    started = time.perf_counter()
    for body, token in zip(batch.bodies, batch.tokens, strict=True):
        t0 = time.perf_counter()
        doc = json.loads(body)
        t1 = time.perf_counter()
        parsed = parse_report(doc)
        t2 = time.perf_counter()
        who = store.authenticate(token)
        t3 = time.perf_counter()
        links = [{k: getattr(m, k) for k in LINK_COLUMNS} for m in parsed.measurements]
        nat = None
        if parsed.nat is not None:
            nat = parsed.nat.to_json() | {"measured_at": parsed.nat.measured_at}
        text = body.decode()  # stored as sent, as the API does
        t4 = time.perf_counter()
        assert who is not None
        store.put_report(who, parsed.report_id, parsed.created_at, text, links, nat)
        t5 = time.perf_counter()
        for stage, took in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            stages[stage] += took
    elapsed = time.perf_counter() - started
    print_ingest("straight into the store (1 thread)", batch, elapsed)
    n = len(batch.bodies)
    shares = [f"{stage} {_ms(took / n)} ({took / elapsed:.0%})" for stage, took in stages.items()]
    print("  per report: " + ", ".join(shares))


def ingest_http(server: Controller, batch: Round, clients: int) -> None:
    cpu_before, client_before = server.cpu_s(), time.process_time()
    started = time.perf_counter()
    posting = Agents(server.url, batch, clients)
    posting.join()
    elapsed = time.perf_counter() - started
    server_cpu_s = server.cpu_s() - cpu_before
    client_cpu_s = time.process_time() - client_before
    print_ingest(f"HTTP ({clients} client threads)", batch, elapsed)
    p50, p99 = _percentile(posting.latencies, 0.5), _percentile(posting.latencies, 0.99)
    n = len(batch.bodies)
    busy = f"server busy {server_cpu_s / elapsed:.2f} cores, {_ms(server_cpu_s / n)}"
    errors = posting.errors
    failed = f"; {len(errors)} errors (first: {errors[0]})" if errors else ""
    print(f"  request p50 {_ms(p50)}, p99 {_ms(p99)}; {busy} CPU a report{failed}")
    capacity = batch.measurements / server_cpu_s
    print(
        f"  the clients here used {client_cpu_s / elapsed:.2f} cores ({_ms(client_cpu_s / n)} a"
        f" report) of the machine's {os.cpu_count()}; the server's CPU a report (background"
        f" recomputes included) is {capacity:,.0f} link measurements/s per busy core"
        f" ({capacity / GOAL_INGEST_PER_S:.2f}x the goal)"
    )


def print_ingest(how: str, batch: Round, elapsed_s: float) -> None:
    n, rate = len(batch.bodies), batch.measurements / elapsed_s
    print(
        f"ingest, {how}: {n:,} reports, {batch.measurements:,} link measurements in"
        f" {elapsed_s:.1f} s: {rate:,.0f}/s ({rate / GOAL_INGEST_PER_S:.2f}x the goal >="
        f" {GOAL_INGEST_PER_S:,}/s), {n / elapsed_s:,.0f} reports/s"
    )


SPOOL_DEPTH = 5  # reports each node replays in one batch


def ingest_batches(
    server: Controller,
    fleet: Fleet,
    tokens: list[str],
    before: datetime,
    rng: random.Random,
    clients: int,
) -> None:
    """Agents replaying their spools after an outage: `POST /v1/reports/batch`, one request of
    SPOOL_DEPTH reports (a minute apart, older than what is stored) per node, for a fifth of
    the fleet (the client's memory), C client threads."""
    names = range(0, len(fleet.nodes), 5)
    bodies: list[bytes] = []
    batch_tokens: list[str] = []
    measurements = 0
    for i in names:
        if fleet.nodes[i].silent:
            continue
        docs = [
            report(fleet, i, before - timedelta(minutes=k), False, rng) for k in range(SPOOL_DEPTH)
        ]
        measurements += sum(len(d["measurements"]) for d in docs)
        bodies.append(json.dumps(docs).encode())
        batch_tokens.append(tokens[i])
    spool = Round(bodies, batch_tokens, measurements)
    cpu_before = server.cpu_s()
    started = time.perf_counter()
    posting = Agents(server.url, spool, clients, path="/v1/reports/batch", status=200)
    posting.join()
    elapsed = time.perf_counter() - started
    server_cpu_s = server.cpu_s() - cpu_before
    rate = measurements / elapsed
    n = len(bodies) * SPOOL_DEPTH
    errors = posting.errors
    failed = f"; {len(errors)} errors (first: {errors[0]})" if errors else ""
    print(
        f"ingest, HTTP batches ({clients} client threads, {len(bodies):,} nodes replaying"
        f" {SPOOL_DEPTH} spooled reports each): {n:,} reports, {measurements:,} link"
        f" measurements in {elapsed:.1f} s: {rate:,.0f}/s ({rate / GOAL_INGEST_PER_S:.2f}x the"
        f" goal), {n / elapsed:,.0f} reports/s; server busy {server_cpu_s / elapsed:.2f} cores,"
        f" {_ms(server_cpu_s / n)} CPU a report{failed}"
    )


class Agents:
    """``threads`` threads posting a round's reports: each as fast as the server answers, or
    all together at ``per_s`` on one schedule. ``join`` waits for the last; ``stop`` ends them."""

    def __init__(
        self,
        url: str,
        batch: Round,
        threads: int,
        per_s: float = math.inf,
        path: str = "/v1/reports",
        status: int = 201,
    ) -> None:
        self.batch, self.per_s, self.path, self.status = batch, per_s, path, status
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._started = time.perf_counter()
        self._threads = [
            threading.Thread(target=self._post, args=(url, k, threads), daemon=True)
            for k in range(threads)
        ]
        for t in self._threads:
            t.start()

    def _post(self, url: str, first: int, step: int) -> None:
        # http.client, not httpx: a third of the client CPU a request, and these threads share
        # the server's two cores (real agents post from their own machines)
        host, port = url.removeprefix("http://").rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            for i in range(first, len(self.batch.bodies), step):
                if self._stop.wait(max(0.0, self._started + i / self.per_s - time.perf_counter())):
                    return
                headers = {"authorization": f"Bearer {self.batch.tokens[i]}",
                           "content-type": "application/json"}  # fmt: skip
                t0 = time.perf_counter()
                try:
                    conn.request("POST", self.path, body=self.batch.bodies[i], headers=headers)
                    r = conn.getresponse()
                    text = r.read()
                except (OSError, http.client.HTTPException) as e:  # the server went away (Ctrl-C)
                    self.errors.append(str(e))
                    return
                self.latencies.append(time.perf_counter() - t0)
                if r.status != self.status:
                    self.errors.append(f"{r.status} {text[:200]!r}")
        finally:
            conn.close()

    def join(self) -> None:
        for t in self._threads:
            t.join()

    def stop(self) -> None:
        self._stop.set()
        self.join()


def age_stale_reports(store: Store, fleet: Fleet, received_at: datetime) -> None:
    names = [n.name for n in fleet.nodes if n.stale]
    ids = sa.select(nodes.c.id).where(nodes.c.name.in_(names))
    with store.tx() as conn:
        conn.execute(
            reports.update().where(reports.c.node_id.in_(ids)).values(received_at=received_at)
        )


def timed(what: str, work: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = work()
    elapsed = time.perf_counter() - started
    print(f"  {what}: {elapsed:.2f} s")
    return elapsed, result


def per_node(what: str, names: list[str], work: Callable[[str], object]) -> float:
    """Seconds ``work`` takes for every node, extrapolated past RENDER_BUDGET_S."""
    started = time.perf_counter()
    done = 0
    while done < len(names) and time.perf_counter() - started < RENDER_BUDGET_S:
        work(names[done])
        done += 1
    elapsed = (time.perf_counter() - started) * len(names) / max(done, 1)
    how = "" if done == len(names) else f", extrapolated from {done:,} nodes"
    print(f"  {what}, all {len(names):,} nodes: {elapsed:.2f} s{how}")
    return elapsed


def recompute(store: Store, site: str) -> None:
    from pydantic import TypeAdapter

    print(
        "recompute and render the whole fleet (in this process, as the server's view worker"
        " process does):"
    )
    gc.freeze()  # as the worker does once a view is published: the fleet here is not garbage
    sources = fleetview.Sources()
    cold_s, _ = timed(
        "compute, cold (every report body parsed, every site's keepalive state saved)",
        lambda: compute(store, sources),
    )
    warm_s, view = timed(
        "compute, warm (bodies already parsed: no new reports)", lambda: compute(store, sources)
    )
    gc.freeze()
    reread(store)
    tunnel = TunnelConfig()
    publish_s, (fd, _) = timed(
        "views.render_view (every link's health JSON, sites, every node's desired state, tune)",
        lambda: views.render_view(view, tunnel, 0),
    )
    _, published = timed(
        "views.Published (the API maps the file and reads its index)",
        lambda: views.Published(1, fd),
    )
    metrics_s, text = timed("metrics.render", lambda: metrics.render(view))
    names = sorted(view.node_sites)
    render_s = per_node(
        f"render.render ({', '.join(render.KINDS)}; the API renders a node's on request)",
        names,
        lambda n: [render.render(json.loads(published.desired(n)), k) for k in render.KINDS],
    )
    rest = publish_s + metrics_s + render_s
    for what, compute_s in (("cold", cold_s), ("warm", warm_s)):
        total = compute_s + rest
        print(
            f"  total ({what} compute, render_view, metrics, config files): {total:.1f} s"
            f" ({total / GOAL_RECOMPUTE_S:.2f}x the goal <= {GOAL_RECOMPUTE_S:.0f} s)"
        )
    summary = published.index.summary
    print(
        f"  {len(view.links):,} links: "
        + ", ".join(f"{state} {n:,}" for state, n in sorted(summary.items()))
    )
    print("what a health answer costs the API from a published view (joining finished bytes):")
    timed(f"health(site={site})", lambda: published.health(site))
    timed("health(problems, limit=100)", lambda: published.health(problems=True, limit=100))
    timed("health() (the whole fleet: slices of the view's file)", published.health)
    health = b"".join(published.health())
    as_json = TypeAdapter(dict[str, Any])  # how FastAPI encoded the endpoint's dict before
    doc = json.loads(health)
    timed(
        "for comparison: the whole document as FastAPI encoded it (pydantic validate + dump)",
        lambda: as_json.dump_json(as_json.validate_python(doc)),
    )
    print(
        f"  health document {len(health) / 1e6:,.0f} MB, /metrics {len(text) / 1e6:,.0f} MB,"
        f" the view's file {published.view.nbytes / 1e6:,.0f} MB"
    )


def reread(store: Store) -> None:
    """What a cold compute spends on reading back the stored reports."""
    _, heads = timed("  of which store.report_heads", store.report_heads)
    ids = [i for latest, _, previous in heads.values() for i in (latest, previous) if i]
    _, bodies = timed("  of which store.report_bodies", lambda: store.report_bodies(ids))
    texts = [body for _, body in bodies.values()]
    timed(
        "  of which parsing those bodies (trusted fast path)", lambda: [*map(stored_report, texts)]
    )
    sample = [json.loads(t) for t in texts[:2000]]
    sample_s, _ = timed(
        f"  for comparison: Report.from_json of {len(sample):,} of them",
        lambda: [*map(Report.from_json, sample)],
    )
    print(f"    (all {len(texts):,}: {sample_s * len(texts) / max(1, len(sample)):.2f} s)")


def compute(store: Store, sources: fleetview.Sources | None = None) -> fleetview.FleetView:
    return fleetview.compute(store, datetime.now(UTC), sources)


def health_latency(
    server: Controller, admin: str, path: str, queries: int, budget_s: float, client: str = "httpx"
) -> None:
    """p50/p99 of ``GET path`` as a small client process sees it: this process holds the
    synthetic fleet (GBs of objects; a pass of its cyclic collector takes hundreds of ms and
    large answers land in a crowded heap), `fleetvpn health` does not. So the requests are
    made by a child process (:func:`_query_main`) with httpx, as the CLI makes them, or with
    ``client`` "curl" (one curl process a request, its start included), a client that reads
    as fast as the server sends: what the server itself takes, where httpx's reading of
    hundreds of MB in Python dominates."""
    if client == "curl" and shutil.which("curl") is None:
        print(f"  GET {path} with curl: no curl on this machine")
        return
    args = [server.url, path, str(queries), str(budget_s), client]
    child = subprocess.run(
        [sys.executable, __file__, "--query", *args],
        input=admin,
        capture_output=True,
        text=True,
        check=False,
    )
    if child.returncode != 0:
        print(
            f"  GET {path} ({client}): exit {child.returncode}"
            f" {child.stdout.strip()} {child.stderr.strip()[-300:]}"
        )
        return
    result = json.loads(child.stdout)
    latencies, ages, computes = result["latencies"], result["ages"], result["computes"]
    p99 = _percentile(latencies, 0.99)
    print(
        f"  GET {path}{'' if client == 'httpx' else ' with ' + client}: {len(latencies)}"
        f" requests, p50 {_ms(_percentile(latencies, 0.5))},"
        f" p99 {_ms(p99)} ({p99 / GOAL_HEALTH_P99_S:.3g}x the goal p99 <="
        f" {GOAL_HEALTH_P99_S * 1000:.0f} ms), {result['size'] / 1e6:,.1f} MB each;"
        f" the view served was {min(ages):.0f}..{max(ages):.0f} s old and took the server's"
        f" worker {min(computes):.1f}..{max(computes):.1f} s to compute and render"
    )


def _query_main(url: str, path: str, queries: str, budget_s: str, client: str) -> None:
    """The child process of :func:`health_latency` (the admin token on stdin): JSON out."""
    headers = {"authorization": f"Bearer {sys.stdin.read().strip()}"}
    latencies: list[float] = []
    ages: list[float] = []
    computes: set[float] = set()
    size = 0
    started = time.perf_counter()
    with httpx.Client(base_url=url, timeout=600) as http:
        while len(latencies) < int(queries) and time.perf_counter() - started < float(budget_s):
            t0 = time.perf_counter()
            if client == "curl":
                curl = ["curl", "-sS", "-o", "/dev/null", "-D", "-", "-w", "%{size_download}",
                        "-H", f"authorization: {headers['authorization']}", url + path]  # fmt: skip
                out = subprocess.run(curl, capture_output=True, text=True, check=True).stdout
                latencies.append(time.perf_counter() - t0)
                head, _, downloaded = out.rpartition("\n\n")  # text mode: \r\n read as \n
                lines = head.split("\n")
                if " 200" not in lines[0]:
                    sys.exit(lines[0])
                found = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
                size = int(downloaded)
            else:
                r = http.get(path, headers=headers)
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    sys.exit(f"{r.status_code} {r.text[:200]}")
                size = len(r.content)
                found = dict(r.headers)
            ages.append(float(found.get("x-fleetvpn-view-age-s", "nan")))
            computes.add(float(found.get("x-fleetvpn-view-compute-s", "nan")))
    doc = {"latencies": latencies, "ages": ages, "computes": sorted(computes), "size": size}
    print(json.dumps(doc))


def print_profile(
    title: str, source: cProfile.Profile | str, sort: str = "tottime", only: str = ""
) -> None:
    top = 15
    out = io.StringIO()
    pstats.Stats(source, stream=out).sort_stats(sort).print_stats(only, top)
    lines = out.getvalue().splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls"))
    print(f"profile: {title}, top {top} by {sort} time")
    for line in lines[header : header + top + 1]:
        print("  " + line.replace(sys.prefix + "/", "").replace(os.getcwd() + "/", ""))


# --- main ----------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--sites", type=int, default=500)
    parser.add_argument("--links-per-node", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="a fleet 10x smaller")
    parser.add_argument("--postgres", action="store_true", help="a throwaway PostgreSQL server")
    parser.add_argument("--clients", type=int, default=16, help="HTTP connections for ingest")
    parser.add_argument("--queries", type=int, default=50, help="requests per health query")
    parser.add_argument("--budget", type=float, help="seconds per health query (60, quick 10)")
    parser.add_argument("--history", type=int, default=0, help="older rounds stored first")
    parser.add_argument("--hubs", type=int, default=0, help="public nodes with an endpoint")
    parser.add_argument("--profile", action="store_true", help="cProfile server and compute")
    args = parser.parse_args()
    if args.quick:
        args.nodes, args.sites = args.nodes // 10, args.sites // 10
    args.budget = args.budget or (10.0 if args.quick else 60.0)
    return args


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up as on Ctrl-C
    rng = random.Random(4)
    fleet = build_fleet(args.nodes, args.sites, args.links_per_node, rng)
    kinds = list(fleet.sites.values())
    print(
        f"fleet{' (--quick)' if args.quick else ''}: {len(fleet.nodes):,} nodes in"
        f" {len(fleet.sites):,} sites ("
        + ", ".join(f"{kinds.count(k)} {k}" for k in ("public", "nat", "firewall"))
        + f"), {fleet.links:,} links, {args.hubs} with an endpoint, {args.history} older rounds"
    )
    if args.profile:
        print("(--profile: everything runs slower under cProfile)")
    with ExitStack() as stack:
        base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fvbench-")))
        os.chmod(base, 0o755)  # PostgreSQL runs as its own user
        database = (
            stack.enter_context(postgres.throwaway_server(base))
            if args.postgres
            else sqlite_url(str(base / "controller.db"))
        )
        store = Store.open(database)
        stack.callback(store.close)
        print(
            f"database: {store.engine.dialect.name} in {base}; Python {sys.version.split()[0]},"
            f" {os.cpu_count()} cores"
        )
        started = time.perf_counter()
        admin = store.create_admin_token("bench")
        hubs = [n for n in fleet.nodes if n.kind == "public" and n.name.endswith("-n00")]
        endpoints = {n.name: f"{n.address}:{n.port}" for n in hubs[: args.hubs]}
        tokens = [
            store.enroll(
                store.create_enrollment_token(n.site), n.name, public_key(n.name),
                endpoint=endpoints.get(n.name),
            )[0]
            for n in fleet.nodes
        ]  # fmt: skip
        enroll_s = time.perf_counter() - started
        print(f"enrolled {len(tokens):,} nodes through the store in {enroll_s:.1f} s")

        now = datetime.now(UTC)
        for r in range(args.history, 0, -1):
            older = build_round(fleet, tokens, now - timedelta(minutes=r + 1), r % 2 == 0, rng)
            with redirect_stdout(io.StringIO()):
                ingest_store(store, older)
        first = build_round(fleet, tokens, now - timedelta(minutes=1), False, rng)
        second = build_round(fleet, tokens, now, True, rng)
        ingester = cProfile.Profile() if args.profile else None
        profile = base / "server.prof" if args.profile else None
        with controller_server(base, database, profile) as server:
            if ingester:
                ingester.runcall(ingest_store, store, first)
            else:
                ingest_store(store, first)
            ingest_http(server, second, args.clients)
            del first, second
            age_stale_reports(store, fleet, now - timedelta(minutes=15))
            site = next(n.site for n in fleet.nodes if n.kind == "nat")
            print(f"(waited {server.wait_idle():.0f} s for the server's view worker to finish)")
            recompute(store, site)
            print(
                "health over HTTP, no reports arriving (the queries `fleetvpn health` makes:"
                " --site S; by default one page, then the problems):"
            )
            paths = (
                f"/v1/health?site={site}",
                "/v1/health?limit=100",
                "/v1/health?problems=true&limit=100",
            )
            for path in paths:
                health_latency(server, admin, path, args.queries, args.budget)
            print(
                "  for comparison, the whole-fleet document (only `fleetvpn health --json`"
                " without --site asks for it):"
            )
            health_latency(server, admin, "/v1/health", args.queries, args.budget)
            health_latency(server, admin, "/v1/health", args.queries, args.budget, "curl")
            third = build_round(fleet, tokens, now + timedelta(minutes=1), True, rng)
            per_s = len(fleet.nodes) / 60
            print(
                f"health over HTTP while agents report ({per_s:,.0f}/s: each node once a minute):"
            )
            started = time.perf_counter()
            agents = Agents(server.url, third, 4, per_s)
            try:
                for path in paths:
                    health_latency(server, admin, path, args.queries, args.budget)
            finally:
                agents.stop()
            arrived = len(agents.latencies) - len(agents.errors)
            print(f"  {arrived / (time.perf_counter() - started):,.0f} reports/s arrived")
            # last: the replayed history would make the phases above differ from earlier runs
            ingest_batches(server, fleet, tokens, now - timedelta(minutes=30), rng, args.clients)
            peaks = " + ".join(f"{b / 2**20:,.0f}" for b in server.peak_rss_bytes())
            print(
                f"peak memory: server {peaks} MiB (the API + its view worker; the views' memory"
                " files are counted in both), this process"
                f" {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB"
            )
        if ingester and profile:
            print_profile("ingest straight into the store", ingester)
            compute_profile = cProfile.Profile()
            compute_profile.runcall(compute, store)
            print_profile("fleet.compute, warm", compute_profile)
            print_profile(  # health requests run in worker threads: cProfile sees only ingest
                "the server's event loop (report ingest), fleetvpn's functions",
                str(profile),
                "cumulative",
                "fleetvpn/",
            )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--query"]:
        _query_main(*sys.argv[2:7])
        sys.exit(0)
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)

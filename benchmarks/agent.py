"""An idle `fleetvpn agent run` with 1, 10 and 50 peers: memory, CPU, and probe traffic per peer.

Goals: at most 40 MB RSS and under 1 % of a core when idle (issue 5); PMTU upkeep and
black-hole watch under 20 kB per peer per hour on an idle link, RTT/loss sampling counted
separately (issue 12 item 7).

Setup, all inside a private network namespace (the benchmark re-runs itself under
``unshare --net --mount``; needs root; nothing touches the host's network):
- a stand-in controller (the standard library's HTTP server, in this process) that enrolls the
  agent and serves a desired state with N peers;
- one stand-in peer responder on 127.0.0.2 (fleetvpn.net.responder) that is every peer's
  endpoint (the path watch's and searches' probes, NAT measurement, hellos), and one per peer
  on that peer's tunnel address (RTT/loss probes), counting every byte both ways (IP bytes:
  UDP payload + 28) by what it is (below);
- the node's own link: a veth pair of MTU 1500 (the prober's ceiling, as an Ethernet uplink;
  loopback does not count as one), and a path of ``PATH_MTU`` = 1400 towards every endpoint:
  the endpoint stand-in never answers a search's or the watch's probe larger than that (as a
  path whose ICMP is eaten), only the fragment check's DF-clear probe (which routers would
  fragment). Path < ceiling is the dear case: the upkeep then also probes value + 1;
- the agent itself, without an endpoint of its own (so it sends hellos), in three runs per
  peer count: ``apply: false`` and ``apply: true`` (a real wireguard-go interface with every
  peer, none of which answers) with the production intervals (report/desired/RTT 30 s, PMTU
  600 s, NAT 3600 s), then the *upkeep run*: ``apply: false`` with ``pmtu_s`` = 20 s.

Measured: RSS (VmRSS) and CPU (utime + stime of the agent and its waited-for `wg`/`ip`
commands, from /proc) over a window after start-up (every peer's first search concluded, as
status.json says), in the two production runs; the baseline, in the same process: a bare Python
idling in asyncio (the floor any Python agent pays). Probe traffic, told apart by the stand-ins
and pooled over the three runs:

(a) PMTU upkeep + black-hole watch: the path watch's probes to the endpoint, with their acks.
    A probe socket's probe ids run in sequences (fleetvpn.engines.common.ProbeBook: random
    start, then consecutive): its first sequence is its search's (the watch is idle until the
    first search concludes), the next one the watch's; the fragment check has its own id. The
    watch probes of one socket less than 5 s apart make one *round* (an upkeep, or a check
    with its verify/confirm rounds). The upkeep comes every ``pmtu_s`` (±10 %) and an idle
    round costs the same whatever that period, so the upkeep run sets ``pmtu_s`` to 20 s for a
    window of 6 periods (~6 rounds per peer; the measured time between rounds is printed) and
    the figure is the measured bytes per round × 3600 / 600: the production interval. (Six
    rounds at 600 s would need an hour per peer count.)
(b) The daily full search, amortised: the bytes of the start-up searches (the same "full"
    search from scratch the long schedule runs every 86400 s ±10 %), per search, / 24. The
    fragment check follows a search only when the value changed (not daily): shown apart.
(c) RTT/loss: the probes to the peers' tunnel addresses and their acks, per round (one every
    ``rtt_s``, 4 probes), × 3600 / rtt_s (production, measured at production intervals).
(d) Hellos: each forward search of a node without an endpoint ends with a hello (+ its reply):
    one a day while idle (the first one is repeated once after 60 s, at start only).
Per node rather than per peer: the NAT measurement, every ``nat_s``.

    sudo .venv/bin/python benchmarks/agent.py [--window 60] [--peers 1,10,50]
        [--upkeep-pmtu 20] [--upkeep-window 120]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import itertools
import json
import math
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fleetvpn.agent.pathwatch_adapter import FRAGMENT_PROBE_ID  # noqa: E402
from fleetvpn.net import keys, wire  # noqa: E402
from fleetvpn.net.responder import Responder  # noqa: E402

PEER_IP = "127.0.0.2"
# Without a tunnel, this address on lo makes the whole tunnel network local (a loopback
# device's prefix is a local route): each peer keeps its own tunnel address, as the agent
# requires, and a stand-in bound to that address answers its RTT probes.
LOCAL_TUNNEL_ADDR = "10.99.0.254/16"
IP_FREEBIND = 15  # linux/in.h; not in Python's socket module
PROBE_PORT = 51821
TICKS = os.sysconf("SC_CLK_TCK")
INTERVALS = {"report_s": 30, "desired_s": 30, "pmtu_s": 600, "nat_s": 3600, "rtt_s": 30}
FULL_SEARCH_S = 86400.0  # PathKeeper's long schedule (fleetvpn.agent.paths leaves the default)
PATH_MTU = 1400  # towards every endpoint: larger DF probes are lost on the way
LINK = ("fvbench-up", "fvbench-pe")  # the node's own link, a veth pair: the prober's ceiling
LINK_MTU = 1500
SEQUENCE_SPAN = 1 << 14  # probe ids of one sequence (one engine's book) lie this close
ROUND_GAP_S = {"watch": 5.0, "rtt": 5.0, "search": 30.0}  # a longer silence starts a new round
GOAL_UPKEEP_BYTES = 20_000

T = TypeVar("T")


class Traffic:
    """What the stand-ins received and sent during one run, by kind: ``search``, ``watch``,
    ``fragments`` (PMTU probes to the endpoint, module docstring), ``hello``, ``nat``, ``rtt``
    (to a tunnel address), ``other`` (anything else: nothing, normally). Mutated on the
    stand-ins' loop only; read once detached (:meth:`StandIns.end_run`)."""

    def __init__(self) -> None:
        self.bytes: Counter[str] = Counter()  # IP bytes, both ways
        self.requests: Counter[str] = Counter()  # packets received
        self.sequences: dict[tuple[str, int], list[int]] = {}  # per socket: first id of each
        self.rounds: dict[tuple[str, str], list[float]] = {}  # (kind, socket/address): starts
        self._last: dict[tuple[str, str], float] = {}

    def count(self, kind: str, payload: int, *, request: bool, key: str | None = None) -> None:
        self.bytes[kind] += payload + 28
        if not request:
            return
        self.requests[kind] += 1
        if key is not None and kind in ROUND_GAP_S:
            now = time.monotonic()
            k = (kind, key)
            if now - self._last.get(k, -math.inf) > ROUND_GAP_S[kind]:
                self.rounds.setdefault(k, []).append(now)
            self._last[k] = now

    def probe_kind(self, source: tuple[str, int], probe_id: int) -> str:
        """``search`` for the socket's first id sequence, ``watch`` for its second."""
        firsts = self.sequences.setdefault(source, [])
        near = (
            i
            for i, first in enumerate(firsts)
            if min((probe_id - first) % 2**32, (first - probe_id) % 2**32) < SEQUENCE_SPAN
        )
        i = next(near, len(firsts))
        if i == len(firsts):
            firsts.append(probe_id)
        return ("search", "watch")[i] if i < 2 else "other"

    def round_starts(self, kind: str) -> list[list[float]]:
        return [starts for (k, _), starts in self.rounds.items() if k == kind]


class CountingResponder(Responder):
    """The real responder, counting by kind (:class:`Traffic`). ``role``: ``"endpoint"`` (every
    peer's endpoint, over the path of ``PATH_MTU``) or ``"tunnel"`` (one peer's tunnel address)."""

    def __init__(self, key: wire.KeyLike, role: str, name: str = "") -> None:
        super().__init__(key)
        self.role = role
        self.name = name
        self.traffic = Traffic()
        self._kind: str | None = None  # of the request being answered

    def _classify(self, data: bytes, addr: tuple[str, int]) -> tuple[str, str | None]:
        if self.role == "tunnel":
            return "rtt", self.name
        try:
            body = wire.decode(data, self.key).body
        except wire.WireError:
            return "other", None
        if isinstance(body, wire.PmtuProbe):
            if body.probe_id == FRAGMENT_PROBE_ID:
                return "fragments", None
            return self.traffic.probe_kind(addr, body.probe_id), f"{addr[0]}:{addr[1]}"
        if isinstance(body, wire.BindingRequest) and addr[1] == PROBE_PORT:
            return "hello", None  # from the agent's responder socket: "probe me back"
        if isinstance(body, wire.BindingRequest | wire.ArmRequest):
            return "nat", None
        return "other", None

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        kind, key = self._classify(data, addr)
        self.traffic.count(kind, len(data), request=True, key=key)
        if kind in ("search", "watch") and len(data) + 28 > PATH_MTU:
            return  # lost on the way (ICMP eaten); the fragment check's probe gets through
        self._kind = kind
        try:
            super().datagram_received(data, addr)
        finally:
            self._kind = None

    def _send(self, transport: Any, body: wire.Body, addr: tuple[str, int], key: bytes) -> None:
        if transport is not None and not transport.is_closing():
            packet = self.sealer.seal(body, time.time(), key=key)
            # a reply has its request's kind; a fire, sent later on its own, is the NAT's
            self.traffic.count(self._kind or "nat", len(packet), request=False)
            transport.sendto(packet, addr)


class StandIns:
    """The stand-in responders, on their own loop in a thread."""

    def __init__(self, key: wire.KeyLike, peers: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.responders: list[CountingResponder] = []
        self.loop.run_until_complete(self._serve(key, peers))
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    async def _serve(self, key: wire.KeyLike, peers: int) -> None:
        endpoint = CountingResponder(key, "endpoint")
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((PEER_IP, PROBE_PORT))
        await self.loop.create_datagram_endpoint(lambda: endpoint, sock=sock)
        other, _ = await self.loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, local_addr=(PEER_IP, 0)
        )
        endpoint.other = other
        self.responders.append(endpoint)
        # Each peer's tunnel address gets a stand-in of its own: bound to that address, so it
        # wins over the agent's own responder on the wildcard address. IP_FREEBIND: the
        # addresses are local only during the runs without a tunnel.
        for i in range(peers):
            address = tunnel_ip(i).split("/")[0]
            side = CountingResponder(key, "tunnel", address)
            bound = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            bound.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
            bound.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # beside the agent's
            bound.bind((address, PROBE_PORT))
            await self.loop.create_datagram_endpoint(lambda side=side: side, sock=bound)  # type: ignore[misc]
            self.responders.append(side)

    def _on_loop(self, fn: Callable[[], T]) -> T:
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(fn())
            except BaseException as e:  # handed to the caller
                done.set_exception(e)

        self.loop.call_soon_threadsafe(run)
        return done.result(10)

    def end_run(self) -> Traffic:
        """The traffic counted since the last call; a fresh count from now on."""

        def swap() -> Traffic:
            old, new = self.responders[0].traffic, Traffic()
            for r in self.responders:
                r.traffic = new
            return old

        return self._on_loop(swap)


def tunnel_ip(i: int) -> str:
    return f"10.99.{1 + i // 250}.{1 + i % 250}/32"


def fake_controller(peers: int) -> ThreadingHTTPServer:
    keys_ = [base64.b64encode(secrets.token_bytes(32)).decode() for _ in range(peers)]
    desired = {
        "schema_version": 1, "node": "bench", "site": "lab", "generated_at": "2026-01-01T00:00:00Z",
        "interface": "fvbench0", "addresses": ["10.99.0.1/16"], "listen_port": 51820,
        "interface_mtu": 1420, "interface_mtu_reason": "benchmark",
        "peers": [
            {"peer": f"peer{i}", "site": "lab", "public_key": keys_[i],
             "endpoint": f"{PEER_IP}:{52000 + i}",
             "allowed_ips": [tunnel_ip(i)],
             "keepalive_s": 0, "keepalive_reason": "benchmark", "route_mtu": 1420,
             "route_mtu_reason": "benchmark"}
            for i in range(peers)
        ],
    }  # fmt: skip
    body = json.dumps(desired).encode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _answer(self, status: int, payload: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:
            self._answer(200, body)

        def do_POST(self) -> None:
            sent = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path == "/v1/enroll":
                doc: dict[str, Any] = {"node": "bench", "site": "lab", "node_token": "fvn_bench"}
                self._answer(201, json.dumps(doc).encode())
            elif self.path == "/v1/reports/batch":  # the agent replays its spool here
                reports = json.loads(sent)
                results = [
                    {"index": i, "report_id": r.get("report_id"), "status": 201, "stored": True}
                    for i, r in enumerate(reports)
                ]
                doc = {"schema_version": 1, "stored": len(results), "replayed": 0,
                       "rejected": 0, "results": results}  # fmt: skip
                self._answer(200, json.dumps(doc).encode())
            else:
                self._answer(201, b'{"stored": true}')

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def proc_usage(pid: int) -> tuple[float, int]:
    """(CPU seconds so far, its own and its waited-for children's — the `wg` and `ip` commands
    it runs —, RSS bytes)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = sum(int(f) for f in fields[11:15]) / TICKS
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return cpu, rss


def searched(status_file: Path, peers: int) -> list[int] | None:
    """Every peer's path MTU once each has one (status.json, rewritten every 5 s), else None."""
    try:
        rows = json.loads(status_file.read_text()).get("peers", [])
    except (OSError, ValueError):
        return None
    values = [row.get("path_mtu") for row in rows]
    if len(values) < peers or None in values:
        return None
    return values


def run_agent(peers: int, work: Path, stand_ins: StandIns, window_s: float, warmup_s: float,
              mode: str, pmtu_s: float) -> dict[str, Any]:  # fmt: skip
    """One agent with ``peers`` peers. ``mode``: ``"tunnel"``: ``apply: true``, a real
    wireguard-go interface with every peer (none of them answers: their RTT probes go nowhere),
    so the idle cost includes reading and reconciling a real tunnel; ``"measure"`` (production
    intervals) and ``"upkeep"`` (``pmtu_s`` as given): ``apply: false`` and every peer's tunnel
    address is a stand-in, so RTT traffic is real and counted."""
    tunnel = mode == "tunnel"
    server = fake_controller(peers)
    name = f"{mode[0]}{peers}"
    state = work / f"state{name}"
    config = work / f"agent{name}.yml"
    log_file = work / f"agent{name}.log"
    (work / "enroll.token").write_text("bench\n")
    config.write_text(
        f"controller: http://127.0.0.1:{server.server_address[1]}\n"
        f"node: bench\nenrollment_token_file: {work}/enroll.token\n"
        f"interface: fvbench0\napply: {'true' if tunnel else 'false'}\nstate_dir: {state}\n"
        "log_level: warning\nwireguard: auto\n"
        f"probe: {{listen_port: {PROBE_PORT}, key_file: {work}/probe.key, "
        f"nat_responder: '{PEER_IP}:{PROBE_PORT}'}}\n"
        f"intervals: {json.dumps({**INTERVALS, 'pmtu_s': pmtu_s})}\n"
        "tunnel_networks: [10.99.0.0/16]\n"
    )
    stand_ins.end_run()  # whatever came before this run is not this run's
    if not tunnel:  # every peer's tunnel address is local: the stand-in answers its RTT probes
        subprocess.run(["ip", "addr", "add", LOCAL_TUNNEL_ADDR, "dev", "lo"], check=True)
    started = time.monotonic()
    with log_file.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fleetvpn", "agent", "run", "--config", str(config)],
            cwd=REPO, stderr=log, stdout=subprocess.DEVNULL,
            env={**os.environ, "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"},
        )  # fmt: skip
    try:
        deadline = started + 60 + 6 * peers
        while (values := searched(state / "status.json", peers)) is None:
            if time.monotonic() > deadline or proc.poll() is not None:
                tail = log_file.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"start-up searches not done; the agent said:\n{tail}")
            time.sleep(0.5)
        startup_s = time.monotonic() - started
        time.sleep(warmup_s)
        cpu0, _ = proc_usage(proc.pid)
        t0 = time.monotonic()
        peak = 0
        while time.monotonic() - t0 < window_s:
            time.sleep(1.0)
            peak = max(peak, proc_usage(proc.pid)[1])
        cpu1, rss = proc_usage(proc.pid)
        elapsed = time.monotonic() - t0
        wg_peers = 0
        if tunnel:
            dump = subprocess.run(["wg", "show", "fvbench0", "peers"], capture_output=True,
                                  text=True).stdout  # fmt: skip
            wg_peers = len(dump.split())
    finally:
        proc.terminate()
        proc.wait(10)
        server.shutdown()
        time.sleep(0.5)  # the last acks
        traffic = stand_ins.end_run()
        if tunnel:
            subprocess.run(["ip", "link", "del", "fvbench0"], capture_output=True)
        else:
            subprocess.run(["ip", "addr", "del", LOCAL_TUNNEL_ADDR, "dev", "lo"], check=True)
    return {
        "peers": peers,
        "mode": mode,
        "pmtu_s": pmtu_s,
        "tunnel_peers": wg_peers,
        "rss_bytes": rss,
        "peak_rss_bytes": peak,
        "cpu_ratio": (cpu1 - cpu0) / elapsed,
        "startup_s": startup_s,
        "path_mtus": sorted(set(values)),
        "traffic": traffic,
    }


def probe_figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """(a)-(d) of the module docstring, per peer, from one peer count's runs."""
    total: Counter[str] = Counter()
    requests: Counter[str] = Counter()
    rounds = {"watch": 0, "rtt": 0, "search": 0}
    upkeep_gaps: list[float] = []
    nat_runs = 0
    for run in runs:
        traffic: Traffic = run["traffic"]
        total.update(traffic.bytes)
        requests.update(traffic.requests)
        for kind in rounds:
            for starts in traffic.round_starts(kind):
                rounds[kind] += len(starts)
                if kind == "watch" and run["mode"] == "upkeep":
                    upkeep_gaps += [b - a for a, b in itertools.pairwise(starts)]
        nat_runs += traffic.bytes["nat"] > 0
    upkeep_pmtu_s = next((r["pmtu_s"] for r in runs if r["mode"] == "upkeep"), None)

    def per(kind: str, n: int) -> float:
        return total[kind] / n if n else math.nan

    watch_round = per("watch", rounds["watch"])
    search = per("search", rounds["search"])
    rtt_round = per("rtt", rounds["rtt"])
    hello = per("hello", requests["hello"])
    figures: dict[str, Any] = {
        "upkeep_round_bytes": watch_round,
        "upkeep_rounds": rounds["watch"],
        "upkeep_gap_s": sum(upkeep_gaps) / len(upkeep_gaps) if upkeep_gaps else math.nan,
        "upkeep_pmtu_s": upkeep_pmtu_s,
        "search_bytes": search,
        "searches": rounds["search"],
        "fragment_check_bytes": per("fragments", requests["fragments"]),
        "rtt_round_bytes": rtt_round,
        "rtt_rounds": rounds["rtt"],
        "hello_bytes": hello,
        "hellos": requests["hello"],
        "nat_bytes": per("nat", nat_runs),
        "other_bytes": total["other"],
        "a": watch_round * 3600 / INTERVALS["pmtu_s"],
        "b": search * 3600 / FULL_SEARCH_S,
        "c": rtt_round * 3600 / INTERVALS["rtt_s"],
        "d": hello * 3600 / FULL_SEARCH_S,  # one hello per forward search: the daily one
    }
    figures["total"] = sum(figures[k] for k in "abcd")
    return figures


def baseline(window_s: float) -> tuple[float, int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import asyncio; asyncio.run(asyncio.sleep(1e9))"]
    )
    try:
        time.sleep(2)
        cpu0, _ = proc_usage(proc.pid)
        time.sleep(window_s)
        cpu1, rss = proc_usage(proc.pid)
    finally:
        proc.terminate()
        proc.wait(5)
    return (cpu1 - cpu0) / window_s, rss


def kb(value: float, digits: int = 1) -> str:
    return f"{value / 1000:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--window", type=float, default=60.0, help="idle window, seconds")
    parser.add_argument("--warmup", type=float, default=15.0, help="after the start-up runs")
    parser.add_argument("--peers", default="1,10,50")
    parser.add_argument("--upkeep-pmtu", type=float, default=20.0,
                        help="pmtu_s of the upkeep run, seconds (>= 10)")  # fmt: skip
    parser.add_argument("--upkeep-window", type=float, default=None,
                        help="the upkeep run's window (default: 6 x --upkeep-pmtu)")  # fmt: skip
    parser.add_argument("--no-tunnel", action="store_true", help="skip the runs with wg0")
    parser.add_argument("--keep", action="store_true", help="keep the agents' state dirs")
    args = parser.parse_args()
    if args.upkeep_pmtu < 2 * ROUND_GAP_S["watch"]:
        parser.error("--upkeep-pmtu must be >= 10 s (rounds closer than 5 s would merge)")
    upkeep_window = args.upkeep_window or 6 * args.upkeep_pmtu
    if os.environ.get("FVBENCH_NETNS") != "1":
        if os.geteuid() != 0:
            sys.exit("benchmarks/agent.py needs root (it runs in a private network namespace)")
        # a private mount namespace too: wireguard-go's control socket directory is its own
        script = (
            "mkdir -p /run/wireguard && mount -t tmpfs fvbench /run/wireguard && "
            'ip link set lo up && exec "$0" "$@"'
        )
        os.execvpe(
            "unshare",
            ["unshare", "--net", "--mount", "sh", "-c", script, sys.executable, *sys.argv],
            {**os.environ, "FVBENCH_NETNS": "1"},
        )
    began = time.monotonic()
    counts = [int(x) for x in args.peers.split(",")]
    work = Path(tempfile.mkdtemp(prefix="fvbench-"))
    subprocess.run(["ip", "link", "add", LINK[0], "mtu", str(LINK_MTU), "type", "veth", "peer",
                    "name", LINK[1], "mtu", str(LINK_MTU)], check=True)  # fmt: skip
    try:
        keys.write_key(work / "probe.key")
        stand_ins = StandIns(keys.load_key(work / "probe.key"), max(counts))
        tunnel_ok = shutil.which("wireguard-go") is not None and not args.no_tunnel
        base: list[tuple[float, int]] = []
        base_thread = threading.Thread(target=lambda: base.append(baseline(args.window)))
        base_thread.start()
        rows: list[tuple[list[dict[str, Any]], dict[str, Any]]] = []
        for n in counts:
            runs = [run_agent(n, work, stand_ins, args.window, args.warmup, "measure",
                              INTERVALS["pmtu_s"])]  # fmt: skip
            if tunnel_ok:
                runs.append(run_agent(n, work, stand_ins, args.window, args.warmup, "tunnel",
                                      INTERVALS["pmtu_s"]))  # fmt: skip
            runs.append(run_agent(n, work, stand_ins, upkeep_window, 0.0, "upkeep",
                                  args.upkeep_pmtu))  # fmt: skip
            figures = probe_figures(runs)
            rows.append((runs, figures))
            for r in runs:
                if r["mode"] == "upkeep":
                    continue
                label = "apply: false"
                if r["mode"] == "tunnel":
                    label = f"wg0 with {r['tunnel_peers']} peers"
                rss, peak = r["rss_bytes"] / 2**20, r["peak_rss_bytes"] / 2**20
                print(
                    f"{n:>3} peers, {label:<19}: RSS {rss:5.1f} MB (peak {peak:.1f}), "
                    f"CPU {100 * r['cpu_ratio']:.2f} % of a core (agent + its wg/ip commands); "
                    f"first searches done in {r['startup_s']:.0f} s (status.json, every 5 s)",
                    flush=True,
                )
            f = figures
            mtus = sorted({m for r in runs for m in r["path_mtus"]})
            print(
                f"{n:>3} peers, probes: path MTU {'/'.join(map(str, mtus))}; upkeep round "
                f"{f['upkeep_round_bytes']:.0f} B ({f['upkeep_rounds']} rounds, every "
                f"{f['upkeep_gap_s']:.1f} s at pmtu_s {f['upkeep_pmtu_s']:g}); full search "
                f"{kb(f['search_bytes'])} kB ({f['searches']}); RTT round "
                f"{f['rtt_round_bytes']:.0f} B ({f['rtt_rounds']}); hello "
                f"{f['hello_bytes']:.0f} B ({f['hellos']}); NAT {kb(f['nat_bytes'])} kB per node",
                flush=True,
            )
            if f["other_bytes"] or mtus != [PATH_MTU]:
                print(f"    (unexpected: {f['other_bytes']} B unclassified; path MTU {mtus}, "
                      f"not {PATH_MTU})")  # fmt: skip
        base_thread.join()
        base_cpu, base_rss = base[0]
        print(f"baseline (bare python + asyncio, idle): RSS {base_rss / 2**20:.1f} MB, "
              f"CPU {100 * base_cpu:.3f} %")  # fmt: skip
        print()
        print("peers | tunnel | RSS MB | ×baseline | CPU % core | ≤40 MB, <1 %")
        for runs, _ in rows:
            for r in runs:
                if r["mode"] == "upkeep":
                    continue
                ok = r["rss_bytes"] <= 40 * 2**20 and r["cpu_ratio"] < 0.01
                print(
                    f"{r['peers']:>5} | {'wg0' if r['mode'] == 'tunnel' else 'no':>6} | "
                    f"{r['rss_bytes'] / 2**20:6.1f} | {r['rss_bytes'] / base_rss:9.2f} | "
                    f"{100 * r['cpu_ratio']:10.2f} | {'met' if ok else 'NOT met'}"
                )
        print()
        print("probe kB per peer per hour, idle link, production intervals:")
        print("peers | (a) upkeep+watch | (b) daily search | (c) RTT/loss | (d) hellos | "
              "  total | (a) < 20 kB")  # fmt: skip
        for runs, f in rows:
            ok = f["a"] < GOAL_UPKEEP_BYTES
            print(
                f"{runs[0]['peers']:>5} | {kb(f['a'], 2):>16} | {kb(f['b'], 2):>16} | "
                f"{kb(f['c'], 2):>12} | {kb(f['d'], 2):>10} | {kb(f['total'], 2):>7} | "
                f"{'met' if ok else 'NOT met'}"
            )
        last = rows[-1][1]
        print(
            f"(intervals {INTERVALS}, full search every {FULL_SEARCH_S:g} s; path MTU {PATH_MTU} "
            f"under a {LINK_MTU} link: an upkeep probes {PATH_MTU} and {PATH_MTU + 1}; "
            f"(a) = bytes per upkeep round × 3600/{INTERVALS['pmtu_s']}, rounds measured at "
            f"pmtu_s {args.upkeep_pmtu:g}; after a new value the fragment check adds "
            f"{last['fragment_check_bytes']:.0f} B once; per node, not per peer: the NAT "
            f"measurement, {kb(last['nat_bytes'] * 3600 / INTERVALS['nat_s'])} kB per hour; "
            "a peer that gets our hello also runs a reverse search towards us: (b) again on "
            "that link)"
        )
        if not tunnel_ok:
            print("(no wireguard-go, or --no-tunnel: the runs with a real interface were skipped)")
        print(f"(run time {time.monotonic() - began:.0f} s)")
    finally:
        subprocess.run(["ip", "link", "del", LINK[0]], capture_output=True)
        if args.keep:
            print(f"(state dirs and agent logs kept in {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

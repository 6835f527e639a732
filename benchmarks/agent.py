"""An idle `fleetvpn agent run` with 1, 10 and 50 peers: memory, CPU, and probe traffic per peer.

Goal (issue 5): at most 40 MB RSS and under 1 % of a core when idle.

Setup, all inside a private network namespace with only loopback (the benchmark re-runs itself
under ``unshare --net``; needs root; nothing touches the host's network):
- a stand-in controller (the standard library's HTTP server, in this process) that enrolls the
  agent and serves a desired state with N peers;
- one stand-in peer responder on 127.0.0.2 (fleetvpn.net.responder, counting every byte) that
  every peer's probe traffic goes to: PMTU probes (the peers' endpoints), RTT probes (their
  tunnel addresses), NAT measurement, "probe me back" hellos;
- the agent itself, with the production intervals (report/desired/RTT 30 s, PMTU 600 s,
  NAT 3600 s) and ``apply: false`` (no tunnel to build; ``wg show`` still runs every sample).

Measured: RSS (VmRSS) and CPU (utime + stime from /proc) over a window after start-up (all the
start-up PMTU runs done), the probe bytes of the start-up runs and of the window, and from those
the probe bytes per peer per hour at the configured intervals. The baseline, measured in the same
run: a bare Python process idling in asyncio (the floor any Python agent pays).

    sudo .venv/bin/python benchmarks/agent.py [--window 60] [--peers 1,10,50]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

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


class CountingResponder(Responder):
    """The real responder, counting IP bytes (payload + 28) per message kind, both ways."""

    def __init__(self, key: wire.KeyLike) -> None:
        super().__init__(key)
        self.bytes: dict[str, int] = {}
        self.pmtu_sources: set[tuple[str, int]] = set()

    def _count(self, kind: str, size: int) -> None:
        self.bytes[kind] = self.bytes.get(kind, 0) + size + 28

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            body = wire.decode(data, self.key).body
            kind = type(body).__name__
            if isinstance(body, wire.PmtuProbe) and len(data) > 200:
                self.pmtu_sources.add(addr)  # a PMTU run (RTT probes are 100 bytes)
                kind = "PmtuRun"
        except wire.WireError:
            kind = "junk"
        self._count(kind, len(data))
        super().datagram_received(data, addr)

    def _send(self, transport: Any, body: wire.Body, addr: tuple[str, int], key: bytes) -> None:
        if transport is not None and not transport.is_closing():
            packet = self.sealer.seal(body, time.time(), key=key)
            self._count("reply:" + type(body).__name__, len(packet))
            transport.sendto(packet, addr)


def tunnel_ip(i: int) -> str:
    return f"10.99.{1 + i // 250}.{1 + i % 250}/32"


def fake_controller(peers: int, tunnel: bool) -> ThreadingHTTPServer:
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
                doc = {"node": "bench", "site": "lab", "node_token": "fvn_bench"}
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


def run_agent(peers: int, work: Path, responder: CountingResponder, window_s: float,
              warmup_s: float, tunnel: bool) -> dict[str, Any]:  # fmt: skip
    """One agent with ``peers`` peers. ``tunnel``: ``apply: true``, a real wireguard-go
    interface with every peer (none of them answers: their RTT probes go nowhere), so the idle
    cost includes reading and reconciling a real tunnel; else ``apply: false`` and every peer's
    tunnel address is the stand-in responder, so RTT traffic is real and counted."""
    server = fake_controller(peers, tunnel)
    name = f"{'t' if tunnel else 'm'}{peers}"
    state = work / f"state{name}"
    config = work / f"agent{name}.yml"
    (work / "enroll.token").write_text("bench\n")
    config.write_text(
        f"controller: http://127.0.0.1:{server.server_address[1]}\n"
        f"node: bench\nenrollment_token_file: {work}/enroll.token\n"
        f"interface: fvbench0\napply: {'true' if tunnel else 'false'}\nstate_dir: {state}\n"
        "log_level: warning\nwireguard: auto\n"
        f"probe: {{listen_port: {PROBE_PORT}, key_file: {work}/probe.key, "
        f"nat_responder: '{PEER_IP}:{PROBE_PORT}'}}\n"
        f"intervals: {json.dumps(INTERVALS)}\n"
        "tunnel_networks: [10.99.0.0/16]\n"
    )
    start_bytes = dict(responder.bytes)
    runs_before = len(responder.pmtu_sources)
    if not tunnel:  # every peer's tunnel address is local: the stand-in answers its RTT probes
        subprocess.run(["ip", "addr", "add", LOCAL_TUNNEL_ADDR, "dev", "lo"], check=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleetvpn", "agent", "run", "--config", str(config)],
        cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
        env={**os.environ, "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30 + peers
        while len(responder.pmtu_sources) - runs_before < peers:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.terminate()
                err = proc.communicate(timeout=10)[1].decode(errors="replace")
                raise RuntimeError(f"start-up PMTU runs not done; the agent said:\n{err}")
            time.sleep(0.5)
        time.sleep(warmup_s)
        startup_bytes = _delta(responder.bytes, start_bytes)
        cpu0, _ = proc_usage(proc.pid)
        window_start = dict(responder.bytes)
        t0 = time.monotonic()
        peak = 0
        while time.monotonic() - t0 < window_s:
            time.sleep(1.0)
            peak = max(peak, proc_usage(proc.pid)[1])
        cpu1, rss = proc_usage(proc.pid)
        elapsed = time.monotonic() - t0
        window_bytes = _delta(responder.bytes, window_start)
        wg_peers = 0
        if tunnel:
            dump = subprocess.run(["wg", "show", "fvbench0", "peers"], capture_output=True,
                                  text=True).stdout  # fmt: skip
            wg_peers = len(dump.split())
    finally:
        proc.terminate()
        proc.wait(10)
        server.shutdown()
        if tunnel:
            subprocess.run(["ip", "link", "del", "fvbench0"], capture_output=True)
        else:
            subprocess.run(["ip", "addr", "del", LOCAL_TUNNEL_ADDR, "dev", "lo"], check=True)
    pmtu_run = (startup_bytes.get("PmtuRun", 0) + startup_bytes.get("reply:PmtuAck", 0)) / peers
    rtt_probe_bytes = window_bytes.get("PmtuProbe", 0) + window_bytes.get("reply:PmtuAck", 0)
    rtt_rounds = elapsed / INTERVALS["rtt_s"]
    rtt_round = rtt_probe_bytes / peers / rtt_rounds if rtt_rounds else 0.0
    hello = (
        startup_bytes.get("BindingRequest", 0) + startup_bytes.get("reply:BindingReply", 0)
    ) / peers
    pmtu_per_hour = (pmtu_run + hello) * 3600 / INTERVALS["pmtu_s"]
    per_hour = pmtu_per_hour + rtt_round * 3600 / INTERVALS["rtt_s"]
    return {
        "peers": peers,
        "tunnel_peers": wg_peers,
        "rss_bytes": rss,
        "peak_rss_bytes": peak,
        "cpu_ratio": (cpu1 - cpu0) / elapsed,
        "pmtu_run_bytes": pmtu_run,
        "rtt_round_bytes_per_peer": rtt_round,
        "hello_bytes_per_peer": hello,
        "probe_bytes_per_peer_per_hour": per_hour,
        # a NATed peer also gets a reverse run from its public side per PMTU period
        "probe_bytes_per_nated_link_per_hour": per_hour + pmtu_run * 3600 / INTERVALS["pmtu_s"],
    }


def _delta(now: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in now.items()}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--window", type=float, default=60.0, help="idle window, seconds")
    parser.add_argument("--warmup", type=float, default=15.0, help="after the start-up runs")
    parser.add_argument("--peers", default="1,10,50")
    parser.add_argument("--no-tunnel", action="store_true", help="skip the runs with wg0")
    parser.add_argument("--keep", action="store_true", help="keep the agents' state dirs")
    args = parser.parse_args()
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
    work = Path(tempfile.mkdtemp(prefix="fvbench-"))
    keys.write_key(work / "probe.key")
    key = keys.load_key(work / "probe.key")
    loop = asyncio.new_event_loop()
    responder = CountingResponder(key)

    async def serve() -> None:
        import socket

        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((PEER_IP, PROBE_PORT))
        await loop.create_datagram_endpoint(lambda: responder, sock=sock)
        other, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, local_addr=(PEER_IP, 0)
        )
        responder.other = other
        # Each peer's tunnel address gets a stand-in of its own (the same counters): bound to
        # that address, so it wins over the agent's own responder on the wildcard address.
        # IP_FREEBIND: the addresses are local only during the runs without a tunnel.
        for i in range(max(int(n) for n in args.peers.split(","))):
            side = CountingResponder(key)
            side.bytes, side.pmtu_sources = responder.bytes, responder.pmtu_sources
            bound = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            bound.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
            bound.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # beside the agent's
            bound.bind((tunnel_ip(i).split("/")[0], PROBE_PORT))
            await loop.create_datagram_endpoint(lambda side=side: side, sock=bound)  # type: ignore[misc]

    loop.run_until_complete(serve())
    threading.Thread(target=loop.run_forever, daemon=True).start()

    tunnel_ok = shutil.which("wireguard-go") is not None and not args.no_tunnel
    base: list[tuple[float, int]] = []
    base_thread = threading.Thread(target=lambda: base.append(baseline(args.window)))
    base_thread.start()
    rows: list[tuple[dict[str, Any], dict[str, Any] | None]] = []
    for n in (int(x) for x in args.peers.split(",")):
        measured = run_agent(n, work, responder, args.window, args.warmup, tunnel=False)
        live = None
        if tunnel_ok:
            live = run_agent(n, work, responder, args.window, args.warmup, tunnel=True)
        rows.append((measured, live))
        for r, label in ((measured, "apply: false"), (live, "wg0")):
            if r is None:
                continue
            if r["tunnel_peers"]:
                label = f"wg0 with {r['tunnel_peers']} peers"
            rss, peak = r["rss_bytes"] / 2**20, r["peak_rss_bytes"] / 2**20
            print(
                f"{n:>3} peers, {label:<19}: RSS {rss:5.1f} MB (peak {peak:.1f}), "
                f"CPU {100 * r['cpu_ratio']:.2f} % of a core (agent + its wg/ip commands)",
                flush=True,
            )
        print(
            f"{n:>3} peers: PMTU run {measured['pmtu_run_bytes'] / 1000:.1f} kB, "
            f"RTT round {measured['rtt_round_bytes_per_peer']:.0f} B/peer, "
            f"hello (+NAT binding) {measured['hello_bytes_per_peer']:.0f} B/peer; probe traffic "
            f"{measured['probe_bytes_per_peer_per_hour'] / 1000:.0f} kB per peer per hour",
            flush=True,
        )
    base_thread.join()
    base_cpu, base_rss = base[0]
    print(f"baseline (bare python + asyncio, idle): RSS {base_rss / 2**20:.1f} MB, "
          f"CPU {100 * base_cpu:.3f} %")  # fmt: skip
    print()
    print("peers | tunnel | RSS MB | ×baseline | CPU % core | probe kB/peer/h | ≤40 MB, <1 %")
    for measured, live in rows:
        for r, label in ((measured, "no"), (live, "wg0")):
            if r is None:
                continue
            ok = r["rss_bytes"] <= 40 * 2**20 and r["cpu_ratio"] < 0.01
            print(
                f"{r['peers']:>5} | {label:>6} | {r['rss_bytes'] / 2**20:6.1f} | "
                f"{r['rss_bytes'] / base_rss:9.2f} | {100 * r['cpu_ratio']:10.2f} | "
                f"{measured['probe_bytes_per_peer_per_hour'] / 1000:15.0f} | "
                f"{'met' if ok else 'NOT met'}"
            )
    last = rows[-1][0]
    print(
        f"(intervals {INTERVALS}; "
        f"a PMTU run with its acks: {last['pmtu_run_bytes'] / 1000:.1f} kB; "
        "a link with a NATed end also carries the reverse run: "
        f"{last['probe_bytes_per_nated_link_per_hour'] / 1000:.0f} kB per hour both ways; "
        "not counted: a full-size probe through the tunnel every 4th RTT round, ~1.5 kB)"
    )
    if not tunnel_ok:
        print("(no wireguard-go, or --no-tunnel: the runs with a real interface were skipped)")
    if args.keep:
        print(f"(state dirs kept in {work})")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

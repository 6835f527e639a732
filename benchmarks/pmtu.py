"""Path-MTU discovery on black-holed lab paths: tinc 1.0.36 (the baseline) against fleetvpn.

    .venv/bin/python benchmarks/pmtu.py [--runs N] [--sizes 1450,1400,1350,1300,1280]

Needs root and tinc (`scripts/install-deps`). Builds its own lab `fvpmtu` from a topology written
to a temp dir: a public hub site (uplink 1500) and one public site per size, whose uplink MTU is
that size and whose routers drop the ICMP "fragmentation needed" about it. Each site host finds
the path MTU towards the hub (one direction: site -> hub), once per run with each tool. The lab,
the daemons and the temp dir are removed at the end, also on Ctrl-C.

tinc: one daemon pair per site (hub side and site side), started fresh every run, defaults kept
for everything PMTU touches (see TINC_CONFIG). A run's tinc pairs go in parallel (tinc idles
between its 1 s probe rounds); each pair starts in its own wall-clock second because tinc seeds
rand() with the time, and pairs started together would draw the same probe sizes. fleetvpn runs
after them, one site at a time, against one responder on the hub.

Figures per run and tool:
  search s  first probe -> final value (tinc: its first "Sending MTU probe" log line; fleetvpn:
            `elapsed_s` of `fleetvpn probe pmtu --json`)
  wall s    process start -> final value (tinc: the site daemon's first log line; fleetvpn: the
            prober's exec, Python start-up included, to its exit)
  found     the value found / the best value possible on this path, in the tool's own unit
  probes    probes the site sent (tinc: its "Sending MTU probe" lines before the fix)
  bytes     IP bytes of the UDP the site host sent to the peer's port until the final value, from
            an nftables counter in the site host. tinc's include its echoes of the hub's own
            probes (about a tenth of the bytes here): tinc 1.0 always searches from both ends,
            and requests and echoes look alike on the wire (encrypted).

tinc's MTU and the IP path MTU: tinc's MTU m is the length of the Ethernet frame it tunnels (the
14-byte header included). On the wire (legacy protocol, 1.0.36's defaults: AES-256-CBC, HMAC-SHA256
cut to MACLength 4, no compression) a frame becomes UDP payload = CBC(4-byte seqno + frame)
padded to the next multiple of 16 (PKCS#7 always adds 1..16) + 4-byte MAC, so the IP packet is
    20 + 8 + 16 * floor((m + 4) / 16) + 16 + 4 = 48 + 16 * floor((m + 4) / 16)
and the best tinc can find on a path of P bytes is m = 16 * floor((P - 48) / 16) + 11. Checked on
a 1400-byte path: probes of 1354 came back, 1356 vanished (best 1355). The script checks from
tinc's ANS_KEY log line that the cipher, digest and MAC length are these.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from subprocess import Popen
from typing import IO

import yaml

FLEETVPN = str(Path(sys.executable).with_name("fleetvpn"))
LAB = "fvpmtu"
HUB = "hub"
DEFAULT_SIZES = (1450, 1400, 1350, 1300, 1280)
TINC_BASE_PORT = 6655  # one port per site's pair: all hub-side daemons share the hub host
PROBE_PORT = 7655
TINC_FIX_TIMEOUT_S = 120.0
READY_TIMEOUT_S = 10.0
TINC_CONFIG = (
    "Mode = switch, UDP (TCPOnly = no), PMTUDiscovery = yes, ClampMSS = yes, PingInterval = 60, "
    "PingTimeout = 5, Cipher aes-256-cbc, Digest sha256, MACLength 4 (all tinc 1.0.36 defaults)"
)
# ANS_KEY ends with: cipher NID, digest NID, MAC length, compression (aes-256-cbc, sha256, 4, 0).
TINC_KEY_PARAMS = "427 672 4 0"

TINC_SENT = re.compile(r"^Sending MTU probe length (\d+) to hub ")
TINC_FIXED = re.compile(r"^Fixing MTU of hub \(.*\) to (\d+) after \d+ probes")
TINC_ANS_KEY = re.compile(r"^Got ANS_KEY from hub .* (\d+ \d+ \d+ \d+)$")

# Set before the lab goes down: no worker may start a process in it after that.
ABORT = threading.Event()


@dataclass(frozen=True)
class Measurement:
    search_s: float
    wall_s: float
    found: int | None  # None: no final value before the timeout
    best: int
    probes: int
    bytes_sent: int

    @property
    def exact(self) -> bool:
        return self.found == self.best


@dataclass(frozen=True)
class Lab:
    """The running lab: where its topology is and the hub's address."""

    topology: Path
    workdir: Path
    hub_ip: str
    name: str = LAB  # benchmarks/recovery.py runs tinc in a lab of another name

    def exec_argv(self, host: str, *command: str) -> list[str]:
        return [
            FLEETVPN,
            "lab",
            "exec",
            "-t",
            str(self.topology),
            "--name",
            self.name,
            host,
            "--",
            *command,
        ]

    def run(self, host: str, *command: str, stdin: str | None = None) -> str:
        argv = self.exec_argv(host, *command)
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=True)
        return done.stdout


def site_host(size: int) -> str:
    return f"s{size}"


def tinc_best_mtu(path_mtu: int) -> int:
    """The largest tinc MTU whose packets fit in ``path_mtu`` IP bytes (module docstring)."""
    return 16 * ((path_mtu - 48) // 16) + 11


# --- the lab -------------------------------------------------------------------------------------


def write_topology(workdir: Path, sizes: list[int]) -> Path:
    sites: dict[str, object] = {HUB: {"kind": "public", "hosts": [HUB]}}
    for size in sizes:
        sites[site_host(size)] = {
            "kind": "public",
            "uplink_mtu": size,
            "icmp_blackhole": True,
            "hosts": [site_host(size)],
        }
    path = workdir / "topology.yml"
    path.write_text(yaml.safe_dump({"name": LAB, "controller": HUB, "sites": sites}))
    return path


def lab_cli(topology: Path, *args: str) -> str:
    argv = [FLEETVPN, "lab", *args, "-t", str(topology), "--name", LAB]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


@contextmanager
def lab_up(sizes: list[int]) -> Iterator[Lab]:
    """Build the lab; always remove it, its processes and the temp dir afterwards."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{LAB}-"))
    topology = write_topology(workdir, sizes)
    try:
        lab_cli(topology, "down")  # a lab of this name left by an interrupted run
        lab_cli(topology, "up")
        hosts = json.loads(lab_cli(topology, "status", "--json"))["hosts"]
        hub_ip = next(h["lan_ipv4"] for h in hosts if h["host"] == HUB)
        yield Lab(topology, workdir, hub_ip)
    finally:
        ABORT.set()
        try:
            lab_cli(topology, "down")  # also ends every process left in the lab
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def background(argv: list[str], log: Path, ready: str) -> Iterator[Popen[str]]:
    """Run ``argv`` (stderr to ``log``) until the body ends, once ``ready`` shows up in the log."""
    with log.open("w") as out:
        proc = start(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while ready not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv[-1]} did not start: {log.read_text()[-500:]}")
            time.sleep(0.05)
        yield proc
    finally:
        stop(proc)


def start(argv: list[str], stdout: IO[str] | None = None, stderr: int | None = None) -> Popen[str]:
    if ABORT.is_set():
        raise RuntimeError("interrupted")
    return Popen(argv, stdout=stdout, stderr=stderr, text=True)


def stop(proc: Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def reset_counter(lab: Lab, host: str, port: int) -> None:
    """Count the UDP that ``host`` sends to the hub's ``port`` (IP bytes), from zero."""
    lab.run(
        host,
        "nft",
        "-f",
        "-",
        stdin=f"""table ip {LAB}
delete table ip {LAB}
table ip {LAB} {{
    counter sent {{ }}
    chain out {{
        type filter hook output priority 0; policy accept;
        ip daddr {lab.hub_ip} udp dport {port} counter name "sent"
    }}
}}
""",
    )


def read_counter(lab: Lab, host: str) -> int:
    doc = json.loads(lab.run(host, "nft", "-j", "list", "counter", "ip", LAB, "sent"))
    return next(int(o["counter"]["bytes"]) for o in doc["nftables"] if "counter" in o)


# --- tinc ----------------------------------------------------------------------------------------


def tinc_configure(lab: Lab, site: str, port: int) -> tuple[Path, Path]:
    """Config dirs of a hub/site daemon pair (own network, port and tap), RSA keys included."""
    base = lab.workdir / f"tinc-{site}"
    hub_dir, site_dir = base / HUB, base / site
    for name, conf_dir, extra in (
        (HUB, hub_dir, f"Address = {lab.hub_ip} {port}\n"),
        (site, site_dir, ""),
    ):
        (conf_dir / "hosts").mkdir(parents=True)
        connect = f"ConnectTo = {HUB}\n" if name == site else ""
        (conf_dir / "tinc.conf").write_text(
            f"Name = {name}\nMode = switch\nInterface = t{site}\nPort = {port}\n"
            f"AddressFamily = ipv4\n{connect}"
        )
        (conf_dir / "hosts" / name).write_text(f"{extra}Port = {port}\n")
        subprocess.run(
            ["tincd", "-c", str(conf_dir), "-K", "2048"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=True,
        )
    shutil.copy(hub_dir / "hosts" / HUB, site_dir / "hosts" / HUB)
    shutil.copy(site_dir / "hosts" / site, hub_dir / "hosts" / site)
    return hub_dir, site_dir


def tincd_argv(lab: Lab, host: str, conf_dir: Path, debug_level: int = 5) -> list[str]:
    pidfile = str(conf_dir / "tinc.pid")
    debug = f"-d{debug_level}"
    return lab.exec_argv(host, "tincd", "-D", debug, "-c", str(conf_dir), "--pidfile", pidfile)


def run_tinc(lab: Lab, size: int, pair: tuple[Path, Path], port: int) -> Measurement:
    """One tinc search from the site towards the hub, both daemons fresh."""
    site = site_host(size)
    hub_dir, site_dir = pair
    reset_counter(lab, site, port)
    with background(tincd_argv(lab, HUB, hub_dir), hub_dir / "tincd.log", "Ready"):
        proc = start(tincd_argv(lab, site, site_dir), stderr=subprocess.PIPE)
        watchdog = threading.Timer(TINC_FIX_TIMEOUT_S, proc.kill)
        watchdog.start()
        try:
            measurement = watch_tinc_log(proc, size)
        finally:
            watchdog.cancel()
            stop(proc)
    return replace(measurement, bytes_sent=read_counter(lab, site))


def watch_tinc_log(proc: Popen[str], size: int) -> Measurement:
    """Read the site daemon's log until it fixes the hub's MTU (or dies)."""
    assert proc.stderr is not None
    started = first_probe = None
    probes = 0
    found: int | None = None
    for line in proc.stderr:
        now = time.monotonic()
        started = started or now
        if m := TINC_ANS_KEY.match(line):
            check_tinc_cipher(m.group(1))
        elif TINC_SENT.match(line):
            first_probe = first_probe or now
            probes += 1
        elif m := TINC_FIXED.match(line):
            found = int(m.group(1))
            break
    end = time.monotonic()
    return Measurement(
        search_s=end - (first_probe or end),
        wall_s=end - (started or end),
        found=found,
        best=tinc_best_mtu(size),
        probes=probes,
        bytes_sent=0,  # filled in from the nftables counter
    )


def check_tinc_cipher(params: str) -> None:
    if params != TINC_KEY_PARAMS:
        raise RuntimeError(
            f"tinc negotiated cipher/digest/MAC/compression {params}, not {TINC_KEY_PARAMS}: "
            "the MTU mapping in benchmarks/pmtu.py no longer holds"
        )


def tinc_round(
    lab: Lab, sizes: list[int], pairs: dict[int, tuple[Path, Path]]
) -> dict[int, Measurement]:
    """One tinc run on every site at once, each pair started in its own wall-clock second."""
    pool = ThreadPoolExecutor(max_workers=len(sizes))
    try:
        futures: dict[int, Future[Measurement]] = {}
        for i, size in enumerate(sizes):
            time.sleep(1.05 - time.time() % 1)  # tinc seeds rand() with time(NULL)
            futures[size] = pool.submit(run_tinc, lab, size, pairs[size], TINC_BASE_PORT + i)
        return {size: f.result() for size, f in futures.items()}
    finally:
        # On Ctrl-C don't wait here for daemons still searching: `lab down` ends them.
        pool.shutdown(wait=False, cancel_futures=True)


# --- fleetvpn ------------------------------------------------------------------------------------


def fleetvpn_available() -> bool:
    argv = [FLEETVPN, "probe", "pmtu", "--help"]
    return subprocess.run(argv, capture_output=True).returncode == 0


def write_probe_key(lab: Lab) -> Path:
    key_file = lab.workdir / "probe.key"
    key = subprocess.run([FLEETVPN, "probe", "genkey"], capture_output=True, text=True, check=True)
    key_file.write_text(key.stdout)
    key_file.chmod(0o600)
    return key_file


def run_fleetvpn(lab: Lab, size: int, key_file: Path) -> Measurement:
    """One `fleetvpn probe pmtu` from the site host to the hub's responder."""
    site = site_host(size)
    reset_counter(lab, site, PROBE_PORT)
    # The shell stamps the wall clock just before it execs the prober: Python start-up counts.
    argv = lab.exec_argv(
        site,
        "sh",
        "-c",
        'date +%s.%N >&2; exec "$@"',
        "sh",
        FLEETVPN,
        "probe",
        "pmtu",
        f"{lab.hub_ip}:{PROBE_PORT}",
        "--key-file",
        str(key_file),
        "--json",
    )
    done = subprocess.run(argv, capture_output=True, text=True)
    end = time.time()
    if done.returncode != 0:
        error = done.stderr.partition("\n")[2].strip()  # after the shell's time stamp
        raise RuntimeError(f"fleetvpn probe pmtu failed on {site}: {error}")
    report = json.loads(done.stdout)
    return Measurement(
        search_s=float(report["elapsed_s"]),
        wall_s=end - float(done.stderr.split()[0]),
        found=report["path_mtu"],
        best=size,
        probes=int(report["probes_sent"]),
        bytes_sent=read_counter(lab, site),
    )


def fleetvpn_round(lab: Lab, sizes: list[int], key_file: Path) -> dict[int, Measurement]:
    """One fleetvpn run on every site, one at a time, against a fresh responder on the hub."""
    listen = f"{lab.hub_ip}:{PROBE_PORT}"
    argv = lab.exec_argv(
        HUB, FLEETVPN, "probe", "responder", "--listen", listen, "--key-file", str(key_file)
    )
    with background(argv, lab.workdir / "responder.log", "responder on"):
        return {size: run_fleetvpn(lab, size, key_file) for size in sizes}


# --- output --------------------------------------------------------------------------------------

Results = dict[str, dict[int, list[Measurement]]]  # tool -> size -> runs


def row(run: int, tool: str, m: Measurement) -> str:
    found = "none" if m.found is None else str(m.found)
    return (
        f"  {run:>3}  {tool:9} {m.search_s:9.2f} {m.wall_s:7.2f}  {found + '/' + str(m.best):>10}"
        f"  {'yes' if m.exact else 'NO':5} {m.probes:6} {m.bytes_sent:9,}"
    )


def comparison(tinc: list[Measurement], fleet: list[Measurement]) -> str:
    """Exact counts and median ratios, tinc (the baseline) over fleetvpn."""

    def ratio(attr: str) -> float:
        base = float(statistics.median(getattr(m, attr) for m in tinc))
        return base / max(float(statistics.median(getattr(m, attr) for m in fleet)), 1e-9)

    return (
        f"exact: tinc {sum(m.exact for m in tinc)}/{len(tinc)}, "
        f"fleetvpn {sum(m.exact for m in fleet)}/{len(fleet)}; "
        f"fleetvpn is {ratio('search_s'):.0f}x faster (search, medians), "
        f"{ratio('wall_s'):.0f}x (wall); sends {ratio('bytes_sent'):.1f}x fewer bytes"
    )


def report(results: Results, sizes: list[int], hub_ip: str) -> None:
    tools = [t for t in ("tinc", "fleetvpn") if any(results[t].values())]
    print(f"\nPath MTU, one direction: site host -> hub {hub_ip} (IPv4), ICMP black-holed")
    print(f"tinc 1.0.36 (the baseline), a fresh daemon pair per run: {TINC_CONFIG}")
    print("fleetvpn: `fleetvpn probe pmtu --json` (defaults) -> `fleetvpn probe responder` on hub")
    print("search s: first probe -> final value; wall s: process start -> final value")
    print("found/best: tinc's MTU (frame bytes, best = 16*floor((P-48)/16)+11 on a P-byte path),")
    print("  fleetvpn's path MTU (IP bytes, best = P)")
    print("bytes sent: IP bytes of the site's UDP to the peer (nftables counter; tinc's include")
    print("  its echoes of the hub's own probes, about a tenth)")
    for size in sizes:
        print(f"\nbottleneck {size} (site {site_host(size)})")
        print("  run  tool       search s  wall s  found/best  exact probes bytes sent")
        for run in range(len(results["tinc"][size])):
            for tool in tools:
                print(row(run + 1, tool, results[tool][size][run]))
        if len(tools) == 2:
            print("  " + comparison(results["tinc"][size], results["fleetvpn"][size]))
    if len(tools) == 2:
        pooled = {t: [m for s in sizes for m in results[t][s]] for t in tools}
        print("\nall sizes: " + comparison(pooled["tinc"], pooled["fleetvpn"]))
    else:
        print("\nfleetvpn: `fleetvpn probe pmtu` is not available; tinc baseline only")


# --- main ----------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per size and tool (default 3)")
    parser.add_argument(
        "--sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=list(DEFAULT_SIZES),
        help="bottleneck MTUs, comma-separated (default %(default)s)",
    )
    return parser.parse_args()


def benchmark(lab: Lab, sizes: list[int], runs: int) -> Results:
    results: Results = {"tinc": {s: [] for s in sizes}, "fleetvpn": {s: [] for s in sizes}}
    pairs = {s: tinc_configure(lab, site_host(s), TINC_BASE_PORT + i) for i, s in enumerate(sizes)}
    key_file = write_probe_key(lab) if fleetvpn_available() else None
    for run in range(1, runs + 1):
        print(f"run {run}/{runs}: tinc on {len(sizes)} sites in parallel (~30 s)", file=sys.stderr)
        for size, m in tinc_round(lab, sizes, pairs).items():
            results["tinc"][size].append(m)
        if key_file is None:
            continue
        print(f"run {run}/{runs}: fleetvpn, one site at a time", file=sys.stderr)
        for size, m in fleetvpn_round(lab, sizes, key_file).items():
            results["fleetvpn"][size].append(m)
    return results


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("benchmarks/pmtu.py needs root (it builds network namespaces)")
    if shutil.which("tincd") is None:
        sys.exit("benchmarks/pmtu.py needs tinc 1.0 (tincd): run scripts/install-deps")
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up as on Ctrl-C
    try:
        with lab_up(args.sizes) as lab:
            results = benchmark(lab, args.sizes, args.runs)
            report(results, args.sizes, lab.hub_ip)
    except subprocess.CalledProcessError as e:
        sys.exit(f"benchmarks/pmtu.py: {' '.join(e.cmd)} failed: {e.stderr}")
    except RuntimeError as e:
        sys.exit(f"benchmarks/pmtu.py: {e}")
    except KeyboardInterrupt:
        sys.exit(f"benchmarks/pmtu.py: interrupted; lab {LAB} removed")


if __name__ == "__main__":
    main()

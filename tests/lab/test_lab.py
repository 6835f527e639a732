"""The default lab, built for real: verified, explored, broken and repaired, then removed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from fleetvpn.lab.build import LabPaths, LabState, lab_namespaces

from . import wgutil
from .conftest import DEFAULT_TOPOLOGY, REPO, LabHandle, verify_json


def test_verify_passes_on_the_default_lab(default_lab: LabHandle) -> None:
    doc = verify_json("-t", str(DEFAULT_TOPOLOGY), "--name", default_lab.name)
    bad = [c for c in doc["checks"] if not c["ok"]]  # type: ignore[union-attr]
    assert doc["exit"] == 0 and doc["ok"] is True, bad
    names = {(c["site"], c["check"]) for c in doc["checks"]}  # type: ignore[union-attr]
    # Every kind of promise is checked, per site.
    assert ("branch", "path MTU out, ipv4") in names
    assert ("cloud", "path MTU in, ipv6") in names
    assert ("branch", "NAT: established UDP timer") in names
    assert ("home", "carrier NAT: established UDP timer") in names
    assert ("office", "unsolicited UDP, ipv6") in names
    assert sum(c["check"].startswith("sshd on") for c in doc["checks"]) == 7  # type: ignore[union-attr]
    branch = next(
        c for c in doc["checks"] if c["check"] == "path MTU out, ipv4" and c["site"] == "branch"
    )  # type: ignore[union-attr]
    assert branch["observed"] == "1400 passes, 1401 dropped silently"
    home = next(
        c for c in doc["checks"] if c["check"] == "path MTU out, ipv4" and c["site"] == "home"
    )  # type: ignore[union-attr]
    assert home["observed"] == "1492 passes, 1493 ICMP says 1492"


def test_every_host_is_its_own_machine(default_lab: LabHandle) -> None:
    branch1, hub = default_lab.lab.host_ns("branch1"), default_lab.lab.host_ns("hub")
    marker = f"fvtest-{os.getpid()}"
    wgutil.sh(branch1, f"echo {marker} > /etc/wireguard/marker; touch /run/wireguard/marker")
    assert wgutil.sh(branch1, "cat /etc/wireguard/marker") == marker
    assert (
        wgutil.sh(hub, "ls /etc/wireguard /run/wireguard /etc/fleetvpn /var/lib/fleetvpn").count(
            "marker"
        )
        == 0
    )
    assert not Path("/etc/wireguard/marker").exists()
    assert not Path("/run/wireguard/marker").exists()
    assert wgutil.sh(branch1, "hostname") == "branch1"
    assert "eth0" in wgutil.sh(branch1, "ls /sys/class/net")  # its own sysfs view
    wgutil.sh(branch1, "rm /etc/wireguard/marker /run/wireguard/marker")


def test_exec_runs_inside_a_host_and_a_box(default_lab: LabHandle) -> None:
    out = default_lab.cli("exec", "branch1", "--", "ip", "-o", "-4", "addr", "show", "eth0").stdout
    assert "10.2.0.10/24" in out
    out = default_lab.cli("exec", "branch-r", "--", "nft", "list", "ruleset").stdout
    assert "masquerade" in out
    bad = default_lab.cli("exec", "nosuch", "--", "true", check=False)
    assert bad.returncode != 0 and "no lab host or box 'nosuch'" in bad.stderr


def test_inventory_reaches_hosts_over_the_management_network(default_lab: LabHandle) -> None:
    import yaml

    inventory = REPO / f"inventories/lab/hosts-{default_lab.name}.yml"
    doc = yaml.safe_load(inventory.read_text())
    hosts = doc["all"]["hosts"]
    assert set(hosts) == set(default_lab.plan.hosts)
    assert hosts["branch1"]["ansible_host"] == default_lab.plan.hosts["branch1"].mgmt_ip
    assert doc["all"]["vars"]["ansible_connection"] == "paramiko"
    assert set(doc["all"]["children"]["controllers"]["hosts"]) == {"controller"}
    # The proxy command in the inventory really carries SSH to a host's sshd.
    cmd = doc["all"]["vars"]["ansible_paramiko_proxy_command"]
    cmd = cmd.replace("%h", hosts["hub"]["ansible_host"]).replace("%p", "22")
    banner = subprocess.run(cmd, shell=True, input=b"", capture_output=True, timeout=10).stdout
    assert banner.startswith(b"SSH-2.0-OpenSSH")


def test_wireguard_stalls_at_1420_and_flows_at_the_right_mtu(default_lab: LabHandle) -> None:
    """The mailing-list failure, reproduced: a 1400-byte path with its ICMP eaten."""
    plan, lab = default_lab.plan, default_lab.lab
    branch = wgutil.WgEnd(
        lab.host_ns("branch1"),
        plan.hosts["branch1"].ns,
        "10.99.0.1",
        plan.hosts["branch1"].public_ipv4,
    )
    hub = wgutil.WgEnd(
        lab.host_ns("hub"), plan.hosts["hub"].ns, "10.99.0.2", plan.hosts["hub"].ipv4
    )
    try:
        for end in (branch, hub):
            wgutil.start(end, mtu=1420)
        wgutil.connect(branch, hub, keepalive=1)
        wgutil.wait_handshake(branch)
        size = 4_000_000
        out = wgutil.tcp_transfer(branch.netns_name, hub.netns_name, hub.tunnel_ip, size, 4, 5301)
        back = wgutil.tcp_transfer(
            hub.netns_name, branch.netns_name, branch.tunnel_ip, size, 4, 5302
        )
        # The handshake's small packets pass (connected), the full-size segments vanish.
        assert out[0] and back[0]
        assert out[1] < size // 20 and back[1] < size // 20, (out, back)
        for end in (branch, hub):
            wgutil.set_mtu(end, 1400 - 60)  # path MTU − WireGuard's IPv4 overhead
        out = wgutil.tcp_transfer(branch.netns_name, hub.netns_name, hub.tunnel_ip, size, 20, 5303)
        assert out == (True, size)
        # The same through the CLI users get: the tunnel address found on wg0, exit 0 when whole.
        back = default_lab.cli("transfer", "hub", "branch1", "--json", "--timeout", "20")
        assert json.loads(back.stdout) | {"elapsed_s": 0} == {
            "src": "hub", "dst": "branch1", "address": branch.tunnel_ip, "bytes": 4 << 20,
            "received_bytes": 4 << 20, "connected": True, "complete": True, "elapsed_s": 0,
        }  # fmt: skip
        for end in (branch, hub):
            wgutil.set_mtu(end, 1420)
        stalled = default_lab.cli("transfer", "branch1", "hub", "--timeout", "3", check=False)
        assert stalled.returncode == 1 and "STALLED" in stalled.stdout, stalled.stdout
    finally:
        for end in (branch, hub):
            wgutil.stop(end)


def test_set_changes_a_sites_nat_timer_live(default_lab: LabHandle) -> None:
    from fleetvpn.lab import netns

    key = "/proc/sys/net/netfilter/nf_conntrack_udp_timeout_stream"
    box = default_lab.name + "-branch-r"

    def timer() -> str:
        with netns.entered(box), open(key) as f:
            return f.read().strip()

    assert timer() == "20"
    try:
        out = default_lab.cli("set", "branch", "--nat-timeout", "12")
        assert "12s" in out.stdout and timer() == "12"
    finally:
        default_lab.cli("set", "branch", "--nat-timeout", "20")
    assert timer() == "20"
    public = default_lab.cli("set", "hub", "--nat-timeout", "12", check=False)
    assert public.returncode == 1 and "'hub' has no NAT or firewall" in public.stderr


def test_up_is_idempotent_and_repairs_a_half_built_lab(default_lab: LabHandle) -> None:
    state = LabState.load(LabPaths(default_lab.name).state_file)
    pids = dict(state.sshd)
    default_lab.cli("up")  # nothing to do: same sshd processes, no errors
    assert LabState.load(LabPaths(default_lab.name).state_file).sshd == pids

    # Break it: a router gone (its hosts lose their LAN), an sshd killed.
    subprocess.run(["ip", "netns", "del", f"{default_lab.name}-branch-r"], check=True)
    os.kill(pids["hub"], signal.SIGKILL)
    assert f"{default_lab.name}-branch-r" not in lab_namespaces(default_lab.name)
    assert default_lab.cli("status", check=False).returncode == 1

    default_lab.cli("up")
    assert default_lab.cli("status").returncode == 0
    doc = verify_json("-t", str(DEFAULT_TOPOLOGY), "--name", default_lab.name, "--no-timeouts")
    assert doc["exit"] == 0, [c for c in doc["checks"] if not c["ok"]]  # type: ignore[union-attr]


def test_zz_down_removes_everything(default_lab: LabHandle) -> None:
    from fleetvpn.lab import netns

    name = default_lab.name
    paths = LabPaths(name)
    # A process left running in a host (as a crashed test or agent would leave it).
    leftover = subprocess.Popen([*default_lab.lab.host_ns("branch1").prefix(), "sleep", "600"])
    inodes = {netns.inode(ns) for ns in lab_namespaces(name)} - {None}
    deadline = time.monotonic() + 10  # nsenter enters the namespaces after Popen returns
    while _net_inode(leftover.pid) not in inodes and time.monotonic() < deadline:
        time.sleep(0.05)
    inside = {(pid, _started(pid)) for pid in _pids() if _net_inode(pid) in inodes}
    assert (leftover.pid, _started(leftover.pid)) in inside
    default_lab.cli("down")
    leftover.wait(5)
    survivors = {(pid, _started(pid)) for pid in _live_pids()} & inside
    assert not survivors, [Path(f"/proc/{pid}/cmdline").read_bytes() for pid, _ in survivors]
    assert lab_namespaces(name) == []
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(paths.run_dir) not in mounts and f"/{name}-" not in mounts
    assert not paths.run_dir.exists() and not paths.state_dir.exists()
    assert not (REPO / f"inventories/lab/hosts-{name}.yml").exists()
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert not re.search(rf"fleetvpn-lab/{name}/", ps)


def _pids() -> set[int]:
    return {int(p) for p in os.listdir("/proc") if p.isdigit()}


def _live_pids() -> set[int]:
    """Zombies are gone for our purpose: this machine's PID 1 reaps them slowly."""
    live = set()
    for pid in _pids():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] != "Z":
            live.add(pid)
    return live


def _started(pid: int) -> int | None:
    """A process's start time (clock ticks since boot): with the pid, it names the process even
    when pids are reused."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _net_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None

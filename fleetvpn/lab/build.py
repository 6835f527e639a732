"""Build, repair, inspect and tear down a lab from its plan.

Contract:
- ``Lab.up()`` makes the machine match the plan. It is idempotent and repairs a half-built lab:
  every step first looks at what exists (namespaces, links, mounts, live sshd pids) and only
  adds what is missing; addresses, routes, rulesets and sysctls are (re)applied with replace
  semantics. Everything it creates is named ``<lab>-…`` or lives under ``/run/fleetvpn-lab/<lab>``
  and ``/var/lib/fleetvpn-lab/<lab>``; nothing is added to the root network namespace.
- ``Lab.down()`` removes exactly that: processes in the lab's namespaces (recorded pids first,
  then any other process found inside them, e.g. an agent Ansible started), the host mount/UTS
  namespaces, the network namespaces, the lab's directories and the inventory it wrote. It needs
  only the lab's name, so a lab whose topology file is gone can still be removed.
- Failures raise :class:`LabError` with a message that says what failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fleetvpn.lab import netns
from fleetvpn.lab.plan import Namespace, Plan
from fleetvpn.lab.topology import Topology
from fleetvpn.runner import NETNS_DIR, NsPath, Runner, netns_path

STATE_ROOT = Path("/var/lib/fleetvpn-lab")
RUN_ROOT = Path("/run/fleetvpn-lab")
# The paths that make a lab host look like its own machine (bind-mounted from the host's dir).
PRIVATE_DIRS = ("etc/wireguard", "etc/fleetvpn", "var/lib/fleetvpn")
REQUIRED_COMMANDS = ("ip", "nft", "nsenter", "unshare", "mount", "umount", "ssh-keygen")
SSHD = "/usr/sbin/sshd"


class LabError(RuntimeError):
    pass


@dataclass
class LabPaths:
    name: str
    state_root: Path = STATE_ROOT
    run_root: Path = RUN_ROOT

    @property
    def state_dir(self) -> Path:
        return self.state_root / self.name

    @property
    def run_dir(self) -> Path:
        return self.run_root / self.name

    @property
    def ns_dir(self) -> Path:
        """Holds the hosts' persistent mount and UTS namespaces (a private bind mount)."""
        return self.run_dir / "ns"

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def ssh_key(self) -> Path:
        return self.state_dir / "ssh" / "id_ed25519"

    def host_dir(self, host: str) -> Path:
        return self.state_dir / "hosts" / host

    def mount_ns(self, host: str) -> Path:
        return self.ns_dir / f"{host}.mnt"

    def uts_ns(self, host: str) -> Path:
        return self.ns_dir / f"{host}.uts"


@dataclass
class LabState:
    """What ``up`` created that ``down`` must remove, kept in ``state.json``."""

    topology: str = ""
    sshd: dict[str, int] = field(default_factory=dict)
    created_dirs: list[str] = field(default_factory=list)
    inventory: str | None = None

    @classmethod
    def load(cls, path: Path) -> LabState:
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError):
            return cls()
        return cls(
            topology=raw.get("topology", ""),
            sshd={k: int(v) for k, v in raw.get("sshd", {}).items()},
            created_dirs=list(raw.get("created_dirs", [])),
            inventory=raw.get("inventory"),
        )

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.__dict__, indent=2, sort_keys=True) + "\n")
        tmp.replace(path)


def lab_namespaces(name: str) -> list[str]:
    """Network namespaces that belong to lab ``name`` (its prefix is ``<name>-``)."""
    try:
        entries = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(e for e in entries if e.startswith(f"{name}-"))


def _is_mountpoint(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def _alive(pid: int, netns_inode: int | None) -> bool:
    """Is ``pid`` still the process we started (same network namespace)?"""
    try:
        link = os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return False
    return netns_inode is not None and link == f"net:[{netns_inode}]"


def processes_in(inodes: Iterable[int]) -> list[int]:
    """Pids of every process whose network namespace is one of ``inodes``."""
    wanted = {f"net:[{i}]" for i in inodes}
    me = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/net") in wanted:
                pids.append(int(entry))
        except OSError:
            continue
    return pids


class Lab:
    def __init__(
        self,
        plan: Plan,
        topo: Topology,
        runner: Runner | None = None,
        paths: LabPaths | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.plan = plan
        self.topo = topo
        self.run = runner or Runner()
        self.paths = paths or LabPaths(plan.lab)
        self.progress = progress or (lambda _msg: None)

    # --- up ------------------------------------------------------------------------------------

    def up(self, inventory: Path | None = None) -> LabState:
        _require_root_and_tools()
        state = LabState.load(self.paths.state_file)
        state.topology = self.topo.source
        self.progress("namespaces")
        self._namespaces()
        self.progress("links")
        self._links()
        self.progress("addresses and routes")
        for ns in self.plan.namespaces.values():
            self._configure(ns)
        self.progress("firewalls, NATs and timers")
        for ns in self.plan.namespaces.values():
            if ns.nft:
                self.run.run(["nft", "-f", "-"], ns=NsPath(net=netns_path(ns.name)), input=ns.nft)
            for key, value in ns.sysctls.items():
                if key.startswith("net/netfilter/"):
                    netns.write_sysctl(ns.name, key, value)
        self.progress("hosts (mount namespaces, sshd)")
        self._ssh_key()
        self._host_namespaces(state)
        self._sshds(state)
        if inventory is not None:
            write_inventory(self.plan, self.topo, self.paths, inventory)
            state.inventory = str(inventory)
        state.save(self.paths.state_file)  # before waiting: `down` must know the sshd pids
        self.progress("waiting for every host to reach the internet and its sshd")
        self._wait_for_paths()
        self._wait_for_sshd()
        return state

    def _wait_for_paths(self, timeout_s: float = 10.0) -> None:
        """Until every host's packets reach the core (IPv6 neighbour discovery on fresh links
        drops the first packets for up to a second), so that `up` returns a usable lab."""
        from fleetvpn.lab.plan import ANCHOR_V4, ANCHOR_V6

        anchors = {socket.AF_INET: str(ANCHOR_V4), socket.AF_INET6: str(ANCHOR_V6)}
        sinks = {}
        for fam, addr in anchors.items():
            sinks[fam] = netns.socket_in(self.plan.core, fam)
            sinks[fam].bind((addr, 0))
            sinks[fam].setblocking(False)
        pending = {
            (host, fam)
            for host, hp in self.plan.hosts.items()
            for fam in anchors
            if fam == socket.AF_INET or hp.ipv6
        }
        senders = {key: netns.socket_in(self.plan.hosts[key[0]].ns, key[1]) for key in pending}
        deadline = time.monotonic() + timeout_s
        try:
            while pending and time.monotonic() < deadline:
                for host, fam in pending:
                    sock = senders[(host, fam)]
                    sock.sendto(host.encode(), (anchors[fam], sinks[fam].getsockname()[1]))
                time.sleep(0.05)
                for fam, sink in sinks.items():
                    while True:
                        try:
                            pending.discard((sink.recv(64).decode(), fam))
                        except BlockingIOError:
                            break
        finally:
            for sock in [*senders.values(), *sinks.values()]:
                sock.close()
        if pending:
            where = ", ".join(
                sorted(f"{h} (IPv{6 if f == socket.AF_INET6 else 4})" for h, f in pending)
            )
            raise LabError(f"no path to the internet from {where}")

    def _namespaces(self) -> None:
        existing = set(lab_namespaces(self.plan.lab))
        missing = [n for n in self.plan.namespaces if n not in existing]
        if missing:
            self.run.run(["ip", "-batch", "-"], input="".join(f"netns add {n}\n" for n in missing))
        for ns in self.plan.namespaces.values():
            # No duplicate address detection: lab addresses are unique by construction, and
            # DAD would hold every IPv6 address "tentative" for a second or two.
            for key in ("net/ipv6/conf/all/accept_dad", "net/ipv6/conf/default/accept_dad"):
                netns.write_sysctl(ns.name, key, "0")
            for key, value in ns.sysctls.items():
                if not key.startswith("net/netfilter/"):
                    netns.write_sysctl(ns.name, key, value)

    def _existing_links(self, ns: str) -> set[str]:
        with netns.entered(ns):
            return {name for _, name in socket.if_nameindex()}

    def _links(self) -> None:
        present = {n: self._existing_links(n) for n in self.plan.namespaces}
        batches: dict[str, list[str]] = {}
        for ns in self.plan.namespaces.values():
            for iface in ns.ifaces:
                if iface.bridge and iface.name not in present[ns.name]:
                    batches.setdefault(ns.name, []).append(f"link add {iface.name} type bridge\n")
        for v in self.plan.veths:
            if v.a_if in present[v.a_ns]:
                continue
            if v.b_if in present[v.b_ns]:  # a stray half: remove it so the pair can be made
                self.run.run(["ip", "-n", v.b_ns, "link", "del", v.b_if], check=False)
            batches.setdefault(v.a_ns, []).append(
                f"link add {v.a_if} type veth peer name {v.b_if} netns {v.b_ns}\n"
            )
        for ns_name, lines in batches.items():
            self.run.run(["ip", "-n", ns_name, "-batch", "-"], input="".join(lines))

    def _configure(self, ns: Namespace) -> None:
        lines = ["link set dev lo up\n"]
        for iface in ns.ifaces:
            if iface.name != "lo":
                lines.append(f"link set dev {iface.name} mtu {iface.mtu}\n")
            if iface.master:
                lines.append(f"link set dev {iface.name} master {iface.master}\n")
            for cidr in iface.addresses:
                nodad = " nodad" if ":" in cidr else ""
                lines.append(f"addr replace {cidr} dev {iface.name}{nodad}\n")
            lines.append(f"link set dev {iface.name} up\n")
        for route in ns.routes:
            dst = route.dst
            if dst == "default":
                dst = "::/0" if ":" in route.via else "0.0.0.0/0"
            lines.append(f"route replace {dst} via {route.via}\n")
        self.run.run(["ip", "-n", ns.name, "-batch", "-"], input="".join(lines), quiet=True)

    def _ssh_key(self) -> None:
        key = self.paths.ssh_key
        if not key.exists():
            key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.run.run(
                [
                    "ssh-keygen",
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-C",
                    f"fleetvpn-lab-{self.plan.lab}",
                    "-f",
                    str(key),
                ]
            )
        auth = key.parent / "authorized_keys"
        auth.write_text(key.with_suffix(".pub").read_text())
        auth.chmod(0o600)

    def _host_namespaces(self, state: LabState) -> None:
        ns_dir = self.paths.ns_dir
        ns_dir.mkdir(parents=True, exist_ok=True)
        if not _is_mountpoint(ns_dir):
            # unshare(1) can only pin a namespace on a file under a private mount.
            self.run.run(["mount", "--bind", str(ns_dir), str(ns_dir)])
            self.run.run(["mount", "--make-private", str(ns_dir)])
        for d in PRIVATE_DIRS:
            mountpoint = Path("/") / d
            if not mountpoint.exists():
                mountpoint.mkdir(parents=True)
                if str(mountpoint) not in state.created_dirs:
                    state.created_dirs.append(str(mountpoint))
        for host, hp in self.plan.hosts.items():
            mnt, uts = self.paths.mount_ns(host), self.paths.uts_ns(host)
            if _is_mountpoint(mnt) and _is_mountpoint(uts):
                continue
            for f in (mnt, uts):
                if _is_mountpoint(f):
                    self.run.run(["umount", str(f)])
                f.touch()
            hdir = self.paths.host_dir(host)
            binds = []
            for d in PRIVATE_DIRS:
                (hdir / d).mkdir(parents=True, exist_ok=True)
                binds.append(f"mount --bind {hdir / d} /{d}")
            (hdir / "etc/wireguard").chmod(0o700)
            script = " && ".join(
                [
                    "mount -t tmpfs -o mode=0755 tmpfs /run",
                    "mkdir -p /run/sshd /run/wireguard /run/netns",
                    *binds,
                    # A sysfs mounted from inside the namespace shows this host's interfaces.
                    "umount -l /sys",
                    "mount -t sysfs sysfs /sys",
                    f"hostname {host}",
                ]
            )
            self.run.run(
                [
                    "unshare",
                    f"--mount={mnt}",
                    f"--uts={uts}",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    script,
                ],
                ns=NsPath(net=netns_path(hp.ns)),
            )

    def host_ns(self, host: str) -> NsPath:
        return NsPath(
            net=netns_path(self.plan.hosts[host].ns),
            mount=str(self.paths.mount_ns(host)),
            uts=str(self.paths.uts_ns(host)),
        )

    def _sshds(self, state: LabState) -> None:
        auth = self.paths.ssh_key.parent / "authorized_keys"
        for host, hp in self.plan.hosts.items():
            pid = state.sshd.get(host)
            if pid and _alive(pid, netns.inode(hp.ns)):
                continue
            hdir = self.paths.host_dir(host)
            hostkey = hdir / "ssh_host_ed25519_key"
            if not hostkey.exists():
                self.run.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey)])
            config = hdir / "sshd_config"
            config.write_text(
                f"# lab host {host}: sshd on the management network only\n"
                f"ListenAddress {hp.mgmt_ip}:22\n"
                f"HostKey {hostkey}\n"
                f"AuthorizedKeysFile {auth}\n"
                "PermitRootLogin prohibit-password\n"
                "PasswordAuthentication no\n"
                "KbdInteractiveAuthentication no\n"
                "UsePAM no\n"
                "StrictModes no\n"
                "PidFile none\n"
                "Subsystem sftp internal-sftp\n"
                "AcceptEnv LANG LC_*\n"
            )
            argv = [*self.host_ns(host).prefix(), SSHD, "-D", "-e", "-f", str(config)]
            if self.run.echo:
                self.run.echo(f"[#] {' '.join(argv)} &")
            log = open(hdir / "sshd.log", "ab")  # noqa: SIM115 - handed to the child
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
            log.close()
            state.sshd[host] = proc.pid

    def _wait_for_sshd(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        pending = dict(self.plan.hosts)
        while pending:
            for host, hp in list(pending.items()):
                s = netns.socket_in(self.plan.mgmt, socket.AF_INET, socket.SOCK_STREAM)
                s.settimeout(0.5)
                try:
                    s.connect((hp.mgmt_ip, 22))
                    del pending[host]
                except OSError:
                    pass
                finally:
                    s.close()
            if pending and time.monotonic() > deadline:
                raise LabError(
                    f"sshd did not start on {', '.join(sorted(pending))} "
                    f"(see {self.paths.state_dir}/hosts/<host>/sshd.log)"
                )
            if pending:
                time.sleep(0.1)


# --- down ----------------------------------------------------------------------------------------


def down(name: str, runner: Runner | None = None, paths: LabPaths | None = None) -> list[str]:
    """Remove lab ``name`` entirely; returns what was removed (for the user)."""
    _require_root_and_tools()
    run = runner or Runner()
    paths = paths or LabPaths(name)
    state = LabState.load(paths.state_file)
    removed: list[str] = []
    namespaces = lab_namespaces(name)
    inodes = [i for i in (netns.inode(n) for n in namespaces) if i is not None]

    victims = processes_in(inodes)
    for pid in victims:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + 3
    while victims and time.monotonic() < deadline:
        victims = [p for p in victims if _exists(p)]
        time.sleep(0.05)
    for pid in victims:
        _signal(pid, signal.SIGKILL)
    if processes_in(inodes):
        time.sleep(0.2)
    n_killed = len(processes_in(inodes))
    if n_killed:
        raise LabError(f"{n_killed} processes in lab {name} survived SIGKILL; not removing it")

    if paths.ns_dir.exists():
        for f in sorted(paths.ns_dir.iterdir()):
            if _is_mountpoint(f):
                run.run(["umount", str(f)])
        if _is_mountpoint(paths.ns_dir):
            run.run(["umount", str(paths.ns_dir)])
        removed.append(f"{len(list(paths.ns_dir.glob('*.mnt')))} hosts' mount and UTS namespaces")
    if namespaces:
        run.run(["ip", "-batch", "-"], input="".join(f"netns del {n}\n" for n in namespaces))
        removed.append(f"{len(namespaces)} network namespaces")
    if state.inventory and Path(state.inventory).exists():
        Path(state.inventory).unlink()
        removed.append(f"inventory {state.inventory}")
    for d in (paths.run_dir, paths.state_dir):
        if d.exists():
            shutil.rmtree(d)
            removed.append(str(d))
    # Mount points up created on the root filesystem go when no lab needs them any more.
    others = list(paths.run_root.iterdir()) if paths.run_root.exists() else []
    if not others:
        for created in state.created_dirs:
            with contextlib.suppress(OSError):
                os.rmdir(created)
                removed.append(created)
        for root in (paths.run_root, paths.state_root):
            with contextlib.suppress(OSError):
                root.rmdir()
    return removed


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _exists(pid: int) -> bool:
    """Is ``pid`` still running? A zombie is not: it only waits for its parent to reap it."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # our own child (a test's): reap it
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _require_root_and_tools() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (it creates network namespaces); run it with sudo")
    missing = [c for c in REQUIRED_COMMANDS if shutil.which(c) is None]
    if not os.path.exists(SSHD):
        missing.append(SSHD)
    if missing:
        raise LabError(
            f"missing commands: {', '.join(missing)} (run `make setup` or scripts/install-deps)"
        )


# --- inventory -----------------------------------------------------------------------------------


def _transport_vars(plan: Plan, topo: Topology) -> dict[str, object]:
    """How agents reach the lab's controller. With ``controller_tls`` as outside the lab: the
    controller role makes a fleet CA and a certificate for the controller's public address and
    its management address (Ansible's inventory plugin reads the API from the management
    network), and agents pin the CA. Without it, the lab's one exception to TLS by default
    (issue 11), said out loud: the roles render ``insecure_http: true`` in controller.yml and
    agent.yml (the controller refuses plain HTTP off loopback, and agents an http:// URL,
    unless told)."""
    if not topo.controller_tls:
        return {"fleetvpn_controller_insecure_http": True}
    controller = plan.hosts[topo.controller]
    return {
        "fleetvpn_controller_insecure_http": False,
        "fleetvpn_controller_tls_names": [controller.public_ipv4, controller.mgmt_ip, "127.0.0.1"],
    }


def write_inventory(plan: Plan, topo: Topology, paths: LabPaths, path: Path) -> None:
    """An Ansible inventory of the lab's hosts, reachable with paramiko over the management net."""
    site_groups: dict[str, dict[str, object]] = {}
    hostvars: dict[str, dict[str, object]] = {}
    for host, hp in plan.hosts.items():
        site = topo.site(hp.site)
        hv: dict[str, object] = {
            "ansible_host": hp.mgmt_ip,
            "fleetvpn_site": hp.site,
            "fleetvpn_site_kind": site.kind,
            "fleetvpn_lan_ipv4": hp.ipv4,
            "fleetvpn_public_ipv4": hp.public_ipv4,
        }
        if hp.ipv6:
            hv["fleetvpn_public_ipv6"] = hp.ipv6
        if site.kind == "public" and host != topo.controller:
            # Reachable from anywhere: other nodes dial it (NATed and firewalled nodes dial out).
            hv["fleetvpn_endpoint"] = f"{hp.public_ipv4}:51820"
        hostvars[host] = hv
        site_groups.setdefault(f"site_{hp.site}", {"hosts": {}})
        site_groups[f"site_{hp.site}"]["hosts"][host] = None  # type: ignore[index]
    controller = topo.controller
    inventory = {
        "all": {
            "vars": {
                "ansible_connection": "paramiko",
                "ansible_user": "root",
                "ansible_ssh_private_key_file": str(paths.ssh_key),
                "ansible_paramiko_host_key_checking": False,
                # Hosts listen on the management network only; reach it from its namespace.
                "ansible_paramiko_proxy_command": (
                    f"nsenter --net={netns_path(plan.mgmt)} "
                    f"{sys.executable} -m fleetvpn.lab.proxy %h %p"
                ),
                # Lab hosts share this machine's filesystem: fleetvpn is already installed
                # in this Python's environment, and there is no systemd inside a lab host.
                "ansible_python_interpreter": sys.executable,
                "fleetvpn_lab": plan.lab,
                "fleetvpn_controller_address": plan.hosts[controller].public_ipv4,
                **_transport_vars(plan, topo),
                "fleetvpn_install_method": "none",
                "fleetvpn_bin": str(Path(sys.executable).parent / "fleetvpn"),
                "fleetvpn_python": sys.executable,
                "fleetvpn_service_manager": "process",
                # /var/log is shared by every lab host; each host's /var/lib/fleetvpn is its own.
                "fleetvpn_log_dir": "/var/lib/fleetvpn/log",
            },
            "hosts": hostvars,
            "children": {
                "controllers": {"hosts": {controller: None}},
                "nodes": {"hosts": {h: None for h in plan.hosts if h != controller}},
                **site_groups,
            },
        }
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# Written by `fleetvpn lab up` for lab {plan.lab!r} from {topo.source}.\n"
        "# Do not edit: the next `lab up` rewrites it; `lab down` removes it.\n"
    )
    path.write_text(header + yaml.safe_dump(inventory, sort_keys=False, default_flow_style=False))

"""Rendered configs fed to the real parsers (issue 11): what they apply is exactly what was meant.

- wg-quick: ``wg-quick up`` of the rendered file in a network namespace of its own (wireguard-go;
  addresses, MTU, the ``PostUp`` route lines run for real), then ``wg showconf`` and the routes
  must show exactly the peers, endpoints, allowed IPs, keepalives and route MTUs meant, nothing
  more; and ``wg-quick strip`` of the file through ``wg setconf`` and ``wg syncconf``.
- systemd-networkd: its own parser (``/lib/systemd/systemd-networkd`` run for a few seconds in a
  private network and mount namespace, reading only our files) must load the files without a
  single warning, and a strict INI parse must find exactly the sections and keys meant.
- Hostile inputs (the issue's scoped endpoint with a ``PostUp`` line, newlines in names and
  reasons, a key ``--help``) make ``render()`` raise, naming the field; and the harness itself
  catches an escape-and-hope file (so these tests can fail).

Edge-case but valid inputs: IPv6 and DNS endpoints (the name resolved through a private
``/etc/hosts``), ports 1 and 65535, 63-character names, a 15-character interface name, reasons
with "—" and "⇄", keepalives 0, 1 and 120.

Lab rules: every interface lives in a namespace made here; wireguard-go's control socket dir
``/var/run/wireguard`` is shared by every namespace, so the interface name is unique to this
run; everything is removed afterwards. Run as root (the lab conftest skips it otherwise).
"""

from __future__ import annotations

import configparser
import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleetvpn.controller import render as render_module
from fleetvpn.controller.render import RenderError, render

WG_ENV = {**os.environ, "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
NETWORKD = Path("/lib/systemd/systemd-networkd")
DNS_NAME = "hub-1.fleet.example"
DNS_ADDRESS = "198.18.0.7"  # the lab's "internet" (benchmarking range); nothing is sent to it
REASON = "MTU 1340 — the largest of its links ⇄ hub (floor16(1400 − 60))"


def run(argv: list[str], *, input: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(argv, input=input, capture_output=True, text=True, env=WG_ENV, timeout=30)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv}: exit {proc.returncode}: {proc.stdout}{proc.stderr}")
    return proc.stdout


def keypair() -> tuple[str, str]:
    private = run(["wg", "genkey"]).strip()
    return private, run(["wg", "pubkey"], input=private + "\n").strip()


@pytest.fixture(scope="module")
def tools() -> None:
    missing = [t for t in ("wg", "wg-quick", "wireguard-go", "ip") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (scripts/install-deps installs them)")


def desired(interface: str, keys: list[str]) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "node": "n" + "-x" * 31,  # 63 characters
        "site": "s" * 63,
        "generated_at": "2026-11-25T17:00:00Z",
        "interface": interface,
        "addresses": ["10.99.0.2/16", "fd99:f1ee:7::2/64"],
        "listen_port": 65535,
        "interface_mtu": 1340,
        "interface_mtu_reason": REASON,
        "peers": [
            {"peer": "p" * 63, "site": "hub", "public_key": keys[0],
             "endpoint": "[2001:2::11]:51820",
             "allowed_ips": ["10.99.0.1/32", "fd99:f1ee:7::1/128"],
             "keepalive_s": 120, "keepalive_reason": "NAT ⇄ 245 s — floor((245 − 5) / 2)",
             "route_mtu": 1340, "route_mtu_reason": "route MTU 1340 = the interface MTU"},
            {"peer": "cloud1", "site": "cloud", "public_key": keys[1],
             "endpoint": f"{DNS_NAME}:1",
             "allowed_ips": ["10.99.0.5/32", "10.98.0.0/24"],
             "keepalive_s": 0, "keepalive_reason": "no NAT, no stateful filter: off",
             "route_mtu": 1264, "route_mtu_reason": "route MTU 1264 = floor16(1350 − 80) ⇄"},
            {"peer": "branch2", "site": "branch", "public_key": keys[2], "endpoint": None,
             "allowed_ips": ["10.99.0.3/32", "fd99:f1ee:7::3/128"],
             "keepalive_s": 1, "keepalive_reason": "the smallest keepalive wg(8) takes",
             "route_mtu": 1280, "route_mtu_reason": "route MTU 1280: the IPv6 minimum"},
        ],
    }  # fmt: skip


def meant(doc: dict[str, Any], *, resolved: bool = True) -> dict[str, Any]:
    """What ``wg showconf`` must show for ``doc``: the listen port and, per public key, the
    endpoint (a DNS name as the address it resolves to), the allowed IPs and the keepalive."""
    peers = {}
    for p in doc["peers"]:
        endpoint = p["endpoint"]
        if resolved and endpoint is not None and endpoint.startswith(DNS_NAME):
            endpoint = DNS_ADDRESS + endpoint.removeprefix(DNS_NAME)
        peers[p["public_key"]] = {
            "endpoint": endpoint,
            "allowed_ips": sorted(p["allowed_ips"]),
            "keepalive_s": p["keepalive_s"],
        }
    return {"listen_port": doc["listen_port"], "peers": peers}


def parse_wg_config(text: str) -> dict[str, Any]:
    """``wg showconf`` / ``wg-quick strip`` output → the same shape as :func:`meant`. Refuses
    anything else: an unknown key, a second [Interface], a key given twice, a peer twice."""
    interface: dict[str, str] = {}
    peers: dict[str, dict[str, Any]] = {}
    section: dict[str, str] | None = None
    sections: list[tuple[str, dict[str, str]]] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line in ("[Interface]", "[Peer]"):
            section = {}
            sections.append((line, section))
            continue
        key, sep, value = (part.strip() for part in line.partition("="))
        assert sep and section is not None, f"not KEY = VALUE in a section: {raw!r}"
        assert key not in section, f"{key} given twice: {raw!r}"
        section[key] = value
    assert [s for s, _ in sections].count("[Interface]") == 1, "exactly one [Interface]"
    for name, body in sections:
        if name == "[Interface]":
            assert set(body) <= {"ListenPort", "PrivateKey"}, f"[Interface] has {sorted(body)}"
            interface = body
            continue
        assert set(body) <= {"PublicKey", "Endpoint", "AllowedIPs", "PersistentKeepalive"}, body
        key = body["PublicKey"]
        assert key not in peers, f"peer {key} twice"
        allowed = sorted(a.strip() for a in body.get("AllowedIPs", "").split(",") if a.strip())
        keepalive = body.get("PersistentKeepalive", "off")
        peers[key] = {
            "endpoint": body.get("Endpoint"),
            "allowed_ips": allowed,
            "keepalive_s": 0 if keepalive == "off" else int(keepalive),
        }
    listen_port = interface.get("ListenPort")
    return {"listen_port": int(listen_port) if listen_port else None, "peers": peers}


class Namespace:
    """A network namespace of this run, and a directory bind-mounted over ``/etc/wireguard``
    and a private ``/etc/hosts`` inside every command run in it (mount namespaces of their own:
    nothing is mounted in the root namespace)."""

    def __init__(self) -> None:
        tag = f"{os.getpid() & 0xFFFFFF:06x}{secrets.token_hex(3)}"
        self.name = f"fvrender-{tag}"
        self.interface = f"fvr{tag}"[:15]  # 15 characters, the longest Linux takes
        self.dir = Path(tempfile.mkdtemp(prefix="fleetvpn-render-"))
        (self.dir / "wireguard").mkdir(mode=0o700)
        (self.dir / "hosts").write_text(f"127.0.0.1 localhost\n{DNS_ADDRESS} {DNS_NAME}\n")
        run(["ip", "netns", "add", self.name])
        self.run("ip link set lo up")

    def run(self, script: str, check: bool = True) -> str:
        mounts = (
            f"mount --bind {self.dir / 'wireguard'} /etc/wireguard && "
            f"mount --bind {self.dir / 'hosts'} /etc/hosts && "
        )
        return run(["ip", "netns", "exec", self.name, "sh", "-c", mounts + script], check=check)

    def wg_config(self) -> dict[str, Any]:
        return parse_wg_config(self.run(f"wg showconf {self.interface}"))

    def remove(self) -> None:
        pids = self.run(f"pgrep -f 'wireguard-go {self.interface}$'", check=False).split()
        self.run(f"ip link del {self.interface}", check=False)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 15)
        run(["ip", "netns", "del", self.name], check=False)
        for leftover in (f"{self.interface}.sock", f"{self.interface}.name"):
            Path("/var/run/wireguard", leftover).unlink(missing_ok=True)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def netns(tools: None) -> Iterator[Namespace]:
    ns = Namespace()
    try:
        yield ns
    finally:
        ns.remove()
    assert not Path("/var/run/netns", ns.name).exists()
    assert not Path("/var/run/wireguard", f"{ns.interface}.sock").exists()


def routes_with_mtu(ns: Namespace) -> dict[str, int]:
    """Destination (CIDR) → route MTU, for every route on the interface that has one."""
    out: dict[str, int] = {}
    for family in ("-4", "-6"):
        for route in json.loads(ns.run(f"ip {family} -j route show dev {ns.interface}")):
            mtu = next((m["mtu"] for m in route.get("metrics", []) if "mtu" in m), None)
            if mtu is not None:
                out[str(ipaddress.ip_network(route["dst"]))] = mtu
    return out


def test_wg_quick_up_applies_exactly_what_was_rendered(netns: Namespace) -> None:
    keys = [keypair()[1] for _ in range(3)]
    doc = desired(netns.interface, keys)
    ((file_name, text),) = render(doc, "wg-quick").items()
    assert file_name == f"{netns.interface}.conf"
    conf = netns.dir / "wireguard" / file_name
    conf.write_text(text)
    conf.chmod(0o600)
    (netns.dir / "wireguard" / f"{netns.interface}.key").write_text(keypair()[0] + "\n")

    netns.run(f"wg-quick up /etc/wireguard/{file_name}")

    assert netns.wg_config() == meant(doc)
    link = json.loads(netns.run(f"ip -j link show dev {netns.interface}"))[0]
    assert link["mtu"] == 1340
    addresses = json.loads(netns.run(f"ip -j addr show dev {netns.interface}"))[0]["addr_info"]
    assert {f"{a['local']}/{a['prefixlen']}" for a in addresses if a["scope"] == "global"} == {
        "10.99.0.2/16",
        "fd99:f1ee:7::2/64",
    }
    # The PostUp lines ran, and only they: one route per allowed IP with that link's MTU.
    assert routes_with_mtu(netns) == {
        ip: p["route_mtu"] for p in doc["peers"] for ip in p["allowed_ips"]
    }
    netns.run(f"wg-quick down /etc/wireguard/{file_name}")
    assert netns.run(f"ip link show dev {netns.interface}", check=False) == ""


def test_stripped_file_through_wg_setconf_and_syncconf(netns: Namespace) -> None:
    keys = [keypair()[1] for _ in range(3)]
    doc = desired(netns.interface, keys)
    stripped_path = netns.dir / "wireguard" / "stripped.conf"
    conf = netns.dir / "wireguard" / f"{netns.interface}.conf"
    conf.write_text(render(doc, "wg-quick")[conf.name])
    stripped = netns.run(f"wg-quick strip /etc/wireguard/{conf.name}")
    assert parse_wg_config(stripped) == meant(doc, resolved=False)
    stripped_path.write_text(stripped)

    wireguard_go = subprocess.Popen(
        ["ip", "netns", "exec", netns.name, "wireguard-go", "-f", netns.interface],
        env=WG_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not Path("/var/run/wireguard", f"{netns.interface}.sock").exists():
            assert time.monotonic() < deadline, "wireguard-go made no control socket"
            time.sleep(0.05)
        netns.run(f"wg setconf {netns.interface} /etc/wireguard/stripped.conf")
        assert netns.wg_config() == meant(doc)

        # syncconf: one peer gone, one keepalive changed, one endpoint moved: exactly that.
        doc["peers"] = doc["peers"][:2]
        doc["peers"][0] = {**doc["peers"][0], "keepalive_s": 13, "endpoint": "198.19.1.11:51820"}
        conf.write_text(render(doc, "wg-quick")[conf.name])
        stripped_path.write_text(netns.run(f"wg-quick strip /etc/wireguard/{conf.name}"))
        netns.run(f"wg syncconf {netns.interface} /etc/wireguard/stripped.conf")
        assert netns.wg_config() == meant(doc)
    finally:
        wireguard_go.terminate()
        wireguard_go.wait(10)


# --- systemd-networkd ----------------------------------------------------------------------


def networkd_log(files: dict[str, str], key_dir: Path) -> str:
    """Run the real systemd-networkd for 3 s in a private network and mount namespace whose
    /run/systemd/network holds only ``files``; its log (stderr, debug level)."""
    units = key_dir / "units"
    units.mkdir()
    for name, text in files.items():
        (units / name).write_text(text)
    script = (
        "mount -t tmpfs tmpfs /run/systemd/network 2>/dev/null || "
        "{ mkdir -p /run/systemd/network && mount -t tmpfs tmpfs /run/systemd/network; } && "
        f"cp {units}/* /run/systemd/network/ && mount --bind {key_dir / 'wireguard'} "
        f"/etc/wireguard && exec timeout 3 {NETWORKD}"
    )
    proc = subprocess.run(
        ["unshare", "--net", "--mount", "--propagation", "private", "sh", "-c", script],
        env={**os.environ, "SYSTEMD_LOG_TARGET": "console", "SYSTEMD_LOG_LEVEL": "debug"},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return proc.stdout + proc.stderr


def networkd_problems(log: str, files: dict[str, str]) -> list[str]:
    """Log lines where networkd's parser says something about our files."""
    words = ("Unknown", "Failed to parse", "Invalid", "ignoring", "not valid", "Unsupported")
    return [
        line
        for line in log.splitlines()
        if any(name in line for name in files) and any(w in line for w in words)
    ]


@pytest.fixture
def key_dir(tools: None) -> Iterator[Path]:
    """/etc/wireguard for networkd: the private key readable by the systemd-network user it
    drops to (as a real .netdev's PrivateKeyFile must be)."""
    if not NETWORKD.exists():
        pytest.skip(f"{NETWORKD} is not installed: the strict INI test below still runs")
    base = Path(tempfile.mkdtemp(prefix="fleetvpn-networkd-"))
    (base / "wireguard").mkdir()
    try:
        shutil.chown(base / "wireguard", group="systemd-network")
        (base / "wireguard").chmod(0o750)
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def write_key(key_dir: Path, interface: str) -> None:
    key = key_dir / "wireguard" / f"{interface}.key"
    key.write_text(keypair()[0] + "\n")
    shutil.chown(key, group="systemd-network")
    key.chmod(0o640)


def test_systemd_networkd_loads_the_files_without_a_warning(key_dir: Path) -> None:
    keys = [keypair()[1] for _ in range(3)]
    doc = desired("wg0", keys)
    files = render(doc, "networkd")
    write_key(key_dir, "wg0")
    log = networkd_log(files, key_dir)
    assert 'wg0: loaded "wireguard"' in log, log  # the .netdev parsed and accepted
    assert networkd_problems(log, files) == [], log
    # No kernel WireGuard here: creating the device is where networkd stops, not parsing.


def test_the_networkd_harness_sees_a_swallowed_line(key_dir: Path) -> None:
    """What an escape-and-hope template would write for a value ending in ``\\``: networkd
    joins the next line to it, and that route's ``MTUBytes`` line vanishes into its
    ``Destination``. The harness must say so (render() refuses any line ending in a
    backslash)."""
    files = render(desired("wg0", [keypair()[1] for _ in range(3)]), "networkd")
    files["wg0.network"] = files["wg0.network"].replace(
        "Destination = 10.99.0.1/32\n", "Destination = 10.99.0.1/32 \\\n", 1
    )
    write_key(key_dir, "wg0")
    problems = networkd_problems(networkd_log(files, key_dir), files)
    assert any("Destination" in line for line in problems), problems


STRICT_SECTIONS = {
    "netdev": {"NetDev": {"Name", "Kind", "MTUBytes"},
               "WireGuard": {"PrivateKeyFile", "ListenPort"},
               "WireGuardPeer": {"PublicKey", "AllowedIPs", "Endpoint", "PersistentKeepalive"}},
    "network": {"Match": {"Name"}, "Network": {"Address"},
                "Route": {"Destination", "MTUBytes"}},
}  # fmt: skip
REPEATED = {"WireGuardPeer", "Route"}  # the sections systemd allows more than once


def strict_ini(text: str, kind: str) -> list[tuple[str, dict[str, list[str]]]]:
    """Split at section headers, then parse each section with ``configparser(strict=True)``:
    only known sections and keys; only [WireGuardPeer] and [Route] may repeat; a key may repeat
    only where systemd takes a list (Address)."""
    sections: list[tuple[str, dict[str, list[str]]]] = []
    for chunk in ("\n" + text).split("\n[")[1:]:
        header, _, body = chunk.partition("\n")
        name = header.rstrip("]")
        assert header.endswith("]") and name in STRICT_SECTIONS[kind], f"section [{header}"
        assert name in REPEATED or name not in [s for s, _ in sections], f"[{name}] twice"
        values: dict[str, list[str]] = {}
        for line in body.splitlines():
            if line.strip() and not line.lstrip().startswith(("#", ";")):
                key, _, value = line.partition("=")
                values.setdefault(key.strip(), []).append(value.strip())
        for key, found in values.items():
            assert key in STRICT_SECTIONS[kind][name], f"[{name}] {key}"
            assert len(found) == 1 or key == "Address", f"[{name}] {key} given {len(found)} times"
        parser = configparser.ConfigParser(
            strict=True, interpolation=None, comment_prefixes=("#", ";")
        )
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        if name != "Network":  # Address repeats, which configparser's strict mode refuses
            parser.read_string(f"[{name}]\n{body}")
        sections.append((name, values))
    return sections


def test_networkd_files_parse_as_strict_ini_with_exactly_the_sections_meant() -> None:
    keys = [
        "KqkHARKrDpxfjZq7B99cU1K18vq6Socu+kYOUocRZRc=",
        "hxWIM5/0EXTH6xrfdGFycohv0MYKJoJbY8JEA5r3v30=",
        "+KT4j05vB0bxPHQeK92OrapJkq+d3QxV3fBDyNnbLlM=",
    ]
    doc = desired("fvr0123456789ab", keys)
    files = render(doc, "networkd")
    netdev = strict_ini(files["fvr0123456789ab.netdev"], "netdev")
    peers = [values for name, values in netdev if name == "WireGuardPeer"]
    assert [
        (p["PublicKey"], p.get("Endpoint"), p["AllowedIPs"], p.get("PersistentKeepalive"))
        for p in peers
    ] == [
        ([keys[0]], ["[2001:2::11]:51820"], ["10.99.0.1/32, fd99:f1ee:7::1/128"], ["120"]),
        ([keys[1]], [f"{DNS_NAME}:1"], ["10.99.0.5/32, 10.98.0.0/24"], None),
        ([keys[2]], None, ["10.99.0.3/32, fd99:f1ee:7::3/128"], ["1"]),
    ]
    network = strict_ini(files["fvr0123456789ab.network"], "network")
    assert dict(network)["Network"] == {"Address": ["10.99.0.2/16", "fd99:f1ee:7::2/64"]}
    assert [(v["Destination"], v["MTUBytes"]) for n, v in network if n == "Route"] == [
        ([ip], [str(p["route_mtu"])]) for p in doc["peers"] for ip in p["allowed_ips"]
    ]


# --- hostile inputs ------------------------------------------------------------------------

ISSUE_ENDPOINT = "[fe80::1%1]:51820\n[Interface]\nPostUp = touch /tmp/fleetvpn-owned\n#]:51820"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d["peers"][0].update(endpoint=ISSUE_ENDPOINT), "peers[0].endpoint"),
        (lambda d: d["peers"][1].update(peer="cloud1\n[Peer]"), "peers[1].peer"),
        (lambda d: d.update(node="n\nPostUp = x"), "node"),
        (lambda d: d["peers"][2].update(keepalive_reason="ok\nPostUp = x"),
         "peers[2].keepalive_reason"),
        (lambda d: d.update(interface_mtu_reason="ok\u2028PostUp = x"), "interface_mtu_reason"),
        (lambda d: d["peers"][1].update(public_key="--help"), "peers[1].public_key"),
    ],
    ids=["issue-11-endpoint", "newline-in-peer-name", "newline-in-node", "newline-in-reason",
         "line-separator-in-reason", "key---help"],
)  # fmt: skip
def test_hostile_inputs_make_render_raise_naming_the_field(change: Any, field: str) -> None:
    keys = [
        "KqkHARKrDpxfjZq7B99cU1K18vq6Socu+kYOUocRZRc=",
        "hxWIM5/0EXTH6xrfdGFycohv0MYKJoJbY8JEA5r3v30=",
        "+KT4j05vB0bxPHQeK92OrapJkq+d3QxV3fBDyNnbLlM=",
    ]
    for kind in render_module.KINDS:
        doc = desired("wg0", keys)
        change(doc)
        with pytest.raises(RenderError) as raised:
            render(doc, kind)
        assert raised.value.field == field


def test_the_wg_harness_sees_an_injected_section(tools: None, tmp_path: Path) -> None:
    """What an escape-and-hope template would write for the issue's endpoint: wg-quick strip
    keeps the injected [Interface], and the comparison above must refuse it."""
    keys = [keypair()[1] for _ in range(3)]
    doc = desired("wg0", keys)
    text = render(doc, "wg-quick")["wg0.conf"].replace(
        "Endpoint = [2001:2::11]:51820", "Endpoint = " + ISSUE_ENDPOINT.replace("%1", "")
    )
    conf = tmp_path / "wg0.conf"
    conf.write_text(text)
    conf.chmod(0o600)
    stripped = run(["wg-quick", "strip", str(conf)])
    with pytest.raises(AssertionError):
        assert parse_wg_config(stripped) == meant(doc)

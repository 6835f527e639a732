"""Bring up a bare wireguard-go tunnel between two lab hosts, and push TCP through it."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass

from fleetvpn.lab.transfer import tcp_transfer as tcp_transfer  # re-exported for the tests
from fleetvpn.runner import NsPath

WG_ENV = {**os.environ, "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}


@dataclass
class WgEnd:
    ns: NsPath
    netns_name: str
    tunnel_ip: str
    underlay_ip: str
    proc: subprocess.Popen[bytes] | None = None
    public_key: str = ""


def sh(ns: NsPath, script: str, input: str | None = None) -> str:
    out = subprocess.run(
        [*ns.prefix(), "sh", "-c", script], input=input, capture_output=True, text=True, env=WG_ENV
    )
    if out.returncode != 0:
        raise RuntimeError(f"{script!r} failed: {out.stderr.strip()}")
    return out.stdout.strip()


def start(end: WgEnd, mtu: int) -> None:
    end.proc = subprocess.Popen(
        [*end.ns.prefix(), "wireguard-go", "-f", "wg0"],
        env=WG_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 5
    while sh(end.ns, "ls /run/wireguard") != "wg0.sock":
        if time.monotonic() > deadline:
            raise RuntimeError("wireguard-go did not create its socket")
        time.sleep(0.05)
    sh(end.ns, "umask 077; wg genkey > /etc/wireguard/test.key")
    end.public_key = sh(end.ns, "wg pubkey < /etc/wireguard/test.key")
    sh(
        end.ns,
        f"ip addr add {end.tunnel_ip}/24 dev wg0 && ip link set wg0 mtu {mtu} up && "
        "wg set wg0 private-key /etc/wireguard/test.key listen-port 51820",
    )


def connect(a: WgEnd, b: WgEnd, keepalive: int = 5) -> None:
    """a knows b's endpoint (b is public); b learns a's from the handshake."""
    sh(
        a.ns,
        f"wg set wg0 peer {b.public_key} endpoint {b.underlay_ip}:51820 "
        f"allowed-ips {b.tunnel_ip}/32 persistent-keepalive {keepalive}",
    )
    sh(b.ns, f"wg set wg0 peer {a.public_key} allowed-ips {a.tunnel_ip}/32")


def set_mtu(end: WgEnd, mtu: int) -> None:
    sh(end.ns, f"ip link set wg0 mtu {mtu}")


def stop(end: WgEnd) -> None:
    if end.proc is not None:
        end.proc.terminate()
        end.proc.wait(5)
    sh(end.ns, "rm -f /etc/wireguard/test.key")


def wait_handshake(end: WgEnd, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stamps = sh(end.ns, "wg show wg0 latest-handshakes").split()
        if stamps and stamps[-1] != "0":
            return
        time.sleep(0.1)
    raise AssertionError("no WireGuard handshake")

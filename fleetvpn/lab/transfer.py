"""Push TCP between two lab hosts, and change a site's NAT timer while the lab runs.

A bulk transfer is the test users care about: over a PMTU black hole the TCP handshake's
small packets pass and the full-size segments vanish, so the transfer stalls at a few
kilobytes while ``ping`` and ``ssh`` look fine.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import threading
import time
from dataclasses import dataclass

from fleetvpn.lab import netns
from fleetvpn.lab.plan import Plan, StatefulBox
from fleetvpn.runner import netns_path


@dataclass(frozen=True)
class Transfer:
    src: str
    dst: str
    address: str
    sent_bytes: int  # what was asked for
    received_bytes: int  # what arrived by the deadline
    connected: bool
    elapsed_s: float

    @property
    def complete(self) -> bool:
        return self.connected and self.received_bytes >= self.sent_bytes

    def as_json(self) -> dict[str, object]:
        return {
            "src": self.src,
            "dst": self.dst,
            "address": self.address,
            "bytes": self.sent_bytes,
            "received_bytes": self.received_bytes,
            "connected": self.connected,
            "complete": self.complete,
            "elapsed_s": round(self.elapsed_s, 2),
        }


def tcp_transfer(
    src_ns: str, dst_ns: str, dst_ip: str, nbytes: int, timeout_s: float, port: int = 5201
) -> tuple[bool, int]:
    """Send ``nbytes`` over TCP from ``src_ns`` to ``dst_ip`` (in ``dst_ns``).

    Returns (connected, bytes received by ``timeout_s``). A stall shows as a count far
    below ``nbytes``.
    """
    family = socket.AF_INET6 if ":" in dst_ip else socket.AF_INET
    server = netns.socket_in(dst_ns, family, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((dst_ip, port))
    server.listen(1)
    received = 0
    deadline = time.monotonic() + timeout_s

    def send() -> None:
        client = netns.socket_in(src_ns, family, socket.SOCK_STREAM)
        client.settimeout(timeout_s)
        try:
            client.connect((dst_ip, port))
            client.sendall(b"\0" * nbytes)
        except OSError:
            pass
        finally:
            client.close()

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    server.settimeout(timeout_s)
    try:
        conn, _ = server.accept()
    except TimeoutError:
        server.close()
        return False, 0
    with conn:
        while received < nbytes and (left := deadline - time.monotonic()) > 0:
            conn.settimeout(left)
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            received += len(chunk)
    server.close()
    return True, received


def tunnel_address(host_ns: str, interface: str = "wg0", family: int = 4) -> str | None:
    """The first address of ``family`` on ``interface`` in ``host_ns``, or None."""
    out = subprocess.run(
        ["nsenter", f"--net={netns_path(host_ns)}", "ip", "-j", "addr", "show", "dev", interface],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        return None
    for link in json.loads(out.stdout or "[]"):
        for a in link.get("addr_info", []):
            if ipaddress.ip_address(a["local"]).version == family:
                return str(a["local"])
    return None


def run(
    plan: Plan, src: str, dst: str, nbytes: int, timeout_s: float, address: str | None = None
) -> Transfer:
    """One transfer from lab host ``src`` to lab host ``dst`` (its tunnel address by default)."""
    for host in (src, dst):
        if host not in plan.hosts:
            raise ValueError(f"no lab host {host!r} (known: {', '.join(sorted(plan.hosts))})")
    src_ns, dst_ns = plan.hosts[src].ns, plan.hosts[dst].ns
    if address is None:
        address = tunnel_address(dst_ns)
        if address is None:
            raise ValueError(f"{dst} has no IPv4 address on wg0: is its tunnel up?")
    started = time.monotonic()
    connected, received = tcp_transfer(src_ns, dst_ns, address, nbytes, timeout_s, port=5299)
    return Transfer(src, dst, address, nbytes, received, connected, time.monotonic() - started)


def nat_boxes(plan: Plan, site: str) -> list[StatefulBox]:
    boxes = [b for b in plan.boxes if b.site == site]
    if not boxes:
        sites = sorted({b.site for b in plan.boxes})
        raise ValueError(
            f"site {site!r} has no NAT or firewall (those that do: {', '.join(sites)})"
        )
    return boxes


def set_stream_timeout(plan: Plan, site: str, seconds: int, box: str | None = None) -> list[str]:
    """Set the established-UDP timer of ``site``'s NAT/firewall (all its boxes, or the one
    labelled ``box``), live. Existing mappings keep the timer they were last refreshed with."""
    if not 1 <= seconds <= 3600:
        raise ValueError(f"--nat-timeout {seconds}: must be 1..3600 s")
    chosen = [b for b in nat_boxes(plan, site) if box is None or b.label == box]
    if not chosen:
        labels = ", ".join(b.label for b in nat_boxes(plan, site))
        raise ValueError(f"site {site!r} has no box {box!r} (it has: {labels})")
    done = []
    for b in chosen:
        netns.write_sysctl(b.box_ns, "net/netfilter/nf_conntrack_udp_timeout_stream", str(seconds))
        done.append(f"{b.label} ({b.box_ns})")
    return done

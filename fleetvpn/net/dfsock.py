"""DF probing on real UDP sockets: Linux socket options Python 3.11 does not name, and the
socket error queue where the kernel leaves ICMP errors.

Contract:
- :func:`set_probe_mode` makes every datagram leave with DF set (IPv6: never fragmented), sized
  as given, ignoring the kernel's cached path MTU (``IP_PMTUDISC_PROBE``), and asks for ICMP
  errors on the error queue (``IP_RECVERR``). A send larger than the local interface raises
  ``OSError(EMSGSIZE)`` at once: a definite local "too big".
- :func:`read_errors` drains the error queue without blocking and returns what ICMP said.
- :func:`local_mtu` is the route/interface MTU towards a connected peer (``IP_MTU``).
Values from linux ``include/uapi/linux/in.h``, ``in6.h``, ``errqueue.h`` (reference.md).
"""

from __future__ import annotations

import errno
import fcntl
import socket
import struct
from dataclasses import dataclass

IP_MTU_DISCOVER = 10
IP_RECVERR = 11
IP_MTU = 14
IPV6_MTU_DISCOVER = 23
IPV6_MTU = 24
IPV6_RECVERR = 25
IPV6_DONTFRAG = 62
PMTUDISC_PROBE = 3  # DF set, cached PMTU ignored; same value for IPv6
PMTUDISC_DONT = 0  # DF clear: routers may fragment (IPv4)

SO_EE_ORIGIN_LOCAL = 1
SO_EE_ORIGIN_ICMP = 2
SO_EE_ORIGIN_ICMP6 = 3
_EXTENDED_ERR = struct.Struct("=IBBBBII")  # ee_errno, origin, type, code, pad, info, data

IPV4_UDP_HEADERS = 28  # 20 IPv4 + 8 UDP
IPV6_UDP_HEADERS = 48  # 40 IPv6 + 8 UDP


def headers(family: int) -> int:
    """Bytes of IP + UDP header: a probe of IP size S carries S - headers() bytes of payload."""
    return IPV6_UDP_HEADERS if family == socket.AF_INET6 else IPV4_UDP_HEADERS


@dataclass(frozen=True)
class SocketError:
    """One entry of the socket error queue."""

    errno: int
    origin: int  # SO_EE_ORIGIN_*: 1 local, 2 ICMP, 3 ICMPv6
    icmp_type: int
    icmp_code: int
    mtu: int  # ee_info: the next-hop MTU for "too big" errors

    @property
    def too_big(self) -> bool:
        return self.errno == errno.EMSGSIZE

    @property
    def from_icmp(self) -> bool:
        return self.origin in (SO_EE_ORIGIN_ICMP, SO_EE_ORIGIN_ICMP6)


def set_probe_mode(sock: socket.socket) -> None:
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, PMTUDISC_PROBE)
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_DONTFRAG, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, PMTUDISC_PROBE)
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)


def send_fragmentable(sock: socket.socket, payload: bytes) -> None:
    """Send one datagram on an IPv4 probe socket with DF clear (routers may fragment it, and so
    may this host above the route MTU), then put the socket back in probe mode. DF is decided
    when the packet is built, inside ``send``, so the datagrams before and after keep it."""
    sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, PMTUDISC_DONT)
    try:
        sock.send(payload)
    finally:
        sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, PMTUDISC_PROBE)


def read_errors(sock: socket.socket) -> list[SocketError]:
    """Drain the error queue (non-blocking). Malformed control messages are skipped."""
    out: list[SocketError] = []
    timeout = sock.gettimeout()
    sock.setblocking(False)  # a timeout would make Python poll for POLLIN, which never comes
    try:
        while True:
            try:
                _, ancdata, _, _ = sock.recvmsg(0, 512, socket.MSG_ERRQUEUE)
            except (BlockingIOError, InterruptedError):
                return out
            out.extend(_parse(ancdata))
    finally:
        sock.settimeout(timeout)


_RECVERR = ((socket.IPPROTO_IP, IP_RECVERR), (socket.IPPROTO_IPV6, IPV6_RECVERR))


def _parse(ancdata: list[tuple[int, int, bytes]]) -> list[SocketError]:
    out = []
    for level, kind, data in ancdata:
        if (level, kind) not in _RECVERR or len(data) < _EXTENDED_ERR.size:
            continue
        ee_errno, origin, icmp_type, icmp_code, _pad, info, _ = _EXTENDED_ERR.unpack_from(data)
        out.append(SocketError(ee_errno, origin, icmp_type, icmp_code, info))
    return out


SIOCGIFMTU = 0x8921
_IFREQ = struct.Struct("16si12x")  # struct ifreq: name, then the int MTU in the union


def interface_mtus() -> dict[str, int]:
    """MTU of every interface in this network namespace (loopback excluded)."""
    mtus = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            if name == "lo":
                continue
            request = _IFREQ.pack(name.encode(), 0)
            try:
                reply = fcntl.ioctl(s.fileno(), SIOCGIFMTU, request)
            except OSError:
                continue
            mtus[name] = _IFREQ.unpack(reply)[1]
    return mtus


def local_mtu(sock: socket.socket) -> int:
    """The MTU of the route towards the connected peer (raises OSError(ENOTCONN) if unconnected).

    This includes a path MTU the kernel cached from ICMP, which may be stale: a prober takes
    its ceiling from :func:`interface_mtus` instead, and lets a local EMSGSIZE say the rest.
    """
    if sock.family == socket.AF_INET6:
        return sock.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU)
    return sock.getsockopt(socket.IPPROTO_IP, IP_MTU)

"""Use a network namespace from inside this process: sockets and /proc/sys writes.

Linux keeps the network namespace per *thread*: ``setns(2)`` on the calling thread changes where
its new sockets live and which ``/proc/sys/net`` it sees, and a socket keeps its namespace for
life. So one process can hold sockets in many lab namespaces at once — ``lab verify`` does.
Python 3.11 has no ``os.setns``; we call libc directly.
"""

from __future__ import annotations

import ctypes
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from fleetvpn.runner import netns_path

CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the body with this thread in network namespace ``name``; always come back."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(netns_path(name), os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


def socket_in(name: str, family: int, kind: int = socket.SOCK_DGRAM) -> socket.socket:
    """A new socket that lives in network namespace ``name``."""
    with entered(name):
        return socket.socket(family, kind)


def write_sysctl(name: str, key: str, value: str) -> None:
    """Write ``/proc/sys/<key>`` as seen from namespace ``name`` (e.g. ``net/ipv4/ip_forward``)."""
    with entered(name), open(f"/proc/sys/{key}", "w") as f:
        f.write(value)


def inode(name: str) -> int | None:
    """The namespace's inode (what ``/proc/<pid>/ns/net`` links to), or None if it is gone."""
    try:
        return os.stat(netns_path(name)).st_ino
    except OSError:
        return None

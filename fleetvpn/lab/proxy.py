"""``python -m fleetvpn.lab.proxy HOST PORT``: relay stdin/stdout to a TCP port.

The lab inventory runs it inside the lab's management namespace as Ansible's paramiko
``proxy_command``, so playbooks reach lab hosts from anywhere without a route in the root
namespace. Kept free of heavy imports: it starts once per SSH connection.
"""

from __future__ import annotations

import os
import selectors
import socket
import sys


def relay(host: str, port: int) -> int:
    try:
        sock = socket.create_connection((host, port), timeout=10)
    except OSError as e:
        print(f"fleetvpn lab proxy: cannot connect to {host}:{port}: {e}", file=sys.stderr)
        return 1
    sock.settimeout(None)
    sel = selectors.DefaultSelector()
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    sel.register(stdin, selectors.EVENT_READ)
    sel.register(sock, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            if key.fileobj == stdin:
                data = os.read(stdin, 65536)
                if not data:
                    sock.shutdown(socket.SHUT_WR)
                    sel.unregister(stdin)
                    continue
                sock.sendall(data)
            else:
                data = sock.recv(65536)
                if not data:
                    return 0
                view = memoryview(data)
                while view:
                    view = view[os.write(stdout, view) :]


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m fleetvpn.lab.proxy HOST PORT")
    sys.exit(relay(sys.argv[1], int(sys.argv[2])))

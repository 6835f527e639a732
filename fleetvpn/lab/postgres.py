"""A throwaway PostgreSQL server from Debian's package, for tests and benchmarks.

It listens on a Unix socket under a directory of the caller's (no TCP port, nothing on the
network), trusts the local user ``fleetvpn``, and is shut down (fast mode, clients or not) when
the context ends. Root runs it as the ``postgres`` user: initdb and postgres refuse root.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


def bindir() -> Path | None:
    """The newest installed server's bin directory, or None when no server is installed."""
    initdb = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(initdb[-1]).parent if initdb else None


@contextmanager
def throwaway_server(base: Path, *, fsync: bool = True) -> Iterator[str]:
    """Start a server with its data and socket under ``base``; yield its SQLAlchemy URL.

    ``fsync=False`` trades durability for speed (tests). Raises RuntimeError when no server is
    installed or it does not start within 30 s."""
    bin_dir = bindir()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL server not installed (scripts/install-deps installs it)")
    data, sockets = base / "data", base / "sock"
    sockets.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:
        for path in (base, sockets):
            shutil.chown(path, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "fleetvpn", "--auth=trust"],
        check=True,
        capture_output=True,
    )
    options = ["-c", "listen_addresses="] + ([] if fsync else ["-c", "fsync=off"])
    server = subprocess.Popen(
        [*as_user, str(bin_dir / "postgres"), "-D", str(data), "-k", str(sockets), *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not list(sockets.glob(".s.PGSQL.*")):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("postgres did not start")
            time.sleep(0.1)
        yield f"postgresql+psycopg://fleetvpn@/postgres?host={sockets}"
    finally:
        # The postmaster is runuser's child: signal it by its pid file (SIGINT: fast shutdown).
        with suppress(OSError, ValueError):
            os.kill(int((data / "postmaster.pid").read_text().split()[0]), signal.SIGINT)
        if server.poll() is None:
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()

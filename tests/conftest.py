from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetvpn.lab import postgres


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Lab tests build real namespaces: they run as root, and skip (saying why) otherwise."""
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="lab tests need root: they build network namespaces")
    for item in items:
        if "lab" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL server from Debian's package, on a Unix socket only (no TCP
    port): started for the test session, removed after it. Its directory is its own, not
    pytest's basetemp: a later pytest session prunes old basetemps, a running server's too."""
    if postgres.bindir() is None:
        pytest.skip("PostgreSQL server not installed (scripts/install-deps installs it)")
    base = Path(tempfile.mkdtemp(prefix="fleetvpn-pg-"))
    try:
        with postgres.throwaway_server(base, fsync=False) as url:
            yield url
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a new database on the throwaway server."""
    if request.param == "sqlite":
        yield f"sqlite+pysqlite:///{tmp_path / 'controller.db'}"
        return
    import sqlalchemy as sa

    server_url = request.getfixturevalue("postgres_url")
    name = f"t_{os.getpid()}_{time.monotonic_ns()}"
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    yield server_url.replace("/postgres?", f"/{name}?")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE {name} WITH (FORCE)")
    admin.dispose()


@pytest.fixture
def store(store_url: str) -> Iterator[object]:
    from fleetvpn.controller.store import Store

    s = Store.open(store_url)
    yield s
    s.close()

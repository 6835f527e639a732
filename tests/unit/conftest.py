from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from fleetvpn.controller.store import Store

from .apiutil import Server


@pytest.fixture
def api(store: Store) -> Iterator[httpx.Client]:
    """A real uvicorn server on loopback over the test's store, and a client for it."""
    with Server(store) as client:
        yield client

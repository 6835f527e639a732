"""Helpers for the API tests: a real uvicorn server on loopback, tokens, enrollment."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from fleetvpn.controller.api import create_app
from fleetvpn.controller.store import Store

PUBLIC_KEY = "x" * 42 + "A="
AUTH_CACHE_TEST_S = 0.2  # how long the test servers remember a token


# Tests see their own writes: a view of a test's few nodes computes in milliseconds, so every
# fleet query waits for the view that includes the writes before it (views.Views.get).
TEST_APP_OPTIONS: dict[str, Any] = {"view_fresh_wait_s": 10.0, "auth_cache_s": AUTH_CACHE_TEST_S}


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 (and its key) in ``directory``, by openssl."""
    cert, key = directory / "api.crt", directory / "api.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def json_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path (keys and indexes) into a decoded JSON value, the value itself excluded."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += json_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += json_paths(item, (*prefix, i))
    return found


SERVERS: dict[str, Server] = {}  # base URL → the running test server (its app, for its cache)


class Server:
    def __init__(self, store: Store, max_body_bytes: int = 64 * 1024, **app_options: Any) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.app = create_app(
            store, max_body_bytes=max_body_bytes, **(TEST_APP_OPTIONS | app_options)
        )
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> httpx.Client:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)
        SERVERS[str(self.client.base_url)] = self
        return self.client

    def __exit__(self, *exc: object) -> None:
        SERVERS.pop(str(self.client.base_url), None)
        self.client.close()
        self.server.should_exit = True
        self.thread.join(10)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def enroll(
    api: httpx.Client, admin: str, name: str, site: str, key: str = PUBLIC_KEY, **extra: object
) -> str:
    r = api.post("/v1/enrollment-tokens", json={"site": site}, headers=bearer(admin))
    assert r.status_code == 201, r.text
    body = {"enrollment_token": r.json()["enrollment_token"], "name": name, "public_key": key}
    r = api.post("/v1/enroll", json={**body, **extra})
    assert r.status_code == 201, r.text
    return str(r.json()["node_token"])


def wait_serving(
    client: httpx.Client,
    server: subprocess.Popen[Any],
    timeout_s: float = 60.0,
    logs: Any = None,
) -> None:
    """Until a real ``controller serve`` process answers ``/healthz`` with 200; fails (with
    ``logs()`` when given, else its stderr) if it exits or does not answer within ``timeout_s``."""

    def said() -> str:
        if logs is not None:
            return str(logs())
        return server.stderr.read() if server.stderr and server.poll() is not None else ""

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if client.get("/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert server.poll() is None, said()
        assert time.monotonic() < deadline, f"controller did not start: {said()}"
        time.sleep(0.1)

"""The agent and its controller over real HTTP and TLS servers (issue 11): a 429 holds every
request for its Retry-After (seconds or an HTTP date) while reports wait in the spool, nothing
lost; ``ca_file`` pins the fleet CA alone (another CA, or the system's store, is refused)."""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from fleetvpn.agent import client as api
from fleetvpn.agent.config import parse
from fleetvpn.agent.daemon import Agent

from .apiutil import self_signed_cert

TOKEN = "fvn_secret-node-token"


class Controller:
    """A stand-in controller: answers 429 (with ``retry_after``) while ``busy``, else stores."""

    def __init__(self) -> None:
        self.busy = True
        self.retry_after = "2"
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.stored: list[str] = []  # report ids, in arrival order
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length)) if length else None
                owner.requests.append((self.command, self.path))
                headers: dict[str, str] = {}
                if owner.busy:
                    status, doc = 429, {"error": "slow down"}
                    headers["Retry-After"] = owner.retry_after
                elif self.path == "/v1/reports/batch":
                    owner.stored += [r["report_id"] for r in body]
                    status = 200
                    doc = {"results": [{"index": i, "status": 201} for i in range(len(body))]}
                else:
                    status, doc = 404, {"error": "no such thing"}
                payload = json.dumps(doc).encode()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def controller() -> Iterator[Controller]:
    c = Controller()
    yield c
    c.server.shutdown()


def test_retry_after_in_seconds_or_as_an_http_date_within_bounds() -> None:
    now = 1_800_000_000.0
    assert api.retry_after("5") == 5.0
    assert api.retry_after(" 120 ") == 120.0
    assert api.retry_after("0") == 1.0  # not a busy loop
    assert api.retry_after("999999999999999999") == 900.0  # one header cannot silence us
    in_40_s = email.utils.formatdate(now + 40, usegmt=True)
    assert api.retry_after(in_40_s, now=now) == pytest.approx(40.0)
    assert api.retry_after(email.utils.formatdate(now - 40, usegmt=True), now=now) == 1.0
    for useless in (None, "", "soon", "-5", "٥", "Wed, 99 Foo 2026 00:00:00 GMT"):
        assert api.retry_after(useless) == api.DEFAULT_RETRY_AFTER_S


def test_a_429_is_throttled_with_the_servers_retry_after(controller: Controller) -> None:
    client = api.Client(controller.url, token=TOKEN)
    with pytest.raises(api.Throttled) as throttled:
        client.desired("branch1")
    assert throttled.value.retry_after_s == 2.0 and TOKEN not in str(throttled.value)
    controller.retry_after = email.utils.formatdate(time.time() + 60, usegmt=True)
    with pytest.raises(api.Throttled) as throttled:
        client.post_reports([{"report_id": "x"}])
    assert 55 <= throttled.value.retry_after_s <= 60


def test_the_agent_holds_its_requests_for_the_retry_after_and_loses_no_report(
    controller: Controller, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = parse(f"controller: {controller.url}\nnode: branch1\nstate_dir: {tmp_path}\n")
    agent = Agent(config)
    agent.site, agent.token = "branch", TOKEN

    async def scenario() -> None:
        await agent._job_report()  # made, spooled, sent: 429 Retry-After: 2
        assert controller.requests == [("POST", "/v1/reports/batch")]
        held_from = time.monotonic()
        await agent._job_report()  # held: spooled only
        await agent._job_desired()  # held: not even asked
        assert len(controller.requests) == 1 and len(agent.spool) == 2
        controller.busy = False
        await asyncio.sleep(max(0.0, 2.05 - (time.monotonic() - held_from)))
        await agent._job_report()  # the hold is over: all three, in order

    with caplog.at_level(logging.INFO, logger="fleetvpn.agent"):
        asyncio.run(scenario())
    assert controller.requests[1:] == [("POST", "/v1/reports/batch")]
    assert len(controller.stored) == 3 and len(set(controller.stored)) == 3
    assert len(agent.spool) == 0 and agent.spool.stats()["rejected"] == 0
    held = [r.getMessage() for r in caplog.records if "429" in r.getMessage()]
    assert any("held" in m for m in held), held
    assert all(TOKEN not in r.getMessage() for r in caplog.records)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    """A TLS server with a certificate of the fleet CA (self-signed: its own CA), and the
    certificate of another CA that signs for the same address."""
    fleet_ca, key = self_signed_cert(tmp_path_factory.mktemp("fleet-ca"))
    other_ca, _ = self_signed_cert(tmp_path_factory.mktemp("other-ca"))

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            payload = json.dumps({"node": "branch1"}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(fleet_ca, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{server.server_address[1]}", fleet_ca, other_ca
    server.shutdown()


def test_the_pinned_fleet_ca_is_accepted_and_another_refused(
    tls: tuple[str, Path, Path],
) -> None:
    url, fleet_ca, other_ca = tls
    assert api.Client(url, ca_file=fleet_ca, token=TOKEN).desired("branch1") == {"node": "branch1"}
    with pytest.raises(api.Unreachable, match="CERTIFICATE_VERIFY_FAILED") as refused:
        api.Client(url, ca_file=other_ca, token=TOKEN).desired("branch1")
    assert TOKEN not in str(refused.value)


def test_with_a_ca_file_the_system_store_is_not_trusted(
    tls: tuple[str, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, fleet_ca, other_ca = tls
    # Make the server's CA part of "the system's store" (OpenSSL's default verify paths): a
    # client that loaded the system store besides its pinned CA would now accept the server.
    monkeypatch.setenv("SSL_CERT_FILE", str(fleet_ca))
    unpinned = api.Client(url, token=TOKEN)
    assert unpinned.desired("branch1") == {"node": "branch1"}  # the store is in effect
    pinned = api.Client(url, ca_file=other_ca, token=TOKEN)
    assert pinned.context is not None and len(pinned.context.get_ca_certs()) == 1
    with pytest.raises(api.Unreachable, match="CERTIFICATE_VERIFY_FAILED"):
        pinned.desired("branch1")

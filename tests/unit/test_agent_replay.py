"""The agent's spool replayed to the real controller (uvicorn on loopback, a SQLite store) in
batches: every report stored once and in order, a report the controller refuses dropped and
logged while the rest are stored, halving on 413, keeping everything when the controller cannot
be reached, and one report a request for an older controller without the batch path."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from starlette.types import Receive, Scope, Send

from fleetvpn.agent.client import Client, ControllerError
from fleetvpn.agent.replay import replay
from fleetvpn.agent.spool import Spool
from fleetvpn.controller.store import Store
from fleetvpn.model import Report

from .apiutil import Server, enroll

KEY2 = "y" * 42 + "w="  # base64 of 32 bytes
START = datetime(2026, 1, 1, tzinfo=UTC)


def report(node: str, n: int) -> Report:
    return Report.from_json(
        {
            "schema_version": 1,
            "report_id": str(uuid.uuid4()),
            "node": node,
            "site": "branch",
            "created_at": (START + timedelta(seconds=n)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "measurements": [
                {"peer": "hub", "family": 4, "rx_bytes": 100 + n, "tx_bytes": 200,
                 "path_mtu": 1400, "rtt_s": 0.02, "loss_ratio": 0.0, "handshake_age_s": 5.0,
                 "endpoint": "198.19.1.11:51820"}
            ],
            "configured": {},
        }
    )  # fmt: skip


def never(e: ControllerError) -> None:
    raise AssertionError(f"the controller failed: {e}")


class Recording(Client):
    """The real client, remembering which reports went out in which request."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.requests: list[tuple[str, list[str]]] = []

    def post_reports(self, docs: list[dict[str, Any]]) -> list[str | None]:
        self.requests.append(("batch", [d["report_id"] for d in docs]))
        return super().post_reports(docs)

    def post_report(self, doc: dict[str, Any]) -> None:
        self.requests.append(("one", [doc["report_id"]]))
        super().post_report(doc)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(f"sqlite+pysqlite:///{tmp_path / 'controller.db'}")
    yield s
    s.close()


def spooled(tmp_path: Path, reports: list[Report]) -> tuple[Spool, list[str]]:
    logs: list[str] = []
    spool = Spool(tmp_path / "spool", 1000, logs.append)
    for r in reports:
        spool.put(r)
    return spool, logs


def test_replay_in_order_in_batches_exactly_once(tmp_path: Path, store: Store) -> None:
    reports = [report("branch1", n) for n in range(250)]
    spool, logs = spooled(tmp_path, reports)
    failures: list[ControllerError] = []
    with Server(store) as api:
        token = enroll(api, store.create_admin_token(), "branch1", "branch")
        client = Recording(str(api.base_url), token=token)
        # the controller away: every report kept, the failure reported
        away = Client("http://127.0.0.1:9", token=token)
        assert replay(spool, away, batches=True, failed=failures.append) == (0, True)
        assert len(spool) == 250 and len(failures) == 1
        assert replay(spool, client, batches=True, failed=failures.append) == (250, True)
        assert len(failures) == 1 and len(spool) == 0
        assert [kind for kind, _ in client.requests] == ["batch"] * 3
        assert [len(ids) for _, ids in client.requests] == [100, 100, 50]
        sent = [i for _, ids in client.requests for i in ids]
        assert sent == [r.report_id for r in reports]  # oldest first
        assert store.report_count("branch1") == 250
        # a crash between send and delete: the replayed report is acknowledged, not stored twice
        spool.put(reports[7])
        spool.put(report("branch1", 300))
        assert replay(spool, client, batches=True, failed=failures.append) == (2, True)
        assert store.report_count("branch1") == 251 and len(spool) == 0
    assert spool.stats()["rejected"] == 0 and not logs


def test_a_refused_report_is_dropped_and_logged_the_rest_stored(
    tmp_path: Path, store: Store
) -> None:
    reports = [report("branch1", n) for n in range(5)]
    foreign = report("branch2", 2)  # another node's report: 403 for it alone, for ever
    reports.insert(2, foreign)
    spool, logs = spooled(tmp_path, reports)
    with Server(store) as api:
        admin = store.create_admin_token()
        token = enroll(api, admin, "branch1", "branch")
        enroll(api, admin, "branch2", "branch", key=KEY2)
        client = Recording(str(api.base_url), token=token)
        assert replay(spool, client, batches=True, failed=never) == (5, True)
    assert len(client.requests) == 1 and len(spool) == 0
    assert store.report_count("branch1") == 5 and store.report_count("branch2") == 0
    assert spool.stats()["rejected"] == 1 and spool.stats()["sent"] == 5
    assert len(logs) == 1 and foreign.report_id in logs[0] and "HTTP 403" in logs[0]
    kept = list((tmp_path / "spool" / "rejected").glob("*.json"))
    assert len(kept) == 1 and foreign.report_id in kept[0].read_text()


def test_a_batch_too_large_is_halved(tmp_path: Path, store: Store) -> None:
    reports = [report("branch1", n) for n in range(120)]
    spool, logs = spooled(tmp_path, reports)
    size = len(json.dumps(reports[0].to_json(), separators=(",", ":")))
    # a batch may be 16 single-report limits: 100 reports do not fit, 50 do
    with Server(store, max_body_bytes=size * 4) as api:
        token = enroll(api, store.create_admin_token(), "branch1", "branch")
        client = Recording(str(api.base_url), token=token)
        assert replay(spool, client, batches=True, failed=never) == (120, True)
    assert [len(ids) for _, ids in client.requests] == [100, 50, 50, 20]
    assert [i for _, ids in client.requests[1:] for i in ids] == [r.report_id for r in reports]
    assert store.report_count("branch1") == 120 and len(spool) == 0
    assert any("too large" in line for line in logs)


def test_an_older_controller_gets_one_report_a_request(tmp_path: Path, store: Store) -> None:
    reports = [report("branch1", n) for n in range(4)]
    spool, logs = spooled(tmp_path, reports)
    server = Server(store)
    app = server.app

    async def without_batches(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/v1/reports/batch":
            body = b'{"error":"not found"}'
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})  # fmt: skip
            await send({"type": "http.response.body", "body": body})
            return
        await app(scope, receive, send)

    server.server.config.app = without_batches
    with server as api:
        token = enroll(api, store.create_admin_token(), "branch1", "branch")
        client = Recording(str(api.base_url), token=token)
        assert replay(spool, client, batches=True, failed=never) == (4, False)
        assert client.requests[0] == ("batch", [r.report_id for r in reports])
        assert client.requests[1:] == [("one", [r.report_id]) for r in reports]
        assert store.report_count("branch1") == 4 and len(spool) == 0
        assert any("older controller" in line for line in logs)
        # remembered: the next replay asks the batch path no more
        spool.put(report("branch1", 10))
        client.requests.clear()
        assert replay(spool, client, batches=False, failed=never) == (1, False)
        assert [kind for kind, _ in client.requests] == ["one"]
    assert store.report_count("branch1") == 5

"""Issue 11's hostile-input suite: a real ``fleetvpn controller serve`` process, driven over HTTP
as an attacker holding a node token, an enrollment token or nothing would drive it.

Every case asserts: no 500 (nor any 5xx) ever; afterwards the fleet view still computes
(``GET /v1/health`` 200) and another node's report still lands (201). Property-based bodies
(hypothesis) for every endpoint that takes one, and each finding of the issue as a named test.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetvpn import grammar

from .apiutil import wait_serving

HUB_KEY = "h" * 42 + "A="
VICTIM_KEY = "v" * 42 + "A="
HOSTILE_KEY = "x" * 42 + "A="
HUB_ENDPOINT = "198.19.1.11:51820"
EXAMPLES = 40  # per endpoint: the whole suite stays well under a minute on a shared machine


class Controller:
    """A ``fleetvpn controller serve`` process on loopback, with its database file at hand."""

    def __init__(self, directory: Path, extra_config: str = "") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.db = directory / "controller.db"
        self.config = directory / "controller.yml"
        self.config.write_text(
            f"listen: 127.0.0.1:{self.port}\ndatabase: sqlite:///{self.db}\n{extra_config}"
        )
        admin = _fleetvpn("controller", "admin-token", "--config", str(self.config))
        assert admin.returncode == 0, admin.stderr
        self.admin = admin.stdout.strip()
        self.log = (directory / "serve.log").open("w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fleetvpn", "controller", "serve", "--config", str(self.config)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)
        wait_serving(self.http, self.process, logs=self.logs)

    def logs(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def close(self) -> None:
        self.http.close()
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()

    def admin_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.admin}"}

    def enrollment_token(self, site: str) -> str:
        r = self.http.post(
            "/v1/enrollment-tokens", json={"site": site}, headers=self.admin_headers()
        )
        assert r.status_code == 201, r.text
        return str(r.json()["enrollment_token"])

    def enroll(self, name: str, site: str, key: str, **extra: Any) -> str:
        body = {"enrollment_token": self.enrollment_token(site), "name": name, "public_key": key}
        r = self.http.post("/v1/enroll", json={**body, **extra})
        assert r.status_code == 201, r.text
        return str(r.json()["node_token"])


def _fleetvpn(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleetvpn", *args], capture_output=True, text=True, timeout=120
    )


def report(node: str, site: str, **changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema_version": 1,
        "report_id": str(uuid.uuid4()),
        "node": node,
        "site": site,
        "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "measurements": [
            {"peer": "hub", "family": 4, "rx_bytes": 100, "tx_bytes": 200, "path_mtu": 1400,
             "rtt_s": 0.02, "loss_ratio": 0.0, "handshake_age_s": 5.0,
             "endpoint": HUB_ENDPOINT}
        ],
        "configured": {"interface_mtu": 1420, "peers": [{"peer": "hub", "keepalive_s": 25}]},
    }  # fmt: skip
    doc.update(changes)
    return doc


class Fleet:
    """The hostile suite's controller: a hub, a victim that keeps reporting, an attacker."""

    def __init__(self, controller: Controller) -> None:
        self.c = controller
        self.hub = controller.enroll("hub", "hub", HUB_KEY, endpoint=HUB_ENDPOINT)
        self.victim = controller.enroll("victim", "branch", VICTIM_KEY)
        self.hostile = controller.enroll("hostile", "branch", HOSTILE_KEY)

    def node(self, token: str, **headers: str) -> dict[str, str]:
        return {"authorization": f"Bearer {token}", **headers}

    def still_serves(self, after: str = "") -> None:
        """The fleet view computes and another node's report lands."""
        r = self.c.http.get("/v1/health", headers=self.c.admin_headers())
        assert r.status_code == 200, f"{after}: health {r.status_code} {r.text[:300]}"
        assert json.loads(r.content)["schema_version"] == 1
        r = self.c.http.post(
            "/v1/reports", json=report("victim", "branch"), headers=self.node(self.victim)
        )
        assert r.status_code == 201, f"{after}: victim's report {r.status_code} {r.text[:300]}"

    def check(self, response: httpx.Response, what: str) -> httpx.Response:
        assert response.status_code < 500, f"{what}: {response.status_code} {response.text[:500]}"
        if response.status_code >= 400 and response.text != "Invalid HTTP request received.":
            assert "error" in response.json(), response.text[:300]  # (that: uvicorn's own 400)
        return response


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    directory = tmp_path_factory.mktemp("hostile")
    controller = Controller(
        directory,
        "retention_days: 30\nreport_rate_per_min: 600000\nreport_burst: 100000\n",
    )
    try:
        yield Fleet(controller)
    finally:
        controller.close()
        logs = (directory / "serve.log").read_text()
        assert "Traceback" not in logs, logs[-5000:]


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Controller]:
    """A controller with tight limits: 3 report requests per node in a burst (then one a
    minute), 100 stored reports per node, /metrics behind a token."""
    directory = tmp_path_factory.mktemp("limited")
    token_file = directory / "metrics.token"
    token_file.write_text("s3cret-metrics-token\n")
    controller = Controller(
        directory,
        "report_rate_per_min: 1\nreport_burst: 3\nmax_reports_per_node: 100\n"
        f"metrics_token_file: {token_file}\n",
    )
    try:
        yield controller
    finally:
        controller.close()


# --- property-based bodies for every endpoint --------------------------------------------------

_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=12) | st.sampled_from(
    ["", "\ufeff", "\ud800", "a\nb", "[fe80::1%1]:51820", "٥١٨٢٠", "198.18.0.1:٥١٨٢٠",
     "hub\n[Interface]", "..", "-" * 70, "9999-12-31T23:59:59Z", "x" * 5000]
)  # fmt: skip
_NUMBER = (
    st.integers()
    | st.floats()
    | st.sampled_from([2**64, -(2**63) - 1, 1e308])
    | st.sampled_from([400, 5000]).map(lambda digits: 10**digits)  # (no repr: 4,300 digits)
)
_JSON: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | _NUMBER | _TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=8,
)


def _encode(value: Any) -> bytes:
    """JSON text of ``value`` as an attacker may send it: lone surrogates escaped, NaN and
    infinities as the standard library writes them, huge integers in full."""
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        return json.dumps(value).encode()
    finally:
        sys.set_int_max_str_digits(limit)


def _raw_bodies() -> st.SearchStrategy[bytes]:
    nasty = st.sampled_from(
        [b"", b"\xef\xbb\xbf{}", b"[" * 5000 + b"]" * 5000, b'{"a":' * 3000 + b"1" + b"}" * 3000,
         b"[" + b"1" * 5000 + b"]", b'{"\\ud800": 1}', b'{"a": 1, "a": 2}', b"\xff\xfe{\x00}\x00",
         b"null", b"[]", b'"text"', b"1e400", b"NaN", b"{" * 20]
    )  # fmt: skip
    return nasty | st.binary(max_size=64) | _JSON.map(_encode)


_CONTENT_TYPES = st.sampled_from(
    [None, "application/json", "text/plain", "application/x-www-form-urlencoded",
     "application/json; charset=utf-16", "multipart/form-data; boundary=x", "\x7f"]
)  # fmt: skip


def _headers(content_type: str | None, **more: str) -> dict[str, str]:
    return {**more, **({"content-type": content_type} if content_type is not None else {})}


@st.composite
def _hostile_report(draw: st.DrawFn) -> Any:
    """A valid report of the hostile node with one part replaced by something else."""
    doc = report("hostile", "branch")
    paths: list[tuple[Any, ...]] = [
        ("report_id",), ("node",), ("site",), ("created_at",), ("measurements",),
        ("measurements", 0, "peer"), ("measurements", 0, "endpoint"),
        ("measurements", 0, "family"), ("measurements", 0, "rx_bytes"),
        ("measurements", 0, "path_mtu"), ("measurements", 0, "rtt_s"), ("configured",),
        ("configured", "peers", 0, "peer"), ("nat",), ("schema_version",),
    ]  # fmt: skip
    path = draw(st.sampled_from(paths))
    value = draw(_JSON)
    target = doc
    for key in path[:-1]:
        target = target[key]
    if draw(st.booleans()):
        target[path[-1]] = value
    else:  # a key that is not in the schema
        target[draw(_TEXT)] = value
    return doc


_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@_SETTINGS
@given(body=_raw_bodies() | _hostile_report().map(_encode), content_type=_CONTENT_TYPES)
def test_reports_never_500(fleet: Fleet, body: bytes, content_type: str | None) -> None:
    headers = fleet.node(fleet.hostile, **_headers(content_type))
    fleet.check(fleet.c.http.post("/v1/reports", content=body, headers=headers), "report")
    fleet.still_serves("report")


@_SETTINGS
@given(
    items=st.lists(_hostile_report() | _JSON, max_size=4).map(_encode) | _raw_bodies(),
    content_type=_CONTENT_TYPES,
)
def test_batches_never_500(fleet: Fleet, items: bytes, content_type: str | None) -> None:
    headers = fleet.node(fleet.hostile, **_headers(content_type))
    r = fleet.check(fleet.c.http.post("/v1/reports/batch", content=items, headers=headers), "batch")
    if r.status_code == 200:
        assert all(result["status"] < 500 for result in r.json()["results"]), r.text
    fleet.still_serves("batch")


@st.composite
def _enrollment(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "enrollment_token": "fve_" + "a" * 43,  # unknown: refused unless the body is refused first
        "name": draw(st.sampled_from(["newnode", "hub"]) | _TEXT),
        "public_key": draw(st.sampled_from(["n" * 42 + "A=", HUB_KEY, "n" * 43 + "="]) | _TEXT),
        "listen_port": draw(st.integers(-5, 70000) | _JSON),
        "endpoint": draw(st.sampled_from(["198.18.0.9:51820", "vpn.example.com:51820"]) | _TEXT),
    }
    for key in draw(st.lists(st.sampled_from(sorted(doc)), max_size=2)):
        doc.pop(key, None)
    return doc


@_SETTINGS
@given(doc=_enrollment(), raw=st.none() | _raw_bodies(), content_type=_CONTENT_TYPES)
def test_enroll_never_500(
    fleet: Fleet, doc: dict[str, Any], raw: bytes | None, content_type: str | None
) -> None:
    r = fleet.c.http.post(
        "/v1/enroll", content=_encode(doc) if raw is None else raw, headers=_headers(content_type)
    )
    fleet.check(r, "enroll")
    assert r.status_code != 201  # the token is unknown: nothing is enrolled
    fleet.still_serves("enroll")


@_SETTINGS
@given(
    doc=st.fixed_dictionaries({"site": _TEXT | st.just("branch")}, optional={"valid_for_s": _JSON})
    | _JSON,
    content_type=_CONTENT_TYPES,
)
def test_enrollment_tokens_never_500(fleet: Fleet, doc: Any, content_type: str | None) -> None:
    headers = _headers(content_type, **fleet.c.admin_headers())
    r = fleet.c.http.post("/v1/enrollment-tokens", content=_encode(doc), headers=headers)
    fleet.check(r, "enrollment-tokens")
    if r.status_code == 201:
        assert grammar.is_name(r.json()["site"])
    fleet.still_serves("enrollment-tokens")


@_SETTINGS
@given(
    doc=st.fixed_dictionaries(
        {
            "scope": st.sampled_from(["site", "node", "link"]) | _TEXT,
            "target": st.sampled_from(["branch", "victim", "victim>hub"]) | _TEXT,
            "setting": st.sampled_from(["tunnel_mtu", "keepalive_s"]) | _TEXT,
            "value": st.integers(-10, 70000) | _JSON,
        },
        optional={"note": _TEXT},
    )
    | _JSON,
    path=st.tuples(_TEXT, _TEXT, _TEXT),
)
def test_overrides_never_500(fleet: Fleet, doc: Any, path: tuple[str, str, str]) -> None:
    headers = fleet.c.admin_headers()
    r = fleet.check(fleet.c.http.put("/v1/overrides", content=_encode(doc), headers=headers), "put")
    if r.status_code == 200:
        stored = r.json()["override"]
        assert grammar.is_line(stored["note"]) and len(stored["note"]) <= 200
        url = "/v1/overrides/" + "/".join(
            quote(stored[k], safe="") for k in ("scope", "target", "setting")
        )
        assert fleet.c.http.delete(url, headers=headers).status_code == 200
    url = "/v1/overrides/" + "/".join(quote(p.encode("utf-8", "surrogatepass")) for p in path)
    fleet.check(fleet.c.http.delete(url, headers=headers), "delete")
    fleet.check(
        fleet.c.http.get(
            f"/v1/links/{quote(path[0].encode('utf-8', 'surrogatepass'))}/hub/history",
            headers=headers,
        ),
        "history",
    )
    fleet.still_serves("overrides")


# --- each finding of issue 11, by name -----------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"endpoint": "[fe80::1%1]:51820\n[Interface]\nPostUp = touch /pwned\n#]:51820"},
         "endpoint"),
        ({"endpoint": "[fe80::1%eth0]:51820"}, "endpoint"),
        ({"endpoint": "198.18.0.1:٥١٨٢٠"}, "endpoint"),
        ({"listen_port": "٥١٨٢٠"}, "listen_port"),
        ({"listen_port": 0}, "listen_port"),
        ({"name": "evil\nname"}, "name"),
        ({"public_key": "--help"}, "public_key"),
        ({"public_key": "x" * 43 + "="}, "public_key"),  # padding bits set: wg refuses it
    ],
)  # fmt: skip
def test_enroll_refuses_what_would_reach_other_nodes_files(
    fleet: Fleet, extra: dict[str, Any], field: str
) -> None:
    body = {"enrollment_token": fleet.c.enrollment_token("branch"), "name": "evil",
            "public_key": "e" * 42 + "A=", **extra}  # fmt: skip
    r = fleet.c.http.post("/v1/enroll", json=body)
    assert r.status_code == 422 and r.json()["error"].startswith(f"{field}:"), r.text
    fleet.still_serves()


def test_an_enrolled_endpoint_is_stored_canonical_and_dns_names_are_allowed(fleet: Fleet) -> None:
    fleet.c.enroll("dnsnode", "hub", "d" * 42 + "A=", endpoint="VPN.Example.COM.:51820")
    fleet.c.enroll("v6node", "hub", "6" * 42 + "A=", endpoint="[2001:DB8:0::1]:51820")
    nodes = fleet.c.http.get("/v1/nodes", headers=fleet.c.admin_headers()).json()["nodes"]
    endpoints = {n["name"]: n["endpoint"] for n in nodes}
    assert endpoints["dnsnode"] == "vpn.example.com:51820"
    assert endpoints["v6node"] == "[2001:db8::1]:51820"
    desired = fleet.c.http.get("/v1/nodes/victim/desired", headers=fleet.node(fleet.victim))
    peers = {p["peer"]: p["endpoint"] for p in desired.json()["peers"]}
    assert peers["dnsnode"] == "vpn.example.com:51820"


def test_a_report_with_a_byte_order_mark_is_refused(fleet: Fleet) -> None:
    body = b"\xef\xbb\xbf" + json.dumps(report("hostile", "branch")).encode()
    r = fleet.c.http.post("/v1/reports", content=body, headers=fleet.node(fleet.hostile))
    assert r.status_code == 400 and "byte order mark" in r.json()["error"]
    fleet.still_serves()


@pytest.mark.parametrize(
    "body",
    [
        b'{"node": "\\ud800"}',
        b'{"\\ud800": 1}',
        b'{"a": "\xed\xa0\x80"}',  # a surrogate encoded in UTF-8: not UTF-8
        b'{"a": "\xff"}',
    ],
)
def test_lone_surrogates_and_invalid_utf8_are_a_400(fleet: Fleet, body: bytes) -> None:
    for path in ("/v1/reports", "/v1/reports/batch", "/v1/enroll"):
        r = fleet.c.http.post(path, content=body, headers=fleet.node(fleet.hostile))
        assert r.status_code == 400, r.text
    fleet.still_serves()


@pytest.mark.parametrize(
    ("created_at", "problem"),
    [
        ("9999-12-31T23:59:59Z", "ahead of the controller's clock"),
        ("+6 minutes", "ahead"),  # from the clock when the test runs, not when it is collected
        ("2001-01-01T00:00:00Z", "older than the retention (30 days)"),
    ],
)
def test_created_at_far_from_the_controllers_clock_is_a_422(
    fleet: Fleet, created_at: str, problem: str
) -> None:
    if created_at == "+6 minutes":
        created_at = (datetime.now(UTC) + timedelta(minutes=6)).strftime("%Y-%m-%dT%H:%M:%SZ")
    doc = report("hostile", "branch", created_at=created_at)
    for path, body in (("/v1/reports", doc), ("/v1/reports/batch", [doc])):
        r = fleet.c.http.post(path, json=body, headers=fleet.node(fleet.hostile))
        error = r.json()["error"] if path == "/v1/reports" else r.json()["results"][0]["error"]
        assert "created_at:" in error and problem in error, r.text
    ahead = (datetime.now(UTC) + timedelta(minutes=4)).strftime("%Y-%m-%dT%H:%M:%SZ")
    r = fleet.c.http.post(
        "/v1/reports", json=report("hostile", "branch", created_at=ahead),
        headers=fleet.node(fleet.hostile),
    )  # fmt: skip
    assert r.status_code == 201, r.text  # a few minutes of clock skew is a node's right


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"[" * 5000 + b"]" * 5000, "nested"),
        (b'{"node": ' + b"1" * 5000 + b"}", "body: "),
        (b'{"\\udc80": 1}', "lone surrogate"),
        (b'{"report_id": 1, "report_id": 2}', "appears twice"),
        (b"[1e999]", "double"),
        (b"", "not valid JSON"),
    ],
)
def test_bodies_that_were_a_500_are_a_400_naming_the_problem(
    fleet: Fleet, body: bytes, problem: str
) -> None:
    for path in ("/v1/reports", "/v1/reports/batch", "/v1/enroll", "/v1/enrollment-tokens",
                 "/v1/overrides"):  # fmt: skip
        method = fleet.c.http.put if path == "/v1/overrides" else fleet.c.http.post
        token = fleet.c.admin if path in ("/v1/enrollment-tokens", "/v1/overrides") else None
        headers = fleet.node(token or fleet.hostile)
        r = method(path, content=body, headers=headers)
        assert r.status_code == 400 and problem in r.json()["error"], (path, r.text)
    fleet.still_serves()


def test_a_timestamp_in_other_digits_is_a_422(fleet: Fleet) -> None:
    created_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ").replace("2", "٢")
    doc = report("hostile", "branch", created_at=created_at)
    r = fleet.c.http.post("/v1/reports", json=doc, headers=fleet.node(fleet.hostile))
    assert r.status_code == 422 and r.json()["error"].startswith("created_at:"), r.text


def test_a_wrong_content_type_is_a_415(fleet: Fleet) -> None:
    body = json.dumps(report("hostile", "branch")).encode()
    headers = fleet.node(fleet.hostile, **{"content-type": "text/plain"})
    r = fleet.c.http.post("/v1/reports", content=body, headers=headers)
    assert r.status_code == 415 and r.json()["error"].startswith("content-type:")


def test_one_bad_report_fails_alone_in_a_group_commit(fleet: Fleet) -> None:
    """Reports arriving together are written in one transaction; a bad one is refused and
    the others of the group land (the issue: one lone surrogate gave every one a 500)."""
    statuses: list[int] = []

    def send(doc_or_body: Any, token: str) -> None:
        with httpx.Client(base_url=str(fleet.c.http.base_url), timeout=60) as client:
            content = doc_or_body if isinstance(doc_or_body, bytes) else _encode(doc_or_body)
            r = client.post("/v1/reports", content=content, headers=fleet.node(token))
            statuses.append(r.status_code)

    bad = report("hostile", "branch")
    bad["measurements"][0]["endpoint"] = "\ud800"
    jobs = [(_encode(bad), fleet.hostile)] + [
        (report("victim", "branch"), fleet.victim) for _ in range(8)
    ]
    threads = [threading.Thread(target=send, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [201] * 8 + [400], statuses


def test_group_commit_falls_back_to_one_by_one_on_any_error(tmp_path: Path) -> None:
    """A value the driver cannot even encode (sqlite3 raises UnicodeEncodeError, not a
    DBAPIError) fails its own report only; the others in the same transaction land."""
    from fleetvpn.controller.store import Store, Unstorable, sqlite_url

    store = Store.open(sqlite_url(str(tmp_path / "c.db")))
    try:
        token, _ = store.enroll(store.create_enrollment_token("s"), "a", "a" * 42 + "A=")
        who = store.authenticate(token)
        assert who is not None
        now = datetime.now(UTC)
        items = [(who, str(uuid.uuid4()), now, "{}", [], None) for _ in range(3)]
        items[1] = (who, items[1][1], now, "\ud800", [], None)  # a lone surrogate
        results = store.put_reports(items)
        assert results[0] is True and results[2] is True
        assert isinstance(results[1], Unstorable), results
        assert store.report_count() == 2
    finally:
        store.close()


def test_a_65_mb_report_is_refused_inside_a_batch_too(fleet: Fleet) -> None:
    big = report("hostile", "branch")
    big["measurements"] = [
        {"peer": f"p{i}", "family": 4, "rx_bytes": 1, "tx_bytes": 1, "rtt_s": 0.001 * (i % 7),
         "path_mtu": 1400, "loss_ratio": 0.0, "handshake_age_s": 1.0, "icmp_seen": False}
        for i in range(45000)
    ]  # fmt: skip
    small = report("hostile", "branch")
    body = _encode([big, small])
    assert len(body) > 6_500_000
    r = fleet.c.http.post("/v1/reports/batch", content=body, headers=fleet.node(fleet.hostile))
    assert r.status_code == 200, r.text
    first, second = r.json()["results"]
    assert first["status"] == 413 and "over the limit" in first["error"]
    assert second["status"] == 201
    fleet.still_serves()


def test_a_stored_row_the_view_cannot_read_stops_nothing(fleet: Fleet) -> None:
    """An older version stored a report body with a byte order mark, and a node row with the
    issue's endpoint: the view skips both, says so, and serves everything else."""
    rogue = fleet.c.enroll("rogue", "branch", "r" * 42 + "A=")
    assert (
        fleet.c.http.post(
            "/v1/reports", json=report("rogue", "branch"), headers=fleet.node(rogue)
        ).status_code
        == 201
    )
    bad_id = str(uuid.uuid4())
    with sqlite3.connect(fleet.c.db, timeout=30) as db:
        (node_id,) = db.execute("SELECT id FROM nodes WHERE name = 'rogue'").fetchone()
        received = db.execute("SELECT max(received_at) FROM reports").fetchone()[0]
        body = "\ufeff" + json.dumps(report("rogue", "branch", report_id=bad_id))
        db.execute(
            "INSERT INTO reports (report_id, node_id, created_at, received_at, body)"
            " VALUES (?, ?, ?, ?, ?)",
            (bad_id, node_id, received, received, body),
        )
        db.execute("UPDATE nodes SET latest_report_id = ? WHERE id = ?", (bad_id, node_id))
        db.execute(
            "UPDATE nodes SET endpoint = ? WHERE name = 'hostile'",
            ("[fe80::1%1]:51820\n[Interface]\nPostUp = touch /pwned\n#]:51820",),
        )
    fleet.still_serves("a bad row")  # the victim's write makes the view read the store again
    admin = fleet.c.admin_headers()
    health = fleet.c.http.get("/v1/health", headers=admin)
    assert health.status_code == 200
    rows = [row for row in health.json()["links"] if "rogue" in (row["a"], row["b"])]
    assert rows and all("unreadable" in row["reason"] for row in rows), rows
    for token, name in ((fleet.victim, "victim"), (fleet.hub, "hub")):
        desired = fleet.c.http.get(f"/v1/nodes/{name}/desired", headers=fleet.node(token))
        assert desired.status_code == 200, desired.text
        assert "PostUp" not in desired.text and "fe80" not in desired.text
    assert fleet.c.http.get("/metrics").status_code == 200
    assert fleet.c.http.get("/v1/nodes/hub/config/wg-quick", headers=admin).status_code == 200
    # Logged once per row, not once per recompute.
    fleet.still_serves()
    fleet.still_serves()
    assert fleet.c.logs().count(f"stored report {bad_id} is unreadable") == 1


def test_a_node_over_its_rate_gets_429_with_retry_after(limited: Controller) -> None:
    token = limited.enroll("chatty", "branch", "c" * 42 + "A=")
    headers = {"authorization": f"Bearer {token}"}
    statuses = [
        limited.http.post("/v1/reports", json=report("chatty", "branch"), headers=headers)
        for _ in range(4)
    ]
    assert [r.status_code for r in statuses] == [201, 201, 201, 429]
    assert 1 <= int(statuses[-1].headers["retry-after"]) <= 60
    assert "retry after" in statuses[-1].json()["error"]
    batch = limited.http.post("/v1/reports/batch", json=[], headers=headers)
    assert batch.status_code == 429 and "retry-after" in batch.headers
    # Another node is not held back by the chatty one.
    other = limited.enroll("quiet", "branch", "q" * 42 + "A=")
    r = limited.http.post(
        "/v1/reports", json=report("quiet", "branch"), headers={"authorization": f"Bearer {other}"}
    )
    assert r.status_code == 201


def test_a_node_keeps_at_most_its_quota_of_reports(limited: Controller) -> None:
    token = limited.enroll("hoarder", "branch", "o" * 42 + "A=")
    headers = {"authorization": f"Bearer {token}"}
    now = datetime.now(UTC)
    for batch in range(2):
        docs = [
            report("hoarder", "branch",
                   created_at=(now - timedelta(seconds=batch * 100 + i)).strftime(
                       "%Y-%m-%dT%H:%M:%SZ"))
            for i in range(80)
        ]  # fmt: skip
        r = limited.http.post("/v1/reports/batch", json=docs, headers=headers)
        assert r.status_code == 200 and r.json()["stored"] == 80, r.text
    with sqlite3.connect(limited.db, timeout=30) as db:
        (count,) = db.execute(
            "SELECT count(*) FROM reports JOIN nodes ON nodes.id = reports.node_id"
            " WHERE nodes.name = 'hoarder'"
        ).fetchone()
    assert 100 <= count <= 102  # the quota, and the node's two newest by created_at


def test_metrics_want_their_bearer_token_when_configured(limited: Controller, fleet: Fleet) -> None:
    assert limited.http.get("/metrics").status_code == 401
    assert limited.http.get("/metrics").headers["www-authenticate"] == "Bearer"
    wrong = limited.http.get("/metrics", headers={"authorization": "Bearer s3cret"})
    assert wrong.status_code == 401
    admin = limited.http.get("/metrics", headers=limited.admin_headers())
    assert admin.status_code == 401  # the metrics token only: Prometheus holds nothing else
    right = limited.http.get("/metrics", headers={"authorization": "Bearer s3cret-metrics-token"})
    assert right.status_code == 200 and "fleetvpn_view_age_seconds" in right.text
    assert fleet.c.http.get("/metrics").status_code == 200  # no token configured: open


def test_the_suite_runs_a_real_serve_process(fleet: Fleet) -> None:
    assert fleet.c.process.poll() is None
    assert os.path.exists(fleet.c.db)


def test_the_limits_are_config_keys(tmp_path: Path) -> None:
    from fleetvpn.controller.config import ConfigError, parse, read_token_file

    default = parse("")
    assert (default.report_rate_per_min, default.report_burst) == (12, 30)
    assert (default.max_reports_per_node, default.metrics_token_file) == (50000, None)
    token = tmp_path / "metrics.token"
    token.write_text("abc123\n")
    config = parse(f"metrics_token_file: {token}\nmax_reports_per_node: 100\n")
    assert config.metrics_token_file == token and read_token_file(token) == "abc123"
    with pytest.raises(ConfigError, match=r"metrics_token_file: .* does not exist"):
        parse(f"metrics_token_file: {tmp_path}/none\n")
    with pytest.raises(ConfigError, match="report_rate_per_min: must be an integer in 1"):
        parse("report_rate_per_min: 0\n")
    token.write_text("two words\n")
    with pytest.raises(ConfigError, match="must hold one token"):
        read_token_file(token)

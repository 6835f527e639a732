"""The controller API over real HTTP (uvicorn on loopback) with a real SQLite store: trust rules,
idempotent reports, and bad input that gets a clear 4xx and changes nothing."""

from __future__ import annotations

import ipaddress
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetvpn.controller.config import TunnelConfig
from fleetvpn.controller.store import Store

from .apiutil import AUTH_CACHE_TEST_S, PUBLIC_KEY, Server, bearer, enroll


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
             "endpoint": "198.19.1.11:51820"}
        ],
        "configured": {},
    }  # fmt: skip
    doc.update(changes)
    return doc


def test_openapi_is_published(api: httpx.Client) -> None:
    doc = api.get("/openapi.json").json()
    assert "/v1/reports" in doc["paths"] and "/v1/enroll" in doc["paths"]


def test_enroll_then_report_exactly_once(api: httpx.Client, store: Store) -> None:
    admin = store.create_admin_token()
    token = enroll(api, admin, "branch1", "branch")
    doc = report("branch1", "branch")
    first = api.post("/v1/reports", json=doc, headers=bearer(token))
    again = api.post("/v1/reports", json=doc, headers=bearer(token))
    assert (first.status_code, first.json()["stored"]) == (201, True)
    assert (again.status_code, again.json()["stored"]) == (200, False)
    assert store.report_count("branch1") == 1
    (link,) = store.latest_links()
    assert (link["node"], link["peer"], link["path_mtu"]) == ("branch1", "hub", 1400)


@pytest.mark.parametrize(
    ("mutate", "status", "message"),
    [
        (
            lambda d: {**d, "measurements": [{**d["measurements"][0], "path_mtu": 70000}]},
            422,
            "measurements[0].path_mtu",
        ),
        (
            lambda d: {**d, "measurements": [{**d["measurements"][0], "rtt_s": "fast"}]},
            422,
            "measurements[0].rtt_s",
        ),
        (  # a valid u64 WireGuard counter, but beyond the store's signed 64-bit columns
            lambda d: {**d, "measurements": [{**d["measurements"][0], "tx_bytes": 2**63}]},
            422,
            "measurements[0].tx_bytes: 9223372036854775808 is beyond what the controller stores",
        ),
        (lambda d: {**d, "colour": "red"}, 422, "colour"),
        (lambda d: {k: v for k, v in d.items() if k != "node"}, 422, "node"),
        (lambda d: {**d, "report_id": "not-a-uuid"}, 422, "report_id"),
        (lambda d: {**d, "node": "other"}, 403, "only its own reports"),
        (lambda d: {**d, "site": "elsewhere"}, 422, "site"),
    ],
)
def test_bad_reports_get_a_4xx_naming_the_field_and_store_nothing(
    api: httpx.Client, store: Store, mutate: Any, status: int, message: str
) -> None:
    admin = store.create_admin_token()
    token = enroll(api, admin, "branch1", "branch")
    r = api.post("/v1/reports", json=mutate(report("branch1", "branch")), headers=bearer(token))
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert store.report_count() == 0


def test_malformed_and_oversized_bodies(api: httpx.Client, store: Store) -> None:
    token = enroll(api, store.create_admin_token(), "branch1", "branch")
    r = api.post("/v1/reports", content=b"{not json", headers=bearer(token))
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    big = report("branch1", "branch", padding="x" * 100_000)
    r = api.post("/v1/reports", json=big, headers=bearer(token))
    assert r.status_code == 413 and "limit" in r.json()["error"]
    assert store.report_count() == 0


def test_tokens_unknown_revoked_and_wrong_kind(api: httpx.Client, store: Store) -> None:
    admin = store.create_admin_token()
    token = enroll(api, admin, "branch1", "branch")
    doc = report("branch1", "branch")
    assert api.post("/v1/reports", json=doc).status_code == 401
    assert api.post("/v1/reports", json=doc, headers=bearer("fvn_guess")).status_code == 401
    assert api.get("/v1/nodes", headers=bearer(token)).status_code == 403  # a node is no admin
    assert api.post("/v1/reports", json=doc, headers=bearer(admin)).status_code == 403
    store.revoke_node("branch1")
    time.sleep(AUTH_CACHE_TEST_S * 1.5)  # the documented bound: tokens are remembered that long
    r = api.post("/v1/reports", json=doc, headers=bearer(token))
    assert r.status_code == 401 and "revoked" in r.json()["error"]
    assert store.report_count() == 0


def test_enrollment_is_single_use_and_checks_its_input(api: httpx.Client, store: Store) -> None:
    admin = store.create_admin_token()
    r = api.post("/v1/enrollment-tokens", json={"site": "branch"}, headers=bearer(admin))
    token = r.json()["enrollment_token"]
    body = {"enrollment_token": token, "name": "branch1", "public_key": PUBLIC_KEY}
    assert api.post("/v1/enroll", json={**body, "public_key": "nope"}).status_code == 422
    assert api.post("/v1/enroll", json={**body, "name": "Bad_Name"}).status_code == 422
    assert api.post("/v1/enroll", json=body).status_code == 201
    r = api.post("/v1/enroll", json={**body, "name": "branch2"})
    assert r.status_code == 403 and "already used" in r.json()["error"]
    assert [n["name"] for n in api.get("/v1/nodes", headers=bearer(admin)).json()["nodes"]] == [
        "branch1"
    ]


def test_overrides(api: httpx.Client, store: Store) -> None:
    admin = store.create_admin_token()
    body = {"scope": "site", "target": "branch", "setting": "keepalive_s", "value": 15}
    assert api.put("/v1/overrides", json=body, headers=bearer(admin)).status_code == 200
    r = api.put("/v1/overrides", json={**body, "value": -1}, headers=bearer(admin))
    assert r.status_code == 422 and "value" in r.json()["error"]
    listed = api.get("/v1/overrides", headers=bearer(admin)).json()["overrides"]
    assert [(o["target"], o["value"]) for o in listed] == [("branch", 15)]
    r = api.delete("/v1/overrides/site/branch/keepalive_s", headers=bearer(admin))
    assert r.status_code == 200
    assert api.get("/v1/overrides", headers=bearer(admin)).json()["overrides"] == []


def test_an_override_no_agent_would_accept_is_refused(store: Store) -> None:
    """An override is what nodes apply: beyond what every agent accepts (keepalive 0..120 s, a
    tunnel MTU of at least 1280 where the tunnel carries IPv6) it would be refused on every node
    it reaches, and their tunnels would stay as they were without anyone being told."""
    tunnel = TunnelConfig(ipv6=ipaddress.IPv6Network("fd99::/64"))
    with Server(store, tunnel=tunnel) as api:
        admin = store.create_admin_token()
        site = {"scope": "site", "target": "branch"}
        for setting, value in (("keepalive_s", 121), ("tunnel_mtu", 1279), ("tunnel_mtu", 9001)):
            r = api.put(
                "/v1/overrides", json={**site, "setting": setting, "value": value},
                headers=bearer(admin),
            )  # fmt: skip
            assert r.status_code == 422 and "value" in r.json()["error"], (setting, value)
        r = api.put(
            "/v1/overrides", json={**site, "setting": "tunnel_mtu", "value": 1280},
            headers=bearer(admin),
        )  # fmt: skip
        assert r.status_code == 200
        assert [o["value"] for o in store.overrides()] == [1280]


def test_a_batch_judges_each_report_on_its_own(api: httpx.Client, store: Store) -> None:
    admin = store.create_admin_token()
    token = enroll(api, admin, "branch1", "branch")
    enroll(api, admin, "branch2", "branch", key="y" * 42 + "A=")
    stored_before = report("branch1", "branch")
    assert api.post("/v1/reports", json=stored_before, headers=bearer(token)).status_code == 201
    good = report("branch1", "branch")
    bad_mtu = report("branch1", "branch")
    bad_mtu["measurements"][0]["path_mtu"] = 70000
    batch = [
        good,
        stored_before,  # a replay
        bad_mtu,
        report("branch2", "branch"),  # another node's
        "not a report",
        good,  # twice in one batch: stored once
    ]
    r = api.post("/v1/reports/batch", json=batch, headers=bearer(token))
    assert r.status_code == 200, r.text
    answer = r.json()
    assert (answer["stored"], answer["replayed"], answer["rejected"]) == (1, 2, 3)
    results = answer["results"]
    assert [x["index"] for x in results] == list(range(6))
    assert [x["status"] for x in results] == [201, 200, 422, 403, 422, 200]
    assert [x["stored"] for x in results] == [True, False, False, False, False, False]
    assert results[0]["report_id"] == good["report_id"] and results[4]["report_id"] is None
    assert results[2]["error"].startswith("[2] measurements[0].path_mtu")
    assert "only its own reports" in results[3]["error"]
    assert "expected an object" in results[4]["error"]
    assert "error" not in results[0] and "error" not in results[1]
    assert store.report_count("branch1") == 2 and store.report_count("branch2") == 0
    again = api.post("/v1/reports/batch", json=[good], headers=bearer(token)).json()
    assert (again["stored"], again["replayed"], again["results"][0]["status"]) == (0, 1, 200)


def test_a_batch_refused_as_a_whole_stores_nothing(api: httpx.Client, store: Store) -> None:
    admin = store.create_admin_token()
    token = enroll(api, admin, "branch1", "branch")
    one = [report("branch1", "branch")]
    assert api.post("/v1/reports/batch", json=one).status_code == 401
    assert api.post("/v1/reports/batch", json=one, headers=bearer(admin)).status_code == 403
    r = api.post("/v1/reports/batch", content=b"[{", headers=bearer(token))
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = api.post("/v1/reports/batch", json=one[0], headers=bearer(token))
    assert r.status_code == 422 and "JSON array" in r.json()["error"]
    r = api.post("/v1/reports/batch", json=[{}] * 1001, headers=bearer(token))
    assert r.status_code == 413 and "1000" in r.json()["error"]
    huge = [report("branch1", "branch", padding="x" * 100_000) for _ in range(20)]
    r = api.post("/v1/reports/batch", json=huge, headers=bearer(token))
    assert r.status_code == 413 and "limit" in r.json()["error"]
    assert store.report_count() == 0
    assert api.post("/v1/reports/batch", json=[], headers=bearer(token)).json()["stored"] == 0


def test_report_routes_answer_json_with_no_store(api: httpx.Client, store: Store) -> None:
    token = enroll(api, store.create_admin_token(), "branch1", "branch")
    for path in ("/v1/reports", "/v1/reports/batch"):
        r = api.post(path, content=b"{", headers=bearer(token))
        assert r.headers["cache-control"] == "no-store"
        assert r.headers["content-type"] == "application/json"
    doc = api.get("/openapi.json").json()
    assert "post" in doc["paths"]["/v1/reports/batch"]
    assert api.get("/v1/reports", headers=bearer(token)).status_code == 405


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(value=_JSON)
def test_request_json_decodes_as_the_standard_library_does(value: Any) -> None:
    import json

    from fleetvpn.controller.api import decode_json

    text = json.dumps(value)
    assert decode_json(text.encode()) == json.loads(text)


@pytest.mark.parametrize(
    "body", [b"[18446744073709551616]", b"[-9223372036854775809]", b'{"a": [1.5, "\\u00e9"]}']
)
def test_what_orjson_refuses_the_standard_library_still_decides(body: bytes) -> None:
    import json

    from fleetvpn.controller.api import decode_json

    assert decode_json(body) == json.loads(body)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b'{"a": NaN}', "NaN is not a JSON number"),
        (b"[1e400]", "beyond a double's range"),
        (b'["\\ud800"]', "body[0]: has a lone surrogate"),
        (b'{"\\udc00": 1}', "a key has a lone surrogate"),
        ('{"a": 1}'.encode("utf-16"), "not UTF-8"),
        (b'\xef\xbb\xbf{"a": 1}', "byte order mark"),
        (b'{"a": "\xff"}', "not UTF-8"),
        (b'{"a": 1, "a": 2}', "key 'a' appears twice"),
        (b'{"a": {"b": 1, "b": 1}}', "key 'b' appears twice"),
        (b"[" + b"1" * 5000 + b"]", "body: "),
        (b"[" * 5000 + b"]" * 5000, "nested more than 32 deep"),
        (b"[" * 40 + b"]" * 40, "nested more than 32 deep"),
    ],
)
def test_json_no_stored_row_may_hold_is_a_400(body: bytes, problem: str) -> None:
    from fleetvpn.controller.api import ApiError, decode_json

    with pytest.raises(ApiError) as raised:
        decode_json(body)
    assert raised.value.status == 400 and problem in raised.value.message


def test_a_key_text_inside_a_string_is_not_a_duplicate() -> None:
    from fleetvpn.controller.api import decode_json

    assert decode_json(b'{"a": "x\\":", "b": 1}') == {"a": 'x":', "b": 1}


@pytest.mark.parametrize("body", [b"{", b'{"a": 1} x', b""])
def test_bad_json_is_a_400_with_the_standard_librarys_words(body: bytes) -> None:
    import json

    from fleetvpn.controller.api import ApiError, decode_json

    with pytest.raises(ApiError) as raised:
        decode_json(body)
    assert raised.value.status == 400
    try:
        json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        assert raised.value.message == f"body is not valid JSON: {e}"

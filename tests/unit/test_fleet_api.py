"""The fleet through the API: reports in, then health, tune, desired state and metrics out —
each value with its reason — over real HTTP on a real store."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from fleetvpn.controller.store import Store
from fleetvpn.controller.views import Views

from .apiutil import SERVERS, Server, bearer, enroll

NOW = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def link(peer: str, path_mtu: int, endpoint: str, **extra: Any) -> dict[str, Any]:
    return {"peer": peer, "family": 4, "rx_bytes": 1000, "tx_bytes": 2000, "path_mtu": path_mtu,
            "rtt_s": 0.02, "loss_ratio": 0.0, "handshake_age_s": 4.0, "endpoint": endpoint,
            **extra}  # fmt: skip


def send(api: httpx.Client, token: str, node: str, site: str, **doc: Any) -> None:
    body = {"schema_version": 1, "report_id": str(uuid.uuid4()), "node": node, "site": site,
            "created_at": NOW, "configured": {}, **doc}  # fmt: skip
    r = api.post("/v1/reports", json=body, headers=bearer(token))
    assert r.status_code == 201, r.text


def fleet(api: httpx.Client, store: Store) -> dict[str, str]:
    admin = store.create_admin_token()
    tokens = {
        "hub": enroll(api, admin, "hub", "hub", "h" * 42 + "A=", endpoint="198.19.1.11:51820"),
        "branch1": enroll(api, admin, "branch1", "branch", "b" * 42 + "A="),
    }
    send(
        api, tokens["branch1"], "branch1", "branch",
        measurements=[link("hub", 1400, "198.19.1.11:51820")],
        nat={"measured_at": NOW, "nat": True, "stateful_filter": True,
             "mapped_address": "198.18.2.6:40000", "mapping_lifetime_s": 19.55,
             "resolution_s": 1.0, "max_lifetime_s": 300.0},
        configured={"interface_mtu": 1420, "peers": [{"peer": "hub", "keepalive_s": 25}]},
    )  # fmt: skip
    send(
        api, tokens["hub"], "hub", "hub",
        measurements=[link("branch1", 1400, "198.18.2.6:40000")],
        nat={"measured_at": NOW, "nat": False, "stateful_filter": False,
             "mapped_address": "198.19.1.11:51820"},
        configured={"interface_mtu": 1420, "peers": [{"peer": "branch1", "keepalive_s": 0}]},
    )  # fmt: skip
    return {"admin": admin, **tokens}


def test_health_shows_the_black_hole_with_its_reason(api: httpx.Client, store: Store) -> None:
    t = fleet(api, store)
    doc = api.get("/v1/health", headers=bearer(t["admin"])).json()
    assert doc["schema_version"] == 1 and doc["healthy"] is False
    (row,) = doc["links"]
    assert (row["a"], row["b"], row["state"]) == ("branch1", "hub", "blackhole")
    assert "no ICMP was seen" in row["reason"]
    assert row["a_to_b"]["recommended_mtu"] == 1340 and row["a_to_b"]["configured_mtu"] == 1420
    sites = {s["site"]: s for s in doc["sites"]}
    assert sites["branch"]["keepalive_s"] == 8 and "19.55" in sites["branch"]["reason"]
    assert sites["hub"]["keepalive_s"] == 0
    problems = api.get("/v1/health?problems=true&site=hub", headers=bearer(t["admin"])).json()
    assert [r["state"] for r in problems["links"]] == ["blackhole"]


def test_tune_lists_what_would_change_and_why(api: httpx.Client, store: Store) -> None:
    t = fleet(api, store)
    changes = api.get("/v1/tune", headers=bearer(t["admin"])).json()["changes"]
    by_key = {(c["node"], c["setting"]): c for c in changes}
    mtu = by_key["branch1", "route_mtu"]
    assert (mtu["current"], mtu["recommended"]) == (1420, 1340) and "1400" in mtu["reason"]
    keepalive = by_key["branch1", "keepalive_s"]
    assert (keepalive["current"], keepalive["recommended"]) == (25, 8)
    assert ("hub", "keepalive_s") not in by_key  # the public hub keeps keepalive off
    branch_only = api.get("/v1/tune?site=hub", headers=bearer(t["admin"])).json()["changes"]
    assert {c["node"] for c in branch_only} == {"hub"}


def test_a_node_reads_only_its_own_desired_state(api: httpx.Client, store: Store) -> None:
    t = fleet(api, store)
    mine = api.get("/v1/nodes/branch1/desired", headers=bearer(t["branch1"]))
    assert mine.status_code == 200
    doc = mine.json()
    assert doc["interface_mtu"] == 1340 and doc["interface"] == "wg0"
    assert doc["addresses"] == ["10.99.0.2/16"] and doc["listen_port"] == 51820
    (peer,) = doc["peers"]
    assert (peer["peer"], peer["keepalive_s"], peer["route_mtu"]) == ("hub", 8, 1340)
    assert peer["public_key"] == "h" * 42 + "A=" and peer["endpoint"] == "198.19.1.11:51820"
    assert peer["allowed_ips"] == ["10.99.0.1/32"]
    assert "private" not in mine.text
    hub = api.get("/v1/nodes/hub/desired", headers=bearer(t["hub"])).json()
    assert [(p["peer"], p["endpoint"], p["keepalive_s"]) for p in hub["peers"]] == [
        ("branch1", None, 0)
    ]
    # the hub learns the keepalive branch1 holds its NAT's mapping with (its NAT watch)
    assert [p["peer_keepalive_s"] for p in hub["peers"]] == [8]
    assert peer["peer_keepalive_s"] == 0  # the hub sends branch1 none
    assert api.get("/v1/nodes/hub/desired", headers=bearer(t["branch1"])).status_code == 403
    assert api.get("/v1/nodes/nosuch/desired", headers=bearer(t["admin"])).status_code == 404


def test_two_nated_nodes_get_no_direct_tunnel(api: httpx.Client, store: Store) -> None:
    admin = store.create_admin_token()
    enroll(api, admin, "hub", "hub", "h" * 42 + "A=", endpoint="198.19.1.11:51820")
    enroll(api, admin, "a", "branch", "a" * 42 + "A=")
    enroll(api, admin, "b", "home", "b" * 42 + "A=")
    doc = api.get("/v1/health", headers=bearer(admin)).json()
    assert sorted((r["a"], r["b"]) for r in doc["links"]) == [("a", "hub"), ("b", "hub")]
    assert {r["state"] for r in doc["links"]} == {"down"}  # planned, never reported


def test_metrics_use_names_as_labels(api: httpx.Client, store: Store) -> None:
    fleet(api, store)
    text = api.get("/metrics").text
    assert 'fleetvpn_link_path_mtu_bytes{node="branch1",peer="hub",site="branch"} 1400.0' in text
    assert 'fleetvpn_site_keepalive_seconds{site="branch"} 8.0' in text
    assert 'fleetvpn_site_mapping_lifetime_seconds{site="branch"} 19.55' in text
    assert 'fleetvpn_link_state{a="branch1",b="hub",state="blackhole"} 1.0' in text
    assert "=" * 43 not in text and "hhhh" not in text  # no public keys
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(text)}  # valid exposition
    (compute,) = families["fleetvpn_view_compute_seconds"].samples
    (age,) = families["fleetvpn_view_age_seconds"].samples
    assert 0 < compute.value < 60 and 0 <= age.value < 60
    health = api.get("/v1/health", headers=bearer(store.create_admin_token()))
    assert 0 < float(health.headers["x-fleetvpn-view-compute-s"]) < 60


def _cli(*args: str, env: dict[str, str]) -> Any:
    from click.testing import CliRunner

    from fleetvpn.cli import cli

    return CliRunner().invoke(cli, list(args), env=env)


def test_health_and_tune_commands(api: httpx.Client, store: Store, tmp_path: Any) -> None:
    t = fleet(api, store)
    env = {"FLEETVPN_CONTROLLER": str(api.base_url), "FLEETVPN_TOKEN": t["admin"]}
    table = _cli("health", env=env)
    assert table.exit_code == 1  # a black hole is a problem
    assert "blackhole" in table.output and "branch1 ↔ hub" in table.output
    (row,) = [line for line in table.output.splitlines() if "branch1 ↔ hub" in line]
    assert "branch1⇄hub MTU 1420 > path 1400, no ICMP" in row  # one line
    assert all(len(line) <= 160 for line in table.output.splitlines())
    why = _cli("health", "--why", env=env)
    assert why.exit_code == 1 and "branch1 (branch) ↔ hub (hub): blackhole" in why.output
    assert "  branch1→hub blackhole: configured MTU 1420 sends up to 1480 bytes" in why.output
    assert "packets above 1340 bytes vanish" in why.output and "  hub→branch1 " in why.output
    assert "packets above 1340 bytes vanish" not in table.output
    doc = json.loads(_cli("health", "--json", env=env).output)
    assert doc["schema_version"] == 1 and doc["links"][0]["state"] == "blackhole"
    tuned = _cli("tune", env=env)
    assert tuned.exit_code == 0 and "route_mtu 1420 → 1340" in tuned.output
    assert "keepalive_s 25 → 8" in tuned.output


def test_health_exit_codes_for_an_unreachable_controller_and_a_bad_token(
    api: httpx.Client, store: Store
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    down = _cli("health", env={"FLEETVPN_CONTROLLER": closed, "FLEETVPN_TOKEN": "x"})
    assert down.exit_code == 2 and "cannot reach the controller" in down.output
    refused = _cli("health", env={"FLEETVPN_CONTROLLER": str(api.base_url), "FLEETVPN_TOKEN": "x"})
    assert refused.exit_code == 2 and "401" in refused.output
    store.create_admin_token()
    healthy = _cli(
        "health",
        env={
            "FLEETVPN_CONTROLLER": str(api.base_url),
            "FLEETVPN_TOKEN": store.create_admin_token(),
        },
    )
    assert healthy.exit_code == 0 and "no links" in healthy.output


def test_history_per_link_and_site(api: httpx.Client, store: Store) -> None:
    t = fleet(api, store)
    send(
        api, t["branch1"], "branch1", "branch",
        measurements=[link("hub", 1380, "198.19.1.11:51820")],
    )  # fmt: skip
    doc = api.get("/v1/links/hub/branch1/history", headers=bearer(t["admin"])).json()
    mtus = [(m["node"], m["path_mtu"]) for m in doc["measurements"]]
    assert sorted(mtus) == [("branch1", 1380), ("branch1", 1400), ("hub", 1400)]
    site = api.get("/v1/sites/branch/history", headers=bearer(t["admin"])).json()
    assert [m["mapping_lifetime_s"] for m in site["nat_measurements"]] == [19.55]
    assert api.get("/v1/sites/branch/history", headers=bearer(t["branch1"])).status_code == 403


def _star(api: httpx.Client, store: Store, branches: int) -> str:
    """A hub and ``branches`` NATed branches that never reported: one planned link each."""
    admin = store.create_admin_token()
    enroll(api, admin, "hub", "hub", "h" * 42 + "A=", endpoint="198.19.1.11:51820")
    for i in range(branches):
        enroll(api, admin, f"b{i}", "branch", f"{i}" * 42 + "A=")
    return admin


def test_health_pages_through_the_links(api: httpx.Client, store: Store) -> None:
    admin = _star(api, store, 3)
    first = api.get("/v1/health?limit=2", headers=bearer(admin)).json()
    assert [(r["a"], r["b"]) for r in first["links"]] == [("b0", "hub"), ("b1", "hub")]
    assert first["links_matched"] == 3 and first["next_after"] == "b1,hub"
    assert first["summary"] == {"down": 3} and first["healthy"] is False
    rest = api.get(f"/v1/health?limit=2&after={first['next_after']}", headers=bearer(admin))
    assert [(r["a"], r["b"]) for r in rest.json()["links"]] == [("b2", "hub")]
    assert rest.json()["next_after"] is None
    counted = api.get("/v1/health?problems=true&limit=0", headers=bearer(admin)).json()
    assert counted["links"] == [] and counted["links_matched"] == 3
    whole = api.get("/v1/health", headers=bearer(admin))
    assert len(whole.json()["links"]) == 3 and whole.json()["next_after"] is None
    assert float(whole.headers["x-fleetvpn-view-age-s"]) >= 0
    for bad, field in (("limit=-1", "limit"), ("after=nocomma", "after")):
        r = api.get(f"/v1/health?{bad}", headers=bearer(admin))
        assert r.status_code == 422 and r.json()["error"].startswith(f"{field}:")


def test_requests_are_served_from_the_last_view_while_a_recompute_runs(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fleetvpn.controller import fleet as fleet_module

    real_compute = fleet_module.compute
    gate, blocked = threading.Event(), threading.Event()
    gate.set()

    def slow_compute(*args: Any, **kwargs: Any) -> Any:
        if not gate.is_set():
            blocked.set()
            assert gate.wait(30), "the test never released the recompute"
        return real_compute(*args, **kwargs)

    monkeypatch.setattr(fleet_module, "compute", slow_compute)
    with Server(store, view_fresh_wait_s=0.0) as api:
        admin = _star(api, store, 1)
        assert isinstance(api_cache(api), Views)
        api_cache(api).get_fresh(timeout=30)  # a view with every write so far
        before = api.get("/v1/health", headers=bearer(admin)).json()
        assert [(r["a"], r["b"]) for r in before["links"]] == [("b0", "hub")]
        gate.clear()
        enroll(api, admin, "b1", "branch", "1" * 42 + "A=")  # a write: the view is dirty now
        assert blocked.wait(30), "no recompute started after the write"
        during = api.get("/v1/health", headers=bearer(admin))  # answered, not waiting
        assert during.status_code == 200
        assert during.json()["generated_at"] == before["generated_at"]
        assert [(r["a"], r["b"]) for r in during.json()["links"]] == [("b0", "hub")]
        gate.set()
        api_cache(api).get_fresh(timeout=30)
        after = api.get("/v1/health", headers=bearer(admin)).json()
        assert [(r["a"], r["b"]) for r in after["links"]] == [("b0", "hub"), ("b1", "hub")]


def api_cache(api: httpx.Client) -> Any:
    return SERVERS[str(api.base_url)].app.state.views


def test_a_node_that_just_enrolled_gets_its_desired_state(store: Store) -> None:
    with Server(store, view_fresh_wait_s=0.0) as api:
        admin = _star(api, store, 1)
        token = enroll(api, admin, "b1", "branch", "1" * 42 + "A=")
        r = api.get("/v1/nodes/b1/desired", headers=bearer(token))
        assert r.status_code == 200 and [p["peer"] for p in r.json()["peers"]] == ["hub"]
        assert api.get("/v1/nodes/nosuch/desired", headers=bearer(admin)).status_code == 404


def test_token_cache_refuses_a_revoked_token_within_its_bound(store: Store) -> None:
    from fleetvpn.controller.api import TokenCache

    bound_s = 0.2
    tokens = TokenCache(store, bound_s)
    token, _ = store.enroll(store.create_enrollment_token("s"), "a", "a" * 42 + "A=")
    who = tokens.authenticate(token)
    assert who is not None and who.name == "a"
    later, _ = store.enroll(store.create_enrollment_token("s"), "b", "b" * 42 + "A=")
    assert tokens.authenticate(later) is not None  # enrolled after the cache filled: known
    store.revoke_node("a")
    time.sleep(bound_s * 1.5)
    assert tokens.authenticate(token) is None
    assert tokens.authenticate(later) is not None
    assert tokens.authenticate("fvn_guess") is None


def test_health_of_a_large_fleet_shows_its_summary_and_problems(
    api: httpx.Client, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fleetvpn.health_cli

    t = fleet(api, store)  # branch1↔hub: a black hole
    for i in range(3):
        enroll(api, t["admin"], f"ok{i}", "branch", f"{i}" * 42 + "A=")
    monkeypatch.setattr(fleetvpn.health_cli, "TABLE_ROWS", 2)  # "large": more than 2 links
    env = {"FLEETVPN_CONTROLLER": str(api.base_url), "FLEETVPN_TOKEN": t["admin"]}
    table = _cli("health", env=env)
    assert table.exit_code == 1
    assert "2 links shown; fleet: 1 blackhole, 3 down" in table.output
    assert "4 links are not ok; the first 2 are shown" in table.output
    assert "branch1 ↔ hub" in table.output
    everything = _cli("health", "--all", env=env)
    assert "4 links shown" in everything.output and "are shown" not in everything.output
    doc = json.loads(_cli("health", "--json", env=env).output)
    assert doc["schema_version"] == 1 and len(doc["links"]) == 4


@pytest.mark.parametrize("encoder", ["orjson", "json"])
def test_served_health_documents_are_the_health_json(
    store: Store, monkeypatch: pytest.MonkeyPatch, encoder: str
) -> None:
    """What the API serves (joined from the view's pre-encoded link rows) is health_json of
    that view, for every filter and page, with either encoder."""
    import sys

    from fleetvpn.controller import fleet as fleet_module

    if encoder == "json":
        monkeypatch.setitem(sys.modules, "orjson", None)  # import orjson → ImportError
    else:
        pytest.importorskip("orjson")
    computed: list[fleet_module.FleetView] = []
    real_compute = fleet_module.compute

    def keep(*args: Any, **kwargs: Any) -> Any:
        computed.append(real_compute(*args, **kwargs))
        return computed[-1]

    monkeypatch.setattr(fleet_module, "compute", keep)
    with Server(store) as api:
        t = fleet(api, store)
        enroll(
            api, t["admin"], "b9", "branch", "9" * 42 + "A="
        )  # a down link beside the black hole
        enroll(api, t["admin"], "h2", "hub", "2" * 42 + "A=", endpoint="198.19.1.12:51820")
        published = api_cache(api).get_fresh(timeout=30)
        view = computed[-1]
        assert len(view.links) == 5
        for chosen in ([0, 2, 4], [1], [3, 4], []):  # apart (joined) or side by side (one slice)
            parts = b"".join(published._links(chosen))
            rows = [fleet_module.link_json(view.links[i]) for i in chosen]
            assert json.loads(b"[" + parts + b"]") == json.loads(json.dumps(rows))
        assert published.index.generated_at == fleet_module.format_time(view.generated_at)
        cursor = fleet_module.link_cursor(view.links[0])
        queries: list[dict[str, Any]] = [
            {}, {"site": "branch"}, {"problems": True}, {"site": "branch", "problems": True},
            {"site": "nowhere"}, {"limit": 1}, {"limit": 0}, {"limit": 2, "after": cursor},
            {"after": cursor}, {"site": "branch", "limit": 1, "after": cursor},
            {"problems": True, "limit": 1},
        ]  # fmt: skip
        for query in queries:
            served = api.get("/v1/health", params=query, headers=bearer(t["admin"]))
            assert served.status_code == 200, query
            expected = fleet_module.health_json(
                view,
                query.get("site"),
                query.get("problems", False),
                limit=query.get("limit"),
                after=query.get("after"),
            )
            assert served.json() == json.loads(json.dumps(expected)), query
        whole = api.get("/v1/health", headers=bearer(t["admin"])).json()
        assert "→" in whole["links"][0]["reason"]  # UTF-8 or \\u-escaped alike
        assert any(r["state"] != "ok" for r in whole["links"])
        tune = api.get("/v1/tune", headers=bearer(t["admin"])).json()
        assert tune == json.loads(json.dumps(fleet_module.tune_json(view)))
        branch = api.get("/v1/tune", params={"site": "branch"}, headers=bearer(t["admin"]))
        assert branch.json() == json.loads(json.dumps(fleet_module.tune_json(view, "branch")))

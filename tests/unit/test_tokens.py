"""Enrollment, tokens and revocation (issue 11, items 5 and 8), on SQLite and PostgreSQL: the
token is spent by one conditional UPDATE, a retried enrollment gets the same node, tokens and
nodes are listed and revoked from the command line, a revoked node leaves the fleet view."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from fleetvpn.cli import cli
from fleetvpn.controller import tokens
from fleetvpn.controller.store import (
    SCHEMA_VERSION,
    Conflict,
    Forbidden,
    NotFound,
    Store,
    enrollment_tokens,
    hash_token,
    retired_tokens,
    schema_migrations,
)

from .apiutil import SERVERS, bearer, wait_serving
from .test_controller_serve import _port, fleetvpn

KEY_A = "A" * 42 + "A="
KEY_B = "B" * 42 + "A="
KEY_C = "C" * 42 + "A="


def test_a_token_is_spent_once_and_says_why_not(store: Store) -> None:
    enrollment = store.create_enrollment_token("branch")
    first = tokens.enroll(store, enrollment, "branch1", KEY_A)
    assert (first.node, first.site, first.reissued) == ("branch1", "branch", False)
    with pytest.raises(Forbidden, match="already used by branch1"):
        tokens.enroll(store, enrollment, "branch2", KEY_B)  # another node
    with pytest.raises(Forbidden, match="already used by branch1"):
        tokens.enroll(store, enrollment, "branch1", KEY_B)  # the name, another key
    with pytest.raises(Forbidden, match="unknown enrollment token"):
        tokens.enroll(store, "fve_nonsense", "branch2", KEY_B)
    with pytest.raises(Forbidden, match="expired"):
        tokens.enroll(store, store.create_enrollment_token("x", timedelta(seconds=-1)), "n", KEY_B)
    assert [n["name"] for n in store.nodes()] == ["branch1"]


def test_a_conflict_leaves_the_token_unspent(store: Store) -> None:
    tokens.enroll(store, store.create_enrollment_token("s"), "a", KEY_A)
    enrollment = store.create_enrollment_token("s")
    with pytest.raises(Conflict, match="public key"):
        tokens.enroll(store, enrollment, "b", KEY_A)
    with pytest.raises(Conflict, match="node name"):
        tokens.enroll(store, enrollment, "a", KEY_B)
    assert tokens.enroll(store, enrollment, "b", KEY_B).node == "b"  # still good


def test_a_retried_enrollment_gets_the_same_node_and_a_new_token(store: Store) -> None:
    enrollment = store.create_enrollment_token("branch")
    lost = tokens.enroll(store, enrollment, "branch1", KEY_A, endpoint="198.51.100.7:51820")
    again = tokens.enroll(store, enrollment, "branch1", KEY_A, endpoint="198.51.100.7:51820")
    assert again.reissued and (again.node, again.site) == ("branch1", "branch")
    assert again.node_token != lost.node_token
    assert store.authenticate(lost.node_token) is None  # the lost answer's token is retired
    node = store.authenticate(again.node_token)
    assert node is not None and node.name == "branch1"
    assert [n["name"] for n in store.nodes()] == ["branch1"]
    # Every API process forgets the retired token: it is listed with the revocations.
    assert hash_token(lost.node_token) in store.revoked_token_hashes(
        datetime.now(UTC) - timedelta(minutes=1)
    )
    # Once the node has reported, it had its token: the spent token is worth nothing more.
    store.put_report(node, "2b6f2c1e-3d1a-4c55-9a43-3a9f1d2b7c10", datetime.now(UTC), {}, [], None)
    with pytest.raises(Forbidden, match="has reported since"):
        tokens.enroll(store, enrollment, "branch1", KEY_A)
    assert store.authenticate(again.node_token) is not None


def test_no_retry_for_a_revoked_node_or_token(store: Store) -> None:
    enrollment = store.create_enrollment_token("s")
    tokens.enroll(store, enrollment, "a", KEY_A)
    tokens.revoke_node(store, "a")
    with pytest.raises(Forbidden, match="revoked"):
        tokens.enroll(store, enrollment, "a", KEY_A)
    other = store.create_enrollment_token("s")
    (row,) = [t for t in tokens.list_tokens(store) if t["state"] == "valid"]
    tokens.revoke_token(store, row["id"])
    with pytest.raises(Forbidden, match="enrollment token revoked"):
        tokens.enroll(store, other, "b", KEY_B)


def test_concurrent_enrollments_with_one_token_have_one_winner(store: Store) -> None:
    """Threads on one store (SQLite: one writer at a time; PostgreSQL: row locks)."""
    enrollment = store.create_enrollment_token("s")
    keys = [f"{i:02d}".ljust(42, "Q") + "A=" for i in range(16)]
    barrier = threading.Barrier(len(keys))
    outcomes: list[str] = []

    def attempt(i: int) -> None:
        barrier.wait()
        try:
            tokens.enroll(store, enrollment, f"n{i}", keys[i])
            outcomes.append("won")
        except Forbidden as e:
            outcomes.append("already used" if "already used" in str(e) else str(e))

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(len(keys))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcomes) == ["already used"] * (len(keys) - 1) + ["won"]
    assert len(store.nodes()) == 1


def test_tokens_listed_and_revoked_by_id(store: Store) -> None:
    ops = store.create_admin_token("ops")
    store.create_admin_token("ci")
    used = store.create_enrollment_token("branch")
    tokens.enroll(store, used, "b1", KEY_A)
    store.create_enrollment_token("hub", timedelta(seconds=-1))
    store.create_enrollment_token("hub")
    rows = tokens.list_tokens(store)
    assert [(r["id"], r["kind"], r["name"], r["site"], r["state"]) for r in rows] == [
        ("a1", "admin", "ops", None, "valid"),
        ("a2", "admin", "ci", None, "valid"),
        ("e1", "enrollment", None, "branch", "used"),
        ("e2", "enrollment", None, "hub", "expired"),
        ("e3", "enrollment", None, "hub", "valid"),
    ]
    assert rows[2]["used_by"] == "b1" and rows[2]["used_at"].endswith("Z")
    for token in (ops, used):  # never the token, nor its hash
        assert token not in json.dumps(rows) and hash_token(token) not in json.dumps(rows)
    done = tokens.revoke_token(store, "a1")
    assert done.what == "admin token a1 (name ops)" and not done.already
    assert store.authenticate(ops) is None
    assert tokens.revoke_token(store, "A1").already  # idempotent; the id in either case
    assert tokens.list_tokens(store)[0]["state"] == "revoked"
    with pytest.raises(NotFound, match="no enrollment token e9"):
        tokens.revoke_token(store, "e9")
    for bad in ("3", "x3", "a-1", "a0", "a１", "a" + "9" * 30):
        with pytest.raises(ValueError, match="not a token id"):
            tokens.revoke_token(store, bad)


def test_nodes_revoked_by_name(store: Store) -> None:
    node_token = tokens.enroll(store, store.create_enrollment_token("s"), "a", KEY_A).node_token
    done = tokens.revoke_node(store, "a")
    assert done.what == "node a" and not done.already
    assert store.authenticate(node_token) is None
    assert tokens.revoke_node(store, "a").already
    assert [(n["name"], n["state"]) for n in tokens.list_nodes(store)] == [("a", "revoked")]
    for name in ("b", "a\n", "\udcff", "A"):
        with pytest.raises(NotFound, match="no node"):
            tokens.revoke_node(store, name)


def test_revocation_mark_moves_with_each_revocation(store: Store) -> None:
    for name, key in (("a", KEY_A), ("b", KEY_B)):
        tokens.enroll(store, store.create_enrollment_token("s"), name, key)
    marks = [tokens.revocation_mark(store)]
    tokens.revoke_node(store, "a")
    marks.append(tokens.revocation_mark(store))
    tokens.revoke_node(store, "a")  # again: nothing changes
    marks.append(tokens.revocation_mark(store))
    tokens.revoke_node(store, "b")
    marks.append(tokens.revocation_mark(store))
    assert marks[0] == (0, None) and marks[1] == marks[2] != marks[3]
    assert [m[0] for m in marks] == [0, 1, 1, 2]


def test_migration_3_upgrades_a_version_2_database(store_url: str) -> None:
    store = Store.open(store_url)
    with store.tx() as conn:  # as version 2 left it
        retired_tokens.drop(conn)
        conn.exec_driver_sql("ALTER TABLE enrollment_tokens DROP COLUMN revoked_at")
        conn.execute(schema_migrations.delete().where(schema_migrations.c.version >= 3))
    store.close()
    again = Store.open(store_url)
    assert again.schema_version() == SCHEMA_VERSION
    enrollment = again.create_enrollment_token("s")
    again.enroll(enrollment, "a", KEY_A)
    again.enroll(enrollment, "a", KEY_A)  # a retry: writes retired_tokens
    with again.tx() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(retired_tokens)) == 1
        assert conn.scalar(sa.select(enrollment_tokens.c.revoked_at)) is None
    again.close()


# --- the API -------------------------------------------------------------------------------


def _enroll(api: httpx.Client, token: str, name: str, key: str) -> httpx.Response:
    return api.post("/v1/enroll", json={"enrollment_token": token, "name": name, "public_key": key})


def test_api_retry_answers_200_with_a_new_token(api: httpx.Client, store: Store) -> None:
    enrollment = store.create_enrollment_token("branch")
    first = _enroll(api, enrollment, "branch1", KEY_A)
    assert first.status_code == 201 and "reissued" not in first.json()
    again = _enroll(api, enrollment, "branch1", KEY_A)
    assert again.status_code == 200, again.text
    assert again.json()["reissued"] is True and again.json()["node"] == "branch1"
    assert again.json()["node_token"] != first.json()["node_token"]
    other = _enroll(api, enrollment, "branch2", KEY_B)
    assert other.status_code == 403 and "already used by branch1" in other.json()["error"]


def _peers(api: httpx.Client, node_token: str, node: str) -> list[str]:
    r = api.get(f"/v1/nodes/{node}/desired", headers=bearer(node_token))
    assert r.status_code == 200, r.text
    return [p["peer"] for p in r.json()["peers"]]


def _hub_and_branches(api: httpx.Client, store: Store) -> dict[str, str]:
    """Three nodes enrolled on the store; the test server told (as its own enroll does)."""
    made = {}
    for name, site, key in (
        ("hub", "hub", KEY_A),
        ("b1", "branch", KEY_B),
        ("b2", "branch", KEY_C),
    ):
        made[name] = store.enroll(
            store.create_enrollment_token(site), name, key,
            endpoint="198.51.100.1:51820" if name == "hub" else None,
        )[0]  # fmt: skip
    SERVERS[str(api.base_url)].app.state.views.invalidate()
    return made


def test_api_delete_node_revokes_it_at_once(api: httpx.Client, store: Store) -> None:
    admin = store.create_admin_token()
    node_tokens = _hub_and_branches(api, store)
    assert sorted(_peers(api, node_tokens["hub"], "hub")) == ["b1", "b2"]
    assert api.delete("/v1/nodes/b1", headers=bearer(node_tokens["b2"])).status_code == 403
    r = api.delete("/v1/nodes/b1", headers=bearer(admin))
    assert r.status_code == 200 and r.json()["already_revoked"] is False
    assert r.json()["revoked"] == "node b1" and r.json()["schema_version"] == 1
    assert _peers(api, node_tokens["hub"], "hub") == ["b2"]  # the write invalidated the view
    assert api.delete("/v1/nodes/b1", headers=bearer(admin)).json()["already_revoked"] is True
    assert api.delete("/v1/nodes/nobody", headers=bearer(admin)).status_code == 404
    assert api.delete("/v1/nodes/%E2%80%AE", headers=bearer(admin)).status_code == 404
    time.sleep(0.3)  # the test server's token cache: 0.2 s
    assert api.get("/v1/nodes/b1/desired", headers=bearer(node_tokens["b1"])).status_code == 401


def test_a_node_revoked_elsewhere_leaves_the_view_within_seconds(
    api: httpx.Client, store: Store
) -> None:
    """Revoked on the store (the CLI, another controller): nothing tells this API process, it
    finds the revocation by itself (tokens.REVOCATION_POLL_S) and recomputes the view."""
    node_tokens = _hub_and_branches(api, store)
    assert sorted(_peers(api, node_tokens["hub"], "hub")) == ["b1", "b2"]
    started = time.monotonic()
    tokens.revoke_node(store, "b1")
    while "b1" in _peers(api, node_tokens["hub"], "hub"):
        assert time.monotonic() - started < 30, "a revoked node stayed in a peer's desired state"
        time.sleep(0.2)
    took = time.monotonic() - started
    print(f"revoked node left the hub's desired state after {took:.1f} s")
    assert took <= tokens.REVOCATION_POLL_S + 2


# --- the command line ----------------------------------------------------------------------


def _config(tmp_path: Path, store_url: str) -> Path:
    config = tmp_path / "controller.yml"
    config.write_text(f"listen: 127.0.0.1:8080\ndatabase: '{store_url}'\n")
    return config


def test_cli_tokens_and_nodes(tmp_path: Path, store_url: str) -> None:
    config = str(_config(tmp_path, store_url))
    run = CliRunner().invoke
    admin = run(cli, ["controller", "admin-token", "--config", config, "--name", "ops"])
    assert admin.exit_code == 0, admin.output
    refused = run(cli, ["controller", "admin-token", "--config", config, "--name", "a\nb"])
    assert refused.exit_code == 1 and "--name: has an unprintable character" in refused.output
    store = Store.open(store_url)
    try:
        store.enroll(store.create_enrollment_token("branch"), "b1", KEY_A)
    finally:
        store.close()

    listed = run(cli, ["controller", "tokens", "list", "--config", config, "--json"])
    assert listed.exit_code == 0, listed.output
    doc = json.loads(listed.output)
    assert doc["schema_version"] == 1
    assert [(t["id"], t["kind"], t["state"]) for t in doc["tokens"]] == [
        ("a1", "admin", "valid"), ("e1", "enrollment", "used"),
    ]  # fmt: skip
    assert admin.output.strip() not in listed.output
    pretty = run(cli, ["controller", "tokens", "list", "--config", config])
    assert (
        pretty.exit_code == 0 and "used by b1" in pretty.output and "site branch" in pretty.output
    )

    revoked = run(cli, ["controller", "tokens", "revoke", "a1", "--config", config, "--json"])
    assert revoked.exit_code == 0, revoked.output
    assert json.loads(revoked.output)["revoked"] == "admin token a1 (name ops)"
    bad = run(cli, ["controller", "tokens", "revoke", "x1", "--config", config])
    assert bad.exit_code == 1 and "not a token id" in bad.output
    missing = run(cli, ["controller", "tokens", "revoke", "e5", "--config", config])
    assert missing.exit_code == 1 and "no enrollment token e5" in missing.output

    nodes = run(cli, ["controller", "nodes", "list", "--config", config, "--json"])
    assert nodes.exit_code == 0, nodes.output
    (row,) = json.loads(nodes.output)["nodes"]
    assert (row["name"], row["site"], row["state"]) == ("b1", "branch", "active")
    gone = run(cli, ["controller", "nodes", "revoke", "b1", "--config", config])
    assert gone.exit_code == 0 and gone.output.strip() == "revoked node b1"
    again = run(cli, ["controller", "nodes", "revoke", "b1", "--config", config])
    assert again.exit_code == 0 and "was already revoked" in again.output
    pretty_nodes = run(cli, ["controller", "nodes", "list", "--config", config])
    assert "b1" in pretty_nodes.output and "revoked" in pretty_nodes.output
    unknown = run(cli, ["controller", "nodes", "revoke", "zz", "--config", config])
    assert unknown.exit_code == 1 and "no node 'zz'" in unknown.output


def test_cli_revocation_reaches_a_running_controller(tmp_path: Path) -> None:
    """End to end, as an operator does it: `controller serve` (its view in a worker process),
    `controller nodes revoke` in another process; the node's token is refused and the node
    leaves its peers' desired state, each within seconds (measured, printed)."""
    port = _port(socket.SOCK_STREAM)
    config = tmp_path / "controller.yml"
    config.write_text(f"listen: 127.0.0.1:{port}\ndatabase: sqlite:///{tmp_path / 'c.db'}\n")
    admin = fleetvpn("controller", "admin-token", "--config", str(config)).stdout.strip()
    server = subprocess.Popen(
        [sys.executable, "-m", "fleetvpn", "controller", "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        api = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        wait_serving(api, server, timeout_s=30)
        node_tokens = {}
        for name, site, key in (("hub", "hub", KEY_A), ("b1", "branch", KEY_B),
                                ("b2", "branch", KEY_C)):  # fmt: skip
            r = api.post("/v1/enrollment-tokens", json={"site": site}, headers=bearer(admin))
            body = {"enrollment_token": r.json()["enrollment_token"], "name": name,
                    "public_key": key}  # fmt: skip
            if name == "hub":
                body["endpoint"] = "198.51.100.1:51820"
            r = api.post("/v1/enroll", json=body)
            assert r.status_code == 201, r.text
            node_tokens[name] = r.json()["node_token"]

        def peers() -> list[str] | None:
            r = api.get("/v1/nodes/hub/desired", headers=bearer(node_tokens["hub"]))
            return [p["peer"] for p in r.json()["peers"]] if r.status_code == 200 else None

        deadline = time.monotonic() + 30
        while peers() != ["b1", "b2"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert api.get("/v1/nodes/b1/desired", headers=bearer(node_tokens["b1"])).status_code != 401
        revoke = fleetvpn("controller", "nodes", "revoke", "b1", "--config", str(config))
        started = time.monotonic()
        assert revoke.returncode == 0 and revoke.stdout.strip() == "revoked node b1"
        refused_after = left_after = None
        while refused_after is None or left_after is None:
            elapsed = time.monotonic() - started
            assert elapsed < 30, f"refused after {refused_after}, left after {left_after}"
            r = api.get("/v1/nodes/b1/desired", headers=bearer(node_tokens["b1"]))
            if refused_after is None and r.status_code == 401:
                refused_after = elapsed
            if left_after is None and peers() == ["b2"]:
                left_after = elapsed
            time.sleep(0.1)
        print(f"b1's token refused after {refused_after:.1f} s; left hub's peers after "
              f"{left_after:.1f} s")  # fmt: skip
        assert refused_after <= 5 + 1 and left_after <= tokens.REVOCATION_POLL_S + 2
    finally:
        server.terminate()
        server.wait(10)

"""The controller store on a real SQLite file: tokens, enrollment, idempotent reports, latest
measurements, retention, overrides."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from fleetvpn.controller.store import SCHEMA_VERSION, Conflict, Forbidden, Store

KEY_A = "A" * 43 + "="
KEY_B = "B" * 43 + "="


def _link(peer: str, mtu: int | None) -> dict[str, object]:
    return {
        "peer": peer, "family": 4, "path_mtu": mtu, "icmp_seen": False, "rtt_s": 0.01,
        "loss_ratio": 0.0, "handshake_age_s": 4.0, "rx_bytes": 10, "tx_bytes": 20,
        "endpoint": "198.19.1.11:51820",
    }  # fmt: skip


def test_migrations_are_recorded_and_idempotent(store_url: str) -> None:
    first = Store.open(store_url)
    assert first.schema_version() == SCHEMA_VERSION == 2
    assert first.migrate() == []
    first.close()
    again = Store.open(store_url)
    assert again.schema_version() == SCHEMA_VERSION
    if again.engine.dialect.name == "sqlite":
        with again.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    again.close()


def test_tokens_are_stored_hashed_and_enrollment_is_single_use(store: Store) -> None:
    admin = store.create_admin_token()
    enrollment = store.create_enrollment_token("branch")
    node_token, site = store.enroll(enrollment, "branch1", KEY_A)
    assert site == "branch"
    with store.engine.connect() as conn:
        stored = " ".join(
            str(row)
            for table in ("admin_tokens", "enrollment_tokens", "nodes")
            for row in conn.exec_driver_sql(f"SELECT * FROM {table}")
        )
    for token in (admin, enrollment, node_token):
        assert token not in stored and token.split("_", 1)[1] not in stored
    assert store.authenticate(admin).kind == "admin"  # type: ignore[union-attr]
    node = store.authenticate(node_token)
    assert node is not None and node.kind == "node" and node.site == "branch"
    assert store.authenticate("fvn_nonsense") is None
    with pytest.raises(Forbidden, match="already used"):
        store.enroll(enrollment, "branch2", KEY_B)
    with pytest.raises(Conflict, match="public key"):
        store.enroll(store.create_enrollment_token("branch"), "branch2", KEY_A)
    with pytest.raises(Forbidden, match="expired"):
        store.enroll(store.create_enrollment_token("x", timedelta(seconds=-1)), "n", KEY_B)
    store.revoke_node("branch1")
    assert store.authenticate(node_token) is None


def test_reports_are_stored_once_and_belong_to_their_node(store: Store) -> None:
    a = store.authenticate(store.enroll(store.create_enrollment_token("s"), "a", KEY_A)[0])
    b = store.authenticate(store.enroll(store.create_enrollment_token("s"), "b", KEY_B)[0])
    assert a is not None and b is not None
    now = datetime.now(UTC)
    rid = "0b6f2c1e-3d1a-4c55-9a43-3a9f1d2b7c10"
    assert store.put_report(a, rid, now, {}, [_link("b", 1400)], None) is True
    assert store.put_report(a, rid, now, {}, [_link("b", 1300)], None) is False
    with pytest.raises(Forbidden, match="another node"):
        store.put_report(b, rid, now, {}, [], None)
    assert store.report_count() == 1
    later = now + timedelta(seconds=30)
    store.put_report(a, "1b6f2c1e-3d1a-4c55-9a43-3a9f1d2b7c10", later, {}, [_link("b", 1380)], None)
    (latest,) = store.latest_links()
    assert latest["path_mtu"] == 1380 and latest["node"] == "a" and latest["measured_at"] == later


def test_retention_prunes_old_reports(store: Store) -> None:
    node = store.authenticate(store.enroll(store.create_enrollment_token("s"), "a", KEY_A)[0])
    assert node is not None
    old = datetime.now(UTC) - timedelta(days=40)
    nat = {"nat": True, "mapped_address": "198.18.2.6:4000", "mapping_lifetime_s": 19.5,
           "measured_at": old, "resolution_s": 1.0, "stateful_filter": True}  # fmt: skip
    store.put_report(node, "2b6f2c1e-3d1a-4c55-9a43-3a9f1d2b7c10", old, {}, [_link("b", 1400)], nat)
    store.put_report(node, "3b6f2c1e-3d1a-4c55-9a43-3a9f1d2b7c10", datetime.now(UTC), {}, [], None)
    assert store.prune(timedelta(days=30)) == 1
    assert store.report_count() == 1 and store.latest_links() == [] and store.latest_nat() == []


def test_overrides_replace_and_clear(store: Store) -> None:
    store.set_override("site", "branch", "keepalive_s", 15, "ISP reboots the NAT")
    store.set_override("site", "branch", "keepalive_s", 10)
    (only,) = store.overrides()
    assert only["value"] == 10
    assert store.clear_override("site", "branch", "keepalive_s") is True
    assert store.overrides() == []

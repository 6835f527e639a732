"""The controller store on a real SQLite file: tokens, enrollment, idempotent reports, latest
measurements, retention, overrides."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings

from fleetvpn.controller.store import SCHEMA_VERSION, Conflict, Forbidden, Store
from fleetvpn.model import ReportError

from .test_model import _report as _report_strategy

KEY_A = "A" * 42 + "A="
KEY_B = "B" * 42 + "A="


def _link(peer: str, mtu: int | None) -> dict[str, object]:
    return {
        "peer": peer, "family": 4, "path_mtu": mtu, "icmp_seen": False, "rtt_s": 0.01,
        "loss_ratio": 0.0, "handshake_age_s": 4.0, "rx_bytes": 10, "tx_bytes": 20,
        "endpoint": "198.19.1.11:51820",
    }  # fmt: skip


def test_migrations_are_recorded_and_idempotent(store_url: str) -> None:
    first = Store.open(store_url)
    assert first.schema_version() == SCHEMA_VERSION == 4
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
    # By arrival, not by the node's clock: both arrived now, so neither goes.
    assert store.prune(timedelta(days=30)) == 0 and store.report_count() == 2
    _arrived(store, "2b6f2c1e-3d1a-4c55-9a43-3a9f1d2b7c10", old)
    assert store.prune(timedelta(days=30)) == 1
    assert store.report_count() == 1 and store.latest_links() == [] and store.latest_nat() == []


def test_a_report_from_the_future_is_pruned_by_its_arrival(store: Store) -> None:
    node = store.authenticate(store.enroll(store.create_enrollment_token("s"), "a", KEY_A)[0])
    assert node is not None
    future = datetime(9999, 12, 31, tzinfo=UTC)
    store.put_report(node, "4b6f2c1e-3d1a-4c55-9a43-3a9f1d2b7c10", future, {}, [], None)
    _arrived(store, "4b6f2c1e-3d1a-4c55-9a43-3a9f1d2b7c10", datetime.now(UTC) - timedelta(days=31))
    assert store.prune(timedelta(days=30)) == 1 and store.report_count() == 0


def test_trim_keeps_a_nodes_newest_reports_by_arrival_and_its_heads(store: Store) -> None:
    node = store.authenticate(store.enroll(store.create_enrollment_token("s"), "a", KEY_A)[0])
    assert node is not None and node.node_id is not None
    now = datetime.now(UTC)
    ids = [f"{i:08x}-3d1a-4c55-9a43-3a9f1d2b7c10" for i in range(10)]
    for i, report_id in enumerate(ids):  # ids[0] is the newest by created_at, oldest to arrive
        store.put_report(node, report_id, now - timedelta(minutes=i), {}, [_link("b", 1400)], None)
        _arrived(store, report_id, now - timedelta(minutes=10 - i))
    assert store.trim_reports(node.node_id, 3) == 5  # 3 newest arrivals + the 2 heads stay
    with store.engine.connect() as conn:
        left = {r for (r,) in conn.exec_driver_sql("SELECT report_id FROM reports")}
        links = conn.exec_driver_sql("SELECT count(*) FROM link_measurements").scalar()
    assert left == {ids[0], ids[1], ids[7], ids[8], ids[9]} and links == 5
    assert store.trim_reports(node.node_id, 3) == 0


def _arrived(store: Store, report_id: str, at: datetime) -> None:
    """Backdate a stored report's arrival (what the controller's clock said)."""

    from fleetvpn.controller.store import reports

    with store.tx() as conn:
        conn.execute(
            reports.update().where(reports.c.report_id == report_id).values(received_at=at)
        )


def test_overrides_replace_and_clear(store: Store) -> None:
    store.set_override("site", "branch", "keepalive_s", 15, "ISP reboots the NAT")
    store.set_override("site", "branch", "keepalive_s", 10)
    (only,) = store.overrides()
    assert only["value"] == 10
    assert store.clear_override("site", "branch", "keepalive_s") is True
    assert store.overrides() == []


def _rid(n: int) -> str:
    return str(uuid.UUID(int=n, version=4))


def test_each_node_keeps_its_two_newest_report_ids(store: Store) -> None:
    a = store.authenticate(store.enroll(store.create_enrollment_token("s"), "a", KEY_A)[0])
    store.enroll(store.create_enrollment_token("s"), "b", KEY_B)
    assert a is not None
    assert store.report_heads() == {"a": (None, None, None), "b": (None, None, None)}
    t0 = datetime.now(UTC)
    store.put_report(a, _rid(1), t0, "{}", [], None)
    store.put_report(a, _rid(3), t0 + timedelta(seconds=60), "{}", [], None)
    latest, received_at, previous = store.report_heads()["a"]
    assert (latest, previous) == (_rid(3), _rid(1)) and received_at is not None
    store.put_report(a, _rid(2), t0 + timedelta(seconds=30), "{}", [], None)  # late, in between
    assert store.report_heads()["a"][::2] == (_rid(3), _rid(2))
    store.put_report(a, _rid(0), t0 - timedelta(seconds=30), "{}", [], None)  # older still
    assert store.report_heads()["a"][::2] == (_rid(3), _rid(2))
    bodies = store.report_bodies([_rid(3), _rid(9)])
    assert list(bodies) == [_rid(3)] and bodies[_rid(3)][1] == "{}"


def test_a_batch_of_reports_is_one_write_with_an_answer_each(store: Store) -> None:
    a = store.authenticate(store.enroll(store.create_enrollment_token("s"), "a", KEY_A)[0])
    b = store.authenticate(store.enroll(store.create_enrollment_token("s"), "b", KEY_B)[0])
    assert a is not None and b is not None
    now = datetime.now(UTC)
    store.put_report(b, _rid(7), now, "{}", [], None)
    results = store.put_reports(
        [
            (a, _rid(1), now, "{}", [_link("b", 1400)], None),
            (a, _rid(1), now, "{}", [_link("b", 1300)], None),  # the same id again: a replay
            (b, _rid(1), now, "{}", [], None),  # someone else's id
            (a, _rid(7), now, "{}", [], None),  # b's, stored before
            (b, _rid(7), now, "{}", [], None),  # b's replay
            (b, _rid(8), now, '{"x": 1}', [_link("a", 1380)], None),
        ]
    )
    assert results[:2] == [True, False] and results[4:] == [False, True]
    assert all(isinstance(r, Forbidden) and "another node" in str(r) for r in results[2:4])
    assert store.report_count() == 3
    assert sorted(r["path_mtu"] for r in store.latest_links()) == [1380, 1400]
    assert store.report_heads()["b"][::2] == (_rid(8), _rid(7))


def test_migration_2_records_the_newest_reports_of_an_older_database(store_url: str) -> None:
    import sqlalchemy as sa

    from fleetvpn.controller.store import nodes, schema_migrations

    store = Store.open(store_url)
    a = store.authenticate(store.enroll(store.create_enrollment_token("s"), "a", KEY_A)[0])
    assert a is not None
    t0 = datetime.now(UTC)
    for i in range(3):
        store.put_report(a, _rid(i), t0 + timedelta(seconds=i), "{}", [], None)
    with store.tx() as conn:  # as a version-1 database left them
        conn.execute(
            nodes.update().values(
                latest_report_id=None, previous_report_id=None, previous_report_at=None
            )
        )
        conn.execute(schema_migrations.delete().where(schema_migrations.c.version == 2))
    store.close()
    again = Store.open(store_url)
    assert again.report_heads()["a"][::2] == (_rid(2), _rid(1))
    with again.tx() as conn:
        assert conn.scalar(sa.select(sa.func.max(schema_migrations.c.version))) == SCHEMA_VERSION
    again.close()


def test_revoked_tokens_are_found_by_time(store: Store) -> None:
    from fleetvpn.controller.store import hash_token

    before = datetime.now(UTC) - timedelta(seconds=1)
    token, _ = store.enroll(store.create_enrollment_token("s"), "a", KEY_A)
    admin = store.create_admin_token()
    assert set(store.principals_by_token_hash()) == {hash_token(token), hash_token(admin)}
    assert store.revoked_token_hashes(before) == set()
    store.revoke_node("a")
    assert store.revoked_token_hashes(before) == {hash_token(token)}
    assert store.revoked_token_hashes(datetime.now(UTC) + timedelta(seconds=5)) == set()
    assert set(store.principals_by_token_hash()) == {hash_token(admin)}


def test_stored_bodies_read_back_as_validation_reads_them() -> None:
    from fleetvpn.controller.trusted import stored_report
    from fleetvpn.model import Report

    from .test_model import valid_report

    doc = valid_report()
    text = json.dumps(doc)
    fast, checked = stored_report(text), Report.from_json(json.loads(text))
    assert fast == checked
    assert [type(m.rtt_s) for m in fast.measurements] == [
        type(m.rtt_s) for m in checked.measurements
    ]
    minimal = {k: doc[k] for k in ("schema_version", "report_id", "node", "site", "created_at")}
    minimal["measurements"] = []
    assert stored_report(json.dumps(minimal)) == Report.from_json(minimal)
    broken = dict(minimal, measurements=[{"peer": "x"}])  # not what the API stores: checked
    with pytest.raises(ReportError, match=r"measurements\[0\]"):
        stored_report(json.dumps(broken))


@given(report=_report_strategy())
@settings(max_examples=50, deadline=None)
def test_any_valid_report_reads_back_the_same(report: Any) -> None:
    from fleetvpn.controller.trusted import stored_report

    assert stored_report(json.dumps(report.to_json())) == report


def _nat(at: datetime, **fields: object) -> dict[str, Any]:
    return {"measured_at": at, "nat": True, "mapped_address": "198.18.2.6:4000",
            "mapping_lifetime_s": 19.5, "resolution_s": 0.25, "max_lifetime_s": 300.0,
            "stateful_filter": False} | fields  # fmt: skip


def test_stored_measurements_read_back_field_by_field(store: Store) -> None:
    """Ingest writes its rows through the driver, not SQLAlchemy's types: every column reads
    back as given (aware datetimes to the microsecond, booleans, NULLs, 64-bit counters)."""
    import sqlalchemy as sa

    from fleetvpn.controller.store import link_measurements, nat_measurements, policy_state

    a = store.authenticate(store.enroll(store.create_enrollment_token("s"), "a", KEY_A)[0])
    assert a is not None
    at = datetime(2026, 11, 25, 21, 7, 3, 123456, tzinfo=UTC)
    whole = datetime(2026, 11, 25, 21, 8, 0, tzinfo=UTC)  # no microseconds
    links = [
        {"peer": "b", "family": 4, "path_mtu": 1400, "icmp_seen": True, "rtt_s": 0.0123456789,
         "loss_ratio": 0.25, "handshake_age_s": 4.5, "rx_bytes": 2**53 + 1, "tx_bytes": 0,
         "endpoint": "198.19.1.11:51820"},
        {"peer": "c-1", "family": 6, "path_mtu": None, "icmp_seen": False, "rtt_s": None,
         "loss_ratio": None, "handshake_age_s": None, "rx_bytes": 7, "tx_bytes": 2**62,
         "endpoint": None},
        {"peer": "d", "family": 4, "rx_bytes": 1, "tx_bytes": 2},  # optional fields left out
    ]  # fmt: skip
    nat = _nat(whole, mapping_lifetime_s=None, max_lifetime_s=None, stateful_filter=True)
    nat.pop("resolution_s")  # left out: NULL
    assert store.put_report(a, _rid(1), at, "{}", links, nat) is True
    given = [link | {"node": "a", "report_id": _rid(1), "measured_at": at} for link in links]
    for link in given:
        for key in ("path_mtu", "icmp_seen", "rtt_s", "loss_ratio", "handshake_age_s", "endpoint"):
            link.setdefault(key, None)
    got = store.link_history("a", "b", at) + store.link_history("a", "c-1", at)
    got += store.link_history("a", "d", at)
    assert [{k: v for k, v in row.items() if k not in ("id", "node_id")} for row in got] == given
    for row, link in zip(got, given, strict=True):
        assert set(row) == {c.name for c in link_measurements.c} | {"node"}
        for key, value in link.items():
            assert type(row[key]) is type(value), key  # True stays True, not 1
        assert row["measured_at"].utcoffset() == timedelta(0)
    assert store.link_history("a", "b", at + timedelta(microseconds=1)) == []
    (row,) = [r for r in store.nat_history(whole) if r["report_id"] == _rid(1)]
    assert set(row) == {c.name for c in nat_measurements.c} | {"node", "site"}
    expected = nat | {"resolution_s": None, "report_id": _rid(1), "node": "a", "site": "s"}
    assert {k: v for k, v in row.items() if k not in ("id", "node_id")} == expected
    assert row["nat"] is True and row["stateful_filter"] is True
    assert store.nat_history(whole + timedelta(microseconds=1))[0]["id"] == row["id"]  # newest
    assert store.report_heads()["a"][0] == _rid(1)
    (latest,) = store.latest_reports()["a"]
    assert latest[0].tzinfo is not None
    with store.tx() as conn:  # stored exactly as SQLAlchemy's own types store the same values
        conn.execute(policy_state.insert().values(key="k", state="{}", updated_at=at))
        through_sa = conn.exec_driver_sql("SELECT updated_at FROM policy_state").scalar()
        raw = conn.execute(
            sa.select(sa.cast(link_measurements.c.measured_at, sa.Text)).limit(1)
        ).scalar()
        expected_raw = conn.execute(sa.select(sa.cast(policy_state.c.updated_at, sa.Text))).scalar()
        assert raw == expected_raw
        if store.engine.dialect.name == "sqlite":
            assert raw == through_sa == "2026-11-25 21:07:03.123456"
            kinds = conn.exec_driver_sql(
                "SELECT typeof(icmp_seen), typeof(family), typeof(rtt_s), typeof(rx_bytes)"
                " FROM link_measurements ORDER BY id LIMIT 1"
            ).one()
            assert tuple(kinds) == ("integer", "integer", "real", "integer")


def test_measurement_ids_follow_arrival_order(store: Store) -> None:
    """fleet.compute relies on NAT row ids increasing as reports arrive; link rows are numbered
    in the order of the report's measurements."""
    from fleetvpn.controller.store import Principal

    who: list[Principal] = []
    for i, key in enumerate((KEY_A, KEY_B, "C" * 42 + "A=")):
        token, _ = store.enroll(store.create_enrollment_token("s"), f"n{i}", key)
        principal = store.authenticate(token)
        assert principal is not None
        who.append(principal)
    t0 = datetime.now(UTC)
    order = [(2, 1), (0, 2), (1, 3), (2, 4)]  # (node, report): arrival order
    store.put_reports(
        [
            (
                who[n],
                _rid(r),
                t0 - timedelta(seconds=r),
                "{}",
                [_link(f"p{r}{k}", 1400) for k in range(3)],
                _nat(t0 - timedelta(seconds=r)),
            )
            for n, r in order[:3]
        ]
    )
    n, r = order[3]
    store.put_report(who[n], _rid(r), t0, "{}", [_link("p40", 1400)], _nat(t0))
    rows = sorted(store.nat_history(t0 - timedelta(hours=1)), key=lambda row: row["id"])
    assert [row["report_id"] for row in rows] == [_rid(r) for _, r in order]
    peers = [row["peer"] for row in sorted(store.latest_links(), key=lambda row: row["id"])]
    assert peers == ["p10", "p11", "p12", "p20", "p21", "p22", "p30", "p31", "p32", "p40"]


@pytest.mark.parametrize("broken", ["its node is unknown", "a link has no peer"])
def test_a_report_that_breaks_the_batch_costs_the_others_nothing(store: Store, broken: str) -> None:
    """One transaction for the batch; when it fails (at the report's row, or at a measurement
    row after every report row went in), it is rolled back and each report is written alone:
    the good ones are stored with all their rows and answered as such, the bad one is answered
    Unstorable with the database's words, nothing of it kept."""
    from fleetvpn.controller.store import Principal, Unstorable

    a = store.authenticate(store.enroll(store.create_enrollment_token("s"), "a", KEY_A)[0])
    b = store.authenticate(store.enroll(store.create_enrollment_token("s"), "b", KEY_B)[0])
    assert a is not None and b is not None
    if broken == "its node is unknown":  # the foreign key refuses the report row
        who, links = Principal("node", "ghost", 999_999, "s"), [_link("a", 1300)]
    else:  # NOT NULL refuses the link row
        who, links = b, [{"family": 4, "rx_bytes": 1, "tx_bytes": 2}]
    now = datetime.now(UTC)
    store.put_report(a, _rid(9), now, "{}", [], None)
    items = [
        (a, _rid(1), now, "{}", [_link("b", 1400)], _nat(now)),
        (a, _rid(9), now, "{}", [_link("b", 1300)], None),  # a replay: changes nothing
        (who, _rid(2), now, "{}", links, _nat(now)),
        (b, _rid(3), now + timedelta(seconds=1), "{}", [_link("a", 1380)], _nat(now)),
    ]
    answers = store.put_reports(items)  # type: ignore[arg-type]
    assert answers[:2] == [True, False] and answers[3] is True
    assert isinstance(answers[2], Unstorable)
    assert f"report {_rid(2)} could not be stored: " in str(answers[2])
    words = str(answers[2]).upper().replace("-", " ")
    assert ("FOREIGN KEY" if broken == "its node is unknown" else "NOT NULL") in words
    assert store.report_count() == 3
    assert store.report_bodies([_rid(2)]) == {}
    stored = sorted((r["node"], r["report_id"], r["path_mtu"]) for r in store.latest_links())
    assert stored == [("a", _rid(1), 1400), ("b", _rid(3), 1380)]
    assert sorted(row["report_id"] for row in store.nat_history(now)) == [_rid(1), _rid(3)]
    assert store.report_heads()["a"][::2] == (_rid(1), _rid(9))
    assert store.report_heads()["b"][::2] == (_rid(3), None)
    assert store.put_reports(items[:2] + items[3:]) == [False, False, False]  # type: ignore[arg-type]


def test_a_batch_larger_than_one_statement_takes(store: Store) -> None:
    """7,000 reports × 5 values is more parameters than SQLite takes in one statement (32,766):
    the report rows go in several statements, one transaction, each report answered."""
    from fleetvpn.controller.store import ReportWrite

    a = store.authenticate(store.enroll(store.create_enrollment_token("s"), "a", KEY_A)[0])
    assert a is not None
    t0 = datetime.now(UTC)
    store.put_report(a, _rid(6_999), t0, "{}", [], None)
    items: list[ReportWrite] = [
        (a, _rid(i), t0 + timedelta(seconds=i), "{}", [], None) for i in range(7_000)
    ]
    results = store.put_reports(items)
    assert results == [True] * 6_999 + [False]
    assert store.report_count() == 7_000
    assert store.report_heads()["a"][::2] == (_rid(6_998), _rid(6_997))

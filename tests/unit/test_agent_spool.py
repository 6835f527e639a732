"""The report spool: in order, bounded, summarised at the bound (never silently dropped),
acknowledged reports deleted, refused ones set aside, replays harmless."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fleetvpn.agent.spool import Spool, summarise
from fleetvpn.model import LinkMeasurement, NatMeasurement, Report

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def report(i: int, **link: Any) -> Report:
    m = LinkMeasurement(peer="hub", family=4, rx_bytes=100 * i, tx_bytes=50 * i, **link)
    return Report(
        report_id=str(uuid.UUID(int=i)),
        node="branch1",
        site="branch",
        created_at=T0 + timedelta(seconds=30 * i),
        measurements=(m,),
    )


def test_reports_leave_in_order_and_only_once_acknowledged(tmp_path: Path) -> None:
    logs: list[str] = []
    spool = Spool(tmp_path / "spool", 10, logs.append)
    for i in range(1, 4):
        spool.put(report(i))
    calls: list[str] = []

    def down(doc: dict[str, Any]) -> str | None:
        calls.append(doc["report_id"])
        return "retry"

    assert spool.flush(down) == 0
    assert calls == [str(uuid.UUID(int=1))]  # stops at the first failure, keeps everything
    assert len(spool) == 3
    spool.put(report(4))
    sent: list[str] = []

    def up(doc: dict[str, Any]) -> str | None:
        sent.append(doc["report_id"])
        return None

    assert spool.flush(up) == 4
    assert sent == [str(uuid.UUID(int=i)) for i in range(1, 5)]
    assert len(spool) == 0 and spool.stats()["sent"] == 4
    assert logs == []


def test_order_survives_a_restart(tmp_path: Path) -> None:
    first = Spool(tmp_path, 10, print)
    for i in range(1, 4):
        first.put(report(i))
    again = Spool(tmp_path, 10, print)
    again.put(report(4))
    ids = [doc["report_id"] for _, doc in again.pending()]
    assert ids == [str(uuid.UUID(int=i)) for i in range(1, 5)]


def test_bound_summarises_the_oldest_and_says_so(tmp_path: Path) -> None:
    logs: list[str] = []
    spool = Spool(tmp_path, 3, logs.append)
    spool.put(report(1, path_mtu=1400, rtt_s=0.050, loss_ratio=0.0))
    spool.put(report(2, path_mtu=1500, rtt_s=0.010, loss_ratio=0.2, icmp_seen=True))
    spool.put(report(3))
    assert logs == []
    spool.put(report(4))  # one over the bound: reports 1 and 2 become one
    assert len(spool) == 3
    assert len(logs) == 1 and "summarised into " + str(uuid.UUID(int=2)) in logs[0]
    docs = [doc for _, doc in spool.pending()]
    assert [d["report_id"] for d in docs] == [str(uuid.UUID(int=i)) for i in (2, 3, 4)]
    merged = Report.from_json(docs[0]).measurements[0]
    # the worst of both: the smaller path MTU, the larger RTT and loss, ICMP seen by either;
    # the counters are the newer ones (they only grow)
    assert (merged.path_mtu, merged.rtt_s, merged.loss_ratio) == (1400, 0.050, 0.2)
    assert merged.icmp_seen and merged.rx_bytes == 200
    assert spool.stats()["summarised"] == 1
    for i in range(5, 12):
        spool.put(report(i))
    assert len(spool) == 3 and spool.stats()["summarised"] == 8
    first = Report.from_json(spool.pending()[0][1])
    assert first.measurements[0].path_mtu == 1400  # the oldest detail is still in the summary


def test_summary_keeps_the_smaller_nat_lifetime_and_peers_only_the_older_saw() -> None:
    def nat(lifetime: float, minute: int) -> NatMeasurement:
        return NatMeasurement(
            measured_at=T0 + timedelta(minutes=minute), nat=True, stateful_filter=True,
            mapping_lifetime_s=lifetime,
        )  # fmt: skip

    older = Report(
        report_id=str(uuid.UUID(int=1)), node="branch1", site="branch", created_at=T0,
        measurements=(
            LinkMeasurement("hub", 4, 1, 1, endpoint="198.19.1.11:51820", path_mtu=1400),
            LinkMeasurement("cloud1", 4, 1, 1, endpoint="198.19.5.10:51820", path_mtu=1350),
        ),
        nat=nat(19.5, -5),
    )  # fmt: skip
    newer = Report(
        report_id=str(uuid.UUID(int=2)), node="branch1", site="branch",
        created_at=T0 + timedelta(minutes=1),
        measurements=(LinkMeasurement("hub", 4, 2, 2, endpoint="198.19.1.11:51820"),),
        nat=nat(29.5, 0),
    )  # fmt: skip
    merged = summarise(older, newer)
    assert merged.report_id == newer.report_id and merged.created_at == newer.created_at
    by_peer = {m.peer: m for m in merged.measurements}
    assert by_peer["hub"].path_mtu == 1400 and by_peer["hub"].rx_bytes == 2
    assert by_peer["cloud1"].path_mtu == 1350
    assert merged.nat is not None and merged.nat.mapping_lifetime_s == 19.5
    Report.from_json(merged.to_json())  # still a valid report


def test_refused_report_is_set_aside_with_its_reason(tmp_path: Path) -> None:
    logs: list[str] = []
    spool = Spool(tmp_path, 10, logs.append)
    spool.put(report(1))
    spool.put(report(2))
    outcomes = iter(["HTTP 422: measurements[0].peer: bad", None])
    assert spool.flush(lambda doc: next(outcomes)) == 1
    assert len(spool) == 0 and spool.stats()["rejected"] == 1
    (kept,) = (tmp_path / "rejected").glob("*.json")
    doc = json.loads(kept.read_text())
    assert doc["reason"].startswith("HTTP 422") and doc["report"]["report_id"] == str(
        uuid.UUID(int=1)
    )
    assert "refused report" in logs[0]

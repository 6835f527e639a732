"""The agent's state files: measurements survive a restart, identity comes from node.json, and
what the operator must fix is one clear error naming the file."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fleetvpn.agent.config import AgentConfig, parse
from fleetvpn.agent.report import PathMtu
from fleetvpn.agent.startup import (
    FatalError,
    Identity,
    enroll,
    load_last_good,
    load_measurements,
    save_measurements,
)
from fleetvpn.model import NatMeasurement


def config(tmp_path: Path, extra: str = "") -> AgentConfig:
    return parse(f"controller: http://127.0.0.1:9\nnode: branch1\nstate_dir: {tmp_path}\n" + extra)


def test_measurements_round_trip(tmp_path: Path) -> None:
    c = config(tmp_path)
    pmtu = {"hub": PathMtu(4, 1400, False, 1.7e9, "forward", "1400 acked, 1401 lost")}
    nat = NatMeasurement(measured_at=datetime(2026, 1, 1, tzinfo=UTC), nat=True,
                         stateful_filter=True, mapping_lifetime_s=19.55)  # fmt: skip
    save_measurements(c, pmtu, nat)
    assert load_measurements(c) == (pmtu, nat)
    assert (tmp_path / "measurements.json").stat().st_mode & 0o777 == 0o644


def test_damaged_measurements_mean_measuring_afresh(tmp_path: Path) -> None:
    c = config(tmp_path)
    assert load_measurements(c) == ({}, None)
    (tmp_path / "measurements.json").write_text(json.dumps({"path_mtu": {"hub": {"x": 1}}}))
    assert load_measurements(c) == ({}, None)
    (tmp_path / "measurements.json").write_text("{not json")
    assert load_measurements(c) == ({}, None)
    (tmp_path / "desired.json").write_text("[]")
    assert load_last_good(c) is None


def test_identity_comes_from_node_json_without_asking_anyone(tmp_path: Path) -> None:
    c = config(tmp_path)
    (tmp_path / "node.json").write_text(
        json.dumps({"node": "branch1", "site": "branch", "node_token": "fvn_x"})
    )
    identity = asyncio.run(enroll(c, "pub", lambda: False))
    assert identity == Identity("branch1", "branch", "fvn_x")


def test_missing_enrollment_token_names_the_file(tmp_path: Path) -> None:
    c = config(tmp_path, f"enrollment_token_file: {tmp_path}/nope.token\n")
    with pytest.raises(FatalError, match=r"enrollment_token_file: .*nope\.token"):
        asyncio.run(enroll(c, "pub", lambda: False))


def test_damaged_node_json_is_named(tmp_path: Path) -> None:
    c = config(tmp_path)
    (tmp_path / "node.json").write_text("{}")
    with pytest.raises(FatalError, match=r"node\.json: unreadable"):
        asyncio.run(enroll(c, "pub", lambda: False))


def test_write_json_from_many_threads_at_once_loses_no_write(tmp_path: Path) -> None:
    """Two PMTU jobs finishing together once shared one temporary file name: one rename failed
    (FileNotFoundError) and its measurement was not saved (issue 12)."""
    import threading

    from fleetvpn.agent.startup import write_json

    target = tmp_path / "measurements.json"
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def writer(n: int) -> None:
        start.wait()
        try:
            for i in range(50):
                write_json(target, {"writer": n, "i": i}, durable=False)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert json.loads(target.read_text())["i"] == 49
    assert [p.name for p in tmp_path.iterdir()] == ["measurements.json"]  # no temporary left

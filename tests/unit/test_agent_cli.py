"""`fleetvpn agent status` (pretty and --json) from a status file; `agent run` config errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

from click.testing import CliRunner

from fleetvpn.cli import cli


def config(tmp_path: Path) -> Path:
    path = tmp_path / "agent.yml"
    path.write_text(f"controller: http://127.0.0.1:9\nnode: branch1\nstate_dir: {tmp_path}\n")
    return path


STATUS = {
    "schema_version": 1, "node": "branch1", "site": "branch", "interface": "wg0", "apply": True,
    "updated_at": "2026-01-01T12:00:00Z",
    "configured": {"interface_mtu": 1340,
                   "peers": [{"peer": "hub", "route_mtu": 1340, "keepalive_s": 8}]},
    "peers": [{"peer": "hub", "endpoint": "198.19.1.11:51820", "planned_endpoint": None,
               "handshake_age_s": 12.5, "path_mtu": 1400, "path_mtu_how": "forward",
               "rtt_s": 0.0021, "loss_ratio": 0.0}],
    "nat": {"nat": True, "stateful_filter": True, "mapping_lifetime_s": 19.55,
            "measured_at": "2026-01-01T11:59:00Z"},
    "controller": {"reachable": False, "error": "timed out"},
    "last_apply": {"at": "2026-01-01T11:58:00Z", "ok": True, "error": None,
                   "changes": ["peer hub: keepalive 25 s => 8 s — behind NAT"]},
    "spool": {"pending": 3, "summarised": 0},
}  # fmt: skip


def test_status_pretty_and_json(tmp_path: Path) -> None:
    (tmp_path / "status.json").write_text(json.dumps({**STATUS, "pid": os.getpid()}))
    runner = CliRunner()
    pretty = runner.invoke(cli, ["agent", "status", "--config", str(config(tmp_path))])
    assert pretty.exit_code == 0, pretty.output
    assert "node branch1 (site branch): agent running" in pretty.output
    assert "controller: UNREACHABLE (timed out); spool: 3 pending" in pretty.output
    assert "mapping lifetime 19.55 s" in pretty.output
    hub = next(line for line in pretty.output.splitlines() if line.startswith("hub "))
    assert "1400" in hub and "forward" in hub and "1340" in hub and " 8" in hub
    as_json = runner.invoke(cli, ["agent", "status", "--config", str(config(tmp_path)), "--json"])
    doc = json.loads(as_json.output)
    assert doc["running"] is True and doc["peers"][0]["path_mtu"] == 1400


def test_status_of_a_stopped_agent_exits_3(tmp_path: Path) -> None:
    (tmp_path / "status.json").write_text(json.dumps({**STATUS, "pid": 2**22 + 7}))
    result = CliRunner().invoke(cli, ["agent", "status", "--config", str(config(tmp_path))])
    assert result.exit_code == 3 and "NOT RUNNING" in result.output


def test_status_without_a_status_file_says_so(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["agent", "status", "--config", str(config(tmp_path))])
    assert result.exit_code == 1 and "no status yet" in result.output


def test_run_with_a_bad_config_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "agent.yml"
    path.write_text("controller: http://127.0.0.1:9\nintervals: {pmtu_s: -1}\n")
    result = CliRunner().invoke(cli, ["agent", "run", "--config", str(path)])
    assert result.exit_code == 1
    assert f"{path}: intervals.pmtu_s: must be a number of seconds" in result.output

"""The command line as a user meets it, without root: help, version, bad topology files."""

from __future__ import annotations

import os
from pathlib import Path

from click.testing import CliRunner

from fleetvpn import __version__
from fleetvpn.cli import cli


def test_version() -> None:
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_help_lists_the_lab_and_its_commands() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0 and "lab" in result.output
    result = CliRunner().invoke(cli, ["lab", "--help"])
    for command in ("up", "down", "status", "exec", "verify"):
        assert command in result.output


def test_bad_topology_is_refused_before_anything_is_created(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "name: badlab\ncontroller: c\nsites:\n"
        "  hub: {kind: public, ipv6: true, uplink_mtu: 1200, hosts: [c]}\n"
    )
    result = CliRunner().invoke(cli, ["lab", "up", "-t", str(bad)])
    assert result.exit_code == 1
    assert f"{bad}: sites.hub.uplink_mtu: 1200 is below the minimum" in result.output
    netns = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
    assert not any(n.startswith("badlab-") for n in netns)
    assert not Path("/var/lib/fleetvpn-lab/badlab").exists()


def test_missing_topology_file_is_one_clear_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["lab", "verify", "-t", str(tmp_path / "none.yml")])
    assert result.exit_code == 1
    assert "cannot read" in result.output and "Traceback" not in result.output

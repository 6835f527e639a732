"""``fleetvpn agent run`` and ``fleetvpn agent status``. Only click at import time: the daemon's
modules load when a command runs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import click

DEFAULT_PATH = Path("/etc/fleetvpn/agent.yml")  # the same as fleetvpn.agent.config's

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=DEFAULT_PATH,
    show_default=True,
    help="Agent config file (YAML).",
)


@click.group()
def agent() -> None:
    """The node agent: runs the tunnel, probes its peers, reports to the controller."""


@agent.command("run")
@config_option
def run_command(config_path: Path) -> None:
    """Run the agent in the foreground (for systemd). SIGHUP reloads the config; SIGTERM stops
    it and leaves the tunnel up unless `on_stop: down`."""
    from fleetvpn.agent.daemon import run
    from fleetvpn.agent.startup import FatalError

    try:
        raise SystemExit(run(config_path))
    except FatalError as e:
        raise click.ClickException(str(e)) from None


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@agent.command("status")
@config_option
@click.option("--json", "as_json", is_flag=True, help="The status document (stable keys).")
def status_command(config_path: Path, as_json: bool) -> None:
    """This node's tunnel, peers and latest measurements (from <state_dir>/status.json).

    Exit 0 when the agent is running, 3 when its status file is missing or it is not running."""
    from fleetvpn.agent.config import ConfigError, load

    try:
        config = load(config_path)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    try:
        doc = json.loads(config.status_file.read_text())
    except FileNotFoundError:
        raise click.ClickException(
            f"{config.status_file}: no status yet (is `fleetvpn agent run` running?)"
        ) from None
    except (OSError, ValueError) as e:
        raise click.ClickException(f"{config.status_file}: unreadable: {e}") from None
    doc["running"] = _alive(doc.get("pid"))
    doc["status_age_s"] = round(time.time() - config.status_file.stat().st_mtime, 1)
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
    else:
        click.echo(render(doc))
    if not doc["running"]:
        raise SystemExit(3)


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}{unit}"
    return f"{value}{unit}"


def render(doc: dict[str, Any]) -> str:
    state = "running" if doc.get("running") else "NOT RUNNING"
    lines = [
        f"node {doc.get('node')} (site {doc.get('site')}): agent {state}, "
        f"status {doc.get('status_age_s')} s old",
    ]
    ctl = doc.get("controller") or {}
    reach = {True: "reachable", False: "UNREACHABLE", None: "not contacted yet"}
    lines.append(
        f"controller: {reach.get(ctl.get('reachable'), '?')}"
        + (f" ({ctl['error']})" if ctl.get("error") else "")
        + f"; spool: {(doc.get('spool') or {}).get('pending', 0)} pending, "
        f"{(doc.get('spool') or {}).get('summarised', 0)} summarised"
    )
    configured = doc.get("configured") or {}
    lines.append(
        f"interface {doc.get('interface')}: mtu {_fmt(configured.get('interface_mtu'))}, "
        f"apply {'on' if doc.get('apply') else 'off'}"
    )
    apply = doc.get("last_apply")
    if apply:
        result = "ok" if apply.get("ok") else f"FAILED: {apply.get('error')}"
        lines.append(f"last apply {apply.get('at')}: {result}")
        lines += [f"  {c}" for c in apply.get("changes", [])[-10:]]
    nat = doc.get("nat")
    if nat:
        lines.append(
            f"NAT: {'yes' if nat.get('nat') else 'no'}, stateful filter "
            f"{'yes' if nat.get('stateful_filter') else 'no'}, mapping lifetime "
            f"{_fmt(nat.get('mapping_lifetime_s'), ' s')} (measured {nat.get('measured_at')})"
        )
    routes = {p["peer"]: p for p in configured.get("peers", [])}
    header = f"{'peer':<16} {'endpoint':<24} {'hs age':>7} {'path MTU':>9} {'how':<8} " + (
        f"{'rtt':>8} {'loss':>5} {'route':>6} {'ka':>3}"
    )
    lines.append(header)
    for p in doc.get("peers", []):
        conf = routes.get(p["peer"], {})
        age, loss = p.get("handshake_age_s"), p.get("loss_ratio")
        lines.append(
            f"{p['peer']:<16} {_fmt(p.get('endpoint') or p.get('planned_endpoint')):<24} "
            f"{_fmt(None if age is None else round(age), 's'):>7} {_fmt(p.get('path_mtu')):>9} "
            f"{_fmt(p.get('path_mtu_how')):<8} "
            f"{_fmt(None if p.get('rtt_s') is None else p['rtt_s'] * 1000, 'ms'):>8} "
            f"{_fmt(loss if loss is None else round(loss * 100), '%'):>5} "
            f"{_fmt(conf.get('route_mtu')):>6} {_fmt(conf.get('keepalive_s')):>3}"
        )
    return "\n".join(lines)

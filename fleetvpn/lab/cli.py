"""``fleetvpn lab …``: build, inspect, enter, verify and remove the network-namespace lab."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from fleetvpn.lab import topology as topology_mod
from fleetvpn.lab.build import Lab, LabError, LabPaths, LabState, down, lab_namespaces
from fleetvpn.lab.plan import Plan, build_plan
from fleetvpn.lab.topology import Topology, TopologyError
from fleetvpn.runner import CommandError, Runner, netns_path

DEFAULT_TOPOLOGY = Path(os.environ.get("FLEETVPN_LAB_TOPOLOGY", "inventories/lab/topology.yml"))


def _fail(message: str) -> click.ClickException:
    return click.ClickException(message)


def load_lab(topology: Path, name: str | None) -> tuple[Topology, Plan]:
    try:
        topo = topology_mod.load(topology)
        if name is not None and name != topo.name:
            if not topology_mod._NAME.match(name) or len(name) > topology_mod.LAB_NAME_MAX:
                raise TopologyError("--name", "", f"{name!r} is not a valid lab name")
            topo = dataclasses.replace(topo, name=name)
    except TopologyError as e:
        raise _fail(str(e)) from None
    return topo, build_plan(topo)


def inventory_path(topology: Path, topo: Topology, name: str | None) -> Path:
    base = topology.parent
    return base / ("hosts.yml" if name is None else f"hosts-{topo.name}.yml")


topology_option = click.option(
    "-t",
    "--topology",
    type=click.Path(path_type=Path, dir_okay=False),
    default=DEFAULT_TOPOLOGY,
    show_default=True,
    help="Topology file (YAML).",
)
name_option = click.option("--name", help="Lab name (default: the topology's `name`).")


@click.group()
def lab() -> None:
    """A fleet of sites on this machine, made of network namespaces.

    NATs with their own UDP timeouts, PMTU black holes, stateful firewalls, IPv4
    and IPv6 — real packets, real conntrack, real sshd. Needs root.
    """


@lab.command()
@topology_option
@name_option
@click.option("-v", "--verbose", is_flag=True, help="Echo every command run.")
def up(topology: Path, name: str | None, verbose: bool) -> None:
    """Build the lab (or repair a half-built one). Idempotent."""
    topo, plan = load_lab(topology, name)
    started = time.monotonic()

    def progress(step: str) -> None:
        click.echo(f"  {time.monotonic() - started:5.1f}s  {step}", err=True)

    runner = Runner(echo=(lambda line: click.echo(line, err=True)) if verbose else None)
    click.echo(f"lab {topo.name}: building from {topology}", err=True)
    inventory = inventory_path(topology, topo, name)
    try:
        Lab(plan, topo, runner, progress=progress).up(inventory=inventory)
    except (LabError, CommandError, OSError) as e:
        raise _fail(f"lab up failed: {e}") from None
    click.echo(
        f"lab {topo.name} is up in {time.monotonic() - started:.1f}s: {len(plan.namespaces)} "
        f"namespaces, {len(plan.hosts)} hosts. Inventory: {inventory}"
    )


@lab.command(name="down")
@topology_option
@name_option
def down_cmd(topology: Path, name: str | None) -> None:
    """Remove everything the lab created (namespaces, mounts, processes)."""
    if name is None:
        topo, _ = load_lab(topology, None)
        name = topo.name
    try:
        removed = down(name)
    except (LabError, CommandError, OSError) as e:
        raise _fail(f"lab down failed: {e}") from None
    if removed:
        click.echo(f"lab {name} removed: " + ", ".join(removed))
    else:
        click.echo(f"lab {name}: nothing to remove")


@lab.command()
@topology_option
@name_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(topology: Path, name: str | None, as_json: bool) -> None:
    """Show the lab's hosts, their addresses and what is running."""
    from fleetvpn.lab import netns
    from fleetvpn.lab.build import _alive

    topo, plan = load_lab(topology, name)
    present = set(lab_namespaces(topo.name))
    state = LabState.load(LabPaths(topo.name).state_file)
    rows: list[dict[str, Any]] = []
    for host, hp in plan.hosts.items():
        pid = state.sshd.get(host)
        rows.append(
            {
                "host": host,
                "site": hp.site,
                "kind": topo.site(hp.site).kind,
                "namespace": hp.ns,
                "up": hp.ns in present,
                "sshd_running": bool(pid and _alive(pid, netns.inode(hp.ns))),
                "management_ip": hp.mgmt_ip,
                "lan_ipv4": hp.ipv4,
                "public_ipv4": hp.public_ipv4,
                "ipv6": hp.ipv6,
                "controller": host == topo.controller,
            }
        )
    missing = sorted(set(plan.namespaces) - present)
    if as_json:
        doc = {
            "schema_version": 1,
            "lab": topo.name,
            "up": not missing,
            "missing_namespaces": missing,
            "hosts": rows,
        }
        click.echo(json.dumps(doc, indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"lab {topo.name}", title_justify="left")
        for col in ("host", "site", "kind", "mgmt", "lan ipv4", "public ipv4", "ipv6", "sshd"):
            table.add_column(col)
        for r in rows:
            name_cell = r["host"] + (" (controller)" if r["controller"] else "")
            sshd = "running" if r["sshd_running"] else ("[red]down[/]" if r["up"] else "-")
            table.add_row(
                name_cell,
                r["site"],
                r["kind"],
                r["management_ip"],
                r["lan_ipv4"],
                r["public_ipv4"],
                r["ipv6"] or "",
                sshd,
            )
        console = Console(width=None if sys.stdout.isatty() else 150)
        console.print(table)
        if missing:
            console.print(
                f"[red]missing namespaces:[/] {', '.join(missing)} — run `fleetvpn lab up`"
            )
    sys.exit(0 if not missing else 1)


@lab.command(name="exec", context_settings={"ignore_unknown_options": True})
@topology_option
@name_option
@click.argument("host")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def exec_cmd(topology: Path, name: str | None, host: str, command: tuple[str, ...]) -> None:
    """Run COMMAND on lab HOST (a shell when none is given).

    HOST is a host name, or a box: core, mgmt, <site>-isp, <site>-r, <site>-cgn.
    Example: fleetvpn lab exec branch1 -- ip addr
    """
    topo, plan = load_lab(topology, name)
    paths = LabPaths(topo.name)
    ns = f"{topo.name}-{host}"
    if ns not in plan.namespaces:
        known = ", ".join(sorted(n.removeprefix(f"{topo.name}-") for n in plan.namespaces))
        raise _fail(f"no lab host or box {host!r} (known: {known})")
    if not os.path.exists(netns_path(ns)):
        raise _fail(f"lab {topo.name} is not up (no namespace {ns}); run `fleetvpn lab up`")
    argv = ["nsenter", f"--net={netns_path(ns)}"]
    if host in plan.hosts:
        # Entering a mount namespace resets the working directory; keep the caller's.
        argv += [
            f"--mount={paths.mount_ns(host)}",
            f"--uts={paths.uts_ns(host)}",
            f"--wd={os.getcwd()}",
        ]
    argv += ["--", *(command or [os.environ.get("SHELL", "/bin/sh")])]
    os.execvp(argv[0], argv)


@lab.command()
@topology_option
@name_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--no-timeouts", is_flag=True, help="Skip the NAT/firewall timer checks (they take ~T+3 s)."
)
def verify(topology: Path, name: str | None, as_json: bool, no_timeouts: bool) -> None:
    """Prove with real packets that the lab is what the topology says.

    Per site: DF packets at the bottleneck size pass and one byte more fail (silently
    where ICMP is black-holed); established UDP mappings die after the configured
    stream timeout (±1 s) and survive shorter gaps; unsolicited UDP gets in only on
    public sites; sshd answers on every host. Exits 1 on any mismatch.
    """
    from fleetvpn.lab.verify import print_results, run_checks

    topo, plan = load_lab(topology, name)
    missing = sorted(set(plan.namespaces) - set(lab_namespaces(topo.name)))
    if missing:
        raise _fail(
            f"lab {topo.name} is not up (missing {', '.join(missing)}); run `fleetvpn lab up`"
        )
    started = time.monotonic()
    results = run_checks(topo, plan, LabPaths(topo.name), timeouts=not no_timeouts)
    elapsed = time.monotonic() - started
    failed = [r for r in results if not r.ok]
    if as_json:
        doc = {
            "schema_version": 1,
            "lab": topo.name,
            "ok": not failed,
            "elapsed_s": round(elapsed, 1),
            "checks": [dataclasses.asdict(r) for r in results],
        }
        click.echo(json.dumps(doc, indent=2))
    else:
        print_results(topo, results, elapsed)
    sys.exit(1 if failed else 0)


@lab.command()
@topology_option
@name_option
@click.argument("src")
@click.argument("dst")
@click.option("--to", "address", help="Destination address (default: DST's IPv4 on wg0).")
@click.option("--bytes", "nbytes", default=4 << 20, show_default=True, help="Bytes to send.")
@click.option("--timeout", default=10.0, show_default=True, help="Seconds before giving up.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def transfer(
    topology: Path,
    name: str | None,
    src: str,
    dst: str,
    address: str | None,
    nbytes: int,
    timeout: float,
    as_json: bool,
) -> None:
    """Push a TCP bulk transfer from lab host SRC to DST, through the tunnel by default.

    Exits 0 when every byte arrived in time, 1 when it stalled (a PMTU black hole shows
    as a transfer that connects and then moves a few kilobytes).
    """
    from fleetvpn.lab import transfer as transfer_mod

    _, plan = load_lab(topology, name)
    try:
        result = transfer_mod.run(plan, src, dst, nbytes, timeout, address)
    except (ValueError, OSError) as e:
        raise _fail(f"transfer {src} → {dst}: {e}") from None
    if as_json:
        click.echo(json.dumps(result.as_json()))
    else:
        verdict = (
            "complete"
            if result.complete
            else ("did not connect" if not result.connected else "STALLED")
        )
        click.echo(
            f"{src} → {dst} ({result.address}): {result.received_bytes:,} of "
            f"{result.sent_bytes:,} bytes in {result.elapsed_s:.1f}s — {verdict}"
        )
    sys.exit(0 if result.complete else 1)


@lab.command(name="set")
@topology_option
@name_option
@click.argument("site")
@click.option("--nat-timeout", type=int, required=True, help="Established-UDP timer, seconds.")
@click.option("--box", help="Only this box of a double NAT (e.g. 'home NAT', 'carrier NAT').")
def set_cmd(topology: Path, name: str | None, site: str, nat_timeout: int, box: str | None) -> None:
    """Change SITE's NAT/firewall UDP timer while the lab runs (as an ISP might)."""
    from fleetvpn.lab import transfer as transfer_mod

    _, plan = load_lab(topology, name)
    try:
        done = transfer_mod.set_stream_timeout(plan, site, nat_timeout, box)
    except (ValueError, OSError) as e:
        raise _fail(str(e)) from None
    click.echo(f"{site}: established-UDP timeout now {nat_timeout}s on " + ", ".join(done))

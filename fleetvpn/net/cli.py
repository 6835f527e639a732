"""``fleetvpn probe …``: the responder and one-shot measurements (a stable contract: scripts and
tests read the ``--json`` forms)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click

from fleetvpn.net.endpoint import parse_endpoint
from fleetvpn.net.keys import ROTATION_STEPS, KeyFileError, generate_key, load_key, rotate
from fleetvpn.net.wire import KeyRing

T = TypeVar("T")

key_option = click.option(
    "--key-file",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="The fleet probe key (base64, from `fleetvpn probe genkey`).",
)


def _endpoint(text: str, what: str) -> tuple[str, int]:
    try:
        return parse_endpoint(text)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=what) from None


def _key(path: Path) -> KeyRing:
    try:
        return load_key(path)
    except KeyFileError as e:
        raise click.ClickException(str(e)) from None


def _emit_json(doc: dict[str, Any]) -> None:
    click.echo(json.dumps(doc, indent=2))


class _ProgressLine:
    """One self-rewriting status line on stderr, for people only (never with --json or a pipe)."""

    def __init__(self, as_json: bool) -> None:
        self.enabled = not as_json and sys.stderr.isatty()
        self.width = 0

    def show(self, text: str) -> None:
        if self.enabled:
            self.width = max(self.width, len(text))
            click.echo(f"\r{text:<{self.width}}", err=True, nl=False)

    def clear(self) -> None:
        if self.enabled and self.width:
            click.echo("\r" + " " * self.width + "\r", err=True, nl=False)


def _measure(coro: Coroutine[Any, Any, T], line: _ProgressLine) -> T:
    """Run one measurement; its ProbeError becomes one clear line and exit 1."""
    from fleetvpn.net.pmtuprobe import ProbeError

    try:
        return asyncio.run(coro)
    except ProbeError as e:
        raise click.ClickException(str(e)) from None
    finally:
        line.clear()


@click.group()
def probe() -> None:
    """Measure path MTU and NAT mapping lifetime against a probe responder."""


@probe.command()
def genkey() -> None:
    """Print a new fleet probe key (keep it in a file readable by root only)."""
    click.echo(generate_key())


@probe.command("rotate-key")
@click.argument("step", type=click.Choice(ROTATION_STEPS))
@key_option
def rotate_key(step: str, key_file: Path) -> None:
    """One step of a fleet probe key rotation without a gap in probing: add (a new key,
    accepted), promote (it seals), retire (the old one goes). Run each step on the controller
    host and copy the file to every node before the next (playbooks/rotate-probe-key.yml)."""
    try:
        click.echo(rotate(key_file, step))
    except KeyFileError as e:
        raise click.ClickException(str(e)) from None


@probe.command()
@click.option(
    "--listen",
    required=True,
    metavar="ADDR:PORT",
    help="Where to listen ([::]:P for both families).",
)
@key_option
def responder(listen: str, key_file: Path) -> None:
    """Serve PMTU and NAT probes in the foreground until stopped."""
    from fleetvpn.net.responder import serve

    endpoint = _endpoint(listen, "--listen")
    key = _key(key_file)

    async def run() -> None:
        try:
            handle = await serve(endpoint, key)
        except OSError as e:
            raise click.ClickException(f"cannot listen on {listen}: {e.strerror}") from None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        click.echo(
            f"fleetvpn probe responder on {handle.address[0]}:{handle.address[1]} "
            f"(fires from other port {handle.other_address[1]})",
            err=True,
        )
        await stop.wait()
        handle.close()
        counts = ", ".join(f"{k} {v}" for k, v in handle.protocol.counters.as_dict().items())
        click.echo(f"fleetvpn probe responder stopped: {counts}", err=True)

    asyncio.run(run())


@probe.command()
@click.argument("target", metavar="ADDR:PORT")
@key_option
@click.option("--source", metavar="ADDR", help="Source address (e.g. the one WireGuard uses).")
@click.option(
    "--timeout",
    "timeout_s",
    default=60.0,
    show_default=True,
    help="Give up after this many seconds.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def pmtu(target: str, key_file: Path, source: str | None, timeout_s: float, as_json: bool) -> None:
    """Measure the path MTU towards a responder, exact to the byte."""
    from fleetvpn.net.pmtuprobe import measure_pmtu

    endpoint = _endpoint(target, "ADDR:PORT")
    key = _key(key_file)
    line = _ProgressLine(as_json)

    def progress(search: Any) -> None:
        line.show(f"  probing {target}: round {search.rounds}, {search.probes_sent} probes")

    report = _measure(
        measure_pmtu(endpoint, key, source=source, timeout_s=timeout_s, progress=progress), line
    )
    if as_json:
        _emit_json(report.as_json())
        return
    overhead = report.path_mtu - report.tunnel_mtu
    click.echo(
        f"path MTU to {target}: {report.path_mtu} bytes (IPv{report.family}"
        f"{', ICMP seen' if report.icmp_seen else ', no ICMP'})\n"
        f"WireGuard over it: interface MTU {report.tunnel_mtu} (= {report.path_mtu} − {overhead})\n"
        f"{report.probes_sent} probes ({report.bytes_sent} bytes) in {report.rounds} rounds, "
        f"{report.elapsed_s:.2f} s"
    )


@probe.command()
@click.argument("target", metavar="ADDR:PORT")
@key_option
@click.option("--source", metavar="ADDR", help="Source address (e.g. the one WireGuard uses).")
@click.option(
    "--max-lifetime",
    "max_lifetime_s",
    default=300.0,
    show_default=True,
    help="Longest mapping lifetime to look for, in seconds.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def nat(
    target: str, key_file: Path, source: str | None, max_lifetime_s: float, as_json: bool
) -> None:
    """Find this host's NAT, its filtering, and how long an idle established mapping lives."""
    from fleetvpn.net.natprobe import measure_nat

    endpoint = _endpoint(target, "ADDR:PORT")
    key = _key(key_file)
    line = _ProgressLine(as_json)

    def progress(elapsed_s: float, mappings: int) -> None:
        bar = "#" * int(min(1.0, elapsed_s / max_lifetime_s) * 30)
        line.show(
            f"  [{bar:<30}] {elapsed_s:5.0f} s of at most ~{max_lifetime_s:.0f} s, "
            f"{mappings} mappings open"
        )

    report = _measure(
        measure_nat(endpoint, key, source=source, max_lifetime_s=max_lifetime_s, progress=progress),
        line,
    )
    if as_json:
        _emit_json(report.as_json())
        return
    if report.nat:
        what = f"NAT: {report.local_address} is seen as {report.mapped_address}"
    else:
        what = f"no NAT: seen as {report.mapped_address}"
    lines = [what, f"stateful filter: {'yes' if report.stateful_filter else 'no'}"]
    if report.mapping_lifetime_s is not None:
        lines.append(
            f"established mapping lifetime: {report.mapping_lifetime_s:g} s "
            f"(± {report.resolution_s or 0:g} s)"
        )
    elif report.nat or report.stateful_filter:
        lines.append(f"established mapping lifetime: more than {max_lifetime_s:g} s")
    keepalive = f"{report.keepalive_s} s" if report.keepalive_s else "off"
    lines.append(f"keepalive: {keepalive} ({report.reason})")
    lines.append(f"{report.mappings_used} mappings, {report.elapsed_s:.1f} s")
    click.echo("\n".join(lines))

"""The command line: one table of subcommands, each a thin handler."""

from __future__ import annotations

import click

from fleetvpn import __version__
from fleetvpn.agent.cli import agent
from fleetvpn.controller.cli import controller
from fleetvpn.health_cli import health, tune
from fleetvpn.lab.cli import lab
from fleetvpn.net.cli import probe


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fleetvpn")
def cli() -> None:
    """Keep a WireGuard fleet working on real networks.

    fleetvpn measures each link's path MTU and each site's NAT mapping lifetime,
    and sets tunnel MTU and keepalive from what it measured.
    """


# The table of subcommands. Each group lives next to the code it drives.
cli.add_command(lab)
cli.add_command(probe)
cli.add_command(controller)
cli.add_command(health)
cli.add_command(tune)
cli.add_command(agent)


def main() -> None:
    cli()

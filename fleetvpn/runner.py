"""The one runner for side effects: every command fleetvpn runs goes through :class:`Runner`.

Contract:
- ``run(argv, …)`` runs a command (optionally inside a network / mount / UTS namespace via
  ``nsenter``), echoes ``[#] argv`` to the echo callback (like wg-quick's ``cmd()``), and returns
  the completed process. With ``check=True`` a non-zero exit raises :class:`CommandError`, whose
  message carries the command and its stderr.
- ``dry_run=True`` echoes and returns an empty success without running anything.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

NETNS_DIR = "/run/netns"


class CommandError(RuntimeError):
    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        detail = f": {self.stderr}" if self.stderr else ""
        super().__init__(f"`{shlex.join(self.argv)}` failed with exit {returncode}{detail}")


@dataclass(frozen=True)
class NsPath:
    """Namespaces to run a command in (file paths, as ``nsenter`` takes them)."""

    net: str | None = None
    mount: str | None = None
    uts: str | None = None

    def prefix(self) -> list[str]:
        if not (self.net or self.mount or self.uts):
            return []
        argv = ["nsenter"]
        if self.net:
            argv.append(f"--net={self.net}")
        if self.mount:
            argv.append(f"--mount={self.mount}")
        if self.uts:
            argv.append(f"--uts={self.uts}")
        return [*argv, "--"]


def netns_path(name: str) -> str:
    return f"{NETNS_DIR}/{name}"


@dataclass
class Runner:
    echo: Callable[[str], None] | None = None
    dry_run: bool = False

    def run(
        self,
        argv: Sequence[str],
        *,
        ns: NsPath | None = None,
        input: str | None = None,
        check: bool = True,
        quiet: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        full = (ns.prefix() if ns else []) + list(argv)
        if self.echo and not quiet:
            self.echo(f"[#] {shlex.join(full)}")
        if self.dry_run:
            return subprocess.CompletedProcess(full, 0, "", "")
        try:
            proc = subprocess.run(full, input=input, capture_output=True, text=True, check=False)
        except FileNotFoundError:
            raise CommandError(full, 127, f"{full[0]}: command not found") from None
        if check and proc.returncode != 0:
            raise CommandError(full, proc.returncode, proc.stderr)
        return proc

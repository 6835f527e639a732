"""The WireGuard adapter: reads the interface's actual state and applies planned changes, all
through :class:`fleetvpn.runner.Runner` (so every command is echoed as ``[#] argv``).

Contract of :class:`WgTunnel`:

- ``read()``: the actual :class:`TunnelState` from ``wg show IF dump``, ``ip -j -d link``,
  ``ip -j addr`` and ``ip -d route`` (text: only it shows ``mtu lock``); None when the interface
  does not exist. Raises :class:`NotWireGuardError` when a link of that name exists but is not
  WireGuard (neither a ``wireguard`` link nor a TUN device with wireguard-go's control socket).
  Reads run even with a dry-run runner (they change nothing) and are not echoed.
- ``reconcile(desired, reasons, dry_run)``: plans with :func:`fleetvpn.wg.diff.plan` and applies
  the changes in order; returns them (all of them, or with ``dry_run`` the ones it would apply).
  An absent interface is created: kernel WireGuard when ``ip link add … type wireguard`` works,
  else wireguard-go (``implementation="auto"``); an interface of the wrong type (another kind of
  link, or not the implementation asked for explicitly) is deleted and created again. Nothing
  else ever recreates it: MTU, keepalive, endpoint, allowed IPs, peers and routes change live.
  When a step fails, the changes already made are rolled back to the state read before the
  apply (:func:`fleetvpn.wg.diff.plan_restore`) and :class:`ApplyError` is raised, naming the
  failed step and saying whether the rollback completed.
- ``down()``: deletes the interface (wireguard-go exits with its TUN device); no-op if absent.

The private key reaches WireGuard only as ``wg set IF private-key FILE``: a path in argv, never
the key. Every value in an argv was parsed by :mod:`fleetvpn.grammar` when the change was planned
(:func:`fleetvpn.wg.diff.check_spec`); the interface name is checked when the tunnel is made,
and :meth:`WgTunnel._run` refuses, as a last guard, any argv with an empty or unprintable
element (a newline can reach no command). With ``ns`` every command runs in that namespace
(``nsenter``), and ``private_key_file`` is a path as seen inside it.

Limits: preshared keys are not managed; a rollback cannot bring back an earlier private key
(only the file is known, and it holds the new one) nor a foreign link deleted for being of the
wrong type.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from subprocess import CompletedProcess
from typing import Literal

from .. import grammar
from ..runner import CommandError, NsPath, Runner
from .diff import Change, create_argvs, delete_change, plan, plan_restore
from .dump import parse_dump
from .iproute import parse_addresses, parse_link, parse_routes
from .keys import generate_private_key, public_key_of
from .state import Implementation, TunnelSpec, TunnelState

__all__ = [
    "ApplyError",
    "NotWireGuardError",
    "WgTunnel",
    "generate_private_key",
    "public_key_of",
]

log = logging.getLogger(__name__)

#: How long to wait for a deleted interface's wireguard-go to let go of its control socket.
_GONE_TIMEOUT_S = 5.0


class NotWireGuardError(RuntimeError):
    """A link with the interface's name exists but is not (the right kind of) WireGuard."""


class ApplyError(RuntimeError):
    """A step of an apply failed. ``step`` is the failed :class:`Change`, ``applied`` the ones
    done before it, ``rolled_back`` whether the rollback to the pre-apply state completed
    (``rollback_errors`` says what did not)."""

    def __init__(
        self,
        interface: str,
        step: Change,
        index: int,
        total: int,
        cause: Exception,
        applied: Sequence[Change],
        rollback_errors: Sequence[str],
    ) -> None:
        self.interface = interface
        self.step = step
        self.index = index
        self.cause = cause
        self.applied = list(applied)
        self.rollback_errors = list(rollback_errors)
        self.rolled_back = not rollback_errors
        outcome = (
            f"rolled back the {len(applied)} change(s) before it"
            if self.rolled_back
            else "ROLLBACK INCOMPLETE: " + "; ".join(rollback_errors)
        )
        super().__init__(
            f"{interface}: step {index} of {total} failed: {step.summary}: {cause}; {outcome}"
        )


class WgTunnel:
    def __init__(
        self,
        interface: str,
        private_key_file: Path,
        runner: Runner | None = None,
        implementation: Literal["auto", "kernel", "userspace"] = "auto",
        *,
        ns: NsPath | None = None,
        log_change: Callable[[Change], None] | None = None,
    ) -> None:
        self.interface = grammar.ifname(interface, "interface")
        self.private_key_file = Path(private_key_file)
        self.runner = runner or Runner()
        self.implementation = implementation
        self.ns = ns
        self.log_change = log_change

    # -- reading ------------------------------------------------------------------------------

    def read(self) -> TunnelState | None:
        name = self.interface
        link_proc = self._read(["ip", "-j", "-d", "link", "show", "dev", name])
        if link_proc.returncode != 0:
            if "does not exist" in link_proc.stderr:
                return None
            raise CommandError(link_proc.args, link_proc.returncode, link_proc.stderr)
        link = parse_link(link_proc.stdout)
        if link.kind not in ("wireguard", "tun"):
            raise NotWireGuardError(f"{name} is a {link.kind or 'plain'} link, not WireGuard")
        impl: Implementation = "kernel" if link.kind == "wireguard" else "userspace"
        dump_proc = self._read(["wg", "show", name, "dump"])
        if dump_proc.returncode != 0:
            if impl == "userspace":
                raise NotWireGuardError(
                    f"{name} is a TUN device that no wireguard-go answers for"
                    f" ({dump_proc.stderr.strip()})"
                )
            raise CommandError(dump_proc.args, dump_proc.returncode, dump_proc.stderr)
        try:
            interface, peers = parse_dump(dump_proc.stdout)
        finally:
            del dump_proc  # its stdout holds the private key: drop it now
        addresses = parse_addresses(self._checked(["ip", "-j", "address", "show", "dev", name]))
        route_mtus: dict[str, int | None] = {}
        unlocked: dict[str, int] = {}
        advmss: dict[str, int] = {}
        for family in (4, 6):
            proc = self._read(["ip", f"-{family}", "-d", "route", "show", "dev", name])
            if proc.returncode != 0:
                if family == 6 and "not supported" in proc.stderr:
                    continue  # IPv6 disabled in this kernel: no IPv6 routes
                raise CommandError(proc.args, proc.returncode, proc.stderr)
            for route in parse_routes(proc.stdout, family):
                if route.route_type != "unicast" or route.protocol == "kernel":
                    continue
                route_mtus[route.dst] = route.mtu if route.mtu_locked else None
                if route.mtu is not None and not route.mtu_locked:
                    unlocked[route.dst] = route.mtu
                if route.advmss is not None:
                    advmss[route.dst] = route.advmss
        return TunnelState(
            interface=name,
            public_key=interface.public_key,
            listen_port=interface.listen_port,
            mtu=link.mtu,
            addresses=addresses,
            peers=tuple(peers),
            route_mtus=route_mtus,
            ifindex=link.ifindex,
            implementation=impl,
            is_up=link.is_up,
            unlocked_route_mtus=unlocked,
            route_advmss=advmss,
        )

    # -- applying -----------------------------------------------------------------------------

    def reconcile(
        self,
        desired: TunnelSpec,
        reasons: Mapping[str, str] | None = None,
        dry_run: bool = False,
    ) -> list[Change]:
        if desired.interface != self.interface:
            raise ValueError(
                f"desired state is for {desired.interface}, this tunnel is {self.interface}"
            )
        changes: list[Change] = []
        try:
            before = self.read()
        except NotWireGuardError as e:
            before = None
            changes.append(delete_change(self.interface, str(e)))
        if before is not None and self.implementation not in ("auto", before.implementation):
            changes.append(
                delete_change(
                    self.interface,
                    f"{self.implementation} WireGuard asked for; this is {before.implementation}",
                )
            )
            before = None
        # A bad key file fails here, before anything is touched.
        public_key = public_key_of(self.private_key_file, self.runner, self.ns)
        changes += plan(
            desired,
            before,
            reasons,
            private_key_file=str(self.private_key_file),
            public_key=public_key,
            implementation=self.implementation,
        )
        if dry_run or not changes:
            return changes
        self._apply(changes, before)
        return changes

    def down(self) -> None:
        proc = self._read(["ip", "link", "show", "dev", self.interface])
        if proc.returncode != 0:
            return
        self._run_change(delete_change(self.interface, "down"))

    def _apply(self, changes: Sequence[Change], before: TunnelState | None) -> None:
        for index, change in enumerate(changes, start=1):
            log.info("%s: %s (%s)", self.interface, change.summary, change.reason)
            if self.log_change is not None:
                self.log_change(change)
            try:
                self._run_change(change)
            except (CommandError, TimeoutError, OSError, ValueError) as cause:
                errors = self._rollback(before)
                raise ApplyError(
                    self.interface, change, index, len(changes), cause, changes[: index - 1], errors
                ) from cause

    def _rollback(self, before: TunnelState | None) -> list[str]:
        try:
            now = self.read()
        except (CommandError, NotWireGuardError, ValueError) as e:
            return [f"reading the state to roll back from: {e}"]
        try:
            steps = plan_restore(before, now)
        except ValueError as e:
            return [str(e)]
        errors: list[str] = []
        for step in steps:
            log.warning("%s: rollback: %s", self.interface, step.summary)
            try:
                self._run_change(step)
            except (CommandError, TimeoutError, OSError, ValueError) as e:
                errors.append(f"{step.summary}: {e}")
        return errors

    def _run_change(self, change: Change) -> None:
        if change.kind == "create" and change.fallback:
            try:
                self._run(change.argvs[0])
            except CommandError as e:
                log.info("%s: %s; falling back to wireguard-go", self.interface, e)
                self._create_userspace(change.fallback)
            return
        if change.kind == "create" and change.argvs == (create_argvs(self.interface)[1],):
            self._create_userspace(change.argvs)
            return
        for argv in change.argvs:
            self._run(argv)
        if change.kind == "delete":
            self._wait_gone()

    def _create_userspace(self, argvs: Sequence[Sequence[str]]) -> None:
        # A wireguard-go already serving this name (its control socket answers): use it rather
        # than start a second one, which would fail on the socket anyway.
        if self._read(["wg", "show", self.interface]).returncode == 0:
            log.info("%s: wireguard-go already running; not starting another", self.interface)
        else:
            for argv in argvs:
                self._run(argv)
        if self.runner.dry_run:
            return
        deadline = time.monotonic() + _GONE_TIMEOUT_S
        while self._read(["ip", "link", "show", "dev", self.interface]).returncode != 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.interface}: wireguard-go created no interface")
            time.sleep(0.05)

    def _wait_gone(self) -> None:
        """After a delete: wait until no wireguard-go answers for the name any more."""
        if self.runner.dry_run:
            return
        deadline = time.monotonic() + _GONE_TIMEOUT_S
        while self._read(["wg", "show", self.interface]).returncode == 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.interface}: wireguard-go still running after delete")
            time.sleep(0.05)

    # -- the runner ---------------------------------------------------------------------------

    def _run(self, argv: Sequence[str]) -> None:
        for arg in argv:
            if not isinstance(arg, str) or not arg or not arg.isprintable():
                raise ValueError(f"refusing to run {argv[0]}: argument {grammar.shown(arg)}")
        self.runner.run(list(argv), ns=self.ns)

    def _read(self, argv: Sequence[str]) -> CompletedProcess[str]:
        reader = Runner() if self.runner.dry_run else self.runner
        return reader.run(list(argv), ns=self.ns, check=False, quiet=True)

    def _checked(self, argv: Sequence[str]) -> str:
        proc = self._read(argv)
        if proc.returncode != 0:
            raise CommandError(proc.args, proc.returncode, proc.stderr)
        return proc.stdout

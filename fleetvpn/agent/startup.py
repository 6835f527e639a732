"""The agent's start-up: its keys, its identity (enrollment), its last good desired state, and
the files in ``state_dir`` that carry them across restarts.

Contract:
- :func:`prepare_keys` → (WireGuard public key, probe key). Generates ``wg.key`` (mode 0600,
  atomically, never over an existing one) on first start; the private key never leaves the file
  (``wg pubkey`` reads it on stdin).
- :func:`enroll` → :class:`Identity` from ``node.json`` (mode 0600), or, when there is none, by
  spending the enrollment token once (``POST /v1/enroll``); retried with backoff while the
  controller is unreachable, :class:`FatalError` when it refuses.
- :func:`load_last_good` → the desired state last applied without error (None if absent or
  unreadable: the agent then waits for the controller). It is parsed as strictly as a fresh
  document: against the config's ``tunnel_networks``, else its own addresses' networks (it was
  checked against the trusted ones when it was saved).
- :func:`load_measurements` / :func:`save_measurements`: the latest path MTU per peer and NAT
  measurement (``measurements.json``), so a restarted agent reports what it knew instead of
  nothing — the controller would otherwise fall back to safe defaults and change a working
  tunnel until every peer is measured again.
- :func:`write_json`: atomic (temporary file, fsync, rename) with the given mode.
Errors the operator must fix raise :class:`FatalError` (one line, naming the file or key); no
message carries a key or a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from fleetvpn.agent import client as api
from fleetvpn.agent.config import AgentConfig
from fleetvpn.agent.desired import Acceptance, Desired, DesiredError, parse_desired
from fleetvpn.agent.report import PathMtu
from fleetvpn.model import NatMeasurement, ReportError
from fleetvpn.net.keys import KeyFileError, load_key
from fleetvpn.net.wire import KeyRing

log = logging.getLogger("fleetvpn.agent")
_SAVING = threading.Lock()

ENROLL_RETRY_S: Final = (1.0, 60.0)


class FatalError(RuntimeError):
    """The agent cannot run (bad key file, refused enrollment): one line for the operator."""


@dataclass(frozen=True)
class Identity:
    node: str
    site: str
    token: str


def write_json(path: Path, doc: Any, mode: int = 0o644, *, durable: bool = True) -> None:
    """Atomic; ``durable=False`` skips the fsync (status.json, rewritten every few seconds:
    flash storage on small nodes should not pay for it). Safe from several threads at once:
    each write has a temporary file of its own (two PMTU jobs finishing together once shared
    one, and the second rename failed), and the last rename wins."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def prepare_keys(config: AgentConfig) -> tuple[str, KeyRing]:
    from fleetvpn.wg.keys import generate_private_key, public_key_of

    config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_file = config.private_key_file
    if not key_file.exists():
        generate_private_key(key_file)
        log.info("generated the WireGuard private key %s (mode 0600)", key_file)
    try:
        public_key = public_key_of(key_file)
    except (OSError, ValueError) as e:
        raise FatalError(str(e)) from None
    try:
        probe_key = load_key(config.probe.key_file)
    except KeyFileError as e:
        raise FatalError(f"probe.key_file: {e}") from None
    return public_key, probe_key


async def enroll(
    config: AgentConfig, public_key: str, stopping: Callable[[], bool]
) -> Identity | None:
    """The node's identity; None if ``stopping()`` turned true while waiting for the controller."""
    node_file = config.node_file
    if node_file.exists():
        try:
            doc = json.loads(node_file.read_text())
            return Identity(doc["node"], doc["site"], doc["node_token"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise FatalError(f"{node_file}: unreadable ({e}); remove it to enroll again") from None
    try:
        enrollment = config.enrollment_token_file.read_text().strip()
    except OSError as e:
        raise FatalError(
            f"enrollment_token_file: {config.enrollment_token_file}: {e.strerror} "
            f"(needed once, to enroll {config.node})"
        ) from None
    client = api.Client(config.controller, ca_file=config.ca_file)
    delay = ENROLL_RETRY_S[0]
    while not stopping():
        try:
            doc = await asyncio.to_thread(
                client.enroll,
                enrollment,
                config.node,
                public_key,
                config.listen_port,
                config.endpoint,
            )
        except api.Unreachable as e:
            wait_s = max(delay, e.retry_after_s) if isinstance(e, api.Throttled) else delay
            log.warning("enrollment: controller unreachable (%s); retry in %.0f s", e, wait_s)
            await asyncio.sleep(wait_s)
            delay = min(delay * 2, ENROLL_RETRY_S[1])
            continue
        except api.Refused as e:
            raise FatalError(f"enrollment of {config.node} refused: {e}") from None
        identity = Identity(doc["node"], doc["site"], doc["node_token"])
        write_json(
            node_file,
            {"node": identity.node, "site": identity.site, "node_token": identity.token},
            0o600,
        )
        log.info("enrolled as %s in site %s; node token kept in %s (0600)", identity.node,
                 identity.site, node_file)  # fmt: skip
        return identity
    return None


def acceptance(config: AgentConfig, trusted_networks: tuple[Any, ...] = ()) -> Acceptance:
    """What the agent accepts: the config's tunnel networks, else ``trusted_networks`` (those
    of the last good state; empty: trust on first use), and the config's routed subnets."""
    return Acceptance(config.tunnel_networks or trusted_networks, config.routed_subnets)


def parse(config: AgentConfig, doc: Any, accept: Acceptance | None = None) -> Desired:
    return parse_desired(
        doc,
        interface=config.interface,
        listen_port=config.listen_port,
        accept=accept or acceptance(config),
    )


def load_last_good(config: AgentConfig) -> Desired | None:
    try:
        doc = json.loads(config.desired_file.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("last good desired state %s unreadable (%s)", config.desired_file, e)
        return None
    try:
        return parse(config, doc)
    except DesiredError as e:
        log.warning("last good desired state: %s", e)
        return None


def load_measurements(config: AgentConfig) -> tuple[dict[str, PathMtu], NatMeasurement | None]:
    try:
        doc = json.loads(config.measurements_file.read_text())
    except FileNotFoundError:
        return {}, None
    except (OSError, ValueError) as e:
        log.warning(
            "measurements %s unreadable (%s): measuring afresh", config.measurements_file, e
        )
        return {}, None
    try:
        pmtu = {}
        for peer, raw in doc.get("path_mtu", {}).items():
            m = PathMtu(**raw)
            if m.family not in (4, 6) or not isinstance(m.path_mtu, int):
                raise ValueError(f"path_mtu.{peer}: not a measurement")
            pmtu[str(peer)] = m
        nat = NatMeasurement.from_json(doc["nat"]) if doc.get("nat") else None
    except (TypeError, ValueError, AttributeError, ReportError) as e:
        log.warning("measurements %s: %s: measuring afresh", config.measurements_file, e)
        return {}, None
    return pmtu, nat


def save_measurements(
    config: AgentConfig, pmtu: dict[str, PathMtu], nat: NatMeasurement | None
) -> None:
    doc = {
        "schema_version": 1,
        "path_mtu": {peer: asdict(m) for peer, m in pmtu.items()},
        "nat": nat.to_json() if nat else None,
    }
    with _SAVING:  # one save at a time: PMTU jobs of several peers finish together
        write_json(config.measurements_file, doc)

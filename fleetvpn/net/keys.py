"""The fleet probe key: 32 random bytes, stored base64-encoded (like a WireGuard key) in a file.

Every probe packet is authenticated with it (HMAC-SHA256, see :mod:`fleetvpn.net.wire`); a
responder stays silent towards anything sealed with another key.

While the fleet rotates its key the file holds up to four keys, one per line: the first seals
what this node sends, every one is accepted (see :class:`~fleetvpn.net.wire.KeyRing` for the
three steps of a rotation without a gap in probing).
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from pathlib import Path

from fleetvpn.net.wire import MAX_KEYS, KeyRing

KEY_BYTES = 32


class KeyFileError(ValueError):
    """The key file is missing, unreadable or not a key. ``str()`` names the file."""


def generate_key() -> str:
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()


def write_key(path: Path) -> None:
    """Write a new key readable by the owner only (never overwrites an existing file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(generate_key() + "\n")


def load_key(path: Path) -> KeyRing:
    """The key ring in ``path``: one key per line, the sending key first; KeyFileError naming
    the file and the line (never quoting a key)."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not text"
        raise KeyFileError(f"{path}: cannot read the probe key: {reason}") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise KeyFileError(f"{path}: no probe key (make one with `fleetvpn probe genkey`)")
    if len(lines) > MAX_KEYS:
        raise KeyFileError(f"{path}: {len(lines)} keys; at most {MAX_KEYS} during a rotation")
    keys: list[bytes] = []
    for number, line in lines:
        where = f"{path}" if len(lines) == 1 else f"{path} line {number}"
        try:
            key = base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            raise KeyFileError(
                f"{where}: not a probe key (expected {KEY_BYTES} bytes, base64-encoded; "
                "make one with `fleetvpn probe genkey`)"
            ) from None
        if len(key) != KEY_BYTES:
            raise KeyFileError(f"{where}: the probe key is {len(key)} bytes, expected {KEY_BYTES}")
        if key in keys:
            raise KeyFileError(f"{where}: the same key twice")
        keys.append(key)
    return KeyRing(tuple(keys))


# --- rotation -------------------------------------------------------------------------------

ROTATION_STEPS = ("add", "promote", "retire")


def rotate(path: Path, step: str) -> str:
    """One step of a probe key rotation on the key file at ``path``; returns what it did (or
    that it had nothing to do: every step may be run again). The new key waits in
    ``PATH.next`` (mode 0600) from ``add`` to ``retire``:

    - ``add``: a new key becomes the second line (accepted, not used);
    - ``promote``: the new key becomes the first line (used; the others still accepted);
    - ``retire``: the new key is the only line.

    Each step must reach every node before the next starts (SECURITY.md). KeyFileError for a
    file that is not a key ring, or a step out of order."""
    if step not in ROTATION_STEPS:
        raise ValueError(f"step must be one of {', '.join(ROTATION_STEPS)}, not {step!r}")
    path = Path(path)
    pending = path.with_name(path.name + ".next")
    ring = load_key(path).keys
    if step == "add":
        if pending.exists():
            new = load_key(pending).send
            if ring[-1] == new or ring[0] == new:
                return f"{path}: the new key is already in the ring ({len(ring)} keys)"
        elif len(ring) != 1:
            raise KeyFileError(
                f"{path}: {len(ring)} keys and no {pending.name}: finish or undo the rotation "
                "by hand first (one key per line, the sending key first)"
            )
        else:
            new = base64.b64decode(generate_key())
            _write_ring(pending, (new,))
        if len(ring) >= MAX_KEYS:
            raise KeyFileError(f"{path}: {len(ring)} keys already; at most {MAX_KEYS}")
        _write_ring(path, (*ring, new))
        return f"{path}: a new key added as line {len(ring) + 1} (accepted, not yet used)"
    if not pending.exists():
        if step == "retire" and len(ring) == 1:
            return f"{path}: one key, no rotation under way"
        raise KeyFileError(f"{path}: no {pending.name}: run the `add` step first")
    new = load_key(pending).send
    if new not in ring:
        raise KeyFileError(f"{path}: the key in {pending.name} is not in the ring")
    if step == "promote":
        if ring[0] == new:
            return f"{path}: the new key already seals ({len(ring)} keys accepted)"
        _write_ring(path, (new, *(k for k in ring if k != new)))
        return f"{path}: the new key now seals; the old one is still accepted"
    _write_ring(path, (new,))
    pending.unlink()
    return f"{path}: the old key retired; the new key is the only one"


def _write_ring(path: Path, keys: tuple[bytes, ...]) -> None:
    """Atomically, mode 0600 whatever the umask."""
    text = "".join(base64.b64encode(k).decode() + "\n" for k in keys)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


RETIRED_GRACE_S = 600.0


class KeyFollower:
    """What a running process accepts while its key file changes under it: the file's ring,
    plus the keys the file dropped less than ``grace_s`` ago — accepted, never sealing — so a
    measurement sealed with a retired key before the rotation reached its sender (a NAT search
    lasts up to minutes) still finishes. Pure: ``now`` comes in (any monotonic clock)."""

    def __init__(self, ring: KeyRing, grace_s: float = RETIRED_GRACE_S) -> None:
        self.file_ring = ring
        self.grace_s = grace_s
        self.retired: dict[bytes, float] = {}  # key -> when the file dropped it

    def update(self, ring: KeyRing, now: float) -> KeyRing:
        """The file now holds ``ring``; returns what to accept from now on."""
        for key in self.file_ring.keys:
            if key not in ring.keys:
                self.retired[key] = now
        for key in ring.keys:
            self.retired.pop(key, None)
        self.file_ring = ring
        return self.ring(now)

    def ring(self, now: float) -> KeyRing:
        self.retired = {k: t for k, t in self.retired.items() if now - t < self.grace_s}
        newest_first = sorted(self.retired, key=self.retired.__getitem__, reverse=True)
        room = MAX_KEYS - len(self.file_ring.keys)
        return KeyRing(self.file_ring.keys + tuple(newest_first[:room]))

    def next_expiry(self) -> float | None:
        """When the ring next shrinks (a retired key's grace ends), or None."""
        return min(self.retired.values()) + self.grace_s if self.retired else None

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

"""The fleet probe key: 32 random bytes, stored base64-encoded (like a WireGuard key) in a file.

Every probe packet is authenticated with it (HMAC-SHA256, see :mod:`fleetvpn.net.wire`); a
responder stays silent towards anything sealed with another key.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from pathlib import Path

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


def load_key(path: Path) -> bytes:
    try:
        text = Path(path).read_text().strip()
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read the probe key: {e.strerror}") from None
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(
            f"{path}: not a probe key (expected {KEY_BYTES} bytes, base64-encoded; "
            "make one with `fleetvpn probe genkey`)"
        ) from None
    if len(key) != KEY_BYTES:
        raise KeyFileError(f"{path}: the probe key is {len(key)} bytes, expected {KEY_BYTES}")
    return key

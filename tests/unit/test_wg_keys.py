"""Key files with the real `wg` tool: 0600, atomic, never overwritten; the public key comes from
`wg pubkey` on stdin, and no command line ever carries the key."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from fleetvpn.runner import Runner
from fleetvpn.wg import generate_private_key, public_key_of
from fleetvpn.wg.dump import is_key

pytestmark = pytest.mark.skipif(shutil.which("wg") is None, reason="wireguard-tools not installed")


def test_generate_writes_a_0600_key_and_never_overwrites(tmp_path: Path) -> None:
    old_umask = os.umask(0)  # even a careless umask gives 0600
    try:
        path = tmp_path / "wg.key"
        generate_private_key(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = path.read_text().strip()
    assert is_key(key)
    with pytest.raises(FileExistsError, match="not overwriting"):
        generate_private_key(path)
    assert path.read_text().strip() == key
    assert [p.name for p in tmp_path.iterdir()] == ["wg.key"]  # no temporary file left


def test_public_key_matches_wg_and_no_argv_carries_the_key(tmp_path: Path) -> None:
    path = tmp_path / "wg.key"
    echoed: list[str] = []
    runner = Runner(echo=echoed.append)
    generate_private_key(path, runner)
    key = path.read_text().strip()
    expected = subprocess.run(["wg", "pubkey"], input=key, capture_output=True, text=True)
    assert public_key_of(path, runner) == expected.stdout.strip()
    assert not any(key in line for line in echoed)


def test_a_file_without_a_key_is_refused_unquoted(tmp_path: Path) -> None:
    path = tmp_path / "wg.key"
    path.write_text("this is no key\n")
    with pytest.raises(ValueError, match="not a WireGuard private key") as err:
        public_key_of(path)
    assert "this is no key" not in str(err.value)
    with pytest.raises(FileNotFoundError):
        public_key_of(tmp_path / "missing.key")

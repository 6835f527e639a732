"""Private keys on disk: create one, derive its public key. The key itself never goes into an
argv, a log line or an error message; it travels only through files and ``wg``'s stdin/stdout.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ..runner import NsPath, Runner
from .dump import is_key


def public_key_of(
    private_key_file: Path, runner: Runner | None = None, ns: NsPath | None = None
) -> str:
    """The public key of the private key in ``private_key_file``, via ``wg pubkey`` on stdin.

    With ``ns`` the file is a path inside that namespace's mount namespace: a shell there feeds
    it to ``wg pubkey`` (its argv holds the path, never the key). Raises OSError when the file
    cannot be read, ValueError when it holds no valid key (without quoting it).
    """
    runner = runner or Runner()
    if runner.dry_run:  # reading a key changes nothing: do it even in a dry run
        runner = Runner(echo=runner.echo)
    if ns is None:
        text = Path(private_key_file).read_text()
        if not is_key(text.strip()):
            raise ValueError(f"{private_key_file}: not a WireGuard private key")
        proc = runner.run(["wg", "pubkey"], input=text, check=False, quiet=True)
    else:
        script = 'exec wg pubkey < "$1"'
        proc = runner.run(
            ["sh", "-c", script, "sh", str(private_key_file)], ns=ns, check=False, quiet=True
        )
    public = proc.stdout.strip()
    if proc.returncode != 0 or not is_key(public):
        # wg's stderr says what is wrong with the key without quoting it.
        detail = proc.stderr.strip().splitlines()[-1:] or ["no public key"]
        raise ValueError(f"{private_key_file}: not a WireGuard private key ({detail[0]})")
    return public


def generate_private_key(path: Path, runner: Runner | None = None) -> None:
    """Write a new private key (``wg genkey``) to ``path``: mode 0600, atomically (written to a
    temporary file beside it, then hard-linked into place), never over an existing file
    (FileExistsError, the existing key untouched)."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path}: a key already exists; not overwriting it")
    runner = runner or Runner()
    if runner.dry_run:
        raise ValueError(f"{path}: cannot generate a key in a dry run")
    proc = runner.run(["wg", "genkey"], quiet=True)
    key = proc.stdout.strip()
    if not is_key(key):
        raise ValueError("`wg genkey` printed something that is not a key")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, (key + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if path appeared meanwhile: never overwrite
    except FileExistsError:
        raise FileExistsError(f"{path}: a key already exists; not overwriting it") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)

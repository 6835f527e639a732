"""The probe adapters over real sockets on loopback (no root): responder, PMTU and NAT probers,
and the errors a user meets — a closed port, the wrong key, a broken key file."""

from __future__ import annotations

import asyncio
import base64
import socket
from pathlib import Path

import pytest

from fleetvpn.net import dfsock, keys
from fleetvpn.net.endpoint import parse_endpoint
from fleetvpn.net.natprobe import measure_nat
from fleetvpn.net.pmtuprobe import ProbeError, measure_pmtu
from fleetvpn.net.responder import serve
from fleetvpn.net.wire import KeyLike, KeyRing

KEY = b"k" * 32


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _pmtu_against_responder(probe_key: KeyLike, responder_key: KeyLike = KEY) -> object:
    handle = await serve(("127.0.0.1", 0), responder_key)
    try:
        return await measure_pmtu(handle.address, probe_key, timeout_s=20)
    finally:
        handle.close()


def test_pmtu_on_loopback_reaches_the_local_ceiling() -> None:
    report = asyncio.run(_pmtu_against_responder(KEY))
    ceiling = min(max(dfsock.interface_mtus().values(), default=1500), 9000)
    assert report.path_mtu == ceiling  # type: ignore[attr-defined]
    assert report.tunnel_mtu == ceiling - 60  # type: ignore[attr-defined]


def test_wrong_key_is_no_authenticated_reply() -> None:
    with pytest.raises(ProbeError, match="no authenticated reply"):
        asyncio.run(_pmtu_against_responder(b"x" * 32))


def test_closed_port_is_refused() -> None:
    with pytest.raises(ProbeError, match="refused"):
        asyncio.run(measure_pmtu(("127.0.0.1", _free_port()), KEY, timeout_s=10))


def test_nat_on_loopback_finds_no_nat_and_no_filter() -> None:
    async def run() -> object:
        handle = await serve(("127.0.0.1", 0), KEY)
        try:
            return await measure_nat(handle.address, KEY, max_lifetime_s=30)
        finally:
            handle.close()

    report = asyncio.run(run())
    assert report.nat is False and report.stateful_filter is False  # type: ignore[attr-defined]
    assert report.keepalive_s == 0 and report.mapping_lifetime_s is None  # type: ignore[attr-defined]


def test_key_files(tmp_path: Path) -> None:
    path = tmp_path / "probe.key"
    keys.write_key(path)
    assert path.stat().st_mode & 0o077 == 0
    ring = keys.load_key(path)
    assert len(ring.keys) == 1 and len(ring.send) == 32
    with pytest.raises(FileExistsError):
        keys.write_key(path)
    path.write_text("not base64!\n")
    with pytest.raises(keys.KeyFileError, match=f"{path}: not a probe key"):
        keys.load_key(path)
    path.write_text("c2hvcnQ=\n")
    with pytest.raises(keys.KeyFileError, match="5 bytes, expected 32"):
        keys.load_key(path)
    with pytest.raises(keys.KeyFileError, match="cannot read"):
        keys.load_key(tmp_path / "missing")


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("1.2.3.4:80", ("1.2.3.4", 80)), ("[::1]:4789", ("::1", 4789)), ("[::]:1", ("::", 1))],
)
def test_endpoints(text: str, parsed: tuple[str, int]) -> None:
    assert parse_endpoint(text) == parsed


@pytest.mark.parametrize("text", ["1.2.3.4", "host:80", "1.2.3.4:0", "1.2.3.4:99999", ":80"])
def test_bad_endpoints(text: str) -> None:
    with pytest.raises(ValueError):
        parse_endpoint(text)


def test_a_key_file_holds_a_rotation_s_keys_sending_key_first(tmp_path: Path) -> None:
    path = tmp_path / "probe.key"
    old, new = keys.generate_key(), keys.generate_key()
    path.write_text(f"{new}\n\n{old}\n")
    ring = keys.load_key(path)
    assert ring == KeyRing((base64.b64decode(new), base64.b64decode(old)))
    assert old not in repr(ring) and new not in repr(ring)
    path.write_text(f"{old}\n{old}\n")
    with pytest.raises(keys.KeyFileError, match="line 2: the same key twice"):
        keys.load_key(path)
    path.write_text(f"{old}\nnot base64!\n")
    with pytest.raises(keys.KeyFileError, match="line 2: not a probe key") as caught:
        keys.load_key(path)
    assert old not in str(caught.value)
    path.write_text("".join(keys.generate_key() + "\n" for _ in range(5)))
    with pytest.raises(keys.KeyFileError, match="5 keys; at most 4"):
        keys.load_key(path)


def test_probing_never_stops_through_the_three_steps_of_a_key_rotation() -> None:
    """Two nodes, each at any step of the rotation the other may be at (old → old+new →
    new+old → new), measure each other: every pair one step apart gets authenticated replies
    (a reply is sealed with the key its request used)."""
    old, new = b"o" * 32, b"n" * 32
    steps: list[KeyLike] = [old, KeyRing((old, new)), KeyRing((new, old)), new]
    for i, prober in enumerate(steps):
        for responder in steps[max(0, i - 1) : i + 2]:
            report = asyncio.run(_pmtu_against_responder(prober, responder))
            assert report.path_mtu is not None  # type: ignore[attr-defined]
    # two steps apart is where a rotation must not be: that pair cannot talk
    with pytest.raises(ProbeError, match="no authenticated reply"):
        asyncio.run(_pmtu_against_responder(old, KeyRing((new, b"x" * 32))))

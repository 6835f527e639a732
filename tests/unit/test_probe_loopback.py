"""The probe adapters over real sockets on loopback (no root): responder, PMTU and NAT probers,
and the errors a user meets — a closed port, the wrong key, a broken key file."""

from __future__ import annotations

import asyncio
import base64
import socket
from pathlib import Path

import pytest

from fleetvpn.net import dfsock, keys, wire
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


def test_a_rotation_s_steps_are_idempotent_and_in_order(tmp_path: Path) -> None:
    path = tmp_path / "probe.key"
    keys.write_key(path)
    (old,) = keys.load_key(path).keys
    with pytest.raises(keys.KeyFileError, match="run the `add` step first"):
        keys.rotate(path, "promote")
    assert "added as line 2" in keys.rotate(path, "add")
    new = keys.load_key(path).keys[1]
    assert keys.load_key(path).keys == (old, new) and new != old
    assert "already in the ring" in keys.rotate(path, "add")  # again: nothing more
    assert keys.load_key(path).keys == (old, new)
    assert "now seals" in keys.rotate(path, "promote")
    assert "already seals" in keys.rotate(path, "promote")
    assert keys.load_key(path).keys == (new, old)
    assert "retired" in keys.rotate(path, "retire")
    assert keys.load_key(path).keys == (new,)
    assert "no rotation under way" in keys.rotate(path, "retire")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe.key"]
    assert path.stat().st_mode & 0o077 == 0
    # a ring of several keys written by hand is not a rotation this command started
    path.write_text(f"{keys.generate_key()}\n{keys.generate_key()}\n")
    with pytest.raises(keys.KeyFileError, match="finish or undo the rotation"):
        keys.rotate(path, "add")


def test_a_running_responder_follows_its_key_file(tmp_path: Path) -> None:
    """The controller's responder during a rotation: the key file changes under it, and it
    answers with the new ring without a restart; a broken file keeps the last good ring."""
    from fleetvpn.net.responder import follow_key_file

    path = tmp_path / "probe.key"
    old, new = keys.generate_key(), keys.generate_key()
    path.write_text(old + "\n")

    async def run() -> list[bool]:
        handle = await serve(("127.0.0.1", 0), keys.load_key(path))
        follow = asyncio.create_task(follow_key_file(path, handle.protocol, every_s=0.05))

        async def answers(key: str) -> bool:
            try:
                await measure_pmtu(handle.address, base64.b64decode(key), timeout_s=3)
            except ProbeError:
                return False
            return True

        try:
            seen = [await answers(new)]
            path.write_text(f"{old}\n{new}\n")
            await asyncio.sleep(0.3)
            seen += [await answers(new), await answers(old)]
            path.write_text("not a key\n")
            await asyncio.sleep(0.3)
            seen += [await answers(new)]
            return seen
        finally:
            follow.cancel()
            handle.close()

    assert asyncio.run(run()) == [False, True, True, True]


def test_a_responder_given_a_new_ring_answers_it_and_seals_with_it() -> None:
    """An agent's responder reloaded on SIGHUP during a rotation (it once kept the key it
    started with: after `promote`, peers' probes sealed with the new key went unanswered)."""
    old, new = b"o" * 32, b"n" * 32

    async def run() -> tuple[bool, bytes]:
        handle = await serve(("127.0.0.1", 0), old)
        try:
            handle.protocol.set_key(KeyRing((new, old)))
            await measure_pmtu(handle.address, new, timeout_s=5)
            sealed = handle.protocol.sealer.seal(wire.BindingRequest(1), 1.0)
            return True, wire.decode_keyed(sealed, KeyRing((old, new)))[1]
        finally:
            handle.close()

    assert asyncio.run(run()) == (True, new)


def test_a_retired_key_is_still_accepted_for_its_grace() -> None:
    """A NAT search sealed with the old key before the rotation reached its sender finishes:
    the key the file dropped is accepted (never sealing) for the grace, then forgotten."""
    old, new = b"o" * 32, b"n" * 32
    follower = keys.KeyFollower(KeyRing((old,)), grace_s=600)
    assert follower.update(KeyRing((old, new)), 0.0) == KeyRing((old, new))
    assert follower.update(KeyRing((new, old)), 10.0) == KeyRing((new, old))
    assert follower.update(KeyRing((new,)), 20.0) == KeyRing((new, old))
    assert follower.next_expiry() == 620.0
    assert follower.ring(619.0) == KeyRing((new, old))
    assert follower.ring(620.0) == KeyRing((new,)) and follower.next_expiry() is None
    # a key put back in the file is the file's again, not a retired one
    follower.update(KeyRing((old,)), 700.0)
    assert follower.update(KeyRing((new, old)), 701.0) == KeyRing((new, old))
    assert follower.retired == {}

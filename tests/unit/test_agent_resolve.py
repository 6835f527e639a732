"""A peer endpoint that is a DNS name: resolved off the event loop for apply and probes; a name
that does not resolve leaves the peer's endpoint alone and skips its probes, with the reason."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from fleetvpn.agent.config import parse
from fleetvpn.agent.daemon import Agent, resolve
from fleetvpn.wg.state import PeerSpec, TunnelSpec

KEY = "k" * 42 + "k="


def test_ip_endpoints_need_no_lookup_and_names_are_resolved() -> None:
    assert asyncio.run(resolve("198.19.1.11:51820")) == (("198.19.1.11", 51820), "")
    assert asyncio.run(resolve("[2001:db8::1]:51820")) == (("2001:db8::1", 51820), "")
    address, why = asyncio.run(resolve("localhost:51820"))
    assert address in (("127.0.0.1", 51820), ("::1", 51820)) and why == ""
    address, why = asyncio.run(resolve("no-such-host.invalid:51820"))
    assert address is None and why.startswith("no-such-host.invalid does not resolve")


def test_the_applied_spec_carries_addresses_and_drops_what_does_not_resolve(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    agent = Agent(parse(f"controller: http://127.0.0.1:9\nnode: n1\nstate_dir: {tmp_path}\n"))
    spec = TunnelSpec("wg0", 51820, ("10.99.0.2/24",), 1420, (
        PeerSpec(KEY, "localhost:51820", ("10.99.0.1/32",), 0, None, "hub"),
        PeerSpec("j" * 42 + "g=", "no-such-host.invalid:1", ("10.99.0.3/32",), 0, None, "gone"),
    ))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="fleetvpn.agent"):
        resolved = asyncio.run(agent._resolved(spec))
    hub, gone = resolved.peers
    assert hub.endpoint in ("127.0.0.1:51820", "[::1]:51820")
    assert gone.endpoint is None  # WireGuard keeps what it learned; nothing fails the apply
    assert any("gone: endpoint no-such-host.invalid:1 left as it is" in r.getMessage()
               for r in caplog.records)  # fmt: skip

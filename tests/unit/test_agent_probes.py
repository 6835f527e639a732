"""The agent's probe adapters on loopback: its responder answers, hellos reach the agent as the
peer that sent them, a reverse run goes out from the responder's own port, RTT and the
full-size probe."""

from __future__ import annotations

import asyncio
import base64

from fleetvpn.agent.probes import (
    hello_tag,
    measure_reverse,
    measure_rtt,
    nat_check_tag,
    serve_responder,
)
from fleetvpn.net import keys

KEY = base64.b64decode(keys.generate_key())
B_KEY, C_KEY = "b" * 43 + "=", "c" * 43 + "="


def test_hello_then_reverse_run_from_the_responder_port() -> None:
    async def scenario() -> None:
        hellos: list[tuple[str, tuple[str, int]]] = []
        a, a_transports = await serve_responder(0, KEY, lambda p, addr: hellos.append((p, addr)),
                                                host="127.0.0.1")  # fmt: skip
        b, b_transports = await serve_responder(0, KEY, lambda p, addr: None, host="127.0.0.1")
        try:
            assert a.transport is not None and b.transport is not None
            a_addr = a.transport.get_extra_info("sockname")
            b_addr = b.transport.get_extra_info("sockname")
            a.hello_tags = {hello_tag(B_KEY): "b"}
            b.own_tag = hello_tag(B_KEY)
            b.send_hello(a_addr)
            for _ in range(100):
                if hellos:
                    break
                await asyncio.sleep(0.01)
            assert hellos == [("b", (b_addr[0], b_addr[1]))]
            accepted = b.counters.accepted
            # a probes b back from a's own responder port, through "b's mapping"
            report = await measure_reverse(hellos[0][1], KEY, a_addr[1], 10.0, "127.0.0.1")
            assert report.path_mtu == min(report.local_mtu, 9000)  # loopback: the ceiling
            assert b.counters.accepted > accepted  # b's responder acked a's probes
            # a hello from a node a does not know yet: kept, a asks for its desired state, and
            # the hello is delivered once the new peer is in it
            unknown: list[int] = []
            a.on_unknown = lambda: unknown.append(1)
            b.own_tag = hello_tag(C_KEY)
            b.send_hello(a_addr)
            await asyncio.sleep(0.1)
            assert len(hellos) == 1 and unknown == [1]
            a.set_hello_tags({hello_tag(B_KEY): "b", hello_tag(C_KEY): "c"})
            assert hellos[-1] == ("c", (b_addr[0], b_addr[1]))
        finally:
            for t in (*a_transports, *b_transports):
                t.close()

    asyncio.run(scenario())


def test_rtt_and_full_size_probe_on_loopback() -> None:
    async def scenario() -> None:
        a, transports = await serve_responder(0, KEY, lambda p, addr: None, host="127.0.0.1")
        try:
            assert a.transport is not None
            port = a.transport.get_extra_info("sockname")[1]
            rtt = await measure_rtt(("127.0.0.1", port), KEY, spacing_s=0.01, full_size=1400)
            assert rtt.rtt_s is not None and rtt.loss_ratio == 0.0 and rtt.sent == 4
            assert rtt.full_size == 1400 and rtt.full_size_lost is False
            # nobody there: every probe lost, no RTT
            lost = await measure_rtt(("127.0.0.1", 9), KEY, spacing_s=0.01, timeout_s=0.3)
            assert lost.rtt_s is None and lost.loss_ratio == 1.0 and lost.full_size_lost is None
        finally:
            for t in transports:
                t.close()

    asyncio.run(scenario())


def test_a_nat_check_reaches_the_agent_as_its_peer_and_is_not_a_hello() -> None:
    async def scenario() -> None:
        hellos: list[str] = []
        checks: list[str] = []
        a, a_transports = await serve_responder(0, KEY, lambda p, addr: hellos.append(p),
                                                host="127.0.0.1")  # fmt: skip
        b, b_transports = await serve_responder(0, KEY, lambda p, addr: None, host="127.0.0.1")
        try:
            assert a.transport is not None
            a_addr = a.transport.get_extra_info("sockname")
            a.hello_tags = {hello_tag(B_KEY): "b"}
            a.nat_check_tags = {nat_check_tag(B_KEY): "b"}
            a.on_nat_check = checks.append
            b.own_tag, b.own_nat_check_tag = hello_tag(B_KEY), nat_check_tag(B_KEY)
            b.send_hello(a_addr, nat_check=True)
            for _ in range(100):
                if checks:
                    break
                await asyncio.sleep(0.01)
            assert checks == ["b"] and hellos == []
            # a tag nobody was given (another node's key): neither a check nor a hello
            b.own_nat_check_tag = nat_check_tag(C_KEY)
            b.send_hello(a_addr, nat_check=True)
            await asyncio.sleep(0.1)
            assert checks == ["b"] and hellos == []
            # sealed with another key: refused before any tag is read
            stranger, s_transports = await serve_responder(
                0, base64.b64decode(keys.generate_key()), lambda p, addr: None, host="127.0.0.1"
            )
            stranger.own_nat_check_tag = nat_check_tag(B_KEY)
            stranger.send_hello(a_addr, nat_check=True)
            await asyncio.sleep(0.1)
            assert checks == ["b"]
            for t in s_transports:
                t.close()
        finally:
            for t in (*a_transports, *b_transports):
                t.close()

    asyncio.run(scenario())

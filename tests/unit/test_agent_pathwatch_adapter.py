"""The path keeper's socket adapter on loopback, against the real responder: the first search
concludes at the local ceiling (loopback carries anything), the watch's upkeep probes are acked,
and a closed adapter leaves no reader or timer behind."""

from __future__ import annotations

import asyncio
import base64
import random

from fleetvpn.agent.pathkeeper import KeeperAction, Measured, PathKeeper
from fleetvpn.agent.pathwatch_adapter import PeerPathAdapter, local_ceiling, probe_socket
from fleetvpn.agent.schedule import ProbeBudget
from fleetvpn.net import keys
from fleetvpn.net.responder import Responder

KEY = base64.b64decode(keys.generate_key())


def test_adapter_searches_and_watches_over_loopback() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        responder = Responder(KEY)
        transport, _ = await loop.create_datagram_endpoint(
            lambda: responder, local_addr=("127.0.0.1", 0)
        )
        port = transport.get_extra_info("sockname")[1]
        actions: list[KeeperAction] = []
        sock = probe_socket(("127.0.0.1", port))
        ceiling = local_ceiling(sock)
        keeper = PathKeeper("peer", family=4, ceiling=ceiling, budget=ProbeBudget(),
                            rng=random.Random(3), upkeep_s=0.5)  # fmt: skip
        adapter = PeerPathAdapter(keeper, sock, KEY, lambda peer, a: actions.append(a))
        try:
            adapter.start()
            for _ in range(200):
                if any(isinstance(a, Measured) for a in actions):
                    break
                await asyncio.sleep(0.02)
            found = [a for a in actions if isinstance(a, Measured)]
            assert found and found[0].path_mtu == ceiling, actions
            watched = keeper.watch_bytes_sent
            await asyncio.sleep(1.5)  # the upkeep every ~0.5 s: value probes, acked
            assert keeper.watch_bytes_sent > watched
            assert [a for a in actions if isinstance(a, Measured)] == found  # nothing new
        finally:
            adapter.close()
            transport.close()
        assert sock.fileno() == -1

    asyncio.run(scenario())

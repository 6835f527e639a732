"""The enrollment race with two controllers (issue 11, item 5): two `fleetvpn controller serve`
processes on one throwaway PostgreSQL database, many concurrent enrollments with one token
through both, and exactly one node wins, every round. Then the winner's lost answer is retried
through the other controller: the same node, a new token, the old one refused by both."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from fleetvpn.controller.store import Store

from .apiutil import wait_serving

ATTEMPTS = 40  # per round, half through each controller
ROUNDS = 5


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _key(round_: int, i: int) -> str:
    return f"r{round_}n{i:02d}".ljust(42, "Q") + "A="


def _race(clients: list[httpx.Client], token: str, round_: int) -> dict[int, httpx.Response]:
    """ATTEMPTS enrollments with ``token`` (each its own name and key), alternately through
    each controller, released together; attempt → answer."""
    barrier = threading.Barrier(ATTEMPTS)
    answers: dict[int, httpx.Response] = {}

    def attempt(i: int) -> None:
        body = {"enrollment_token": token, "name": f"r{round_}n{i}", "public_key": _key(round_, i)}
        barrier.wait()
        answers[i] = clients[i % 2].post("/v1/enroll", json=body)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(ATTEMPTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return answers


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_two_controllers_one_token_one_node(store_url: str, tmp_path: Path) -> None:
    store = Store.open(store_url)  # migrates; the controllers find the schema made
    servers: list[subprocess.Popen[str]] = []
    clients: list[httpx.Client] = []
    try:
        for n in range(2):
            port = _port()
            config = tmp_path / f"controller{n}.yml"
            config.write_text(
                f"listen: 127.0.0.1:{port}\ndatabase: '{store_url}'\nauth_cache_s: 1\n"
                "view_process: false\n"
            )
            servers.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "fleetvpn",
                        "controller",
                        "serve",
                        "--config",
                        str(config),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
            clients.append(
                httpx.Client(
                    base_url=f"http://127.0.0.1:{port}",
                    timeout=60,
                    limits=httpx.Limits(max_connections=ATTEMPTS),
                )
            )
        for client, server in zip(clients, servers, strict=True):
            wait_serving(client, server)

        # (enrollment token, name, key, controller, node token) of each round's winner
        winners: list[tuple[str, str, str, int, str]] = []
        spread: Counter[int] = Counter()
        for round_ in range(ROUNDS):
            token = store.create_enrollment_token("race")
            answers = _race(clients, token, round_)
            statuses = Counter(r.status_code for r in answers.values())
            assert statuses == {201: 1, 403: ATTEMPTS - 1}, statuses
            (won,) = [i for i, r in answers.items() if r.status_code == 201]
            spread[won % 2] += 1
            name = f"r{round_}n{won}"
            for i, r in answers.items():
                if i != won:
                    assert r.json()["error"] == f"enrollment token already used by {name}"
            node_token = answers[won].json()["node_token"]
            winners.append((token, name, _key(round_, won), won % 2, node_token))
        print(f"{ROUNDS} rounds of {ATTEMPTS}: one winner each; wins by controller {dict(spread)}")
        assert sorted(n["name"] for n in store.nodes()) == sorted(w[1] for w in winners)

        # The first winner's answer was "lost": it retries through the other controller.
        token, name, key, via, old = winners[0]

        def status(client: httpx.Client, node_token: str) -> int:
            auth = {"authorization": f"Bearer {node_token}"}
            return client.get(f"/v1/nodes/{name}/desired", headers=auth).status_code

        assert [status(c, old) for c in clients] != [401, 401]  # both know (cache) it
        body = {"enrollment_token": token, "name": name, "public_key": key}
        retry = clients[1 - via].post("/v1/enroll", json=body)
        assert retry.status_code == 200 and retry.json()["reissued"] is True, retry.text
        new = retry.json()["node_token"]
        time.sleep(1.5)  # auth_cache_s: 1
        assert [status(c, old) for c in clients] == [401, 401]
        assert 401 not in [status(c, new) for c in clients]
        assert len(store.nodes()) == ROUNDS
    finally:
        for client in clients:
            client.close()
        for server in servers:
            server.terminate()
        for server in servers:
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        store.close()

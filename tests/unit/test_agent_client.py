"""The agent's controller client over real HTTP and HTTPS (a local server): its CA file, the
outcomes the spool relies on (acknowledged / try again / refused), and no token in any error."""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from fleetvpn.agent.client import CONTROL_MSS, Client, Refused, Unreachable

from .apiutil import self_signed_cert

TOKEN = "fvn_secret-node-token"
ANSWERS: dict[str, tuple[int, Any]] = {
    "/v1/nodes/branch1/desired": (200, {"node": "branch1"}),
    "/v1/nodes/ghost/desired": (403, {"error": "ghost may read only its own settings"}),
    "/v1/reports": (201, {"stored": True}),
    "/v1/busy": (503, {"error": "not in the fleet view yet"}),
}
seen: list[tuple[str, str | None, Any]] = []
mss: list[int] = []  # the MSS the server may send with, per request


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length)) if length else None
        seen.append((self.path, self.headers.get("Authorization"), body))
        mss.append(self.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG))
        status, doc = ANSWERS.get(self.path, (404, {"error": "no such thing"}))
        payload = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _answer


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = self_signed_cert(tmp)
    plain = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    tls = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    tls.socket = context.wrap_socket(tls.socket, server_side=True)
    for server in (plain, tls):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield (
        f"http://127.0.0.1:{plain.server_address[1]}",
        f"https://127.0.0.1:{tls.server_address[1]}",
        cert,
    )
    for server in (plain, tls):
        server.shutdown()


def test_desired_and_reports_with_the_node_token(servers: tuple[str, str, Path]) -> None:
    http_url, https_url, cert = servers
    for client in (Client(http_url, token=TOKEN), Client(https_url, ca_file=cert, token=TOKEN)):
        seen.clear()
        assert client.desired("branch1") == {"node": "branch1"}
        client.post_report({"report_id": "x"})
        assert seen == [
            ("/v1/nodes/branch1/desired", f"Bearer {TOKEN}", None),
            ("/v1/reports", f"Bearer {TOKEN}", {"report_id": "x"}),
        ]
    # the agent clamps its MSS: the controller's answers cross a black-holed path in pieces
    # that fit (loopback would allow 65483)
    assert mss and all(m <= CONTROL_MSS for m in mss), mss


def test_outcomes_and_no_token_in_errors(servers: tuple[str, str, Path]) -> None:
    http_url, https_url, _ = servers
    client = Client(http_url, token=TOKEN)
    with pytest.raises(Refused) as refused:
        client.desired("ghost")
    assert refused.value.status == 403 and "only its own settings" in str(refused.value)
    with pytest.raises(Unreachable, match="HTTP 503"):
        client._request("GET", "/v1/busy")
    with pytest.raises(Unreachable):  # nobody listens there
        Client("http://127.0.0.1:9", token=TOKEN).desired("branch1")
    with pytest.raises(Unreachable) as untrusted:  # the system CAs do not know this server
        Client(https_url, token=TOKEN).desired("branch1")
    errors = [str(refused.value), str(untrusted.value)]
    assert all(TOKEN not in e for e in errors)

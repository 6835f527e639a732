"""The agent's side of the controller's HTTP API, over the standard library (``http.client``).

Contract (blocking calls; the daemon runs them in a worker thread):
- ``enroll(token, name, public_key, listen_port, endpoint)`` → ``{"node", "site", "node_token"}``
- ``desired(node)`` → the desired-state document (``GET /v1/nodes/NAME/desired``)
- ``post_report(doc)`` → None on 201 (stored) or 200 (already stored: a replay)
- ``post_reports(docs)`` → ``POST /v1/reports/batch``: one outcome per report, in order — None
  (201 stored or 200 a replay) or the controller's reason it refused that report for good (a
  per-report 4xx). A whole-batch refusal is :class:`Refused` (404/405: an older controller
  without the batch path; 413: too large, send fewer) and nothing of it was stored.
Errors: :class:`Unreachable` (connection refused/reset, timeout, TLS failure, 5xx: try again
later), its subclass :class:`Throttled` (429: try again after ``retry_after_s``, from the
``Retry-After`` header in seconds or as an HTTP date, bounded by :data:`RETRY_AFTER_S`) and
:class:`Refused` (any other non-2xx: ``status`` and the controller's ``error`` text). No message
ever carries a token: tokens travel only in the Authorization header.

TLS: with ``ca_file`` the context trusts that CA alone (the fleet CA, pinned): the system's
store is not loaded, so a certificate any public CA would sign for the controller's name is
refused. Without ``ca_file`` (https only) the system's store is used.

Every connection to the controller advertises a TCP MSS of :data:`CONTROL_MSS` (packets of at
most 1260 bytes over IPv4): the agent's own control traffic must cross the very path-MTU black
holes the agent is there to measure (a 1350-byte cloud path that eats ICMP stalls a 1500-byte
desired-state response for good), and it is too little traffic for the smaller segments to
matter.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import socket
import ssl
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

TIMEOUT_S = 10.0
CONTROL_MSS = 1220  # fits a 1280-byte path over IPv6 (1280 - 40 - 20), any real IPv4 path
# 429 without a usable Retry-After waits the default; a Retry-After is obeyed within the bounds:
# whoever answers (or sits on the path) must not silence an agent for longer than a quarter of
# an hour with one header. Reports wait in the spool meanwhile (bounded, summarised, not lost).
RETRY_AFTER_S = (1.0, 900.0)
DEFAULT_RETRY_AFTER_S = 30.0


def _create_connection(
    address: tuple[str, int], timeout: float | None = None, source_address: Any = None
) -> socket.socket:
    """``socket.create_connection`` with the MSS clamped before the SYN (module docstring)."""
    host, port = address
    last: OSError | None = None
    for family, kind, proto, _, sockaddr in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, CONTROL_MSS)
            sock.settimeout(timeout)
            if source_address is not None:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as e:
            sock.close()
            last = e
    raise last or OSError(f"cannot resolve {host}")


def pinned_context(ca_file: Path | None) -> ssl.SSLContext:
    """A client context that verifies the controller's certificate and name: against
    ``ca_file`` alone when given (the system's store is never loaded then), else the system's."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies certificates and host names
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    return context


class ControllerError(RuntimeError):
    pass


class Unreachable(ControllerError):
    pass


class Throttled(Unreachable):
    """429: the controller asks for nothing more from this node for ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(f"{message} (retry after {retry_after_s:.0f} s)")


def retry_after(value: str | None, now: float | None = None) -> float:
    """Seconds to wait from a ``Retry-After`` header (RFC 9110 §10.2.3: delay-seconds or an
    HTTP-date), within :data:`RETRY_AFTER_S`; :data:`DEFAULT_RETRY_AFTER_S` when absent or
    unreadable. ``now``: unix time (for tests)."""
    low, high = RETRY_AFTER_S
    if value is None:
        return DEFAULT_RETRY_AFTER_S
    text = value.strip()
    if text.isascii() and text.isdigit():
        return min(max(float(int(text[:12])), low), high)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return DEFAULT_RETRY_AFTER_S
    if when.tzinfo is None:  # HTTP dates are GMT
        return DEFAULT_RETRY_AFTER_S
    delay = when.timestamp() - (time.time() if now is None else now)
    return min(max(delay, low), high)


class Refused(ControllerError):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(f"HTTP {status}: {message}")


class Client:
    def __init__(self, base_url: str, *, ca_file: Path | None = None, token: str | None = None):
        parts = urlsplit(base_url)
        self.base = base_url.rstrip("/")
        self.https = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.https else 80)
        self.prefix = parts.path.rstrip("/")
        self.token = token
        self.context: ssl.SSLContext | None = None
        if self.https:
            self.context = pinned_context(ca_file)

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        conn: http.client.HTTPConnection
        if self.https:
            conn = http.client.HTTPSConnection(
                self.host, self.port, timeout=TIMEOUT_S, context=self.context
            )
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT_S)
        conn._create_connection = _create_connection  # type: ignore[attr-defined]
        headers = {"Accept": "application/json", "User-Agent": "fleetvpn-agent"}
        data = None
        if body is not None:
            data = json.dumps(body, separators=(",", ":")).encode()
            headers["Content-Type"] = "application/json"
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            conn.request(method, self.prefix + path, body=data, headers=headers)
            response = conn.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException) as e:
            raise Unreachable(f"{self.base}: {e.__class__.__name__}: {e}") from None
        finally:
            conn.close()
        if response.status == 429:
            wait_s = retry_after(response.getheader("Retry-After"))
            raise Throttled(f"{self.base}{path}: HTTP 429", wait_s)
        if response.status >= 500:
            raise Unreachable(f"{self.base}{path}: HTTP {response.status}")
        try:
            doc = json.loads(payload) if payload else None
        except ValueError:
            raise Unreachable(f"{self.base}{path}: HTTP {response.status}, not JSON") from None
        if not 200 <= response.status < 300:
            message = doc.get("error") if isinstance(doc, dict) else None
            raise Refused(response.status, str(message or doc)[:300])
        return doc

    def enroll(
        self,
        enrollment_token: str,
        name: str,
        public_key: str,
        listen_port: int,
        endpoint: str | None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "enrollment_token": enrollment_token,
            "name": name,
            "public_key": public_key,
            "listen_port": listen_port,
        }
        if endpoint is not None:
            body["endpoint"] = endpoint
        doc = self._request("POST", "/v1/enroll", body)
        if not isinstance(doc, dict) or not isinstance(doc.get("node_token"), str):
            raise Refused(200, "enrollment answered without a node token")
        return doc

    def desired(self, node: str) -> dict[str, Any]:
        doc = self._request("GET", f"/v1/nodes/{node}/desired")
        if not isinstance(doc, dict):
            raise Refused(200, "desired state is not a JSON object")
        return doc

    def post_report(self, doc: dict[str, Any]) -> None:
        self._request("POST", "/v1/reports", doc)

    def post_reports(self, docs: list[dict[str, Any]]) -> list[str | None]:
        doc = self._request("POST", "/v1/reports/batch", docs)
        results = doc.get("results") if isinstance(doc, dict) else None
        if not isinstance(results, list) or len(results) != len(docs):
            raise Unreachable(f"{self.base}/v1/reports/batch: answer without one result a report")
        outcomes: list[str | None] = []
        for i, result in enumerate(results):
            status = result.get("status") if isinstance(result, dict) else None
            if not isinstance(status, int) or result.get("index", i) != i:
                raise Unreachable(f"{self.base}/v1/reports/batch: result {i} is malformed")
            if status == 429:  # not the report's fault: the batch again, later
                raise Throttled(
                    f"{self.base}/v1/reports/batch: report {i}: HTTP 429",
                    retry_after(str(result.get("retry_after_s", "")) or None),
                )
            if status >= 500:  # not the report's fault: the batch again later
                raise Unreachable(f"{self.base}/v1/reports/batch: report {i}: HTTP {status}")
            if status in (200, 201):
                outcomes.append(None)
            else:
                outcomes.append(f"HTTP {status}: {str(result.get('error') or '')[:300]}")
        return outcomes

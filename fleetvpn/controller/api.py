"""The controller's HTTP API (FastAPI on uvicorn). OpenAPI at ``/openapi.json``, docs at ``/docs``.

Trust: ``Authorization: Bearer <token>``. Admin tokens may do everything; a node token may write
only that node's reports and read only that node's desired state; enrollment needs no bearer,
only a one-time enrollment token in the body. Every error is JSON ``{"error": "..."}`` with a
4xx status that says what is wrong and where; a rejected request changes nothing.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleetvpn import __version__, grammar
from fleetvpn.controller import tokens as tokens_store
from fleetvpn.controller.config import TunnelConfig
from fleetvpn.controller.store import (
    Conflict,
    Forbidden,
    NotFound,
    Principal,
    ReportWrite,
    Store,
    StoreError,
    Unstorable,
    hash_token,
    utcnow,
)
from fleetvpn.controller.views import Published, ViewError, Views
from fleetvpn.grammar import GrammarError, shown
from fleetvpn.model import Override, ReportError, format_time, parse_report
from fleetvpn.net.wire import KeyLike

OVERRIDE_SCOPES = ("site", "node", "link")
OVERRIDE_SETTINGS = ("tunnel_mtu", "keepalive_s")
OVERRIDE_NOTE_MAX = 200  # the store's column
MAX_ENROLLMENT_VALID_S = 365 * 86400
_STORE_STATUS = {Conflict: 409, Forbidden: 403, NotFound: 404, Unstorable: 422}


log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class _ErrorJSON(JSONResponse):
    """An error answer that encodes whatever its message holds (a lone surrogate escaped)."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, separators=(",", ":")).encode()


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return _ErrorJSON({"error": message}, status_code=status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body; 413 past ``limit`` bytes (checked while reading)."""
    declared = request.headers.get("content-length")
    if declared is not None and _DIGITS.fullmatch(declared) and int(declared) > limit:
        raise ApiError(413, f"body of {declared} bytes is over the limit of {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"body is over the limit of {limit} bytes")
    return bytes(body)


def check_content_type(value: str | None) -> None:
    """A body is JSON: no Content-Type (curl, old clients) or a JSON one; 415 otherwise."""
    if value is None:
        return
    media = value.partition(";")[0].strip().lower()
    if media != "application/json" and not (
        media.startswith("application/") and media.endswith("+json")
    ):
        raise ApiError(415, f"content-type: {shown(value)} is not application/json")


MAX_JSON_DEPTH = 32  # a report nests 4 deep; nothing the API takes needs more


def decode_json(body: bytes) -> Any:
    """``body`` as JSON (RFC 8259: UTF-8, no byte order mark); 400 naming the problem if it is
    not, or if it holds what no stored row may: a lone surrogate, NaN or an infinite number, a
    key twice in one object, nesting deeper than MAX_JSON_DEPTH. What is accepted here reads
    back the same from the store (orjson and the standard library agree on it).

    orjson first (a third of the time on a report); it refuses lone surrogates, NaN, numbers
    beyond a double and invalid UTF-8 itself. Whatever it refuses, and a body with 19 digits
    in a row (orjson reads integers beyond 64 bits as floats, not as errors), goes to the
    standard library, strictly, which decides and words the errors. Duplicate keys: a body
    with as many ``"…":`` as the decoded objects have keys has none (every key is followed by
    one); only one with more is decoded again to find the duplicate."""
    if body[:3] == b"\xef\xbb\xbf":
        raise ApiError(400, "body: starts with a UTF-8 byte order mark (send JSON without one)")
    if _fast_loads is not None and _LONG_DIGITS not in body.translate(_ONE_DIGIT):
        try:
            doc = _fast_loads(body)
        except ValueError:
            pass
        else:
            keys = _keys_within_depth(doc)
            plain = body.count(b'":') == keys and _SPACED_KEY_END.search(body) is None
            if not plain and len(_KEY_END.findall(body)) > keys:
                _decode_strictly(body)  # finds the duplicate (or a string holding '":')
            return doc
    doc = _decode_strictly(body)
    _keys_within_depth(doc)
    _no_lone_surrogates(doc)
    return doc


class _Refused(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Refused(f"key {shown(key)} appears twice in one object")
            seen.add(key)
    return doc


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (math.inf, -math.inf):
        raise _Refused(f"number {shown(text)} is beyond a double's range")
    return value


def _decode_strictly(body: bytes) -> Any:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(
            400, f"body: not UTF-8 (byte {e.start}: {e.reason}); JSON is sent in UTF-8"
        ) from None
    try:
        return json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constant,
            parse_float=_finite_float,
        )
    except json.JSONDecodeError as e:
        raise ApiError(400, f"body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, f"body: nested more than {MAX_JSON_DEPTH} deep") from None
    except ValueError as e:  # _Refused, and integers of more than 4,300 digits
        raise ApiError(400, f"body: {e}") from None


def _keys_within_depth(doc: Any) -> int:
    """How many keys the objects in ``doc`` hold; 400 if it nests deeper than MAX_JSON_DEPTH.
    (Iterative: later code that recurses, ``repr`` among it, never meets a deep value.)"""
    keys, depth = 0, 0
    level = [doc] if type(doc) in _CONTAINERS else []
    while level:  # level by level: one comprehension per container, no tuple per value
        depth += 1
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"body: nested more than {MAX_JSON_DEPTH} deep")
        below: list[Any] = []
        for value in level:
            if type(value) is dict:
                keys += len(value)
                value = value.values()
            below += [v for v in value if v.__class__ is dict or v.__class__ is list]
        level = below
    return keys


def _no_lone_surrogates(doc: Any) -> None:
    """400 naming the first string (key or value) that is not Unicode text: a lone surrogate
    (``"\\ud800"``) cannot be stored as UTF-8, nor read back by the view."""
    stack: list[tuple[Any, str]] = [(doc, "body")]
    while stack:
        value, path = stack.pop()
        if type(value) is str:
            if not _encodable(value):
                raise ApiError(400, f"{path}: has a lone surrogate (not Unicode text)")
        elif type(value) is dict:
            for key, item in value.items():
                if not _encodable(key):
                    raise ApiError(400, f"{path}: a key has a lone surrogate (not Unicode text)")
                stack.append((item, key if path == "body" else f"{path}.{key}"))
        elif type(value) is list:
            stack += [(item, f"{path}[{i}]") for i, item in enumerate(value)]


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_CONTAINERS = (dict, list)
_DIGITS = re.compile(r"[0-9]{1,20}", re.ASCII)
_KEY_END = re.compile(rb'"[ \t\n\r]*:')
_SPACED_KEY_END = re.compile(rb'"[ \t\n\r]+:')
# 19 digits in a row, found as 19 zeros once every digit is a zero (bytes.translate and ``in``
# are C loops; a regex search for [0-9]{19} took four times orjson's decode of a report)
_ONE_DIGIT = bytes.maketrans(b"123456789", b"000000000")
_LONG_DIGITS = b"0" * 19
_fast_loads: Callable[[bytes], Any] | None
try:
    from orjson import loads as _fast_loads
except ImportError:  # the controller extra installs orjson; the standard library alone works too
    _fast_loads = None


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON; 415 if it says it is something else, 413 past ``limit`` bytes
    (checked while reading), 400 if not JSON (see :func:`decode_json`)."""
    check_content_type(request.headers.get("content-type"))
    return decode_json(await read_body(request, limit))


AUTH_CACHE_S = 5.0
GIL_SWITCH_S = 0.001
MAX_BATCH_REPORTS = 1000  # reports in one POST /v1/reports/batch
BATCH_BODY_FACTOR = 16  # a batch's body may be this many times the single-report limit
EXTRA_WAIT_S = 120.0  # how long a request waits for a rendering made on demand (/metrics)
# WireGuard's counters are u64; the store's columns are signed 64-bit (SQLite and PostgreSQL
# alike). 2^63 bytes is 9.2 EB: only a broken or hostile agent gets there.
STORED_COUNTER_MAX = 2**63 - 1
NODE_WAIT_S = 30.0  # how long a node's first desired-state request waits for a view with it
# A report's created_at is the agent's clock: this far ahead of the controller's is a broken
# or lying clock (a report from the future would stay the node's latest until then).
CLOCK_SKEW_S = 300.0


class RateLimiter:
    """Report requests per node: a token bucket each, in memory (per API process). ``rate_per_s``
    tokens a second up to ``burst``; a request takes one. ``take`` → 0 when allowed, else the
    seconds until a token is there (the 429's Retry-After)."""

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self.rate_per_s = rate_per_s
        self.burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # node → (tokens, at)

    def take(self, node: str, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        tokens, at = self._buckets.get(node, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate_per_s)
        if tokens >= 1.0:
            self._buckets[node] = (tokens - 1.0, now)
            return 0.0
        self._buckets[node] = (tokens, now)
        return (1.0 - tokens) / self.rate_per_s


class QuotaKeeper:
    """Each node's stored reports kept to ``max_reports`` (the oldest by arrival go:
    ``Store.trim_reports``). A node is trimmed on its first stored report after the API
    started and then after every ``every`` more, so it holds at most ``max_reports + every``
    between trims (``every`` is 5 % of the quota)."""

    def __init__(self, store: Store, max_reports: int) -> None:
        self.store = store
        self.max_reports = max_reports
        self.every = max(1, max_reports // 20)
        self._since_trim: dict[int, int] = {}  # node id → reports stored since its last trim

    def due(self, node_id: int, stored: int) -> bool:
        count = self._since_trim.get(node_id)
        if count is None or count + stored >= self.every:
            self._since_trim[node_id] = 0
            return True
        self._since_trim[node_id] = count + stored
        return False

    async def stored(self, node_id: int, stored: int) -> None:
        if stored and self.due(node_id, stored):
            await run_in_threadpool(self.store.trim_reports, node_id, self.max_reports)


class TokenCache:
    """``store.authenticate`` without a database query per request: every valid token is
    remembered (all of them read at first use, new ones when first seen), and every ``ttl_s``
    seconds one query asks the store which tokens were revoked lately; those are forgotten
    (and then refused by the store). A token revoked in the store is therefore refused at most
    ``ttl_s`` seconds (plus one request's time) after the revocation committed, by every
    controller process. Unknown tokens are looked up every time, so a node that just enrolled
    is known at once. ``ttl_s`` 0 looks every token up."""

    REREAD_S = 60.0  # revocations are read back this far: commits in flight, clock skew

    def __init__(self, store: Store, ttl_s: float) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self._known: dict[str, Principal] = {}
        self._next_check = 0.0
        self._checked_at: datetime | None = None

    def authenticate(self, token: str) -> Principal | None:
        if self.ttl_s <= 0:
            return self.store.authenticate(token)
        if time.monotonic() >= self._next_check:
            self._forget_revoked()
        digest = hash_token(token)
        who = self._known.get(digest)
        if who is None:
            who = self.store.authenticate(token)
            if who is not None:
                self._known[digest] = who
        return who

    def _forget_revoked(self) -> None:
        now = utcnow()
        if self._checked_at is None:  # first use: every valid token at once (one query each)
            self._known = self.store.principals_by_token_hash()
        else:
            since = self._checked_at - timedelta(seconds=self.REREAD_S)
            for digest in self.store.revoked_token_hashes(since):
                self._known.pop(digest, None)
        self._checked_at = now
        self._next_check = time.monotonic() + self.ttl_s


class ReportWriter:
    """Group commit: reports that arrive while a write transaction is in flight go into the
    next one together (``Store.put_reports``), off the event loop. One transaction's commit
    (an fsync) then serves many requests, and nothing waits for a timer: a lone report is
    written at once. Each request still gets its own answer (stored, replay, or its error)."""

    MAX_BATCH = 256

    def __init__(self, store: Store) -> None:
        self.store = store
        self._pending: list[tuple[ReportWrite, asyncio.Future[bool]]] = []
        self._writing = False
        self._task: asyncio.Task[None] | None = None  # the drain in progress

    async def put(self, item: ReportWrite) -> bool:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if not self._writing:
            self._writing = True
            self._task = asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def put_many(self, items: list[ReportWrite]) -> list[bool | StoreError]:
        """Several reports; each one's answer (stored, replay, or the StoreError it earned)."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[bool]] = [loop.create_future() for _ in items]
        self._pending.extend(zip(items, futures, strict=True))
        if items and not self._writing:
            self._writing = True
            self._task = loop.create_task(self._drain())
        answers: list[bool | StoreError] = []
        for future in futures:
            try:
                answers.append(await future)
            except StoreError as e:
                answers.append(e)
        return answers

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch = self._pending[: self.MAX_BATCH]
                del self._pending[: self.MAX_BATCH]
                try:
                    results = await run_in_threadpool(
                        self.store.put_reports, [item for item, _ in batch]
                    )
                except Exception as e:  # the database failed: every waiting request hears it
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(e)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():  # the client went away
                        continue
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._writing = False


class _NoStore:
    """Every answer says ``cache-control: no-store`` (plain ASGI: the decorator middleware
    costs a task and a stream per request)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_no_store(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"cache-control"]
                message["headers"] = [*headers, (b"cache-control", b"no-store")]
            await send(message)

        await self.app(scope, receive, send_no_store)


Ingest = Callable[[Principal, bytes], Awaitable[tuple[int, dict[str, Any]]]]
# (authorization, content type, read the body, handler) → (status, answer, extra headers)
Answer = Callable[
    [str, str | None, Callable[[], Awaitable[bytes]], Ingest],
    Awaitable[tuple[int, dict[str, Any], dict[str, str]]],
]


class _ReportRoutes:
    """``POST /v1/reports`` and ``/v1/reports/batch`` as plain ASGI, in front of FastAPI's
    routing, dependency and response machinery (a third of the server's CPU a report went
    there). Same handlers and answers as the FastAPI routes, which stay for the OpenAPI
    document; every other request passes through."""

    def __init__(
        self,
        app: ASGIApp,
        routes: dict[str, tuple[Ingest, int]],
        answer: Answer,
    ) -> None:
        self.app = app
        self.routes = routes
        self.answer = answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        handler, limit = route
        authorization, declared, content_type = "", None, None
        for key, value in scope["headers"]:
            if key == b"authorization":
                authorization = value.decode("latin-1")
            elif key == b"content-length":
                declared = value
            elif key == b"content-type":
                content_type = value.decode("latin-1")
        gone = False

        async def read() -> bytes:
            nonlocal gone
            if declared is not None and declared.isdigit() and int(declared) > limit:
                text = declared.decode()  # bytes.isdigit: ASCII digits only
                raise ApiError(413, f"body of {text} bytes is over the limit of {limit}")
            chunks: list[bytes] = []
            size = 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone = True
                    raise ApiError(400, "the client went away")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"body is over the limit of {limit} bytes")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)

        status, doc, extra = await self.answer(authorization, content_type, read, handler)
        if gone:
            return
        try:
            content = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
        except UnicodeEncodeError:  # a lone surrogate in a message: escaped, never a 500
            content = json.dumps(doc, separators=(",", ":")).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(content)).encode()),
            (b"cache-control", b"no-store"),
            *[(k.encode(), v.encode()) for k, v in extra.items()],
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})


class _Parts(Response):
    """A response sent as the parts it is made of (slices of a view's memory file among them:
    a 170 MB health document goes out without being copied into one string first)."""

    def __init__(
        self, parts: list[bytes | memoryview], media_type: str, headers: dict[str, str]
    ) -> None:
        super().__init__(b"", media_type=media_type, headers=headers)
        self.parts = [p for p in parts if len(p)]
        self.headers["content-length"] = str(sum(len(p) for p in self.parts))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        last = len(self.parts) - 1
        for i, part in enumerate(self.parts):
            await send({"type": "http.response.body", "body": part, "more_body": i < last})
        if not self.parts:
            await send({"type": "http.response.body", "body": b""})


def _token_text(value: str, what: str) -> str:
    """A token as presented: printable ASCII of a sane length (it is only hashed and compared;
    a lone surrogate or a megabyte must not reach the hash or a log)."""
    if not 0 < len(value) <= 200 or not value.isascii() or not value.isprintable():
        raise ApiError(422, f"{what}: not a token (printable ASCII, at most 200 characters)")
    return value


def _override_key(scope: str, target: str, setting: str) -> None:
    """An override's (scope, target, setting) from a URL path; 422 naming the part if not one."""
    if scope not in OVERRIDE_SCOPES:
        raise ApiError(422, f"scope: {shown(scope)} is not one of {', '.join(OVERRIDE_SCOPES)}")
    if setting not in OVERRIDE_SETTINGS:
        raise ApiError(
            422, f"setting: {shown(setting)} is not one of {', '.join(OVERRIDE_SETTINGS)}"
        )
    names = target.split(">") if scope == "link" else [target]
    if len(names) != (2 if scope == "link" else 1) or not all(map(grammar.is_name, names)):
        raise ApiError(422, f"target: {shown(target)} is not a {scope} target")


def _encode_report(doc: Any) -> bytes:
    """A report of a batch as the store keeps it (compact JSON, UTF-8); its size is what the
    per-report limit applies to."""
    if _fast_dumps is not None:
        try:
            return _fast_dumps(doc)
        except TypeError:  # an integer beyond 64 bits: parse_report refuses it anyway
            pass
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode(
        errors="backslashreplace"
    )


_fast_dumps: Callable[[Any], bytes] | None
try:
    from orjson import dumps as _fast_dumps
except ImportError:  # pragma: no cover - the controller extra installs orjson
    _fast_dumps = None


def _field(doc: Any, key: str, kind: type) -> Any:
    if not isinstance(doc, dict):
        raise ApiError(422, "body: must be a JSON object")
    if key not in doc:
        raise ApiError(422, f"{key}: is required")
    if not isinstance(doc[key], kind) or (isinstance(doc[key], bool) and kind is not bool):
        raise ApiError(422, f"{key}: must be {kind.__name__}")
    return doc[key]


PRUNE_EVERY_S = 3600.0


def create_app(
    store: Store,
    *,
    max_body_bytes: int = 1 << 20,
    retention: timedelta | None = None,
    responder: tuple[tuple[str, int], KeyLike] | None = None,
    responder_key_file: Path | None = None,
    tunnel: TunnelConfig | None = None,
    view_max_age_s: float = 30.0,
    view_min_interval_s: float = 0.0,
    view_fresh_wait_s: float = 0.25,
    view_process: bool = False,
    auth_cache_s: float = AUTH_CACHE_S,
    max_batch_bytes: int | None = None,
    report_rate_per_min: float | None = None,
    report_burst: int = 30,
    max_reports_per_node: int | None = None,
    metrics_token: str | None = None,
) -> FastAPI:
    """The API over ``store``. With ``retention``, history older than that is pruned hourly
    (by arrival) and reports created before it are refused; with ``responder`` (listen
    address, probe key), the probe responder runs beside the API, and follows
    ``responder_key_file`` when that changes (a probe key rotation: no restart).

    Limits on every door of the report routes: ``max_body_bytes`` per report (inside a batch
    too; a batch's body may be ``max_batch_bytes``), ``report_rate_per_min`` requests per node
    (a token bucket of ``report_burst``; 429 with Retry-After), ``max_reports_per_node`` stored
    (the oldest by arrival pruned). ``metrics_token``: ``/metrics`` wants it as its bearer.

    Fleet queries share one view of the fleet, computed and rendered by a worker — a process
    of its own with ``view_process`` (``controller serve`` does that: its seconds of Python
    then never hold this process's GIL), else a thread — and served as finished bytes (see
    :mod:`~fleetvpn.controller.views`): a write marks it dirty; it is recomputed at most every
    ``view_min_interval_s`` (and never busier than a third of a core), and when older than
    ``view_max_age_s``. Requests answer from the last complete view at once; where a
    recompute takes at most ``view_fresh_wait_s`` they wait for one with the writes before them.
    The view's age is in each fleet response (``generated_at``; header ``x-fleetvpn-view-age-s``).

    Tokens are checked against the store and remembered for ``auth_cache_s`` seconds: a token
    revoked in the store is refused at most that long after the revocation."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        handle = None
        if responder is not None:
            from fleetvpn.net.responder import serve

            handle = await serve(*responder)
        following = None
        if handle is not None and responder_key_file is not None:
            from fleetvpn.net.responder import follow_key_file

            following = asyncio.create_task(follow_key_file(responder_key_file, handle.protocol))
        pruning = asyncio.create_task(_prune_forever(store, retention)) if retention else None
        # A node revoked by any process (the CLI, another controller) leaves the view soon.
        revocations = asyncio.create_task(tokens_store.watch_revocations(store, cache.invalidate))
        # The recompute thread runs Python for seconds at a time; the event loop and the
        # database threads need the GIL back after each of their (many, short) I/O waits. At
        # CPython's default 5 ms hand-over they queued behind it (reports arrived at 155/s of
        # 167/s, p99 222 ms, on PostgreSQL at 10,000 nodes); at 1 ms they keep up (167/s, 71 ms).
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(switch_interval, GIL_SWITCH_S))
        cache.start()
        try:
            yield
        finally:
            sys.setswitchinterval(switch_interval)
            await asyncio.to_thread(cache.stop)
            revocations.cancel()
            if following is not None:
                following.cancel()
            if pruning is not None:
                pruning.cancel()
            if handle is not None:
                handle.close()

    max_batch_bytes = max_batch_bytes or BATCH_BODY_FACTOR * max_body_bytes
    app = FastAPI(title="fleetvpn controller", version=__version__, lifespan=lifespan)
    app.add_middleware(_NoStore)
    tunnel = tunnel or TunnelConfig()
    cache = Views(
        store,
        tunnel,
        process=view_process,
        max_age_s=view_max_age_s,
        min_interval_s=view_min_interval_s,
        fresh_wait_s=view_fresh_wait_s,
    )
    app.state.views = cache
    tokens = TokenCache(store, auth_cache_s)
    writer = ReportWriter(store)
    rates = (
        None
        if report_rate_per_min is None
        else RateLimiter(report_rate_per_min / 60.0, report_burst)
    )
    quota = None if max_reports_per_node is None else QuotaKeeper(store, max_reports_per_node)

    def view() -> Published:
        return cache.get()

    def node_view(name: str, who: Principal) -> Published:
        """A view with ``name`` in it: one that includes the writes so far if the last one does
        not know the node (it may have enrolled a moment ago)."""
        fleet = view()
        if not fleet.has_node(name):
            fleet = cache.get_fresh(timeout=NODE_WAIT_S)
        if not fleet.has_node(name):
            if who.kind == "node" and who.name == name:  # enrolled, not in a view yet
                raise ApiError(503, f"{name} is not in the fleet view yet; retry shortly")
            raise ApiError(404, f"no node {name!r}")
        return fleet

    def fleet_response(
        fleet: Published, content: bytes | memoryview | list[bytes | memoryview], media_type: str
    ) -> Response:
        headers = {
            "x-fleetvpn-view-age-s": f"{fleet.age_s():.1f}",
            "x-fleetvpn-view-compute-s": f"{fleet.index.compute_s:.4f}",
        }
        return _Parts(content if isinstance(content, list) else [content], media_type, headers)

    @app.exception_handler(ViewError)
    async def view_error(_request: Request, exc: ViewError) -> JSONResponse:
        return _error(503, str(exc))

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(GrammarError)
    async def grammar_error(_request: Request, exc: GrammarError) -> JSONResponse:
        return _error(422, str(exc))  # the grammar's message starts with the field's name

    @app.exception_handler(RecursionError)
    async def too_deep(_request: Request, _exc: RecursionError) -> JSONResponse:
        return _error(400, f"body: nested more than {MAX_JSON_DEPTH} deep")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def parameter_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(part) for part in e.get('loc', ()))}: {e.get('msg', 'invalid')}"
            for e in exc.errors()[:5]
        ]
        return _error(422, "; ".join(problems) or "invalid request")

    @app.exception_handler(StoreError)
    async def store_error(_request: Request, exc: StoreError) -> JSONResponse:
        status = _STORE_STATUS.get(type(exc), 400)
        return _error(status, str(exc))

    def principal(request: Request) -> Principal:
        return principal_of(request.headers.get("authorization", ""))

    def principal_of(header: str) -> Principal:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing bearer token (Authorization: Bearer …)")
        who = tokens.authenticate(token.strip())
        if who is None:
            raise ApiError(401, "unknown or revoked token")
        return who

    def admin(request: Request) -> Principal:
        who = principal(request)
        if who.kind != "admin":
            raise ApiError(403, "needs an admin token")
        return who

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"ok": True, "version": __version__, "schema_version": store.schema_version()}

    @app.post("/v1/enrollment-tokens", status_code=201)
    async def enrollment_token(request: Request) -> dict[str, Any]:
        admin(request)
        doc = await read_json(request, max_body_bytes)
        site = grammar.name(_field(doc, "site", str), "site")
        valid_for_s = doc.get("valid_for_s", 86400)
        if (
            isinstance(valid_for_s, bool)
            or not isinstance(valid_for_s, int)
            or not 60 <= valid_for_s <= MAX_ENROLLMENT_VALID_S
        ):
            raise ApiError(422, f"valid_for_s: must be an integer in 60..{MAX_ENROLLMENT_VALID_S}")
        token = store.create_enrollment_token(site, timedelta(seconds=valid_for_s))
        return {"enrollment_token": token, "site": site, "valid_for_s": valid_for_s}

    @app.post("/v1/enroll", status_code=201)
    async def enroll(request: Request, response: Response) -> dict[str, Any]:
        """Spend an enrollment token (201); the same enrollment retried after a lost answer
        gets the same node and a new node token (200, ``reissued``): see controller.tokens."""
        doc = await read_json(request, max_body_bytes)
        # Every value through its grammar (GrammarError: a 422 naming the field); the endpoint
        # is stored as its canonical text, never as sent.
        token = _token_text(_field(doc, "enrollment_token", str), "enrollment_token")
        name = grammar.name(_field(doc, "name", str), "name")
        public_key = grammar.wg_key(_field(doc, "public_key", str), "public_key")
        listen_port = grammar.port(doc.get("listen_port", 51820), "listen_port")
        endpoint = doc.get("endpoint")
        if endpoint is not None:
            endpoint = str(grammar.endpoint(endpoint, "endpoint"))
        done = tokens_store.enroll(
            store, token, name, public_key, listen_port=listen_port, endpoint=endpoint
        )
        cache.invalidate()  # after the write: a recompute racing it must not miss it
        if done.reissued:  # a retry after a lost answer: the same node, its token replaced
            response.status_code = 200
            return {"node": name, "site": done.site, "node_token": done.node_token,
                    "reissued": True}  # fmt: skip
        return {"node": name, "site": done.site, "node_token": done.node_token}

    def judge(who: Principal, doc: Any, body: str | dict[str, Any]) -> tuple[str, ReportWrite]:
        """A decoded report from ``who`` → (its id, what to write); ApiError if it is refused.
        ``body`` is what is stored: the text as sent, or the decoded document."""
        try:
            report = parse_report(doc)
        except ReportError as e:
            raise ApiError(422, str(e)) from None
        if report.node != who.name:
            raise ApiError(
                403, f"node: {who.name} may write only its own reports, not {report.node}'s"
            )
        if report.site != who.site:
            raise ApiError(
                422, f"site: {report.node} enrolled in site {who.site}, not {report.site}"
            )
        now = utcnow()
        ahead_s = (report.created_at - now).total_seconds()
        if ahead_s > CLOCK_SKEW_S:
            raise ApiError(
                422,
                f"created_at: {format_time(report.created_at)} is {ahead_s:.0f} s ahead of the"
                f" controller's clock (at most {CLOCK_SKEW_S:.0f} s; is the node's clock right?)",
            )
        if retention is not None and report.created_at < now - retention:
            raise ApiError(
                422,
                f"created_at: {format_time(report.created_at)} is older than the retention"
                f" ({retention.total_seconds() / 86400:g} days)",
            )
        for i, m in enumerate(report.measurements):
            for name, value in (("rx_bytes", m.rx_bytes), ("tx_bytes", m.tx_bytes)):
                if value > STORED_COUNTER_MAX:
                    raise ApiError(
                        422,
                        f"measurements[{i}].{name}: {value} is beyond what the controller"
                        f" stores (0..{STORED_COUNTER_MAX}, a signed 64-bit column)",
                    )
        links = [
            {"peer": m.peer, "family": m.family, "path_mtu": m.path_mtu,
             "icmp_seen": m.icmp_seen, "rtt_s": m.rtt_s, "loss_ratio": m.loss_ratio,
             "handshake_age_s": m.handshake_age_s, "rx_bytes": m.rx_bytes,
             "tx_bytes": m.tx_bytes, "endpoint": m.endpoint}
            for m in report.measurements
        ]  # fmt: skip
        nat = None
        if report.nat is not None:
            n = report.nat
            nat = {"measured_at": n.measured_at, "max_lifetime_s": n.max_lifetime_s,
                   "nat": n.nat, "mapped_address": n.mapped_address,
                   "mapping_lifetime_s": n.mapping_lifetime_s, "resolution_s": n.resolution_s,
                   "stateful_filter": n.stateful_filter}  # fmt: skip
        return report.report_id, (who, report.report_id, report.created_at, body, links, nat)

    def reporter(authorization: str) -> Principal:
        who = principal_of(authorization)
        if who.kind != "node":
            raise ApiError(403, "reports come from nodes (use the node's own token)")
        return who

    async def ingest(who: Principal, raw: bytes) -> tuple[int, dict[str, Any]]:
        """``POST /v1/reports``: (status, answer); ApiError or StoreError when refused."""
        doc = decode_json(raw)
        # Stored as sent, not encoded again: it is UTF-8 JSON that orjson and the standard
        # library read alike (decode_json), and parse_report accepted it.
        report_id, item = judge(who, doc, raw.decode())
        stored = await writer.put(item)
        if stored:
            cache.invalidate()
            if quota is not None and who.node_id is not None:
                await quota.stored(who.node_id, 1)
        return (201 if stored else 200), {"report_id": report_id, "stored": stored}

    async def ingest_batch(who: Principal, raw: bytes) -> tuple[int, dict[str, Any]]:
        """``POST /v1/reports/batch``: each report judged on its own (see the endpoint)."""
        docs = decode_json(raw)
        if not isinstance(docs, list):
            raise ApiError(422, "body: must be a JSON array of reports")
        if len(docs) > MAX_BATCH_REPORTS:
            raise ApiError(
                413, f"body: {len(docs)} reports is more than {MAX_BATCH_REPORTS} in one batch"
            )
        results: list[dict[str, Any]] = []
        pending: list[tuple[int, ReportWrite]] = []
        for i, doc in enumerate(docs):
            report_id = doc.get("report_id") if isinstance(doc, dict) else None
            entry: dict[str, Any] = {
                "index": i, "report_id": report_id if isinstance(report_id, str) else None
            }  # fmt: skip
            results.append(entry)
            try:
                text = _encode_report(doc)
                if len(text) > max_body_bytes:  # the door of one report, inside the batch
                    raise ApiError(
                        413, f"report of {len(text)} bytes is over the limit of {max_body_bytes}"
                    )
                entry["report_id"], item = judge(who, doc, text.decode())
            except ApiError as e:
                entry |= {"status": e.status, "stored": False, "error": f"[{i}] {e.message}"}
                continue
            pending.append((i, item))
        outcomes = await writer.put_many([item for _, item in pending])
        for (i, _), outcome in zip(pending, outcomes, strict=True):
            if isinstance(outcome, StoreError):
                status = _STORE_STATUS.get(type(outcome), 400)
                results[i] |= {"status": status, "stored": False, "error": f"[{i}] {outcome}"}
            else:
                results[i] |= {"status": 201 if outcome else 200, "stored": outcome}
        stored_now = sum(1 for r in results if r["stored"])
        if stored_now:
            cache.invalidate()
            if quota is not None and who.node_id is not None:
                await quota.stored(who.node_id, stored_now)
        counts = {
            "stored": sum(1 for r in results if r["status"] == 201),
            "replayed": sum(1 for r in results if r["status"] == 200),
            "rejected": sum(1 for r in results if r["status"] >= 400),
        }
        return 200, {"schema_version": 1, **counts, "results": results}

    async def answer(
        authorization: str,
        content_type: str | None,
        read: Callable[[], Awaitable[bytes]],
        handler: Ingest,
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        """Status, answer and extra headers of a report route: the token checked, the node's
        rate, the content type, the body read, handled. Never raises: a failure that is not
        the request's (the database's) is a 503 and logged."""
        try:
            who = reporter(authorization)
            if rates is not None:
                wait_s = rates.take(who.name)
                if wait_s > 0:
                    retry = str(max(1, math.ceil(wait_s)))
                    raise ApiError(
                        429,
                        f"{who.name}: more than {rates.rate_per_s * 60:g} report requests a"
                        f" minute (burst {rates.burst:g}); retry after {retry} s",
                        {"retry-after": retry},
                    )
            check_content_type(content_type)
            status, doc = await handler(who, await read())
            return status, doc, {}
        except ApiError as e:
            return e.status, {"error": e.message}, e.headers
        except StoreError as e:
            return _STORE_STATUS.get(type(e), 400), {"error": str(e)}, {}
        except RecursionError:
            return 400, {"error": f"body: nested more than {MAX_JSON_DEPTH} deep"}, {}
        except Exception as e:  # the database (or a bug): not the request's fault
            log.exception("report request failed")
            return 503, {"error": f"the controller could not store it: {type(e).__name__}"}, {}

    @app.post("/v1/reports", status_code=201)
    async def put_report(request: Request) -> JSONResponse:
        """One report from the node whose token is the bearer: 201 stored, 200 a replay (its
        ``report_id`` was stored before; nothing changes), 4xx naming the field otherwise.
        (Served by a plain ASGI route in front of FastAPI: see :class:`_ReportRoutes`.)"""
        status, doc, extra = await answer(
            request.headers.get("authorization", ""),
            request.headers.get("content-type"),
            lambda: read_body(request, max_body_bytes),
            ingest,
        )
        return JSONResponse(doc, status_code=status, headers=extra)

    @app.post("/v1/reports/batch")
    async def put_reports(request: Request) -> JSONResponse:
        """Several reports of one node (a JSON array, at most 1,000, e.g. a spool replayed after
        an outage), each judged on its own as by ``POST /v1/reports``. 200 with per-report
        results ``[{index, report_id, status, stored, error?}]`` in order and the counts
        ``stored``, ``replayed``, ``rejected``; 4xx only when the batch as a whole is refused
        (token, not JSON, not an array, too large)."""
        status, doc, extra = await answer(
            request.headers.get("authorization", ""),
            request.headers.get("content-type"),
            lambda: read_body(request, max_batch_bytes),
            ingest_batch,
        )
        return JSONResponse(doc, status_code=status, headers=extra)

    app.add_middleware(
        _ReportRoutes,
        routes={
            "/v1/reports": (ingest, max_body_bytes),
            "/v1/reports/batch": (ingest_batch, max_batch_bytes),
        },
        answer=answer,
    )

    @app.get("/v1/nodes")
    def list_nodes(request: Request) -> dict[str, Any]:
        admin(request)
        rows = [{k: v for k, v in n.items() if k != "id"} for n in store.nodes()]
        return {"schema_version": 1, "nodes": _jsonable(rows)}

    @app.delete("/v1/nodes/{name}")
    def revoke_node(request: Request, name: str) -> dict[str, Any]:
        """Revoke a node (admin): its token is refused, and it leaves every peer's desired
        state with the next view. 404 for an unknown node; revoking twice is harmless."""
        admin(request)
        done = tokens_store.revoke_node(store, name)
        cache.invalidate()
        return done.to_json()

    @app.get("/v1/overrides")
    def list_overrides(request: Request) -> dict[str, Any]:
        admin(request)
        rows = store.overrides()
        return {"schema_version": 1, "overrides": _jsonable(rows)}

    @app.put("/v1/overrides")
    async def put_override(request: Request) -> dict[str, Any]:
        admin(request)
        doc = await read_json(request, max_body_bytes)
        try:
            override = Override.from_json(doc)
        except ReportError as e:
            raise ApiError(422, str(e)) from None
        grammar.note(override.note, "note", limit=OVERRIDE_NOTE_MAX)  # one line, fits the column
        if override.setting == "tunnel_mtu" and tunnel.ipv6 is not None:
            grammar.tunnel_mtu(override.value, "value", ipv6=True)  # agents would refuse it
        store.set_override(
            override.scope, override.target, override.setting, override.value, override.note
        )
        cache.invalidate()
        return {"override": override.to_json()}

    @app.delete("/v1/overrides/{scope}/{target}/{setting}")
    def delete_override(request: Request, scope: str, target: str, setting: str) -> dict[str, Any]:
        admin(request)
        _override_key(scope, target, setting)
        if not store.clear_override(scope, target, setting):
            raise ApiError(404, f"no override {scope} {target} {setting}")
        cache.invalidate()
        return {"deleted": True}

    @app.get("/v1/health")
    def health(
        request: Request,
        site: str | None = None,
        problems: bool = False,
        limit: int | None = None,
        after: str | None = None,
    ) -> Response:
        """Link health. ``site``: links with an end there; ``problems``: only links not ok;
        ``limit`` / ``after``: one page (``next_after`` in the answer is the next cursor)."""
        admin(request)
        if limit is not None and limit < 0:
            raise ApiError(422, f"limit: {limit} is negative")
        if after is not None and "," not in after:
            raise ApiError(422, f"after: {after!r} is not a cursor (a,b: from next_after)")
        fleet = view()
        content = fleet.health(site, problems, limit=limit, after=after)
        return fleet_response(fleet, content, "application/json")

    @app.get("/v1/tune")
    def tune(request: Request, site: str | None = None) -> Response:
        """What would change: every configured value that differs from the recommendation,
        ``{node, peer, setting, current, recommended, reason}`` (of ``site``'s nodes)."""
        admin(request)
        fleet = view()
        return fleet_response(fleet, fleet.tune(site), "application/json")

    @app.get("/v1/nodes/{name}/desired")
    def desired(request: Request, name: str) -> Response:
        """Everything ``name`` applies: interface and peers, each value with its reason."""
        who = principal(request)
        if who.kind != "admin" and who.name != name:
            raise ApiError(403, f"{who.name} may read only its own desired state")
        fleet = node_view(name, who)
        return fleet_response(fleet, fleet.desired(name), "application/json")

    @app.get("/v1/nodes/{name}/config/{kind}")
    def node_config(request: Request, name: str, kind: str) -> dict[str, Any]:
        """Rendered config files for ``name``: wg-quick, networkd or host_vars."""
        from fleetvpn.controller.render import KINDS, RenderError, render

        who = principal(request)
        if who.kind != "admin" and who.name != name:
            raise ApiError(403, f"{who.name} may read only its own config")
        if kind not in KINDS:
            raise ApiError(404, f"no config kind {kind!r} (known: {', '.join(KINDS)})")
        fleet = node_view(name, who)
        try:
            files = render(json.loads(fleet.desired(name)), kind)
        except RenderError as e:  # templates refuse what the grammar refuses: say so, not 500
            raise ApiError(409, f"{name}'s desired state does not render as {kind}: {e}") from None
        return {"schema_version": 1, "node": name, "files": files}

    @app.get("/v1/links/{a}/{b}/history")
    def link_history(request: Request, a: str, b: str, hours: float = 24.0) -> dict[str, Any]:
        admin(request)
        grammar.name(a, "a"), grammar.name(b, "b")
        since = utcnow() - timedelta(hours=max(0.0, min(hours, 24.0 * 3650)))
        keep = ("node", "peer", "family", "measured_at", "path_mtu", "icmp_seen", "rtt_s",
                "loss_ratio", "handshake_age_s", "rx_bytes", "tx_bytes")  # fmt: skip
        rows = [{k: r[k] for k in keep} for r in store.link_history(a, b, since)]
        return {"schema_version": 1, "a": a, "b": b, "measurements": _jsonable(rows)}

    @app.get("/v1/sites/{site}/history")
    def site_history(request: Request, site: str, hours: float = 24.0) -> dict[str, Any]:
        admin(request)
        since = utcnow() - timedelta(hours=max(0.0, min(hours, 24.0 * 3650)))
        keep = ("node", "measured_at", "nat", "stateful_filter", "mapped_address",
                "mapping_lifetime_s", "resolution_s", "max_lifetime_s")  # fmt: skip
        rows = [
            {k: r[k] for k in keep}
            for r in store.nat_history(since)
            if r["site"] == site and r["measured_at"] >= since
        ]
        rows.sort(key=lambda r: r["measured_at"])
        return {"schema_version": 1, "site": site, "nat_measurements": _jsonable(rows)}

    @app.get("/metrics")
    def metrics(request: Request) -> Response:
        """Prometheus' text format; with ``metrics_token``, only for that bearer."""
        if metrics_token is not None:
            scheme, _, presented = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                presented.strip().encode("latin-1", "replace"), metrics_token.encode()
            ):
                raise ApiError(
                    401, "/metrics needs its bearer token", {"www-authenticate": "Bearer"}
                )
        fleet, content = cache.extra("metrics", EXTRA_WAIT_S)
        view = (
            "# HELP fleetvpn_view_age_seconds Age of the fleet view these figures come from\n"
            "# TYPE fleetvpn_view_age_seconds gauge\n"
            f"fleetvpn_view_age_seconds {fleet.age_s():.3f}\n"
            "# HELP fleetvpn_view_compute_seconds How long computing and rendering it took\n"
            "# TYPE fleetvpn_view_compute_seconds gauge\n"
            f"fleetvpn_view_compute_seconds {fleet.index.compute_s:.3f}\n"
        )
        return fleet_response(fleet, [content, view.encode()], "text/plain; version=0.0.4")

    return app


async def _prune_forever(store: Store, retention: timedelta) -> None:
    while True:
        await asyncio.to_thread(store.prune, retention)
        await asyncio.sleep(PRUNE_EVERY_S)


def _jsonable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from fleetvpn.model import format_time

    out = []
    for row in rows:
        out.append({k: format_time(v) if hasattr(v, "tzinfo") else v for k, v in row.items()})
    return out

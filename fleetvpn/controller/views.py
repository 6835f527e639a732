"""The fleet view as the API serves it: computed by a worker, rendered once, handed over as bytes.

The worker (:func:`run_worker`) owns the expensive part: it reads the store, runs the policy
(``fleet.compute``: seconds of Python at 100,000 links) and renders what the API answers with —
every link row's health JSON, the sites' keepalives, every node's desired state, the tune
changes and, when someone asked lately, ``/metrics``. It writes one view into one memory file
(``memfd``; no name, nothing on disk, freed when the last holder closes it) and passes the file
descriptor over a Unix socket. The API process maps it (:class:`Published`) and answers each
request by slicing and joining finished bytes: a page, a site or the whole 170 MB fleet
document costs it microseconds to milliseconds, never a recompute.

In production the worker is a child process (``python -m fleetvpn.controller.views``): its
seconds of Python never hold the API's GIL, so reports keep arriving at full speed while a view
is computed. Tests and in-memory stores run the same worker in a thread of the API process
(``process=False``); the API's side is the same either way.

Protocol (one AF_UNIX SOCK_SEQPACKET pair; pickled tuples, an fd beside some):
  API → worker   ("config", {...}) first, in process mode: the database URL (never in argv)
                 ("wake",)          something changed: see the write counter below
                 ("want", key)      render ``key`` ("metrics") for this and the next views
                 ("stop",)
  worker → API   ("view", meta) + fd     a new view; meta is small (sizes, ids)
                 ("extra", view_id, key) + fd   a rendering asked for after the view was sent
                 ("error", text)         the recompute failed; the previous view still serves

Writes are counted in a shared 8-byte counter (a memfd both map): the API increments it after
each committed write and sends ``wake`` without blocking (when the socket is full the worker
has wake-ups queued already). The worker reads the counter before it reads the store, and each
view says how many writes it includes: read-your-writes (``get_fresh``) compares counters.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import ctypes
import gc
import logging
import mmap
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fleetvpn.controller import fleet as fleetview
from fleetvpn.controller.config import TunnelConfig
from fleetvpn.controller.store import Store, utcnow
from fleetvpn.model import format_time, parse_time

log = logging.getLogger(__name__)

MESSAGE_BYTES = 1 << 16  # a message (meta) is far smaller; views travel as memory files
WANT_FOR_S = 600.0  # a rendering asked for is made for each new view this long
EXTRAS = ("metrics",)
_HEADER = struct.Struct("<QQ")  # where the pickled index is: offset, length
_COUNTER = struct.Struct("<Q")

Span = tuple[int, int]  # (start, end) in the memory file


# --- what a view file holds ----------------------------------------------------------------------


@dataclass
class Index:
    """Where everything of one view lies in its file (pickled at the file's end)."""

    generated_at: str
    writes: int  # writes (the API's counter) the view includes
    compute_s: float  # how long computing and rendering it took
    summary: dict[str, int]
    starts: array[int]  # link i is file[starts[i]:ends[i]], comma-separated, in (a, b) order
    ends: array[int]
    cursors: list[str]  # "a,b" of each link, the paging cursor
    problems: array[int]  # indexes of the links not ok
    ok: bytes  # 1 per link that is ok
    by_site: dict[str, array[int]]  # site → indexes of the links with an end there
    sites: Span  # JSON array of every site's keepalive
    site: dict[str, Span]  # one site's keepalive object
    desired: dict[str, Span]  # node → its desired state (JSON)
    tune: dict[str, Span]  # site → its nodes' tune changes (JSON objects, comma-separated)
    tune_all: Span
    extras: dict[str, Span] = field(default_factory=dict)


class _FileWriter:
    """Appends to a memory file, remembering where each part went."""

    def __init__(self, name: str) -> None:
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        self.file = os.fdopen(self.fd, "wb", buffering=1 << 20, closefd=False)
        self.file.write(b"\0" * _HEADER.size)
        self.at = _HEADER.size

    def put(self, data: bytes) -> Span:
        start = self.at
        self.file.write(data)
        self.at += len(data)
        return start, self.at

    def finish(self, index: object) -> int:
        """Write the index and the header; the fd (the caller closes it)."""
        start, end = self.put(pickle.dumps(index, pickle.HIGHEST_PROTOCOL))
        self.file.flush()
        os.pwrite(self.fd, _HEADER.pack(start, end - start), 0)
        self.file.close()
        return self.fd


def render_view(
    view: fleetview.FleetView,
    tunnel: TunnelConfig,
    writes: int,
    extras: Iterable[str] = (),
    started: float | None = None,
) -> tuple[int, Index]:
    """Everything the API answers from ``view``, in a new memory file: (its fd, its index).
    ``started``: when computing the view began (monotonic), for the index's ``compute_s``."""
    started = time.monotonic() if started is None else started
    dumps = fleetview.dumps_bytes()
    out = _FileWriter("fleetvpn-view")
    with fleetview.gc_paused():
        fragments = [dumps(fleetview.link_json(r)) for r in view.links]
        starts, ends = array("Q"), array("Q")
        at = out.at
        for fragment in fragments:
            starts.append(at)
            at += len(fragment)
            ends.append(at)
            at += 1  # the comma
        out.put(b",".join(fragments))
        del fragments
        ok = bytes(r.state == "ok" for r in view.links)
        by_site: dict[str, array[int]] = {}
        for i, r in enumerate(view.links):
            by_site.setdefault(r.site_a, array("I")).append(i)
            if r.site_b != r.site_a:
                by_site.setdefault(r.site_b, array("I")).append(i)
        site_docs = {name: dumps(fleetview.site_json(s)) for name, s in sorted(view.sites.items())}
        sites = out.put(b"[" + b",".join(site_docs.values()) + b"]")
        site = {name: out.put(doc) for name, doc in site_docs.items()}
        desired = {
            name: out.put(dumps(fleetview.desired_json(view, name, tunnel)))
            for name in view.node_sites
        }
        changes = fleetview.tune_json(view)["changes"]
        encoded = [dumps(c) for c in changes]
        tune_all = out.put(b",".join(encoded))
        per_site: dict[str, list[bytes]] = {}
        for change, doc in zip(changes, encoded, strict=True):
            per_site.setdefault(view.node_sites.get(change["node"], ""), []).append(doc)
        tune = {name: out.put(b",".join(docs)) for name, docs in per_site.items()}
        index = Index(
            generated_at=format_time(view.generated_at),
            writes=writes,
            compute_s=0.0,
            summary=fleetview.summary(view),
            starts=starts,
            ends=ends,
            cursors=[fleetview.link_cursor(r) for r in view.links],
            problems=array("I", (i for i, r in enumerate(view.links) if r.state != "ok")),
            ok=ok,
            by_site=by_site,
            sites=sites,
            site=site,
            desired=desired,
            tune=tune,
            tune_all=tune_all,
        )
        for key in extras:
            index.extras[key] = out.put(render_extra(view, key))
        index.compute_s = time.monotonic() - started
        return out.finish(index), index


def render_extra(view: fleetview.FleetView, key: str) -> bytes:
    if key == "metrics":
        from fleetvpn.controller import metrics

        return metrics.render(view)
    raise ValueError(f"no rendering {key!r} (known: {', '.join(EXTRAS)})")


def render_extra_file(view: fleetview.FleetView, key: str) -> int:
    out = _FileWriter(f"fleetvpn-{key}")
    span = out.put(render_extra(view, key))
    return out.finish(span)


# --- the API's side: a mapped view ---------------------------------------------------------------


def _map(fd: int) -> tuple[mmap.mmap, Any]:
    """Map a memory file read-only and read its index (closes ``fd``: the mapping stays)."""
    try:
        data = mmap.mmap(fd, os.fstat(fd).st_size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    start, length = _HEADER.unpack_from(data, 0)
    return data, pickle.loads(data[start : start + length])


class Published:
    """One view as the API serves it: finished bytes and where they lie. Never changes (the
    extras a reader asks for later are added, each once)."""

    def __init__(self, view_id: int, fd: int) -> None:
        self.view_id = view_id
        self._data, self.index = _map(fd)
        self.view = memoryview(self._data)
        self.generated_at: datetime = parse_time(self.index.generated_at)
        self._extras: dict[str, memoryview] = {}

    @property
    def writes(self) -> int:
        return int(self.index.writes)

    def age_s(self) -> float:
        """How old the view is now."""
        return max(0.0, (utcnow() - self.generated_at).total_seconds())

    def has_node(self, name: str) -> bool:
        return name in self.index.desired

    def _slice(self, span: Span) -> memoryview:
        return self.view[span[0] : span[1]]

    # --- health --------------------------------------------------------------------------

    def health(
        self,
        site: str | None = None,
        problems: bool = False,
        *,
        limit: int | None = None,
        after: str | None = None,
    ) -> list[bytes | memoryview]:
        """``fleet.health_json``'s document as parts to send in order (see there for the
        filters and paging)."""
        ix = self.index
        chosen: Sequence[int]
        if site is None:
            chosen = ix.problems if problems else range(len(ix.cursors))
        else:
            chosen = ix.by_site.get(site, ())
            if problems:
                chosen = array("I", (i for i in chosen if not ix.ok[i]))
        matched = len(chosen)
        if after is not None:
            a, _, b = after.partition(",")
            cursors = ix.cursors

            def key(i: int) -> tuple[str, str]:
                x, _, y = cursors[i].partition(",")
                return x, y

            chosen = chosen[bisect.bisect_right(chosen, (a, b), key=key) :]
        next_after = None
        if limit is not None and len(chosen) > limit:
            chosen = chosen[:limit]
            next_after = ix.cursors[chosen[-1]] if len(chosen) else after
        head = {
            "schema_version": 1,
            "generated_at": ix.generated_at,
            "summary": ix.summary,
            "healthy": all(state == "ok" for state in ix.summary),
            "links_matched": matched,
            "next_after": next_after,
        }
        parts: list[bytes | memoryview] = [_json(head)[:-1] + b',"links":[']
        parts += self._links(chosen)
        if site is None:
            parts += [b'],"sites":', self._slice(ix.sites), b"}"]
        elif site in ix.site:
            parts += [b'],"sites":[', self._slice(ix.site[site]), b"]}"]
        else:
            parts.append(b'],"sites":[]}')
        return parts

    def _links(self, chosen: Sequence[int]) -> list[bytes | memoryview]:
        if not len(chosen):
            return []
        first, last = chosen[0], chosen[-1]
        starts, ends = self.index.starts, self.index.ends
        if last - first + 1 == len(chosen):  # a run of neighbours: one slice of the file
            return [self.view[starts[first] : ends[last]]]
        view = self.view
        return [b",".join([view[starts[i] : ends[i]] for i in chosen])]

    # --- the rest ------------------------------------------------------------------------

    def tune(self, site: str | None = None) -> bytes:
        ix = self.index
        span = ix.tune_all if site is None else ix.tune.get(site)
        changes = b"" if span is None else self._slice(span).tobytes()
        head = _json({"schema_version": 1, "generated_at": ix.generated_at})[:-1]
        return head + b',"changes":[' + changes + b"]}"

    def desired(self, node: str) -> bytes:
        return self._slice(self.index.desired[node]).tobytes()

    def extra(self, key: str) -> memoryview | None:
        if key in self.index.extras:
            return self._slice(self.index.extras[key])
        return self._extras.get(key)

    def add_extra(self, key: str, fd: int) -> None:
        data, span = _map(fd)
        self._extras.setdefault(key, memoryview(data)[span[0] : span[1]])


def _json(doc: Any) -> bytes:
    return fleetview.dumps_bytes()(doc)


class ViewError(Exception):
    """No view can be served: the first recompute failed (the message says why)."""


class Views:
    """The API's handle on the fleet view: the last published view at once, a fresher one on
    request, writes announced. See the module docstring for the worker and the protocol.

    Recompute pacing (the worker's): a write makes the view dirty; it is recomputed after a
    pause of ``max(min_interval_s, busy_ratio × the last compute's duration)`` since the last
    one ended, and when older than ``max_age_s`` without writes. :meth:`get` waits up to
    ``fresh_wait_s`` for a view with every write before it when the last compute took at most
    that long (a small fleet answers with its latest state; a large one from the last view)."""

    RESTART_AFTER_S = 1.0

    def __init__(
        self,
        store: Store,
        tunnel: TunnelConfig,
        *,
        process: bool = False,
        max_age_s: float = 30.0,
        min_interval_s: float = 0.0,
        busy_ratio: float = 2.0,
        fresh_wait_s: float = 0.25,
    ) -> None:
        self.store = store
        self.tunnel = tunnel
        self.process = process
        self.options = {"max_age_s": max_age_s, "min_interval_s": min_interval_s,
                        "busy_ratio": busy_ratio}  # fmt: skip
        self.fresh_wait_s = fresh_wait_s
        self._changed = threading.Condition()
        self._view: Published | None = None
        self._error: str | None = None
        self._stopping = False
        self._started = False
        self._sock: socket.socket | None = None
        self._worker: subprocess.Popen[bytes] | threading.Thread | None = None
        self._reader: threading.Thread | None = None
        self._counter_fd = os.memfd_create("fleetvpn-writes", os.MFD_CLOEXEC)
        os.ftruncate(self._counter_fd, _COUNTER.size)
        self._counter = mmap.mmap(self._counter_fd, _COUNTER.size)
        self._writes = 0
        self._send_lock = threading.Lock()

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        with self._changed:
            if self._started:
                return
            self._started, self._stopping = True, False
        self._spawn()

    def _spawn(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock = ours
        if self.process:
            url = self.store.engine.url.render_as_string(hide_password=False)
            os.set_inheritable(theirs.fileno(), True)
            os.set_inheritable(self._counter_fd, True)
            fds = (theirs.fileno(), self._counter_fd)
            argv = [sys.executable, "-m", "fleetvpn.controller.views",
                    "--socket", str(fds[0]), "--counter", str(fds[1])]  # fmt: skip
            self._worker = subprocess.Popen(argv, pass_fds=fds)
            theirs.close()
            config = {"url": url, "tunnel": self.tunnel, **self.options}
            ours.sendall(pickle.dumps(("config", config)))
        else:
            counter = mmap.mmap(os.dup(self._counter_fd), _COUNTER.size)
            self._worker = threading.Thread(
                target=run_worker,
                args=(theirs, counter, self.store, self.tunnel),
                kwargs=self.options,
                name="fleet-views",
                daemon=True,
            )
            self._worker.start()
        self._reader = threading.Thread(target=self._read, args=(ours,), name="fleet-views-reader",
                                        daemon=True)  # fmt: skip
        self._reader.start()

    def stop(self) -> None:
        with self._changed:
            if not self._started:
                return
            self._stopping = True
            self._changed.notify_all()
        self._send(("stop",), block=True)
        worker, reader = self._worker, self._reader
        if isinstance(worker, subprocess.Popen):
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        elif worker is not None:
            worker.join(30)
        if reader is not None:
            reader.join(30)
        if self._sock is not None:
            self._sock.close()
        with self._changed:
            self._started = False

    # --- writers and readers ---------------------------------------------------------------

    def invalidate(self) -> None:
        """A write committed: the next view includes it."""
        with self._changed:
            self._writes += 1
            _COUNTER.pack_into(self._counter, 0, self._writes)
        self._send(("wake",), block=False)

    def want(self, key: str) -> None:
        """``key`` (an extra rendering) is wanted: made for the current view if it lacks it,
        and for every view in the next WANT_FOR_S."""
        self._send(("want", key), block=True)

    def extra(self, key: str, timeout: float) -> tuple[Published, memoryview]:
        """The current view and its rendering ``key``, asked of the worker if it lacks it
        (ViewError after ``timeout`` seconds without)."""
        view = self.get()
        self.want(key)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                view = self._view or view
                found = view.extra(key)
                if found is not None:
                    return view, found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ViewError(f"no {key} rendering after {timeout:.0f} s")
                self._changed.wait(left)

    def get(self) -> Published:
        self.start()
        with self._changed:
            view = self._view
            if view is not None and (
                view.writes >= self._writes or view.index.compute_s > self.fresh_wait_s
            ):
                return view
            deadline = None if view is None else time.monotonic() + self.fresh_wait_s
            return self._wait(self._writes, deadline)

    def get_fresh(self, timeout: float) -> Published:
        """A view with every write made before this call; the last one after ``timeout``."""
        self.start()
        with self._changed:
            return self._wait(self._writes, time.monotonic() + timeout)

    def _wait(self, wanted: int, deadline: float | None) -> Published:
        while self._view is None or self._view.writes < wanted:
            if self._view is None and self._error is not None:
                raise ViewError(self._error)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            self._changed.wait(left)
        if self._view is None:
            raise ViewError("no fleet view yet")
        return self._view

    # --- the socket ------------------------------------------------------------------------

    def _send(self, message: tuple[Any, ...], *, block: bool) -> None:
        sock = self._sock
        if sock is None:
            return
        data = pickle.dumps(message)
        with self._send_lock:
            try:
                if block:
                    sock.sendall(data)
                else:
                    sock.send(data, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass  # the worker has wake-ups queued: it will read the counter anyway
            except OSError:
                pass  # the worker is gone: the reader restarts it

    def _read(self, sock: socket.socket) -> None:
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(sock, MESSAGE_BYTES, 1)
            except OSError:
                data, fds = b"", []
            if not data:
                break
            message = pickle.loads(data)
            kind = message[0]
            if kind == "view":
                self._publish(Published(message[1], fds[0]))
            elif kind == "extra":
                with self._changed:
                    view = self._view
                    if view is not None and view.view_id == message[1]:
                        view.add_extra(message[2], fds[0])
                    else:
                        for fd in fds:
                            os.close(fd)
                    self._changed.notify_all()
            elif kind == "error":
                with self._changed:
                    self._error = message[1]
                    self._changed.notify_all()
        with self._changed:
            if self._stopping:
                return
        log.error("the fleet view worker stopped; starting it again")
        time.sleep(self.RESTART_AFTER_S)
        with self._changed:
            if self._stopping:
                return
        if isinstance(self._worker, subprocess.Popen):
            self._worker.wait()
        self._spawn()

    def _publish(self, view: Published) -> None:
        with self._changed:
            self._view, self._error = view, None
            self._changed.notify_all()


# --- the worker ----------------------------------------------------------------------------------


def run_worker(
    sock: socket.socket,
    counter: mmap.mmap,
    store: Store,
    tunnel: TunnelConfig,
    *,
    max_age_s: float = 30.0,
    min_interval_s: float = 0.0,
    busy_ratio: float = 2.0,
) -> None:
    """Compute and publish views until told to stop (or the API's end of ``sock`` closes)."""
    try:
        _work(sock, counter, store, tunnel, max_age_s, min_interval_s, busy_ratio)
    finally:
        sock.close()


def _work(
    sock: socket.socket,
    counter: mmap.mmap,
    store: Store,
    tunnel: TunnelConfig,
    max_age_s: float,
    min_interval_s: float,
    busy_ratio: float,
) -> None:
    sources = fleetview.Sources()
    view: fleetview.FleetView | None = None
    view_id, view_writes = 0, -1
    last_compute_s, ended = 0.0, 0.0
    wanted: dict[str, float] = {}
    sent_extras: set[str] = set()

    def writes() -> int:
        while True:  # two equal reads: never a torn one
            first = _COUNTER.unpack_from(counter, 0)[0]
            if _COUNTER.unpack_from(counter, 0)[0] == first:
                return int(first)

    def due() -> float:
        if view is None or view_writes < writes():
            return max(
                0.0, ended + max(min_interval_s, busy_ratio * last_compute_s) - time.monotonic()
            )
        age = (utcnow() - view.generated_at).total_seconds()
        return max(0.0, max_age_s - age)

    def serve_extra(key: str) -> None:
        if view is None or key in sent_extras:
            return
        try:
            fd = render_extra_file(view, key)
        except Exception:
            log.exception("rendering %s failed", key)
            return
        try:
            socket.send_fds(sock, [pickle.dumps(("extra", view_id, key))], [fd])
        finally:
            os.close(fd)
        sent_extras.add(key)

    while True:
        ready, _, _ = select.select([sock], [], [], due())
        if ready:
            try:
                data = sock.recv(MESSAGE_BYTES)
            except OSError:
                data = b""
            if not data:
                return  # the API is gone
            message = pickle.loads(data)
            if message[0] == "stop":
                return
            if message[0] == "want" and message[1] in EXTRAS:
                wanted[message[1]] = time.monotonic()
                serve_extra(message[1])
            continue  # read everything queued before computing
        started = time.monotonic()
        seen = writes()  # before the store: a write racing the read is in the next view
        try:
            # The collector stays off until what is new is frozen: a pass over the new view's
            # millions of objects (none in a cycle) cost 0.3-0.6 s a compute.
            with fleetview.gc_paused():
                new = fleetview.compute(
                    store, utcnow(), sources, carries_ipv6=tunnel.ipv6 is not None
                )
                extras = [k for k, at in wanted.items() if time.monotonic() - at < WANT_FOR_S]
                fd, index = render_view(new, tunnel, seen, extras, started)
                _freeze_heap()
        except Exception as e:  # keep serving the last view; say why, try again later
            log.exception("fleet recompute failed; serving the previous view")
            sources = fleetview.Sources()
            ended = time.monotonic()
            last_compute_s = max(last_compute_s, ended - started, 1.0)
            try:
                sock.send(pickle.dumps(("error", f"the fleet view could not be computed: {e}")))
            except OSError:
                return
            continue
        view, view_id, view_writes = new, view_id + 1, seen
        sent_extras = set(index.extras)
        del new
        ended = time.monotonic()
        last_compute_s = ended - started
        try:
            socket.send_fds(sock, [pickle.dumps(("view", view_id))], [fd])
        except OSError:
            return
        finally:
            os.close(fd)


_thaw_at = [time.monotonic() + 3600.0]


def _freeze_heap() -> None:
    """What is alive once a view is published is frozen (gc.freeze: never traversed again by
    the cyclic collector, whose full passes over millions of objects took seconds); a thaw and
    one full collection every hour frees cycles that died meanwhile."""
    if time.monotonic() >= _thaw_at[0]:
        gc.unfreeze()
        gc.collect()
        _thaw_at[0] = time.monotonic() + 3600.0
    gc.freeze()


def main(argv: list[str] | None = None) -> None:
    """The worker process: ``python -m fleetvpn.controller.views --socket FD --counter FD``."""
    parser = argparse.ArgumentParser(
        description="fleetvpn's fleet view worker (started by the API)"
    )
    parser.add_argument("--socket", type=int, required=True)
    parser.add_argument("--counter", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: fleet views: %(message)s")
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the API, which stops us
    sock = socket.socket(fileno=args.socket)
    counter = mmap.mmap(args.counter, _COUNTER.size)
    kind, config = pickle.loads(sock.recv(MESSAGE_BYTES))
    assert kind == "config"
    store = Store.open(config.pop("url"))
    try:
        run_worker(sock, counter, store, config.pop("tunnel"), **config)
    finally:
        store.close()


def _die_with_parent() -> None:
    """SIGTERM when the API process dies, however it dies (Linux prctl PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    if os.getppid() == 1:  # the parent died before the prctl
        sys.exit(0)


# Through the package: what the worker pickles must be views.Index, not __main__.Index.
if __name__ == "__main__":
    from fleetvpn.controller import views

    views.main()

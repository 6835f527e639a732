"""Reports on disk until the controller has them: bounded, summarised at the bound, replayed in
order.

Every report the agent makes goes through the spool (``put`` then ``flush``), so a controller
outage changes nothing but how long a report waits: reports leave in the order they were made,
and each is deleted only after the controller acknowledged it (201 stored, or 200 "already
stored" — report ids make a replay after a crash between send and delete harmless).

The bound (``max_reports`` files) is kept by :func:`summarise`: the two oldest reports are merged
into one that keeps the newer report's id and time and, per peer, the worst of what both saw
(the smaller path MTU, the larger RTT and loss, ICMP seen by either) and the smaller NAT mapping
lifetime — the values the controller's decisions must not miss. The merge is counted and logged
(``summarised`` in :meth:`Spool.stats`), never silent. A report the controller refuses for good
(4xx other than auth) is moved to ``rejected/`` (the newest 20 kept) with the reason, so one bad
report cannot block the queue.

Files: ``<dir>/<seq:012d>.json`` (one Report JSON each, written atomically), ``<dir>/stats.json``.
``summarise`` is pure; the class is the thin file adapter around it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Final, Literal

from fleetvpn.model import LinkMeasurement, NatMeasurement, Report

REJECTED_KEPT: Final = 20
BATCH_REPORTS: Final = 100  # reports in one batch request, at most

BatchOutcome = list[str | None] | Literal["retry", "smaller", "unsupported"]


def _min(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def _max(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def _merge_link(older: LinkMeasurement, newer: LinkMeasurement) -> LinkMeasurement:
    path_mtu = _min(older.path_mtu, newer.path_mtu)
    return replace(
        newer,
        path_mtu=None if path_mtu is None else int(path_mtu),
        icmp_seen=older.icmp_seen or newer.icmp_seen,
        rtt_s=_max(older.rtt_s, newer.rtt_s),
        loss_ratio=_max(older.loss_ratio, newer.loss_ratio),
    )


def _merge_nat(older: NatMeasurement | None, newer: NatMeasurement | None) -> NatMeasurement | None:
    if older is None or newer is None or older == newer:
        return newer or older
    lifetime = {id(n): n.mapping_lifetime_s or float("inf") for n in (older, newer)}
    return older if lifetime[id(older)] < lifetime[id(newer)] else newer


def summarise(older: Report, newer: Report) -> Report:
    """One report standing for two consecutive ones (module docstring). Pure."""
    merged: dict[tuple[str, int], LinkMeasurement] = {}
    for m in newer.measurements:
        merged[m.peer, m.family] = m
    with_endpoint = {m.peer for m in newer.measurements if m.endpoint is not None}
    carried: list[LinkMeasurement] = []
    for m in older.measurements:
        key = (m.peer, m.family)
        if key in merged:
            merged[key] = _merge_link(m, merged[key])
        else:  # only the older report saw this peer/family: its detail is carried, not lost
            if m.endpoint is not None and m.peer in with_endpoint:
                m = replace(m, endpoint=None)
            carried.append(m)
    return replace(
        newer,
        measurements=(*merged.values(), *carried),
        nat=_merge_nat(older.nat, newer.nat),
    )


class Spool:
    def __init__(self, directory: Path, max_reports: int, log: Callable[[str], None]) -> None:
        if max_reports < 2:
            raise ValueError("max_reports must be at least 2")
        self.dir = directory
        self.max_reports = max_reports
        self.log = log
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.dir / "rejected").mkdir(exist_ok=True, mode=0o700)
        self._stats = self._load_stats()
        files = self._files()
        self._next_seq = int(files[-1].stem) + 1 if files else 1

    # --- files -------------------------------------------------------------------------------
    def _files(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("*.json") if p.stem.isdigit())

    def _write(self, path: Path, doc: dict[str, Any]) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(doc, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _load_stats(self) -> dict[str, int]:
        try:
            doc = json.loads((self.dir / "stats.json").read_text())
            return {k: int(v) for k, v in doc.items()}
        except (OSError, ValueError, AttributeError):
            return {"summarised": 0, "rejected": 0, "sent": 0}

    def _save_stats(self) -> None:
        self._write(self.dir / "stats.json", dict(self._stats))

    # --- the queue ---------------------------------------------------------------------------
    def put(self, report: Report) -> None:
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        self._write(self.dir / f"{seq:012d}.json", report.to_json())
        files = self._files()
        while len(files) > self.max_reports:
            self._summarise_oldest(files[0], files[1])
            files.pop(0)

    def _summarise_oldest(self, first: Path, second: Path) -> None:
        try:
            older = Report.from_json(json.loads(first.read_text()))
            newer = Report.from_json(json.loads(second.read_text()))
        except (OSError, ValueError) as e:  # a damaged file: say so, keep the newer
            self.log(f"spool: {first.name} unreadable ({e}); removed at the bound")
            first.unlink(missing_ok=True)
            return
        self._write(second, summarise(older, newer).to_json())
        first.unlink()
        self._stats["summarised"] = self._stats.get("summarised", 0) + 1
        self._save_stats()
        self.log(
            f"spool: at its bound of {self.max_reports} reports: report {older.report_id} "
            f"({older.created_at:%H:%M:%S}) summarised into {newer.report_id}"
        )

    def pending(self) -> list[tuple[Path, dict[str, Any]]]:
        out = []
        for path in self._files():
            try:
                out.append((path, json.loads(path.read_text())))
            except (OSError, ValueError) as e:
                self.reject(path, {}, f"unreadable: {e}")
        return out

    def __len__(self) -> int:
        return len(self._files())

    def sent(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        self._stats["sent"] = self._stats.get("sent", 0) + 1
        self._save_stats()

    def reject(self, path: Path, doc: dict[str, Any], reason: str) -> None:
        rejected = self.dir / "rejected"
        self._write(rejected / path.name, {"reason": reason, "report": doc})
        path.unlink(missing_ok=True)
        for old in sorted(rejected.glob("*.json"))[:-REJECTED_KEPT]:
            with contextlib.suppress(OSError):
                old.unlink()
        self._stats["rejected"] = self._stats.get("rejected", 0) + 1
        self._save_stats()
        self.log(f"spool: the controller refused report {doc.get('report_id')}: {reason}")

    def stats(self) -> dict[str, int]:
        return {**self._stats, "pending": len(self)}

    def flush(self, send: Callable[[dict[str, Any]], str | None]) -> int:
        """Send pending reports oldest first; ``send`` returns None (acknowledged), "retry"
        (controller unreachable or failing: stop, keep the rest) or another string (refused for
        good: the reason). Returns how many were acknowledged."""
        done = 0
        for path, doc in self.pending():
            outcome = send(doc)
            if outcome is None:
                self.sent(path)
                done += 1
            elif outcome == "retry":
                break
            else:
                self.reject(path, doc, outcome)
        return done

    def flush_batches(
        self, send: Callable[[list[dict[str, Any]]], BatchOutcome], size: int = BATCH_REPORTS
    ) -> tuple[int, bool]:
        """Send pending reports oldest first, up to ``size`` a request. ``send`` returns one
        outcome per report as :meth:`flush`'s ``send`` does (None acknowledged, or the reason
        it was refused for good), or for the whole batch: "retry" (stop, keep them all),
        "smaller" (too large: halve the batch; a lone report too large is refused) or
        "unsupported" (the controller has no batch path: stop). Returns how many were
        acknowledged and whether the batch path was unsupported."""
        done = 0
        pending = self.pending()
        while pending:
            chunk = pending[:size]
            outcome = send([doc for _, doc in chunk])
            if outcome == "retry":
                break
            if outcome == "unsupported":
                return done, True
            if outcome == "smaller":
                if size == 1:
                    path, doc = chunk[0]
                    self.reject(path, doc, "HTTP 413: too large for the controller")
                    del pending[0]
                else:
                    size = max(1, size // 2)
                    self.log(f"spool: the controller found a batch too large; sending {size}")
                continue
            if len(outcome) != len(chunk):  # the client checks this; never guess which is which
                break
            for (path, doc), result in zip(chunk, outcome, strict=True):
                if result is None:
                    self.sent(path)
                    done += 1
                else:
                    self.reject(path, doc, result)
            del pending[: len(chunk)]
        return done, False

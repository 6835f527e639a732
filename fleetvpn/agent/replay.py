"""The spool's reports to the controller: in batches (``POST /v1/reports/batch``) when the
controller has the batch path, one report a request when it does not (an older controller
answers 404 or 405 there; the caller remembers that and asks no more).

Outcomes, per batch: a report the controller stored (201) or already had (200: a replay, report
ids make resending harmless) leaves the spool; a report it refused (a per-report 4xx) leaves it
for ``rejected/``, logged, because it will never be accepted; 5xx, 429 or a network error keeps
the whole batch for later; 401/403 for the whole batch is a token problem, not the reports'
fault: kept too; 413 halves the batch; 400/422 for the whole batch sends this round one report
a request, so one report the batch path cannot take does not hold up the queue. Blocking (runs
in a worker thread).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fleetvpn.agent.client import Client, ControllerError, Refused, Unreachable
from fleetvpn.agent.spool import BatchOutcome, Spool

UNSUPPORTED = (404, 405)  # the batch path on a controller that predates it


def replay(
    spool: Spool, client: Client, *, batches: bool, failed: Callable[[ControllerError], None]
) -> tuple[int, bool]:
    """Send what the spool holds, oldest first. Returns how many reports the controller
    acknowledged and whether to use batches next time."""

    refusal: list[int] = []  # the status that stopped batches this round

    def send_batch(docs: list[dict[str, Any]]) -> BatchOutcome:
        try:
            return client.post_reports(docs)
        except Unreachable as e:
            failed(e)
            return "retry"
        except Refused as e:
            if e.status == 413:
                return "smaller"
            if e.status in (401, 403):
                failed(e)  # a token problem is not the reports' fault: keep every one
                return "retry"
            refusal.append(e.status)
            return "unsupported"  # 404/405: no batch path; 400/422 and others: one at a time

    def send_one(doc: dict[str, Any]) -> str | None:
        try:
            client.post_report(doc)
        except Unreachable as e:
            failed(e)
            return "retry"
        except Refused as e:
            if e.status in (401, 403):
                failed(e)
                return "retry"  # a token problem is not the report's fault: keep it
            return str(e)
        return None

    done = 0
    if batches:
        done, unsupported = spool.flush_batches(send_batch)
        if not unsupported:
            return done, True
        batches = refusal[0] not in UNSUPPORTED
        spool.log(
            f"controller: HTTP {refusal[0]} for a batch of reports; sending one at a time"
            + ("" if batches else " (an older controller without the batch path)")
        )
    return done + spool.flush(send_one), batches

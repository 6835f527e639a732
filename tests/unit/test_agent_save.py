"""measurements.json keeps up with the agent: a path MTU recorded while a save is running gets a
save of its own (a second request for a running job is dropped by the agent's job runner)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from fleetvpn.agent import probing, startup
from fleetvpn.agent.report import PathMtu


class Jobs(probing.ProbingJobs):
    def __init__(self) -> None:
        self.config = None  # type: ignore[assignment]
        self.pmtu: dict[str, PathMtu] = {}
        self.nat = None
        self.save_again = False
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def _start(self, job: str) -> None:  # as the daemon's: one at a time per job
        if job in self.tasks and not self.tasks[job].done():
            return
        self.tasks[job] = asyncio.ensure_future(self._job_save())


def test_a_record_during_a_save_is_saved_too(monkeypatch: pytest.MonkeyPatch) -> None:
    saved: list[set[str]] = []
    first_started, release = threading.Event(), threading.Event()

    def slow_save(config: Any, pmtu: dict[str, PathMtu], nat: Any) -> None:
        if not saved:
            first_started.set()
            release.wait(5)
        saved.append(set(pmtu))

    monkeypatch.setattr(startup, "save_measurements", slow_save)

    async def scenario() -> None:
        jobs = Jobs()
        jobs.record("hub", 4, 1400, "first", "forward")
        await asyncio.to_thread(first_started.wait, 5)
        jobs.record("cloud1", 4, 1350, "while the first save runs", "forward")
        release.set()
        while not jobs.tasks["save"].done():
            await asyncio.sleep(0.01)

    asyncio.run(scenario())
    assert saved == [{"hub"}, {"hub", "cloud1"}]

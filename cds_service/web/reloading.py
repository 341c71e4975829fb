"""A worker follows the run directory's policy generation (see cds_service.hooks.generations): when a new
one is published, it builds the service from it off the event loop and swaps it in whole; when it cannot,
it keeps the one it has, and says why (log, metrics, its state file)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

from ..hooks.generations import Generation, RunDirectory, WorkerState
from ..hooks.service import CoverageService
from ..observability import metrics

log = logging.getLogger("cds_service.reload")

POLL_SECONDS = 0.2


def _pairs(generation: Generation) -> list[tuple[str, str]]:
    return sorted(generation.versions.items())


class PolicyFollower:
    def __init__(self, run: RunDirectory, generation: Generation, build: Callable[[Generation], CoverageService],
                 swap: Callable[[CoverageService], None]) -> None:
        self.run = run
        self.generation = generation
        self._build = build
        self._swap = swap
        self._signature = run.signature()
        self._attempted = generation.number
        self.pid = os.getpid()

    def started(self) -> None:
        """This worker serves its first generation."""
        metrics.serving(_pairs(self.generation))
        self._report("loaded", None)

    def stopped(self) -> None:
        self.run.leave(self.pid)

    async def poll(self) -> None:
        """Take up a newly published generation, if there is one."""
        signature = self.run.signature()
        if signature == self._signature:
            return
        self._signature = signature
        generation = self.run.current()
        if generation is None or generation.number <= self._attempted:
            return
        await self.adopt(generation)

    async def adopt(self, generation: Generation) -> None:
        self._attempted = generation.number
        try:
            service = await asyncio.to_thread(self._build, generation)
        except Exception as error:  # the published files were checked: this is the worker's own trouble
            reason = f"{type(error).__name__}: {error}"
            log.error("policy generation %d not taken up by worker %d: %s (still serving generation %d)",
                      generation.number, self.pid, reason, self.generation.number)
            metrics.POLICY_RELOADS.labels("refused").inc()
            self._report("refused", reason)
            return
        previous, self.generation = self.generation, generation
        self._swap(service)
        metrics.serving(_pairs(generation), _pairs(previous))
        metrics.POLICY_RELOADS.labels("loaded").inc()
        self._report("loaded", None)
        log.info("worker %d serves policy generation %d: %s", self.pid, generation.number,
                 ", ".join(generation.versions.values()))

    def _report(self, result: str, error: str | None) -> None:
        try:
            self.run.report(WorkerState(self.pid, self.generation.number, dict(self.generation.versions),
                                        self._attempted, result, error))
        except OSError as problem:
            log.error("cannot write this worker's state in %s: %s", self.run.path, problem.strerror)

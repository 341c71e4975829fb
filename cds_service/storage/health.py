"""Is the database there, and at this code's schema? Answered within a time bound even when the database
hangs: at most one check runs at a time, on a thread of its own, and a check still running after the
bound reports the database as unresponsive."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future
from typing import Any

import sqlalchemy as sa

from .background import Background
from .db import engine_for, head_revision, schema_revision

CACHE_SECONDS = 1.0  # a load balancer polling often costs a healthy database one check per second at most


class DatabaseProbe:
    def __init__(self, url: str, connect_timeout: float) -> None:
        self._engine = engine_for(url, connect_timeout, poolclass=sa.pool.NullPool)
        self._thread = Background("cds-database-probe")
        self._running: Future[dict[str, Any]] | None = None
        self._last: tuple[float, dict[str, Any]] | None = None

    def _check(self) -> dict[str, Any]:
        expected = head_revision()
        try:
            with self._engine.connect() as connection:
                revision = schema_revision(connection)
        except Exception as error:  # any failure to connect or query: the database is not usable
            return {"state": "down", "error": type(error).__name__, "expected_schema": expected}
        state = "up" if revision == expected else "not-migrated"
        return {"state": state, "schema": revision, "expected_schema": expected}

    async def state(self, timeout: float) -> dict[str, Any]:
        """``{"state": "up" | "not-migrated" | "down" | "unresponsive", ...}`` within ``timeout`` seconds."""
        now = time.monotonic()
        if self._last is not None and now - self._last[0] < CACHE_SECONDS:
            return self._last[1]
        if self._running is None or self._running.done():
            self._running = self._thread.submit(self._check)
        try:
            result = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._running)), timeout)
        except TimeoutError:
            return {"state": "unresponsive", "expected_schema": head_revision()}
        if result["state"] == "up":  # a fault is reported again at once, and so is the recovery from it
            self._last = (time.monotonic(), result)
        return result

    def close(self) -> None:
        self._thread.close()
        self._engine.dispose()

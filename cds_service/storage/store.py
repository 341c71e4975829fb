"""The audit log, the feedback store and the JWT replay store, on one database.

Audit and feedback records leave the request path through :meth:`Store.hand_off`, which never waits
for the database: the record is queued for the writer (writer.py), or, when the writer is behind,
appended to the local spool (spool.py) within ``HANDOFF_SECONDS``. The writer stores records
idempotently (audit_db.py; each record has a unique key), and isolates a record the database refuses instead of failing
its batch. ``close()`` (on graceful shutdown, e.g. SIGTERM under uvicorn) flushes what is queued to
the database, or to the spool when the database does not take it in time.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from .audit_db import AuditDatabase
from .background import Background
from .health import DatabaseProbe
from .records import AuditRecord, FeedbackRecord, Record
from .spool import DEFAULT_MAX_BYTES, Spool, default_spool_dir
from .tables import card_decision, feedback, hook_audit, jwt_replay
from .writer import AuditWriter, ProcessWriter, ThreadWriter, WriterSettings

__all__ = ["AuditRecord", "FeedbackRecord", "Store"]

log = logging.getLogger("cds_service.storage")

HANDOFF_SECONDS = 1.0  # the longest a request waits to put its record in the spool (a slow disk)
READY_SECONDS = 2.0  # the longest /health/ready waits for the database


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Store:
    """The audit log, feedback and JWT replay store on one database, as the serving process uses them: records
    handed off without waiting for the database (a writer and the spool behind it), readiness, exports,
    retention and the replay check."""

    def __init__(self, url: str, writer: str = "thread", max_queued: int = 64, *,
                 spool_dir: str | Path | None = None, spool_max_bytes: int = DEFAULT_MAX_BYTES,
                 database_timeout: float = 5.0, require_database: bool = True) -> None:
        """``writer``: "thread" (a background thread), "process" (a child process: see writer.py) or
        "none" (records are written only by :meth:`write_records`; no spool). The schema is migrated at
        once. Without ``require_database``, a database that is down or does not answer within
        ``database_timeout`` does not stop the store: the writer migrates the schema once it answers."""
        self.url = url
        self.database_timeout = database_timeout
        self.database = AuditDatabase(url, database_timeout)
        self.engine = self.database.engine
        if require_database:
            self.ensure_schema()
        else:
            self._try_schema()
        self._replay_checks = 0
        self._writer: AuditWriter | None = None
        self.spool: Spool | None = None
        self._probe: DatabaseProbe | None = None
        self._background: Background | None = None
        if writer == "none":
            return
        if writer not in ("thread", "process"):
            raise ValueError(f"unknown audit writer {writer!r}")
        self.spool = Spool(Path(spool_dir) if spool_dir else default_spool_dir(url), spool_max_bytes)
        self._probe = DatabaseProbe(url, database_timeout)
        self._background = Background("cds-audit-handoff")
        if writer == "thread":
            self._writer = ThreadWriter(self.write_records, self.spool, max_queued, database_timeout)
        else:
            settings = WriterSettings(url, str(self.spool.directory), spool_max_bytes, database_timeout)
            self._writer = ProcessWriter(settings, self.spool, max_queued)

    # --- schema -------------------------------------------------------------------------------

    def ensure_schema(self) -> None:
        """Migrate to the newest schema once per store (idempotent; raises when the database is away)."""
        self.database.ensure_schema()

    def _try_schema(self) -> None:
        runner = Background("cds-migrate")
        future = runner.submit(self.ensure_schema)
        runner.close()
        try:
            future.result(timeout=self.database_timeout)
        except TimeoutError:
            log.error("database did not answer within %g s; starting without it (audit records are kept "
                      "in the spool until it does)", self.database_timeout)
        except Exception as error:
            log.error("database unavailable (%s); starting without it (audit records are kept in the spool "
                      "until it is back)", type(error).__name__)

    # --- audit and feedback ---------------------------------------------------------------------

    async def hand_off(self, record: Record) -> None:
        """Give a record to the writer without waiting for the database: queued when the writer keeps up,
        else appended to the spool (waiting at most HANDOFF_SECONDS for the disk; the append goes on)."""
        if self._writer is None or self._background is None:
            raise RuntimeError("this store has no audit writer")
        if self.submit_audit(record):
            return
        future = self._background.submit(self._overflow, record)
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), HANDOFF_SECONDS)
        except TimeoutError:
            log.warning("audit spool slow: the record of %s is still being written", record.describe())

    def submit_audit(self, record: Record) -> bool:
        """Queue a record for the writer without waiting; False when the writer is behind or gone."""
        return self._writer is not None and self._writer.submit(record)

    def _overflow(self, record: Record) -> None:
        assert self.spool is not None and self._writer is not None
        self.spool.append([record])
        self._writer.revive()

    def write_records(self, records: Sequence[Record]) -> list[Record]:
        """Store records now (see :meth:`AuditDatabase.write_records`): what the thread writer and
        ``cds-service audit replay`` call; the refused records are returned."""
        return self.database.write_records(records)

    async def record_feedback(self, service_id: str, entries: Sequence[Mapping[str, Any]],
                              issuer: str | None) -> None:
        """Hand feedback entries (validated by hooks.feedback) to the writer, like audit records."""
        now = _utcnow()
        for e in entries:
            await self.hand_off(FeedbackRecord(now, service_id, e["card"], e["outcome"], e["outcomeTimestamp"],
                                               issuer, dict(e)))

    # --- health -------------------------------------------------------------------------------

    async def readiness(self) -> dict[str, Any]:
        """The database's state (bounded by READY_SECONDS) and the audit backlog: the writer's queue,
        the spool (records, bytes, the oldest record's age) and the records dropped, per reason."""
        if self._probe is None or self.spool is None or self._writer is None or self._background is None:
            raise RuntimeError("this store has no audit writer")
        timeout = min(self.database_timeout, READY_SECONDS)
        database, spool = await asyncio.gather(
            self._probe.state(timeout),
            self._bounded(self._background.submit(self.spool.status), timeout))
        audit: dict[str, Any] = dict(self._writer.state())
        if spool is None:
            audit["spool"] = {"state": "unresponsive"}
        else:
            audit["spool"] = {"records": spool.records, "bytes": spool.bytes, "max_bytes": spool.max_bytes,
                              "oldest_age_seconds": spool.oldest_age_seconds()}
            audit["dropped"] = spool.dropped
        ready = database["state"] == "up"
        return {"status": "ready" if ready else "not-ready", "database": database, "audit": audit}

    def audit_queued(self) -> int | None:
        """Records queued for this process's audit writer now (None: no writer, or not known)."""
        queued = self._writer.state().get("queued") if self._writer is not None else None
        return queued if isinstance(queued, int) and queued >= 0 else None

    @staticmethod
    async def _bounded(future: Future[Any], timeout: float) -> Any:
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), timeout)
        except TimeoutError:
            return None

    def close(self) -> None:
        """Flush every queued record (to the database, or to the spool when it does not take them in
        time) and stop the writer."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        for closing in (self._probe, self._background, self.spool):
            if closing is not None:
                closing.close()
        self.database.close()

    def audit_export(self, since: dt.datetime | None = None) -> Iterator[dict[str, Any]]:
        query = sa.select(hook_audit).order_by(hook_audit.c.id)
        if since is not None:
            query = query.where(hook_audit.c.received_at >= since)
        with self.engine.connect() as connection:
            for row in connection.execute(query):
                item = {str(k): v for k, v in row._mapping.items()}
                item["received_at"] = _iso(item["received_at"])
                yield item

    def audit_prune(self, older_than_days: int) -> int:
        cutoff = _utcnow() - dt.timedelta(days=older_than_days)
        with self.engine.begin() as connection:
            removed = connection.execute(hook_audit.delete().where(hook_audit.c.received_at < cutoff)).rowcount
            connection.execute(card_decision.delete().where(card_decision.c.created_at < cutoff))
            connection.execute(jwt_replay.delete().where(jwt_replay.c.expires_at < _utcnow()))
        return int(removed or 0)

    # --- feedback ---------------------------------------------------------------------------

    def feedback_export(self) -> Iterator[dict[str, Any]]:
        query = (
            sa.select(feedback, card_decision.c.hook_instance, card_decision.c.coverage_assertion_id,
                      card_decision.c.policy_id, card_decision.c.order_reference,
                      card_decision.c.outcome.label("decision_outcome"))
            .select_from(feedback.outerjoin(card_decision, feedback.c.card_uuid == card_decision.c.card_uuid))
            .order_by(feedback.c.id)
        )
        with self.engine.connect() as connection:
            for row in connection.execute(query):
                item = {str(k): v for k, v in row._mapping.items()}
                item["received_at"] = _iso(item["received_at"])
                yield item

    # --- JWT replay -------------------------------------------------------------------------

    def claim_jti(self, issuer: str, jti: str, expires_at: dt.datetime) -> bool:
        """Record a token id; False when it was already seen (a replay). Shared by every process
        and replica using this database."""
        self._replay_checks += 1
        try:
            with self.engine.begin() as connection:
                if self._replay_checks % 500 == 0:
                    connection.execute(jwt_replay.delete().where(jwt_replay.c.expires_at < _utcnow()))
                connection.execute(jwt_replay.insert().values(issuer=issuer, jti=jti, expires_at=expires_at))
            return True
        except sa.exc.IntegrityError:
            with self.engine.begin() as connection:
                row = connection.execute(
                    sa.select(jwt_replay.c.expires_at).where(jwt_replay.c.issuer == issuer, jwt_replay.c.jti == jti)
                ).first()
                if row is not None and _aware(row[0]) < _utcnow():
                    connection.execute(jwt_replay.update().where(
                        jwt_replay.c.issuer == issuer, jwt_replay.c.jti == jti).values(expires_at=expires_at))
                    return True
            return False


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _iso(value: Any) -> Any:
    return _aware(value).isoformat() if isinstance(value, dt.datetime) else value

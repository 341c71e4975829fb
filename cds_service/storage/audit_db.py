"""The database side of the audit: one database's engine, its schema (migrated once), and the idempotent
writing of audit and feedback records. The serving process's :class:`~cds_service.storage.store.Store` holds
one; the audit writer process opens its own from the store's URL (see writer.py)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import sqlalchemy as sa

from .db import engine_for, migrate
from .dtr_contexts import insert_contexts
from .records import AuditRecord, FeedbackRecord, Record
from .tables import card_decision, feedback, hook_audit, insert_new, storable

log = logging.getLogger("cds_service.storage")


class AuditDatabase:
    """One database for the audit: its engine, its schema migrated once, and :meth:`write_records`."""

    def __init__(self, url: str, database_timeout: float = 5.0) -> None:
        self.url = url
        self.database_timeout = database_timeout
        self.engine = engine_for(url, database_timeout)
        self._migrated = False
        self._migrate_lock = threading.Lock()

    def ensure_schema(self) -> None:
        """Migrate to the newest schema once (idempotent; raises when the database is away)."""
        with self._migrate_lock:
            if not self._migrated:
                migrate(self.engine)
                self._migrated = True

    def write_records(self, records: Sequence[Record]) -> list[Record]:
        """Store records now, idempotently (one already stored is skipped). A record the database refuses
        (a value it cannot hold) does not fail the others: the batch is retried one record at a time, and
        the refused ones are returned. Raises when the database is unavailable."""
        if not records:
            return []
        self.ensure_schema()
        try:
            self._insert(records)
            return []
        except (sa.exc.DataError, sa.exc.IntegrityError):
            pass
        except sa.exc.ProgrammingError:
            self._migrated = False  # e.g. the tables were dropped: migrate again on the next attempt
            raise
        rejected = []
        for record in records:
            try:
                self._insert([record])
            except (sa.exc.DataError, sa.exc.IntegrityError) as error:
                log.error("audit database refused %s: %s", record.describe(), type(error).__name__)
                rejected.append(record)
        return rejected

    def _insert(self, records: Sequence[Record]) -> None:
        audits = [r for r in records if isinstance(r, AuditRecord)]
        entries = [r for r in records if isinstance(r, FeedbackRecord)]
        with self.engine.begin() as connection:
            if audits:
                connection.execute(insert_new(connection, hook_audit, "record_key"), [storable(hook_audit, {
                    "received_at": r.received_at, "service_id": r.service_id, "hook": r.hook,
                    "hook_instance": r.hook_instance, "issuer": r.issuer, "patient_id": r.patient_id,
                    "status_code": r.status_code, "latency_ms": r.latency_ms, "orders": r.orders,
                    "decisions": r.decisions, "response": r.response, "request": r.request, "record_key": r.key,
                    "crd_version": r.crd_version,
                }) for r in audits])
                cards = [storable(card_decision, dict(c)) for r in audits for c in r.cards]
                if cards:
                    connection.execute(insert_new(connection, card_decision, "card_uuid"), cards)
                contexts = [c for r in audits for c in r.dtr_contexts]
                if contexts:
                    insert_contexts(connection, contexts)
            if entries:
                connection.execute(insert_new(connection, feedback, "record_key"), [storable(feedback, {
                    "received_at": e.received_at, "service_id": e.service_id, "card_uuid": e.card_uuid,
                    "outcome": e.outcome, "outcome_timestamp": e.outcome_timestamp, "issuer": e.issuer,
                    "entry": e.entry, "record_key": e.key,
                }) for e in entries])

    def close(self) -> None:
        self.engine.dispose()

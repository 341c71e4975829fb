"""The audit log, the feedback store and the JWT replay store, on one database.

Audit records are written off the request path by a writer (writer.py), in batches; ``close()``
(called on graceful shutdown, e.g. SIGTERM under uvicorn) flushes everything still queued, so no
record of an answered request is lost on a graceful stop.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from .db import engine_for, migrate
from .tables import card_decision, feedback, hook_audit, jwt_replay
from .writer import AuditWriter, ProcessWriter, ThreadWriter

log = logging.getLogger("cds_service.storage")


@dataclass
class AuditRecord:
    """One hook call. The JSON documents (orders, decisions, response, request) may be given already
    serialised as bytes, which keeps queued records compact."""

    received_at: dt.datetime
    service_id: str
    hook: str | None
    hook_instance: str | None
    issuer: str | None
    patient_id: str | None
    status_code: int
    latency_ms: float
    orders: Any
    decisions: Any
    response: Any
    request: Any
    cards: Sequence[Mapping[str, Any]] = ()
    #: the Da Vinci CRD version the answer followed ("2.0.1", "2.2.1"); None when no answer was made
    #: (not stored yet: needs a hook_audit column)
    crd_version: str | None = None


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Store:
    def __init__(self, url: str, writer: str = "thread", max_queued: int = 64) -> None:
        """``writer``: "thread" (a background thread), "process" (a child process: see writer.py) or
        "none" (records are written only by :meth:`write_audit`)."""
        self.url = url
        self.engine = engine_for(url)
        migrate(self.engine)
        self._replay_checks = 0
        self._writer: AuditWriter | None = None
        if writer == "thread":
            self._writer = ThreadWriter(self.write_audit, max_queued)
        elif writer == "process":
            self._writer = ProcessWriter(url, max_queued)
        elif writer != "none":
            raise ValueError(f"unknown audit writer {writer!r}")

    # --- audit ------------------------------------------------------------------------------

    def submit_audit(self, record: AuditRecord) -> bool:
        """Queue an audit record for the writer, which makes it durable shortly after. False when the
        queue is full (or there is no writer): the caller must then write it itself with
        :meth:`write_audit` (backpressure keeps memory bounded and nothing is dropped)."""
        return self._writer is not None and self._writer.submit(record)

    def write_audit(self, records: Sequence[AuditRecord]) -> None:
        """Write audit records now, in one transaction."""
        if not records:
            return
        rows = [{
            "received_at": r.received_at, "service_id": r.service_id, "hook": r.hook,
            "hook_instance": r.hook_instance, "issuer": r.issuer, "patient_id": r.patient_id,
            "status_code": r.status_code, "latency_ms": r.latency_ms, "orders": r.orders,
            "decisions": r.decisions, "response": r.response, "request": r.request,
        } for r in records]
        cards = [dict(c) for r in records for c in r.cards]
        with self.engine.begin() as connection:
            connection.execute(hook_audit.insert(), rows)
            if cards:
                connection.execute(card_decision.insert(), cards)

    def close(self) -> None:
        """Flush every queued audit record and stop the writer."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        self.engine.dispose()

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

    def audit_count(self) -> int:
        with self.engine.connect() as connection:
            return int(connection.execute(sa.select(sa.func.count()).select_from(hook_audit)).scalar_one())

    # --- feedback ---------------------------------------------------------------------------

    def record_feedback(self, service_id: str, entries: Sequence[Mapping[str, Any]], issuer: str | None) -> None:
        now = _utcnow()
        rows = [{
            "received_at": now, "service_id": service_id, "card_uuid": e["card"], "outcome": e["outcome"],
            "outcome_timestamp": e["outcomeTimestamp"], "issuer": issuer, "entry": dict(e),
        } for e in entries]
        with self.engine.begin() as connection:
            connection.execute(feedback.insert(), rows)

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

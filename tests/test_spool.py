"""The audit spool and what the store does with it: records kept on local disk while the database cannot
take them, replayed in order and once, the request path never waiting for the database, readiness and
``cds-service audit status`` / ``replay``. On SQLite always, and PostgreSQL too when CDS_TEST_POSTGRES_URL
is set; a database that is away is a port nothing listens on, one that hangs a socket that never answers."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from starlette.testclient import TestClient

from cds_service.config import ConfigError, parse_config
from cds_service.hooks import feedback as feedback_rules
from cds_service.hooks import request as request_rules
from cds_service.storage import health
from cds_service.storage.db import _alembic_config, engine_for
from cds_service.storage.records import AuditRecord, FeedbackRecord, Record, decode, encode
from cds_service.storage.spool import MAGIC, SPOOL_FULL, Spool, default_spool_dir
from cds_service.storage.store import Store
from cds_service.storage.tables import card_decision, feedback, hook_audit
from cds_service.web.app import create_app

from .serverproc import free_port
from .support import FIXTURES, cli, load, make_config, scenario_request, write_config

SIGN = "/cds-services/coverage-requirements-order-sign"
KETAMINE = load(FIXTURES / "scenarios/mp446-ketamine-iv-chronic-pain.json")
T0 = dt.datetime(2026, 6, 1, 10, 0, tzinfo=dt.UTC)


def record(n: int, **fields: object) -> AuditRecord:
    values: dict[str, object] = {
        "received_at": T0 + dt.timedelta(seconds=n), "service_id": "coverage-requirements-order-sign",
        "hook": "order-sign", "hook_instance": f"hook-{n}", "issuer": None, "patient_id": "p1",
        "status_code": 200, "latency_ms": 1.5, "orders": b'["MedicationRequest/ket"]', "decisions": b"[]",
        "response": b'{"cards":[]}', "request": b'{"hook": "order-sign",  "n": ' + str(n).encode() + b"}",
        "cards": [{"card_uuid": f"card-{n}", "hook_instance": f"hook-{n}", "coverage_assertion_id": f"a-{n}",
                   "policy_id": "MP-446", "order_reference": "MedicationRequest/ket", "outcome": "not-covered",
                   "created_at": T0}],
        "crd_version": "2.2.1",
    }
    values.update(fields)
    return AuditRecord(**values)  # type: ignore[arg-type]


def absent_database() -> str:
    """A PostgreSQL URL on which nothing listens: the database is down."""
    return f"postgresql://cds@127.0.0.1:{free_port()}/cds"


@pytest.fixture
def hung_database() -> Iterator[str]:
    """A PostgreSQL URL whose server accepts connections and never answers: the database hangs."""
    with socket.create_server(("127.0.0.1", 0), backlog=64) as listener:
        yield f"postgresql://cds@127.0.0.1:{listener.getsockname()[1]}/cds"


def instances(store: Store) -> list[str]:
    return [r["hook_instance"] for r in store.audit_export()]


# --- the spool itself -------------------------------------------------------------------------------


def test_records_come_back_in_order_as_they_were_handed_over(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", segment_bytes=1024)  # a few records per segment
    entry = FeedbackRecord(T0, "svc", "card-1", "overridden", "2026-06-01T10:00:00Z", None, b'{"card": "card-1"}')
    spooled: list[Record] = [record(n) for n in range(20)] + [entry]
    for start in range(0, len(spooled), 3):
        assert spool.append(spooled[start:start + 3]) == []
    assert len(list((tmp_path / "spool").glob("*.seg"))) > 2
    back: list[Record] = []
    while (chunk := spool.read(max_records=3)) is not None:
        back += chunk.records
        spool.advance(chunk.end)
    assert back == spooled  # every field, the documents byte for byte
    assert not spool.has_backlog() and not list((tmp_path / "spool").glob("*.seg"))
    back_as_bytes = decode(encode(record(1, orders=["MedicationRequest/ket"], response=None)))
    assert isinstance(back_as_bytes, AuditRecord)
    assert back_as_bytes.orders == b'["MedicationRequest/ket"]' and back_as_bytes.response is None


def test_a_full_spool_refuses_counts_and_logs_each_record(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="cds_service.audit")
    big = [record(n, request=json.dumps({"n": n, "noise": os.urandom(3000).hex()}).encode()) for n in range(40)]
    spool = Spool(tmp_path / "spool", max_bytes=65536)
    refused = spool.append(big)
    status = spool.status()
    assert refused and refused == big[len(big) - len(refused):]  # the ones that did not fit, in order
    assert status.records == len(big) - len(refused) and status.bytes <= 65536
    assert status.dropped == {SPOOL_FULL: len(refused)} and spool.dropped[SPOOL_FULL] == len(refused)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "cds_service.audit"]
    assert [line["hookInstance"] for line in lines] == [r.describe()["hookInstance"] for r in refused]
    assert {line["reason"] for line in lines} == {SPOOL_FULL}
    assert all(dt.datetime.fromisoformat(line["timestamp"]).tzinfo for line in lines)


def test_bytes_that_are_not_a_record_are_set_aside_and_counted(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.append([record(1)])
    segment = next((tmp_path / "spool").glob("*.seg"))
    with segment.open("ab") as f:
        f.write(MAGIC + b"torn by a crash")
    spool.append([record(2)])
    back = []
    while (chunk := spool.read()) is not None:
        back += [r.describe()["hookInstance"] for r in chunk.records]
        spool.advance(chunk.end)
    assert back == ["hook-1", "hook-2"]
    assert spool.status().dropped == {"corrupt_spool_frame": 1}
    assert [p.read_bytes() for p in (tmp_path / "spool").glob("corrupt-*.bin")] == [MAGIC + b"torn by a crash"]


def test_an_unwritable_spool_counts_its_drops(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    spool = Spool(tmp_path / "file" / "spool")
    lost = record(1)
    assert spool.append([lost]) == [lost]
    assert spool.dropped == {"spool_unwritable": 1}


def test_the_default_spool_lies_beside_the_sqlite_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert default_spool_dir(f"sqlite:///{tmp_path}/data/cds.sqlite3") == tmp_path / "data" / "cds-audit-spool"
    assert default_spool_dir("sqlite:///cds-service.sqlite3") == tmp_path / "cds-service-audit-spool"
    assert default_spool_dir("postgresql://cds@db:5432/cds") == tmp_path / "cds-service-audit-spool"


# --- the store and its writer -----------------------------------------------------------------------


def test_a_record_written_twice_is_stored_once(storage_url: str) -> None:
    store = Store(storage_url, writer="none")
    entry = FeedbackRecord(T0, "svc", "card-1", "overridden", "2026-06-01T10:00:00Z", None, {"card": "card-1"})
    try:
        batch: list[Record] = [record(1), record(2), entry]
        assert store.write_records(batch) == []
        assert store.write_records([*batch, record(3)]) == []  # a replay after an unknown outcome
        with store.engine.connect() as connection:
            counts = [connection.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()
                      for t in (hook_audit, card_decision, feedback)]
    finally:
        store.close()
    assert counts == [3, 3, 1]


def test_a_record_the_database_refuses_does_not_fail_its_batch(storage_url: str, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="cds_service.audit")
    bad = record(3, service_id=None)  # a value no database takes (NOT NULL)
    store = Store(storage_url, writer="thread", spool_dir=tmp_path / "spool")
    asyncio.run(_hand_off(store, [record(1), record(2), bad, record(4), record(5)]))
    store.close()
    check = Store(storage_url, writer="none")
    try:
        assert sorted(instances(check)) == ["hook-1", "hook-2", "hook-4", "hook-5"]
    finally:
        check.close()
    spool = Spool(tmp_path / "spool")
    assert spool.status().dropped == {"rejected_by_database": 1}
    assert [json.loads(r.getMessage())["hookInstance"] for r in caplog.records if r.name == "cds_service.audit"] \
        == ["hook-3"]
    assert (tmp_path / "spool" / "rejected.seg").stat().st_size > 0  # kept for inspection


async def _hand_off(store: Store, records: list[AuditRecord]) -> None:
    for r in records:
        await store.hand_off(r)


def test_the_spool_is_replayed_first_and_in_order(storage_url: str, tmp_path: Path) -> None:
    Spool(tmp_path / "spool").append([record(n) for n in range(5)])  # left by a previous run
    store = Store(storage_url, writer="thread", spool_dir=tmp_path / "spool")
    asyncio.run(_hand_off(store, [record(n) for n in range(5, 8)]))
    store.close()
    check = Store(storage_url, writer="none")
    try:
        assert instances(check) == [f"hook-{n}" for n in range(8)]  # in id order
    finally:
        check.close()
    assert Spool(tmp_path / "spool").status().records == 0


def test_handing_over_never_waits_for_a_hung_database(hung_database: str, tmp_path: Path) -> None:
    store = Store(hung_database, writer="thread", max_queued=4, spool_dir=tmp_path / "spool", database_timeout=0.5,
                  require_database=False)

    async def hand_off_timed() -> list[float]:
        took = []
        for n in range(40):  # more than the queue holds, while the writer waits on the database
            started = time.perf_counter()
            await store.hand_off(record(n))
            took.append(time.perf_counter() - started)
        return took

    try:
        took = asyncio.run(hand_off_timed())
    finally:
        store.close()
    assert max(took) < 0.5
    status = Spool(tmp_path / "spool").status()
    assert status.records == 40 and not status.dropped  # every record kept


def test_a_dead_writer_process_is_replaced_and_loses_nothing(sqlite_url: str, tmp_path: Path) -> None:
    store = Store(sqlite_url, writer="process", spool_dir=tmp_path / "spool")
    process = store._writer._process  # type: ignore[union-attr]
    os.kill(process.pid, signal.SIGKILL)
    process.join(10)
    asyncio.run(_hand_off(store, [record(n) for n in range(5)]))
    store.close()
    check = Store(sqlite_url, writer="none")
    try:
        assert sorted(instances(check)) == [f"hook-{n}" for n in range(5)]
    finally:
        check.close()


# --- readiness -----------------------------------------------------------------------------------------


def test_ready_when_the_database_is_up_and_migrated(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(health, "CACHE_SECONDS", 0.0)
    with TestClient(create_app(make_config(sqlite_url))) as client:
        client.post(SIGN, json=scenario_request(KETAMINE))
        ready = client.get("/health/ready")
        store = client.app.state.cds.store  # type: ignore[attr-defined]
        with store.engine.begin() as connection:
            connection.execute(sa.text("DROP TABLE alembic_version"))
        unmigrated = client.get("/health/ready")
        alive = client.get("/health")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready" and body["database"] == {"state": "up", "schema": "0004",
                                                               "expected_schema": "0004"}
    assert body["audit"]["spool"] == {"records": 0, "bytes": 0, "max_bytes": 1 << 30, "oldest_age_seconds": None}
    assert body["audit"]["dropped"] == {} and body["audit"]["running"]
    assert unmigrated.status_code == 503 and unmigrated.json()["database"]["state"] == "not-migrated"
    assert alive.status_code == 200


def test_not_ready_while_the_database_is_down_or_hangs(hung_database: str, tmp_path: Path) -> None:
    for url in (absent_database(), hung_database):
        config = make_config(url)
        config.storage.spool_dir = str(tmp_path / "spool")
        config.storage.database_timeout_seconds = 0.5
        with TestClient(create_app(config)) as client:
            started = time.perf_counter()
            ready = client.get("/health/ready")
            took = time.perf_counter() - started
            alive = client.get("/health")
            hook = client.post(SIGN, json=scenario_request(KETAMINE))
        assert ready.status_code == 503 and took < 3
        assert ready.json()["database"]["state"] == ("down" if url != hung_database else "unresponsive")
        assert alive.status_code == 200 and hook.status_code == 200


# --- length limits (the edge refuses; refused calls are stored cut to their columns) --------------------


def length(column: sa.Column[str]) -> int | None:
    return getattr(column.type, "length", None)


def test_edge_limits_are_the_columns_lengths() -> None:
    columns = {"hookInstance": length(hook_audit.c.hook_instance), "context.patientId": length(hook_audit.c.patient_id)}
    assert columns == request_rules.STORED_LENGTHS
    assert length(card_decision.c.hook_instance) == length(hook_audit.c.hook_instance)
    columns = {"card": length(feedback.c.card_uuid), "outcomeTimestamp": length(feedback.c.outcome_timestamp)}
    assert columns == feedback_rules.STORED_LENGTHS


def test_values_longer_than_the_audit_keeps_are_refused_and_the_refusal_is_audited(storage_url: str) -> None:
    at_limit = scenario_request(KETAMINE)
    at_limit["hookInstance"] = "h" * 200
    at_limit["context"]["patientId"] = "p" * 200
    long_instance = {**scenario_request(KETAMINE), "hookInstance": "h" * 5000}
    long_patient = scenario_request(KETAMINE)
    long_patient["context"]["patientId"] = "p" * 201
    wrong_hook = {**scenario_request(KETAMINE), "hook": "x" * 5000}
    nul = {**scenario_request(KETAMINE), "hookInstance": "a\x00b"}
    feedback_ok = {"card": "c" * 64, "outcome": "overridden", "outcomeTimestamp": "2026-06-01T10:00:00Z"}
    with TestClient(create_app(make_config(storage_url))) as client:
        answers = [client.post(SIGN, json=body) for body in (at_limit, long_instance, long_patient, wrong_hook, nul)]
        feedback_answers = [client.post(f"{SIGN}/feedback", json={"feedback": [entry]}) for entry in (
            feedback_ok, {**feedback_ok, "card": "c" * 65},
            {**feedback_ok, "outcomeTimestamp": "2026-06-01T10:00:00." + "1" * 80 + "Z"})]
        store = client.app.state.cds.store  # type: ignore[attr-defined]
    assert [a.status_code for a in answers] == [200, 400, 400, 400, 200]
    assert "hookInstance is longer than 200" in answers[1].text
    assert "context.patientId is longer than 200" in answers[2].text
    assert [a.status_code for a in feedback_answers] == [200, 400, 400]
    assert "feedback[0].card is longer than 64" in feedback_answers[1].text
    assert "feedback[0].outcomeTimestamp is longer than 64" in feedback_answers[2].text
    rows = list(store.audit_export())
    assert [r["status_code"] for r in rows] == [200, 400, 400, 400, 200]  # every call has its record
    assert rows[0]["hook_instance"] == "h" * 200 and rows[0]["patient_id"] == "p" * 200  # stored as sent
    assert rows[1]["hook_instance"] == "h" * 200 and rows[1]["request"]["hookInstance"] == "h" * 5000
    assert rows[3]["hook"] == "x" * 50 and rows[3]["request"]["hook"] == "x" * 5000
    assert rows[4]["hook_instance"] == "a\ufffdb" and rows[4]["request"]["hookInstance"] == "a\x00b"
    assert [r["card_uuid"] for r in store.feedback_export()] == ["c" * 64]


# --- schema migration -----------------------------------------------------------------------------------


def test_rows_written_before_record_keys_get_legacy_keys(storage_url: str) -> None:
    engine = engine_for(storage_url)
    config = _alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
        connection.execute(sa.text(
            "INSERT INTO hook_audit (received_at, service_id, status_code, latency_ms) VALUES (:t, 'svc', 200, 1)"),
            {"t": T0})
    engine.dispose()
    store = Store(storage_url, writer="none")
    new = record(1)
    try:
        assert store.write_records([new]) == []
        keys = [r["record_key"] for r in store.audit_export()]
    finally:
        store.close()
    assert keys == ["legacy-1", new.key]


# --- the command line -----------------------------------------------------------------------------------


def test_audit_status_and_replay_of_a_spool_from_another_host(sqlite_url: str, tmp_path: Path) -> None:
    config = write_config(tmp_path, sqlite_url, f'spool_dir = "{tmp_path / "spool"}"\n')
    moved = tmp_path / "from-host-b"
    Spool(moved).append([record(n) for n in range(3)])
    status = cli("audit", "status", "--spool", str(moved), "--config", str(config))
    assert status.returncode == 0, status.stderr
    assert "records waiting: 3" in status.stdout and "dropped: 0 (none)" in status.stdout
    age = float(status.stdout.split("oldest record age: ")[1].split(" s")[0])
    assert age == pytest.approx((dt.datetime.now(dt.UTC) - T0).total_seconds(), abs=60)
    held = Spool(moved)
    assert held.acquire_replay()  # a service on this host is replaying it
    refused = cli("audit", "replay", "--spool", str(moved), "--config", str(config))
    held.close()
    replayed = cli("audit", "replay", "--spool", str(moved), "--config", str(config))
    store = Store(sqlite_url, writer="none")
    try:
        stored = instances(store)
    finally:
        store.close()
    assert refused.returncode == 1 and "a running service is replaying" in refused.stderr
    assert replayed.returncode == 0 and "replayed 3 records" in replayed.stderr
    assert not Spool(moved).has_backlog()
    assert stored == ["hook-0", "hook-1", "hook-2"]


def test_spool_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="spool_max_bytes"):
        parse_config({"storage": {"spool_max_bytes": 1024}}, "test")
    with pytest.raises(ConfigError, match="database_timeout_seconds"):
        parse_config({"storage": {"database_timeout_seconds": 0}}, "test")
    assert parse_config({"storage": {"spool_dir": "/var/lib/cds/spool"}}, "test").storage.spool_dir == \
        "/var/lib/cds/spool"

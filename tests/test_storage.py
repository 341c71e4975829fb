"""The audit log, the feedback store and the JWT replay store, on SQLite and (when
CDS_TEST_POSTGRES_URL is set) PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path

import httpx
import sqlalchemy as sa
from starlette.testclient import TestClient

from cds_service.storage.store import AuditRecord, Store
from cds_service.web.app import create_app

from .serverproc import ServerProcess
from .support import ES, FIXTURES, ISS, cli, load, make_config, scenario_request, write_config

SIGN = "/cds-services/coverage-requirements-order-sign"
KETAMINE = load(FIXTURES / "scenarios/mp446-ketamine-iv-chronic-pain.json")


def test_every_hook_call_is_audited(storage_url: str) -> None:
    with TestClient(create_app(make_config(storage_url))) as client:
        body = scenario_request(KETAMINE)
        body["fhirServer"] = "https://ehr.example.org/fhir"
        body["fhirAuthorization"] = {"access_token": "tok-123", "token_type": "Bearer", "scope": "patient/*.read"}
        ok = client.post(SIGN, json=body)
        bad = client.post(SIGN, json={"hook": "order-sign"})
        store = client.app.state.cds.store  # type: ignore[attr-defined]
    assert ok.status_code == 200 and bad.status_code == 400
    records = list(store.audit_export())
    assert [r["status_code"] for r in records] == [200, 400]
    first = records[0]
    assert first["service_id"] == "coverage-requirements-order-sign"
    assert first["hook_instance"] == body["hookInstance"] and first["patient_id"] == "p1"
    assert first["orders"] == ["MedicationRequest/ket"]
    decision = first["decisions"][0]
    assert (decision["policy"], decision["outcome"], decision["rule"]) == ("MP-446", "not-covered", "chronic-pain")
    assert decision["evidence"] and decision["clause"]
    assert first["response"] == ok.json()
    assert first["crd_version"] == "2.0.1" and records[1]["crd_version"] is None  # the 400 followed none
    assert first["latency_ms"] > 0
    assert "access_token" not in first["request"]["fhirAuthorization"]
    assert first["request"]["fhirAuthorization"]["scope"] == "patient/*.read"
    assert "tok-123" not in json.dumps(records)


def test_feedback_is_linked_to_the_card_and_its_decision(storage_url: str) -> None:
    with TestClient(create_app(make_config(storage_url))) as client:
        response = client.post(SIGN, json=scenario_request(KETAMINE)).json()
        card = response["cards"][0]
        assertion = response["systemActions"][0]["resource"]["extension"][0]["extension"][-1]["valueString"]
        feedback = {"feedback": [{"card": card["uuid"], "outcome": "overridden",
                                  "outcomeTimestamp": "2026-06-01T10:00:00Z",
                                  "overrideReason": {"reason": {"code": "alt", "system": "http://example.org"},
                                                     "userComment": "will appeal"}}]}
        assert client.post(f"{SIGN}/feedback", json=feedback).status_code == 200
        store = client.app.state.cds.store  # type: ignore[attr-defined]
    rows = list(store.feedback_export())
    assert len(rows) == 1
    row = rows[0]
    assert row["card_uuid"] == card["uuid"] and row["outcome"] == "overridden"
    assert row["coverage_assertion_id"] == assertion
    assert row["policy_id"] == "MP-446" and row["decision_outcome"] == "not-covered"
    assert row["entry"]["overrideReason"]["userComment"] == "will appeal"


def test_schema_is_migrated_once_and_versioned(storage_url: str) -> None:
    Store(storage_url).close()
    store = Store(storage_url)  # idempotent on an existing database
    with store.engine.connect() as connection:
        version = connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one()
    store.close()
    assert version == "0004"


def test_replay_store_claims_each_jti_once(storage_url: str) -> None:
    store = Store(storage_url)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
    try:
        assert store.claim_jti(ISS, "jti-1", later)
        assert not store.claim_jti(ISS, "jti-1", later)
        assert store.claim_jti("https://other.example", "jti-1", later)
        past = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        assert store.claim_jti(ISS, "jti-2", past)
        assert store.claim_jti(ISS, "jti-2", later)  # an expired claim no longer blocks the id
    finally:
        store.close()


async def _concurrent_posts(url: str, n: int) -> list[int]:
    async with httpx.AsyncClient(timeout=30) as client:
        responses = await asyncio.gather(*(client.post(url + SIGN, json=scenario_request(KETAMINE)) for _ in range(n)))
    return [r.status_code for r in responses]


def test_no_audit_record_is_lost_on_sigterm(storage_url: str, tmp_path: Path) -> None:
    config = write_config(tmp_path, storage_url)
    server = ServerProcess(config)
    try:
        statuses = asyncio.run(_concurrent_posts(server.url, 60))
    finally:
        code = server.stop()
    assert statuses == [200] * 60
    assert code == 0
    assert "Traceback" not in server.log.read_text()
    store = Store(storage_url)
    try:
        assert len(list(store.audit_export())) == 60
    finally:
        store.close()


def toml_inline(value: object) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_inline(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(toml_inline(v) for v in value) + "]"
    return json.dumps(value)


def test_two_servers_share_audit_and_replay_store(storage_url: str, tmp_path: Path) -> None:
    jwks = toml_inline({"keys": [ES.jwk]})
    auth = (f'[auth]\nmode = "jwt"\n[[auth.issuers]]\niss = "{ISS}"\njwks = {jwks}\n'
            '[service]\npublic_base_url = "https://cds.example.org"\n')
    config = write_config(tmp_path, storage_url, auth)
    aud = "https://cds.example.org" + SIGN
    with ServerProcess(config) as a, ServerProcess(config) as b:
        token = ES.token(aud=aud)
        headers = {"Authorization": f"Bearer {token}"}
        assert httpx.post(a.url + SIGN, json=scenario_request(KETAMINE), headers=headers).status_code == 200
        assert httpx.post(b.url + SIGN, json=scenario_request(KETAMINE), headers=headers).status_code == 401
        other = {"Authorization": f"Bearer {ES.token(aud=aud)}"}
        assert httpx.post(b.url + SIGN, json=scenario_request(KETAMINE), headers=other).status_code == 200
    store = Store(storage_url)
    try:
        records = list(store.audit_export())
    finally:
        store.close()
    assert len(records) == 2 and {r["issuer"] for r in records} == {ISS}


def test_cli_export_and_prune(storage_url: str, tmp_path: Path) -> None:
    config = write_config(tmp_path, storage_url)
    with TestClient(create_app(make_config(storage_url))) as client:
        card = client.post(SIGN, json=scenario_request(KETAMINE)).json()["cards"][0]
        client.post(f"{SIGN}/feedback", json={"feedback": [{"card": card["uuid"], "outcome": "overridden",
                                                           "outcomeTimestamp": "2026-06-01T10:00:00Z"}]})
    store = Store(storage_url)
    with store.engine.begin() as connection:
        connection.execute(sa.text("UPDATE hook_audit SET received_at = :old"),
                           {"old": dt.datetime(2020, 1, 1, tzinfo=dt.UTC)})
    store.close()
    client2 = TestClient(create_app(make_config(storage_url)))
    with client2:
        client2.post(SIGN, json=scenario_request(KETAMINE))
    exported = cli("audit", "export", "--config", str(config))
    assert exported.returncode == 0, exported.stderr
    assert len(exported.stdout.splitlines()) == 2
    recent = cli("audit", "export", "--since", "2025-01-01", "--config", str(config))
    assert len(recent.stdout.splitlines()) == 1
    assert json.loads(recent.stdout)["decisions"][0]["policy"] == "MP-446"
    feedback = cli("feedback", "export", "--config", str(config))
    assert json.loads(feedback.stdout)["card_uuid"] == card["uuid"]
    pruned = cli("audit", "prune", "--older-than", "365", "--config", str(config))
    assert pruned.returncode == 0 and "removed 1" in pruned.stderr
    assert len(cli("audit", "export", "--config", str(config)).stdout.splitlines()) == 1


def test_process_writer_flushes_everything_on_close(storage_url: str, tmp_path: Path) -> None:
    store = Store(storage_url, writer="process", max_queued=8, spool_dir=tmp_path / "spool")

    async def hand_off_all() -> None:
        for _ in range(100):
            await store.hand_off(AuditRecord(dt.datetime.now(dt.UTC), "svc", "order-sign", "h", None, "p1", 200,
                                             1.0, ["X/1"], b"[]", b'{"cards":[]}', b'{"hook":"order-sign"}'))

    asyncio.run(hand_off_all())
    store.close()
    check = Store(storage_url, writer="none")
    try:
        assert len(list(check.audit_export())) == 100
        assert next(check.audit_export())["response"] == {"cards": []}
    finally:
        check.close()

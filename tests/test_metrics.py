"""GET /metrics: every family moves as requests are made, labels stay bounded, and who may read it."""

from __future__ import annotations

import ast
import asyncio
import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from starlette.testclient import TestClient

import cds_service.auth
from cds_service.config import Config, ConfigError, IssuerSettings, MetricsSettings, StorageSettings, parse_config
from cds_service.observability.labels import AUTH_REFUSALS, OTHER, auth_refusal_label
from cds_service.storage.records import AuditRecord
from cds_service.storage.spool import SPOOL_FULL
from cds_service.web.app import create_app

from .support import FIXTURES, load, make_config, samples, scenario_request

SIGN = "/cds-services/coverage-requirements-order-sign"
KETAMINE = load(FIXTURES / "scenarios/mp446-ketamine-iv-chronic-pain.json")
LOCAL = ("127.0.0.1", 40000)
FHIR = "https://ehr.example.org/fhir"


def value(client: TestClient, name: str, **labels: str) -> float:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return samples(response.text).get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def local(sqlite_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(make_config(sqlite_url)), client=LOCAL, raise_server_exceptions=False) as client:
        yield client


def test_hook_calls_latency_and_decisions_move(local: TestClient) -> None:
    labels = {"service": "coverage-requirements-order-sign", "status": "200"}
    before = (value(local, "cds_hook_calls_total", **labels),
              value(local, "cds_hook_latency_seconds_count", service=labels["service"]),
              value(local, "cds_decisions_total", policy="MP-446", outcome="not-covered", rule="chronic-pain"))
    for _ in range(3):
        assert local.post(SIGN, json=scenario_request(KETAMINE)).status_code == 200
    assert local.post(SIGN, content=b"{").status_code == 400
    after = (value(local, "cds_hook_calls_total", **labels),
             value(local, "cds_hook_latency_seconds_count", service=labels["service"]),
             value(local, "cds_decisions_total", policy="MP-446", outcome="not-covered", rule="chronic-pain"))
    assert after[0] - before[0] == 3 and after[1] - before[1] == 4 and after[2] - before[2] == 3
    assert value(local, "cds_hook_calls_total", service=labels["service"], status="400") >= 1


def test_labels_are_bounded(local: TestClient) -> None:
    body = scenario_request(KETAMINE)
    body["hookInstance"] = "hook-instance-that-must-not-be-a-label"
    body["context"]["patientId"] = "patient-that-must-not-be-a-label"
    local.post(SIGN, json=body)
    local.post("/cds-services/free-text-of-the-caller", json=body)
    text = local.get("/metrics").text
    assert "must-not-be-a-label" not in text and "free-text-of-the-caller" not in text
    assert value(local, "cds_hook_calls_total", service="unknown", status="404") >= 1


def test_fhir_reads_by_outcome_and_latency(local: TestClient) -> None:
    outcomes = {"ok": httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset", "entry": []}),
                "4xx": httpx.Response(403), "5xx": httpx.Response(503),
                "too_large": httpx.Response(200, headers={"content-length": str(64 << 20)}, content=b"")}
    for outcome, answer in outcomes.items():
        body = scenario_request(KETAMINE)
        body["prefetch"].pop("conditions")
        body["fhirServer"] = FHIR
        body["fhirAuthorization"] = {"access_token": "t0ken", "token_type": "Bearer", "scope": "patient/*.read",
                                     "subject": "cds", "expires_in": 300}
        before = (value(local, "cds_fhir_reads_total", outcome=outcome),
                  value(local, "cds_fhir_read_latency_seconds_count", outcome=outcome))
        with respx.mock(assert_all_called=True) as router:
            router.get(url__startswith=FHIR).mock(return_value=answer)
            assert local.post(SIGN, json=body).status_code == 200
        after = (value(local, "cds_fhir_reads_total", outcome=outcome),
                 value(local, "cds_fhir_read_latency_seconds_count", outcome=outcome))
        assert after[0] - before[0] == 1 and after[1] - before[1] == 1, outcome


def test_fhir_read_timeout_is_counted(sqlite_url: str) -> None:
    config = make_config(sqlite_url)
    config.fhir.timeout_seconds = 0.2

    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(2)
        return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset"})

    body = scenario_request(KETAMINE)
    body["prefetch"].pop("conditions")
    body["fhirServer"] = FHIR
    body["fhirAuthorization"] = {"access_token": "t0ken", "token_type": "Bearer", "scope": "patient/*.read",
                                 "subject": "cds", "expires_in": 300}
    with TestClient(create_app(config), client=LOCAL) as client:
        before = value(client, "cds_fhir_reads_total", outcome="timeout")
        with respx.mock(assert_all_called=False) as router:
            router.get(url__startswith=FHIR).mock(side_effect=slow)
            assert client.post(SIGN, json=body).status_code == 200
        deadline = time.monotonic() + 5  # the cancelled search reports when the event loop gets to it
        while value(client, "cds_fhir_reads_total", outcome="timeout") == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert value(client, "cds_fhir_reads_total", outcome="timeout") - before == 1


def test_jwt_refusals_by_reason(sqlite_url: str) -> None:
    config = make_config(sqlite_url)
    config.auth.mode = "jwt"
    config.auth.issuers = [IssuerSettings(iss="https://ehr.example.org", jwks={"keys": []})]
    with TestClient(create_app(config), client=LOCAL) as client:
        before = {r: value(client, "cds_jwt_refusals_total", reason=r) for r in ("missing_token", "malformed")}
        assert client.post(SIGN, json=scenario_request(KETAMINE)).status_code == 401
        assert client.post(SIGN, json=scenario_request(KETAMINE),
                           headers={"Authorization": "Bearer not-a-jwt"}).status_code == 401
        assert client.post(SIGN, json=scenario_request(KETAMINE),
                           headers={"Authorization": "Bearer not-a-jwt"}).status_code == 401
        after = {r: value(client, "cds_jwt_refusals_total", reason=r) for r in ("missing_token", "malformed")}
        assert value(client, "cds_hook_calls_total", service=SIGN.rsplit("/", 1)[1], status="401") >= 3
    assert after["missing_token"] - before["missing_token"] == 1
    assert after["malformed"] - before["malformed"] == 2


def _auth_error_messages() -> list[str]:
    """The literal text of every AuthError the auth package raises (f-string parts joined with '…')."""
    messages = []
    for path in Path(cds_service.auth.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "AuthError" and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant):
                    messages.append(str(arg.value))
                elif isinstance(arg, ast.JoinedStr):
                    messages.append("…".join(str(v.value) for v in arg.values if isinstance(v, ast.Constant)))
    return messages


def test_every_auth_refusal_has_its_label() -> None:
    messages = _auth_error_messages()
    assert len(messages) > 20
    unlabelled = [m for m in messages if auth_refusal_label(m) == OTHER]
    assert unlabelled == []
    labels = {label for _, label in AUTH_REFUSALS} | {OTHER}
    assert {auth_refusal_label(m) for m in messages} <= labels
    assert len(labels) <= 20


def test_feedback_by_outcome_and_override_reason(local: TestClient) -> None:
    feedback = "/cds-services/coverage-requirements-order-sign/feedback"
    now = "2026-06-01T10:00:00Z"
    entries: list[dict[str, Any]] = [
        {"card": "c1", "outcome": "accepted", "acceptedSuggestions": [{"id": "s1"}], "outcomeTimestamp": now},
        {"card": "c2", "outcome": "overridden", "outcomeTimestamp": now,
         "overrideReason": {"reason": {"code": "patient-refused", "system": "http://example.org"},
                            "userComment": "free text that must not be a label"}},
        {"card": "c3", "outcome": "overridden", "outcomeTimestamp": now,
         "overrideReason": {"reason": {"code": "not a code; free text"}}},
    ]
    keys = [("accepted", "none"), ("overridden", "patient-refused"), ("overridden", "other")]
    before = [value(local, "cds_feedback_total", outcome=o, override_reason=r) for o, r in keys]
    assert local.post(feedback, json={"feedback": entries}).status_code == 200
    after = [value(local, "cds_feedback_total", outcome=o, override_reason=r) for o, r in keys]
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1]
    assert "free text" not in local.get("/metrics").text


def test_audit_records_written_queue_and_drops(local: TestClient) -> None:
    before = value(local, "cds_audit_records_written_total")
    for _ in range(2):
        local.post(SIGN, json=scenario_request(KETAMINE))
    deadline = time.monotonic() + 10
    while value(local, "cds_audit_records_written_total") - before < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert value(local, "cds_audit_records_written_total") - before == 2
    text = local.get("/metrics").text
    assert "cds_audit_queue_depth " in text and "cds_audit_spool_records 0.0" in text
    store = local.app.state.cds.store  # type: ignore[attr-defined]
    record = AuditRecord(received_at=dt.datetime.now(dt.UTC),
                         service_id="coverage-requirements-order-sign", hook="order-sign", hook_instance="h",
                         issuer=None, patient_id=None, status_code=200, latency_ms=1.0, orders=[], decisions=b"[]",
                         response=None, request=None)
    store.spool.count_drops(SPOOL_FULL, [record, record])
    assert value(local, "cds_audit_records_dropped_total", reason=SPOOL_FULL) == 2


def test_policy_versions_served(local: TestClient) -> None:
    service = local.app.state.cds.service  # type: ignore[attr-defined]
    for policy in service.policies.policies:
        assert value(local, "cds_policy_version_info", policy=policy.id, version=policy.version) in (0.0, 1.0)


# --- who may read it -------------------------------------------------------------------------------


def _app(sqlite_url: str, **metrics: Any) -> Any:
    config = Config(storage=StorageSettings(url=sqlite_url, audit_writer="thread"), metrics=MetricsSettings(**metrics))
    return create_app(config)


def test_local_clients_only_by_default(sqlite_url: str) -> None:
    app = _app(sqlite_url)
    with TestClient(app, client=LOCAL) as client:
        assert client.get("/metrics").status_code == 200
        # a proxy on this host makes every client look local: a forwarded request is not local
        assert client.get("/metrics", headers={"X-Forwarded-For": "203.0.113.9"}).status_code == 403
    with TestClient(app, client=("203.0.113.9", 40000)) as client:
        refused = client.get("/metrics")
        assert refused.status_code == 403 and refused.json()["resourceType"] == "OperationOutcome"


def test_token_for_other_clients(sqlite_url: str, tmp_path: Path) -> None:
    token = "s3cret-metrics-token-0123456789"
    (tmp_path / "token").write_text(token + "\n")
    app = _app(sqlite_url, access="token", token_file=str(tmp_path / "token"))
    with TestClient(app, client=("203.0.113.9", 40000)) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong-token-0123456789"}).status_code == 403
        assert client.get("/metrics", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    with TestClient(app, client=LOCAL) as client:
        assert client.get("/metrics").status_code == 200


def test_open_and_off(sqlite_url: str) -> None:
    with TestClient(_app(sqlite_url, access="open"), client=("203.0.113.9", 40000)) as client:
        assert client.get("/metrics").status_code == 200
    with TestClient(_app(sqlite_url, enabled=False), client=LOCAL) as client:
        assert client.get("/metrics").status_code == 404


def test_token_file_is_checked_at_start(sqlite_url: str, tmp_path: Path) -> None:
    (tmp_path / "short").write_text("short")
    with pytest.raises(ConfigError, match="at least 16"):
        _app(sqlite_url, access="token", token_file=str(tmp_path / "short"))
    with pytest.raises(ConfigError, match="cannot be read"):
        _app(sqlite_url, access="token", token_file=str(tmp_path / "absent"))


@pytest.mark.parametrize(("data", "message"), [
    ({"metrics": {"access": "public"}}, 'metrics.access must be "local", "token" or "open"'),
    ({"metrics": {"access": "token"}}, "needs metrics.token_file"),
    ({"metrics": {"enabled": "yes"}}, "metrics.enabled has the wrong type"),
    ({"logging": {"format": "xml"}}, 'logging.format must be "auto", "json" or "text"'),
    ({"logging": {"level": "info"}}, "unknown key logging.level"),
])
def test_metrics_and_logging_config_mistakes_name_the_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(data, "test.toml")
    assert message in str(error.value)

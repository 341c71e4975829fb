"""The one log line per hook call (JSON or text; never a token, never PHI beyond ids), the policy version on
decisions, coverage information and audit records, readiness failure, and ``cds-service policy check``."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from cds_service.config import Config, StorageSettings
from cds_service.engine.policy import PolicySet
from cds_service.observability.logs import JsonFormatter, logging_config
from cds_service.storage.store import Store
from cds_service.web.app import create_app

from .support import FIXTURES, SCENARIOS, coverage_extension, load, make_config, scenario_request

SIGN = "/cds-services/coverage-requirements-order-sign"
KETAMINE = load(FIXTURES / "scenarios/mp446-ketamine-iv-chronic-pain.json")
SECRET = "eyJhbGciOiJFUzM4NCJ9.secret-access-token.sig"


def hook_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    formatter = JsonFormatter()
    return [json.loads(formatter.format(r)) for r in caplog.records if r.name == "cds_service.hook_call"]


def test_one_json_line_per_hook_call_without_token_or_phi(sqlite_url: str, caplog: pytest.LogCaptureFixture) -> None:
    body = scenario_request(KETAMINE)
    body["fhirServer"] = "https://ehr.example.org/fhir"
    body["fhirAuthorization"] = {"access_token": SECRET, "token_type": "Bearer", "scope": "patient/*.read",
                                 "subject": "cds", "expires_in": 300}
    body["context"]["patientId"] = "patient-id-not-logged"
    caplog.set_level(logging.DEBUG)
    with TestClient(create_app(make_config(sqlite_url))) as client:
        response = client.post(SIGN, json=body, headers={"Authorization": f"Bearer {SECRET}"})
        refused = client.post(SIGN, json={"hook": "order-sign", "hookInstance": "h-2"})
    assert response.status_code == 200 and refused.status_code == 400
    lines = hook_lines(caplog)
    assert len(lines) == 2
    line = lines[0]
    assert {k: line[k] for k in ("event", "service", "hook", "hookInstance", "status", "crd_version")} == {
        "event": "hook_call", "service": "coverage-requirements-order-sign", "hook": "order-sign",
        "hookInstance": body["hookInstance"], "status": 200, "crd_version": "2.0.1"}
    assert line["latency_ms"] > 0 and line["level"] == "info" and line["timestamp"].endswith("+00:00")
    version = client.app.state.cds.service.policies.get("MP-446").version  # type: ignore[attr-defined]
    assert line["decisions"] == [{"order": "MedicationRequest/ket", "policy": "MP-446", "policy_version": version,
                                  "outcome": "not-covered", "rule": "chronic-pain"}]
    assert lines[1]["status"] == 400 and lines[1]["error"] == "invalid" and lines[1]["hookInstance"] == "h-2"
    everything = "\n".join([JsonFormatter().format(r) for r in caplog.records] + caplog.messages)
    assert SECRET not in everything and "secret-access-token" not in everything
    assert "patient-id-not-logged" not in everything


def test_text_format_keeps_one_line(caplog: pytest.LogCaptureFixture, sqlite_url: str) -> None:
    body = scenario_request(KETAMINE)
    body["hookInstance"] = "forged\n2026-01-01 INFO fake line"
    caplog.set_level(logging.INFO)
    with TestClient(create_app(make_config(sqlite_url))) as client:
        client.post(SIGN, json=body)
    config = logging_config("text")
    text = logging.Formatter(config["formatters"]["cds"]["format"])
    [record] = [r for r in caplog.records if r.name == "cds_service.hook_call"]
    line = text.format(record)
    assert "\n" not in line and "forged\\n2026" in line
    assert "MP-446 not-covered (chronic-pain) for MedicationRequest/ket" in line


def test_a_json_message_is_merged_not_quoted() -> None:
    record = logging.LogRecord("cds_service.audit", logging.ERROR, __file__, 1,
                               '{"event": "audit_record_dropped", "reason": "spool_full"}', None, None)
    line = json.loads(JsonFormatter().format(record))
    assert line["event"] == "audit_record_dropped" and line["reason"] == "spool_full" and "message" not in line


def test_version_on_decisions_coverage_information_and_audit_records(sqlite_url: str, policies: PolicySet) -> None:
    pump = load(FIXTURES / "scenarios/mp442-chronic-pain-successful-trial.json")
    body = scenario_request(pump)
    body["extension"] = {"davinci-crd.requestedVersion": "2.2"}
    with TestClient(create_app(make_config(sqlite_url))) as client:
        answer = client.post(SIGN, json=body).json()
        feedback = client.post(SIGN, json=scenario_request(KETAMINE)).json()
    assert feedback["cards"]
    version = policies.get("MP-442").version  # type: ignore[union-attr]
    assert version.startswith("MP-442|") and len(version.rsplit("|", 1)[1]) == 16
    reasons = [coverage_extension(a["resource"])["reason"]["valueCodeableConcept"]["text"]
               for a in answer["systemActions"]]
    assert any(r.endswith(f"Policy version: {version}.") for r in reasons)
    assert all("Policy version" in r for r in reasons)  # the order no policy assesses names the versions too
    assert all(f"Policy version: `{version}`" in c["detail"] for c in answer["cards"])
    store = Store(sqlite_url, writer="none")
    try:
        deadline = time.monotonic() + 10
        while len(list(store.audit_export())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        exported = list(store.audit_export())
    finally:
        store.close()
    decisions = [d for row in exported for d in row["decisions"]]
    assert {(d["policy"], d["policy_version"]) for d in decisions} >= {
        ("MP-442", version), ("MP-446", policies.get("MP-446").version)}  # type: ignore[union-attr]


def test_readiness_fails_while_the_database_is_unreachable(tmp_path: Path) -> None:
    config = Config(storage=StorageSettings(url="postgresql://cds@127.0.0.1:9/cds", audit_writer="thread",
                                            spool_dir=str(tmp_path / "spool"), database_timeout_seconds=1.0))
    with TestClient(create_app(config)) as client:
        ready = client.get("/health/ready")
        alive = client.get("/health")
    assert ready.status_code == 503 and ready.json()["database"]["state"] == "down"
    assert alive.status_code == 200


# --- cds-service policy check -------------------------------------------------------------------------


def policy_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cds_service", "policy", "check", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def scenarios(tmp_path: Path) -> Path:
    directory = tmp_path / "scenarios"
    directory.mkdir()
    for path in [*SCENARIOS[:3], FIXTURES / "scenarios/mp446-ketamine-iv-chronic-pain.json"]:
        shutil.copy(path, directory)
    return directory


def test_policy_check_passes_on_the_packaged_policies(scenarios: Path) -> None:
    result = policy_check("--scenarios", str(scenarios))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("ok    policies in ") and "MP-442|" in lines[0] and "MP-446|" in lines[0]
    assert [line.split()[0] for line in lines[1:-1]] == ["ok"] * 4
    assert lines[-1].endswith("4 passed, 0 failed")


def test_policy_check_fails_on_a_broken_policy(tmp_path: Path, scenarios: Path) -> None:
    broken = tmp_path / "policies"
    shutil.copytree(Path(__file__).resolve().parent.parent / "policies", broken)
    (broken / "mp-446.yaml").write_text((broken / "mp-446.yaml").read_text() + "\nunexpected_key: 1\n")
    result = policy_check("--policies", str(broken), "--scenarios", str(scenarios))
    assert result.returncode == 1
    assert result.stdout.startswith("FAIL  policies in ") and "mp-446.yaml" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_policy_check_fails_on_a_failing_scenario(scenarios: Path) -> None:
    path = scenarios / "mp446-ketamine-iv-chronic-pain.json"
    scenario = load(path)
    scenario["expect"][0]["outcome"] = "covered"
    path.write_text(json.dumps(scenario))
    (scenarios / "not-a-scenario.json").write_text('{"hook": "order-sign"}')
    result = policy_check("--scenarios", str(scenarios))
    assert result.returncode == 1
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 2
    assert "mp446-ketamine-iv-chronic-pain: MP-446 decision for MedicationRequest/ket: outcome not-covered, " \
           "expected covered" in failed[0]
    assert failed[1].startswith("FAIL  not-a-scenario: ") and "orders must be a list" in failed[1]
    assert result.stdout.splitlines()[-1].endswith("5 scenarios in " + str(scenarios) + ": 3 passed, 2 failed")


def test_the_fhir_client_library_does_not_log_each_request_url() -> None:
    """httpx logs every request's URL (patient id and query) at INFO: the service's configuration keeps it
    to warnings, at every level it can be run with."""
    for level in ("info", "debug"):
        config = logging_config("json", level)
        assert config["loggers"]["httpx"]["level"] == "WARNING" == config["loggers"]["httpcore"]["level"]

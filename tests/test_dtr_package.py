"""The FHIR base of the forms (/fhir): the CapabilityStatement, Questionnaire and ValueSet reads, and the
$questionnaire-package operation's rules: its input, its errors (OperationOutcome, never a stack trace), its
authentication (the hooks' JWT rules), the context kept in the database (across restarts, until it expires),
and no draft answer in the logs."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import respx
import sqlalchemy as sa
from starlette.testclient import TestClient

from cds_service.dtr.forms import load_forms
from cds_service.dtr.prefill import MAX_CHART_ENTRIES, chart
from cds_service.fhir.record import PatientRecord
from cds_service.storage.dtr_contexts import dtr_context
from cds_service.storage.store import Store
from cds_service.web.app import create_app

from .dtr_client import PACKAGE, SIGN, bundle_of, coverage_info, hook, package_request
from .support import ES, ROOT, auth_config, make_config

PUMP = "order-sign-pump-chronic-pain-no-trial"
FORMS = ROOT / "policies" / "forms"


@pytest.fixture
def app(sqlite_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(make_config(sqlite_url)), raise_server_exceptions=False) as client:
        yield client


def conditional(app: TestClient) -> tuple[dict[str, Any], dict[str, Any]]:
    body = hook(PUMP, server=False)
    return body, coverage_info(app.post(SIGN, json=body).json(), "ServiceRequest/pump")


def outcome(response: Any, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    return str(body["issue"][0]["diagnostics"])


def test_metadata_lists_the_operation(app: TestClient) -> None:
    statement = app.get("/fhir/metadata").json()
    (questionnaire,) = [r for r in statement["rest"][0]["resource"] if r["type"] == "Questionnaire"]
    assert questionnaire["operation"] == [{
        "name": "questionnaire-package",
        "definition": "http://hl7.org/fhir/us/davinci-dtr/OperationDefinition/Questionnaire-package"}]


def test_questionnaires_are_read_by_id_and_found_by_url(app: TestClient) -> None:
    q = app.get("/fhir/Questionnaire/mp-446").json()
    assert q["url"] == "http://testserver/fhir/Questionnaire/mp-446" and q["status"] == "active"
    assert app.get("/fhir/Questionnaire", params={"url": q["url"]}).json()["total"] == 1
    assert app.get("/fhir/Questionnaire", params={"url": f"{q['url']}|{q['version']}"}).json()["total"] == 1
    assert app.get("/fhir/Questionnaire", params={"url": f"{q['url']}|0.0.1"}).json()["total"] == 0
    assert app.get("/fhir/Questionnaire").json()["total"] == 2
    outcome(app.get("/fhir/Questionnaire/nope"), 404)


def test_value_sets_expand_by_url(app: TestClient) -> None:
    q = app.get("/fhir/Questionnaire/mp-446").json()
    url = next(i["answerValueSet"] for i in q["item"] if i["linkId"] == "route")
    expanded = app.get("/fhir/ValueSet/$expand", params={"url": url}).json()
    assert {c["code"] for c in expanded["expansion"]["contains"]} >= {"47625008"}
    posted = app.post("/fhir/ValueSet/$expand", json={"resourceType": "Parameters", "parameter": [
        {"name": "url", "valueUri": url.split("|")[0]}]}).json()
    assert posted["id"] == expanded["id"]
    outcome(app.get("/fhir/ValueSet/$expand", params={"url": "http://x.example/ValueSet/y"}), 404)
    outcome(app.get("/fhir/ValueSet/$expand"), 400)


@pytest.mark.parametrize("body, status, says", [
    ({"resourceType": "Bundle"}, 400, "Parameters"),
    ({"resourceType": "Parameters", "parameter": [{"name": "context", "valueString": "x"}]}, 400,
     "exactly one coverage"),
    ({"resourceType": "Parameters", "parameter": [{"name": "coverage", "resource": {"resourceType": "Coverage"}}]},
     400, "dtr-1"),
    ({"resourceType": "Parameters", "parameter": [{"name": "coverage", "resource": {"resourceType": "Coverage"}},
                                                  {"name": "order", "resource": {"resourceType": "Patient"}}]},
     400, "order"),
    ({"resourceType": "Parameters", "parameter": [{"name": "x"}] * 101}, 422, "more than 100 parameters"),
    ({"resourceType": "Parameters", "parameter": [{"name": "coverage", "resource": {"resourceType": "Coverage"}},
                                                  {"name": "context", "valueString": "no-such-assertion"}]},
     404, "no coverage assertion"),
])
def test_bad_input_gets_an_operation_outcome(app: TestClient, body: Any, status: int, says: str) -> None:
    assert says in outcome(app.post(PACKAGE, json=body), status)


def test_unparsable_json_and_oversized_bodies_are_refused(app: TestClient) -> None:
    outcome(app.post(PACKAGE, content=b'{"resourceType": "Parameters", "parameter": [',
                     headers={"Content-Type": "application/json"}), 400)
    outcome(app.post(PACKAGE, content=b"x" * (6 * 1024 * 1024), headers={"Content-Type": "application/json"}), 413)


def test_a_context_for_another_patients_coverage_is_not_found(app: TestClient) -> None:
    body, info = conditional(app)
    request = package_request(body, info)
    request["parameter"][0]["resource"] = {**request["parameter"][0]["resource"],
                                           "beneficiary": {"reference": "Patient/someone-else"}}
    outcome(app.post(PACKAGE, json=request), 404)


def test_an_unknown_canonical_is_a_warning_and_no_package(app: TestClient) -> None:
    body, info = conditional(app)
    request = package_request(body, info)
    request["parameter"] = [p for p in request["parameter"] if p["name"] not in ("context", "questionnaire")]
    request["parameter"].append({"name": "questionnaire", "valueCanonical": "http://x.example/Questionnaire/q|1"})
    answer = app.post(PACKAGE, json=request).json()
    assert [p["name"] for p in answer["parameter"]] == ["outcome"]
    assert answer["parameter"][0]["resource"]["issue"][0]["severity"] == "warning"


def test_orders_alone_get_their_policy_form_without_payer_answers(app: TestClient) -> None:
    body, info = conditional(app)
    request = package_request(body, info)
    request["parameter"] = [p for p in request["parameter"] if p["name"] in ("coverage", "order")]
    bundle = bundle_of(app.post(PACKAGE, json=request).json())
    assert bundle["entry"][0]["resource"]["id"] == "mp-442"
    assert "item" not in bundle["entry"][1]["resource"]  # no context: every section shown, nothing pre-filled


def test_the_context_survives_a_restart(storage_url: str) -> None:
    """Also a second replica on the same database finds it (PostgreSQL too, when configured)."""
    with TestClient(create_app(make_config(storage_url))) as first:
        body, info = conditional(first)
    with TestClient(create_app(make_config(storage_url))) as second:
        assert second.post(PACKAGE, json=package_request(body, info)).status_code == 200


def test_an_expired_context_is_not_found(app: TestClient, sqlite_url: str) -> None:
    body, info = conditional(app)
    assert app.post(PACKAGE, json=package_request(body, info)).status_code == 200
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as connection:
        connection.execute(dtr_context.update().values(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)))
    engine.dispose()
    outcome(app.post(PACKAGE, json=package_request(body, info)), 404)


def test_draft_answers_are_never_logged(app: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    body, info = conditional(app)
    answer = app.post(PACKAGE, json=package_request(body, info))
    assert "Chronic pain syndrome" in answer.text and "2024-01-10" in answer.text
    assert "Chronic pain syndrome" not in caplog.text and "2024-01-10" not in caplog.text


def test_the_package_needs_a_token_whose_audience_is_the_operation(sqlite_url: str,
                                                                   jwks: respx.MockRouter) -> None:
    with TestClient(create_app(auth_config(sqlite_url))) as secured:
        request = {"resourceType": "Parameters", "parameter": [
            {"name": "coverage", "resource": {"resourceType": "Coverage", "id": "c"}},
            {"name": "context", "valueString": "unknown"}]}
        assert secured.post(PACKAGE, json=request).status_code == 401
        hook_token = ES.token()  # aud: the order-sign endpoint
        assert secured.post(PACKAGE, json=request, headers={"Authorization": f"Bearer {hook_token}"}).status_code == 401
        token = ES.token(aud="http://testserver" + PACKAGE)
        answer = secured.post(PACKAGE, json=request, headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 404 and answer.json()["resourceType"] == "OperationOutcome"
        assert secured.get("/fhir/metadata").status_code == 200  # definitions are public, as discovery


def test_contexts_are_written_by_the_audit_writer(sqlite_url: str) -> None:
    with TestClient(create_app(make_config(sqlite_url))) as app:
        _, info = conditional(app)
    store = Store(sqlite_url, writer="none")
    with store.engine.connect() as connection:
        (row,) = connection.execute(sa.select(dtr_context)).all()
    store.close()
    assert row.coverage_assertion_id == info["coverage-assertion-id"] and row.policy_id == "MP-442"
    assert row.context["sections"] == ["indication", "pain-severity", "trial"]


@pytest.mark.parametrize("version", ["2.0.1", "2.2.1"])
@pytest.mark.parametrize("name", [PUMP, "order-sign-ketamine-route-not-stated",
                                  "order-sign-pump-spasticity-no-baclofen-history"])
def test_conditional_answers_name_the_form_in_both_crd_versions(service: Any, name: str, version: str) -> None:
    from .crd_profile import assert_valid, in_version
    from .support import FIXTURES, load, run

    parts = assert_valid(run(service, in_version(load(FIXTURES / "requests" / f"{name}.json"), version)), version)
    (conditional,) = [p for p in parts if p["covered"]["valueCode"] == "conditional"]
    assert conditional["doc-needed"]["valueCode"] == "clinical"
    assert conditional["questionnaire"]["valueCanonical"].startswith("https://cds.example.org/fhir/Questionnaire/mp-")


def test_the_draft_names_its_coverage_and_order_even_when_asked_with_the_assertion_alone(app: TestClient) -> None:
    body, info = conditional(app)
    full = package_request(body, info)
    alone = {**full, "parameter": [p for p in full["parameter"] if p["name"] != "order"]}
    coverage_id = full["parameter"][0]["resource"]["id"]
    for request in (full, alone):
        draft = bundle_of(app.post(PACKAGE, json=request).json())["entry"][1]["resource"]
        context = {(e["url"].rsplit("/", 1)[1], e["valueReference"]["reference"]) for e in draft["extension"]
                   if "valueReference" in e}
        assert context == {("qr-coverage", f"Coverage/{coverage_id}"), ("qr-context", "ServiceRequest/pump")}
        assert draft["item"] and all(answer["extension"][0]["extension"][0]["valueCode"] == "auto-server"
                                     for item in draft["item"] for answer in item["answer"])


def test_the_chart_kept_for_the_prefill_is_bounded(policies: Any) -> None:
    forms = load_forms(FORMS, policies)
    form = forms.by_id("mp-442")
    assert form is not None
    record = PatientRecord()
    conditions = [{"resourceType": "Condition", "id": f"c{i}", "subject": {"reference": "Patient/p1"},
                   "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "G89.29"}]}}
                  for i in range(MAX_CHART_ENTRIES * 3)]
    record.add_all(conditions, {"Condition": None})
    bundles = chart(form, list(form.items()), record)
    assert bundles["conditions"]["total"] == MAX_CHART_ENTRIES * 3
    assert len(bundles["conditions"]["entry"]) == MAX_CHART_ENTRIES

"""The DTR loop, played as a DTR client would: a conditional CRD answer names a form; the package holds it with
the payer's draft; the clinician completes it and the EHR stores it on its FHIR server; the next order-sign
reads it and decides firmly, citing it (card, trace and audit). And what does not close the loop: a form in
progress, another patient's form, an answer that contradicts the coded record."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from cds_service.storage.store import Store
from cds_service.web.app import create_app

from .dtr_client import (
    PACKAGE,
    SIGN,
    FhirServer,
    answers,
    bundle_of,
    complete,
    coverage_info,
    hook,
    package_request,
    pick,
)
from .support import make_config

PUMP = "order-sign-pump-chronic-pain-no-trial"
KETAMINE = "order-sign-ketamine-route-not-stated"
SPASTICITY = "order-sign-pump-spasticity-no-baclofen-history"


@pytest.fixture
def ehr() -> FhirServer:
    return FhirServer()


@pytest.fixture
def app(sqlite_url: str, ehr: FhirServer) -> Iterator[TestClient]:
    config = make_config(sqlite_url)
    with TestClient(create_app(config, fhir_transport=httpx.MockTransport(ehr))) as client:
        yield client


def conditional_package(app: TestClient, name: str, order: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """order-sign (conditional, naming the form), then the package for its context."""
    body = hook(name)
    answer = app.post(SIGN, json=body)
    assert answer.status_code == 200, answer.text
    info = coverage_info(answer.json(), order)
    assert info["covered"] == "conditional" and info["doc-needed"] == "clinical"
    assert info["questionnaire"].startswith("http://testserver/fhir/Questionnaire/")
    package = app.post(PACKAGE, json=package_request(body, info))
    assert package.status_code == 200, package.text
    return body, bundle_of(package.json())


def decide_again(app: TestClient, name: str, order: str) -> tuple[dict[str, Any], dict[str, Any]]:
    answer = app.post(SIGN, json=hook(name))
    assert answer.status_code == 200, answer.text
    return answer.json(), coverage_info(answer.json(), order)


def test_completed_form_on_the_ehr_makes_the_next_order_sign_firm(app: TestClient, ehr: FhirServer,
                                                                   sqlite_url: str) -> None:
    _, bundle = conditional_package(app, PUMP, "ServiceRequest/pump")
    draft = answers(bundle["entry"][1]["resource"])
    assert [c["code"] for c in draft["sections"]] == ["indication", "pain-severity", "trial"]
    assert draft["indication"][0]["code"] == "G89.4" and draft["indication-onset"] == ["2024-01-10"]

    qr = complete(bundle, {
        "indication-confirmed": True,
        "pain-score": 8, "pain-score-date": "2026-05-20",
        "trial-start": "2026-05-02T09:00:00+00:00",
        "trial-route": pick(bundle, "trial-route", "Intrathecal route"),
        "trial-drug": pick(bundle, "trial-drug", "morphine"),
        "trial-pain-before": 8, "trial-pain-after": 3,
    })
    assert httpx.Client(transport=httpx.MockTransport(ehr)).post(
        "http://127.0.0.1:18849/fhir/QuestionnaireResponse", json=qr).status_code == 201

    response, info = decide_again(app, PUMP, "ServiceRequest/pump")
    assert info["covered"] == "covered" and "questionnaire" not in info and "doc-needed" not in info
    assert any(s.startswith("QuestionnaireResponse?patient=p1") for s in ehr.searches)
    card = response["cards"][0]["detail"]
    assert f"QuestionnaireResponse/{qr['id']}" in card and "Practitioner/dr1" in card
    app.__exit__(None, None, None)  # flush the audit writer
    store = Store(sqlite_url, writer="none")
    last = list(store.audit_export())[-1]
    (decision,) = [d for d in last["decisions"] if d["order"] == "ServiceRequest/pump"]
    cited = [e for e in decision["evidence"] if e["reference"] == f"QuestionnaireResponse/{qr['id']}"]
    assert decision["outcome"] == "covered"
    assert any("trial" in e["finding"] and f"authored {qr['authored']} by Practitioner/dr1" in e["finding"]
               for e in cited)
    store.close()


def test_a_form_in_progress_does_not_count(app: TestClient, ehr: FhirServer) -> None:
    _, bundle = conditional_package(app, PUMP, "ServiceRequest/pump")
    ehr.resources.append(complete(bundle, {"indication-confirmed": True, "pain-score": 9,
                                           "pain-score-date": "2026-05-20"}, status="in-progress"))
    response, info = decide_again(app, PUMP, "ServiceRequest/pump")
    assert info["covered"] == "conditional" and "questionnaire" in info
    assert "QuestionnaireResponse" not in response["cards"][0]["detail"].split("**Notes:**")[0]


def test_another_patients_form_does_not_count(app: TestClient, ehr: FhirServer) -> None:
    _, bundle = conditional_package(app, KETAMINE, "MedicationRequest/ket")
    qr = complete(bundle, {"route": pick(bundle, "route", "Intravenous route")})
    qr["subject"] = {"reference": "Patient/someone-else"}
    ehr.resources.append({**qr, "subject": {"reference": "Patient/p1"}, "id": "mislabelled",
                          "questionnaire": "http://other.example/Questionnaire/mp-446|1"})
    ehr.resources.append(qr)
    _, info = decide_again(app, KETAMINE, "MedicationRequest/ket")
    assert info["covered"] == "conditional"


def test_the_route_documented_for_the_order_settles_mp446(app: TestClient, ehr: FhirServer) -> None:
    _, bundle = conditional_package(app, KETAMINE, "MedicationRequest/ket")
    assert [c["code"] for c in answers(bundle["entry"][1]["resource"])["sections"]] == ["route"]
    ehr.resources.append(complete(bundle, {"route": pick(bundle, "route", "Intravenous route")}))
    response, info = decide_again(app, KETAMINE, "MedicationRequest/ket")
    assert info["covered"] == "not-covered"
    assert "the route of MedicationRequest/ket is Intravenous route, documented in QuestionnaireResponse/" \
        in response["cards"][0]["detail"].replace("\\", "")


def test_oral_baclofen_stopped_as_ineffective_settles_spasticity(app: TestClient, ehr: FhirServer) -> None:
    _, bundle = conditional_package(app, SPASTICITY, "ServiceRequest/pump")
    ehr.resources.append(complete(bundle, {
        "baclofen-outcome": pick(bundle, "baclofen-outcome", "Absent response to treatment"),
        "baclofen-stopped": "2025-11-02", "baclofen-details": "20 mg four times a day for 3 months"}))
    _, info = decide_again(app, SPASTICITY, "ServiceRequest/pump")
    assert info["covered"] == "covered"


def test_an_answer_contradicting_the_record_leaves_the_decision_conditional(app: TestClient,
                                                                           ehr: FhirServer) -> None:
    _, bundle = conditional_package(app, PUMP, "ServiceRequest/pump")
    ehr.resources.append(complete(bundle, {
        "indication-onset": "2026-03-01",  # the record's Condition/c1 began 2024-01-10
        "indication-confirmed": True, "pain-score": 8, "pain-score-date": "2026-05-20",
        "trial-start": "2026-05-02T09:00:00+00:00",
        "trial-route": pick(bundle, "trial-route", "Intrathecal route"),
        "trial-drug": pick(bundle, "trial-drug", "morphine"), "trial-pain-before": 8, "trial-pain-after": 3,
    }))
    response, info = decide_again(app, PUMP, "ServiceRequest/pump")
    assert info["covered"] == "conditional" and info["questionnaire"].split("|")[0].endswith("/mp-442")
    detail = response["cards"][0]["detail"].replace("\\", "")
    assert "the onset 2026-03-01 of Chronic pain syndrome" in detail
    assert "the onset 2024-01-10 on Condition/c1" in detail


def test_an_indication_other_than_the_orders_coded_reason_is_a_conflict(app: TestClient, ehr: FhirServer) -> None:
    _, bundle = conditional_package(app, PUMP, "ServiceRequest/pump")
    ehr.resources.append(complete(bundle, {
        "indication": pick(bundle, "indication", "Radiculopathy, lumbar region"), "indication-confirmed": True}))
    response, info = decide_again(app, PUMP, "ServiceRequest/pump")
    assert info["covered"] == "conditional"
    assert "is not the reason Chronic pain syndrome coded on ServiceRequest/pump" in \
        response["cards"][0]["detail"].replace("\\", "")


def test_the_package_waits_briefly_for_a_context_being_written(app: TestClient) -> None:
    body = hook(PUMP, server=False)
    body["prefetch"]["questionnaireResponses"] = None
    started = time.monotonic()
    info = coverage_info(app.post(SIGN, json=body).json(), "ServiceRequest/pump")
    package = app.post(PACKAGE, json=package_request(body, info, questionnaire=False))
    assert package.status_code == 200 and time.monotonic() - started < 5


def test_an_amended_form_in_the_prefetch_closes_the_loop_without_the_server(app: TestClient, ehr: FhirServer) -> None:
    """The EHR that fills the discovery's questionnaireResponses template sends the form itself; an amended
    form counts as a completed one."""
    _, bundle = conditional_package(app, KETAMINE, "MedicationRequest/ket")
    qr = complete(bundle, {"route": pick(bundle, "route", "Intravenous route")}, status="amended")
    body = hook(KETAMINE)
    body["prefetch"]["questionnaireResponses"] = {"resourceType": "Bundle", "type": "searchset",
                                                  "entry": [{"resource": qr}]}
    searches = len(ehr.searches)
    answer = app.post(SIGN, json=body)
    assert answer.status_code == 200, answer.text
    info = coverage_info(answer.json(), "MedicationRequest/ket")
    assert info["covered"] == "not-covered"
    assert f"documented in QuestionnaireResponse/{qr['id']}" in answer.json()["cards"][0]["detail"].replace("\\", "")
    assert not any(s.startswith("QuestionnaireResponse") for s in ehr.searches[searches:])


def test_the_card_says_in_one_line_what_the_form_asks(app: TestClient) -> None:
    answer = app.post(SIGN, json=hook(PUMP)).json()
    detail = next(c["detail"] for c in answer["cards"] if "To decide coverage" in c["detail"])
    lines = [line for line in detail.splitlines() if line.startswith("Documentation form ")]
    assert len(lines) == 1, detail
    assert "(DTR) asks for" in lines[0].replace("\\", "") and "temporary trial" in lines[0]

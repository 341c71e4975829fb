"""CRD 2.2.1 beside 2.0.1: negotiation, the 2.2.1 coverage-information and cards, configuration and
unknown elements, whose member this is (hook-13), SMART v2 scopes, and which version the audit records."""

from __future__ import annotations

import copy
from typing import Any

import httpx
import pytest
import respx
from starlette.testclient import TestClient

from cds_service.config import Config, ServiceSettings
from cds_service.hooks.payer import PayerIdentifier, primary_coverage
from cds_service.hooks.request import RequestError
from cds_service.hooks.scopes import parse_scopes
from cds_service.hooks.service import CoverageService, HookResult
from cds_service.storage.store import AuditRecord
from cds_service.web.app import create_app

from .crd_profile import coverage_extensions, coverage_information_errors
from .support import FIXTURES, load, make_config, run, scenario_request

SIGN = "/cds-services/coverage-requirements-order-sign"
NO_TRIAL = load(FIXTURES / "scenarios/mp442-chronic-pain-no-trial.json")
TRIAL = load(FIXTURES / "scenarios/mp442-chronic-pain-successful-trial.json")
FHIR = "https://ehr.example.org/fhir"
CARD_TYPES = "http://terminology.hl7.org/CodeSystem/cdshooks-card-type"
TEMP = "http://hl7.org/fhir/us/davinci-crd/CodeSystem/temp"
OURS = PayerIdentifier.parse("http://hl7.org/fhir/sid/us-npi|1234567893")


def asking(version: str | None, scenario: dict[str, Any] = NO_TRIAL, **extension: Any) -> dict[str, Any]:
    body = scenario_request(copy.deepcopy(scenario))
    if version is not None:
        extension["davinci-crd.requestedVersion"] = version
    if extension:
        body["extension"] = extension
    return body


def parts(result: HookResult, order: str = "pump") -> dict[str, Any]:
    """The coverage information of one order (the scenarios' pump, by default)."""
    [ext] = [e for a in result.response["systemActions"] if a["resource"]["id"] == order
             for e in coverage_extensions(a["resource"])]
    return {p["url"]: p for p in ext["extension"]}


def test_the_same_order_answered_in_2_0_1_and_in_2_2_1(service: CoverageService) -> None:
    old, new = run(service, asking(None)), run(service, asking("2.2"))
    assert old.crd_version == "2.0.1" and new.crd_version == "2.2.1"
    for result, version, topic in ((old, "2.0.1", TEMP), (new, "2.2.1", CARD_TYPES)):
        for action in result.response["systemActions"]:
            for ext in coverage_extensions(action["resource"]):
                assert coverage_information_errors(ext, version) == []
        assert {c["source"]["topic"]["system"] for c in result.response["cards"]} == {topic}
    before, after = parts(old), parts(new)
    # 2.2.1: the policy link as a detail (category, code, value url); 2.0.1 has no such detail code
    assert "detail" not in before
    detail = {p["url"]: p for p in after["detail"]["extension"]}
    assert detail["category"]["valueCode"] == "cat-other"
    assert detail["code"]["valueCodeableConcept"]["coding"][0]["code"] == "policy-link"
    assert detail["value"]["valueUrl"] == "https://cds.example.org/policies/MP-442"
    # the same decision otherwise
    same = ("covered", "pa-needed", "doc-needed", "info-needed", "billingCode", "reason", "coverage")
    assert {k: before[k] for k in same} == {k: after[k] for k in same}
    assert [c["summary"] for c in old.response["cards"]] == [c["summary"] for c in new.response["cards"]]


def test_requested_2_0_is_the_2_0_1_answer(service: CoverageService) -> None:
    assert run(service, asking("2.0")).crd_version == "2.0.1"
    assert run(service, asking("2.2.1")).crd_version == "2.2.1"  # a patch level of a served version


@pytest.mark.parametrize("value", ["9.9", "2.1", "", "x", 2.2])
def test_unknown_requested_version_is_422_naming_the_versions(client: TestClient, value: Any) -> None:
    response = client.post(SIGN, json=asking(value))
    assert response.status_code == 422
    issue = response.json()["issue"][0]
    assert issue["code"] == "not-supported"
    assert '"2.0" (CRD 2.0.1)' in issue["diagnostics"] and '"2.2" (CRD 2.2.1)' in issue["diagnostics"]


@pytest.mark.parametrize("version", ["2.0.1", "2.2.1"])
def test_data_that_could_not_be_read(service: CoverageService, version: str) -> None:
    body = asking("2.2" if version == "2.2.1" else None, TRIAL)
    del body["prefetch"]["observations"]
    body.update(fhirServer=FHIR, fhirAuthorization={"access_token": "t", "token_type": "Bearer"})
    with respx.mock(assert_all_called=False) as router:
        router.get(url__startswith=f"{FHIR}/Observation?").mock(return_value=httpx.Response(503))
        result = run(service, body)
    found = parts(result)
    ext = next(e for a in result.response["systemActions"] if a["resource"]["id"] == "pump"
               for e in coverage_extensions(a["resource"]))
    assert coverage_information_errors(ext, version) == []
    coding = found["reason"]["valueCodeableConcept"]["coding"][0]
    if version == "2.2.1":  # resp-43
        assert found["covered"]["valueCode"] == "indeterminate"
        assert (coding["system"], coding["code"]) == (TEMP, "technical")
    else:
        assert found["covered"]["valueCode"] == "conditional" and coding["code"] == "NAV"
    assert "could not be read" in found["reason"]["valueCodeableConcept"]["text"]


def test_2_2_conditional_prior_authorization_carries_info_needed(service: CoverageService) -> None:
    covered = parts(run(service, asking("2.2", TRIAL)))
    assert covered["covered"]["valueCode"] == "covered" and covered["pa-needed"]["valueCode"] == "conditional"
    assert covered["info-needed"]["valueCode"] == "OTH" and covered["reason"]  # crd-ci-q3, q6
    assert "info-needed" not in parts(run(service, asking(None, TRIAL)))  # 2.0.1 as before


@pytest.mark.parametrize(("version", "actions"), [("2.2", 0), (None, 1)])
def test_coverage_info_false(service: CoverageService, version: str | None, actions: int) -> None:
    body = asking(version, **{"davinci-crd.configuration": {"coverage-info": False}})
    response = run(service, body).response
    # 2.2.1 dev-14: nothing at all; 2.0.1: no cards, the systemActions as always (one per order)
    assert response["cards"] == [] and len(response["systemActions"]) == actions * len(NO_TRIAL["orders"])


@pytest.mark.parametrize("where", ["configuration", "context", "top"])
def test_unknown_configuration_context_and_elements_are_ignored(service: CoverageService, where: str) -> None:
    body = asking("2.2", **{"davinci-crd.configuration": {"made-up-option": 7}} if where == "configuration" else {})
    if where == "context":
        body["context"]["madeUpContext"] = {"x": 1}
    if where == "top":
        body["madeUpElement"] = [1, 2]
    response = run(service, body).response
    assert response["cards"] and parts(run(service, body))["covered"]["valueCode"] == "conditional"


# --- whose member is this (hook-13) ---------------------------------------------------------------

def coverage(cid: str, payer: str | None, order: int | None = None) -> dict[str, Any]:
    resource: dict[str, Any] = {"resourceType": "Coverage", "id": cid, "status": "active",
                                "beneficiary": {"reference": "Patient/p1"}, "payor": [{"display": "a payer"}]}
    if payer:
        system, value = payer.split("|")
        resource["payor"] = [{"identifier": {"system": system, "value": value}}]
    if order is not None:
        resource["order"] = order
    return resource


def with_coverages(body: dict[str, Any], *coverages: dict[str, Any]) -> dict[str, Any]:
    body["prefetch"]["coverage"] = {"resourceType": "Bundle", "type": "searchset",
                                    "entry": [{"resource": c} for c in coverages]}
    return body


@pytest.fixture
def payer_service(service: CoverageService) -> CoverageService:
    config = Config(service=ServiceSettings(payer_name="Test Health Plan", payer_identifiers=[str(OURS)]))
    return CoverageService.from_config(config, policies=service.policies)


@pytest.mark.parametrize(("coverages", "message"), [
    ([coverage("c", "http://hl7.org/fhir/sid/us-npi|9999999991")], "names a payer this service does not handle"),
    ([], "names no active Coverage"),
    ([coverage("c", None)], "names no payer identifier"),
    ([coverage("a", str(OURS)), coverage("b", str(OURS))], "none is marked primary"),
])
def test_2_2_request_for_another_payers_member_is_400(payer_service: CoverageService,
                                                      coverages: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(RequestError, match=message) as raised:
        run(payer_service, with_coverages(asking("2.2"), *coverages))
    assert raised.value.status == 400


def test_our_members_and_2_0_1_requests_are_answered(payer_service: CoverageService) -> None:
    ours = with_coverages(asking("2.2"), coverage("b", "http://other|1", order=2), coverage("a", str(OURS), order=1))
    assert run(payer_service, ours).response["systemActions"]
    foreign = with_coverages(asking(None), coverage("c", "http://hl7.org/fhir/sid/us-npi|9999999991"))
    assert run(payer_service, foreign).response["systemActions"]  # 2.0.1 keeps today's behaviour


def test_unconfigured_every_coverage_is_ours(service: CoverageService) -> None:
    foreign = with_coverages(asking("2.2"), coverage("c", "http://hl7.org/fhir/sid/us-npi|9999999991"))
    assert run(service, foreign).response["systemActions"]


def test_primary_coverage_by_order() -> None:
    first, second = coverage("a", None, order=1), coverage("b", None, order=2)
    assert primary_coverage([second, first]) is first
    assert isinstance(primary_coverage([coverage("x", None, 1), coverage("y", None, 1)]), str)


# --- SMART scopes ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("scope", "condition", "observation"), [
    (None, True, True),
    ("openid fhirUser launch", True, True),  # names no resource access: nothing is assumed
    ("patient/*.read", True, True),  # v1
    ("user/Condition.read user/Observation.write", True, False),
    ("patient/Condition.rs patient/Observation.rs?category=survey", True, True),  # v2, granular
    ("patient/Condition.r", False, False),  # v2 read without search
    ("system/*.cruds", True, True),
])
def test_smart_scopes_v1_and_v2(scope: str | None, condition: bool, observation: bool) -> None:
    scopes = parse_scopes(scope)
    assert scopes.allows_search("Condition") is condition
    assert scopes.allows_search("Observation") is observation


def test_a_search_the_scope_does_not_grant_is_not_made(service: CoverageService) -> None:
    body = asking("2.2", TRIAL)
    del body["prefetch"]["observations"]
    body.update(fhirServer=FHIR, fhirAuthorization={"access_token": "t", "token_type": "Bearer",
                                                    "scope": "patient/Condition.rs patient/Procedure.rs"})
    with respx.mock(assert_all_called=False) as router:
        route = router.get(url__startswith=f"{FHIR}/Observation?")
        result = run(service, body)
    assert not route.called
    decision = next(d for d in result.decisions if d.order_reference == "ServiceRequest/pump")
    assert "scope does not allow" in decision.technical["Observation"]
    body["fhirAuthorization"]["scope"] = "patient/Observation.rs"
    with respx.mock(assert_all_called=False) as router:
        route = router.get(url__startswith=f"{FHIR}/Observation?").mock(return_value=httpx.Response(
            200, json={"resourceType": "Bundle", "type": "searchset", "entry": []}))
        run(service, body)
    assert route.called


# --- audit ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("version", "label"), [(None, "2.0.1"), ("2.2", "2.2.1")])
def test_audit_record_says_which_version_answered(sqlite_url: str, monkeypatch: pytest.MonkeyPatch,
                                                  version: str | None, label: str) -> None:
    records: list[AuditRecord] = []
    with TestClient(create_app(make_config(sqlite_url))) as client:
        store = client.app.state.cds.store  # type: ignore[attr-defined]

        def capture(record: AuditRecord) -> bool:
            records.append(record)
            return True

        monkeypatch.setattr(store, "submit_audit", capture)
        assert client.post(SIGN, json=asking(version)).status_code == 200
    assert [r.crd_version for r in records] == [label]


@pytest.mark.parametrize("version", ["2.0.1", "2.2.1"])
def test_not_assessed_orders_carry_the_technical_answer_when_data_could_not_be_read(service: CoverageService,
                                                                                   version: str) -> None:
    """CRD 2.2.1 resp-43: when the EHR's FHIR API fails, every coverage information of the call says so, also
    that of an order no policy of this service assesses (here the pump's drug)."""
    body = asking("2.2" if version == "2.2.1" else None, TRIAL)
    for key in list(body["prefetch"]):
        del body["prefetch"][key]
    body.update(fhirServer=FHIR, fhirAuthorization={"access_token": "t", "token_type": "Bearer"})
    with respx.mock(assert_all_called=False) as router:
        router.get(url__startswith=f"{FHIR}/").mock(return_value=httpx.Response(500))
        result = run(service, body)
    drug = parts(result, "pumpdrug")
    expected = "indeterminate" if version == "2.2.1" else "conditional"
    assert drug["covered"]["valueCode"] == expected
    assert drug["reason"]["valueCodeableConcept"]["coding"][0]["code"] == ("technical" if version == "2.2.1" else "NAV")
    assert drug["reason"]["valueCodeableConcept"]["text"].startswith("Not assessed by this service")
    for action in result.response["systemActions"]:
        for ext in coverage_extensions(action["resource"]):
            assert coverage_information_errors(ext, version) == []

"""Every coverage-information the service produces is valid against the CRD profile it answers in:
each scenario, no known Coverage, data that could not be read, an order that could not be read."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx

from cds_service.hooks.service import CoverageService

from .crd_profile import (
    CI_URL,
    assert_valid,
    coverage_information_errors,
    in_version,
    model,
)
from .support import FIXTURES, SCENARIOS, load, run, scenario_request

FHIR = "https://ehr.example.org/fhir"
TRIAL = load(FIXTURES / "scenarios/mp442-chronic-pain-successful-trial.json")


@pytest.mark.parametrize("version", ["2.0.1", "2.2.1"])
@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_every_scenario_answer_is_valid(service: CoverageService, path: Path, version: str) -> None:
    scenario = load(path)
    if all(e["outcome"] == "out-of-scope" for e in scenario["expect"]):
        pytest.skip("no order in scope")
    assert_valid(run(service, in_version(scenario_request(scenario), version)), version)


@pytest.mark.parametrize("version", ["2.0.1", "2.2.1"])
def test_no_known_coverage_still_names_the_coverage_element(service: CoverageService, version: str) -> None:
    body = in_version(scenario_request(TRIAL), version)
    body["prefetch"]["coverage"] = None
    for parts in assert_valid(run(service, body), version):
        assert parts["coverage"]["valueReference"]["type"] == "Coverage"
        assert "no Coverage" in parts["coverage"]["valueReference"]["display"]


def test_order_insurance_is_the_coverage(service: CoverageService) -> None:
    scenario = copy.deepcopy(TRIAL)
    scenario["orders"][0]["insurance"] = [{"reference": "Coverage/from-order"}]
    parts = assert_valid(run(service, scenario_request(scenario)))
    assert parts[0]["coverage"]["valueReference"] == {"reference": "Coverage/from-order"}


def test_unreadable_data_is_valid_with_an_existing_reason_code(service: CoverageService) -> None:
    body = scenario_request(TRIAL)
    del body["prefetch"]["observations"]
    body.update(fhirServer=FHIR, fhirAuthorization={"access_token": "t", "token_type": "Bearer"})
    with respx.mock(assert_all_called=False) as router:
        router.get(url__startswith=f"{FHIR}/Observation?").mock(return_value=httpx.Response(503))
        result = run(service, body)
    [parts] = assert_valid(result)
    assert parts["covered"]["valueCode"] == "conditional"
    coding = parts["reason"]["valueCodeableConcept"]["coding"][0]
    assert (coding["system"], coding["code"]) == ("http://terminology.hl7.org/CodeSystem/v3-NullFlavor", "NAV")
    assert "could not be read" in parts["reason"]["valueCodeableConcept"]["text"]


@pytest.mark.parametrize("version", ["2.0.1", "2.2.1"])
def test_unreadable_order_is_valid(service: CoverageService, version: str) -> None:
    scenario = copy.deepcopy(TRIAL)
    scenario["orders"][0]["reasonCode"] = [{"coding": [{"system": 42, "code": "G89.4"}]}]
    [parts] = assert_valid(run(service, in_version(scenario_request(scenario), version)), version)
    assert parts["covered"]["valueCode"] == "conditional" and parts["info-needed"]["valueCode"] == "OTH"


# --- the oracle itself ------------------------------------------------------------------------------

GOOD: dict[str, Any] = {"url": CI_URL, "extension": [
    {"url": "coverage", "valueReference": {"reference": "Coverage/c"}},
    {"url": "covered", "valueCode": "covered"},
    {"url": "pa-needed", "valueCode": "no-auth"},
    {"url": "date", "valueDate": "2026-06-01"},
    {"url": "coverage-assertion-id", "valueString": "a1"}]}


def mutated(drop: str = "", add: list[dict[str, Any]] | None = None, **codes: str) -> dict[str, Any]:
    ext = copy.deepcopy(GOOD)
    ext["extension"] = [p for p in ext["extension"] if p["url"] != drop] + (add or [])
    for part in ext["extension"]:
        if part["url"] in codes:
            part["valueCode"] = codes[part["url"]]
    return ext


@pytest.mark.parametrize("version", ["2.0.1", "2.2.1"])
def test_oracle_accepts_a_good_extension_and_rejects_single_faults(version: str) -> None:
    assert coverage_information_errors(GOOD, version) == []
    technical = {"url": "reason", "valueCodeableConcept": {"coding": [
        {"system": "http://hl7.org/fhir/us/davinci-crd/CodeSystem/temp", "code": "technical"}]}}
    bad = [
        mutated(drop="coverage"),
        mutated(drop="coverage-assertion-id"),
        mutated(covered="maybe"),
        mutated(add=[{"url": "made-up", "valueString": "x"}]),
        mutated(add=[{"url": "info-needed", "valueCode": "performer"}], covered="not-covered", **{
            "pa-needed": "auth-needed"}),
    ]
    if version == "2.0.1":
        bad.append(mutated(add=[technical]))  # 'technical' is not a 2.0.1 temp code
        bad.append(mutated(add=[{"url": "doc-needed", "valueCode": "clinical"}] * 2))
    else:
        bad.append(mutated(add=[{"url": "doc-needed", "valueCode": "both"}]))
        bad.append(mutated(covered="conditional"))  # q3: conditional needs info-needed
        bad.append(mutated(add=[{"url": "info-needed", "valueCode": "OTH"}], covered="conditional"))  # q6
    for ext in bad:
        assert coverage_information_errors(ext, version), ext


def test_oracle_accepts_the_ig_2_2_1_example() -> None:
    example = load(FIXTURES / "crd/2.2.1/example-CRDServiceResponse-coverage-information.json")
    assert coverage_information_errors(example, "2.2.1") == []
    assert "detail" in model("2.0.1")["subs"] and "expiry-date" not in model("2.0.1")["subs"]

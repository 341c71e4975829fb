"""Documentation forms as data: checked against the policies (every kind of missing fact a policy can report
is asked by a section, answers drawn from the policy's value sets), compiled into DTR Questionnaires, and
pre-filled both ways: the service's draft and a DTR client's FHIRPath pre-population agree on the same chart."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
from pathlib import Path
from typing import Any

import fhirpathpy
import pytest
from fhirpathpy.models import models

from cds_service.dtr import gaps as gap_reports
from cds_service.dtr.forms import FormSet, check_forms, form_version, load_form, load_forms, rules_of
from cds_service.dtr.questionnaire import questionnaire
from cds_service.engine.decision import Outcome
from cds_service.engine.policy import PolicySet
from cds_service.hooks.service import CoverageService

from .dtr_client import FhirServer, answers
from .support import FIXTURES, ROOT, SCENARIOS, SERVICE_FOR_HOOK, load, make_config, scenario_request

FORMS = ROOT / "policies" / "forms"


def shipped(policies: PolicySet) -> FormSet:
    return load_forms(FORMS, policies)


def test_the_shipped_forms_ask_for_everything_the_policies_can_report(policies: PolicySet) -> None:
    assert check_forms(policies, shipped(policies)) == []


def test_a_kind_no_section_asks_for_is_named(policies: PolicySet) -> None:
    forms = shipped(policies)
    form = forms.for_policy("MP-442")
    assert form is not None
    form.sections = [s for s in form.sections if s.id != "trial"]
    assert check_forms(policies, forms) == ["mp-442: no section asks for 'trial@chronic-intractable-pain' (MP-442 "
                                            "can report it missing)"]


def test_an_answer_outside_the_policy_value_sets_is_named(policies: PolicySet) -> None:
    forms = shipped(policies)
    form = forms.for_policy("MP-446")
    assert form is not None
    drugs = form.answer_lists["drugs"]
    form.answer_lists["drugs"] = dataclasses.replace(drugs, answers=(*drugs.answers, dataclasses.replace(
        drugs.answers[0], code="7052", display="morphine")))
    assert check_forms(policies, forms) == ["mp-446: answers.drugs: rxnorm|7052 is in none of ketamine, lidocaine"]


def test_a_criterion_kind_the_checker_does_not_know_is_a_problem(policies: PolicySet,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    forms = shipped(policies)
    monkeypatch.delitem(gap_reports.REPORTS, "drug_failure")
    problems = check_forms(policies, forms)
    assert problems == ["MP-442: criterion kind 'drug_failure': which missing facts it reports is not known (add it "
                        "to cds_service/dtr/gaps.py REPORTS)"]


def test_a_policy_without_a_form_is_named(policies: PolicySet) -> None:
    forms = shipped(policies)
    del forms.forms["MP-446"]
    (problem,) = check_forms(policies, forms)
    assert problem.startswith("MP-446: no documentation form, and the policy can report missing ")


def test_names_a_form_uses_must_exist(policies: PolicySet, tmp_path: Path) -> None:
    text = (FORMS / "mp-446.yaml").read_text().replace("asks: [route]", "asks: [route@no-such-rule, dosage]") \
        .replace("Condition?patient={{%patient.id}}", "Condition?patient={{%patient.id}}&onset-date=ge2020")
    (tmp_path / "mp-446.yaml").write_text(text)
    forms = FormSet({"MP-446": load_form(tmp_path / "mp-446.yaml"), "MP-442": load_form(FORMS / "mp-442.yaml")})
    problems = check_forms(policies, forms)
    assert any(p.startswith("mp-446: section route asks for dosage: not a kind of missing fact a form can collect")
               for p in problems)
    assert any("MP-446 has no rule 'no-such-rule'" in p for p in problems)
    assert any("search parameter 'onset-date' is not one the service can answer" in p for p in problems)


def test_every_gap_the_scenarios_produce_is_predicted_and_asked(service: CoverageService) -> None:
    """The checker's reading of the policies (gaps.py) against what the engine really reports: each gap of
    every conditional scenario decision is among the policy's predicted kinds, and a section asks for it."""
    seen = 0
    for path in SCENARIOS:
        body = scenario_request(load(path))
        result = asyncio.run(service.handle(SERVICE_FOR_HOOK[body["hook"]], body, "https://cds.example.org"))
        for decision in result.decisions:
            if decision.outcome is not Outcome.CONDITIONAL or decision.technical:
                continue
            policy = service.policies.get(decision.policy_id)
            form = service.documentation.forms.for_policy(decision.policy_id)
            assert policy is not None and form is not None
            predicted = gap_reports.emitted_gaps(policy)
            for gap in decision.gaps:
                seen += 1
                rules = rules_of(decision)
                key = [k for k in predicted if k.kind == gap.kind and (k.rule is None or k.rule in rules)
                       and (k.about is None or k.about == gap.about)]
                assert key, f"{path.name}: {gap.kind}:{gap.about}@{sorted(rules)} not predicted"
            unasked = [g for g in decision.gaps if g.kind != "technical" and not form.sections_for([g], rules)]
            assert unasked == [], path.name
    assert seen > 20


def test_the_version_follows_the_policy_and_the_form(policies: PolicySet) -> None:
    form = shipped(policies).for_policy("MP-442")
    policy = policies.get("MP-442")
    assert form is not None and policy is not None
    changed_policy = dataclasses.replace(policy, version=policy.version[:-1] + "x")
    changed_form = dataclasses.replace(form, digest="0" * 64)
    versions = {form.version, form_version(changed_policy, form), form_version(policy, changed_form)}
    assert len(versions) == 3 and all("|" not in v for v in versions)
    assert form.version.startswith(policy.latest_review + ".")


def test_items_carry_codes_and_versioned_answer_value_sets(policies: PolicySet) -> None:
    form = shipped(policies).for_policy("MP-442")
    assert form is not None
    q = questionnaire(form, "https://payer.example", policies.systems, "Example Health Plan")
    items = q["item"]
    assert all(i.get("code") for i in items)
    pain = next(i for i in items if i["linkId"] == "pain-score")
    assert pain["code"][0] == {"system": "http://loinc.org", "code": "72514-3",
                               "display": "Pain severity - 0-10 verbal numeric rating [Score] - Reported"}
    choice = [i for i in items if i["type"] == "choice" and i["linkId"] != "sections"]
    assert choice and all(i["answerValueSet"].endswith("|" + form.version) for i in choice)
    assert all(i.get("enableWhen") for i in items if i["linkId"] != "sections")


# --- pre-filled both ways ------------------------------------------------------------------------------------


def client_prefill(q: dict[str, Any], record: dict[str, Any], patient: str) -> dict[str, Any]:
    """What a DTR client's SDC pre-population gives: each variable's x-fhir-query run on the EHR (the record
    served by a FHIR server), then each item's initialExpression (FHIRPath, fhirpathpy with the R4 model)."""
    server = FhirServer([e["resource"] for e in record["entry"]])
    import httpx

    client = httpx.Client(transport=httpx.MockTransport(server), base_url="http://ehr.example/fhir/")
    variables = {}
    for ext in q["extension"]:
        if ext["url"].endswith("/variable"):
            query = ext["valueExpression"]["expression"].replace("{{%patient.id}}", patient)
            variables[ext["valueExpression"]["name"]] = client.get(query).json()
    out = {}
    for item in q["item"]:
        for ext in item.get("extension", []):
            if ext["url"].endswith("sdc-questionnaire-initialExpression"):
                result = fhirpathpy.evaluate({}, ext["valueExpression"]["expression"], variables, models["r4"])
                if result:
                    out[item["linkId"]] = result[0]
    return out


def same(server_answer: Any, client_answer: Any) -> bool:
    if isinstance(server_answer, dict):
        return (server_answer["system"], server_answer["code"]) == (client_answer["system"], client_answer["code"])
    return bool(server_answer == client_answer)


@pytest.mark.parametrize("request_name, record_name", [
    ("order-sign-pump-chronic-pain-no-trial", "record-pump-no-trial"),
])
def test_the_draft_and_a_clients_fhirpath_agree_on_the_chart(request_name: str, record_name: str,
                                                            tmp_path: Path, sqlite_url: str) -> None:
    from starlette.testclient import TestClient

    from cds_service.web.app import create_app

    from .dtr_client import PACKAGE, SIGN, bundle_of, coverage_info, hook, package_request

    record = load(FIXTURES / "dtr" / f"{record_name}.json")
    with TestClient(create_app(make_config(sqlite_url))) as app:
        body = hook(request_name, server=False)
        info = coverage_info(app.post(SIGN, json=body).json(), "ServiceRequest/pump")
        bundle = bundle_of(app.post(PACKAGE, json=package_request(body, info)).json())
    q = bundle["entry"][0]["resource"]
    server = {k: v[0] for k, v in answers(bundle["entry"][1]["resource"]).items() if k != "sections"}
    client = client_prefill(copy.deepcopy(q), record, "p1")
    assert server and set(server) <= set(client)
    assert all(same(server[k], client[k]) for k in server), (server, client)
    # the EHR holds a pain score the hook's prefetch did not carry: the client fills it, the payer could not
    assert client["pain-score"] == 6 and "pain-score" not in server

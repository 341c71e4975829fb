"""Clinical scenarios, table-driven: each file in fixtures/scenarios holds the draft orders, the
patient's record, and the decisions expected per order (policy, outcome, rule, evidence, missing)."""

from __future__ import annotations

import asyncio
import copy
import re
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class

from cds_service.engine.decision import GAP_KINDS
from cds_service.hooks.cards import escape_markdown
from cds_service.hooks.service import CoverageService, HookResult

from .support import FIXTURES, SCENARIOS, SERVICE_FOR_HOOK, coverage_extension, load, scenario_request


def run(service: CoverageService, body: dict[str, Any]) -> HookResult:
    return asyncio.run(service.handle(SERVICE_FOR_HOOK[body["hook"]], body, "https://cds.example.org"))


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario_fixtures_are_valid_fhir(path: Path) -> None:
    scenario = load(path)
    orders = [f"{o['resourceType']}/{o['id']}" for o in scenario["orders"]]
    assert len(orders) == len(set(orders)), "draft orders need distinct ids"
    extra = [e["resource"] for e in scenario.get("draft_extra", [])]
    for resource in [*scenario["orders"], *scenario["record"], *extra]:
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario(path: Path, service: CoverageService) -> None:
    scenario = load(path)
    result = run(service, scenario_request(scenario))
    decisions = {(d.order_reference, d.policy_id): d for d in result.decisions}
    cards = result.response["cards"]
    actions = result.response.get("systemActions", [])
    decided = []
    for expected in scenario["expect"]:
        decision = decisions.get((expected["order"], expected["policy"]))
        assert decision is not None, f"no {expected['policy']} decision for {expected['order']}"
        assert decision.outcome.value == expected["outcome"], decision.explain()
        if "rule" in expected:
            assert decision.rule_id == expected["rule"], decision.explain()
        refs = {e.reference for e in decision.evidence}
        for ref in expected.get("evidence", []):
            assert any(ref in r for r in refs), (ref, refs)
        if "missing_contains" in expected:
            assert any(expected["missing_contains"] in m for m in decision.missing), decision.missing
        if "reason_contains" in expected:
            assert expected["reason_contains"] in decision.reason, decision.reason
        if "missing_count" in expected:
            assert len(decision.missing) == expected["missing_count"], decision.missing
        if "text_read" in expected:
            assert bool(decision.text_read) is expected["text_read"], decision.text_read
        if decision.outcome.value == "conditional":  # what is missing is structured, for documentation forms
            kinds = [g.kind for g in decision.gaps]
            assert kinds and all(k in GAP_KINDS and k != "other" for k in kinds), decision.gaps
        assert len(decision.evidence) == len(set(decision.evidence)), "repeated evidence lines"
        assert "{drug}" not in str(decision.explain())
        if expected["outcome"] != "out-of-scope":
            decided.append((expected, decision))
    # per decided order: the card with its summary (Instructions, without links, when the decision waits on
    # documentation; else External Reference, with the policy link), one systemAction; nothing for the rest
    def card_for(reference: str) -> dict[str, Any]:
        found: list[dict[str, Any]] = [
            c for c in cards if c["extension"]["davinci-crd.associated-resource"][0]["reference"] == reference]
        assert len(found) == 1, found  # the scenarios' records hold a Coverage and can be read
        return found[0]

    assert len(cards) == len(decided)
    acted = sorted(a["resource"]["resourceType"] + "/" + a["resource"]["id"] for a in actions)
    if scenario["hook"] == "order-select":
        assert acted == sorted(e["order"] for e, _ in decided)
    else:  # CRD hook-16: every order of a primary hook carries coverage information
        assert acted == sorted(f"{o['resourceType']}/{o['id']}" for o in scenario["orders"])
        decided_orders = {e["order"] for e, _ in decided}
        for action in actions:
            if f"{action['resource']['resourceType']}/{action['resource']['id']}" not in decided_orders:
                reason = coverage_extension(action["resource"])["reason"]["valueCodeableConcept"]["text"]
                assert reason.startswith("Not assessed by this service"), reason
    for expected, decision in decided:
        card = card_for(expected["order"])
        assert ("links" in card) is not (decision.outcome.value == "conditional" and bool(decision.missing))
        assert len(card["summary"]) < 140
        assert expected["policy"] in card["summary"]
        if "summary_contains" in expected:
            assert expected["summary_contains"] in card["summary"], card["summary"]
        if "summary_excludes" in expected:
            assert expected["summary_excludes"] not in card["summary"], card["summary"]
        if decision.rule_id == "indication-not-recognised" or decision.indication is None:
            assert "Indication considered" not in card["detail"]  # never beside "not recognised"
        assert card["indicator"] == ("warning" if expected["outcome"] == "not-covered" else "info")
        action = next(a for a in actions
                      if a["resource"]["resourceType"] + "/" + a["resource"]["id"] == expected["order"])
        ext = coverage_extension(action["resource"])
        assert ext["covered"]["valueCode"] == expected["outcome"]
        for evidence in expected.get("evidence", []):
            assert evidence in card["detail"]
        todo = card["detail"]
        for missing in decision.missing:
            assert escape_markdown(missing) in todo
        if scenario["hook"] == "order-select":
            assert "doc-needed" not in ext
            assert "by the time the order is signed" in todo or not decision.missing


def test_ehr_text_cannot_inject_markdown_into_the_card(service: CoverageService) -> None:
    scenario = load(FIXTURES / "scenarios" / "mp446-ketamine-iv-chronic-pain.json")
    hostile = "CRPS [see here](https://evil.example/x) <img src=x onerror=alert(1)> **now**\n# heading"
    order = scenario["orders"][0]
    order["medicationCodeableConcept"]["coding"][0]["display"] = hostile
    order["reasonCode"][0]["coding"][0]["display"] = hostile
    order["reasonCode"][0]["text"] = hostile
    detail = run(service, scenario_request(scenario)).response["cards"][0]["detail"]
    assert "](https://evil" not in detail and "[see here]" not in detail
    assert re.search(r"(?<!\\)<img", detail) is None  # only as an escaped, literal "\<"
    assert "**now**" not in detail
    assert "\n# heading" not in detail
    assert "evil\\.example" in detail  # the text is shown, but inert (no autolink either)


def test_system_action_returns_the_order_as_sent_plus_coverage_information(service: CoverageService) -> None:
    scenario = load(FIXTURES / "scenarios" / "mp446-ketamine-iv-chronic-pain.json")
    own = {"url": "http://ehr.example.org/fhir/StructureDefinition/order-origin", "valueString": "favorites"}
    scenario["orders"][0]["extension"] = [own]
    body = scenario_request(scenario)
    sent = copy.deepcopy(body)
    updated = run(service, body).response["systemActions"][0]["resource"]
    assert body == sent  # the request is not modified
    assert updated["extension"][0] == own
    assert updated["extension"][1]["url"].endswith("/ext-coverage-information")
    assert {k: v for k, v in updated.items() if k != "extension"} == {
        k: v for k, v in sent["context"]["draftOrders"]["entry"][0]["resource"].items() if k != "extension"}

"""Clinical scenarios, table-driven: each file in fixtures/scenarios holds the draft orders, the
patient's record, and the decisions expected per order (policy, outcome, rule, evidence, missing)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class

from cds_service.hooks.cards import escape_markdown
from cds_service.hooks.service import CoverageService, HookResult

from .support import SCENARIOS, SERVICE_FOR_HOOK, coverage_extension, load, scenario_request


def run(service: CoverageService, body: dict[str, Any]) -> HookResult:
    return asyncio.run(service.handle(SERVICE_FOR_HOOK[body["hook"]], body, "https://cds.example.org"))


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario_fixtures_are_valid_fhir(path: Path) -> None:
    scenario = load(path)
    for resource in [*scenario["orders"], *scenario["record"]]:
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
            assert expected["reason_contains"] in decision.reason
        if expected["outcome"] != "out-of-scope":
            decided.append((expected, decision))
    # exactly one card and one systemAction per decided order, and nothing for the rest
    assert len(cards) == len(decided)
    assert sorted(a["resource"]["resourceType"] + "/" + a["resource"]["id"] for a in actions) == sorted(
        e["order"] for e, _ in decided)
    for expected, decision in decided:
        card = next(c for c in cards
                    if c["extension"]["davinci-crd.associated-resource"][0]["reference"] == expected["order"])
        assert len(card["summary"]) < 140
        assert expected["policy"] in card["summary"]
        if "summary_contains" in expected:
            assert expected["summary_contains"] in card["summary"], card["summary"]
        assert card["indicator"] == ("warning" if expected["outcome"] == "not-covered" else "info")
        action = next(a for a in actions
                      if a["resource"]["resourceType"] + "/" + a["resource"]["id"] == expected["order"])
        ext = coverage_extension(action["resource"])
        assert ext["covered"]["valueCode"] == expected["outcome"]
        for evidence in expected.get("evidence", []):
            assert evidence in card["detail"]
        for missing in decision.missing:
            assert escape_markdown(missing) in card["detail"]
        if scenario["hook"] == "order-select":
            assert "doc-needed" not in ext
            assert "Documentation needed" not in card["detail"]

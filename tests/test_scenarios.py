"""Clinical scenarios, table-driven: each file in fixtures/scenarios holds the draft orders, the
patient's record, and the decisions expected per order (policy, outcome, rule, evidence, missing)."""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import re
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class

from cds_service.hooks.cards import escape_markdown
from cds_service.hooks.scenarios import check_run, format_problems, run_scenario, scenario_date
from cds_service.hooks.service import CoverageService

from .support import FIXTURES, SCENARIOS, coverage_extension, load, run, scenario_request


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario_fixtures_are_valid_fhir(path: Path) -> None:
    scenario = load(path)
    extra = [e["resource"] for e in scenario.get("draft_extra", [])]
    for resource in [*scenario["orders"], *scenario["record"], *extra]:
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario_file_is_in_the_scenario_format(path: Path) -> None:
    assert format_problems(load(path)) == []


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario(path: Path, service: CoverageService) -> None:
    """Every check of ``cds-service policy check`` (cds_service.hooks.scenarios.CHECKS), then the cards and
    systemActions of the answer."""
    scenario = load(path)
    assert scenario_date(scenario) == dt.date(2026, 6, 1)  # the service fixture's day
    decided_run = asyncio.run(run_scenario(service, scenario, path.stem))
    assert check_run(decided_run) == []
    result = decided_run.result
    cards = result.response["cards"]
    actions = result.response.get("systemActions", [])
    decided = [(expected, decided_run.decision(expected["order"], expected["policy"]))
               for expected in scenario["expect"] if expected["outcome"] != "out-of-scope"]
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
        assert decision is not None
        card = card_for(expected["order"])
        version = f"Policy version: `{decision.policy_version}`"
        assert version in card["detail"]  # the version line (cards/*.j2)
        for extra in cards:
            if extra["extension"]["davinci-crd.associated-resource"][0]["reference"] == expected["order"]:
                assert version in extra["detail"], extra
        assert ("links" in card) is not (decision.outcome.value == "conditional" and bool(decision.missing))
        assert len(card["summary"]) < 140
        assert expected["policy"] in card["summary"]
        if decision.rule_id == "indication-not-recognised" or decision.indication is None:
            assert "Indication considered" not in card["detail"]  # never beside "not recognised"
        assert card["indicator"] == ("warning" if expected["outcome"] == "not-covered" else "info")
        action = next(a for a in actions
                      if a["resource"]["resourceType"] + "/" + a["resource"]["id"] == expected["order"])
        ext = coverage_extension(action["resource"])
        assert ext["covered"]["valueCode"] == expected["outcome"]
        assert ext["reason"]["valueCodeableConcept"]["text"].endswith(f"Policy version: {decision.policy_version}.")
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

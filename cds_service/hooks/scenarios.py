"""Scenario files: a policy analyst's tests of the policy files, without Python.

A scenario (``fixtures/scenarios/*.json``) holds a hook (``order-sign``, ``order-select``, ...), the draft
``orders``, the patient's ``record`` (FHIR resources), optionally ``selections`` (order-select),
``draft_extra`` (more draftOrders entries, e.g. a Medication with its fullUrl) and ``date`` (the day the
orders are decided on, default :data:`SCENARIO_DATE`), and what is expected per order under ``expect``:

    {"order": "ServiceRequest/pump", "policy": "MP-442", "outcome": "conditional", "rule": "...",
     "evidence": ["Procedure/trial"], "missing_contains": "...", "reason_contains": "...",
     "missing_count": 2, "text_read": false, "summary_contains": "...", "summary_excludes": "..."}

(``order``, ``policy`` and ``outcome`` required, the rest optional). Running a scenario builds the hook
request an EHR would send (every advertised prefetch key filled from the record) and decides it with a
:class:`~cds_service.hooks.service.CoverageService`, offline. What is then checked is a list of checks,
:data:`CHECKS`: each takes the :class:`ScenarioRun` and returns its problems (empty: passed). To add one
(e.g. that documentation forms cover every kind of missing evidence), write a function
``(ScenarioRun) -> list[str]`` and append it to :data:`CHECKS`: ``cds-service policy check`` and the
scenario tests run every check in the list.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..dtr import evidence as form_evidence
from ..engine.decision import GAP_KINDS, Decision, Outcome
from ..engine.requirements import PREFETCH_KEYS as ENGINE_PREFETCH_KEYS
from ..errors import ServiceError
from ..jsonutil import JSONDecodeError, loads
from .service import SERVICES, CoverageService, HookResult

#: the day scenarios are decided on unless they say otherwise (``date``): the day they were written for
SCENARIO_DATE = dt.date(2026, 6, 1)
#: the service (endpoint) id for each hook
SERVICE_FOR_HOOK = {hook: service_id for service_id, hook in SERVICES.items()}
#: the prefetch key under which each resource type of a scenario's record is sent: every key discovery advertises
PREFETCH_KEYS = {**ENGINE_PREFETCH_KEYS, "QuestionnaireResponse": form_evidence.PREFETCH_KEY}
_EXPECT_KEYS = {"order", "policy", "outcome", "rule", "evidence", "missing_contains", "reason_contains",
                "missing_count", "text_read", "summary_contains", "summary_excludes"}
_KEYS = {"description", "hook", "orders", "record", "expect", "selections", "draft_extra", "date"}
#: base URL the scenario requests are answered for (policy links in cards)
BASE_URL = "https://cds.example.org"


class ScenarioError(ValueError):
    """A scenario file that cannot be read or is not in the scenario format; the message names the place."""


def searchset(resources: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(resources),
        "entry": [{"fullUrl": f"http://ehr.example/fhir/{r['resourceType']}/{r.get('id')}", "resource": r}
                  for r in resources],
    }


def prefetch_for(record: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Every advertised prefetch key, each a searchset of the record's resources of its type (a Medication
    as the medication list's ``_include`` brings it)."""
    out: dict[str, Any] = {key: searchset([]) for key in PREFETCH_KEYS.values()}
    for resource in record:
        if resource["resourceType"] == "Medication":
            out["medicationRequests"]["entry"].append({"resource": resource, "search": {"mode": "include"}})
            continue
        key = PREFETCH_KEYS.get(resource["resourceType"])
        if key:
            out[key]["entry"].append({"resource": resource})
            out[key]["total"] += 1
    return out


def hook_request(orders: Sequence[Mapping[str, Any]], record: Sequence[Mapping[str, Any]] | None = None, *,
                 hook: str = "order-sign", selections: Sequence[str] | None = None,
                 prefetch: Mapping[str, Any] | None = None, draft_extra: Sequence[Mapping[str, Any]] | None = None,
                 **extra: Any) -> dict[str, Any]:
    """A hook request for ``orders`` (the draftOrders Bundle, plus ``draft_extra`` entries), with every
    advertised prefetch key built from ``record`` (unless ``prefetch`` is given)."""
    entries = [{"fullUrl": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, o['resourceType'] + '/' + o['id'])}",
                "resource": o} for o in orders]
    context: dict[str, Any] = {
        "userId": "Practitioner/dr1",
        "patientId": "p1",
        "draftOrders": {"resourceType": "Bundle", "type": "collection", "entry": [*entries, *(draft_extra or [])]},
    }
    if hook == "order-select":
        context["selections"] = list(selections or [f"{orders[0]['resourceType']}/{orders[0]['id']}"])
    body: dict[str, Any] = {
        "hook": hook,
        "hookInstance": str(uuid.uuid4()),
        "context": context,
        "prefetch": dict(prefetch) if prefetch is not None else prefetch_for(record or []),
    }
    body.update(extra)
    return body


def scenario_request(scenario: Mapping[str, Any]) -> dict[str, Any]:
    """The hook request an EHR would send for the scenario."""
    return hook_request(scenario["orders"], scenario["record"], hook=scenario["hook"],
                        selections=scenario.get("selections"), draft_extra=scenario.get("draft_extra"))


def scenario_date(scenario: Mapping[str, Any]) -> dt.date:
    return dt.date.fromisoformat(scenario["date"]) if "date" in scenario else SCENARIO_DATE


def format_problems(scenario: Any) -> list[str]:
    """What keeps ``scenario`` (parsed JSON) from being a scenario; empty when it is one."""
    if not isinstance(scenario, Mapping):
        return ["not a JSON object"]
    problems = [f"unknown key {k!r}" for k in sorted(set(scenario) - _KEYS)]
    if scenario.get("hook") not in SERVICE_FOR_HOOK:
        problems.append(f"hook must be one of {sorted(SERVICE_FOR_HOOK)}")
    for key in ("orders", "record", "expect"):
        if not isinstance(scenario.get(key), list):
            problems.append(f"{key} must be a list")
    orders: list[Any] = scenario["orders"] if isinstance(scenario.get("orders"), list) else []
    record: list[Any] = scenario["record"] if isinstance(scenario.get("record"), list) else []
    expect: list[Any] = scenario["expect"] if isinstance(scenario.get("expect"), list) else []
    if not orders:
        problems.append("orders must hold at least one order")
    for i, resource in enumerate([*orders, *record]):
        if not isinstance(resource, Mapping) or not isinstance(resource.get("resourceType"), str) \
                or not isinstance(resource.get("id"), str):
            problems.append(f"resource {i} needs a resourceType and an id")
    names = [f"{o.get('resourceType')}/{o.get('id')}" for o in orders if isinstance(o, Mapping)]
    if len(names) != len(set(names)):
        problems.append("draft orders need distinct ids")
    for i, expected in enumerate(expect):
        if not isinstance(expected, Mapping) or not {"order", "policy", "outcome"} <= set(expected):
            problems.append(f"expect[{i}] needs order, policy and outcome")
            continue
        problems += [f"expect[{i}]: unknown key {k!r}" for k in sorted(set(expected) - _EXPECT_KEYS)]
        if expected["outcome"] not in {o.value for o in Outcome}:
            problems.append(f"expect[{i}]: outcome must be one of {sorted(o.value for o in Outcome)}")
    if "date" in scenario:
        try:
            scenario_date(scenario)
        except (TypeError, ValueError):
            problems.append("date must be an ISO date (YYYY-MM-DD)")
    return problems


def load_scenario(path: Path) -> dict[str, Any]:
    """A scenario file, parsed and checked for the format (ScenarioError names what is wrong)."""
    try:
        data = loads(path.read_bytes())
    except OSError as error:
        raise ScenarioError(f"{path.name}: cannot be read ({error.strerror})") from None
    except JSONDecodeError as error:
        raise ScenarioError(f"{path.name}: not valid JSON ({error.msg})") from None
    problems = format_problems(data)
    if problems:
        raise ScenarioError(f"{path.name}: " + "; ".join(problems))
    return dict(data)


@dataclass(frozen=True)
class ScenarioRun:
    """One scenario, decided: what every check looks at."""

    name: str
    scenario: Mapping[str, Any]
    result: HookResult
    service: CoverageService

    def decision(self, order: str, policy: str) -> Decision | None:
        return next((d for d in self.result.decisions if d.order_reference == order and d.policy_id == policy), None)


async def run_scenario(service: CoverageService, scenario: Mapping[str, Any], name: str = "") -> ScenarioRun:
    """Decide the scenario with ``service`` (whose ``today`` should be :func:`scenario_date`)."""
    body = scenario_request(scenario)
    result = await service.handle(SERVICE_FOR_HOOK[scenario["hook"]], body, BASE_URL)
    return ScenarioRun(name, scenario, result, service)


def _expected(run: ScenarioRun, i: int, expected: Mapping[str, Any]) -> list[str]:
    where = f"{expected['policy']} decision for {expected['order']}"
    decision = run.decision(expected["order"], expected["policy"])
    if decision is None:
        return [f"no {where}"]
    found = f"(rule {decision.rule_id}, outcome {decision.outcome.value})"
    problems = []
    if decision.outcome.value != expected["outcome"]:
        problems.append(f"{where}: outcome {decision.outcome.value}, expected {expected['outcome']} {found}")
    if "rule" in expected and decision.rule_id != expected["rule"]:
        problems.append(f"{where}: rule {decision.rule_id}, expected {expected['rule']}")
    references = {e.reference for e in decision.evidence}
    for reference in expected.get("evidence", []):
        if not any(reference in r for r in references):
            problems.append(f"{where}: no evidence {reference!r} (evidence: {sorted(references)})")
    if "missing_contains" in expected and not any(expected["missing_contains"] in m for m in decision.missing):
        problems.append(f"{where}: nothing missing mentions {expected['missing_contains']!r} "
                        f"(missing: {decision.missing})")
    if "reason_contains" in expected and expected["reason_contains"] not in decision.reason:
        problems.append(f"{where}: the reason does not mention {expected['reason_contains']!r} "
                        f"(reason: {decision.reason!r})")
    if "missing_count" in expected and len(decision.missing) != expected["missing_count"]:
        problems.append(f"{where}: {len(decision.missing)} items missing, expected {expected['missing_count']}")
    if "text_read" in expected and bool(decision.text_read) is not expected["text_read"]:
        problems.append(f"{where}: read from text {decision.text_read}, expected text_read {expected['text_read']}")
    return problems


def expected_decisions(run: ScenarioRun) -> list[str]:
    """Each ``expect`` entry: the decision exists, with the outcome, rule, evidence and missing items expected."""
    return [p for i, expected in enumerate(run.scenario["expect"]) for p in _expected(run, i, expected)]


def well_formed_decisions(run: ScenarioRun) -> list[str]:
    """What every decision must be: structured gaps when conditional (for documentation forms), no repeated
    evidence, no unfilled ``{drug}`` placeholder, and the policy version it was made under."""
    problems = []
    for d in run.result.decisions:
        where = f"{d.policy_id} decision for {d.order_reference}"
        if d.outcome is Outcome.CONDITIONAL:
            kinds = [g.kind for g in d.gaps]
            if not kinds or not all(k in GAP_KINDS and k != "other" for k in kinds):
                problems.append(f"{where}: conditional without a known kind for each missing item ({kinds})")
        if len(d.evidence) != len(set(d.evidence)):
            problems.append(f"{where}: repeated evidence lines")
        if "{drug}" in str(d.explain()):
            problems.append(f"{where}: an unfilled {{drug}} placeholder")
        policy = run.service.policies.get(d.policy_id)
        if policy is None or d.policy_version != policy.version:
            problems.append(f"{where}: policy version {d.policy_version!r} is not the loaded one")
    return problems


def expected_summaries(run: ScenarioRun) -> list[str]:
    """``summary_contains`` / ``summary_excludes``: the summary of the order's first card says / does not say
    it."""
    problems = []
    for expected in run.scenario["expect"]:
        wanted, unwanted = expected.get("summary_contains"), expected.get("summary_excludes")
        if wanted is None and unwanted is None:
            continue
        summaries = [card.get("summary", "") for card in run.result.response.get("cards", [])
                     if card.get("extension", {}).get("davinci-crd.associated-resource", [{}])[0].get("reference")
                     == expected["order"]]
        where = f"the card for {expected['order']}"
        if not summaries:
            problems.append(f"no card for {expected['order']}")
        elif wanted is not None and wanted not in summaries[0]:
            problems.append(f"{where}: the summary does not say {wanted!r} ({summaries[0]!r})")
        elif unwanted is not None and unwanted in summaries[0]:
            problems.append(f"{where}: the summary says {unwanted!r} ({summaries[0]!r})")
    return problems


Check = Callable[[ScenarioRun], list[str]]
#: every check a scenario must pass (``cds-service policy check`` and tests/test_scenarios.py run them all)
CHECKS: list[Check] = [expected_decisions, well_formed_decisions, expected_summaries]


def check_run(run: ScenarioRun, checks: Sequence[Check] | None = None) -> list[str]:
    """The problems the checks find in one decided scenario (empty: it passes)."""
    return [problem for check in (CHECKS if checks is None else checks) for problem in check(run)]


def check_files(service_for: Callable[[dt.date], CoverageService], paths: Sequence[Path],
                checks: Sequence[Check] | None = None) -> list[tuple[str, list[str]]]:
    """Each scenario file decided (by the service for its date) and checked: ``(name, problems)`` in
    order. A file that is not a scenario, or a request the service refuses, is a failing scenario too."""
    outcomes = []
    for path in paths:
        try:
            scenario = load_scenario(path)
            decided = asyncio.run(run_scenario(service_for(scenario_date(scenario)), scenario, path.stem))
            problems = check_run(decided, checks)
        except ScenarioError as error:
            problems = [str(error).removeprefix(f"{path.name}: ")]
        except ServiceError as error:
            problems = [f"the request built from it was refused: {error}"]
        outcomes.append((path.stem, problems))
    return outcomes

"""The work a decision does is bounded by what it reads, whatever a client sends (issue 15, class 1): long
codes, many pain scores, many invalid scores, many resources of one type."""

from __future__ import annotations

import asyncio
import copy
import time
from typing import Any

import pytest

from cds_service.fhir import record as record_module
from cds_service.hooks.service import CoverageService

from .support import FIXTURES, hook_request, load, scenario_request

TRIAL = FIXTURES / "scenarios" / "mp442-chronic-pain-successful-trial.json"


def pump_decision(service: CoverageService, scenario: dict[str, Any]) -> Any:
    body = scenario_request(scenario)
    result = asyncio.run(service.handle("coverage-requirements-order-sign", body, "https://cds.example.org"))
    return next(d for d in result.decisions if d.order_reference == "ServiceRequest/pump")


def with_scores(scenario: dict[str, Any], count: int, value: Any = 5) -> dict[str, Any]:
    out = copy.deepcopy(scenario)
    base = next(r for r in out["record"] if r["id"] == "pain-base")
    for n in range(count):
        score = copy.deepcopy(base)
        score["id"] = f"extra-{n}"
        score["effectiveDateTime"] = f"2026-0{1 + n % 4}-{1 + n % 28:02d}T{n % 24:02d}:00:00Z"
        score["valueQuantity"] = {"value": value} if not isinstance(value, dict) else value
        out["record"].append(score)
    return out


def test_many_pain_scores_are_judged_in_n_log_n(service: CoverageService) -> None:
    scenario = load(TRIAL)
    pump_decision(service, scenario)  # warm up
    started = time.perf_counter()
    decision = pump_decision(service, with_scores(scenario, 800))
    elapsed = time.perf_counter() - started
    assert decision.outcome.value == "covered"
    assert elapsed < 1.5, elapsed  # quadratic matching took about 4 s here


def test_invalid_scores_cost_a_bounded_number_of_validations(service: CoverageService,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    scenario = load(TRIAL)
    # 200 scores that look numeric to the cheap reader but fail FHIR validation (a quantity with a bad code)
    bad = with_scores(scenario, 200, value={"value": 9, "code": 12})
    for resource in bad["record"]:
        if resource["id"] == "pain-base":
            resource["effectiveDateTime"] = "2026-01-01T00:00:00Z"  # the invalid ones are the latest baselines
    calls = {"n": 0}
    real = record_module.PatientRecord.validated

    def counted(self: record_module.PatientRecord, raw: Any) -> Any:
        calls["n"] += 1
        return real(self, raw)

    monkeypatch.setattr(record_module.PatientRecord, "validated", counted)
    decision = pump_decision(service, bad)
    assert decision.outcome.value in ("covered", "conditional")
    assert calls["n"] < 80, calls["n"]


def test_a_type_with_more_resources_than_the_bound_is_not_read(service: CoverageService,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(record_module, "MAX_PER_TYPE", 50)
    decision = pump_decision(service, with_scores(load(TRIAL), 60))
    assert decision.outcome.value == "conditional"
    assert decision.rule_id == "data-unavailable"
    assert "more than 50 Observation resources" in decision.technical["Observation"]


def test_an_absurdly_long_code_in_a_condition_is_cheap(service: CoverageService) -> None:
    scenario = load(TRIAL)
    scenario["record"][0]["code"]["coding"][0]["code"] = "G89.2" + "9" * 80_000
    started = time.perf_counter()
    decision = pump_decision(service, scenario)
    assert time.perf_counter() - started < 1.0
    assert decision.outcome.value == "covered"  # the order's own reasonCode still decides


def test_a_large_decision_leaves_the_event_loop_free(service: CoverageService,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 15: CPU-heavy work must not stall unrelated requests. While a large call is decided, the event
    loop keeps running other tasks (a small one is decided inline: a thread would only cost it)."""
    scenario = load(TRIAL)
    orders = [dict(o, id=f"{o['id']}-{n}") for n in range(50) for o in scenario["orders"]]
    record = scenario["record"]
    extra = [dict(r, id=f"{r['id']}-{n}") for n in range(100) for r in record if r["resourceType"] == "Condition"]
    body = hook_request(orders, [*record, *extra])
    spans: list[tuple[float, float]] = []
    real = CoverageService.respond

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            spans.append((started, time.perf_counter()))

    monkeypatch.setattr(CoverageService, "respond", timed)

    async def call_and_tick() -> list[float]:
        ticks: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            while not done.is_set():
                ticks.append(time.perf_counter())
                await asyncio.sleep(0.001)

        task = asyncio.create_task(ticker())
        await service.handle("coverage-requirements-order-sign", body, "https://cds.example.org")
        done.set()
        await task
        return ticks

    ticks = asyncio.run(call_and_tick())
    [(start, end)] = spans
    assert end - start > 0.02  # a decision long enough to see
    assert sum(start <= t <= end for t in ticks) >= 5

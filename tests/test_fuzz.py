"""Property-based fuzzing of the hook and feedback endpoints (issue 15): requests mutated from real ones, in
their structure (elements removed, replaced by other JSON of any type, nested deeply, made huge), never get a
5xx, always get JSON, and are answered in bounded time. Fixed seed and example count, so that CI is repeatable."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from cds_service.web.app import create_app

from .support import FIXTURES, load, make_config, scenario_request

SIGN = "/cds-services/coverage-requirements-order-sign"
SELECT = "/cds-services/coverage-requirements-order-select"
FEEDBACK = "/cds-services/coverage-requirements-order-sign/feedback"
BASES = [load(path) for path in sorted((FIXTURES / "requests").glob("*.json"))] + [
    scenario_request(load(FIXTURES / "scenarios" / name)) for name in (
        "mp442-chronic-pain-successful-trial.json", "mp446-ketamine-medication-in-bundle-urn-uuid.json",
        "mp442-baclofen-history-medicationrequest-stopped.json")]
FEEDBACK_BASE = {"feedback": [{"card": "0c2b9b3a-4f1e-4c5a-9a48-8a4c3e6a3e11", "outcome": "overridden",
                               "overrideReason": {"reason": {"code": "x", "display": "Not applicable"},
                                                  "userComment": "n/a"},
                               "outcomeTimestamp": "2026-06-01T10:00:00Z"}]}
#: a mutated request is answered within this many seconds (the bounds on inputs keep work linear)
LATENCY = 5.0

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40),
                      st.sampled_from(["", "Patient/p1", "urn:uuid:x", "http://snomed.info/sct", "G89.29",
                                       "2026-06-01", "active", "draft", "Bearer", "x" * 5000]))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=12)


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from paths(item, (*prefix, index))


def mutate(body: Any, data: st.DataObject, rounds: int) -> Any:
    body = copy.deepcopy(body)
    for _ in range(rounds):
        where = data.draw(st.sampled_from(list(paths(body))))
        action = data.draw(st.sampled_from(["replace", "delete", "nest", "wrap", "duplicate"]))
        if not where:
            body = data.draw(json_value) if action == "replace" else body
            continue
        parent = body
        for key in where[:-1]:
            parent = parent[key]
        key = where[-1]
        if action == "replace":
            parent[key] = data.draw(json_value)
        elif action == "delete":
            del parent[key]
        elif action == "nest":
            nested: Any = parent[key]
            for _ in range(data.draw(st.integers(min_value=1, max_value=300))):
                nested = [nested]
            parent[key] = nested
        elif action == "wrap":  # one object where R4 has a list, or the other way round
            parent[key] = parent[key][0] if isinstance(parent[key], list) and parent[key] else [parent[key]]
        elif action == "duplicate" and isinstance(parent[key], list):
            parent[key] = parent[key] * data.draw(st.integers(min_value=2, max_value=50))
    return body


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    url = f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'cds.sqlite3'}"
    with TestClient(create_app(make_config(url)), raise_server_exceptions=False) as test_client:
        yield test_client


def post(client: TestClient, path: str, body: Any) -> None:
    started = time.perf_counter()
    response = client.post(path, json=body)
    elapsed = time.perf_counter() - started
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.content:
        assert isinstance(response.json(), dict)
    assert elapsed < LATENCY, elapsed


@seed(20261129)
@settings(max_examples=500, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_hook_requests_never_get_a_5xx(client: TestClient, data: st.DataObject) -> None:
    body = mutate(data.draw(st.sampled_from(BASES)), data, data.draw(st.integers(min_value=1, max_value=4)))
    hook = body.get("hook") if isinstance(body, dict) else None
    post(client, SELECT if hook == "order-select" else SIGN, body)


@seed(20261129)
@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_feedback_never_gets_a_5xx(client: TestClient, data: st.DataObject) -> None:
    post(client, FEEDBACK, mutate(FEEDBACK_BASE, data, data.draw(st.integers(min_value=1, max_value=4))))

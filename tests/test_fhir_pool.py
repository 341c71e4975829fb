"""The process's FHIR connections (issue 16): one TLS context and one keep-alive pool per origin, shared by hook
calls, while what belongs to a call (its token) stays with that call's requests."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import respx

from cds_service.fhir.client import SERVER_UNREADABLE, CallBudget, FhirClient, FhirPool, PoolLimits, ReadLimits
from cds_service.hooks.service import CoverageService

from .support import searchset

A = "https://ehr-a.example.org/fhir"
B = "https://ehr-b.example.org:8443/fhir"


async def search(pool: FhirPool, base: str, token: str) -> Any:
    async with FhirClient(base, token, 3.0, pool=pool) as client:
        return await client.search_all({"conditions": "Condition?patient=p1"})


def test_calls_reuse_keep_alive_connections_per_origin_and_one_tls_context(monkeypatch: pytest.MonkeyPatch) -> None:
    contexts: list[Any] = []
    create = httpx.create_ssl_context

    def counted(*args: Any, **kwargs: Any) -> Any:
        contexts.append(create(*args, **kwargs))
        return contexts[-1]

    monkeypatch.setattr(httpx, "create_ssl_context", counted)
    pool = FhirPool()

    async def scenario() -> tuple[Any, ...]:
        with respx.mock(assert_all_called=False) as router:
            router.get(url__startswith=A).mock(return_value=httpx.Response(200, json=searchset([])))
            router.get(url__startswith=B).mock(return_value=httpx.Response(200, json=searchset([])))
            async with pool.connection("https://ehr-a.example.org", 1) as first:
                pass
            await search(pool, A, "t1")
            await search(pool, A, "t2")
            async with pool.connection("https://ehr-a.example.org", 1) as again:
                pass
            await search(pool, B, "t3")
            return first, again, pool.origins(), pool.idle("https://ehr-a.example.org")

    first, again, origins, idle = asyncio.run(scenario())
    assert first is again  # the same kept-alive connection, call after call
    assert idle == 1
    assert origins == ["https://ehr-a.example.org", "https://ehr-b.example.org:8443"]
    assert len(contexts) == 1  # the CA bundle is loaded once for the process


def test_connections_in_use_per_origin_are_bounded() -> None:
    pool = FhirPool(PoolLimits(connections_per_origin=2, keepalive_per_origin=1))

    async def scenario() -> tuple[bool, int]:
        async with pool.connection("https://ehr-0.example.org", 1), pool.connection("https://ehr-0.example.org", 1):
            try:  # a third waits for one, within its time budget
                async with pool.connection("https://ehr-0.example.org", 0.05):
                    pass
                waited = False
            except TimeoutError:
                waited = True
            async with pool.connection("https://ehr-1.example.org", 0.05):  # another origin has its own
                pass
        return waited, pool.idle("https://ehr-0.example.org")

    assert asyncio.run(scenario()) == (True, 1)  # of the two, one is kept alive


def test_each_request_carries_its_own_calls_token_and_no_cookie_of_another_call() -> None:
    pool = FhirPool()
    seen: list[tuple[str | None, str | None]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append((request.headers.get("authorization"), request.headers.get("cookie")))
        return httpx.Response(200, json=searchset([]), headers={"Set-Cookie": "session=abc; Path=/"})

    async def scenario() -> None:
        with respx.mock(assert_all_called=False) as router:
            router.get(url__startswith=A).mock(side_effect=answer)
            router.get(url__startswith=B).mock(side_effect=answer)
            await asyncio.gather(*(search(pool, A, f"token-{i}") for i in range(5)))
            await search(pool, B, "token-b")
            await search(pool, A, None)  # type: ignore[arg-type]

    asyncio.run(scenario())
    assert sorted(str(a) for a, _ in seen[:5]) == [f"Bearer token-{i}" for i in range(5)]
    assert seen[5] == ("Bearer token-b", None)
    assert seen[6] == (None, None)
    assert all(cookie is None for _, cookie in seen)


def test_origins_over_the_bound_are_closed_least_recently_used_first() -> None:
    pool = FhirPool(PoolLimits(origins=2))
    bases = [f"https://ehr-{i}.example.org/fhir" for i in range(3)]

    async def scenario() -> bool:
        with respx.mock(assert_all_called=False) as router:
            router.get(url__startswith="https://").mock(return_value=httpx.Response(200, json=searchset([])))
            async with pool.connection("https://ehr-0.example.org", 1) as oldest:
                pass
            for base in bases[1:]:
                await search(pool, base, "t")
            return oldest.is_closed

    assert asyncio.run(scenario()) is True
    assert pool.origins() == ["https://ehr-1.example.org", "https://ehr-2.example.org"]


def test_a_connection_whose_request_failed_is_not_reused() -> None:
    pool = FhirPool()

    async def scenario() -> tuple[bool, int]:
        try:
            async with pool.connection("https://ehr-0.example.org", 1) as broken:
                raise httpx.ReadError("reset")
        except httpx.ReadError:
            pass
        return broken.is_closed, pool.idle("https://ehr-0.example.org")

    assert asyncio.run(scenario()) == (True, 0)


def test_the_service_keeps_its_pool_across_calls_and_closes_it(service: CoverageService) -> None:
    async def scenario() -> tuple[list[str], list[str]]:
        with respx.mock(assert_all_called=False) as router:
            router.get(url__startswith=A).mock(return_value=httpx.Response(200, json=searchset([])))
            await search(service.fhir_pool, A, "t")
            await search(service.fhir_pool, A, "t")
            before = service.fhir_pool.origins()
            await service.aclose()
            return before, service.fhir_pool.origins()

    assert asyncio.run(scenario()) == (["https://ehr-a.example.org"], [])


def test_a_kept_alive_connection_the_server_closed_is_retried_once_on_a_new_one() -> None:
    pool = FhirPool()
    answers: Iterator[httpx.Response | Exception] = iter([httpx.Response(200, json=searchset([])),
                    httpx.RemoteProtocolError("Server disconnected without sending a response."),
                    httpx.Response(200, json=searchset([]))])

    def answer(request: httpx.Request) -> httpx.Response:
        item = next(answers)
        if isinstance(item, Exception):
            raise item
        return item

    async def scenario() -> tuple[Any, Any, int]:
        with respx.mock(assert_all_called=False) as router:
            route = router.get(url__startswith=A).mock(side_effect=answer)
            first = await search(pool, A, "t")
            second = await search(pool, A, "t")  # its kept-alive connection fails: read again on a new one
            return first, second, route.call_count

    first, second, calls = asyncio.run(scenario())
    assert first == {"conditions": []} and second == {"conditions": []}
    assert calls == 3


def test_a_server_that_keeps_failing_is_not_retried_forever() -> None:
    pool = FhirPool()

    async def scenario() -> tuple[Any, int]:
        with respx.mock(assert_all_called=False) as router:
            route = router.get(url__startswith=A).mock(side_effect=httpx.RemoteProtocolError("reset"))
            result = await search(pool, A, "t")
            return result["conditions"], route.call_count

    failure, calls = asyncio.run(scenario())
    assert failure.reason == SERVER_UNREADABLE
    assert calls == 2  # once, then once more on a new connection


def test_the_read_limits_bound_the_whole_call_across_its_clients() -> None:
    """The completed forms, the record and referenced Medications are read by separate clients of one call:
    what they read together stays within the call's limits, and its one deadline."""
    condition = {"resourceType": "Condition", "id": "c", "subject": {"reference": "Patient/p1"}}
    limits = ReadLimits(max_total_bytes=1_000_000, max_resources=5)

    async def scenario() -> tuple[Any, Any, Any]:
        pool = FhirPool()
        call = CallBudget(limits, 3.0)
        with respx.mock(assert_all_called=False) as router:
            router.get(url__startswith=f"{A}/Condition").mock(
                return_value=httpx.Response(200, json=searchset([condition] * 3)))
            async with FhirClient(A, "t", 3.0, limits=limits, pool=pool, call=call) as first:
                one = await first.search_all({"conditions": "Condition?patient=p1"})
            async with FhirClient(A, "t", 3.0, limits=limits, pool=pool, call=call) as second:
                two = await second.search_all({"conditions": "Condition?patient=p1"})
            async with FhirClient(A, "t", 3.0, limits=limits, pool=pool) as alone:
                three = await alone.search_all({"conditions": "Condition?patient=p1"})
        await pool.aclose()
        return one["conditions"], two["conditions"], three["conditions"]

    first, second, alone = asyncio.run(scenario())
    assert isinstance(first, list) and isinstance(alone, list)  # 3 of 5, and a client outside the call
    assert not isinstance(second, list) and "more data than this service reads" in second.reason


def test_a_call_whose_deadline_has_passed_reads_nothing_more() -> None:
    async def scenario() -> Any:
        pool = FhirPool()
        with respx.mock(assert_all_called=False) as router:
            route = router.get(url__startswith=f"{A}/Condition").mock(
                return_value=httpx.Response(200, json=searchset([])))
            async with FhirClient(A, "t", 3.0, pool=pool, call=CallBudget(ReadLimits(), 0.0)) as client:
                found = await client.search_all({"conditions": "Condition?patient=p1"})
        await pool.aclose()
        return found["conditions"], route.call_count

    found, calls = asyncio.run(scenario())
    assert not isinstance(found, list) and found.reason == SERVER_UNREADABLE and calls == 0

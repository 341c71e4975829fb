"""Patient-scoped searches against the EHR's FHIR server, with the hook's Bearer token.

Only the request's own ``fhirServer`` is contacted: ``next`` links are checked (in canonical form, see
:mod:`cds_service.urls`) to lie under it, and are not followed otherwise. Searches run concurrently within one
time budget and share one cap on what a hook call may read (:class:`ReadLimits`: total bytes and resources);
a page over ``MAX_PAGE_BYTES`` (read as a stream, never held whole) or past ``MAX_PAGES`` is refused too.
A search that fails is reported as a :class:`Failure`, never raised. When the server misbehaves (an HTTP
error, a timeout, a refused connection, garbage) the reason is the generic :data:`SERVER_UNREADABLE`, so that
a clinician-facing card cannot serve as a port scanner's oracle; the detail goes to the log only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from ..jsonutil import JSONDecodeError, loads
from ..urls import UrlError, canonical_url, url_under
from .bundles import Failure, next_link, resources_in

log = logging.getLogger("cds_service.fhir")

MAX_PAGES = 20
MAX_PAGE_BYTES = 32 * 1024 * 1024  # one page of search results; a larger answer is a fault, not data
SERVER_UNREADABLE = "the EHR's FHIR server could not be read"


@dataclass(frozen=True)
class ReadLimits:
    """What one hook call may read from the FHIR server, over all its searches and pages."""

    max_total_bytes: int = 16 * 1024 * 1024
    max_resources: int = 10_000

    def exceeded(self) -> Failure:
        return Failure(f"the EHR's FHIR server returned more data than this service reads for one call "
                       f"(at most {self.max_total_bytes} bytes and {self.max_resources} resources)")


#: told of every search's outcome ("ok", "timeout", "4xx", "5xx", "too_large" or "error") and its duration in
#: seconds (all its pages); the service's metrics register here
ReadObserver = Callable[[str, float], None]
read_observers: list[ReadObserver] = []


def _observe(outcome: str, seconds: float) -> None:
    for observer in read_observers:
        observer(outcome, seconds)


class _Unreadable(Exception):
    """The server's answer cannot be used; the message is for the log, ``outcome`` for the metrics."""

    def __init__(self, message: str, outcome: str = "error") -> None:
        super().__init__(message)
        self.outcome = outcome


class _OverLimit(Exception):
    pass


class FhirClient:
    def __init__(self, base_url: str, access_token: str | None, budget_seconds: float,
                 transport: httpx.AsyncBaseTransport | None = None, limits: ReadLimits | None = None) -> None:
        """``base_url`` must be a server :func:`cds_service.urls.fhir_server_problem` accepted."""
        self.base = canonical_url(base_url).rstrip("/") + "/"
        self.host = urlsplit(self.base).netloc
        self.budget = budget_seconds
        self.limits = limits or ReadLimits()
        self._bytes_left = self.limits.max_total_bytes
        self._resources_left = self.limits.max_resources
        headers = {"Accept": "application/fhir+json"}
        if access_token:
            headers["Authorization"] = f"Bearer {access_token}"
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(budget_seconds),
            follow_redirects=False,
            transport=transport,
        )

    async def __aenter__(self) -> FhirClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.aclose()

    async def search_all(self, queries: Mapping[str, str]) -> dict[str, list[Mapping[str, Any]] | Failure]:
        """Run each named search (a path and encoded query relative to the server) concurrently; results or
        failures by name, within the time budget."""
        results: dict[str, list[Mapping[str, Any]] | Failure] = {}
        deadline = time.monotonic() + self.budget

        async def one(name: str, query: str) -> None:
            resource_type = query.split("?", 1)[0]
            started, outcome = time.monotonic(), "error"
            try:
                results[name] = await self._search(query, deadline)
                outcome = "ok"
            except _OverLimit:
                outcome = "too_large"
                log.warning("FHIR %s search on %s: over the per-call read limit", resource_type, self.host)
                results[name] = self.limits.exceeded()
            except _Unreadable as error:
                outcome = error.outcome
                log.warning("FHIR %s search on %s failed: %s", resource_type, self.host, error)
                results[name] = Failure(SERVER_UNREADABLE)
            except httpx.InvalidURL:
                log.error("FHIR %s search on %s: the query URL is invalid", resource_type, self.host)
                results[name] = Failure("the FHIR query URL built for this request is invalid")
            except asyncio.CancelledError:  # the call's time budget ran out
                outcome = "timeout"
                raise
            finally:
                _observe(outcome, time.monotonic() - started)

        tasks = [asyncio.create_task(one(name, query)) for name, query in queries.items()]
        _done, pending = await asyncio.wait(tasks, timeout=self.budget) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        for name in queries:
            if name not in results:
                log.warning("FHIR %s search on %s: timed out after %g s", name, self.host, self.budget)
                results[name] = Failure(SERVER_UNREADABLE)
        return results

    async def _search(self, query: str, deadline: float) -> list[Mapping[str, Any]]:
        url: str | None = self.base + query.lstrip("/")
        found: list[Mapping[str, Any]] = []
        pages = 0
        while url is not None:
            pages += 1
            if pages > MAX_PAGES:
                raise _Unreadable(f"more than {MAX_PAGES} pages of results", "too_large")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Unreadable(f"timed out after {self.budget:g} s", "timeout")
            try:
                bundle = loads(await self._get(url, remaining))
            except JSONDecodeError as error:
                raise _Unreadable(f"invalid JSON ({error.msg})") from None
            if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
                raise _Unreadable("the answer is not a Bundle")
            page = list(resources_in(bundle))
            self._resources_left -= len(page)
            if self._resources_left < 0:
                raise _OverLimit
            found.extend(page)
            url = self._next(bundle)
        return found

    def _next(self, bundle: Mapping[str, Any]) -> str | None:
        """The canonical ``next`` link, or None; refused when it leaves the server or is not a usable URL."""
        link = next_link(bundle)
        if link is None:
            return None
        try:
            url = canonical_url(link)
        except UrlError as error:
            raise _Unreadable(f"a paging link is not usable: it {error}") from None
        if not url_under(url, self.base):
            raise _Unreadable("a paging link pointed outside the FHIR server; it was not followed")
        return url

    async def _get(self, url: str, remaining: float) -> bytes:
        """One page's body, read as a stream and abandoned once it passes ``MAX_PAGE_BYTES`` or what is
        left of the call's byte limit."""
        try:
            async with self._client.stream("GET", url, timeout=remaining) as response:
                if response.status_code != 200:
                    raise _Unreadable(f"HTTP {response.status_code}", f"{response.status_code // 100}xx"
                                      if response.status_code in range(400, 600) else "error")
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > MAX_PAGE_BYTES:
                    raise _Unreadable(f"more than {MAX_PAGE_BYTES} bytes in one page", "too_large")
                if declared.isdigit() and int(declared) > self._bytes_left:
                    raise _OverLimit
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    self._bytes_left -= len(chunk)
                    if size > MAX_PAGE_BYTES:
                        raise _Unreadable(f"more than {MAX_PAGE_BYTES} bytes in one page", "too_large")
                    if self._bytes_left < 0:
                        raise _OverLimit
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.TimeoutException:
            raise _Unreadable(f"timed out after {self.budget:g} s", "timeout") from None
        except httpx.HTTPError as error:
            raise _Unreadable(f"unreachable ({type(error).__name__})") from None

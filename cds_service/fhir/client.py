"""Patient-scoped searches against the EHR's FHIR server, with the hook's Bearer token.

Only the request's own ``fhirServer`` is contacted: ``next`` links are checked (in canonical form, see
:mod:`cds_service.urls`) to lie under it, and are not followed otherwise. Searches run concurrently within one
time budget and share one cap on what a hook call may read (:class:`ReadLimits`: total bytes and resources);
a page over ``MAX_PAGE_BYTES`` (read as a stream, never held whole) or past ``MAX_PAGES`` is refused too.
A search that fails is reported as a :class:`Failure`, never raised. When the server misbehaves (an HTTP
error, a timeout, a refused connection, garbage) the reason is the generic :data:`SERVER_UNREADABLE`, so that
a clinician-facing card cannot serve as a port scanner's oracle; the detail goes to the log only.

Connections are the process's (:class:`FhirPool`): one TLS context, and per FHIR origin a pool of keep-alive
connections with bounds, so that a hook call neither loads the CA bundle nor opens new connections. What
belongs to one hook call is never shared: the ``Authorization`` header goes with each request of the call that
owns the token, the pooled clients carry no credentials and keep no cookies, and a connection is only ever
reused for its own origin.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy
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


class CallBudget:
    """What one hook call may still read from the FHIR server, shared by every client it makes (the completed
    forms, the record, referenced Medications...): :class:`ReadLimits` over all of them, and one deadline."""

    def __init__(self, limits: ReadLimits, seconds: float) -> None:
        self.bytes_left = limits.max_total_bytes
        self.resources_left = limits.max_resources
        self.deadline = time.monotonic() + seconds

    def seconds_left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


@dataclass(frozen=True)
class PoolLimits:
    """Bounds on the process's FHIR connections: per origin, and how many origins are kept."""

    connections_per_origin: int = 32
    keepalive_per_origin: int = 16
    keepalive_seconds: float = 30.0
    origins: int = 32


@dataclass
class _Connection:
    """One keep-alive connection: an ``httpx.AsyncClient`` that holds at most one."""

    client: httpx.AsyncClient
    idle_since: float = 0.0


@dataclass
class _Origin:
    slots: asyncio.Semaphore
    idle: list[_Connection]
    busy: int = 0


class FhirPool:
    """The process's connections to FHIR servers: one TLS context (the CA bundle is loaded once), and per origin
    (scheme, host and port) a pool of keep-alive connections within :class:`PoolLimits`: at most
    ``connections_per_origin`` in use (a search waits for one, within its time budget), at most
    ``keepalive_per_origin`` kept idle, for ``keepalive_seconds``; at most ``origins`` origins (the least
    recently used one's idle connections are closed).

    Each connection is an ``httpx.AsyncClient`` limited to one connection, which a search holds alone while it
    reads a page: httpx's own pool, shared by concurrent searches, scans every connection for each request and
    cost twice the CPU per search (bench/README.md). The clients hold no credentials and keep no cookies (a jar
    whose policy accepts none): :class:`FhirClient` sends each call's own ``Authorization`` with each request.

    Connections belong to the event loop that opened them: when the pool is used from another loop (a test
    that calls the service with ``asyncio.run`` more than once), it starts afresh there."""

    def __init__(self, limits: PoolLimits | None = None, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.limits = limits or PoolLimits()
        self._transport = transport
        self._ssl: ssl.SSLContext | None = None
        self._origins: OrderedDict[str, _Origin] = OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None

    def ssl_context(self) -> ssl.SSLContext:
        """The TLS context of every connection (created once: it loads the CA bundle, about 25 ms)."""
        if self._ssl is None:
            self._ssl = httpx.create_ssl_context()
        return self._ssl

    def _new_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            headers={"Accept": "application/fhir+json"},
            follow_redirects=False,
            cookies=CookieJar(DefaultCookiePolicy(allowed_domains=[])),
            verify=self.ssl_context(),
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1,
                                keepalive_expiry=self.limits.keepalive_seconds),
            transport=self._transport,
        )

    def _origin(self, origin: str) -> _Origin:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # connections of another (finished) loop cannot be used or closed here
            self._loop = loop
            self._origins.clear()
        found = self._origins.get(origin)
        if found is None:
            found = self._origins[origin] = _Origin(asyncio.Semaphore(self.limits.connections_per_origin), [])
        self._origins.move_to_end(origin)
        return found

    @asynccontextmanager
    async def connection(self, origin: str, timeout: float, fresh: bool = False) -> AsyncIterator[httpx.AsyncClient]:
        """A connection to ``origin`` held alone for one request (``fresh``: a new one, not a kept-alive one);
        TimeoutError when none is free in time. One whose request failed is closed, not kept."""
        state = self._origin(origin)
        await asyncio.wait_for(state.slots.acquire(), timeout)
        state.busy += 1
        connection = state.idle.pop() if state.idle and not fresh else _Connection(self._new_client())
        reusable = False
        try:
            yield connection.client
            reusable = True
        finally:
            state.busy -= 1
            state.slots.release()
            await self._release(origin, state, connection, reusable)

    async def _release(self, origin: str, state: _Origin, connection: _Connection, reusable: bool) -> None:
        now = time.monotonic()
        expired = [c for c in state.idle if now - c.idle_since > self.limits.keepalive_seconds]
        state.idle = [c for c in state.idle if c not in expired]
        kept = reusable and self._origins.get(origin) is state and len(state.idle) < self.limits.keepalive_per_origin
        if kept:
            connection.idle_since = now
            state.idle.append(connection)
        else:
            expired.append(connection)
        while len(self._origins) > self.limits.origins:
            _, evicted = self._origins.popitem(last=False)
            expired.extend(evicted.idle)
            evicted.idle = []
        for item in expired:
            await item.client.aclose()

    def origins(self) -> list[str]:
        """The origins that have connections now, least recently used first (for tests and diagnostics)."""
        return [o for o, state in self._origins.items() if state.idle or state.busy]

    def idle(self, origin: str) -> int:
        """How many keep-alive connections to ``origin`` are idle now."""
        state = self._origins.get(origin)
        return len(state.idle) if state is not None else 0

    async def aclose(self) -> None:
        if self._loop is not None and self._loop is not asyncio.get_running_loop():
            return
        for state in self._origins.values():
            for connection in state.idle:
                await connection.client.aclose()
            state.idle = []
        self._origins.clear()


#: told of every search's outcome ("ok", "timeout", "4xx", "5xx", "too_large" or "error") and its duration in
#: seconds (all its pages); the service's metrics register here
ReadObserver = Callable[[str, float], None]
read_observers: list[ReadObserver] = []


def _observe(outcome: str, seconds: float) -> None:
    for observer in read_observers:
        observer(outcome, seconds)


@contextmanager
def unobserved() -> Iterator[None]:
    """Searches made meanwhile are not told to the observers (the start-up warm-up's own reads)."""
    saved = list(read_observers)
    read_observers.clear()
    try:
        yield
    finally:
        read_observers[:] = saved


class _Unreadable(Exception):
    """The server's answer cannot be used; the message is for the log, ``outcome`` for the metrics."""

    def __init__(self, message: str, outcome: str = "error") -> None:
        super().__init__(message)
        self.outcome = outcome


class _OverLimit(Exception):
    pass


class _Stale(Exception):
    """A kept-alive connection failed before any answer (the server had closed it)."""


class FhirClient:
    """The searches of one hook call against its ``fhirServer``, with its token, over the process's pool."""

    def __init__(self, base_url: str, access_token: str | None, budget_seconds: float,
                 transport: httpx.AsyncBaseTransport | None = None, limits: ReadLimits | None = None,
                 pool: FhirPool | None = None, call: CallBudget | None = None) -> None:
        """``base_url`` must be a server :func:`cds_service.urls.fhir_server_problem` accepted. Without
        ``pool`` the call has a pool of its own, closed when it ends. ``limits`` and ``budget_seconds`` bound
        this client; ``call``, when given, bounds it together with the hook call's other clients."""
        self.base = canonical_url(base_url).rstrip("/") + "/"
        parts = urlsplit(self.base)
        self.host = parts.netloc
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.budget = budget_seconds
        self.limits = limits or ReadLimits()
        self._bytes_left = self.limits.max_total_bytes
        self._resources_left = self.limits.max_resources
        self._call = call
        self._headers = {"Authorization": f"Bearer {access_token}"} if access_token else {}
        self._own_pool = pool is None
        self._pool = pool or FhirPool(transport=transport)

    def _bytes_allowed(self) -> int:
        return min(self._bytes_left, self._call.bytes_left) if self._call is not None else self._bytes_left

    def _spend(self, nbytes: int = 0, resources: int = 0) -> bool:
        """Count what was read against this client's limits and the call's; False when what was just counted
        takes either over its limit."""
        self._bytes_left -= nbytes
        self._resources_left -= resources
        left = [(self._bytes_left, self._resources_left)]
        if self._call is not None:
            self._call.bytes_left -= nbytes
            self._call.resources_left -= resources
            left.append((self._call.bytes_left, self._call.resources_left))
        return all((not nbytes or b >= 0) and (not resources or r >= 0) for b, r in left)

    async def __aenter__(self) -> FhirClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._own_pool:
            await self._pool.aclose()

    async def search_all(self, queries: Mapping[str, str]) -> dict[str, list[Mapping[str, Any]] | Failure]:
        """Run each named search (a path and encoded query relative to the server) concurrently; results or
        failures by name, within the time budget."""
        results: dict[str, list[Mapping[str, Any]] | Failure] = {}
        budget = min(self.budget, self._call.seconds_left()) if self._call is not None else self.budget
        deadline = time.monotonic() + budget

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
            except Exception as error:  # a fault of this client's own: the data is unreadable, the call goes on
                log.error("FHIR %s search on %s: %s", resource_type, self.host, type(error).__name__)
                results[name] = Failure(SERVER_UNREADABLE)
            finally:
                _observe(outcome, time.monotonic() - started)

        tasks = [asyncio.create_task(one(name, query)) for name, query in queries.items()]
        _done, pending = await asyncio.wait(tasks, timeout=budget) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        for name in queries:
            if name not in results:
                log.warning("FHIR %s search on %s: timed out after %g s", name, self.host, round(budget, 2))
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
            if not self._spend(resources=len(page)):
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
        left of the call's byte limit. A kept-alive connection that the server closed meanwhile (it fails
        before any answer) is tried once more on a new connection: a search is a GET, safe to repeat."""
        deadline = time.monotonic() + remaining
        try:
            try:
                return await self._read_page(url, deadline, fresh=False)
            except _Stale:
                return await self._read_page(url, deadline, fresh=True)
        except (httpx.TimeoutException, TimeoutError):
            raise _Unreadable(f"timed out after {self.budget:g} s", "timeout") from None
        except httpx.HTTPError as error:
            raise _Unreadable(f"unreachable ({type(error).__name__})") from None

    async def _read_page(self, url: str, deadline: float, fresh: bool) -> bytes:
        async with self._pool.connection(self.origin, deadline - time.monotonic(), fresh=fresh) as client:
            request = client.build_request("GET", url, headers=self._headers,
                                           timeout=max(0.001, deadline - time.monotonic()))
            try:
                response = await client.send(request, stream=True)
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
                if fresh:
                    raise
                raise _Stale from None
            try:
                if response.status_code != 200:
                    raise _Unreadable(f"HTTP {response.status_code}", f"{response.status_code // 100}xx"
                                      if response.status_code in range(400, 600) else "error")
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > MAX_PAGE_BYTES:
                    raise _Unreadable(f"more than {MAX_PAGE_BYTES} bytes in one page", "too_large")
                if declared.isdigit() and int(declared) > self._bytes_allowed():
                    raise _OverLimit
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    within = self._spend(nbytes=len(chunk))
                    if size > MAX_PAGE_BYTES:
                        raise _Unreadable(f"more than {MAX_PAGE_BYTES} bytes in one page", "too_large")
                    if not within:
                        raise _OverLimit
                    chunks.append(chunk)
                return b"".join(chunks)
            finally:
                await response.aclose()

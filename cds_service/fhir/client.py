"""Patient-scoped searches against the EHR's FHIR server, with the hook's Bearer token.

Only the request's own ``fhirServer`` is contacted: ``next`` links that leave it are not followed.
Searches run concurrently within one time budget; a search that fails, times out, pages past the
cap or answers a page larger than ``MAX_PAGE_BYTES`` (read as a stream, never held whole) is reported
as a failure with a reason, never raised to the caller.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from .bundles import Failure, next_link, resources_in

MAX_PAGES = 20
MAX_PAGE_BYTES = 32 * 1024 * 1024  # one page of search results; a larger answer is a fault, not data


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def url_under(url: str, prefix: str) -> bool:
    """Whether ``url`` lies under the allowlisted ``prefix``: same scheme, host and port, and a path at
    or below the prefix's path on a segment boundary. Unlike a plain string prefix, the entry
    "https://keys.example.org" does not admit "https://keys.example.org.attacker.example/"."""
    try:
        target, allowed = urlsplit(url), urlsplit(prefix)
        if (target.scheme, target.hostname, target.port) != (allowed.scheme, allowed.hostname, allowed.port):
            return False
    except ValueError:
        return False
    if target.username or target.password or not allowed.hostname:
        return False
    base = allowed.path
    if not base or base.endswith("/"):
        return target.path.startswith(base) or target.path + "/" == base
    return target.path == base or target.path.startswith(base + "/")


def fhir_server_problem(url: str, allow_http: bool, allowlist: Sequence[str] | None) -> str | None:
    """Why the service will not contact ``url``, or None when it may."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "fhirServer is not a valid URL"
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return "fhirServer must be an absolute http(s) URL"
    if parts.username or parts.password:
        return "fhirServer must not carry credentials"
    if parts.scheme == "http" and not (allow_http or is_loopback(parts.hostname)):
        return "fhirServer must use https (plain http is allowed only for loopback hosts)"
    if allowlist is not None and not any(url_under(url, prefix) for prefix in allowlist):
        return "fhirServer is not on this issuer's allowlist"
    return None


class FhirClient:
    def __init__(self, base_url: str, access_token: str | None, budget_seconds: float,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base = base_url.rstrip("/") + "/"
        self.budget = budget_seconds
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
        """Run each named search concurrently; results or failures by name, within the time budget."""
        results: dict[str, list[Mapping[str, Any]] | Failure] = {}
        deadline = time.monotonic() + self.budget

        async def one(name: str, query: str) -> None:
            results[name] = await self._search(query, deadline)

        tasks = [asyncio.create_task(one(name, query)) for name, query in queries.items()]
        _done, pending = await asyncio.wait(tasks, timeout=self.budget) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        for name in queries:
            results.setdefault(name, Failure(f"timed out after {self.budget:g} s"))
        return results

    async def _search(self, query: str, deadline: float) -> list[Mapping[str, Any]] | Failure:
        url: str | None = self.base + query.lstrip("/")
        found: list[Mapping[str, Any]] = []
        pages = 0
        while url is not None:
            pages += 1
            if pages > MAX_PAGES:
                return Failure(f"more than {MAX_PAGES} pages of results")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return Failure(f"timed out after {self.budget:g} s")
            page = await self._get(url, remaining)
            if isinstance(page, Failure):
                return page
            try:
                bundle = orjson.loads(page)
            except orjson.JSONDecodeError:
                return Failure("FHIR server answered with invalid JSON")
            if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
                return Failure("FHIR server did not answer with a Bundle")
            found.extend(r for r in resources_in(bundle))
            url = next_link(bundle)
            if url is not None and not url.startswith(self.base):
                return Failure("a paging link pointed outside the FHIR server; it was not followed")
        return found

    async def _get(self, url: str, remaining: float) -> bytes | Failure:
        """One page's body, read as a stream and abandoned once it passes ``MAX_PAGE_BYTES``."""
        try:
            async with self._client.stream("GET", url, timeout=remaining) as response:
                if response.status_code != 200:
                    return Failure(f"FHIR server answered HTTP {response.status_code}")
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > MAX_PAGE_BYTES:
                    return Failure(f"FHIR server answered more than {MAX_PAGE_BYTES} bytes in one page")
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > MAX_PAGE_BYTES:
                        return Failure(f"FHIR server answered more than {MAX_PAGE_BYTES} bytes in one page")
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.TimeoutException:
            return Failure(f"timed out after {self.budget:g} s")
        except httpx.HTTPError as error:
            return Failure(f"FHIR server unreachable ({type(error).__name__})")

"""JWK Sets fetched from the URLs configuration trusts (an issuer's ``jwks_url``, a ``jku`` under its
``jku_allowlist``), cached, with every outbound fetch limited per issuer.

The callers have already decided that a URL may be fetched; this module bounds what fetching costs, since it
happens before any signature is checked (an unauthenticated caller can trigger it):

- per issuer, at most one fetch of its ``jwks_url`` and one fetch of any ``jku`` per ``min_refetch`` seconds,
  however many distinct URLs tokens name;
- a failed fetch is remembered (negative cache) until the issuer may fetch again;
- at most :data:`MAX_SETS_PER_ISSUER` sets are kept per issuer (least recently used dropped), one lock per
  issuer, so no table grows with the number of URLs tried;
- a JWK Set body over :data:`MAX_JWKS_BYTES` is a failure (read as a stream, never held whole), redirects are
  not followed, and at most :data:`MAX_KEYS` keys of a set are kept.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from ..jsonutil import JSONDecodeError, loads

MAX_JWKS_BYTES = 64 * 1024
MAX_KEYS = 32
MAX_SETS_PER_ISSUER = 4
FETCH_TIMEOUT_SECONDS = 3.0

Key = Mapping[str, Any]
Source = Literal["jwks_url", "jku"]


class KeyFetchError(Exception):
    """No keys could be had from a URL; the message (for the log) says why."""


@dataclass
class _Entry:
    keys: list[Key] | None  # None: the last fetch failed
    error: str | None
    fetched_at: float


class _IssuerKeys:
    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.sets: OrderedDict[str, _Entry] = OrderedDict()
        self.last_attempt: dict[Source, float] = {}


class KeyCache:
    def __init__(self, ttl: float, min_refetch: float, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.ttl = ttl
        self.min_refetch = min_refetch
        self._issuers: dict[str, _IssuerKeys] = {}
        self._transport = transport

    async def keys(self, issuer: str, url: str, source: Source, want_kid: str | None) -> list[Key]:
        """The keys published at ``url`` for ``issuer``: cached while fresh; fetched when missing, stale, or
        lacking ``want_kid``, if the issuer's fetch limit allows (else the cached keys, or the cached failure).
        ``issuer`` must be a configured issuer (it keys a table)."""
        state = self._issuers.setdefault(issuer, _IssuerKeys())
        async with state.lock:
            entry = state.sets.get(url)
            now = time.monotonic()
            wanted = entry is None or entry.keys is None or now - entry.fetched_at > self.ttl or (
                want_kid is not None and not any(k.get("kid") == want_kid for k in entry.keys))
            last = state.last_attempt.get(source)
            if wanted and (last is None or now - last >= self.min_refetch):
                state.last_attempt[source] = now
                fetched = await self._fetch(url)
                if fetched.keys is not None or entry is None or entry.keys is None:
                    entry = fetched  # a failed refetch keeps the keys fetched before
                state.sets[url] = entry
            if entry is None:
                raise KeyFetchError(f"not fetched: {issuer}'s {source} fetch limit "
                                    f"(one per {self.min_refetch:g} s) was reached")
            state.sets.move_to_end(url)
            while len(state.sets) > MAX_SETS_PER_ISSUER:
                state.sets.popitem(last=False)
            if entry.keys is None:
                raise KeyFetchError(f"unavailable: {entry.error}")
            return entry.keys

    async def _fetch(self, url: str) -> _Entry:
        now = time.monotonic()
        try:
            body = await self._get(url)
        except httpx.TimeoutException:
            return _Entry(None, "timed out", now)
        except httpx.HTTPError as error:
            return _Entry(None, type(error).__name__, now)
        except KeyFetchError as error:
            return _Entry(None, str(error), now)
        try:
            data = loads(body)
        except JSONDecodeError:
            return _Entry(None, "not JSON (or nested too deep)", now)
        keys = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(keys, list):
            return _Entry(None, "no keys array", now)
        found: list[Key] = [k for k in keys if isinstance(k, Mapping)][:MAX_KEYS]
        return _Entry(found, None, now)

    async def _get(self, url: str) -> bytes:
        async with httpx.AsyncClient(timeout=FETCH_TIMEOUT_SECONDS, follow_redirects=False,
                                     transport=self._transport) as client, \
                client.stream("GET", url, headers={"Accept": "application/json"}) as response:
            if response.status_code != 200:
                raise KeyFetchError(f"HTTP {response.status_code}")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > MAX_JWKS_BYTES:
                raise KeyFetchError(f"larger than {MAX_JWKS_BYTES} bytes")
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > MAX_JWKS_BYTES:
                    raise KeyFetchError(f"larger than {MAX_JWKS_BYTES} bytes")
                chunks.append(chunk)
            return b"".join(chunks)

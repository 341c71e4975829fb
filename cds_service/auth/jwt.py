"""CDS Hooks JWT authentication (python-jose), strictly.

Trust comes only from configuration: the issuer must be listed, its keys come from its configured
``jwks_url`` or inline ``jwks``, and a token's ``jku`` is honoured only under one of that issuer's
``jku_allowlist`` prefixes. No other URL is ever fetched (``x5u`` and ``kid`` are never used as URLs).
Only asymmetric algorithms are accepted, and only with a key of the matching type, so a public key
can never be used as an HMAC secret. Reasons for rejection are logged, never returned, never with
the token.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from jose import jwt
from jose.exceptions import JOSEError

from ..config import AuthSettings, IssuerSettings
from ..fhir.client import url_under

log = logging.getLogger("cds_service.auth")

ALGORITHMS: dict[str, str] = {
    "ES256": "EC", "ES384": "EC", "ES512": "EC",
    "RS256": "RSA", "RS384": "RSA", "RS512": "RSA",
    "PS256": "RSA", "PS384": "RSA", "PS512": "RSA",
}


class AuthError(Exception):
    """Authentication failed; the message is for the log only."""


@dataclass(frozen=True)
class Principal:
    issuer: str
    subject: str | None
    tenant: str | None
    fhir_server_allowlist: Sequence[str] | None


@dataclass
class _KeySet:
    keys: list[Mapping[str, Any]]
    fetched_at: float


ReplayCheck = Callable[[str, str, dt.datetime], bool]


class KeyCache:
    """JWK Sets by URL, cached with a TTL; an unknown ``kid`` triggers at most one refetch per URL
    per ``min_refetch`` seconds, so key rotation works and a flood of bad kids cannot hammer the issuer."""

    def __init__(self, ttl: float, min_refetch: float, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.ttl = ttl
        self.min_refetch = min_refetch
        self._sets: dict[str, _KeySet] = {}
        self._last_attempt: dict[str, float] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._transport = transport

    async def _fetch(self, url: str) -> list[Mapping[str, Any]]:
        self._last_attempt[url] = time.monotonic()
        async with httpx.AsyncClient(timeout=3.0, follow_redirects=False, transport=self._transport) as client:
            response = await client.get(url, headers={"Accept": "application/json"})
        if response.status_code != 200:
            raise AuthError(f"JWK Set {url} answered HTTP {response.status_code}")
        try:
            data = response.json()
        except ValueError:
            raise AuthError(f"JWK Set {url} is not JSON") from None
        keys = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(keys, list):
            raise AuthError(f"JWK Set {url} has no keys")
        found: list[Mapping[str, Any]] = [k for k in keys if isinstance(k, dict)]
        self._sets[url] = _KeySet(found, time.monotonic())
        return found

    async def keys(self, url: str, want_kid: str | None) -> list[Mapping[str, Any]]:
        lock = self._locks.setdefault(url, asyncio.Lock())
        async with lock:
            cached = self._sets.get(url)
            now = time.monotonic()
            if cached is None or now - cached.fetched_at > self.ttl:
                if cached is None or now - self._last_attempt.get(url, 0) >= self.min_refetch:
                    try:
                        return await self._fetch(url)
                    except (httpx.HTTPError, AuthError) as error:
                        if cached is None:
                            raise AuthError(f"cannot fetch JWK Set {url}: {type(error).__name__}") from None
                return cached.keys
            if want_kid and not any(k.get("kid") == want_kid for k in cached.keys) \
                    and now - self._last_attempt.get(url, 0) >= self.min_refetch:
                try:
                    return await self._fetch(url)
                except (httpx.HTTPError, AuthError):
                    return cached.keys
            return cached.keys


class JwtAuthenticator:
    def __init__(self, settings: AuthSettings, replay: ReplayCheck,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        self.issuers = {i.iss: i for i in settings.issuers}
        self.replay = replay
        self.cache = KeyCache(settings.jwks_cache_seconds, settings.jwks_refetch_min_seconds, transport)

    async def authenticate(self, authorization: str | None, audiences: Sequence[str]) -> Principal:
        if not authorization or not authorization.startswith("Bearer "):
            raise AuthError("no Bearer token")
        token = authorization[len("Bearer "):].strip()
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.get_unverified_claims(token)
        except JOSEError:
            raise AuthError("token is not a well-formed JWT") from None
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise AuthError(f"algorithm {alg!r} is not accepted")
        if header.get("typ") not in (None, "JWT", "jwt"):
            raise AuthError("typ is not JWT")
        issuer = self.issuers.get(str(unverified.get("iss")))
        if issuer is None:
            raise AuthError("issuer is not trusted")
        key = await self._key(issuer, header, alg)
        try:
            claims = jwt.decode(
                token, key, algorithms=[alg],
                options={"verify_aud": False, "verify_iss": True, "require_exp": True, "require_iat": True,
                         "require_jti": True, "leeway": self.settings.leeway_seconds},
                issuer=issuer.iss,
            )
        except JOSEError as error:
            raise AuthError(f"token rejected: {type(error).__name__}: {error}") from None
        aud = claims.get("aud")
        aud_values = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if not any(a in audiences for a in aud_values):
            raise AuthError("aud does not name this endpoint")
        now = time.time()
        iat, exp = claims.get("iat"), claims.get("exp")
        if not isinstance(iat, int | float) or iat > now + self.settings.leeway_seconds:
            raise AuthError("iat is in the future")
        if not isinstance(exp, int | float):
            raise AuthError("exp is missing")
        tenant = claims.get("tenant")
        if issuer.tenants is not None and tenant not in issuer.tenants:
            raise AuthError("tenant is not allowed for this issuer")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise AuthError("jti is missing")
        expires = dt.datetime.fromtimestamp(exp + self.settings.leeway_seconds, dt.UTC)
        if not await asyncio.to_thread(self.replay, issuer.iss, jti, expires):
            raise AuthError("jti was already used (replay)")
        return Principal(issuer.iss, claims.get("sub"), tenant if isinstance(tenant, str) else None,
                         issuer.fhir_server_allowlist)

    async def _key(self, issuer: IssuerSettings, header: Mapping[str, Any], alg: str) -> Mapping[str, Any]:
        kid = header.get("kid")
        jku = header.get("jku")
        if jku is not None:
            if not isinstance(jku, str) or not any(url_under(jku, p) for p in issuer.jku_allowlist):
                raise AuthError("jku is not on the issuer's allowlist")
            keys = await self.cache.keys(jku, kid)
        elif issuer.jwks is not None:
            keys = [k for k in issuer.jwks.get("keys", []) if isinstance(k, dict)]
        elif issuer.jwks_url:
            keys = await self.cache.keys(issuer.jwks_url, kid)
        else:
            raise AuthError("issuer has no keys")
        kty = ALGORITHMS[alg]
        usable = [k for k in keys if k.get("kty") == kty and k.get("alg") in (None, alg)
                  and k.get("use") in (None, "sig")]
        if kid is not None:
            usable = [k for k in usable if k.get("kid") == kid]
        elif len(usable) > 1:
            raise AuthError("token has no kid and the issuer has several keys")
        if not usable:
            raise AuthError("no key of the issuer matches the token's kid and algorithm")
        return {k: v for k, v in usable[0].items() if k not in ("d", "p", "q", "dp", "dq", "qi")}

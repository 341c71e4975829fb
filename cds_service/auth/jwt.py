"""CDS Hooks JWT authentication (python-jose for signatures), strictly.

Trust comes only from configuration: the issuer must be listed, and a token is accepted only when one of
that issuer's trusted keys verifies its signature. Trusted keys are, in this order, the issuer's pinned keys
(inline ``jwks``, then its ``jwks_url``) and, only when the token's ``jku`` lies under the issuer's
``jku_allowlist``, the keys published there. Pinned keys win: a token they verify is accepted whatever its
``jku`` says, and a ``jku`` off the allowlist is never fetched (``x5u`` and ``kid`` are never used as URLs).
Only asymmetric algorithms are accepted, and only with a key of the matching type (and curve), so a public
key can never be used as an HMAC secret. The claims are checked here, not by the library: numbers must be
finite, the lifetime is capped, ``jti`` must fit the replay store. Reasons for rejection are logged, never
returned, never with the token.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from jose import jws
from jose.exceptions import JOSEError
from jose.utils import base64url_decode

from ..config import AuthSettings, IssuerSettings
from ..jsonutil import JSONDecodeError, loads
from ..urls import Allowlist, UrlError, canonical_url, origin_host, url_under
from .keys import Key, KeyCache, KeyFetchError

log = logging.getLogger("cds_service.auth")

ALGORITHMS: dict[str, str] = {
    "ES256": "EC", "ES384": "EC", "ES512": "EC",
    "RS256": "RSA", "RS384": "RSA", "RS512": "RSA",
    "PS256": "RSA", "PS384": "RSA", "PS512": "RSA",
}
CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
MAX_TOKEN_CHARS = 16 * 1024  # a larger Authorization header is refused before any parsing
MAX_JTI_CHARS = 500  # the replay store's column
MAX_KEYS_TRIED = 8  # signature checks per key source and token
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")


class AuthError(Exception):
    """Authentication failed; the message is for the log only."""


@dataclass(frozen=True)
class Principal:
    """Who called, as its valid token says: the issuer, subject and tenant, and the FHIR servers its token lets
    the service read."""

    issuer: str
    subject: str | None
    tenant: str | None
    fhir_server_allowlist: Allowlist


ReplayCheck = Callable[[str, str, dt.datetime], bool]


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header (the scheme is case-insensitive)."""
    if not authorization:
        raise AuthError("no Authorization header")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise AuthError("Authorization is not a Bearer token")
    token = token.strip()
    if len(token) > MAX_TOKEN_CHARS:
        raise AuthError(f"token longer than {MAX_TOKEN_CHARS} characters")
    if not _COMPACT_JWS.fullmatch(token):
        raise AuthError("token is not a compact JWS (three base64url parts)")
    return token


def fhir_server_allowlist(issuer: IssuerSettings) -> Allowlist:
    """The FHIR servers a token of ``issuer`` lets the service read: the configured prefixes, or by default
    any server on the issuer's own host (the host name of ``iss``, any port)."""
    if issuer.fhir_server_allowlist is not None:
        return Allowlist(tuple(issuer.fhir_server_allowlist))
    host = origin_host(issuer.iss)
    return Allowlist(hosts=frozenset({host} if host else set()),
                     description="this issuer's host (the default allowlist)")


class JwtAuthenticator:
    """The ``jwt`` mode's checks of a bearer token (see README, Security): the issuer's trusted keys (cached,
    with per-issuer fetch limits), the algorithm, the audience, the time claims and lifetime, the tenant and the
    ``jti`` replay check. :meth:`authenticate` returns the :class:`Principal` or raises :class:`AuthError`."""

    def __init__(self, settings: AuthSettings, replay: ReplayCheck,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        self.issuers = {i.iss: i for i in settings.issuers}
        self.replay = replay
        self.cache = KeyCache(settings.jwks_cache_seconds, settings.jwks_refetch_min_seconds, transport)

    async def authenticate(self, authorization: str | None, audiences: Sequence[str]) -> Principal:
        """The caller, if ``authorization`` holds a valid token whose ``aud`` is one of ``audiences``."""
        token = bearer_token(authorization)
        header = _segment(token, 0, "header")
        unverified = _segment(token, 1, "payload")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALGORITHMS:
            raise AuthError(f"algorithm {str(alg)[:20]!r} is not accepted")
        if header.get("typ") not in (None, "JWT", "jwt"):
            raise AuthError("typ is not JWT")
        if "crit" in header:
            raise AuthError("the header names critical extensions, which are not supported")
        iss = unverified.get("iss")
        issuer = self.issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise AuthError("issuer is not trusted")
        claims = await self._verified_claims(token, issuer, header, alg)
        jti, expires = self._check_claims(claims, issuer, audiences)
        if issuer.replay_check and not await asyncio.to_thread(self.replay, issuer.iss, jti, expires):
            raise AuthError("jti was already used (replay)")
        sub, tenant = claims.get("sub"), claims.get("tenant")
        return Principal(issuer.iss, sub if isinstance(sub, str) else None,
                         tenant if isinstance(tenant, str) else None, fhir_server_allowlist(issuer))

    async def _verified_claims(self, token: str, issuer: IssuerSettings, header: Mapping[str, Any],
                               alg: str) -> dict[str, Any]:
        """The payload, once a trusted key verifies the signature: pinned keys first, then an allowlisted jku."""
        kid = header.get("kid") if isinstance(header.get("kid"), str) else None
        tried: list[str] = []
        if issuer.jwks is not None:
            payload = _verify(token, issuer.jwks.get("keys", []), alg, kid)
            if payload is not None:
                return payload
            tried.append("inline jwks")
        if issuer.jwks_url:
            try:
                keys = await self.cache.keys(issuer.iss, issuer.jwks_url, "jwks_url", kid)
            except KeyFetchError as error:
                tried.append(f"jwks_url {error}")
            else:
                payload = _verify(token, keys, alg, kid)
                if payload is not None:
                    return payload
                tried.append("jwks_url")
        jku = header.get("jku")
        if jku is not None:
            unverified = f"no pinned key verifies the token ({', '.join(tried) or 'the issuer has none'}) and its jku"
            try:
                url = canonical_url(jku)
            except UrlError as error:
                raise AuthError(f"{unverified} is unusable: it {error}") from None
            if not any(url_under(url, prefix) for prefix in issuer.jku_allowlist):
                raise AuthError(f"{unverified} is not on the issuer's allowlist")
            try:
                keys = await self.cache.keys(issuer.iss, url, "jku", kid)
            except KeyFetchError as error:
                raise AuthError(f"JWK Set at the token's jku {error}") from None
            payload = _verify(token, keys, alg, kid)
            if payload is not None:
                return payload
            tried.append("jku")
        raise AuthError(f"no trusted key verifies the token (tried: {', '.join(tried) or 'nothing'}; "
                        f"kid {str(kid)[:64]!r}, alg {alg})")

    def _check_claims(self, claims: Mapping[str, Any], issuer: IssuerSettings,
                      audiences: Sequence[str]) -> tuple[str, dt.datetime]:
        """The token id and when it may be forgotten, once every claim holds."""
        leeway = self.settings.leeway_seconds
        lifetime = issuer.max_token_lifetime_seconds or self.settings.max_token_lifetime_seconds
        aud = claims.get("aud")
        aud_values = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if not audiences or not any(isinstance(a, str) and a in audiences for a in aud_values):
            raise AuthError("aud does not name this endpoint")
        exp, iat, nbf = (_number(claims, name) for name in ("exp", "iat", "nbf"))
        if exp is None or iat is None or (nbf is None and "nbf" in claims):
            raise AuthError("exp and iat are required, and exp, iat and nbf must be finite numbers")
        now = time.time()
        if exp < now - leeway:
            raise AuthError("token has expired")
        if iat > now + leeway or (nbf is not None and nbf > now + leeway):
            raise AuthError("iat or nbf is in the future")
        if exp - iat > lifetime + leeway or exp < iat:
            raise AuthError(f"token lifetime (exp - iat) is not within 0 and {lifetime} s (+ leeway)")
        tenant = claims.get("tenant")
        if issuer.tenants is not None and tenant not in issuer.tenants:
            raise AuthError("tenant is not allowed for this issuer")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI_CHARS:
            raise AuthError(f"jti is missing or longer than {MAX_JTI_CHARS} characters")
        return jti, dt.datetime.fromtimestamp(exp + leeway, dt.UTC)


def _segment(token: str, index: int, name: str) -> dict[str, Any]:
    """The JSON object of the token's header or payload (unverified)."""
    part = token.split(".")[index]
    try:
        data = loads(base64url_decode(part.encode("ascii")))
    except (JSONDecodeError, ValueError, TypeError):
        raise AuthError(f"token {name} is not base64url-encoded JSON") from None
    if not isinstance(data, dict):
        raise AuthError(f"token {name} is not a JSON object")
    return data


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _usable(key: Key, alg: str, kid: str | None) -> bool:
    return (key.get("kty") == ALGORITHMS[alg] and key.get("alg") in (None, alg) and key.get("use") in (None, "sig")
            and (alg not in CURVES or key.get("crv") == CURVES[alg])
            and (kid is None or key.get("kid") == kid))


def _verify(token: str, keys: object, alg: str, kid: str | None) -> dict[str, Any] | None:
    """The payload if one of ``keys`` (a JWK list) verifies the token's signature with ``alg``, else None."""
    if not isinstance(keys, list):
        return None
    usable = [k for k in keys if isinstance(k, Mapping) and _usable(k, alg, kid)][:MAX_KEYS_TRIED]
    for key in usable:
        public = {name: value for name, value in key.items() if name not in _PRIVATE_MEMBERS}
        try:
            payload = jws.verify(token, public, algorithms=[alg])
        except (JOSEError, ValueError, TypeError):
            continue
        try:
            claims = loads(payload)
        except JSONDecodeError:
            raise AuthError("token payload is not JSON") from None
        if not isinstance(claims, dict):
            raise AuthError("token payload is not a JSON object")
        return claims
    return None

"""JWT authentication of the EHR (CDS Hooks 2.0 security), with keys made here and JWK Sets served by respx."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import respx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jose import jwk, jwt
from starlette.testclient import TestClient

from cds_service.config import AuthSettings, IssuerSettings
from cds_service.web.app import create_app

from .conftest import make_config
from .support import FIXTURES, load, scenario_request

ISS = "https://ehr.example.org"
JWKS_URL = "https://ehr.example.org/.well-known/jwks.json"
AUD = "http://testserver/cds-services/coverage-requirements-order-sign"
SIGN = "/cds-services/coverage-requirements-order-sign"
KETAMINE = load(FIXTURES / "scenarios/mp446-ketamine-iv-chronic-pain.json")


class Key:
    def __init__(self, alg: str, kid: str) -> None:
        self.alg, self.kid = alg, kid
        private = ec.generate_private_key(ec.SECP384R1()) if alg.startswith("ES") else \
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.private_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()).decode()
        self.public_pem = private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        self.jwk = {**jwk.construct(self.public_pem, alg).to_dict(), "kid": kid, "alg": alg, "use": "sig"}
        self.jwk = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in self.jwk.items()}

    def token(self, claims: dict[str, Any] | None = None, headers: dict[str, Any] | None = None,
              **overrides: Any) -> str:
        now = int(time.time())
        body = {"iss": ISS, "aud": AUD, "iat": now, "exp": now + 300, "jti": str(uuid.uuid4()), **(claims or {})}
        for key, value in overrides.items():
            if value is None:
                body.pop(key, None)
            else:
                body[key] = value
        token: str = jwt.encode(body, self.private_pem, algorithm=self.alg,
                                headers={"kid": self.kid, "typ": "JWT", **(headers or {})})
        return token


ES = Key("ES384", "es-1")
RS = Key("RS384", "rs-1")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(alg: str, secret: bytes | None) -> str:
    now = int(time.time())
    head = b64(json.dumps({"alg": alg, "typ": "JWT", "kid": ES.kid}).encode())
    payload = b64(json.dumps({"iss": ISS, "aud": AUD, "iat": now, "exp": now + 300, "jti": str(uuid.uuid4())}).encode())
    signature = b64(hmac.new(secret, f"{head}.{payload}".encode(), hashlib.sha256).digest()) if secret else ""
    return f"{head}.{payload}.{signature}"


def auth_config(url: str, **issuer: Any) -> Any:
    config = make_config(url)
    settings = {"iss": ISS, "jwks_url": JWKS_URL, "jku_allowlist": ["https://keys.ehr.example.org/"], **issuer}
    config.auth = AuthSettings(mode="jwt", issuers=[IssuerSettings(**settings)], jwks_refetch_min_seconds=30)
    return config


@pytest.fixture
def jwks() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False) as router:
        router.get(JWKS_URL).mock(return_value=httpx.Response(200, json={"keys": [ES.jwk, RS.jwk]}))
        yield router


@pytest.fixture
def secured(sqlite_url: str, jwks: respx.MockRouter) -> Iterator[TestClient]:
    with TestClient(create_app(auth_config(sqlite_url))) as client:
        yield client


def call(client: TestClient, token: str) -> httpx.Response:
    response: httpx.Response = client.post(SIGN, json=scenario_request(KETAMINE),
                                           headers={"Authorization": f"Bearer {token}"})
    return response


def assert_rejected(response: httpx.Response) -> None:
    assert response.status_code == 401
    assert response.json() == {"error": "unauthorized"}


@pytest.mark.parametrize("key", [ES, RS], ids=["ES384", "RS384"])
def test_valid_token_is_accepted(secured: TestClient, key: Key) -> None:
    response = call(secured, key.token())
    assert response.status_code == 200 and len(response.json()["cards"]) == 1


def test_missing_token_is_rejected(secured: TestClient) -> None:
    assert_rejected(secured.post(SIGN, json=scenario_request(KETAMINE)))


def test_alg_none_is_rejected(secured: TestClient) -> None:
    assert_rejected(call(secured, unsigned("none", None)))


def test_hmac_keyed_with_the_public_key_is_rejected(secured: TestClient) -> None:
    assert_rejected(call(secured, unsigned("HS256", ES.public_pem.encode())))
    assert_rejected(call(secured, unsigned("HS384", json.dumps(ES.jwk).encode())))


@pytest.mark.parametrize("claims", [
    {"exp": int(time.time()) - 120, "iat": int(time.time()) - 600},
    {"iat": int(time.time()) + 600},
    {"aud": "https://other.example/cds-services/coverage-requirements-order-sign"},
    {"iss": "https://unknown-issuer.example"},
    {"jti": None},
    {"exp": None},
], ids=["expired", "issued-in-future", "wrong-aud", "unknown-iss", "no-jti", "no-exp"])
def test_bad_claims_are_rejected(secured: TestClient, claims: dict[str, Any]) -> None:
    assert_rejected(call(secured, ES.token(**claims)))


def test_expired_within_leeway_is_accepted(secured: TestClient) -> None:
    now = int(time.time())
    assert call(secured, ES.token(exp=now - 30, iat=now - 300)).status_code == 200


def test_tampered_payload_is_rejected(secured: TestClient) -> None:
    head, payload, signature = ES.token().split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["aud"] = AUD + "x"
    assert_rejected(call(secured, f"{head}.{b64(json.dumps(claims).encode())}.{signature}"))
    claims["aud"] = AUD
    claims["sub"] = "someone-else"
    assert_rejected(call(secured, f"{head}.{b64(json.dumps(claims).encode())}.{signature}"))


def test_unknown_kid_is_rejected_with_one_rate_limited_refetch(secured: TestClient, jwks: respx.MockRouter) -> None:
    stranger = Key("ES384", "not-published")
    for _ in range(5):
        assert_rejected(call(secured, stranger.token()))
    assert jwks.routes[0].call_count == 1  # first fetch; the rate limit stops refetches within 30 s


def test_key_rotation_is_picked_up(sqlite_url: str) -> None:
    rotated = Key("ES384", "es-2")
    with respx.mock(assert_all_called=False) as router:
        route = router.get(JWKS_URL)
        route.mock(return_value=httpx.Response(200, json={"keys": [ES.jwk]}))
        config = auth_config(sqlite_url)
        config.auth.jwks_refetch_min_seconds = 0
        with TestClient(create_app(config)) as client:
            assert call(client, ES.token()).status_code == 200
            route.mock(return_value=httpx.Response(200, json={"keys": [ES.jwk, rotated.jwk]}))
            assert call(client, rotated.token()).status_code == 200
        assert route.call_count == 2


def test_jku_off_the_allowlist_is_never_fetched(secured: TestClient, jwks: respx.MockRouter) -> None:
    evil = jwks.get("https://attacker.example/jwks.json").mock(
        return_value=httpx.Response(200, json={"keys": [ES.jwk]}))
    assert_rejected(call(secured, ES.token(headers={"jku": "https://attacker.example/jwks.json"})))
    assert_rejected(call(secured, ES.token(headers={"jku": "https://keys.ehr.example.org.attacker.example/j"})))
    assert not evil.called


def test_jku_on_the_allowlist_is_used(secured: TestClient, jwks: respx.MockRouter) -> None:
    other = Key("ES384", "jku-key")
    route = jwks.get("https://keys.ehr.example.org/jwks.json").mock(
        return_value=httpx.Response(200, json={"keys": [other.jwk]}))
    assert call(secured, other.token(headers={"jku": "https://keys.ehr.example.org/jwks.json"})).status_code == 200
    assert route.called


def test_replayed_jti_is_rejected(secured: TestClient) -> None:
    token = ES.token()
    assert call(secured, token).status_code == 200
    assert_rejected(call(secured, token))


def test_tenant_is_checked_when_the_issuer_lists_tenants(sqlite_url: str, jwks: respx.MockRouter) -> None:
    with TestClient(create_app(auth_config(sqlite_url, tenants=["hospital-a"]))) as client:
        assert call(client, ES.token({"tenant": "hospital-a"})).status_code == 200
        assert_rejected(call(client, ES.token({"tenant": "hospital-b"})))
        assert_rejected(call(client, ES.token()))


def test_inline_jwks_needs_no_fetch(sqlite_url: str) -> None:
    with respx.mock(assert_all_called=False) as router:
        anything = router.route()
        config = auth_config(sqlite_url, jwks_url=None, jwks={"keys": [RS.jwk]})
        with TestClient(create_app(config)) as client:
            assert call(client, RS.token()).status_code == 200
        assert not anything.called


def test_reason_is_logged_without_the_token(secured: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="cds_service.auth")
    caplog.set_level(logging.WARNING, logger="cds_service.web")
    token = ES.token(aud="https://elsewhere.example/")
    assert_rejected(call(secured, token))
    assert "aud does not name this endpoint" in caplog.text
    assert token not in caplog.text and token.split(".")[2] not in caplog.text


def test_discovery_is_public_by_default_and_can_require_a_token(sqlite_url: str, jwks: respx.MockRouter) -> None:
    with TestClient(create_app(auth_config(sqlite_url))) as client:
        assert client.get("/cds-services").status_code == 200
    config = auth_config(sqlite_url)
    config.auth.discovery_public = False
    with TestClient(create_app(config)) as client:
        assert client.get("/cds-services").status_code == 401
        token = ES.token(aud="http://testserver/cds-services")
        assert client.get("/cds-services", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_issuer_can_restrict_the_fhir_server(sqlite_url: str, jwks: respx.MockRouter) -> None:
    body = scenario_request(KETAMINE)
    body["prefetch"] = {}
    body["fhirServer"] = "https://other-ehr.example/fhir"
    body["fhirAuthorization"] = {"access_token": "t", "token_type": "Bearer"}
    fhir = jwks.route(host="other-ehr.example")
    config = auth_config(sqlite_url, fhir_server_allowlist=["https://ehr.example.org/fhir"])
    with TestClient(create_app(config)) as client:
        response = client.post(SIGN, json=body, headers={"Authorization": f"Bearer {ES.token()}"})
    assert response.status_code == 412 and "allowlist" in response.text
    assert not fhir.called


@pytest.mark.parametrize(("url", "prefix", "expected"), [
    ("https://keys.ehr.example.org/jwks.json", "https://keys.ehr.example.org", True),
    ("https://keys.ehr.example.org.attacker.example/jwks.json", "https://keys.ehr.example.org", False),
    ("https://keys.ehr.example.org/keys/a.json", "https://keys.ehr.example.org/keys", True),
    ("https://keys.ehr.example.org/keys-evil/a.json", "https://keys.ehr.example.org/keys", False),
    ("https://keys.ehr.example.org/keys/a.json", "https://keys.ehr.example.org/keys/", True),
    ("http://keys.ehr.example.org/keys/a.json", "https://keys.ehr.example.org/keys/", False),
    ("https://keys.ehr.example.org:8443/keys/a.json", "https://keys.ehr.example.org/keys/", False),
    ("https://user@keys.ehr.example.org/keys/a.json", "https://keys.ehr.example.org/keys/", False),
])
def test_allowlist_prefixes_match_on_host_and_path_segments(url: str, prefix: str, expected: bool) -> None:
    from cds_service.fhir.client import url_under

    assert url_under(url, prefix) is expected

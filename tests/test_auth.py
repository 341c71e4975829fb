"""JWT authentication of the EHR (CDS Hooks 2.0 security), with keys made here and JWK Sets served by respx."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import hashlib
import hmac
import json
import logging
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from jose import jwt
from starlette.testclient import TestClient

from cds_service.auth.jwt import AuthError, JwtAuthenticator
from cds_service.config import ConfigError, parse_config
from cds_service.urls import is_loopback, url_under
from cds_service.web.app import create_app

from .serverproc import ServerProcess
from .support import (
    AUD,
    ES,
    FIXTURES,
    ISS,
    JWKS_URL,
    RS,
    Key,
    auth_config,
    load,
    scenario_request,
    searchset,
)

SIGN = "/cds-services/coverage-requirements-order-sign"
KETAMINE = load(FIXTURES / "scenarios/mp446-ketamine-iv-chronic-pain.json")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(alg: str, secret: bytes | None) -> str:
    now = int(time.time())
    head = b64(json.dumps({"alg": alg, "typ": "JWT", "kid": ES.kid}).encode())
    payload = b64(json.dumps({"iss": ISS, "aud": AUD, "iat": now, "exp": now + 300, "jti": str(uuid.uuid4())}).encode())
    signature = b64(hmac.new(secret, f"{head}.{payload}".encode(), hashlib.sha256).digest()) if secret else ""
    return f"{head}.{payload}.{signature}"


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
    stranger = Key("ES384", "stranger")
    evil = jwks.get("https://attacker.example/jwks.json").mock(
        return_value=httpx.Response(200, json={"keys": [stranger.jwk]}))
    assert_rejected(call(secured, stranger.token(headers={"jku": "https://attacker.example/jwks.json"})))
    assert_rejected(call(secured, stranger.token(headers={"jku": "https://keys.ehr.example.org.attacker.example/j"})))
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
    ("https://keys.ehr.example.org/keys/../evil.json", "https://keys.ehr.example.org/keys/", False),
    ("https://keys.ehr.example.org/keys/%2E%2E/evil.json", "https://keys.ehr.example.org/keys/", False),
    ("https://keys.ehr.example.org/keys/./a.json", "https://keys.ehr.example.org/keys/", True),
    ("https://KEYS.ehr.example.org:443/keys/a.json", "https://keys.ehr.example.org/keys/", True),
    ("http://[::1]:8080/keys/a.json", "http://[::1]:8080/keys", True),
])
def test_allowlist_prefixes_match_on_host_and_path_segments(url: str, prefix: str, expected: bool) -> None:
    assert url_under(url, prefix) is expected


# --- pinned keys, jku, replay switch (issue 12) --------------------------------------------------------------

SANDBOX_ISS = "https://sandbox.cds-hooks.org"
SANDBOX_JKU = "https://sandbox.cds-hooks.org/.well-known/jwks.json"
SANDBOX_KEYPAIR = load(FIXTURES / "keys/cds-hooks-sandbox-jwk-keypair.json")["keys"][0]


def sandbox_token(aud: str = AUD) -> str:
    """A token as the CDS Hooks sandbox makes one: ES384, its kid, a jku header, five minutes."""
    now = int(time.time())
    claims = {"iss": SANDBOX_ISS, "aud": aud, "exp": now + 300, "iat": now, "jti": str(uuid.uuid4())}
    token: str = jwt.encode(claims, SANDBOX_KEYPAIR, algorithm="ES384",
                            headers={"typ": "JWT", "kid": SANDBOX_KEYPAIR["kid"], "jku": SANDBOX_JKU})
    return token


def test_sandbox_token_verifies_against_the_pinned_inline_key(sqlite_url: str) -> None:
    public = {k: v for k, v in SANDBOX_KEYPAIR.items() if k != "d"}
    config = auth_config(sqlite_url, iss=SANDBOX_ISS, jwks_url=None, jwks={"keys": [public]}, jku_allowlist=[])
    with respx.mock(assert_all_called=False) as router:
        anything = router.route()
        with TestClient(create_app(config)) as client:
            assert call(client, sandbox_token()).status_code == 200
        assert not anything.called  # the jku was neither needed nor allowlisted


def test_pinned_keys_verify_a_token_whatever_its_jku(secured: TestClient, jwks: respx.MockRouter) -> None:
    elsewhere = jwks.route(host="attacker.example")
    response = call(secured, ES.token(headers={"jku": "https://attacker.example/jwks.json"}))
    assert response.status_code == 200
    assert not elsewhere.called


def test_allowlisted_jku_is_fetched_only_when_no_pinned_key_verifies(sqlite_url: str) -> None:
    rotated = Key("ES384", "published-at-jku")
    jku = "https://keys.ehr.example.org/jwks.json"
    config = auth_config(sqlite_url, jwks_url=None, jwks={"keys": [ES.jwk]})
    with respx.mock(assert_all_called=False) as router:
        route = router.get(jku).mock(return_value=httpx.Response(200, json={"keys": [rotated.jwk]}))
        with TestClient(create_app(config)) as client:
            assert call(client, ES.token(headers={"jku": jku})).status_code == 200
            assert not route.called
            assert call(client, rotated.token(headers={"jku": jku})).status_code == 200
            assert route.call_count == 1
            assert_rejected(call(client, Key("ES384", "published-at-jku").token(headers={"jku": jku})))


def test_replay_check_can_be_turned_off_for_one_issuer(sqlite_url: str, jwks: respx.MockRouter) -> None:
    token = ES.token()
    with TestClient(create_app(auth_config(sqlite_url, replay_check=False))) as client:
        assert call(client, token).status_code == 200
        assert call(client, token).status_code == 200  # a test harness reusing one jti


# --- hardening (issue 15) -----------------------------------------------------------------------------------

def test_token_lifetime_is_capped(sqlite_url: str, jwks: respx.MockRouter) -> None:
    now = int(time.time())
    with TestClient(create_app(auth_config(sqlite_url))) as client:
        assert_rejected(call(client, ES.token(exp=now + 10 * 365 * 86400)))
        assert_rejected(call(client, ES.token(iat=now - 3000, exp=now + 60)))
        assert call(client, ES.token(exp=now + 300 + 30)).status_code == 200  # within 5 min + leeway
    with TestClient(create_app(auth_config(sqlite_url, max_token_lifetime_seconds=3600))) as client:
        assert call(client, ES.token(exp=now + 3600)).status_code == 200


def test_bearer_scheme_is_case_insensitive(secured: TestClient) -> None:
    response = secured.post(SIGN, json=scenario_request(KETAMINE), headers={"Authorization": f"bearer {ES.token()}"})
    assert response.status_code == 200


STRANGER = Key("ES384", "stranger")  # a key no configuration trusts


@pytest.mark.parametrize("authorization", [
    "Bearer " + STRANGER.token(headers={"jku": "https://keys.ehr.example.org/\x01.json"}),
    "Bearer " + STRANGER.token(headers={"jku": "https://keys.ehr.example.org/" + "a" * 70_000}),
    "Bearer " + STRANGER.token(headers={"jku": "https://keys.ehr.example.org/ä.json"}),
    "Bearer " + ES.token(exp=10**20),
    "Bearer " + ES.token(exp=1e20),
    "Bearer " + ES.token(iat=-1e300),
    "Bearer " + ES.token(exp="tomorrow"),
    "Bearer " + ES.token(jti="j" * 501),
    "Bearer " + ES.token(iss="i" * 600),
    "Bearer äöü.ß.€",
    "Bearer " + "a" * 100_000,
], ids=["jku-control", "jku-70KiB", "jku-non-ascii", "exp-1e20-int", "exp-1e20", "iat-minus-1e300", "exp-text",
        "jti-501", "iss-600", "non-ascii", "huge"])
def test_absurd_tokens_are_401_not_500(sqlite_url: str, jwks: respx.MockRouter, authorization: str) -> None:
    jwks.route(host="keys.ehr.example.org").mock(return_value=httpx.Response(200, json={"keys": []}))
    with TestClient(create_app(auth_config(sqlite_url)), raise_server_exceptions=False) as client:
        response = client.post(SIGN, json=scenario_request(KETAMINE),
                               headers={"Authorization": authorization.encode("utf-8")})
    assert_rejected(response)


@pytest.mark.parametrize("jku", [
    "https://keys.ehr.example.org/keys/../evil.json",
    "https://keys.ehr.example.org/keys/%2e%2e/evil.json",
    "https://keys.ehr.example.org/keys/.%2E/evil.json",
    "https://keys.ehr.example.org/keys/..%2Fevil.json",
    "https://keys.ehr.example.org/keys/..\\evil.json",
])
def test_dot_segments_do_not_escape_the_jku_allowlist(sqlite_url: str, jku: str) -> None:
    stranger = Key("ES384", "stranger")
    config = auth_config(sqlite_url, jku_allowlist=["https://keys.ehr.example.org/keys/"])
    with respx.mock(assert_all_called=False) as router:
        router.get(JWKS_URL).mock(return_value=httpx.Response(200, json={"keys": [ES.jwk]}))
        allowed = router.route(host="keys.ehr.example.org", path__startswith="/keys/").mock(
            return_value=httpx.Response(200, json={"keys": []}))
        outside = router.route(host="keys.ehr.example.org").mock(
            return_value=httpx.Response(200, json={"keys": [stranger.jwk]}))
        with TestClient(create_app(config)) as client:
            assert_rejected(call(client, stranger.token(headers={"jku": jku})))
        assert not outside.called and not allowed.called


def test_jwks_fetches_are_limited_per_issuer_not_per_url(sqlite_url: str, jwks: respx.MockRouter) -> None:
    published = jwks.route(host="keys.ehr.example.org").mock(return_value=httpx.Response(200, json={"keys": []}))
    stranger = Key("ES384", "stranger")
    with TestClient(create_app(auth_config(sqlite_url))) as client:
        for n in range(20):
            jku = f"https://keys.ehr.example.org/set-{n}/jwks.json"
            assert_rejected(call(client, stranger.token(headers={"jku": jku})))
    assert published.call_count == 1
    assert jwks.routes[0].call_count == 1  # the issuer's jwks_url: once, then the kid-miss refetch is rate-limited


def test_a_failed_jwks_fetch_is_cached(sqlite_url: str) -> None:
    with respx.mock(assert_all_called=False) as router:
        route = router.get(JWKS_URL).mock(return_value=httpx.Response(503))
        with TestClient(create_app(auth_config(sqlite_url))) as client:
            for _ in range(5):
                assert_rejected(call(client, ES.token()))
        assert route.call_count == 1


def test_an_oversized_jwk_set_is_refused(sqlite_url: str) -> None:
    padding = [{"kty": "oct", "kid": f"pad-{n}", "k": "x" * 1000} for n in range(1000)]
    with respx.mock(assert_all_called=False) as router:
        router.get(JWKS_URL).mock(return_value=httpx.Response(200, json={"keys": [ES.jwk, *padding]}))
        with TestClient(create_app(auth_config(sqlite_url))) as client:
            assert_rejected(call(client, ES.token()))


def test_key_tables_stay_bounded_however_many_urls_are_tried(sqlite_url: str) -> None:
    """With refetching unthrottled, 300 distinct allowlisted jku URLs (each a JWK Set of 16 keys) are
    fetched, but only a few sets are kept: memory does not grow with the number of URLs."""
    jwk_set = {"keys": [{**RS.jwk, "kid": f"k{n}"} for n in range(16)]}
    config = auth_config(sqlite_url, jwks_url=None, jwks={"keys": [ES.jwk]})
    config.auth.jwks_refetch_min_seconds = 0
    fetched: set[str] = set()

    def publish(request: httpx.Request) -> httpx.Response:
        fetched.add(request.url.path)
        return httpx.Response(200, json=jwk_set)

    authenticator = JwtAuthenticator(config.auth, lambda iss, jti, exp: True, httpx.MockTransport(publish))
    tokens = [STRANGER.token(headers={"jku": f"https://keys.ehr.example.org/{n}.json"}) for n in range(600)]

    async def attempts(batch: list[str]) -> None:
        for token in batch:
            with contextlib.suppress(AuthError):
                await authenticator.authenticate(f"Bearer {token}", [AUD])

    asyncio.run(attempts(tokens[:300]))  # warm up: the first sets and every code path
    gc.collect()  # garbage that only waits for the cyclic collector is not growth
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    asyncio.run(attempts(tokens[300:]))
    gc.collect()
    grown = sum(stat.size_diff for stat in tracemalloc.take_snapshot().compare_to(before, "filename"))
    tracemalloc.stop()
    assert len(fetched) == 600
    assert grown < 256 * 1024, grown


@pytest.mark.parametrize(("issuer", "message"), [
    ({"jwks_url": "http://localhost.evil.example/jwks.json"}, "jwks_url must use https"),
    ({"jwks_url": "http://127.0.0.1.evil.example/jwks.json"}, "jwks_url must use https"),
    ({"jku_allowlist": ["http://keys.ehr.example.org/"]}, "must use https"),
    ({"jku_allowlist": ["https://keys.ehr.example.org/%2e%2e/"]}, "percent-encoded"),
])
def test_key_urls_may_use_plain_http_only_on_loopback(issuer: dict[str, Any], message: str) -> None:
    data = {"auth": {"mode": "jwt", "issuers": [{"iss": ISS, "jwks_url": JWKS_URL, **issuer}]}}
    with pytest.raises(ConfigError, match=message):
        parse_config(data, "test.toml")
    loopback = {"iss": ISS, "jwks_url": "http://127.0.0.1:18401/jwks.json",
                "jku_allowlist": ["http://localhost:18401/custom/", "http://[::1]:18401/"]}
    parse_config({"auth": {"mode": "jwt", "issuers": [loopback]}}, "test.toml")


def test_audience_never_follows_the_host_header(sqlite_url: str, jwks: respx.MockRouter) -> None:
    config = auth_config(sqlite_url)
    config.service.public_base_url = None
    with TestClient(create_app(config), base_url="http://cds.attacker.example") as client:
        token = ES.token(aud=f"http://cds.attacker.example{SIGN}")
        assert_rejected(client.post(SIGN, json=scenario_request(KETAMINE), headers={
            "Authorization": f"Bearer {token}", "X-Forwarded-Proto": "https"}))


def test_explicit_audiences_are_accepted(sqlite_url: str, jwks: respx.MockRouter) -> None:
    config = auth_config(sqlite_url)
    config.service.public_base_url = None
    config.auth.audiences = ["https://cds.payer.example/cds-services"]
    with TestClient(create_app(config)) as client:
        assert call(client, ES.token(aud="https://cds.payer.example/cds-services")).status_code == 200
        assert_rejected(call(client, ES.token(aud=AUD)))


def test_default_fhir_server_allowlist_is_the_issuers_host(sqlite_url: str, jwks: respx.MockRouter) -> None:
    """In jwt mode without fhir_server_allowlist, a token of https://ehr.example.org lets the service read
    FHIR servers on that host (any port) only: not another host, not this machine's loopback ports."""
    servers = {"http://127.0.0.1:5432/fhir": 412, "https://other.example/fhir": 412,
               "https://ehr.example.org:8443/fhir": 200, "https://ehr.example.org/fhir": 200}
    reads = {host: jwks.route(host=host).mock(return_value=httpx.Response(200, json=searchset([])))
             for host in ("127.0.0.1", "other.example", "ehr.example.org")}
    statuses = {}
    with TestClient(create_app(auth_config(sqlite_url))) as client:
        for server in servers:
            body = {**scenario_request(KETAMINE), "prefetch": {}, "fhirServer": server,
                    "fhirAuthorization": {"access_token": "t", "token_type": "Bearer"}}
            statuses[server] = client.post(SIGN, json=body, headers={"Authorization": f"Bearer {ES.token()}"}
                                           ).status_code
    assert statuses == servers
    assert reads["ehr.example.org"].called
    assert not reads["127.0.0.1"].called and not reads["other.example"].called


def test_on_loopback_the_audience_is_the_listening_socket(tmp_path: Path) -> None:
    """Without public_base_url, a service listening on loopback takes its audience from the socket a request
    arrived on (as a local harness calls it), never from Host or X-Forwarded-Proto."""
    config = tmp_path / "cds.toml"
    config.write_text(f'[auth]\nmode = "jwt"\n[[auth.issuers]]\niss = "{ISS}"\n'
                      f'jwks = {{ keys = [{toml_table(ES.jwk)}] }}\n'
                      f'[storage]\nurl = "sqlite:///{tmp_path / "cds.sqlite3"}"\naudit_writer = "thread"\n')
    body = scenario_request(KETAMINE)
    with ServerProcess(config) as server:
        def post(aud: str, **headers: str) -> int:
            token = ES.token(aud=aud)
            return httpx.post(server.url + SIGN, json=body, timeout=10,
                              headers={"Authorization": f"Bearer {token}", **headers}).status_code

        assert post(server.url + SIGN) == 200
        assert post("http://cds.attacker.example" + SIGN, Host="cds.attacker.example") == 401
        assert post(server.url.replace("http:", "https:") + SIGN, **{"X-Forwarded-Proto": "https"}) == 401


def toml_table(values: dict[str, Any]) -> str:
    return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in values.items()) + " }"


@pytest.mark.parametrize(("host", "expected"), [
    ("localhost", True), ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True),
    ("localhost.evil.example", False), ("127.0.0.1.evil.example", False), ("evil-localhost", False),
    ("0.0.0.0", False), ("", False), (None, False),
])
def test_loopback_is_decided_on_the_parsed_host(host: str | None, expected: bool) -> None:
    assert is_loopback(host) is expected

"""Hardening at the HTTP edge (issue 15): bodies that end early, nest too deep or hide a token in an odd
shape, and the limits of the server process itself (header and body read timeouts, head size, keep-alive,
concurrency). Authentication and FHIR-server hardening are in test_auth.py and test_data_access.py."""

from __future__ import annotations

import asyncio
import copy
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from starlette.testclient import TestClient

from cds_service.config import ConfigError, parse_config
from cds_service.jsonutil import MAX_DEPTH
from cds_service.storage.tables import hook_audit
from cds_service.web.app import create_app

from .serverproc import ServerProcess
from .support import FIXTURES, load, make_config, scenario_request

SIGN = "/cds-services/coverage-requirements-order-sign"
TRIAL = load(FIXTURES / "scenarios/mp442-chronic-pain-successful-trial.json")
SECRET = "s3cr3t-access-token-9d2e"


def fresh_request() -> dict[str, Any]:
    """The trial scenario's hook request, a copy of its own (tests here modify it in place)."""
    return copy.deepcopy(scenario_request(TRIAL))


def json_depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((json_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((json_depth(v) for v in value), default=0)
    return 0


def reference_chain(levels: int) -> dict[str, Any]:
    """A Reference nested through identifier.assigner: the element kind that makes fhir.resources recurse
    deepest per JSON level (measured: about eight Python frames a level)."""
    reference: dict[str, Any] = {"reference": "Practitioner/dr1"}
    for _ in range(levels):
        reference = {"identifier": {"assigner": reference}}
    return reference


def extension_chain(levels: int) -> list[dict[str, Any]]:
    extension: dict[str, Any] = {"url": "http://example.org/e", "valueString": "x"}
    for _ in range(levels):
        extension = {"url": "http://example.org/e", "extension": [extension]}
    return [extension]


@pytest.fixture
def app_client(sqlite_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(make_config(sqlite_url)), raise_server_exceptions=False) as client:
        yield client


def audited_requests(client: TestClient) -> list[Any]:
    store = client.app.state.cds.store  # type: ignore[attr-defined]
    store.close()  # flush the writer
    return [row["request"] for row in store.audit_export()]


def stored_request_bytes(client: TestClient) -> list[bytes]:
    """The audit's request column as stored (before JSON parsing, which would hide duplicate keys)."""
    store = client.app.state.cds.store  # type: ignore[attr-defined]
    store.close()  # flush the writer
    with store.engine.connect() as connection:
        values = [bytes(v) for (v,) in connection.execute(sa.select(sa.type_coerce(hook_audit.c.request,
                                                                                   sa.LargeBinary)))]
    return [zlib.decompress(v) if v[:1] == b"\x78" else v for v in values]


# --- bodies ----------------------------------------------------------------------------------------------------

def test_client_disconnect_mid_body_is_a_400_and_audited(sqlite_url: str) -> None:
    app = create_app(make_config(sqlite_url))
    sent: list[dict[str, Any]] = []
    messages: list[MutableMapping[str, Any]] = [
        {"type": "http.request", "body": b'{"hook": "order-sign", "context": {', "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> MutableMapping[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": SIGN, "raw_path": SIGN.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"host", b"127.0.0.1:8080"), (b"content-type", b"application/json"),
                         (b"content-length", b"4096")],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080)}
    with TestClient(app):  # runs the app's lifespan; the call itself goes straight to the ASGI app
        asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 400
    assert b"disconnected before the request body was complete" in sent[1]["body"]
    assert [r["status_code"] for r in app.state.cds.store.audit_export()] == [400]


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 300])
def test_json_nested_too_deep_is_refused_at_parse_time(app_client: TestClient, depth: int) -> None:
    body = fresh_request()
    nested: Any = "leaf"
    for _ in range(depth - 1):
        nested = [nested]
    body["extension"] = {"example": nested}
    assert json_depth(body) > MAX_DEPTH
    response = app_client.post(SIGN, json=body)
    assert response.status_code == 400
    assert f"nested deeper than {MAX_DEPTH} levels" in response.json()["issue"][0]["diagnostics"]
    feedback = {"feedback": [{"card": "c1", "outcome": "overridden", "outcomeTimestamp": "2026-06-01T10:00:00Z",
                              "overrideReason": {"userComment": nested}}]}
    response = app_client.post(f"{SIGN}/feedback", json=feedback)
    assert response.status_code == 400 and "nested deeper" in response.text


def test_extension_chain_too_deep_for_fhir_models_is_a_400(app_client: TestClient) -> None:
    """130 nested extensions on the order: within what the JSON reader accepts, deep enough to overflow the
    Python stack while fhir.resources validates the order."""
    body = fresh_request()
    body["context"]["draftOrders"]["entry"][0]["resource"]["extension"] = extension_chain(130)
    response = app_client.post(SIGN, json=body)
    assert response.status_code == 400
    assert response.json()["resourceType"] == "OperationOutcome"


def test_deepest_accepted_nesting_is_decided_without_error(app_client: TestClient) -> None:
    """References nested to the depth limit, in the order and in a pain score the decision validates."""
    body = fresh_request()
    order = body["context"]["draftOrders"]["entry"][0]["resource"]
    order["requester"] = reference_chain((MAX_DEPTH - 8) // 2)
    score = next(e["resource"] for e in body["prefetch"]["observations"]["entry"]
                 if e["resource"]["resourceType"] == "Observation")
    score["performer"] = [reference_chain((MAX_DEPTH - 9) // 2)]
    assert MAX_DEPTH - 2 <= json_depth(body) <= MAX_DEPTH
    response = app_client.post(SIGN, json=body)
    assert response.status_code == 200, response.text
    assert response.json()["systemActions"]


# --- what the audit keeps ---------------------------------------------------------------------------------------

def raw_body(authorization: str) -> bytes:
    """A hook request as JSON text, with ``authorization`` (JSON members) spliced in before its end."""
    text = httpx.Request("POST", "http://x", json=fresh_request()).content.decode()
    return (text[:-1] + ", " + authorization + "}").encode()


@pytest.mark.parametrize("authorization", [
    f'"fhirAuthorization": "{SECRET}"',
    f'"fhirAuthorization": ["{SECRET}"]',
    f'"fhirAuthorization": {{"Access_Token": "{SECRET}", "token_type": "Bearer"}}',
    f'"FHIRauthorization": {{"access_token": "{SECRET}", "token_type": "Bearer"}}',
    f'"fhirAuthorization": {{"access_token": "t", "token_type": "Bearer", "extra": {{"id_token": "{SECRET}"}}}}',
    f'"fhirAuthorization": {{"access_token": "{SECRET}", "token_type": "Bearer"}}, "fhirAuthorization": null',
    f'"fhir\\u0041uthorization": {{"access_token": "{SECRET}"}}, "fhirAuthorization": {{"scope": "x"}}',
    f'"fhirAuthorization": {{"access_token": "{SECRET}", "access_token": "t", "token_type": "Bearer"}}',
], ids=["string", "array", "key-casing-inside", "key-casing", "nested", "duplicate-key", "escaped-duplicate",
        "duplicate-member"])
def test_no_shape_of_fhir_authorization_reaches_the_audit(app_client: TestClient, authorization: str) -> None:
    body = raw_body(authorization)
    assert SECRET.encode() in body
    response = app_client.post(SIGN, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code < 500
    stored = stored_request_bytes(app_client)
    assert len(stored) == 1 and SECRET.encode() not in stored[0]


def test_a_request_without_fhir_authorization_is_stored_as_received(app_client: TestClient) -> None:
    body = raw_body('"extension": {"note": "kept"}')
    assert app_client.post(SIGN, content=body, headers={"Content-Type": "application/json"}).status_code == 200
    assert audited_requests(app_client)[0]["extension"] == {"note": "kept"}


# --- the server process ---------------------------------------------------------------------------------------

LIMITS = """
[server]
header_read_timeout_seconds = 1
body_read_timeout_seconds = 1
timeout_keep_alive_seconds = 1
limit_concurrency = 3
"""


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("limits")
    config = tmp / "cds.toml"
    config.write_text(LIMITS + f'[storage]\nurl = "sqlite:///{tmp / "cds.sqlite3"}"\naudit_writer = "thread"\n')
    with ServerProcess(config) as server:
        yield server


def connect(server: ServerProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    return sock


def read_until_closed(sock: socket.socket) -> tuple[bytes, float]:
    started = time.monotonic()
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data, time.monotonic() - started


def test_a_silent_connection_is_closed_after_the_header_read_timeout(limited_server: ServerProcess) -> None:
    with connect(limited_server) as sock:
        data, waited = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 408") and waited < 3


def test_trickled_headers_are_cut_at_the_header_read_timeout(limited_server: ServerProcess) -> None:
    with connect(limited_server) as sock:
        sock.sendall(f"POST {SIGN} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode())
        time.sleep(0.5)
        sock.sendall(b"X-Slow: 1\r\n")
        data, waited = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 408") and waited < 3


@pytest.mark.parametrize("path", [SIGN, SIGN + "/feedback"])
def test_a_trickled_body_is_refused_with_408(limited_server: ServerProcess, path: str) -> None:
    with connect(limited_server) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     "Content-Length: 100\r\n\r\n{\"hook\":".encode())
        answer, waited = read_until_closed(sock)  # the status line and the body may come in two segments
    assert answer.startswith(b"HTTP/1.1 408") and b"OperationOutcome" in answer
    assert waited < 3


def test_an_oversized_request_head_is_refused_with_431(limited_server: ServerProcess) -> None:
    with connect(limited_server) as sock:
        sock.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: {'a' * 70_000}\r\n\r\n".encode())
        data, _ = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 431")


def test_concurrency_beyond_the_limit_gets_503(limited_server: ServerProcess) -> None:
    idle = [connect(limited_server) for _ in range(3)]
    try:
        time.sleep(0.1)
        assert httpx.get(f"{limited_server.url}/health", timeout=5).status_code == 503
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.2)
    assert httpx.get(f"{limited_server.url}/health", timeout=5).status_code == 200


def test_idle_keep_alive_connections_are_closed(limited_server: ServerProcess) -> None:
    with connect(limited_server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        data, waited = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 200") and waited < 3


@pytest.mark.parametrize(("data", "message"), [
    ({"server": {"limit_concurrency": 0}}, "server.limit_concurrency must be at least 1"),
    ({"server": {"body_read_timeout_seconds": 301}}, "server.body_read_timeout_seconds must be between"),
    ({"server": {"header_timeout": 5}}, "unknown key server.header_timeout"),
    ({"fhir": {"max_total_bytes": 0}}, "fhir.max_total_bytes must be positive"),
    ({"auth": {"max_token_lifetime_seconds": 0}}, "auth.max_token_lifetime_seconds must be positive"),
    ({"auth": {"audiences": ["not a url"]}}, "auth.audiences must be an absolute http(s) URL"),
    ({"auth": {"issuers": [{"iss": "https://e.example", "jwks_url": "https://e.example/k", "replay_check": "no"}]}},
     "replay_check has the wrong type"),
    ({"auth": {"issuers": [{"iss": "https://e.example"}]}}, "needs jwks_url, jwks or jku_allowlist"),
    ({"service": {"public_base_url": "https://cds.example/?x=1"}}, "must not carry a query"),
])
def test_new_settings_are_checked(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(data, "test.toml")
    assert message in str(error.value)


def test_server_limits_are_checked_at_start_up(tmp_path: Path) -> None:
    config = tmp_path / "cds.toml"
    config.write_text("[server]\nheader_read_timeout_seconds = 0\n")
    result = subprocess.run([sys.executable, "-m", "cds_service", "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "server.header_read_timeout_seconds" in result.stderr


def test_jwt_mode_off_loopback_needs_public_base_url(tmp_path: Path) -> None:
    config = tmp_path / "cds.toml"
    config.write_text('[auth]\nmode = "jwt"\n[[auth.issuers]]\niss = "https://ehr.example.org"\n'
                      'jwks_url = "https://ehr.example.org/jwks.json"\n')
    result = subprocess.run([sys.executable, "-m", "cds_service", "serve", "--config", str(config), "--host",
                             "0.0.0.0", "--port", "1"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "service.public_base_url" in result.stderr

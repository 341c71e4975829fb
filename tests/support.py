"""Helpers shared by the tests. Test modules import from here (and from the helper modules beside it:
``crd_profile`` the CRD coverage-information profile as an oracle, ``dtr_client`` a DTR client, ``serverproc``
a service in a process of its own, ``tcpproxy`` a proxy to cut a database off), never from another test module
or from conftest, which holds only fixtures. Building hook requests from scenario files is the package's
(cds_service.hooks.scenarios, which ``cds-service policy check`` uses too)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jose import jwk, jwt
from prometheus_client.parser import text_string_to_metric_families

from cds_service.config import AuthSettings, Config, IssuerSettings, StorageSettings
from cds_service.hooks.scenarios import (
    PREFETCH_KEYS,
    SERVICE_FOR_HOOK,
    hook_request,
    prefetch_for,
    scenario_request,
    searchset,
)
from cds_service.hooks.service import CoverageService, HookResult

__all__ = ["AUD", "ES", "FIXTURES", "HOOK_CORPUS", "ISS", "JWKS_URL", "PG_ENV", "PREFETCH_KEYS", "ROOT", "RS",
           "SCENARIOS", "SERVICE_FOR_HOOK", "Key", "auth_config", "cli", "coverage_extension", "hook_request",
           "load", "make_config", "pg_schema_url", "prefetch_for", "run", "samples", "scenario_request",
           "searchset", "write_config"]

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
SCENARIOS = sorted((FIXTURES / "scenarios").glob("*.json"))
HOOK_CORPUS = sorted((FIXTURES / "hooks").glob("*.json"))
#: set to a PostgreSQL URL to run the storage tests on PostgreSQL too (each run in a schema of its own)
PG_ENV = "CDS_TEST_POSTGRES_URL"


def load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def coverage_extension(resource: dict[str, Any]) -> dict[str, Any]:
    ext = [e for e in resource.get("extension", [])
           if e["url"] == "http://hl7.org/fhir/us/davinci-crd/StructureDefinition/ext-coverage-information"]
    assert len(ext) == 1, ext
    return {p["url"]: p for p in ext[0]["extension"]}


def run(service: CoverageService, body: dict[str, Any]) -> HookResult:
    """The service's answer to a hook request (for the service of its hook), as ``https://cds.example.org``."""
    return asyncio.run(service.handle(SERVICE_FOR_HOOK[body["hook"]], body, "https://cds.example.org"))


# --- configurations, databases, the command line ------------------------------------------------------

def make_config(url: str, **service: object) -> Config:
    """A config for in-process apps; the audit writer is a thread (a writer process per test app would
    only cost start-up time; the process writer is tested with real servers in test_storage.py)."""
    config = Config(storage=StorageSettings(url=url, audit_writer="thread"))
    for key, value in service.items():
        setattr(config.service, key, value)
    return config


def write_config(tmp_path: Path, url: str, extra: str = "") -> Path:
    """A configuration file for a service run as a command (its storage URL, and ``extra`` TOML)."""
    path = tmp_path / "cds.toml"
    path.write_text(f'[storage]\nurl = "{url}"\n{extra}')
    return path


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``cds-service ARGS`` in a process of its own."""
    return subprocess.run([sys.executable, "-m", "cds_service", *args], capture_output=True, text=True, timeout=60)


def pg_schema_url(base: str) -> Iterator[str]:
    """A URL of the PostgreSQL database ``base`` whose search path is a new schema, dropped afterwards."""
    schema = "t_" + uuid.uuid4().hex[:12]
    engine = sa.create_engine(base.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.begin() as connection:
        connection.execute(sa.text(f"CREATE SCHEMA {schema}"))
    sep = "&" if "?" in base else "?"
    try:
        yield f"{base}{sep}options=-csearch_path%3D{schema}"
    finally:
        with engine.begin() as connection:
            connection.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        engine.dispose()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of a Prometheus text page, by name and labels."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# --- the EHR's tokens: keys made here, one issuer -----------------------------------------------------

ISS = "https://ehr.example.org"
JWKS_URL = "https://ehr.example.org/.well-known/jwks.json"
AUD = "http://testserver/cds-services/coverage-requirements-order-sign"


class Key:
    """A signing key of the EHR (EC P-384 or RSA 2048), its public JWK, and tokens it signs."""

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
        """A token from :data:`ISS` for :data:`AUD`, valid for five minutes; ``overrides`` set claims (None
        removes one)."""
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


def auth_config(url: str, **issuer: Any) -> Config:
    """An in-process app's config in jwt mode, trusting :data:`ISS` with its keys at :data:`JWKS_URL` (the
    ``jwks`` fixture serves them)."""
    config = make_config(url, public_base_url="http://testserver")
    settings = {"iss": ISS, "jwks_url": JWKS_URL, "jku_allowlist": ["https://keys.ehr.example.org/"], **issuer}
    config.auth = AuthSettings(mode="jwt", issuers=[IssuerSettings(**settings)], jwks_refetch_min_seconds=30)
    return config

"""Configuration: a TOML file (``--config`` or ``CDS_SERVICE_CONFIG``) over embedded defaults.

Every key is checked: a misspelt or unknown key is a startup error that names it.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import SetupError
from .urls import UrlError, canonical_url, loopback_or_https_problem

ENV_CONFIG = "CDS_SERVICE_CONFIG"
ENV_HEADER_READ_TIMEOUT = "CDS_SERVICE_HEADER_READ_TIMEOUT"  # set by `cds-service serve` for its workers
ENV_RUN_DIR = "CDS_SERVICE_RUN_DIR"  # set by `cds-service serve` for its workers: the run directory
DEFAULT_DATABASE = "sqlite:///cds-service.sqlite3"


class ConfigError(SetupError):
    """The configuration is not valid; the message names the key."""


@dataclass
class ServiceSettings:
    public_base_url: str | None = None
    payer_name: str = "Example Health Plan"
    max_body_bytes: int = 5 * 1024 * 1024
    policies_dir: str | None = None
    cards_dir: str | None = None
    #: the payers this deployment handles ("system|value" or "value"); CRD 2.2 hook-13 (see README)
    payer_identifiers: list[str] = field(default_factory=list)


@dataclass
class IssuerSettings:
    iss: str
    jwks_url: str | None = None
    jwks: dict[str, Any] | None = None
    jku_allowlist: list[str] = field(default_factory=list)
    tenants: list[str] | None = None
    fhir_server_allowlist: list[str] | None = None  # None: FHIR servers on the issuer's own host only
    replay_check: bool = True
    max_token_lifetime_seconds: int | None = None  # None: [auth] max_token_lifetime_seconds


@dataclass
class AuthSettings:
    mode: str = "off"
    discovery_public: bool = True
    audiences: list[str] | None = None  # accepted aud values; default: the endpoint's URL under public_base_url
    leeway_seconds: int = 60
    max_token_lifetime_seconds: int = 300
    jwks_cache_seconds: int = 300
    jwks_refetch_min_seconds: int = 30
    issuers: list[IssuerSettings] = field(default_factory=list)


@dataclass
class FhirSettings:
    timeout_seconds: float = 3.0
    allow_http: bool = False
    max_total_bytes: int = 16 * 1024 * 1024  # read from FHIR servers per hook call
    max_resources: int = 10_000  # read from FHIR servers per hook call


@dataclass
class ServerSettings:
    """uvicorn's limits (``cds-service serve``) and the request body read timeout."""

    limit_concurrency: int = 256  # connections + requests in progress per worker; beyond: HTTP 503
    timeout_keep_alive_seconds: int = 5  # an idle keep-alive connection is closed after this
    header_read_timeout_seconds: float = 10.0  # a request's headers must arrive within this
    body_read_timeout_seconds: float = 10.0  # a request's body must arrive within this (else HTTP 408)
    #: the running service's state: pid, policy generations, workers (default: beside the SQLite file, else
    #: cds-service-run in the working directory); ``cds-service policy reload`` finds the service through it
    run_dir: str | None = None


@dataclass
class StorageSettings:
    url: str = DEFAULT_DATABASE
    audit_writer: str = "process"
    spool_dir: str | None = None  # default: beside the SQLite file, else in the working directory
    spool_max_bytes: int = 1 << 30
    database_timeout_seconds: float = 5.0


@dataclass
class MetricsSettings:
    """``GET /metrics``: who may read it."""

    enabled: bool = True
    #: "local": clients on a loopback address only; "token": those, and others with the bearer token in
    #: ``token_file``; "open": anyone (only where the network in front decides who reaches it)
    access: str = "local"
    token_file: str | None = None


@dataclass
class LoggingSettings:
    format: str = "auto"  # "json", "text", or "auto" (text on a terminal, else JSON)


@dataclass
class Config:
    """The whole configuration, by section; each key is README's (Configuration)."""

    service: ServiceSettings = field(default_factory=ServiceSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    fhir: FhirSettings = field(default_factory=FhirSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    source: str = "embedded defaults"


_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,), "str | None": (str,), "int": (int,), "int | None": (int,), "float": (int, float), "bool": (bool,),
    "list[str]": (list,), "list[str] | None": (list,), "dict[str, Any] | None": (dict,),
}


def _fill(cls: type, data: Any, where: str, skip: tuple[str, ...] = ()) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"[{where}] must be a table")
    known = {f.name: f for f in fields(cls) if f.name not in skip}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown key {where}.{unknown[0]} (known keys in [{where}]: {', '.join(sorted(known))})")
    values = {}
    for name, value in data.items():
        kinds = _TYPES.get(str(known[name].type), (object,))
        if isinstance(value, bool) and bool not in kinds:
            raise ConfigError(f"{where}.{name} has the wrong type")
        if not isinstance(value, kinds):
            raise ConfigError(f"{where}.{name} has the wrong type (expected {known[name].type})")
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}.{name} must be a list of strings")
        values[name] = value
    try:
        return cls(**values)
    except TypeError as error:
        raise ConfigError(f"[{where}]: {error}") from None


def parse_config(data: dict[str, Any], source: str) -> Config:
    sections = ("service", "auth", "fhir", "server", "storage", "metrics", "logging")
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise ConfigError(f"unknown section [{unknown[0]}] (known: {', '.join(sections)})")
    auth_data = dict(data.get("auth", {}))
    issuers_data = auth_data.pop("issuers", [])
    if not isinstance(issuers_data, list):
        raise ConfigError("auth.issuers must be an array of tables ([[auth.issuers]])")
    auth = _fill(AuthSettings, auth_data, "auth", skip=("issuers",))
    auth.issuers = [_fill(IssuerSettings, i, "auth.issuers") for i in issuers_data]
    config = Config(
        service=_fill(ServiceSettings, data.get("service", {}), "service"),
        auth=auth,
        fhir=_fill(FhirSettings, data.get("fhir", {}), "fhir"),
        server=_fill(ServerSettings, data.get("server", {}), "server"),
        storage=_fill(StorageSettings, data.get("storage", {}), "storage"),
        metrics=_fill(MetricsSettings, data.get("metrics", {}), "metrics"),
        logging=_fill(LoggingSettings, data.get("logging", {}), "logging"),
        source=source,
    )
    validate(config)
    return config


def validate(config: Config) -> None:
    if config.auth.mode not in ("jwt", "off"):
        raise ConfigError('auth.mode must be "jwt" or "off"')
    if config.auth.mode == "jwt" and not config.auth.issuers:
        raise ConfigError('auth.mode = "jwt" needs at least one [[auth.issuers]]')
    _validate_auth(config.auth)
    if any(not token.strip() or token.strip().endswith("|") for token in config.service.payer_identifiers):
        raise ConfigError('service.payer_identifiers: each entry is "system|value" or "value"')
    if config.service.max_body_bytes <= 0:
        raise ConfigError("service.max_body_bytes must be positive")
    if not 0 < config.fhir.timeout_seconds <= 30:
        raise ConfigError("fhir.timeout_seconds must be between 0 and 30")
    for name in ("max_total_bytes", "max_resources"):
        if getattr(config.fhir, name) <= 0:
            raise ConfigError(f"fhir.{name} must be positive")
    _validate_server(config.server)
    if config.storage.audit_writer not in ("process", "thread"):
        raise ConfigError('storage.audit_writer must be "process" or "thread"')
    if not config.storage.url.startswith(("sqlite:", "postgresql:", "postgresql+psycopg:")):
        raise ConfigError("storage.url must be sqlite:///... or postgresql://...")
    if config.storage.spool_max_bytes < 1 << 16:
        raise ConfigError("storage.spool_max_bytes must be at least 65536 (it is in bytes)")
    if not 0.5 <= config.storage.database_timeout_seconds <= 60:
        raise ConfigError("storage.database_timeout_seconds must be between 0.5 and 60")
    if config.service.public_base_url is not None:
        _base_url(config.service.public_base_url, "service.public_base_url")
    if config.metrics.access not in ("local", "token", "open"):
        raise ConfigError('metrics.access must be "local", "token" or "open"')
    if config.metrics.access == "token" and not config.metrics.token_file:
        raise ConfigError('metrics.access = "token" needs metrics.token_file (a file holding the token)')
    if config.logging.format not in ("auto", "json", "text"):
        raise ConfigError('logging.format must be "auto", "json" or "text"')


def _base_url(url: str, where: str) -> None:
    try:
        canonical = canonical_url(url)
    except UrlError as error:
        raise ConfigError(f"{where} must be an absolute http(s) URL: it {error}") from None
    if "?" in canonical or "#" in url:
        raise ConfigError(f"{where} must not carry a query or a fragment")


def _validate_auth(auth: AuthSettings) -> None:
    if not 0 <= auth.leeway_seconds <= 300:
        raise ConfigError("auth.leeway_seconds must be between 0 and 300")
    for name in ("max_token_lifetime_seconds", "jwks_cache_seconds"):
        if getattr(auth, name) <= 0:
            raise ConfigError(f"auth.{name} must be positive")
    if auth.jwks_refetch_min_seconds < 0:
        raise ConfigError("auth.jwks_refetch_min_seconds must not be negative")
    for audience in auth.audiences or []:
        _base_url(audience, "auth.audiences")
    seen: set[str] = set()
    for issuer in auth.issuers:
        where = f"auth.issuers {issuer.iss!r}"
        if not issuer.iss or len(issuer.iss) > 500:
            raise ConfigError("auth.issuers: iss must be a non-empty string of at most 500 characters")
        if issuer.iss in seen:
            raise ConfigError(f"{where}: listed twice")
        seen.add(issuer.iss)
        if not issuer.jwks_url and not issuer.jwks and not issuer.jku_allowlist:
            raise ConfigError(f"{where}: needs jwks_url, jwks or jku_allowlist")
        if issuer.jwks is not None and not isinstance(issuer.jwks.get("keys"), list):
            raise ConfigError(f"{where}: jwks must be a JWK Set (a table with a keys array)")
        if issuer.jwks_url and (problem := loopback_or_https_problem(issuer.jwks_url)):
            raise ConfigError(f"{where}: jwks_url {problem}")
        for entry in issuer.jku_allowlist:
            if problem := loopback_or_https_problem(entry):
                raise ConfigError(f"{where}: jku_allowlist entry {entry!r} {problem}")
        for entry in issuer.fhir_server_allowlist or []:
            _base_url(entry, f"{where}: fhir_server_allowlist entry")
        if issuer.max_token_lifetime_seconds is not None and issuer.max_token_lifetime_seconds <= 0:
            raise ConfigError(f"{where}: max_token_lifetime_seconds must be positive")


def _validate_server(server: ServerSettings) -> None:
    if server.limit_concurrency < 1:
        raise ConfigError("server.limit_concurrency must be at least 1")
    if server.timeout_keep_alive_seconds < 1:
        raise ConfigError("server.timeout_keep_alive_seconds must be at least 1")
    for name in ("header_read_timeout_seconds", "body_read_timeout_seconds"):
        if not 0 < getattr(server, name) <= 300:
            raise ConfigError(f"server.{name} must be between 0 and 300")


MIN_METRICS_TOKEN = 16


def metrics_token(settings: MetricsSettings) -> str | None:
    """The token ``GET /metrics`` asks non-local clients for (``access = "token"``), read from its file."""
    if settings.access != "token" or not settings.token_file:
        return None
    try:
        token = Path(settings.token_file).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"metrics.token_file {settings.token_file} cannot be read: "
                          f"{getattr(error, 'strerror', None) or type(error).__name__}") from None
    if len(token) < MIN_METRICS_TOKEN or not token.isascii() or any(c.isspace() for c in token):
        raise ConfigError(f"metrics.token_file {settings.token_file} must hold one token of at least "
                          f"{MIN_METRICS_TOKEN} ASCII characters without spaces")
    return token


def load_config(path: str | None = None) -> Config:
    """The configuration from ``path``, else from ``$CDS_SERVICE_CONFIG``, else the embedded defaults."""
    path = path or os.environ.get(ENV_CONFIG)
    if not path:
        return Config()
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from None
    return parse_config(data, path)

"""Configuration: a TOML file (``--config`` or ``CDS_SERVICE_CONFIG``) over embedded defaults.

Every key is checked: a misspelt or unknown key is a startup error that names it.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

ENV_CONFIG = "CDS_SERVICE_CONFIG"
DEFAULT_DATABASE = "sqlite:///cds-service.sqlite3"


class ConfigError(ValueError):
    """The configuration is not valid; the message names the key."""


@dataclass
class ServiceSettings:
    public_base_url: str | None = None
    payer_name: str = "Example Health Plan"
    max_body_bytes: int = 5 * 1024 * 1024
    policies_dir: str | None = None
    cards_dir: str | None = None


@dataclass
class IssuerSettings:
    iss: str
    jwks_url: str | None = None
    jwks: dict[str, Any] | None = None
    jku_allowlist: list[str] = field(default_factory=list)
    tenants: list[str] | None = None
    fhir_server_allowlist: list[str] | None = None


@dataclass
class AuthSettings:
    mode: str = "off"
    discovery_public: bool = True
    leeway_seconds: int = 60
    jwks_cache_seconds: int = 300
    jwks_refetch_min_seconds: int = 30
    issuers: list[IssuerSettings] = field(default_factory=list)


@dataclass
class FhirSettings:
    timeout_seconds: float = 3.0
    allow_http: bool = False


@dataclass
class StorageSettings:
    url: str = DEFAULT_DATABASE
    audit_writer: str = "process"
    spool_dir: str | None = None  # default: beside the SQLite file, else in the working directory
    spool_max_bytes: int = 1 << 30
    database_timeout_seconds: float = 5.0


@dataclass
class Config:
    service: ServiceSettings = field(default_factory=ServiceSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    fhir: FhirSettings = field(default_factory=FhirSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    source: str = "embedded defaults"


_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,), "str | None": (str,), "int": (int,), "float": (int, float), "bool": (bool,),
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
    unknown = sorted(set(data) - {"service", "auth", "fhir", "storage"})
    if unknown:
        raise ConfigError(f"unknown section [{unknown[0]}] (known: service, auth, fhir, storage)")
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
        storage=_fill(StorageSettings, data.get("storage", {}), "storage"),
        source=source,
    )
    validate(config)
    return config


def validate(config: Config) -> None:
    if config.auth.mode not in ("jwt", "off"):
        raise ConfigError('auth.mode must be "jwt" or "off"')
    if config.auth.mode == "jwt" and not config.auth.issuers:
        raise ConfigError('auth.mode = "jwt" needs at least one [[auth.issuers]]')
    for issuer in config.auth.issuers:
        if not issuer.jwks_url and not issuer.jwks:
            raise ConfigError(f"auth.issuers {issuer.iss!r}: needs jwks_url or jwks")
        if issuer.jwks_url and not issuer.jwks_url.startswith("https://") and not issuer.jwks_url.startswith(
            ("http://127.0.0.1", "http://localhost")
        ):
            raise ConfigError(f"auth.issuers {issuer.iss!r}: jwks_url must use https")
    if config.service.max_body_bytes <= 0:
        raise ConfigError("service.max_body_bytes must be positive")
    if not 0 < config.fhir.timeout_seconds <= 30:
        raise ConfigError("fhir.timeout_seconds must be between 0 and 30")
    if config.storage.audit_writer not in ("process", "thread"):
        raise ConfigError('storage.audit_writer must be "process" or "thread"')
    if not config.storage.url.startswith(("sqlite:", "postgresql:", "postgresql+psycopg:")):
        raise ConfigError("storage.url must be sqlite:///... or postgresql://...")
    if config.storage.spool_max_bytes < 1 << 16:
        raise ConfigError("storage.spool_max_bytes must be at least 65536 (it is in bytes)")
    if not 0.5 <= config.storage.database_timeout_seconds <= 60:
        raise ConfigError("storage.database_timeout_seconds must be between 0.5 and 60")
    if config.service.public_base_url and not config.service.public_base_url.startswith(("https://", "http://")):
        raise ConfigError("service.public_base_url must be an absolute http(s) URL")


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

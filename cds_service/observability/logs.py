"""The log format: one JSON object per line (for a log pipeline), or plain text (for a developer's terminal).

``[logging] format`` chooses: ``json``, ``text``, or ``auto`` (the default: text when standard error is a
terminal, else JSON); ``cds-service serve --log-format`` overrides it. Every process of the service logs in
the format its serving process chose (``CDS_SERVICE_LOG_FORMAT``, set by ``serve``).

A JSON line holds ``timestamp``, ``level``, ``logger`` and ``message``; a structured event (the hook call
line, see :func:`hook_call`) adds its own fields, and a message that is itself a JSON object (the audit's
``audit_record_dropped`` lines) is merged in rather than quoted.
"""

from __future__ import annotations

import datetime as dt
import logging
import logging.config
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

ENV_LOG_FORMAT = "CDS_SERVICE_LOG_FORMAT"
FORMATS = ("auto", "json", "text")
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
#: the logger of the one line per hook call
HOOK_CALLS = logging.getLogger("cds_service.hook_call")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "timestamp": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        message = record.getMessage()
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            line.update(fields)
        elif message.startswith("{") and message.endswith("}"):
            try:
                parsed = orjson.loads(message)
            except orjson.JSONDecodeError:
                parsed = None
            if isinstance(parsed, dict):
                line.update(parsed)
                message = ""
        if message and not isinstance(fields, Mapping):  # a structured event's fields say it all
            line["message"] = message
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def resolve(fmt: str) -> str:
    """``json`` or ``text`` (``auto``: text on a terminal)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}")
    if fmt == "auto":
        return "text" if sys.stderr.isatty() else "json"
    return fmt


def logging_config(fmt: str, level: str = "info") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for ``fmt`` (``json`` or ``text``): everything, uvicorn's loggers
    included, to standard error in that format."""
    formatter: dict[str, Any] = {"()": JsonFormatter} if fmt == "json" else {"format": TEXT_FORMAT}
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"cds": formatter},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "cds", "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {
            **{name: {"handlers": [], "propagate": True, "level": level}
               for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
            "alembic": {"level": "WARNING"},  # its INFO lines on every start say nothing an operator needs
            # one INFO line per FHIR request, its URL with the patient id and the query: the service logs the
            # reads it needs to (cds_service.fhir: failures, without the query) and counts the rest
            "httpx": {"level": "WARNING"},
            "httpcore": {"level": "WARNING"},
        },
    }


def configure(fmt: str, level: str = "info") -> dict[str, Any]:
    """Log in ``fmt`` from now on (Python's warnings too); the configuration, for uvicorn's workers."""
    config = logging_config(fmt, level)
    logging.config.dictConfig(config)
    logging.captureWarnings(True)
    return config


def configure_from_environment() -> None:
    """In a process started by the service (the audit writer): log as the serving process does."""
    fmt = os.environ.get(ENV_LOG_FORMAT)
    if fmt in ("json", "text"):
        configure(fmt)


def _printable(value: str | None) -> str:
    """A value from the request, on one line of text (control characters escaped)."""
    return "-" if value is None else value.encode("unicode_escape").decode("ascii")


def hook_call(*, service: str, hook: str | None, hook_instance: str | None, status: int, latency_ms: float,
              crd_version: str | None, decisions: Sequence[Mapping[str, str]], error: str | None = None) -> None:
    """The one line per hook call: the service, the call (hookInstance), the HTTP status, the latency and each
    decision (order id, policy, policy version, outcome, rule); for a refused call the OperationOutcome issue
    code. Never the token, the patient or any text of the request."""
    fields: dict[str, Any] = {
        "event": "hook_call", "service": service, "hook": hook, "hookInstance": hook_instance, "status": status,
        "latency_ms": round(latency_ms, 2), "crd_version": crd_version, "decisions": list(decisions),
    }
    if error is not None:
        fields["error"] = error
    summary = ", ".join(f"{d['policy']} {d['outcome']} ({d['rule']}) for {_printable(d['order'])}" for d in decisions)
    HOOK_CALLS.info("%s %s %.1f ms hookInstance=%s%s%s", service, status, latency_ms, _printable(hook_instance),
                    f" error={error}" if error else "", f": {summary}" if summary else "",
                    extra={"fields": fields})

"""Error responses: every refusal is a :class:`~cds_service.errors.ServiceError`, answered here as a JSON
FHIR OperationOutcome with its status (a refused token as ``{"error": "unauthorized"}``); never a stack trace."""

from __future__ import annotations

import logging
import traceback
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from ..errors import ServiceError
from ..jsonutil import dumps

log = logging.getLogger("cds_service.web")
FHIR_JSON = "application/json"


class Unauthorized(ServiceError):
    """401: no acceptable token. The reason is logged, never told (the body says only ``unauthorized``)."""

    status = 401
    code = "unauthorized"  # no OperationOutcome is sent: this names the refusal in the call's log line

    def __init__(self, message: str = "unauthorized") -> None:
        super().__init__(message)

    def body(self) -> dict[str, Any]:
        return {"error": "unauthorized"}


class BodyTooLarge(ServiceError):
    """413: the request body is over the configured limit (refused while streaming, without reading it all)."""

    status = 413
    code = "too-costly"

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than {limit} bytes")


def error_response(error: ServiceError, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(error.body()), status_code=error.status, media_type=FHIR_JSON, headers=headers)


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such route, wrong method), as OperationOutcomes."""
    assert isinstance(exc, HTTPException)
    code = {404: "not-found", 405: "not-supported"}.get(exc.status_code, "processing")
    headers = dict(exc.headers) if exc.headers else None
    return error_response(ServiceError(str(exc.detail), exc.status_code, code), headers=headers)


def internal_error(where: str, exc: BaseException) -> Response:
    """A fault of the service's own: 500 with an OperationOutcome. The log names the exception's type and where
    it was raised, never its message (which may quote the request)."""
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    place = f" at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}" if frame else ""
    log.error("internal error on %s: %s%s", where, type(exc).__name__, place)
    return error_response(ServiceError("internal error", 500, "exception"))


async def server_error(request: Request, exc: Exception) -> Response:
    return internal_error(f"{request.method} {request.url.path}", exc)

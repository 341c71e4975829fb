"""Error responses: a FHIR OperationOutcome in JSON, never a stack trace."""

from __future__ import annotations

from starlette.responses import Response

from ..hooks.request import operation_outcome_body
from ..jsonutil import dumps

FHIR_JSON = "application/json"


def operation_outcome(status: int, message: str, code: str = "invalid",
                      headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(operation_outcome_body(message, code)), status_code=status, media_type=FHIR_JSON,
                    headers=headers)

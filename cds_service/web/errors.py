"""Error responses: a FHIR OperationOutcome in JSON, never a stack trace."""

from __future__ import annotations

from starlette.responses import Response

from ..jsonutil import dumps

FHIR_JSON = "application/json"


def operation_outcome(status: int, message: str, code: str = "invalid",
                      headers: dict[str, str] | None = None) -> Response:
    body = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": message}],
    }
    return Response(dumps(body), status_code=status, media_type=FHIR_JSON, headers=headers)

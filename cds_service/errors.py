"""One error vocabulary for everything a call can be refused for (and, apart, :class:`SetupError`: files the
service cannot start with).

A :class:`ServiceError` carries the message for the client, the HTTP status and the FHIR OperationOutcome
issue code (http://hl7.org/fhir/issue-type) to answer with; :meth:`ServiceError.body` is the OperationOutcome
itself. Each layer raises its own kind (the hook request's shape, feedback, data that cannot be read, the DTR
operation's input, a body too large or too slow); the web layer turns any of them into a response in one
place (``cds_service.web.errors.error_response``), the command line prints the same body.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """A call this service refuses, or cannot answer: ``status`` is the HTTP status, ``code`` the
    OperationOutcome issue code. Subclasses set their usual status and code; a raise may give others."""

    status: int = 400
    code: str = "invalid"

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        """What the client is told: an OperationOutcome naming the problem."""
        return operation_outcome(str(self), self.code)


class SetupError(ValueError):
    """A configuration or policy file the service cannot start with (or reload): the message names the file
    and the place. Never an answer to a call: the service stops, or keeps what it serves."""


def operation_outcome(message: str, code: str = "invalid") -> dict[str, Any]:
    """The FHIR OperationOutcome that reports an error to a client (HTTP answer or command line output)."""
    return {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code, "diagnostics": message}]}

"""A CDS Hooks 2.0 request, validated. Anything of the wrong shape raises :class:`RequestError`
with a message that names the problem (it becomes a 400, or the status it names, with an OperationOutcome)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ServiceError
from ..fhir.bundles import resources_in
from ..jsonutil import dumps
from .versions import DEFAULT as DEFAULT_VERSION
from .versions import REQUESTED_VERSION, CrdVersion, requested_version, unsupported_version_message

#: at most this many orders (draftOrders or appointments entries, selections, dispatchedOrders) per request;
#: more is refused with 422 (too-costly)
MAX_ORDERS = 100


class RequestError(ServiceError):
    """The request is malformed or of the wrong shape (400 ``invalid``, unless raised with another status:
    422 for too many orders or a CRD version not served, 404 for an unknown service, 408 for a body too slow)."""


@dataclass(frozen=True, repr=False)
class FhirAccess:
    """Where and how to read the EHR's FHIR server. The token is never printed, logged or stored."""

    server: str
    access_token: str | None
    scope: str | None = None

    def __repr__(self) -> str:
        return f"FhirAccess(server={self.server!r}, access_token={'***' if self.access_token else None})"


@dataclass
class HookRequest:
    """A hook call as read: its hook, instance, patient, orders (the draft orders, the dispatched orders or the
    appointments), prefetch, FHIR server access, configuration and the CRD version to answer in. ``notes`` say
    where it was read liberally."""

    hook: str
    hook_instance: str
    patient_id: str
    user_id: str | None
    encounter_id: str | None
    #: the order resources of the request: draftOrders (order-select/-sign), the dispatched orders once
    #: resolved (order-dispatch), the appointments (appointment-book)
    draft_orders: list[Mapping[str, Any]]
    selections: list[str] | None
    prefetch: Mapping[str, Any]
    fhir: FhirAccess | None
    configuration: Mapping[str, Any] = field(default_factory=dict)
    context: Mapping[str, Any] = field(default_factory=dict)
    #: how the request was read liberally (for the decision trace)
    notes: list[str] = field(default_factory=list)
    #: the CRD version the answer follows
    version: CrdVersion = DEFAULT_VERSION
    #: order-dispatch: the references of the dispatched orders
    dispatched: list[str] | None = None


# The longest values the audit log keeps in its bounded columns (storage/tables.py; a test keeps the two
# equal). A longer one is refused here, naming the field, so that the record of every answered call is
# stored as sent.
STORED_LENGTHS = {"hookInstance": 200, "context.patientId": 200}


def check_stored_lengths(values: Mapping[str, str]) -> None:
    for name, value in values.items():
        if len(value) > STORED_LENGTHS[name]:
            raise RequestError(f"{name} is longer than {STORED_LENGTHS[name]} characters")


def _text(data: Mapping[str, Any], key: str, where: str, required: bool = True) -> str | None:
    value = data.get(key)
    if value is None:
        if required:
            raise RequestError(f"{where}{key} is required")
        return None
    if not isinstance(value, str) or not value.strip():
        raise RequestError(f"{where}{key} must be a non-empty string")
    return value


def _too_many(count: int, what: str) -> RequestError:
    return RequestError(f"{what} has {count} entries; this service decides at most {MAX_ORDERS} draft orders "
                        "per request", status=422, code="too-costly")


def _bundle_resources(context: Mapping[str, Any], key: str, notes: list[str]) -> list[Mapping[str, Any]]:
    """The resources of a Bundle context field (draftOrders, appointments); a single ``entry`` object is
    read as a one-element list."""
    bundle = context.get(key)
    if not isinstance(bundle, Mapping) or bundle.get("resourceType") != "Bundle":
        raise RequestError(f"context.{key} is required and must be a FHIR Bundle")
    entries = bundle.get("entry", [])
    if isinstance(entries, Mapping):
        notes.append(f"context.{key}.entry was sent as a single object; read as a one-element list")
        bundle = {**bundle, "entry": [entries]}
    elif entries is not None and not isinstance(entries, list):
        raise RequestError(f"context.{key}.entry must be an array")
    elif entries and len(entries) > MAX_ORDERS:
        raise _too_many(len(entries), f"context.{key}")
    return list(resources_in(bundle))


def _references(context: Mapping[str, Any], key: str, notes: list[str]) -> list[str]:
    """A non-empty array of references (selections, dispatchedOrders); a single string is read as a list."""
    value = context.get(key)
    if isinstance(value, str):
        notes.append(f"context.{key} was sent as a string; read as a one-element list")
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise RequestError(f"context.{key} is required: a non-empty array of references")
    if len(value) > MAX_ORDERS:
        raise _too_many(len(value), f"context.{key}")
    return list(value)


def parse_hook_request(body: Any, expected_hook: str) -> HookRequest:
    """Validate a hook request for a service of hook ``expected_hook`` (order-select, order-sign,
    order-dispatch or appointment-book). Unknown top-level elements, context keys and configuration
    options are ignored (CRD hook-23, dev-17)."""
    if not isinstance(body, Mapping):
        raise RequestError("the request body must be a JSON object")
    hook = _text(body, "hook", "")
    if hook != expected_hook:
        raise RequestError(f"hook {hook!r} does not match this service, which answers {expected_hook!r}")
    hook_instance = _text(body, "hookInstance", "")
    assert hook_instance is not None and hook is not None
    context = body.get("context")
    if not isinstance(context, Mapping):
        raise RequestError("context is required and must be an object")
    if "user" in body and "userId" not in context:
        raise RequestError("context.userId is required (the pre-1.0 top-level 'user' field is not supported)")
    patient_id = _text(context, "patientId", "context.")
    user_id = _text(context, "userId", "context.", required=hook != "order-dispatch")
    encounter_id = _text(context, "encounterId", "context.", required=False)
    assert patient_id is not None
    check_stored_lengths({"hookInstance": hook_instance, "context.patientId": patient_id})
    notes: list[str] = []
    selections: list[str] | None = None
    dispatched: list[str] | None = None
    if hook == "order-dispatch":
        dispatched = _references(context, "dispatchedOrders", notes)
        draft_orders: list[Mapping[str, Any]] = []
    elif hook == "appointment-book":
        draft_orders = _bundle_resources(context, "appointments", notes)
    else:
        draft_orders = _bundle_resources(context, "draftOrders", notes)
        if hook == "order-select":
            selections = _references(context, "selections", notes)
    prefetch = body.get("prefetch")
    if prefetch is None:
        prefetch = {}
    if not isinstance(prefetch, Mapping):
        raise RequestError("prefetch must be an object")
    fhir_server = _text(body, "fhirServer", "", required=False)
    authorization = body.get("fhirAuthorization")
    access_token = None
    scope = None
    if authorization is not None:
        if not isinstance(authorization, Mapping):
            raise RequestError("fhirAuthorization must be an object")
        if fhir_server is None:
            raise RequestError("fhirServer is required when fhirAuthorization is given")
        access_token = _text(authorization, "access_token", "fhirAuthorization.")
        token_type = _text(authorization, "token_type", "fhirAuthorization.")
        if token_type is None or token_type.lower() != "bearer":
            raise RequestError("fhirAuthorization.token_type must be 'Bearer'")
        scope = authorization.get("scope") if isinstance(authorization.get("scope"), str) else None
    extension = body.get("extension")
    version = requested_version(extension)
    if version is None:
        assert isinstance(extension, Mapping)
        raise RequestError(unsupported_version_message(extension.get(REQUESTED_VERSION)), status=422,
                           code="not-supported")
    configuration: Mapping[str, Any] = {}
    if isinstance(extension, Mapping) and isinstance(extension.get("davinci-crd.configuration"), Mapping):
        configuration = extension["davinci-crd.configuration"]
    return HookRequest(
        hook=hook,
        hook_instance=hook_instance,
        patient_id=patient_id,
        user_id=user_id,
        encounter_id=encounter_id,
        draft_orders=draft_orders,
        selections=selections,
        prefetch=prefetch,
        fhir=FhirAccess(fhir_server, access_token, scope) if fhir_server else None,
        configuration=configuration,
        context=context,
        notes=notes,
        version=version,
        dispatched=dispatched,
    )


_PLAIN_AUTHORIZATION_FIELDS = frozenset({"token_type", "expires_in", "scope", "subject", "patient"})
REDACTED = "[redacted]"


def redact(body: Any) -> Any:
    """The request as it may be stored. Under a ``fhirAuthorization`` key, in any casing, an object keeps only
    the non-secret members of the CDS Hooks object (token_type, expires_in, scope, subject, patient) with
    plain values, and any other shape (a string, an array) becomes "[redacted]". Returns ``body`` itself when
    it has no such key (then the request may be stored as received)."""
    if not isinstance(body, Mapping) or not any(_is_authorization(key) for key in body):
        return body
    return {key: _redacted(value) if _is_authorization(key) else value for key, value in body.items()}


def stored_request(raw: bytes | None, body: Any) -> bytes | None:
    """The request as the audit keeps it: the bytes as received, or, when it has a ``fhirAuthorization``
    key, re-serialised with that value redacted (:func:`redact`); None when the body was not a JSON object."""
    if not isinstance(body, Mapping):
        return None
    redacted = redact(body)
    return raw if redacted is body and raw is not None else dumps(redacted)


def _is_authorization(key: object) -> bool:
    return isinstance(key, str) and key.lower() == "fhirauthorization"


def _redacted(value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        return REDACTED
    return {key: member for key, member in value.items()
            if key in _PLAIN_AUTHORIZATION_FIELDS and isinstance(member, str | int | float | bool)}

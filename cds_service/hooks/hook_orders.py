"""Which resources each hook asks about, and where their coverage information goes.

- order-select, order-sign: the orders of ``context.draftOrders``.
- order-dispatch: the orders named by ``context.dispatchedOrders``, read from the prefetch (any key) or,
  failing that, from the EHR's FHIR server.
- appointment-book: for an Appointment ``basedOn`` a ServiceRequest, that ServiceRequest (prefetch or FHIR
  server); the coverage information updates the ServiceRequest (CRD FHIR-50318). An Appointment without
  one is decided as the service it books (its ``serviceType`` codes and reasons, read as a ServiceRequest)
  and the coverage information updates the Appointment.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..fhir.bundles import Failure, resources_in
from ..fhir.gather import ClientFactory, DataUnavailable
from .scopes import SmartScopes


@dataclass(frozen=True)
class Decidable:
    """A resource the policies decide, and the resource its coverage information is added to when that
    is another one (an Appointment decided through the ServiceRequest view of what it books)."""

    resource: Mapping[str, Any]
    target: Mapping[str, Any] | None = None


def type_and_id(reference: str) -> str:
    """"Type/id" of a reference, relative or absolute (the last two path segments)."""
    return "/".join(reference.rstrip("/").split("/")[-2:])


def reference_of(resource: Mapping[str, Any]) -> str:
    rid = resource.get("id")
    return f"{resource.get('resourceType')}/{rid if isinstance(rid, str) else '(no id)'}"


def _index(resources: Iterable[Mapping[str, Any]], wanted: set[str]) -> dict[str, Mapping[str, Any]]:
    found: dict[str, Mapping[str, Any]] = {}
    for resource in resources:
        ref = reference_of(resource)
        if ref in wanted:
            found.setdefault(ref, resource)
    return found


async def resolve(references: Sequence[str], prefetch: Mapping[str, Any], client_factory: ClientFactory | None,
                  server_problem: str | None, scopes: SmartScopes) -> list[Mapping[str, Any]]:
    """The resources named by ``references``, in order: from the prefetch, else from the FHIR server.
    Raises :class:`DataUnavailable` (412) naming those that are in neither."""
    wanted = [type_and_id(r) for r in references]
    found = _index((r for value in prefetch.values() for r in resources_in(value)), set(wanted))
    missing = [r for r in dict.fromkeys(wanted) if r not in found]
    reasons: dict[str, str] = {}
    if missing and client_factory is None:
        reasons = {r: server_problem or "no FHIR server can be read" for r in missing}
    elif missing and client_factory is not None:
        by_type: dict[str, list[str]] = {}
        for ref in missing:
            rtype, _, rid = ref.partition("/")
            by_type.setdefault(rtype, []).append(rid)
        queries = {t: f"{t}?_id={','.join(ids)}" for t, ids in by_type.items() if scopes.allows_search(t)}
        for rtype in by_type.keys() - queries.keys():
            reasons.update({f"{rtype}/{i}": "the access token's scope does not allow reading it"
                            for i in by_type[rtype]})
        if queries:
            async with client_factory() as client:
                results = await client.search_all(queries)
            for rtype, result in results.items():
                if isinstance(result, Failure):
                    reasons.update({f"{rtype}/{i}": result.reason for i in by_type[rtype]})
                else:
                    found.update(_index(result, set(missing)))
        reasons.update({r: "the FHIR server does not have it" for r in missing if r not in found and r not in reasons})
    if reasons:
        listed = "; ".join(f"{r}: {why}" for r, why in reasons.items())
        raise DataUnavailable(f"the orders this hook names are neither in the prefetch nor readable ({listed})")
    return [found[r] for r in dict.fromkeys(wanted)]


def based_on_service_requests(appointment: Mapping[str, Any]) -> list[str]:
    refs = []
    based_on = appointment.get("basedOn")
    for item in based_on if isinstance(based_on, list) else [based_on]:
        ref = item.get("reference") if isinstance(item, Mapping) else None
        if isinstance(ref, str) and type_and_id(ref).startswith("ServiceRequest/"):
            refs.append(ref)
    return refs


def service_request_view(appointment: Mapping[str, Any], patient_id: str) -> dict[str, Any]:
    """What an Appointment without a ServiceRequest books, as a ServiceRequest the policies can decide:
    its serviceType codes as the code, its reasons, the patient. Same id as the Appointment."""
    codings: list[Any] = []
    texts: list[str] = []
    service_types = appointment.get("serviceType")
    for concept in service_types if isinstance(service_types, list) else [service_types]:
        if isinstance(concept, Mapping):
            coding = concept.get("coding")
            codings.extend(coding if isinstance(coding, list) else [coding] if coding else [])
            if isinstance(concept.get("text"), str):
                texts.append(concept["text"])
    view: dict[str, Any] = {"resourceType": "ServiceRequest", "status": "draft", "intent": "proposal",
                            "subject": {"reference": f"Patient/{patient_id}"}}
    if isinstance(appointment.get("id"), str):
        view["id"] = appointment["id"]
    code: dict[str, Any] = {}
    if codings:
        code["coding"] = codings
    if texts or isinstance(appointment.get("description"), str):
        code["text"] = "; ".join(texts) or appointment["description"]
    if code:
        view["code"] = code
    for key in ("reasonCode", "reasonReference", "supportingInformation"):
        if appointment.get(key) is not None:
            view["supportingInfo" if key == "supportingInformation" else key] = appointment[key]
    return view


def appointment_decidables(appointments: Iterable[Mapping[str, Any]], service_requests: Mapping[str, Any],
                           patient_id: str) -> list[Decidable]:
    """Per Appointment: the ServiceRequests it is based on (``service_requests`` by "Type/id"), or the
    ServiceRequest view of itself."""
    out: list[Decidable] = []
    for appointment in appointments:
        if appointment.get("resourceType") != "Appointment":
            continue
        refs = based_on_service_requests(appointment)
        if refs:
            out.extend(Decidable(service_requests[type_and_id(r)]) for r in refs)
        else:
            out.append(Decidable(service_request_view(appointment, patient_id), target=appointment))
    return out

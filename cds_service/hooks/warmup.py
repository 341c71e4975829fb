"""Warming the service at start-up, so that the first hook call costs what the others do (issue 16).

Everything a hook call touches for the first time costs more than it will afterwards: the fhir.resources models
the order check and the coverage information use (pydantic builds their validators on first use), the element
checks of the record, the card templates, the policies' compiled value sets and the code paths themselves. The
warm-up answers, in process and without the audit log, one request per hook with an order for each trigger of
each policy (codes taken from the triggers' own value sets, so it follows whatever the policy files say) and a
record of one resource per type, then the same request without prefetch from a FHIR server of its own on a
loopback port (the HTTP client's code: connections, HTTP/1.1, the record), and prepares the TLS context of the
FHIR connections. ``cds-service serve`` runs it at the start of the app's lifespan, in the event loop that will
serve, before the service answers anything. It never stops the service from starting: a failure is logged and
the service starts cold.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..engine.context import DECISION_CHECKS
from ..engine.orders import order_facts
from ..engine.policy import Policy
from ..fhir.client import unobserved
from ..jsonutil import dumps
from .request import redact
from .service import SERVICES, CoverageService

log = logging.getLogger("cds_service.warmup")

#: where each kind of order carries its code
_CODE_ELEMENT = {"MedicationRequest": "medicationCodeableConcept", "DeviceRequest": "codeCodeableConcept"}


def _order(resource_type: str, index: int, system: str, code: str) -> dict[str, Any]:
    order: dict[str, Any] = {"resourceType": resource_type, "id": f"warm-up-{index}", "status": "draft",
                             "intent": "order", "subject": {"reference": "Patient/warm-up"},
                             _CODE_ELEMENT.get(resource_type, "code"): {"coding": [{"system": system, "code": code}]}}
    if resource_type == "MedicationRequest":
        order["dosageInstruction"] = [{"text": "warm-up"}]
    return order


def trigger_orders(service: CoverageService) -> list[dict[str, Any]]:
    """One draft order per trigger of each policy that the trigger itself matches."""
    systems = service.policies.systems
    orders: list[dict[str, Any]] = []
    for policy in service.policies.policies:
        for trigger in policy.triggers:
            found = _matching(service, policy, trigger.resources, trigger.code_in.listed, len(orders))
            if found is not None:
                orders.append(found)
    return [o for o in orders if order_facts(systems, o).id]


def _matching(service: CoverageService, policy: Policy, resources: tuple[str, ...],
              listed: Mapping[str, tuple[str, ...]], index: int) -> dict[str, Any] | None:
    systems = service.policies.systems
    for resource_type in resources:
        for system_name, codes in listed.items():
            uri = systems.get(system_name).canonical
            for code in codes[:20]:
                order = _order(resource_type, index, uri, code)
                if policy.trigger_for(order_facts(systems, order), []) is not None:
                    return order
    return None


def _coding(query: str) -> dict[str, str]:
    """The first code a search template is scoped to (``code=system|code,...``), else a made-up one."""
    for param in query.partition("?")[2].split("&"):
        name, _, value = param.partition("=")
        system, _, code = value.split(",")[0].rpartition("|")
        if name == "code" and system and code:
            return {"system": system, "code": code}
    return {"system": "http://snomed.info/sct", "code": "22253000", "display": "Pain"}


def _record_resource(resource_type: str, query: str) -> dict[str, Any]:
    """A valid resource of each type the policies read, with what the criteria look at."""
    when = "2020-01-01T00:00:00Z"
    concept = {"coding": [_coding(query)], "text": "warm-up"}
    route = {"coding": [{"system": "http://snomed.info/sct", "code": "47625008", "display": "Intravenous route"}]}
    drug = {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "6130"}]}
    common: dict[str, Any] = {"resourceType": resource_type, "id": "warm-up-record",
                              "subject": {"reference": "Patient/warm-up"}}
    by_type: dict[str, dict[str, Any]] = {
        "Condition": {"code": concept, "onsetDateTime": when, "clinicalStatus": {"coding": [
            {"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]}},
        "Observation": {"status": "final", "code": concept, "valueQuantity": {"value": 5}, "effectiveDateTime": when},
        "Procedure": {"status": "completed", "code": concept, "performedDateTime": when,
                      "note": [{"text": "warm-up"}]},
        "MedicationStatement": {"status": "completed", "medicationCodeableConcept": drug,
                                "dosage": [{"route": route, "text": "warm-up"}], "note": [{"text": "warm-up"}]},
        "MedicationRequest": {"status": "stopped", "intent": "order", "medicationCodeableConcept": drug,
                              "dosageInstruction": [{"route": route}], "statusReason": {"text": "warm-up"}},
        "MedicationAdministration": {"status": "completed", "medicationCodeableConcept": drug,
                                     "effectiveDateTime": when, "dosage": {"route": route}},
        "AllergyIntolerance": {"patient": {"reference": "Patient/warm-up"}, "code": concept,
                               "reaction": [{"manifestation": [{"text": "warm-up"}]}]},
        "Device": {"type": concept, "status": "active", "patient": {"reference": "Patient/warm-up"}},
        "Coverage": {"status": "active", "beneficiary": {"reference": "Patient/warm-up"},
                     "payor": [{"display": "warm-up"}]},
    }
    resource = {**common, **by_type.get(resource_type, {})}
    if resource_type in ("AllergyIntolerance", "Device", "Coverage"):
        del resource["subject"]
    return resource


def warm_request(service: CoverageService, hook: str, orders: list[dict[str, Any]]) -> dict[str, Any]:
    """A request of ``hook`` for ``orders``, every advertised prefetch key holding one resource of its type."""
    prefetch: dict[str, Any] = {need.key: {"resourceType": "Bundle", "type": "searchset", "total": 1,
                           "entry": [{"resource": _record_resource(need.resource_type, need.query)}]}
                for need in service.all_needs}
    entries = [{"resource": o} for o in orders]
    context: dict[str, Any] = {"userId": "Practitioner/warm-up", "patientId": "warm-up"}
    references = [f"{o['resourceType']}/{o['id']}" for o in orders]
    if hook == "appointment-book":
        service_requests = [o for o in orders if o["resourceType"] == "ServiceRequest"]
        context["appointments"] = {"resourceType": "Bundle", "type": "collection", "entry": [
            {"resource": {"resourceType": "Appointment", "id": "warm-up-appointment", "status": "proposed",
                          "basedOn": [{"reference": f"ServiceRequest/{o['id']}"} for o in service_requests],
                          "participant": [{"actor": {"reference": "Patient/warm-up"}, "status": "needs-action"}]}}]}
        prefetch["basedOnServiceRequests"] = {"resourceType": "Bundle", "type": "searchset",
                                              "entry": [{"resource": o} for o in service_requests]}
    elif hook == "order-dispatch":
        context.update(dispatchedOrders=references, performer="Practitioner/warm-up")
        for order in orders:
            prefetch.setdefault(f"dispatched{order['resourceType']}s", {
                "resourceType": "Bundle", "type": "searchset", "entry": []})["entry"].append({"resource": order})
    else:
        context["draftOrders"] = {"resourceType": "Bundle", "type": "collection", "entry": entries}
        if hook == "order-select":
            context["selections"] = references
    return {"hook": hook, "hookInstance": "warm-up", "context": context, "prefetch": prefetch}


@dataclass
class WarmUp:
    """What the warm-up did."""

    seconds: float = 0.0
    decisions: int = 0
    fhir_searches: int = 0
    failed: bool = False


async def _answer(service: CoverageService, service_id: str, body: dict[str, Any], done: WarmUp) -> None:
    try:
        result = await service.handle(service_id, body, "http://127.0.0.1")
        done.decisions += sum(1 for d in result.decisions if d.decided)
        # what the web layer does with an answer: serialise it, and the audit record's parts (nothing is stored)
        dumps(result.response)
        dumps([d.explain() for d in result.decisions])
        dumps(redact(body))
    except Exception as error:  # a warm-up request the service refuses still warmed what it touched
        log.debug("warm-up %s: %s", service_id, type(error).__name__)


_HANDLERS: set[asyncio.Task[Any]] = set()


async def _fhir_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, done: WarmUp) -> None:
    """A loopback FHIR server for the warm-up: each search answered with one resource of its type."""
    task = asyncio.current_task()
    if task is not None:
        _HANDLERS.add(task)
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            done.fhir_searches += 1
            target = head.split(b" ", 2)[1].decode()
            resource_type = target.rsplit("/", 1)[-1].split("?", 1)[0]
            entry = [{"resource": _record_resource(resource_type, target)}] if resource_type != "Medication" else []
            body = json.dumps({"resourceType": "Bundle", "type": "searchset", "entry": entry}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, IndexError):
        pass
    finally:
        writer.close()
        _HANDLERS.discard(task)  # type: ignore[arg-type]


#: how often each warm-up request is answered: Python specialises a function's code after it has run several
#: times (PEP 659), so that one pass leaves the first real calls slower than the rest
ROUNDS = 8


async def _warm(service: CoverageService, orders: list[dict[str, Any]], done: WarmUp) -> None:
    for _ in range(ROUNDS):
        for service_id, hook in SERVICES.items():
            await _answer(service, service_id, warm_request(service, hook, orders), done)
    server = await asyncio.start_server(lambda r, w: _fhir_server(r, w, done), "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        body = warm_request(service, "order-sign", orders)
        body.pop("prefetch")
        body["fhirServer"] = f"http://127.0.0.1:{port}/fhir"
        body["fhirAuthorization"] = {"access_token": "warm-up", "token_type": "Bearer", "expires_in": 60,
                                     "scope": "patient/*.read", "subject": "warm-up"}
        with unobserved():  # the warm-up's reads are no EHR's: not in the metrics
            await _answer(service, "coverage-requirements-order-sign", body, done)
    finally:
        await service.fhir_pool.aclose()  # its connections belong to this loop
        server.close()
        if _HANDLERS:  # they end when the client's connections close
            await asyncio.wait(set(_HANDLERS), timeout=1)
        await server.wait_closed()


async def warm(service: CoverageService) -> WarmUp:
    """Warm the service (see the module) in the running event loop: the one that will serve (so that its default
    executor, which connecting uses to resolve addresses, and the FHIR connection code are warm too)."""
    started = time.perf_counter()
    done = WarmUp()
    try:
        DECISION_CHECKS.compile_all()
        service.fhir_pool.ssl_context()
        await _warm(service, trigger_orders(service), done)
    except Exception:
        done.failed = True
        log.exception("warm-up failed; the first hook calls will be slower")
    done.seconds = time.perf_counter() - started
    log.info("warm-up: %d decisions, %d FHIR searches in %.0f ms", done.decisions, done.fhir_searches,
             done.seconds * 1000)
    return done

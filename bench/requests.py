"""The requests the benchmark sends, built from the repository's fixtures.

The headline size, ``ehr``, is what an EHR that follows the service's own discovery document sends: for each
prefetch template of ``coverage-requirements-order-sign`` (patient-scoped; Observations and Procedures scoped
to the codes the policies read; ``Coverage`` with ``status=active``), the resources of a Synthea record
(``fixtures/records/``) that the search would return, each key a searchset Bundle. ``ehr-mdd`` is the same for
the second Synthea record with a ketamine order. The other sizes carry a whole record: ``small`` (a scenario's
five resources), ``typical`` (that scenario plus a whole Synthea record under one more key, as an EHR sending
everything would) and ``large`` (the typical record four times).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cds_service.config import Config
from cds_service.fhir.gather import DataNeed
from cds_service.hooks.service import CoverageService

ROOT = Path(__file__).resolve().parent.parent
SERVICE_ID = "coverage-requirements-order-sign"
PATH = f"/cds-services/{SERVICE_ID}"
PUMP_RECORD = "synthea-bradly-douglas-chronic-pain-migraine.json"
MDD_RECORD = "synthea-milan-beatty-mdd.json"


@dataclass(frozen=True)
class Body:
    """One benchmark request: how many resources its prefetch holds, and the JSON bytes."""

    resources: int
    data: bytes


def _service() -> CoverageService:
    return CoverageService.from_config(Config())


def prefetch_keys(service: CoverageService) -> dict[str, str]:
    """Resource type -> the prefetch key the service advertises for it (its discovery templates)."""
    sign = next(s for s in service.discovery()["services"] if s["id"] == SERVICE_ID)
    keys: dict[str, str] = {}
    for key, template in sign["prefetch"].items():
        keys.setdefault(template.split("?", 1)[0], key)
    return keys


def searchset(resources: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "total": len(resources),
            "entry": [{"fullUrl": f"urn:uuid:{r.get('id')}", "resource": r, "search": {"mode": "match"}}
                      for r in resources]}


def _patient_id(record: Sequence[Mapping[str, Any]]) -> str:
    return next(str(r["id"]) for r in record if r.get("resourceType") == "Patient")


def _template_selects(need: DataNeed, resource: Mapping[str, Any]) -> bool:
    """Whether the search of ``need``'s template returns ``resource`` (all of a record is one patient's):
    its type, its code among the template's codes (the need's filter is that code list, compiled), and for
    Coverage ``status=active``."""
    if resource.get("resourceType") != need.resource_type:
        return False
    if need.resource_type == "Coverage" and resource.get("status") != "active":
        return False
    return need.keep is None or need.keep(resource)


def ehr_prefetch(service: CoverageService, record: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The prefetch an EHR fills from ``record`` following the service's discovery templates."""
    prefetch: dict[str, Any] = {}
    medications = {f"Medication/{r.get('id')}": r for r in record if r.get("resourceType") == "Medication"}
    for need in service.all_needs:
        found = [r for r in record if _template_selects(need, r)]
        if "_include=" in need.query:  # the Medications the selected resources reference
            refs = {r["medicationReference"].get("reference") for r in found
                    if isinstance(r.get("medicationReference"), Mapping)}
            found += [medications[ref] for ref in sorted(r for r in refs if r in medications)]
        prefetch[need.key] = searchset(found)
    return prefetch


def hook_request(orders: Sequence[Mapping[str, Any]], patient_id: str, prefetch: Mapping[str, Any]) -> dict[str, Any]:
    return {"hook": "order-sign", "hookInstance": "bench-0000", "context": {
        "userId": "Practitioner/dr1", "patientId": patient_id,
        "draftOrders": {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": o} for o in orders]}},
        "prefetch": prefetch}


def whole_record_request(service: CoverageService, orders: Sequence[Mapping[str, Any]],
                         record: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A request whose prefetch holds all of ``record``: each advertised key its type, and every other
    resource under one more key, as an EHR sending the whole record would."""
    keys = prefetch_keys(service)
    prefetch: dict[str, Any] = {key: searchset([]) for key in keys.values()}
    rest = []
    for resource in record:
        key = keys.get(resource["resourceType"])
        if key:
            prefetch[key]["entry"].append({"resource": resource})
        else:
            rest.append(resource)
    prefetch["everything"] = searchset(rest)
    return hook_request(orders, "p1", prefetch)


def _load(path: str) -> Any:
    return json.loads((ROOT / path).read_text())


def _with_patient(orders: Sequence[Mapping[str, Any]], patient_id: str) -> list[dict[str, Any]]:
    out = []
    for order in orders:
        changed = copy.deepcopy(dict(order))
        changed["subject"] = {"reference": f"Patient/{patient_id}"}
        out.append(changed)
    return out


def _count(prefetch: Mapping[str, Any]) -> int:
    return sum(len(v.get("entry", [])) for v in prefetch.values() if isinstance(v, Mapping))


def build(names: Sequence[str] | None = None) -> dict[str, Body]:
    """The benchmark's requests by size name (all of them, or ``names``)."""
    service = _service()
    pump = _load("fixtures/scenarios/mp442-chronic-pain-successful-trial.json")
    ketamine = _load("fixtures/requests/order-sign-ketamine-chronic-pain.json")
    out: dict[str, Body] = {}

    def wanted(name: str) -> bool:
        return names is None or name in names

    for name, file, orders in (("ehr", PUMP_RECORD, pump["orders"]),
                               ("ehr-mdd", MDD_RECORD, [e["resource"] for e in
                                                        ketamine["context"]["draftOrders"]["entry"]])):
        if not wanted(name):
            continue
        record = [e["resource"] for e in _load(f"fixtures/records/{file}")["entry"]]
        patient = _patient_id(record)
        prefetch = ehr_prefetch(service, record)
        body = hook_request(_with_patient(orders, patient), patient, prefetch)
        out[name] = Body(_count(prefetch), json.dumps(body).encode())
    synthea = [e["resource"] for e in _load(f"fixtures/records/{PUMP_RECORD}")["entry"]]
    typical = synthea + pump["record"]
    large = list(typical)
    for copy_no in range(1, 4):
        for resource in typical:
            clone = copy.deepcopy(resource)
            clone["id"] = f"{clone.get('id')}-{copy_no}"
            large.append(clone)
    for name, record in (("small", pump["record"]), ("typical", typical), ("large", large)):
        if wanted(name):
            out[name] = Body(len(record), json.dumps(whole_record_request(service, pump["orders"], record)).encode())
    return out

"""The FHIR searches a form's variables make, answered from a hook call's record: its resource type,
narrowed by the parameters a form may use (``patient``, ``code``, ``status``, ``_sort=-date``)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

from ..fhir.record import PatientRecord

SEARCH_PARAMS = frozenset({"patient", "code", "status", "_sort"})
_PATIENT = "{{%patient.id}}"


def parse_query(query: str) -> tuple[str, list[tuple[str, str]]]:
    """A variable's FHIR search: the resource type and its parameters (the patient token kept as is)."""
    path, _, params = query.partition("?")
    return path, parse_qsl(params, keep_blank_values=True)


def query_problems(query: str) -> list[str]:
    rtype, params = parse_query(query)
    problems = [] if re.match(r"^[A-Z][A-Za-z]+$", rtype) else [f"{rtype!r} is not a resource type"]
    problems += [f"search parameter {name!r} is not one the service can answer from a hook call's data "
                 f"({', '.join(sorted(SEARCH_PARAMS))})" for name, _ in params if name not in SEARCH_PARAMS]
    problems += [f"_sort={value!r}: only -date" for name, value in params if name == "_sort" and value != "-date"]
    if ("patient", _PATIENT) not in params:
        problems.append(f"the search must be scoped to the patient (patient={_PATIENT})")
    return problems


def _codes(resource: Mapping[str, Any]) -> set[tuple[str, str]]:
    out: set[tuple[str, str]] = set()
    for key in ("code", "medicationCodeableConcept"):
        concept = resource.get(key)
        if isinstance(concept, Mapping) and isinstance(concept.get("coding"), list):
            out.update((str(c.get("system", "")), str(c.get("code", ""))) for c in concept["coding"]
                       if isinstance(c, Mapping))
    return out


def _when(resource: Mapping[str, Any]) -> str:
    value = resource.get("effectiveDateTime")
    period = resource.get("effectivePeriod")
    if not isinstance(value, str) and isinstance(period, Mapping):
        value = period.get("start")
    return value if isinstance(value, str) else ""


def search_record(record: PatientRecord, query: str) -> dict[str, Any] | None:
    """The searchset Bundle the record gives for ``query``; None when that type could not be read."""
    rtype, params = parse_query(query)
    if rtype in record.unavailable:
        return None
    hits = list(record.raw_of_type(rtype))
    for name, value in params:
        if name == "code":
            wanted = {tuple(token.rsplit("|", 1)) for token in value.split(",") if "|" in token}
            hits = [r for r in hits if _codes(r) & wanted]
        elif name == "status":
            hits = [r for r in hits if r.get("status") in value.split(",")]
        elif name == "_sort" and value == "-date":
            hits.sort(key=_when, reverse=True)
    return {"resourceType": "Bundle", "type": "searchset", "total": len(hits),
            "entry": [{"resource": dict(r)} for r in hits]}

"""The data the policies need, as prefetch templates (advertised in discovery) and as the searches
run against the EHR's FHIR server when the prefetch lacks them. Derived from the policy files: a
policy that reads pain scores makes the Observation query ask for exactly those codes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..fhir.gather import DataNeed
from ..fhir.record import RawFilter
from ..terminology import CodeSystems, ValueSet
from .policy import Policy

#: resource type -> (prefetch key, patient-scoped search; a code filter is added from the policies)
_SEARCHES: dict[str, tuple[str, str]] = {
    "Condition": ("conditions", "Condition?patient={{context.patientId}}"),
    "Observation": ("observations", "Observation?patient={{context.patientId}}"),
    "Procedure": ("procedures", "Procedure?patient={{context.patientId}}"),
    "MedicationStatement": (
        "medicationStatements",
        "MedicationStatement?patient={{context.patientId}}&_include=MedicationStatement:medication",
    ),
    "MedicationRequest": (
        "medicationRequests",
        "MedicationRequest?patient={{context.patientId}}&_include=MedicationRequest:medication",
    ),
    "MedicationAdministration": (
        "medicationAdministrations",
        "MedicationAdministration?patient={{context.patientId}}&_include=MedicationAdministration:medication",
    ),
    "AllergyIntolerance": ("allergies", "AllergyIntolerance?patient={{context.patientId}}"),
    "Device": ("devices", "Device?patient={{context.patientId}}"),
}
COVERAGE_NEED_KEY = "coverage"


def _code_filter(value_sets: list[ValueSet], systems: CodeSystems) -> RawFilter:
    """Keep a resource whose code is in one of the value sets (by code only: search by code is how the
    prefetch query is scoped too)."""

    def keep(raw: Mapping[str, Any]) -> bool:
        code = raw.get("code")
        return any(vs.contains_raw(systems, code) for vs in value_sets)

    return keep


def _code_param(value_sets: list[ValueSet]) -> str:
    tokens: list[str] = []
    for vs in value_sets:
        for system, codes in vs.listed.items():
            uri = vs.canonical_uri(system)
            tokens.extend(f"{uri}|{code}" for code in codes)
    return "&code=" + ",".join(tokens) if tokens else ""


def data_needs(policies: Iterable[Policy], systems: CodeSystems) -> list[DataNeed]:
    """What the given policies read, one need per resource type, plus the patient's coverage."""
    scoped: dict[str, list[ValueSet] | None] = {"Condition": None}
    for policy in policies:
        for criterion in policy.criteria():
            for rtype, sets in criterion.searches().items():
                if rtype == "Medication":
                    continue
                if sets is None or scoped.get(rtype, []) is None:
                    scoped[rtype] = None
                else:
                    current = scoped.setdefault(rtype, [])
                    assert current is not None
                    current.extend(vs for vs in sets if vs not in current)
    needs = []
    for rtype in _SEARCHES:
        if rtype not in scoped:
            continue
        key, query = _SEARCHES[rtype]
        sets = scoped[rtype]
        if sets:
            needs.append(DataNeed(key, rtype, query + _code_param(sets), _code_filter(sets, systems)))
        else:
            needs.append(DataNeed(key, rtype, query))
    needs.append(DataNeed(COVERAGE_NEED_KEY, "Coverage", "Coverage?patient={{context.patientId}}&status=active",
                          required=False))
    return needs


def prefetch_templates(needs: Iterable[DataNeed]) -> dict[str, str]:
    return {need.key: need.query for need in needs}

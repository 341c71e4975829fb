"""The data the policies need, as prefetch templates (advertised in discovery) and as the searches
run against the EHR's FHIR server when the prefetch lacks them. Derived from the policy files: a
policy that reads pain scores makes the Observation query ask for exactly those codes.

:data:`SEARCHES` (with :data:`COVERAGE`) is the one table of the prefetch keys and searches by resource type:
discovery's templates and its ``usageRequirements``, the searches of the FHIR server, and the prefetch built
for scenario files all come from it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..fhir.gather import DataNeed
from ..fhir.record import RawFilter
from ..terminology import CodeSystems, ValueSet
from .policy import Policy


@dataclass(frozen=True)
class Search:
    """A resource type's prefetch key and its patient-scoped search (the policies add a code filter)."""

    key: str
    query: str


#: resource type -> its prefetch key and search, in the order discovery lists them
SEARCHES: dict[str, Search] = {
    "Condition": Search("conditions", "Condition?patient={{context.patientId}}"),
    "Observation": Search("observations", "Observation?patient={{context.patientId}}"),
    "Procedure": Search("procedures", "Procedure?patient={{context.patientId}}"),
    "MedicationStatement": Search(
        "medicationStatements",
        "MedicationStatement?patient={{context.patientId}}&_include=MedicationStatement:medication",
    ),
    "MedicationRequest": Search(
        "medicationRequests",
        "MedicationRequest?patient={{context.patientId}}&_include=MedicationRequest:medication",
    ),
    "MedicationAdministration": Search(
        "medicationAdministrations",
        "MedicationAdministration?patient={{context.patientId}}&_include=MedicationAdministration:medication",
    ),
    "AllergyIntolerance": Search("allergies", "AllergyIntolerance?patient={{context.patientId}}"),
    "Device": Search("devices", "Device?patient={{context.patientId}}"),
}
#: not evidence: the patient's active Coverage, named in the coverage information (and whose member, CRD 2.2)
COVERAGE = Search("coverage", "Coverage?patient={{context.patientId}}&status=active")
COVERAGE_NEED_KEY = COVERAGE.key
#: resource type -> prefetch key, for everything the policies may read and the Coverage
PREFETCH_KEYS = {**{rtype: search.key for rtype, search in SEARCHES.items()}, "Coverage": COVERAGE.key}


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
    for rtype, search in SEARCHES.items():
        if rtype not in scoped:
            continue
        sets = scoped[rtype]
        if sets:
            needs.append(DataNeed(search.key, rtype, search.query + _code_param(sets), _code_filter(sets, systems)))
        else:
            needs.append(DataNeed(search.key, rtype, search.query))
    needs.append(DataNeed(COVERAGE.key, "Coverage", COVERAGE.query, required=False))
    return needs


def prefetch_templates(needs: Iterable[DataNeed]) -> dict[str, str]:
    return {need.key: need.query for need in needs}

"""The patient's record as the decisions see it: validated FHIR R4 (R4B models) resources by type.

Only the resource types a decision can use are validated, and within a type only the resources that
pass a cheap filter on the raw JSON (for example, Observations with a pain-score code). A resource
that fails validation is skipped and named, never fatal. A resource type that could not be read at
all (the EHR's query failed, the FHIR server was down) is marked unavailable with the reason, so that
no firm decision is made from data that could not be read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fhir.resources.R4B.allergyintolerance import AllergyIntolerance
from fhir.resources.R4B.condition import Condition
from fhir.resources.R4B.coverage import Coverage
from fhir.resources.R4B.medication import Medication
from fhir.resources.R4B.medicationadministration import MedicationAdministration
from fhir.resources.R4B.medicationstatement import MedicationStatement
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.procedure import Procedure
from fhir.resources.R4B.resource import Resource
from pydantic import ValidationError

MODELS: dict[str, type[Resource]] = {
    "Condition": Condition,
    "MedicationStatement": MedicationStatement,
    "Observation": Observation,
    "Procedure": Procedure,
    "MedicationAdministration": MedicationAdministration,
    "AllergyIntolerance": AllergyIntolerance,
    "Coverage": Coverage,
    "Medication": Medication,
}

RawFilter = Callable[[Mapping[str, Any]], bool]


@dataclass(frozen=True)
class Skipped:
    """A resource left out of the record, and why."""

    reference: str
    reason: str


def reference_of(raw: Mapping[str, Any]) -> str:
    rtype = raw.get("resourceType", "?")
    rid = raw.get("id")
    return f"{rtype}/{rid}" if rid else f"{rtype}/(no id)"


def validation_summary(error: ValidationError, limit: int = 3) -> str:
    """A short, PHI-free description of a validation error: the failing paths and messages."""
    parts = []
    for item in error.errors()[:limit]:
        path = ".".join(str(p) for p in item.get("loc", ()) if p != "__root__")
        parts.append(f"{path or '(resource)'}: {item.get('msg', 'invalid')}")
    more = error.error_count() - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


@dataclass
class PatientRecord:
    """Validated resources by type, with what was skipped and what could not be read."""

    resources: dict[str, list[Any]] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)
    consulted: set[str] = field(default_factory=set)
    _by_reference: dict[str, Any] = field(default_factory=dict)

    def of_type(self, resource_type: str) -> list[Any]:
        """Resources of one type; records that the decision consulted this type."""
        self.consulted.add(resource_type)
        return self.resources.get(resource_type, [])

    def resolve(self, reference: str | None) -> Any | None:
        """A resource by reference ("Condition/123", or a full URL ending so)."""
        if not reference:
            return None
        if reference in self._by_reference:
            return self._by_reference[reference]
        parts = reference.rstrip("/").split("/")
        if len(parts) >= 2:
            return self._by_reference.get(f"{parts[-2]}/{parts[-1]}")
        return None

    def technical_gaps(self) -> dict[str, str]:
        """Unavailable resource types that the decision consulted: the decision cannot be firm."""
        return {t: why for t, why in self.unavailable.items() if t in self.consulted}

    def add(self, raw: Mapping[str, Any], filters: Mapping[str, RawFilter | None]) -> None:
        rtype = raw.get("resourceType")
        if not isinstance(rtype, str) or rtype not in filters:
            return
        keep = filters[rtype]
        if keep is not None and not keep(raw):
            return
        model = MODELS.get(rtype)
        if model is None:
            return
        rid = raw.get("id")
        if isinstance(rid, str) and f"{rtype}/{rid}" in self._by_reference:
            return  # the same resource from another prefetch key or page
        try:
            resource = model.model_validate(raw)
        except ValidationError as error:
            self.skipped.append(Skipped(reference_of(raw), validation_summary(error)))
            return
        except (TypeError, ValueError) as error:
            self.skipped.append(Skipped(reference_of(raw), f"invalid resource: {type(error).__name__}"))
            return
        self.resources.setdefault(rtype, []).append(resource)
        if isinstance(rid, str):
            self._by_reference[f"{rtype}/{rid}"] = resource

    def add_all(self, raws: Iterable[Mapping[str, Any]], filters: Mapping[str, RawFilter | None]) -> None:
        for raw in raws:
            self.add(raw, filters)

    def mark_unavailable(self, resource_type: str, reason: str) -> None:
        self.unavailable.setdefault(resource_type, reason)

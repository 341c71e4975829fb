"""The patient's record as the decisions see it: FHIR R4 resources by type, checked before use.

Only the resource types a decision can use are kept, and within a type only the resources that pass a
cheap filter on the raw JSON (for example, Observations with a pain-score code). They are checked
lazily, each at most once: a criterion reads a whole type checked (:meth:`PatientRecord.get`) or
picks a few resources from the raw JSON and checks only those (:meth:`PatientRecord.raw_of_type`,
:meth:`PatientRecord.validated`), so a decision that never looks at, say, pain scores never pays for
them. With :attr:`PatientRecord.checks` (what the decision engine reads of each type, see
:mod:`cds_service.fhir.elements`) a resource is checked element by element, only where a decision reads it,
and comes back as a :class:`~cds_service.fhir.elements.Checked` view; a type the checks do not cover (and
every type of a record without checks) is validated whole with fhir.resources, as a model. A resource that
fails is skipped and named, never fatal. A resource type that could not be read at
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
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.medication import Medication
from fhir.resources.R4B.medicationadministration import MedicationAdministration
from fhir.resources.R4B.medicationrequest import MedicationRequest
from fhir.resources.R4B.medicationstatement import MedicationStatement
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.procedure import Procedure
from fhir.resources.R4B.resource import Resource
from pydantic import ValidationError

from .elements import ElementChecks, ElementFault

MODELS: dict[str, type[Resource]] = {
    "Condition": Condition,
    "MedicationStatement": MedicationStatement,
    "MedicationRequest": MedicationRequest,
    "Observation": Observation,
    "Procedure": Procedure,
    "MedicationAdministration": MedicationAdministration,
    "AllergyIntolerance": AllergyIntolerance,
    "Coverage": Coverage,
    "Medication": Medication,
    "Device": Device,
}

#: At most this many resources of one type are kept for a decision; a record with more is not read for that
#: type (it is marked unavailable, so no firm decision rests on part of it). Real records the discovery
#: templates select hold tens; this bounds the work any request can cause.
MAX_PER_TYPE = 5000

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
    """Resources by type (kept raw, validated on use), what was skipped and what could not be read. Decisions
    only read it: what one consulted is the decision's own (engine/context.py, DecisionScope)."""

    unavailable: dict[str, str] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)
    #: the elements decisions read, by type: those resources are checked element by element (see module)
    checks: ElementChecks | None = None
    _raw: dict[str, list[Mapping[str, Any]]] = field(default_factory=dict)
    _raw_by_reference: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    _models: dict[int, Any] = field(default_factory=dict)

    def raw_of_type(self, resource_type: str) -> list[Mapping[str, Any]]:
        """Resources of one type as JSON, not yet validated: for criteria that pick a few among many
        and validate only those (see :meth:`validated`)."""
        return self._raw.get(resource_type, [])

    def get(self, resource_type: str) -> list[Any]:
        """Validated resources of one type."""
        models = (self.validated(raw) for raw in self._raw.get(resource_type, []))
        return [m for m in models if m is not None]

    def validated(self, raw: Mapping[str, Any]) -> Any | None:
        """The resource checked: a :class:`~cds_service.fhir.elements.Checked` view of the elements
        :attr:`checks` names for its type, else its fhir.resources model; None when it is invalid (then it
        is skipped, and named in :attr:`skipped`). Each resource is checked at most once."""
        key = id(raw)
        if key in self._models:
            return self._models[key]
        rtype = str(raw["resourceType"])
        resource: Any | None = None
        if self.checks is not None and self.checks.covers(rtype):
            try:
                resource = self.checks.check(raw)
            except ElementFault as fault:
                self.skipped.append(Skipped(reference_of(raw), str(fault)))
            self._models[key] = resource
            return resource
        model = MODELS[rtype]
        try:
            resource = model.model_validate(raw)
        except ValidationError as error:
            self.skipped.append(Skipped(reference_of(raw), validation_summary(error)))
        except (TypeError, ValueError) as error:
            self.skipped.append(Skipped(reference_of(raw), f"invalid resource: {type(error).__name__}"))
        self._models[key] = resource
        return resource

    def resolve(self, reference: str | None) -> Any | None:
        """A resource by reference ("Condition/123", or a full URL ending so), validated."""
        if not reference:
            return None
        parts = reference.rstrip("/").split("/")
        if len(parts) < 2:
            return None
        raw = self._raw_by_reference.get(f"{parts[-2]}/{parts[-1]}")
        return self.validated(raw) if raw is not None else None

    def size(self) -> int:
        """How many resources the record holds."""
        return sum(len(items) for items in self._raw.values())

    def technical_gaps(self, consulted: Iterable[str]) -> dict[str, str]:
        """Unavailable resource types among those a decision ``consulted``: the decision cannot be firm."""
        types = set(consulted)
        return {t: why for t, why in self.unavailable.items() if t in types}

    def add(self, raw: Mapping[str, Any], filters: Mapping[str, RawFilter | None]) -> None:
        rtype = raw.get("resourceType")
        if not isinstance(rtype, str) or rtype not in filters or rtype not in MODELS:
            return
        keep = filters[rtype]
        if keep is not None and not keep(raw):
            return
        rid = raw.get("id")
        key = f"{rtype}/{rid}" if isinstance(rid, str) else None
        if key is not None and key in self._raw_by_reference:
            return  # the same resource from another prefetch key or page
        kept = self._raw.setdefault(rtype, [])
        if len(kept) >= MAX_PER_TYPE:
            self.mark_unavailable(rtype, f"more than {MAX_PER_TYPE} {rtype} resources")
            return
        if key is not None:
            self._raw_by_reference[key] = raw
        kept.append(raw)

    def add_all(self, raws: Iterable[Mapping[str, Any]], filters: Mapping[str, RawFilter | None]) -> None:
        for raw in raws:
            self.add(raw, filters)

    def mark_unavailable(self, resource_type: str, reason: str) -> None:
        self.unavailable.setdefault(resource_type, reason)

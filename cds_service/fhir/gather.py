"""Assembling the patient record a decision needs: from the prefetch, then from the FHIR server for
what the prefetch lacks, marking what could not be read."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from ..errors import ServiceError
from .bundles import Failure, bundle_problem, is_operation_outcome, operation_outcome_text, resources_in
from .client import FhirClient
from .elements import ElementChecks
from .record import PatientRecord, RawFilter

PATIENT_ID = "{{context.patientId}}"


class DataUnavailable(ServiceError):
    """Required data is neither in the prefetch nor readable from a FHIR server (HTTP 412)."""

    status = 412
    code = "not-found"


@dataclass(frozen=True)
class DataNeed:
    """One kind of data a decision needs, with its prefetch key and query template."""

    key: str
    resource_type: str
    query: str
    keep: RawFilter | None = None
    required: bool = True

    def query_for(self, patient_id: str) -> str:
        """The search for one patient, every query value percent-encoded: the patient id entirely (it can
        add no parameter, value or fragment), the template's own values except the separators FHIR search
        syntax gives meaning to (``,`` between alternatives, ``|`` and ``:`` within a token)."""
        path, _, query = self.query.partition("?")
        params = []
        for param in query.split("&") if query else []:
            name, _, value = param.partition("=")
            pieces = (quote(piece, safe=",|:/") for piece in value.split(PATIENT_ID))
            params.append(f"{quote(name, safe=':')}={quote(patient_id, safe='').join(pieces)}")
        return path + ("?" + "&".join(params) if params else "")


ClientFactory = Callable[[], FhirClient]


#: searches already made, by query (see :func:`read_needs`)
Reads = Mapping[str, "list[Mapping[str, Any]] | Failure"]


def to_read(needs: Sequence[DataNeed], prefetch: Mapping[str, Any]) -> dict[str, tuple[DataNeed, str]]:
    """The needs the prefetch does not answer (by key), each with why."""
    to_fetch: dict[str, tuple[DataNeed, str]] = {}
    for need in needs:
        if need.key not in prefetch:
            to_fetch[need.key] = (need, "not in the prefetch")
            continue
        value = prefetch[need.key]
        if value is None:
            continue
        if is_operation_outcome(value):
            to_fetch[need.key] = (need, f"the EHR's prefetch query failed: {operation_outcome_text(value)}")
        elif not isinstance(value, Mapping) or not isinstance(value.get("resourceType"), str):
            to_fetch[need.key] = (need, "the prefetch value is not a FHIR resource")
        elif problem := bundle_problem(value):
            to_fetch[need.key] = (need, problem)
    return to_fetch


async def read_needs(needs: Sequence[DataNeed], prefetch: Mapping[str, Any], patient_id: str,
                     client_factory: ClientFactory | None) -> dict[str, list[Mapping[str, Any]] | Failure]:
    """The FHIR server's answers to the searches the prefetch does not answer, by query: made ahead of
    :func:`gather_record` (which then reuses those whose query it still needs)."""
    if client_factory is None:
        return {}
    queries = {need.query_for(patient_id) for need, _ in to_read(needs, prefetch).values()}
    if not queries:
        return {}
    async with client_factory() as client:
        return await client.search_all({query: query for query in sorted(queries)})


async def gather_record(
    needs: Sequence[DataNeed],
    prefetch: Mapping[str, Any],
    patient_id: str,
    client_factory: ClientFactory | None,
    server_problem: str | None,
    checks: ElementChecks | None = None,
    already: Reads | None = None,
) -> PatientRecord:
    """The record for ``needs``. ``client_factory`` is None when no FHIR server may be read, with
    ``server_problem`` saying why; then a required need missing from the prefetch raises
    :class:`DataUnavailable`. ``checks``: what decisions read of each type (see :class:`PatientRecord`).
    ``already``: searches made ahead (:func:`read_needs`), not made again."""
    record = PatientRecord(checks=checks)
    filters: dict[str, RawFilter | None] = {n.resource_type: n.keep for n in needs}
    filters.setdefault("Medication", None)
    to_fetch = to_read(needs, prefetch)
    for value in prefetch.values():
        record.add_all(resources_in(value), filters)
    if not to_fetch:
        return record
    if client_factory is None:
        required = [k for k, (need, _) in to_fetch.items() if need.required]
        if required:
            why = server_problem or "the request has no fhirServer and fhirAuthorization"
            raise DataUnavailable(
                f"required data is not in the prefetch ({', '.join(sorted(required))}) and cannot be read: {why}"
            )
        for need, reason in to_fetch.values():
            record.mark_unavailable(need.resource_type, reason)
        return record
    made = already or {}
    queries = {k: n.query_for(patient_id) for k, (n, _) in to_fetch.items()}
    results = {k: made[q] for k, q in queries.items() if q in made}
    remaining = {k: q for k, q in queries.items() if k not in results}
    if remaining:
        async with client_factory() as client:
            results.update(await client.search_all(remaining))
    for key, result in results.items():
        need = to_fetch[key][0]
        if isinstance(result, Failure):
            record.mark_unavailable(need.resource_type, result.reason)
        else:
            record.add_all(result, filters)
    return record

"""Completed documentation forms in a hook call: where they are read from (the ``questionnaireResponses``
prefetch key, else the EHR's FHIR server), and how a decision cites them (``documented in
QuestionnaireResponse/x, authored ... by ...``) in its evidence, and so in the card, the trace and the audit."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from ..engine.decision import Decision, Evidence
from ..fhir.bundles import Failure, is_operation_outcome, resources_in
from ..fhir.gather import ClientFactory, DataNeed
from .extract import Documentation

PREFETCH_KEY = "questionnaireResponses"
QUERY = "QuestionnaireResponse?patient={{context.patientId}}&status=completed,amended"
#: at most this many forms of a patient are read for one call
MAX_RESPONSES = 50


async def read_responses(prefetch: Mapping[str, Any], patient_id: str,
                         factory: ClientFactory | None) -> tuple[list[Mapping[str, Any]], list[str]]:
    """The patient's completed QuestionnaireResponses, and notes when they could not be read (a decision is
    then made from the record alone, and says so)."""
    if PREFETCH_KEY in prefetch and not is_operation_outcome(prefetch[PREFETCH_KEY]):
        value = prefetch[PREFETCH_KEY]
        found = [r for r in resources_in(value) if r.get("resourceType") == "QuestionnaireResponse"] if value else []
        return found[:MAX_RESPONSES], []
    if factory is None:
        return [], []
    need = DataNeed(PREFETCH_KEY, "QuestionnaireResponse", QUERY, required=False)
    async with factory() as client:
        results = await client.search_all({PREFETCH_KEY: need.query_for(patient_id)})
    result = results.get(PREFETCH_KEY)
    if isinstance(result, Failure):
        return [], [f"completed documentation forms (QuestionnaireResponse) could not be read ({result.reason}): "
                    "the decision rests on the record alone"]
    found = [r for r in result or [] if r.get("resourceType") == "QuestionnaireResponse"]
    return found[:MAX_RESPONSES], []


def cite(decision: Decision, documentation: Documentation, amended: Sequence[tuple[str, str]] = ()) -> None:
    """Evidence that came from a form names the form: the QuestionnaireResponse, when and by whom (the
    extracted resource it was read as follows in brackets); ``amended``: what the forms added to the order."""
    cited = []
    for evidence in decision.evidence:
        source = documentation.cited.get(evidence.reference)
        if source is None:
            cited.append(evidence)
            continue
        cited.append(replace(evidence, reference=source.reference,
                             finding=f"{evidence.finding}; {source.citation()} [{evidence.reference}]"))
    cited += [Evidence(reference, finding) for reference, finding in amended]
    decision.evidence = cited

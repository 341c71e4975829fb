"""The service's own pre-filled answers: the form's FHIRPath ``initial`` expressions, run (with fhirpathpy)
over the same searches a DTR client runs (the form's ``variables``), answered from the data the hook call
read. So the payer's draft and a DTR client's pre-population agree on the same chart.

A search is answered from the record: its resource type, narrowed by the parameters a form may use
(``patient``, ``code``, ``status``, ``_sort=-date``; :data:`SEARCH_PARAMS`). A type the call could not read
answers nothing (its items stay empty), never a guess.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

import fhirpathpy
from fhirpathpy.models import models

from ..fhir.record import PatientRecord
from ..terminology import CodeSystems
from .forms import Form, Item, expression
from .search import search_record

log = logging.getLogger("cds_service.dtr")

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_MODEL = models["r4"]
_compiled: dict[str, Any] = {}


def _evaluate(text: str, variables: Mapping[str, Any]) -> list[Any]:
    function = _compiled.get(text)
    if function is None:
        function = _compiled[text] = fhirpathpy.compile(text, _MODEL)
    result = function({}, dict(variables))
    return list(result) if isinstance(result, list) else [result]


def answer_value(form: Form, item: Item, value: Any, systems: CodeSystems) -> dict[str, Any] | None:
    """A value an expression gave, as the answer to ``item``; None when it does not fit the item (a code
    outside the item's answer list, a date that is not a date...)."""
    if item.type == "choice" and isinstance(value, Mapping) and item.answers is not None:
        for answer in form.answer_lists[item.answers].answers:
            if value.get("code") == answer.code and value.get("system") == systems.get(answer.system).canonical:
                return {"valueCoding": {"system": value["system"], "code": answer.code, "display": answer.display}}
        return None
    if item.type == "date" and isinstance(value, str) and _DATE.match(value):
        try:
            dt.date.fromisoformat(value)
        except ValueError:
            return None
        return {"valueDate": value}
    if item.type == "integer" and isinstance(value, int | float | Decimal) and not isinstance(value, bool):
        number = Decimal(str(value))
        return {"valueInteger": int(number)} if number == number.to_integral_value() else None
    if item.type == "decimal" and isinstance(value, int | float | Decimal) and not isinstance(value, bool):
        return {"valueDecimal": float(value)}
    if item.type == "boolean" and isinstance(value, bool):
        return {"valueBoolean": value}
    if item.type in ("string", "text") and isinstance(value, str) and value.strip():
        return {"valueString": value[:2000]}
    return None


def _variables(form: Form, initial: str) -> set[str]:
    """The ``%name``s an ``initial`` expression uses."""
    return set(re.findall(r"%([A-Za-z][A-Za-z0-9_]*)", expression(form, initial)))


#: at most this many resources per search are kept for the pre-fill (the first ones: the newest, where the search
#: sorts by date); the FHIRPath evaluation's cost grows with them, and a pre-filled answer is a suggestion the
#: clinician confirms, so a chart beyond this leaves an item empty rather than costing seconds
MAX_CHART_ENTRIES = 100


def chart(form: Form, items: Sequence[Item], record: PatientRecord) -> dict[str, Any]:
    """The searches the ``initial`` expressions of ``items`` use, answered from the record (name -> searchset
    Bundle, or None when that type could not be read), each cut to :data:`MAX_CHART_ENTRIES` (``total`` keeps
    the count). Cheap: kept with the decision so the answers are computed when a DTR client asks for the
    package, not while the EHR waits for its cards."""
    used = {name for item in items if item.initial is not None for name in _variables(form, item.initial)}
    bundles = {name: search_record(record, query) for name, query in form.variables.items() if name in used}
    for bundle in bundles.values():
        if bundle is not None:
            bundle["entry"] = bundle["entry"][:MAX_CHART_ENTRIES]
    return bundles


def answers_from(form: Form, items: Sequence[Item], bundles: Mapping[str, Any],
                 systems: CodeSystems) -> dict[str, dict[str, Any]]:
    """linkId -> the answer the searches give (for the items with an ``initial`` expression whose searches
    could all be answered)."""
    answers: dict[str, dict[str, Any]] = {}
    for item in items:
        if item.initial is None:
            continue
        text = expression(form, item.initial)
        used = _variables(form, item.initial)
        if any(bundles.get(name) is None for name in used if name in form.variables):
            continue
        try:
            values = _evaluate(text, {k: v for k, v in bundles.items() if v is not None})
        except Exception as error:  # an expression that fails leaves its item empty, as in a DTR client
            log.warning("form %s item %s: pre-fill expression failed (%s)", form.id, item.link_id, type(error).__name__)
            continue
        if values:
            answer = answer_value(form, item, values[0], systems)
            if answer is not None:
                answers[item.link_id] = answer
    return answers

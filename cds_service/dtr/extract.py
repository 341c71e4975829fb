"""A completed documentation form as evidence: its answers turned into the FHIR resources the policies'
criteria already read (definition-based extraction; what each section becomes is the section's ``extract``
in the form file), each marked as derived from the QuestionnaireResponse (``meta.source``), and the checks
that find an answer contradicting coded record data.

What each ``extract`` kind makes (DTR 2.2 "the loop closes"):

- ``indication``: a Condition (the diagnosis, confirmed or provisional as answered, its onset, and "severe"
  when the pain was stated severe and intractable); for the orders the form names (``qr-context``) that state
  no coded reason, the diagnosis becomes the order's indication.
- ``pain-score``: a final pain-score Observation (LOINC 72514-3) on its date.
- ``trial``: a completed MedicationAdministration (the trial drug, by the trial's route, at its start), a
  pain-score Observation just before its start (the baseline: one minute before, as the form asks for the
  score "just before the trial") and one during it (``partOf`` the administration).
- ``pump-drug``: an active MedicationRequest (intent plan) for the pump drug by the pump's route.
- ``diagnosis``: a confirmed, active Condition.
- ``drug-stopped``: a stopped MedicationStatement with the reason it was stopped (``statusReason``) and when.
- ``order-route`` / ``order-drug``: the route or drug of the orders the form names, when they state none.

Only completed or amended forms count (an in-progress form is noted and ignored); a form must be one of
this service's forms and about the hook's patient. The conflict rules are explicit per kind
(:func:`conflicts`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..engine.dates import as_utc
from ..engine.decision import Gap
from ..engine.orders import DrugFacts, OrderFacts
from ..fhir.record import PatientRecord
from ..terminology import CodeSystems, Concept, normalise_icd10
from .forms import SECTION_ABOUT, Form, FormSet, Section
from .questionnaire import questionnaire_url

COUNTED = frozenset({"completed", "amended"})
DTR_CONTEXT = "http://hl7.org/fhir/us/davinci-dtr/StructureDefinition/qr-context"
LOINC_PAIN = {"system": "http://loinc.org", "code": "72514-3",
              "display": "Pain severity - 0-10 verbal numeric rating [Score] - Reported"}
SEVERE = {"system": "http://snomed.info/sct", "code": "24484000", "display": "Severe"}
CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
#: how far apart two onsets of one diagnosis may be before they contradict each other
ONSET_TOLERANCE = dt.timedelta(days=31)
_REFUTED = frozenset({"refuted", "entered-in-error"})
_ACTIVE_DRUG = frozenset({"active", "intended"})


@dataclass(frozen=True)
class Source:
    """A completed form: its reference, when and by whom it was authored, the form, its answers by linkId,
    the orders it names and the resource it came as."""

    reference: str
    authored: str | None
    author: str | None
    form: Form
    answers: Mapping[str, Mapping[str, Any]]
    orders: tuple[str, ...]

    def citation(self) -> str:
        when = f"authored {self.authored}" if self.authored else "authoring date not stated"
        who = f"by {self.author}" if self.author else "author not stated"
        return f"documented in {self.reference}, {when} {who}"


@dataclass
class Amendment:
    """What a form adds to an order that does not state it: its indication, route or drug."""

    source: Source
    section: Section
    reasons: list[Concept] = field(default_factory=list)
    routes: list[Concept] = field(default_factory=list)
    drug: Concept | None = None
    #: the coded values as the form gave them (for conflict checks)
    codings: dict[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass
class Documentation:
    """What the completed forms of a hook call add: resources (extracted), who documented them, the
    amendments of orders, and notes for the decision trace."""

    sources: list[Source] = field(default_factory=list)
    resources: list[dict[str, Any]] = field(default_factory=list)
    #: extracted resource reference -> its source
    cited: dict[str, Source] = field(default_factory=dict)
    #: extracted resource reference -> the form section it came from
    sections: dict[str, Section] = field(default_factory=dict)
    #: order reference -> amendments
    amendments: dict[str, list[Amendment]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def bundle(self) -> dict[str, Any]:
        return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in self.resources]}


# --- reading the forms ------------------------------------------------------------------------------------


def _reference(value: Any) -> str | None:
    if isinstance(value, Mapping) and isinstance(value.get("reference"), str):
        parts = str(value["reference"]).split("/_history/")[0].rstrip("/").split("/")
        return "/".join(parts[-2:]) if len(parts) >= 2 else None
    return None


def _answers(items: Any, out: dict[str, Mapping[str, Any]], sections: list[Mapping[str, Any]]) -> None:
    """The first answer per linkId, at any depth (a client may nest them); every answer of ``sections``."""
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, Mapping) or not isinstance(item.get("linkId"), str):
            continue
        answers = [a for a in item.get("answer") or [] if isinstance(a, Mapping)] \
            if isinstance(item.get("answer"), list) else []
        if answers and item["linkId"] not in out:
            out[item["linkId"]] = answers[0]
        for answer in answers:
            _answers(answer.get("item"), out, sections)
        _answers(item.get("item"), out, sections)


def sources(responses: Iterable[Mapping[str, Any]], forms: FormSet, base_url: str,
            patient_id: str) -> tuple[list[Source], list[str]]:
    """The completed forms of this service about the patient (the most recent per form), and notes on the
    ones that do not count."""
    notes: list[str] = []
    by_form: dict[str, list[tuple[str, Source]]] = {}
    urls = {questionnaire_url(base_url, f): f for f in forms}
    for response in responses:
        if not isinstance(response, Mapping) or response.get("resourceType") != "QuestionnaireResponse":
            continue
        reference = f"QuestionnaireResponse/{response.get('id') or '(no id)'}"
        canonical = response.get("questionnaire")
        form = urls.get(canonical.split("|", 1)[0]) if isinstance(canonical, str) else None
        if form is None:
            continue  # another payer's or another service's form
        if response.get("status") not in COUNTED:
            notes.append(f"{reference} ({form.id}) is {response.get('status')!r}, not completed: it does not count")
            continue
        if _reference(response.get("subject")) != f"Patient/{patient_id}":
            notes.append(f"{reference} ({form.id}) is not about this patient: it does not count")
            continue
        answers: dict[str, Mapping[str, Any]] = {}
        _answers(response.get("item"), answers, [])
        authored = response.get("authored") if isinstance(response.get("authored"), str) else None
        author = response.get("author")
        who = (author.get("display") or author.get("reference")) if isinstance(author, Mapping) else None
        orders = tuple(r for r in (_reference(e.get("valueReference")) for e in response.get("extension") or []
                                   if isinstance(e, Mapping) and e.get("url") == DTR_CONTEXT) if r)
        source = Source(reference, authored, who if isinstance(who, str) else None, form, answers, orders)
        by_form.setdefault(form.id, []).append((authored or "", source))
    chosen = []
    for candidates in by_form.values():
        candidates.sort(key=lambda pair: pair[0], reverse=True)
        chosen.append(candidates[0][1])
        notes += [f"{older.reference} ({older.form.id}) is superseded by {candidates[0][1].reference}, completed "
                  "more recently" for _, older in candidates[1:]]
    return chosen, notes


# --- extraction ---------------------------------------------------------------------------------------------


class _Maker:
    def __init__(self, source: Source, patient_id: str, systems: CodeSystems) -> None:
        self.source = source
        self.patient = {"reference": f"Patient/{patient_id}"}
        self.systems = systems
        self.count = 0

    def new(self, rtype: str, section: Section, **content: Any) -> dict[str, Any]:
        self.count += 1
        digest = hashlib.sha256(f"{self.source.reference}|{section.id}".encode()).hexdigest()[:16]
        return {"resourceType": rtype, "id": f"dtr-{digest}-{self.count}", "meta": {"source": self.source.reference},
                **content}

    def value(self, link_id: Any) -> Any:
        answer = self.source.answers.get(str(link_id)) if link_id is not None else None
        if answer is None:
            return None
        return next((v for k, v in answer.items() if k.startswith("value")), None)

    def coding(self, link_id: Any) -> Mapping[str, Any] | None:
        value = self.value(link_id)
        return value if isinstance(value, Mapping) and value.get("code") and value.get("system") else None

    def fixed(self, value: Any) -> dict[str, str]:
        system, code, display = value
        return {"system": self.systems.get(system).canonical, "code": code, "display": display}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _minus_a_minute(moment: str) -> str | None:
    start = as_utc(moment)
    return (start - dt.timedelta(minutes=1)).isoformat() if start is not None else None


def _condition(make: _Maker, section: Section, code: Mapping[str, Any]) -> dict[str, Any]:
    spec = section.extract
    confirmed = make.value(spec.get("confirmed")) if "confirmed" in spec else True
    condition = make.new(
        "Condition", section,
        clinicalStatus={"coding": [{"system": CLINICAL, "code": "active"}]},
        verificationStatus={"coding": [{"system": VERIFICATION,
                                        "code": "confirmed" if confirmed is True else "provisional"}]},
        category=[{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-category",
                               "code": "problem-list-item"}]}],
        code={"coding": [dict(code)]}, subject=make.patient)
    onset = make.value(spec.get("onset"))
    if isinstance(onset, str):
        condition["onsetDateTime"] = onset
    if make.value(spec.get("severe")) is True:
        condition["severity"] = {"coding": [dict(SEVERE)]}
    if make.source.authored:
        condition["recordedDate"] = make.source.authored
    return condition


def _trial(make: _Maker, section: Section) -> list[dict[str, Any]]:
    spec = section.extract
    start, route, drug = make.value(spec["start"]), make.coding(spec["route"]), make.coding(spec["drug"])
    before, after = _number(make.value(spec["before"])), _number(make.value(spec["after"]))
    baseline = _minus_a_minute(start) if isinstance(start, str) else None
    if not (isinstance(start, str) and route and drug and before is not None and after is not None and baseline):
        return []
    admin = make.new("MedicationAdministration", section, status="completed",
                     medicationCodeableConcept={"coding": [dict(drug)]}, subject=make.patient,
                     effectiveDateTime=start, dosage={"route": {"coding": [dict(route)]}, "text": "temporary trial"})
    return [admin, _score(make, section, before, baseline),
            {**_score(make, section, after, start),
             "partOf": [{"reference": f"MedicationAdministration/{admin['id']}"}]}]


def _stopped(make: _Maker, section: Section) -> list[dict[str, Any]]:
    spec = section.extract
    reason, stopped = make.coding(spec["reason"]), make.value(spec["date"])
    if not (reason and isinstance(stopped, str)):
        return []
    statement = make.new("MedicationStatement", section, status="stopped", statusReason=[{"coding": [dict(reason)]}],
                         medicationCodeableConcept={"coding": [make.fixed(spec["drug"])]}, subject=make.patient,
                         effectivePeriod={"end": stopped}, dosage=[{"route": {"coding": [make.fixed(spec["route"])]}}])
    note = make.value(spec.get("note"))
    if isinstance(note, str) and note.strip():
        statement["note"] = [{"text": note[:2000]}]
    return [statement]


def _section_resources(make: _Maker, section: Section) -> tuple[list[dict[str, Any]], Amendment | None]:
    spec = section.extract
    kind = spec["kind"]
    concept = make.systems.concept
    if kind in ("indication", "diagnosis"):
        code = make.coding(spec["code"])
        if code is None:
            return [], None
        amendment = Amendment(make.source, section, reasons=[concept({"coding": [dict(code)]})],
                              codings={"reason": code}) if kind == "indication" else None
        return [_condition(make, section, code)], amendment
    if kind == "pain-score":
        score, when = _number(make.value(spec["score"])), make.value(spec["date"])
        return ([_score(make, section, score, when)] if score is not None and isinstance(when, str) else []), None
    if kind == "trial":
        return _trial(make, section), None
    if kind == "pump-drug":
        drug, route = make.coding(spec["drug"]), make.coding(spec["route"])
        if not (drug and route):
            return [], None
        return [make.new("MedicationRequest", section, status="active", intent="plan",
                         medicationCodeableConcept={"coding": [dict(drug)]}, subject=make.patient,
                         **({"authoredOn": make.source.authored} if make.source.authored else {}),
                         dosageInstruction=[{"text": "implanted pump", "route": {"coding": [dict(route)]}}])], None
    if kind == "drug-stopped":
        return _stopped(make, section), None
    if kind == "order-route":
        route = make.coding(spec["route"])
        return [], (Amendment(make.source, section, routes=[concept({"coding": [dict(route)]})],
                              codings={"route": route}) if route else None)
    drug = make.coding(spec["drug"])  # order-drug
    return [], (Amendment(make.source, section, drug=concept({"coding": [dict(drug)]}), codings={"drug": drug})
                if drug else None)


def _score(make: _Maker, section: Section, value: float, when: str) -> dict[str, Any]:
    number: float | int = int(value) if value == int(value) else value
    return make.new("Observation", section, status="final",
                    category=[{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                           "code": "survey"}]}],
                    code={"coding": [dict(LOINC_PAIN)]}, subject=make.patient, effectiveDateTime=when,
                    valueQuantity={"value": number, "unit": "{score}", "system": "http://unitsofmeasure.org",
                                   "code": "{score}"})


def extract(found: Sequence[Source], patient_id: str, systems: CodeSystems) -> Documentation:
    """The resources and order amendments the completed forms give."""
    documentation = Documentation(sources=list(found))
    for source in found:
        make = _Maker(source, patient_id, systems)
        for section in source.form.sections:
            resources, amendment = _section_resources(make, section)
            for resource in resources:
                key = f"{resource['resourceType']}/{resource['id']}"
                documentation.resources.append(resource)
                documentation.cited[key] = source
                documentation.sections[key] = section
            if amendment is not None:
                for order in source.orders:
                    documentation.amendments.setdefault(order, []).append(amendment)
    return documentation


# --- orders and conflicts ------------------------------------------------------------------------------------


def _known(concepts: Iterable[Concept], systems: CodeSystems) -> list[tuple[str, str]]:
    names = systems.names()
    return [(c.system, c.code) for concept in concepts for c in concept.codings if c.system in names]


def _same_code(a: tuple[str, str], b: tuple[str, str]) -> bool:
    if a[0] != b[0]:
        return False
    if a[0] == "icd10cm":
        x, y = normalise_icd10(a[1]), normalise_icd10(b[1])
        return x.startswith(y) or y.startswith(x)
    return a[1] == b[1]


def amend(order: OrderFacts, amendments: Sequence[Amendment],
          systems: CodeSystems) -> tuple[list[tuple[str, str]], list[Gap]]:
    """Add to ``order`` what the forms document and it does not state (its coded reason, route, drug); an
    answer that contradicts what it states coded is a conflict. Returns what was added (the form's reference
    and a finding) and the conflicts."""
    added: list[tuple[str, str]] = []
    found: list[Gap] = []
    for amendment in amendments:
        cite = amendment.source.citation()
        if amendment.reasons:
            stated = _known(order.reasons, systems)
            wanted = _known(amendment.reasons, systems)
            if not stated:
                order.reasons = [*amendment.reasons]
                added.append((amendment.source.reference,
                              f"the indication of {order.reference} is {amendment.reasons[0].label()}, {cite}"))
            elif not any(_same_code(s, w) for s in stated for w in wanted):
                found.append(_conflict(amendment.section, f"the indication {amendment.reasons[0].label()} ({cite}) "
                                       f"is not the reason {order.reasons[0].label()} coded on {order.reference}"))
        if amendment.routes:
            stated = _known(order.routes, systems)
            if not stated:
                order.routes = [*amendment.routes]
                added.append((amendment.source.reference,
                              f"the route of {order.reference} is {amendment.routes[0].label()}, {cite}"))
            elif not set(stated) & set(_known(amendment.routes, systems)):
                found.append(_conflict(amendment.section, f"the route {amendment.routes[0].label()} ({cite}) is not "
                                       f"the route {order.routes[0].label()} coded on {order.reference}"))
        if amendment.drug is not None:
            if order.drug is None or not order.drug.identified:
                order.drug = DrugFacts(amendment.drug)
                order.code = amendment.drug
                added.append((amendment.source.reference,
                              f"the drug of {order.reference} is {amendment.drug.label()}, {cite}"))
            elif not set(_known(order.drug.concepts, systems)) & set(_known([amendment.drug], systems)):
                found.append(_conflict(amendment.section, f"the drug {amendment.drug.label()} ({cite}) is not the "
                                       f"drug {order.drug.code.label()} of {order.reference}"))
    return added, found


def _conflict(section: Section, text: str) -> Gap:
    """A conflict, as a gap of the section whose answer it concerns (so that the form asks it again)."""
    return Gap(f"a correction of the documentation or the record: {text}", "resolve the documentation conflict",
               section.asks[0].kind, f"{SECTION_ABOUT}{section.id}")


def conflicts(documentation: Documentation, record: PatientRecord,
              systems: CodeSystems) -> list[tuple[Source, Gap]]:
    """Answers that contradict coded record data (the record's own resources, not those the forms gave):
    a diagnosis the record shows refuted or entered in error; an onset more than a month from the record's
    onset of the same diagnosis; a drug documented as stopped that the record shows active after that date."""
    found: list[tuple[Source, Gap]] = []
    own = {r["id"] for r in documentation.resources}
    chart_conditions = [c for c in record.raw_of_type("Condition") if c.get("id") not in own]
    for resource in documentation.resources:
        key = f"{resource['resourceType']}/{resource['id']}"
        source, section = documentation.cited[key], documentation.sections[key]
        cite = source.citation()
        if resource["resourceType"] == "Condition":
            code = systems.concept(resource.get("code"))
            keys = _known([code], systems)
            for chart in chart_conditions:
                charted_codes = _known([systems.concept(chart.get("code"))], systems)
                if not any(_same_code(k, c) for k in keys for c in charted_codes):
                    continue
                status = _status(chart.get("verificationStatus"))
                ref = f"Condition/{chart.get('id')}"
                if status in _REFUTED:
                    found.append((source, _conflict(section, f"the diagnosis {code.label()} ({cite}) is recorded as "
                                                             f"{status} on {ref}")))
                documented, charted = as_utc(resource.get("onsetDateTime")), as_utc(chart.get("onsetDateTime"))
                if documented and charted and abs(documented - charted) > ONSET_TOLERANCE:
                    found.append((source, _conflict(section, f"the onset {documented.date()} of {code.label()} "
                                                             f"({cite}) is not the onset {charted.date()} on {ref}")))
        elif resource["resourceType"] == "MedicationStatement" and resource.get("status") == "stopped":
            found += [(source, gap) for gap in _still_active(resource, record, systems, own, cite, section)]
    return found


def _status(concept: Any) -> str | None:
    if isinstance(concept, Mapping):
        for coding in concept.get("coding") or []:
            if isinstance(coding, Mapping) and coding.get("code"):
                return str(coding["code"])
    return None


def _still_active(stopped: Mapping[str, Any], record: PatientRecord, systems: CodeSystems, own: set[str],
                  cite: str, section: Section) -> list[Gap]:
    drug = _known([systems.concept(stopped.get("medicationCodeableConcept"))], systems)
    end = as_utc((stopped.get("effectivePeriod") or {}).get("end"))
    found = []
    for rtype, when_key in (("MedicationRequest", "authoredOn"), ("MedicationStatement", "dateAsserted")):
        for chart in record.raw_of_type(rtype):
            if chart.get("id") in own or chart.get("status") not in _ACTIVE_DRUG:
                continue
            codes = _known([systems.concept(chart.get("medicationCodeableConcept"))], systems)
            when = as_utc(chart.get(when_key))
            if set(codes) & set(drug) and end is not None and when is not None and when > end:
                shown = f"{rtype}/{chart.get('id')}"
                found.append(_conflict(section, f"the drug documented as stopped on {end.date()} ({cite}) is "
                                                f"{chart.get('status')} on {shown}, from {when.date()}"))
    return found

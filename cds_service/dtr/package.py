"""``Questionnaire/$questionnaire-package`` (Da Vinci DTR 2.2.0) and the FHIR reads beside it, without HTTP.

Input (``dtr-qpackage-input-parameters``): one ``coverage``, ``order`` 0..*, ``questionnaire`` canonicals
0..*, ``context`` 0..1 (the CRD coverage-assertion-id), ``changedsince`` 0..1; at least one of order,
questionnaire and context (dtr-1). Output (``dtr-qpackage-output-parameters``): one ``packagebundle`` per
form, a collection Bundle holding the Questionnaire first, one draft QuestionnaireResponse (the service's
pre-filled answers, each ``auto-server``; the sections the decision needs in the hidden ``sections`` item) and
the ValueSets the Questionnaire uses, expanded; ``outcome`` for what could not be served (an unknown
canonical: a warning, oper-9).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..engine.orders import order_facts
from ..engine.policy import PolicySet
from ..errors import ServiceError
from .forms import DTR, SECTIONS_ITEM, Form, FormSet, Section
from .prefill import answers_from
from .questionnaire import (
    canonical,
    fhir_base,
    questionnaire,
    questionnaire_url,
    section_coding,
    value_set,
    value_set_url,
)

OPERATION_URL = "http://hl7.org/fhir/us/davinci-dtr/OperationDefinition/Questionnaire-package"
ORDER_TYPES = frozenset({"Appointment", "Encounter", "CommunicationRequest", "DeviceRequest", "MedicationRequest",
                         "NutritionOrder", "ServiceRequest", "SupplyRequest", "VisionPrescription"})
QR_CONTEXT_TYPES = frozenset({"DeviceRequest", "MedicationRequest", "NutritionOrder", "ServiceRequest", "Encounter",
                              "Appointment"})
CRD_CODES = "http://hl7.org/fhir/us/davinci-crd/CodeSystem/coverage-information-codes"
MAX_PARAMETERS = 100
MAX_TEXT = 2048
ORIGIN_SERVER = {"url": DTR + "information-origin", "extension": [{"url": "source", "valueCode": "auto-server"}]}


class PackageError(ServiceError):
    """A request the operation cannot answer (400 ``invalid`` unless raised with another status and code)."""


@dataclass
class PackageInput:
    coverage: Mapping[str, Any]
    orders: list[Mapping[str, Any]] = field(default_factory=list)
    questionnaires: list[str] = field(default_factory=list)
    context: str | None = None
    changed_since: dt.datetime | None = None


def _instant(value: Any) -> dt.datetime:
    if not isinstance(value, str) or len(value) > 64:
        raise PackageError("changedsince: valueInstant expected")
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise PackageError("changedsince: not a FHIR instant") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def parse_input(body: Any) -> PackageInput:
    """The operation's input, checked (coverage 1..1, dtr-1, types and bounds); raises :class:`PackageError`."""
    if not isinstance(body, Mapping) or body.get("resourceType") != "Parameters":
        raise PackageError("the body must be a FHIR Parameters resource (dtr-qpackage-input-parameters)")
    params = body.get("parameter")
    if not isinstance(params, list) or not params:
        raise PackageError("Parameters.parameter: at least one parameter is required")
    if len(params) > MAX_PARAMETERS:
        raise PackageError(f"more than {MAX_PARAMETERS} parameters", status=422, code="too-costly")
    coverages: list[Mapping[str, Any]] = []
    parsed = PackageInput(coverage={})
    contexts: list[str] = []
    for i, param in enumerate(params):
        if not isinstance(param, Mapping) or not isinstance(param.get("name"), str):
            raise PackageError(f"parameter[{i}]: a name is required")
        name, resource = param["name"], param.get("resource")
        if name == "coverage":
            if not isinstance(resource, Mapping) or resource.get("resourceType") != "Coverage":
                raise PackageError(f"parameter[{i}] coverage: a Coverage resource is required")
            coverages.append(resource)
        elif name == "order":
            if not isinstance(resource, Mapping) or resource.get("resourceType") not in ORDER_TYPES:
                raise PackageError(f"parameter[{i}] order: one of {', '.join(sorted(ORDER_TYPES))} is required")
            parsed.orders.append(resource)
        elif name == "questionnaire":
            value = param.get("valueCanonical")
            if not isinstance(value, str) or not value or len(value) > MAX_TEXT:
                raise PackageError(f"parameter[{i}] questionnaire: valueCanonical is required")
            parsed.questionnaires.append(value)
        elif name == "context":
            value = param.get("valueString")
            if not isinstance(value, str) or not value or len(value) > 64:
                raise PackageError(f"parameter[{i}] context: valueString (a coverage-assertion-id) is required")
            contexts.append(value)
        elif name == "changedsince":
            if parsed.changed_since is not None:
                raise PackageError("changedsince: at most one")
            parsed.changed_since = _instant(param.get("valueInstant"))
    if len(coverages) != 1:
        raise PackageError(f"exactly one coverage is required (DTR 2.2: coverage 1..1), got {len(coverages)}")
    if len(contexts) > 1:
        raise PackageError("context: at most one")
    parsed.coverage = coverages[0]
    parsed.context = contexts[0] if contexts else None
    if not (parsed.orders or parsed.questionnaires or parsed.context):
        raise PackageError("dtr-1: at least one of 'order', 'questionnaire' and 'context' is required")
    return parsed


def patient_of(coverage: Mapping[str, Any]) -> str | None:
    """'Patient/x' from the Coverage's beneficiary."""
    beneficiary = coverage.get("beneficiary")
    reference = beneficiary.get("reference") if isinstance(beneficiary, Mapping) else None
    if not isinstance(reference, str):
        return None
    parts = reference.split("/_history/")[0].rstrip("/").split("/")
    return f"{parts[-2]}/{parts[-1]}" if len(parts) >= 2 and parts[-2] == "Patient" else None


def issue(severity: str, code: str, text: str) -> dict[str, Any]:
    return {"severity": severity, "code": code, "diagnostics": text}


class Packager:
    """Builds packages for one FHIR base (``base_url``: the service's public base)."""

    def __init__(self, policies: PolicySet, forms: FormSet, publisher: str) -> None:
        self.policies = policies
        self.forms = forms
        self.publisher = publisher

    # --- reads --------------------------------------------------------------------------------

    def find_canonical(self, value: str, base_url: str) -> tuple[Form | None, str | None]:
        """The form a canonical names, and the version asked for (None: any)."""
        url, _, version = value.partition("|")
        form = next((f for f in self.forms if questionnaire_url(base_url, f) == url), None)
        return form, version or None

    def questionnaire(self, form: Form, base_url: str) -> dict[str, Any]:
        return questionnaire(form, base_url, self.policies.systems, self.publisher)

    def questionnaire_search(self, url: str | None, base_url: str) -> dict[str, Any]:
        found = list(self.forms)
        if url is not None:
            form, version = self.find_canonical(url, base_url)
            found = [form] if form is not None and version in (None, form.version) else []
        return {"resourceType": "Bundle", "type": "searchset", "total": len(found),
                "entry": [{"fullUrl": questionnaire_url(base_url, f), "resource": self.questionnaire(f, base_url),
                           "search": {"mode": "match"}} for f in found]}

    def expand(self, url: str, base_url: str) -> dict[str, Any] | None:
        """The expanded ValueSet with this canonical (``url`` or ``url|version``), or None."""
        plain, _, version = url.partition("|")
        for form in self.forms:
            for answer_list in form.answer_lists.values():
                if value_set_url(base_url, form, answer_list) == plain and version in ("", form.version):
                    return value_set(form, answer_list, base_url, self.policies.systems, self.publisher)
        return None

    def capability_statement(self, base_url: str) -> dict[str, Any]:
        return {
            "resourceType": "CapabilityStatement",
            "status": "active",
            "date": max(f.date for f in self.forms) if self.forms.forms else "2026-01-01",
            "publisher": self.publisher,
            "kind": "instance",
            "implementation": {"description": "Documentation forms (Da Vinci DTR 2.2) for the coverage "
                                              "requirements service", "url": fhir_base(base_url)},
            "fhirVersion": "4.0.1",
            "format": ["json"],
            "rest": [{
                "mode": "server",
                "resource": [
                    {"type": "Questionnaire", "profile": DTR + "dtr-std-questionnaire",
                     "interaction": [{"code": "read"}, {"code": "search-type"}],
                     "searchParam": [{"name": "url", "type": "uri"}],
                     "operation": [{"name": "questionnaire-package", "definition": OPERATION_URL}]},
                    {"type": "ValueSet",
                     "operation": [{"name": "expand",
                                    "definition": "http://hl7.org/fhir/OperationDefinition/ValueSet-expand"}]},
                ],
            }],
        }

    # --- the operation ------------------------------------------------------------------------

    def forms_for_orders(self, orders: Sequence[Mapping[str, Any]]) -> list[Form]:
        """The forms of the policies that govern the orders (a request without context or canonicals)."""
        facts = [order_facts(self.policies.systems, o) for o in orders]
        found = []
        for order in facts:
            for policy in self.policies.policies:
                form = self.forms.for_policy(policy.id)
                if form is not None and form not in found and policy.trigger_for(order, facts) is not None:
                    found.append(form)
        return found

    def package(self, request: PackageInput, context: Mapping[str, Any] | None, base_url: str) -> dict[str, Any]:
        """The output Parameters. ``context``: the stored context of ``request.context`` (the caller looked it
        up and refused an unknown one)."""
        issues: list[dict[str, Any]] = []
        wanted: list[Form] = []
        if context is not None:
            form = self.forms.by_id(str(context.get("form")))
            if form is None:
                issues.append(issue("warning", "not-found", "the documentation form of this coverage assertion is "
                                                             "no longer served"))
            else:
                wanted.append(form)
                if context.get("version") != form.version:
                    issues.append(issue("information", "informational",
                                        f"the form has changed since the coverage decision; version {form.version} "
                                        "is returned"))
        for value in request.questionnaires:
            form, version = self.find_canonical(value, base_url)
            if form is None:
                issues.append(issue("warning", "not-found", f"no Questionnaire {value} is served here (oper-9)"))
                continue
            if version is not None and version != form.version:
                issues.append(issue("information", "informational",
                                    f"{value}: that version is not served; version {form.version} is returned"))
            if form not in wanted:
                wanted.append(form)
        if context is None and not request.questionnaires:
            wanted = self.forms_for_orders(request.orders)
            if not wanted:
                issues.append(issue("information", "informational", "no documentation form applies to the orders"))
        if request.changed_since is not None:
            since = request.changed_since.date()
            kept = [f for f in wanted if dt.date.fromisoformat(f.date) >= since]
            if len(kept) < len(wanted):
                moment = request.changed_since.isoformat()
                issues.append(issue("information", "informational",
                                    f"{len(wanted) - len(kept)} form(s) not changed since {moment}"))
            wanted = kept
        parameters: list[dict[str, Any]] = [
            {"name": "packagebundle", "resource": self.bundle(form, request, context, base_url)} for form in wanted]
        if issues or not parameters:
            parameters.append({"name": "outcome", "resource": {
                "resourceType": "OperationOutcome",
                "issue": issues or [issue("information", "informational", "no documentation form to return")]}})
        return {"resourceType": "Parameters", "id": str(uuid.uuid4()), "parameter": parameters}

    def bundle(self, form: Form, request: PackageInput, context: Mapping[str, Any] | None,
               base_url: str) -> dict[str, Any]:
        q = self.questionnaire(form, base_url)
        entries: list[dict[str, Any]] = [{"fullUrl": q["url"], "resource": q}]
        own = context is not None and context.get("form") == form.id
        entries.append({"fullUrl": f"urn:uuid:{uuid.uuid4()}",
                        "resource": self.draft(form, request, context if own else None, base_url)})
        used = {i.answers for i in form.items() if i.answers is not None}
        for answer_list in form.answer_lists.values():
            if answer_list.id in used:
                vs = value_set(form, answer_list, base_url, self.policies.systems, self.publisher)
                entries.append({"fullUrl": vs["url"], "resource": vs})
        return {"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": "collection",
                "timestamp": _now(), "entry": entries}

    def answers(self, form: Form, sections: Sequence[Section], context: Mapping[str, Any]) -> dict[str, Any]:
        """The service's pre-filled answers for ``sections``: the form's ``initial`` expressions over the
        searches the hook call answered from the chart (kept with the decision)."""
        bundles = context.get("chart")
        if not isinstance(bundles, Mapping):
            return {}
        items = [item for section in sections for item in section.items]
        return answers_from(form, items, bundles, self.policies.systems)

    def draft(self, form: Form, request: PackageInput, context: Mapping[str, Any] | None,
              base_url: str) -> dict[str, Any]:
        """The initial QuestionnaireResponse (DTR oper-18): subject the Coverage's beneficiary, the Coverage
        and the orders as context, the service's pre-filled answers (each ``auto-server``) and, for a CRD
        context, the sections the decision needs."""
        coverage_id = request.coverage.get("id")
        extensions: list[dict[str, Any]] = []
        if isinstance(coverage_id, str):
            extensions.append({"url": DTR + "qr-coverage", "valueReference": {"reference": f"Coverage/{coverage_id}"}})
        orders = [f"{o['resourceType']}/{o['id']}" for o in request.orders
                  if o.get("resourceType") in QR_CONTEXT_TYPES and isinstance(o.get("id"), str)]
        stored = context.get("order") if context else None
        if not orders and isinstance(stored, str) and stored.split("/", 1)[0] in QR_CONTEXT_TYPES:
            orders = [stored]  # asked with the coverage-assertion id alone: the order the assertion was made for
        extensions += [{"url": DTR + "qr-context", "valueReference": {"reference": o}} for o in orders]
        extensions.append({"url": DTR + "intendedUse", "valueCodeableConcept": {"coding": [
            {"system": CRD_CODES, "code": "withorder", "display": "With order"}]}})
        subject = patient_of(request.coverage) or (f"Patient/{context['patient']}" if context and context.get(
            "patient") else None)
        items: list[dict[str, Any]] = []
        if context is not None:
            sections = [s for s in form.sections if s.id in (context.get("sections") or [])]
            answers = self.answers(form, sections, context)
            items.append({"linkId": SECTIONS_ITEM, "answer": [
                {"extension": [ORIGIN_SERVER], "valueCoding": section_coding(s)} for s in sections]})
            items += [{"linkId": i.link_id, "answer": [{"extension": [ORIGIN_SERVER], **answers[i.link_id]}]}
                      for section in sections for i in section.items if isinstance(answers.get(i.link_id), Mapping)]
        draft: dict[str, Any] = {
            "resourceType": "QuestionnaireResponse",
            "id": str(uuid.uuid4()),
            "meta": {"profile": [DTR + "dtr-questionnaireresponse"]},
            "extension": extensions,
            "questionnaire": canonical(base_url, form),
            "status": "in-progress",
            "authored": _now(),
        }
        if subject is not None:
            draft["subject"] = {"reference": subject}
        if items:
            draft["item"] = items
        return draft


def _now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")

"""A form compiled into FHIR R4 resources: the Questionnaire (DTR 2.2 ``dtr-std-questionnaire``, SDC
pre-population in FHIRPath / x-fhir-query: ``launchContext`` patient, ``variable``, ``initialExpression``) and
one expanded ValueSet per answer list. Canonical URLs sit under the FHIR base of this service
(``[base]/fhir``); versions are the form's (tied to its policy's version)."""

from __future__ import annotations

from typing import Any

from ..terminology import CodeSystems
from .forms import (
    CORE,
    DTR,
    ITEM_SYSTEM,
    SDC,
    SECTION_SYSTEM,
    SECTIONS_ITEM,
    AnswerList,
    Form,
    Item,
    Section,
    expression,
)

FHIR_PREFIX = "/fhir"
LAUNCH_CONTEXT = "http://hl7.org/fhir/uv/sdc/CodeSystem/launchContext"


def fhir_base(base_url: str) -> str:
    return base_url.rstrip("/") + FHIR_PREFIX


def questionnaire_url(base_url: str, form: Form) -> str:
    return f"{fhir_base(base_url)}/Questionnaire/{form.id}"


def canonical(base_url: str, form: Form) -> str:
    """The version-specific canonical of the form (``url|version``), as CRD names it."""
    return f"{questionnaire_url(base_url, form)}|{form.version}"


def value_set_id(form: Form, answer_list: AnswerList) -> str:
    return f"{form.id}-{answer_list.id}"


def value_set_url(base_url: str, form: Form, answer_list: AnswerList) -> str:
    return f"{fhir_base(base_url)}/ValueSet/{value_set_id(form, answer_list)}"


def _coding(systems: CodeSystems, system: str, code: str, display: str) -> dict[str, str]:
    return {"system": systems.get(system).canonical, "code": code, "display": display}


def _expression(language: str, text: str, name: str | None = None) -> dict[str, str]:
    out = {"language": language, "expression": text}
    if name is not None:
        out = {"name": name, **out}
    return out


def _item(form: Form, item: Item, base_url: str, systems: CodeSystems) -> dict[str, Any]:
    code = _coding(systems, item.code.system, item.code.code, item.code.display) if item.code is not None else \
        {"system": ITEM_SYSTEM, "code": item.link_id, "display": item.text}
    out: dict[str, Any] = {"linkId": item.link_id, "code": [code], "text": item.text, "type": item.type}
    if item.required:
        out["required"] = True
    if item.answers is not None:
        answer_list = form.answer_lists[item.answers]
        out["answerValueSet"] = f"{value_set_url(base_url, form, answer_list)}|{form.version}"
    if item.initial is not None:
        out["extension"] = [{"url": SDC + "sdc-questionnaire-initialExpression",
                             "valueExpression": _expression("text/fhirpath", expression(form, item.initial))}]
    return out


def _enable_when(section: Section) -> dict[str, Any]:
    """Shown when the server's draft names the section in the hidden ``sections`` item, or when no draft says
    which sections apply (then every section is shown)."""
    return {
        "enableWhen": [
            {"question": SECTIONS_ITEM, "operator": "=",
             "answerCoding": {"system": SECTION_SYSTEM, "code": section.id}},
            {"question": SECTIONS_ITEM, "operator": "exists", "answerBoolean": False},
        ],
        "enableBehavior": "any",
    }


def _section(form: Form, section: Section, base_url: str, systems: CodeSystems) -> list[dict[str, Any]]:
    """A section as a heading (a display item) and its questions, each shown on the section's condition (a
    flat list: a required question of a section not shown is not required, whatever a client makes of
    groups)."""
    heading = {"linkId": section.link_id, "code": [section_coding(section)], "text": section.text,
               "type": "display", **_enable_when(section)}
    return [heading, *({**_item(form, item, base_url, systems), **_enable_when(section)} for item in section.items)]


def section_coding(section: Section) -> dict[str, str]:
    return {"system": SECTION_SYSTEM, "code": section.id, "display": section.text}


def questionnaire(form: Form, base_url: str, systems: CodeSystems, publisher: str) -> dict[str, Any]:
    """The form as a DTR 2.2 standard Questionnaire."""
    extensions: list[dict[str, Any]] = [
        {"url": CORE + "artifact-versionAlgorithm",
         "valueCoding": {"system": "http://hl7.org/fhir/version-algorithm", "code": "natural"}},
        {"url": SDC + "sdc-questionnaire-launchContext", "extension": [
            {"url": "name", "valueCoding": {"system": LAUNCH_CONTEXT, "code": "patient", "display": "Patient"}},
            {"url": "type", "valueCode": "Patient"},
            {"url": "description", "valueString": "The patient the order is for"}]},
    ]
    extensions += [{"url": CORE + "variable", "valueExpression": _expression("application/x-fhir-query", query, name)}
                   for name, query in form.variables.items()]
    extensions.append({"url": DTR + "questionnaireAudience", "valueCode": "clinical"})
    sections_item = {
        "linkId": SECTIONS_ITEM,
        "code": [{"system": ITEM_SYSTEM, "code": SECTIONS_ITEM, "display": "Documentation needed"}],
        "text": "What this coverage decision needs documented (set by the payer)",
        "type": "choice",
        "repeats": True,
        "readOnly": True,
        "answerOption": [{"valueCoding": section_coding(s)} for s in form.sections],
    }
    return {
        "resourceType": "Questionnaire",
        "id": form.id,
        "meta": {"profile": [DTR + "dtr-std-questionnaire"]},
        "extension": extensions,
        "url": questionnaire_url(base_url, form),
        "version": form.version,
        "name": form.name,
        "title": form.title,
        "status": "active",
        "subjectType": ["Patient"],
        "date": form.date,
        "publisher": publisher,
        "description": form.description,
        "item": [sections_item, *(item for s in form.sections for item in _section(form, s, base_url, systems))],
    }


def value_set(form: Form, answer_list: AnswerList, base_url: str, systems: CodeSystems,
              publisher: str) -> dict[str, Any]:
    """An answer list as a ValueSet, composed of its codes and expanded (DTR oper-15)."""
    by_system: dict[str, list[dict[str, str]]] = {}
    contains = []
    for answer in answer_list.answers:
        uri = systems.get(answer.system).canonical
        by_system.setdefault(uri, []).append({"code": answer.code, "display": answer.display})
        contains.append({"system": uri, "code": answer.code, "display": answer.display})
    return {
        "resourceType": "ValueSet",
        "id": value_set_id(form, answer_list),
        "url": value_set_url(base_url, form, answer_list),
        "version": form.version,
        "name": "".join(part.capitalize() for part in value_set_id(form, answer_list).split("-")),
        "title": answer_list.title,
        "status": "active",
        "publisher": publisher,
        "description": f"{answer_list.title}: a clinician-facing subset of the {form.policy_id} value sets "
                       f"{', '.join(answer_list.sources)}.",
        "compose": {"include": [{"system": uri, "concept": concepts} for uri, concepts in by_system.items()]},
        "expansion": {"timestamp": f"{form.date}T00:00:00Z", "total": len(contains), "contains": contains},
    }


def value_sets(form: Form, base_url: str, systems: CodeSystems, publisher: str) -> list[dict[str, Any]]:
    return [value_set(form, a, base_url, systems, publisher) for a in form.answer_lists.values()]

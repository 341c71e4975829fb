"""Documentation forms as data: ``policies/forms/*.yaml``, one per policy, loaded strictly and compiled into
FHIR R4 Questionnaires (DTR 2.2 ``dtr-std-questionnaire``) and their answer ValueSets (expanded).

A form has sections; each section ``asks`` for kinds of missing facts the engine reports (a gap ``kind``,
optionally ``kind:value-set`` for the value sets the gap concerns, or ``kind@rule`` for the rule that reported
it), so that the form shows only the sections a decision needs. :func:`check_forms` verifies the forms against
the policies: every kind of missing fact a policy can report maps to a section, every answer code belongs to
the policy value sets its list draws from, every name a form uses exists.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..engine.decision import GAP_KINDS, Decision, Gap
from ..engine.policy import Policy, PolicyError, PolicySet, _keys, _text
from .gaps import GapKey, UnknownCriterion, emitted_gaps
from .search import query_problems

#: item codes where no LOINC code exists: this project's own code system (the linkId is the code)
ITEM_SYSTEM = "http://cds-service.example.org/fhir/CodeSystem/documentation-items"
#: the read-only item the server pre-fills with the sections a decision needs (codes: section ids)
SECTIONS_ITEM = "sections"
SECTION_SYSTEM = "http://cds-service.example.org/fhir/CodeSystem/documentation-sections"
#: a documentation conflict names the section whose answer it concerns in its gap's ``about``
SECTION_ABOUT = "form-section:"
SDC = "http://hl7.org/fhir/uv/sdc/StructureDefinition/"
DTR = "http://hl7.org/fhir/us/davinci-dtr/StructureDefinition/"
CORE = "http://hl7.org/fhir/StructureDefinition/"
ITEM_TYPES = frozenset({"choice", "boolean", "integer", "decimal", "date", "dateTime", "string", "text"})
EXTRACT_KINDS: dict[str, tuple[set[str], set[str]]] = {
    # kind: (required keys naming items, optional keys)
    "indication": ({"code"}, {"confirmed", "onset", "severe"}),
    "pain-score": ({"score", "date"}, set()),
    "trial": ({"start", "route", "drug", "before", "after"}, set()),
    "pump-drug": ({"drug", "route"}, set()),
    "diagnosis": ({"code"}, set()),
    "drug-stopped": ({"reason", "date"}, {"note"}),
    "order-route": ({"route"}, set()),
    "order-drug": ({"drug"}, set()),
}
#: extract keys that hold a fixed coding ([system, code, display]) rather than a linkId
_FIXED_CODINGS = {"drug-stopped": {"drug", "route"}}
_ANSWERS_TOKEN = re.compile(r"\{answers:([A-Za-z0-9\-]+)\}")
_VARIABLE = re.compile(r"%([A-Za-z][A-Za-z0-9_]*)")
_LINK_ID = re.compile(r"^[a-z][a-z0-9\-]{0,63}$")
_ASK = re.compile(r"^([a-z\-]+)(?::([A-Za-z0-9_+]+))?(?:@([A-Za-z0-9\-]+))?$")


class FormError(PolicyError):
    """A form file is not valid (a policy file, as far as starting the service goes)."""


@dataclass(frozen=True)
class Answer:
    system: str  # short name (code-systems.yaml)
    code: str
    display: str


@dataclass(frozen=True)
class AnswerList:
    id: str
    title: str
    sources: tuple[str, ...]
    answers: tuple[Answer, ...]


@dataclass(frozen=True)
class Item:
    link_id: str
    text: str
    type: str
    answers: str | None = None
    code: Answer | None = None
    required: bool = False
    initial: str | None = None


@dataclass(frozen=True)
class Ask:
    """What a section asks for: a gap kind, optionally the value set it concerns or the rule reporting it."""

    kind: str
    about: str | None = None
    rule: str | None = None

    @property
    def specific(self) -> bool:
        return self.about is not None or self.rule is not None

    def matches(self, kind: str, about: str | None, rules: Collection[str]) -> bool:
        """Whether a gap of ``kind`` about ``about``, reported under one of ``rules``, is asked for."""
        if kind != self.kind:
            return False
        if self.about is not None and self.about not in (about or "").split("+"):
            return False
        return self.rule is None or self.rule in rules

    def __str__(self) -> str:
        return self.kind + (f":{self.about}" if self.about else "") + (f"@{self.rule}" if self.rule else "")


@dataclass(frozen=True)
class Section:
    id: str
    text: str
    asks: tuple[Ask, ...]
    items: tuple[Item, ...]
    extract: Mapping[str, Any]
    #: other sections this one is shown with (their answers need this one's)
    shown_with: tuple[str, ...] = ()

    @property
    def link_id(self) -> str:
        """The linkId of the section's group item."""
        return f"{self.id}-section"


@dataclass
class Form:
    """One policy's documentation form, as loaded (compile it with :mod:`.questionnaire`)."""

    id: str
    policy_id: str
    name: str
    title: str
    description: str
    date: str
    variables: dict[str, str]
    answer_lists: dict[str, AnswerList]
    sections: list[Section]
    digest: str
    version: str = ""
    path: Path | None = None

    def items(self) -> list[Item]:
        return [item for section in self.sections for item in section.items]

    def item(self, link_id: str) -> Item | None:
        return next((i for i in self.items() if i.link_id == link_id), None)

    def sections_for(self, gaps: Iterable[Gap], rules: Collection[str]) -> list[Section]:
        """The sections that ask for the (non-technical) gaps of a decision (``rules``: the rule that decided and
        those applied on the way, see :func:`rules_of`), in form order."""
        wanted: set[str] = set()
        for gap in gaps:
            wanted.update(s.id for s in self._asking(gap.kind, gap.about, rules))
        wanted.update(s.id for s in self.sections if set(s.shown_with) & wanted)
        return [s for s in self.sections if s.id in wanted]

    def _asking(self, kind: str, about: str | None, rules: Collection[str]) -> list[Section]:
        if about is not None and about.startswith(SECTION_ABOUT):
            return [s for s in self.sections if s.id == about[len(SECTION_ABOUT):]]
        specific = [s for s in self.sections if any(a.specific and a.matches(kind, about, rules) for a in s.asks)]
        if specific:
            return specific
        return [s for s in self.sections if any(not a.specific and a.matches(kind, about, rules) for a in s.asks)]


def rules_of(decision: Decision) -> set[str]:
    """The rules a decision's gaps may come from: the one that decided (or the engine's outcome) and every rule
    applied on the way (an uncoded or unconfirmed indication keeps the gaps of the rule it capped)."""
    return {decision.rule_id, *(t.rule_id for t in decision.trace if t.applied)}


@dataclass
class FormSet:
    forms: dict[str, Form] = field(default_factory=dict)  # by policy id

    def for_policy(self, policy_id: str) -> Form | None:
        return self.forms.get(policy_id)

    def by_id(self, form_id: str) -> Form | None:
        return next((f for f in self.forms.values() if f.id == form_id), None)

    def __iter__(self) -> Any:
        return iter(self.forms.values())


# --- loading ---------------------------------------------------------------------------------------------


def _coding(where: str, value: Any) -> Answer:
    if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, str) and v for v in value)):
        raise FormError(f"{where}: expected [system, code, display]")
    return Answer(value[0], value[1], value[2])


def _item(where: str, data: Any) -> Item:
    spec = _keys(where, data, {"linkId", "text", "type"}, {"answers", "code", "required", "initial"})
    link_id = spec["linkId"]
    if not isinstance(link_id, str) or not _LINK_ID.match(link_id) or link_id == SECTIONS_ITEM:
        raise FormError(f"{where}: linkId {link_id!r} must be lower-case letters, digits and '-' (not "
                        f"{SECTIONS_ITEM!r})")
    kind = spec["type"]
    if kind not in ITEM_TYPES:
        raise FormError(f"{where}: type must be one of {sorted(ITEM_TYPES)}")
    if (kind == "choice") != ("answers" in spec):
        raise FormError(f"{where}: a choice item needs 'answers' (and only a choice item has them)")
    required = spec.get("required", False)
    if not isinstance(required, bool):
        raise FormError(f"{where}: required must be true or false")
    return Item(link_id, _text(f"{where}.text", spec["text"]), kind, spec.get("answers"),
                _coding(f"{where}.code", spec["code"]) if "code" in spec else None, required,
                _text(f"{where}.initial", spec["initial"]) if "initial" in spec else None)


def _asks(where: str, data: Any) -> tuple[Ask, ...]:
    if not isinstance(data, list) or not data:
        raise FormError(f"{where}: expected a non-empty list")
    asks = []
    for value in data:
        found = _ASK.match(str(value))
        if not found:
            raise FormError(f"{where}: {value!r} is not kind, kind:value-set or kind@rule")
        asks.append(Ask(found.group(1), found.group(2), found.group(3)))
    return tuple(asks)


def load_form(path: Path) -> Form:
    where = path.name
    try:
        raw = path.read_bytes()
        data = yaml.safe_load(raw)
    except OSError as error:
        raise FormError(f"{where}: cannot be read ({error.strerror})") from None
    except yaml.YAMLError as error:
        raise FormError(f"{where}: not valid YAML: {error}") from None
    spec = _keys(where, data, {"form", "answers", "sections"}, {"variables"})
    head = _keys(f"{where}: form", spec["form"], {"id", "policy", "name", "title", "date"}, {"description"})
    if not re.match(r"^\d{4}-\d{2}-\d{2}$", str(head["date"])):
        raise FormError(f"{where}: form.date must be YYYY-MM-DD (when the form last changed)")
    variables = spec.get("variables") or {}
    if not isinstance(variables, Mapping) or not all(isinstance(v, str) for v in variables.values()):
        raise FormError(f"{where}: variables must map names to FHIR searches")
    lists: dict[str, AnswerList] = {}
    for list_id, item in (spec["answers"] or {}).items():
        place = f"{where}: answers.{list_id}"
        entry = _keys(place, item, {"title", "from", "codes"})
        sources = entry["from"] if isinstance(entry["from"], list) else [entry["from"]]
        codes = entry["codes"]
        if not isinstance(codes, list) or not codes:
            raise FormError(f"{place}.codes: expected a non-empty list")
        lists[str(list_id)] = AnswerList(str(list_id), _text(f"{place}.title", entry["title"]),
                                         tuple(str(s) for s in sources),
                                         tuple(_coding(f"{place}.codes[{i}]", c) for i, c in enumerate(codes)))
    sections = []
    for i, item in enumerate(spec["sections"] or []):
        place = f"{where}: sections[{i}]"
        entry = _keys(place, item, {"id", "text", "asks", "items", "extract"}, {"shown_with"})
        items = entry["items"]
        if not isinstance(items, list) or not items:
            raise FormError(f"{place}.items: expected a non-empty list")
        extract = entry["extract"]
        if not isinstance(extract, Mapping) or extract.get("kind") not in EXTRACT_KINDS:
            raise FormError(f"{place}.extract: 'kind' must be one of {sorted(EXTRACT_KINDS)}")
        sections.append(Section(str(entry["id"]), _text(f"{place}.text", entry["text"]),
                                _asks(f"{place}.asks", entry["asks"]),
                                tuple(_item(f"{place}.items[{j}]", x) for j, x in enumerate(items)), dict(extract),
                                tuple(str(x) for x in entry.get("shown_with") or [])))
    return Form(
        id=_text(f"{where}: form.id", head["id"]), policy_id=_text(f"{where}: form.policy", head["policy"]),
        name=_text(f"{where}: form.name", head["name"]), title=_text(f"{where}: form.title", head["title"]),
        description=_text(f"{where}: form.description", head.get("description", head["title"])),
        date=str(head["date"]), variables={str(k): str(v) for k, v in variables.items()}, answer_lists=lists,
        sections=sections, digest=hashlib.sha256(raw).hexdigest(), path=path,
    )


def form_version(policy: Policy, form: Form) -> str:
    """The form's version: the policy's review date and hash, and the form file's hash (a change to either is
    a new version). No '|' in it, so that ``url|version`` canonicals stay unambiguous."""
    _, review, digest = [*policy.version.split("|"), "", ""][:3]
    return f"{review}.{digest}.{form.digest[:8]}"


def load_forms(directory: Path, policies: PolicySet, *, check: bool = True) -> FormSet:
    """Every form in ``directory`` (``*.yaml``; the service's is ``policies/forms``), versioned with its policy;
    raises :class:`FormError` when a form file is malformed or (``check``) :func:`check_forms` finds a
    problem. A checker that reports the problems itself loads with ``check=False``."""
    forms = FormSet()
    if not directory.is_dir():
        raise FormError(f"{directory}: no forms directory")
    for path in sorted(directory.glob("*.yaml")):
        form = load_form(path)
        if form.policy_id in forms.forms:
            raise FormError(f"{path.name}: a second form for {form.policy_id}")
        policy = policies.get(form.policy_id)
        if policy is not None:
            form.version = form_version(policy, form)
        forms.forms[form.policy_id] = form
    problems = check_forms(policies, forms) if check else []
    if problems:
        raise FormError("documentation forms: " + "; ".join(problems))
    return forms


# --- checking -----------------------------------------------------------------------------------------------


def check_forms(policy_set: PolicySet, forms: FormSet) -> list[str]:
    """What is wrong with the forms, given the policies (empty when nothing is): every kind of missing fact
    a policy can report (except technical ones) is asked by a section of its form; every answer code belongs to
    a value set its list draws from; every answer list, value set, rule, variable and item a form names
    exists; each form's extraction names items of its own section. For ``cds-service policy check``."""
    problems: list[str] = []
    for policy in policy_set.policies:
        form = forms.for_policy(policy.id)
        try:
            keys = sorted(emitted_gaps(policy), key=str)
        except UnknownCriterion as error:
            problems.append(f"{policy.id}: {error}")
            continue
        askable = [k for k in keys if k.kind != "technical"]
        if form is None:
            if askable:
                problems.append(f"{policy.id}: no documentation form, and the policy can report missing "
                                f"{', '.join(sorted({str(k) for k in askable}))}")
            continue
        for key in askable:
            if not form._asking(key.kind, key.about, {key.rule} if key.rule else set()):
                problems.append(f"{form.id}: no section asks for '{key}' ({policy.id} can report it missing)")
        problems += _check_form(policy_set, policy, form)
    for form in forms:
        if policy_set.get(form.policy_id) is None:
            problems.append(f"{form.id}: policy {form.policy_id!r} does not exist")
    return problems


def _check_form(policy_set: PolicySet, policy: Policy, form: Form) -> list[str]:
    problems: list[str] = []
    where = form.id
    rules = {r.id for r in policy.rules}
    seen: set[str] = set()
    for answer_list in form.answer_lists.values():
        sets = []
        for name in answer_list.sources:
            vs = policy.value_sets.get(name)
            if vs is None:
                problems.append(f"{where}: answers.{answer_list.id} draws from {name!r}, not a value set of "
                                f"{policy.id}")
            else:
                sets.append(vs)
        for answer in answer_list.answers:
            if answer.system not in policy_set.systems.names():
                problems.append(f"{where}: answers.{answer_list.id}: unknown code system {answer.system!r}")
            elif sets and not any(vs.contains_code(answer.system, answer.code) for vs in sets):
                problems.append(f"{where}: answers.{answer_list.id}: {answer.system}|{answer.code} is in none of "
                                f"{', '.join(answer_list.sources)}")
    for name, query in form.variables.items():
        problems += [f"{where}: variable {name}: {p}" for p in query_problems(query)]
    groups = {s.link_id for s in form.sections}
    for section in form.sections:
        problems += [f"{where}: section {section.id} is shown with {other!r}, not a section of the form"
                     for other in section.shown_with if other not in {s.id for s in form.sections}]
        for ask in section.asks:
            if ask.kind not in GAP_KINDS or ask.kind == "technical":
                problems.append(f"{where}: section {section.id} asks for {ask}: not a kind of missing fact a form "
                                f"can collect ({', '.join(sorted(GAP_KINDS - {'technical'}))})")
            for name in (ask.about or "").split("+") if ask.about else []:
                if name not in policy.value_sets:
                    problems.append(f"{where}: section {section.id} asks for {ask}: no value set {name!r}")
            if ask.rule is not None and ask.rule not in rules:
                problems.append(f"{where}: section {section.id} asks for {ask}: {policy.id} has no rule {ask.rule!r}")
        for item in section.items:
            if item.link_id in seen or item.link_id in groups:
                problems.append(f"{where}: linkId {item.link_id!r} is used twice")
            seen.add(item.link_id)
            if item.answers is not None and item.answers not in form.answer_lists:
                problems.append(f"{where}: item {item.link_id}: no answer list {item.answers!r}")
            if item.code is not None and item.code.system not in policy_set.systems.names():
                problems.append(f"{where}: item {item.link_id}: unknown code system {item.code.system!r}")
            for name in _ANSWERS_TOKEN.findall(item.initial or ""):
                if name not in form.answer_lists:
                    problems.append(f"{where}: item {item.link_id}: initial names no answer list {name!r}")
            for name in _VARIABLE.findall(_ANSWERS_TOKEN.sub("", item.initial or "")):
                if name not in form.variables and name not in ("patient",):
                    problems.append(f"{where}: item {item.link_id}: initial uses %{name}, not a variable of the form")
        problems += _check_extract(where, section)
    return problems


def _check_extract(where: str, section: Section) -> list[str]:
    kind = str(section.extract.get("kind"))
    required, optional = EXTRACT_KINDS[kind]
    fixed = _FIXED_CODINGS.get(kind, set())
    keys = set(section.extract) - {"kind"}
    problems = [f"{where}: section {section.id} extract: unknown key(s) {sorted(keys - required - optional - fixed)}"
                ] if keys - required - optional - fixed else []
    problems += [f"{where}: section {section.id} extract: missing {sorted(required - keys)}"] if required - keys else []
    own = {i.link_id for i in section.items}
    for key in keys - fixed:
        value = section.extract[key]
        # the indication's severity may come from another section's item
        if value not in own and not (kind == "indication" and key == "severe"):
            problems.append(f"{where}: section {section.id} extract.{key}: {value!r} is not an item of the section")
    for key in fixed & keys:
        value = section.extract[key]
        if not (isinstance(value, list) and len(value) == 3):
            problems.append(f"{where}: section {section.id} extract.{key}: expected [system, code, display]")
    return problems


def expression(form: Form, text: str, systems: Mapping[str, str] | None = None) -> str:
    """An ``initial`` expression with each ``{answers:LIST}`` replaced by the FHIRPath collection of the
    list's codes."""

    def codes(match: re.Match[str]) -> str:
        answers = form.answer_lists[match.group(1)].answers
        return "(" + " | ".join("'" + a.code.replace("'", "\\'") + "'" for a in answers) + ")"

    return _ANSWERS_TOKEN.sub(codes, text)


__all__ = ["Answer", "AnswerList", "Ask", "Form", "FormError", "FormSet", "GapKey", "Item", "Section",
           "check_forms", "expression", "form_version", "load_form", "load_forms"]

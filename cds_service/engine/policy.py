"""Policy files: loading, validating and compiling them into :class:`Policy` objects.

A policy directory holds ``mp-*.yaml`` (one policy each) and shared files: ``code-systems.yaml``,
``shared-value-sets.yaml``, ``condition-status.yaml`` (which clinical statuses count, per criterion),
``text-matching.yaml`` (negation cues for free text), ``outcomes.yaml`` (how the engine words the decisions no
single rule makes) and ``valuesets/`` (FHIR ValueSet expansion files the value sets take codes from).

Loading is strict: an unknown key, criterion kind, code system or value-set name is an error that names the
file and the place, so that a mistyped policy never starts silently wrong.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import SetupError
from ..terminology import CodeSystems, Concept, TerminologyError, TextRules, ValueSet
from .context import STATUS_RULES, ConditionStatuses, StatusRule
from .criteria import ApprovalTable, Criterion, CriterionError, build_criterion, walk
from .criteria.conditions import IndicationIn
from .decision import GAP_KINDS, Outcome
from .indication import IndicationRules, Specificity
from .orders import OrderFacts
from .spec import strict_keys
from .value_set_files import Expansions, ValueSetFileError, load_value_sets

ORDER_RESOURCES = frozenset({"ServiceRequest", "DeviceRequest", "MedicationRequest"})
SHARED_FILES = ("code-systems.yaml", "shared-value-sets.yaml", "condition-status.yaml", "text-matching.yaml",
                "outcomes.yaml")
# The decisions no single rule makes (their rule ids), each worded by outcomes.yaml
INDICATION_MISSING = "indication-missing"
INDICATION_AMBIGUOUS = "indication-ambiguous"
INDICATION_CONFLICT = "indication-conflict"
INDICATION_UNCODED = "indication-uncoded"
DIAGNOSIS_UNCONFIRMED = "diagnosis-unconfirmed"
DRUG_UNIDENTIFIED = "drug-unidentified"
DATA_UNAVAILABLE = "data-unavailable"
NO_RULE = "no-rule-applies"
DOCUMENTATION_CONFLICT = "documentation-conflict"
ENGINE_OUTCOMES = (INDICATION_MISSING, INDICATION_AMBIGUOUS, INDICATION_CONFLICT, INDICATION_UNCODED,
                   DIAGNOSIS_UNCONFIRMED, DRUG_UNIDENTIFIED, DATA_UNAVAILABLE, NO_RULE, DOCUMENTATION_CONFLICT)


class PolicyError(SetupError):
    """A policy file is not valid."""


@dataclass(frozen=True)
class TriggerMatch:
    """How a draft order falls under a policy: the trigger, how it matched, and whether the order's drug could
    not be identified (then the decision can only ask to confirm it)."""

    trigger: Trigger
    how: str
    unidentified_drug: bool = False


@dataclass(frozen=True)
class Trigger:
    """Which draft orders a policy governs: a resource type and a value set of order codes (for a drug
    order, its drug or ingredients); optionally a drug the order must name (an infusion order), a drug that
    takes it out (esketamine), and the route its code implies."""

    resources: tuple[str, ...]
    code_in: ValueSet
    label: str
    exclude: ValueSet | None = None
    names_drug: ValueSet | None = None
    route: str | None = None
    unidentified_drug_route: ValueSet | None = None

    def match(self, order: OrderFacts, draft_orders: Sequence[OrderFacts]) -> TriggerMatch | None:
        if order.resource_type not in self.resources:
            return None
        concepts = order.concepts()
        how = next((f.how for f in (self.code_in.find(c) for c in concepts) if f), None)
        if how is None:
            return self._unidentified(order)
        if self.names_drug is not None:
            related = [o.code for o in draft_orders
                       if o.resource_type == "MedicationRequest"
                       and any(o.matches_reference(r) for r in order.related_references)]
            concepts = [*order.details, Concept(codings=(), text=order.code.text), *related]
            drug = next((f.how for f in (self.names_drug.find(c) for c in concepts) if f), None)
            if drug is None:
                return None
            how = f"{how}, drug {drug}"
        if self.exclude is not None and any(self.exclude.find(c) for c in concepts):
            return None
        return TriggerMatch(self, how)

    def _unidentified(self, order: OrderFacts) -> TriggerMatch | None:
        """A drug order whose drug cannot be identified at all may still be this policy's: its Medication
        could not be read, or it is named by no text or display and coded only in systems the trigger's drug
        list does not use (a bare NDC). When its route is the trigger's (or not stated), the decision asks to
        confirm the drug. An order that names no drug at all (one being written) is nobody's yet."""
        drug = order.drug
        if self.unidentified_drug_route is None or drug is None:
            return None
        if drug.identified:
            named = any(text for c in drug.concepts for text in c.texts())
            placeable = self.code_in.systems()
            if named or any(k.system in placeable for c in drug.concepts for k in c.codings):
                return None
            coded = [f"{k.system}|{k.code}" for c in drug.concepts for k in c.codings]
            why = f"coded only as {', '.join(coded[:3])}, in no code system the {self.label} list uses, unnamed"
        elif drug.unresolved_reference:
            why = drug.unresolved_reference
        else:
            return None  # no drug at all yet (an order being written): nothing to identify or to decide
        routes = [r for r in order.routes if r.codings or r.text]
        if routes and not any(self.unidentified_drug_route.find(r) for r in routes):
            return None
        return TriggerMatch(self, f"drug not identified ({why})", True)


@dataclass(frozen=True)
class Rule:
    """One rule of a policy: when it applies (``when``), what the decision depends on (``require``), the
    outcome when that is met or not met, and the clause it implements."""

    id: str
    clause: str
    when: tuple[Criterion, ...]
    require: tuple[Criterion, ...]
    outcome: Outcome
    if_not_met: Outcome
    summaries: Mapping[Outcome, str]
    reasons: Mapping[Outcome, str]
    missing: tuple[str, ...]
    gap_kind: str = "other"

    @property
    def needs_indication(self) -> bool:
        """Rules that test the indication, and the catch-all rule (empty 'when'), need one."""
        return not self.when or any(c.uses_indication for top in self.when for c in walk(top))

    def summary(self, outcome: Outcome) -> str:
        return self.summaries.get(outcome) or self.summaries.get(self.outcome, "")

    def reason(self, outcome: Outcome) -> str:
        return self.reasons.get(outcome) or self.reasons.get(self.outcome, "")


@dataclass(frozen=True)
class Wording:
    """How outcomes.yaml words one of the decisions no single rule makes: the clause, the reason, the summary."""

    clause: str
    reason: str
    summary: str


@dataclass
class Policy:
    """One policy file, compiled: what it governs, how it finds the indication, and its rules in order."""

    id: str
    title: str
    latest_review: str
    text_path: Path | None
    prior_authorization: str
    triggers: list[Trigger]
    indication: IndicationRules
    rules: list[Rule]
    outcomes: Mapping[str, Wording]
    value_sets: dict[str, ValueSet] = field(default_factory=dict)
    #: the policy id, its review date and a hash of every file that defines it
    version: str = ""

    @property
    def missing_indication(self) -> str:
        return self.indication.missing

    def trigger_for(self, order: OrderFacts, draft_orders: Sequence[OrderFacts]) -> TriggerMatch | None:
        for trigger in self.triggers:
            found = trigger.match(order, draft_orders)
            if found is not None:
                return found
        return None

    def criteria(self) -> list[Criterion]:
        return [c for rule in self.rules for top in (*rule.when, *rule.require) for c in walk(top)]

    def reads(self) -> set[str]:
        """Resource types (besides the orders) that this policy's criteria read."""
        types = {"Condition"}  # the problem list is the fallback source of the indication
        for criterion in self.criteria():
            types.update(criterion.reads)
        return types


@dataclass
class PolicySet:
    """Every policy of a policy directory, with what they share: the code systems, the condition status rules,
    the text matching rules. One set is one generation of the files (a reload loads a new one)."""

    systems: CodeSystems
    policies: list[Policy]
    directory: Path
    statuses: ConditionStatuses
    text_rules: TextRules

    def get(self, policy_id: str) -> Policy | None:
        return next((p for p in self.policies if p.id == policy_id), None)


_PAS = {"no-auth", "auth-needed", "conditional", "performpa"}


def _keys(where: str, data: Any, required: set[str], optional: set[str] = frozenset()) -> Mapping[str, Any]:  # type: ignore[assignment]
    return strict_keys(where, data, required, set(optional), PolicyError)


def _text(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PolicyError(f"{where}: expected text")
    text = " ".join(value.split())
    if text.count("(") != text.count(")") or text.count("[") != text.count("]"):
        raise PolicyError(f"{where}: unbalanced brackets in {text!r} (a YAML [list] splits text at commas: "
                          "write lists one item per line)")
    return text


def _outcome(where: str, value: Any) -> Outcome:
    try:
        return Outcome(value)
    except ValueError:
        raise PolicyError(f"{where}: outcome must be one of {[o.value for o in Outcome]}, not {value!r}") from None


def _by_outcome(where: str, value: Any, outcome: Outcome) -> dict[Outcome, str]:
    if value is None:
        return {}
    if isinstance(value, str):
        return {outcome: _text(where, value)}
    if isinstance(value, Mapping):
        return {_outcome(where, k): _text(f"{where}.{k}", v) for k, v in value.items()}
    raise PolicyError(f"{where}: expected text or a mapping by outcome")


def _yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise PolicyError(f"{path.name}: cannot be read ({error.strerror})") from None
    except yaml.YAMLError as error:
        raise PolicyError(f"{path.name}: not valid YAML: {error}") from None


class _Lookup:
    """What criteria of one policy file can name: its value sets (and the shared ones) and its tables."""

    def __init__(self, value_sets: Mapping[str, ValueSet], tables: Mapping[str, Any]) -> None:
        self.value_sets = value_sets
        self._table_specs = tables
        self._tables: dict[str, ApprovalTable] = {}

    def value_set(self, name: str) -> ValueSet:
        try:
            return self.value_sets[name]
        except KeyError:
            raise CriterionError(f"unknown value set {name!r}") from None

    def table(self, name: str) -> Any:
        if name not in self._tables:
            if name not in self._table_specs:
                raise CriterionError(f"unknown table {name!r}")
            spec = dict(self._table_specs[name] or {})
            if spec.pop("kind", None) != "drug_approvals":
                raise CriterionError(f"table {name!r}: 'kind' must be drug_approvals")
            self._tables[name] = ApprovalTable.build(name, spec, self)
        return self._tables[name]

    def criterion(self, spec: Any) -> Criterion:
        return build_criterion(spec, self)


def _criteria(where: str, value: Any, lookup: _Lookup) -> tuple[Criterion, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise PolicyError(f"{where}: expected a list of criteria")
    try:
        return tuple(build_criterion(item, lookup) for item in value)
    except (CriterionError, TerminologyError) as error:
        raise PolicyError(f"{where}: {error}") from None


def _triggers(where: str, data: Any, lookup: _Lookup) -> list[Trigger]:
    triggers = []
    for i, spec in enumerate(data or []):
        place = f"{where}: triggers[{i}]"
        spec = _keys(place, spec, {"resource", "code_in", "label"},
                     {"exclude", "names_drug", "route", "unidentified_drug_route"})
        resources = spec["resource"] if isinstance(spec["resource"], list) else [spec["resource"]]
        if not resources or not set(resources) <= ORDER_RESOURCES:
            raise PolicyError(f"{place}: resource must be one or more of {sorted(ORDER_RESOURCES)}")
        try:
            route = spec.get("route")
            if route is not None:
                lookup.value_set(route)
            triggers.append(Trigger(
                resources=tuple(resources),
                code_in=lookup.value_set(spec["code_in"]),
                label=_text(f"{place}.label", spec["label"]),
                exclude=lookup.value_set(spec["exclude"]) if "exclude" in spec else None,
                names_drug=lookup.value_set(spec["names_drug"]) if "names_drug" in spec else None,
                route=route,
                unidentified_drug_route=lookup.value_set(spec["unidentified_drug_route"])
                if "unidentified_drug_route" in spec else None,
            ))
        except CriterionError as error:
            raise PolicyError(f"{place}: {error}") from None
    if not triggers:
        raise PolicyError(f"{where}: no triggers")
    return triggers


def _indication(where: str, data: Any, lookup: _Lookup, rules: Sequence[Rule]) -> IndicationRules:
    spec = _keys(f"{where}: indication", data, {"recognised", "missing"},
                 {"not_indications", "more_specific", "status"})
    status = spec.get("status", "current")
    if status not in STATUS_RULES:
        raise PolicyError(f"{where}: indication.status must be one of {list(STATUS_RULES)}")
    try:
        recognised = tuple(lookup.value_set(n) for n in spec["recognised"])
        not_indications = lookup.value_set(spec["not_indications"]) if "not_indications" in spec else None
        specific = []
        for i, item in enumerate(spec.get("more_specific") or []):
            item = _keys(f"{where}: indication.more_specific[{i}]", item, {"generic", "specific"})
            specific.append(Specificity(lookup.value_set(item["generic"]),
                                        tuple(lookup.value_set(n) for n in item["specific"])))
    except (CriterionError, TypeError) as error:
        raise PolicyError(f"{where}: indication: {error}") from None
    gates: dict[str, ValueSet] = {vs.name: vs for vs in recognised}
    for rule in rules:
        for top in rule.when:
            for criterion in walk(top):
                if isinstance(criterion, IndicationIn):
                    gates.update((vs.name, vs) for vs in criterion.sets)
    return IndicationRules(recognised, tuple(gates.values()), _text(f"{where}: indication.missing", spec["missing"]),
                           not_indications, tuple(specific), status)


def _rules(where: str, data: Any, lookup: _Lookup) -> list[Rule]:
    rules = []
    seen_ids: set[str] = set()
    for i, spec in enumerate(data or []):
        place = f"{where}: rules[{i}]"
        spec = _keys(place, spec, {"id", "clause", "when", "outcome"},
                     {"require", "if_not_met", "summary", "reason", "missing", "reasoning", "gap_kind"})
        rule_id = _text(f"{place}.id", spec["id"])
        if rule_id in seen_ids:
            raise PolicyError(f"{place}: duplicate rule id {rule_id!r}")
        seen_ids.add(rule_id)
        place = f"{where}: rule {rule_id!r}"
        outcome = _outcome(place, spec["outcome"])
        missing = spec.get("missing", [])
        if not isinstance(missing, list) or not all(isinstance(m, str) for m in missing):
            raise PolicyError(f"{place}: 'missing' must be a list of text")
        missing = [_text(f"{place}.missing", m) for m in missing]
        if "reasoning" in spec:  # for the reader of the file: how it reads the policy text
            _text(f"{place}.reasoning", spec["reasoning"])
        if outcome is Outcome.CONDITIONAL and not missing and not spec.get("require"):
            raise PolicyError(f"{place}: a conditional outcome must say what is 'missing'")
        gap_kind = str(spec.get("gap_kind", "other"))
        if gap_kind not in GAP_KINDS:
            raise PolicyError(f"{place}: gap_kind must be one of {sorted(GAP_KINDS)}")
        reasons = _by_outcome(f"{place}.reason", spec.get("reason"), outcome)
        if not reasons and outcome is not Outcome.OUT_OF_SCOPE:
            raise PolicyError(f"{place}: needs a 'reason'")
        rules.append(Rule(
            id=rule_id,
            clause=_text(f"{place}.clause", spec["clause"]),
            when=_criteria(f"{place}.when", spec["when"], lookup),
            require=_criteria(f"{place}.require", spec.get("require"), lookup),
            outcome=outcome,
            if_not_met=_outcome(place, spec.get("if_not_met", "not-covered")),
            summaries=_by_outcome(f"{place}.summary", spec.get("summary"), outcome),
            reasons=reasons,
            missing=tuple(missing),
            gap_kind=gap_kind,
        ))
    if not rules:
        raise PolicyError(f"{where}: no rules")
    return rules


@dataclass
class _Shared:
    systems: CodeSystems
    value_sets: dict[str, ValueSet]
    statuses: ConditionStatuses
    text_rules: TextRules
    outcomes: dict[str, Wording]
    expansions: Expansions
    digest: str


def load_policy(path: Path, shared: _Shared) -> Policy:
    where = path.name
    data = _keys(where, _yaml(path), {"policy", "triggers", "indication", "rules", "value_sets"}, {"tables"})
    head = _keys(f"{where}: policy", data["policy"], {"id", "title", "latest_review"},
                 {"category", "text", "prior_authorization"})
    try:
        own = load_value_sets(where, data["value_sets"], shared.systems, shared.expansions, shared.text_rules)
    except ValueSetFileError as error:
        raise PolicyError(str(error)) from None
    clash = set(own) & set(shared.value_sets)
    if clash:
        raise PolicyError(f"{where}: value set(s) {sorted(clash)} already defined in shared-value-sets.yaml")
    tables = data.get("tables") or {}
    if not isinstance(tables, Mapping):
        raise PolicyError(f"{where}: 'tables' must be a mapping")
    lookup = _Lookup({**shared.value_sets, **own}, tables)
    triggers = _triggers(where, data["triggers"], lookup)
    rules = _rules(where, data["rules"], lookup)
    indication = _indication(where, data["indication"], lookup, rules)
    for name in tables:
        try:
            lookup.table(str(name))
        except CriterionError as error:
            raise PolicyError(f"{where}: {error}") from None
    pa = head.get("prior_authorization", "conditional")
    if pa not in _PAS:
        raise PolicyError(f"{where}: policy.prior_authorization must be one of {sorted(_PAS)}")
    text_path = path.parent / head["text"] if "text" in head else None
    if text_path is not None and not text_path.is_file():
        raise PolicyError(f"{where}: policy.text {head['text']!r} does not exist")
    digest = hashlib.sha256(shared.digest.encode())
    digest.update(path.read_bytes())
    if text_path is not None:
        digest.update(text_path.read_bytes())
    policy_id = _text(f"{where}: policy.id", head["id"])
    latest_review = str(head["latest_review"])
    return Policy(
        id=policy_id,
        title=_text(f"{where}: policy.title", head["title"]),
        latest_review=latest_review,
        text_path=text_path,
        prior_authorization=pa,
        triggers=triggers,
        indication=indication,
        rules=rules,
        outcomes=shared.outcomes,
        value_sets=lookup.value_sets,  # type: ignore[arg-type]
        version=f"{policy_id}|{latest_review}|{digest.hexdigest()[:16]}",
    )


def _statuses(path: Path) -> ConditionStatuses:
    where = path.name
    data = _keys(where, _yaml(path), {"statuses", "never", "question"})
    rules = {}
    for name, spec in (data["statuses"] or {}).items():
        spec = _keys(f"{where}: statuses.{name}", spec, {"clinical", "without_clinical_status"})
        if spec["without_clinical_status"] not in ("counts", "unless-abated"):
            raise PolicyError(f"{where}: statuses.{name}.without_clinical_status must be counts or unless-abated")
        rules[str(name)] = StatusRule(str(name), frozenset(spec["clinical"]), str(spec["without_clinical_status"]))
    if set(rules) != set(STATUS_RULES):
        raise PolicyError(f"{where}: statuses must define exactly {list(STATUS_RULES)}")
    return ConditionStatuses(rules, frozenset(data["never"]), frozenset(data["question"]))


def _outcomes(path: Path) -> dict[str, Wording]:
    where = path.name
    data = _keys(where, _yaml(path), set(ENGINE_OUTCOMES))
    return {name: Wording(**_keys(f"{where}: {name}", spec, {"clause", "reason", "summary"}))
            for name, spec in data.items()}


def load_policies(directory: Path) -> PolicySet:
    """Every ``mp-*.yaml`` policy in ``directory``, with the shared files beside them."""
    for name in SHARED_FILES:
        if not (directory / name).is_file():
            raise PolicyError(f"{directory}: {name} is missing")
    try:
        systems = CodeSystems.load(directory / "code-systems.yaml")
        text_rules = TextRules.load(directory / "text-matching.yaml")
    except (OSError, TerminologyError, yaml.YAMLError) as error:
        raise PolicyError(str(error)) from None
    expansions = Expansions(directory, systems)
    shared_path = directory / "shared-value-sets.yaml"
    data = _keys(shared_path.name, _yaml(shared_path), {"value_sets"})
    try:
        shared_sets = load_value_sets(shared_path.name, data["value_sets"], systems, expansions, text_rules)
    except ValueSetFileError as error:
        raise PolicyError(str(error)) from None
    digest = hashlib.sha256()
    # the documentation forms too: their extraction rules turn completed answers into evidence decisions read
    for path in [*(directory / name for name in SHARED_FILES), *sorted((directory / "valuesets").glob("*.json")),
                 *sorted((directory / "forms").glob("*.yaml"))]:
        digest.update(path.read_bytes())
    shared = _Shared(systems, shared_sets, _statuses(directory / "condition-status.yaml"), text_rules,
                     _outcomes(directory / "outcomes.yaml"), expansions, digest.hexdigest())
    paths = sorted(directory.glob("mp-*.yaml"))
    if not paths:
        raise PolicyError(f"{directory}: no policy files (mp-*.yaml)")
    policies = [load_policy(path, shared) for path in paths]
    ids = [p.id for p in policies]
    if len(set(ids)) != len(ids):
        raise PolicyError(f"{directory}: duplicate policy ids {ids}")
    return PolicySet(systems=systems, policies=policies, directory=directory, statuses=shared.statuses,
                     text_rules=text_rules)

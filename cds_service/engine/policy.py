"""Policy files: loading, validating and compiling them into :class:`Policy` objects.

Loading is strict: an unknown key, criterion kind, code system or value-set name is an error that
names the file and the place, so that a mistyped policy never starts silently wrong.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..terminology import CodeSystems, Concept, TerminologyError, ValueSet
from .criteria import Criterion, CriterionError, build_criterion, walk
from .decision import Outcome
from .orders import OrderFacts

ORDER_RESOURCES = frozenset({"ServiceRequest", "DeviceRequest", "MedicationRequest"})


class PolicyError(ValueError):
    """A policy file is not valid."""


@dataclass(frozen=True)
class Trigger:
    resource: str
    code_in: ValueSet
    label: str
    exclude: ValueSet | None = None
    names_drug: ValueSet | None = None
    route: str | None = None

    def matches(self, order: OrderFacts, draft_orders: Sequence[OrderFacts]) -> str | None:
        """How the order falls under this trigger ("system|code" or a text match), or None."""
        if order.resource_type != self.resource:
            return None
        concepts = [order.code, *order.ingredients]
        how = next((h for h in (self.code_in.match(c) for c in concepts) if h), None)
        if how is None:
            return None
        if self.names_drug is not None:
            related = [o.code for o in draft_orders
                       if o.resource_type == "MedicationRequest"
                       and any(o.matches_reference(r) for r in order.related_references)]
            concepts = [*order.details, Concept(codings=(), text=order.code.text), *related]
            drug = next((h for h in (self.names_drug.match(c) for c in concepts) if h), None)
            if drug is None:
                return None
            how = f"{how}, drug {drug}"
        if self.exclude is not None and any(self.exclude.match(c) for c in concepts):
            return None
        return how


@dataclass(frozen=True)
class Rule:
    id: str
    clause: str
    when: tuple[Criterion, ...]
    require: tuple[Criterion, ...]
    outcome: Outcome
    if_not_met: Outcome
    summaries: Mapping[Outcome, str]
    reasons: Mapping[Outcome, str]
    missing: tuple[str, ...]

    @property
    def needs_indication(self) -> bool:
        """Rules that test the indication, and the catch-all rule (empty 'when'), need one."""
        return not self.when or any(c.uses_indication for top in self.when for c in walk(top))

    def summary(self, outcome: Outcome) -> str:
        return self.summaries.get(outcome) or self.summaries.get(self.outcome, "")

    def reason(self, outcome: Outcome) -> str:
        return self.reasons.get(outcome) or self.reasons.get(self.outcome, "")


@dataclass
class Policy:
    id: str
    title: str
    latest_review: str
    category: str
    text_path: Path | None
    prior_authorization: str
    triggers: list[Trigger]
    recognised: list[ValueSet]
    missing_indication: str
    rules: list[Rule]
    value_sets: dict[str, ValueSet] = field(default_factory=dict)

    def trigger_for(self, order: OrderFacts, draft_orders: Sequence[OrderFacts]) -> tuple[Trigger, str] | None:
        for trigger in self.triggers:
            how = trigger.matches(order, draft_orders)
            if how:
                return trigger, how
        return None

    def reads(self) -> set[str]:
        """Resource types (besides the orders) that this policy's criteria read."""
        types = {"Condition"}  # the problem list is the fallback source of the indication
        for rule in self.rules:
            for top in (*rule.when, *rule.require):
                for criterion in walk(top):
                    types.update(criterion.reads)
        return types


@dataclass
class PolicySet:
    systems: CodeSystems
    policies: list[Policy]
    directory: Path

    def get(self, policy_id: str) -> Policy | None:
        return next((p for p in self.policies if p.id == policy_id), None)


_PAS = {"no-auth", "auth-needed", "conditional", "performpa"}


def _keys(where: str, data: Any, required: set[str], optional: set[str] = frozenset()) -> Mapping[str, Any]:  # type: ignore[assignment]
    if not isinstance(data, Mapping):
        raise PolicyError(f"{where}: expected a mapping")
    unknown = set(data) - required - set(optional)
    if unknown:
        raise PolicyError(f"{where}: unknown key(s) {sorted(unknown)}")
    missing = required - set(data)
    if missing:
        raise PolicyError(f"{where}: missing {sorted(missing)}")
    return data


def _text(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PolicyError(f"{where}: expected text")
    return value.strip()


def _outcome(where: str, value: Any) -> Outcome:
    try:
        return Outcome(value)
    except ValueError:
        raise PolicyError(f"{where}: outcome must be one of {[o.value for o in Outcome]}, not {value!r}") from None


def load_value_sets(where: str, data: Any, systems: CodeSystems) -> dict[str, ValueSet]:
    if not isinstance(data, Mapping):
        raise PolicyError(f"{where}: 'value_sets' must be a mapping")
    out = {}
    for name, spec in data.items():
        place = f"{where}: value set {name!r}"
        spec = _keys(place, spec, {"title"}, {"text", *systems.names()} )
        codes = {k: v for k, v in spec.items() if k not in ("title", "text")}
        for system, entries in codes.items():
            if not isinstance(entries, list):
                raise PolicyError(f"{place}: codes under {system!r} must be a list")
        text = spec.get("text", [])
        if not isinstance(text, list):
            raise PolicyError(f"{place}: 'text' must be a list")
        if not codes and not text:
            raise PolicyError(f"{place}: has no codes and no text")
        try:
            out[str(name)] = ValueSet(str(name), _text(place, spec["title"]), systems, codes, text)
        except TerminologyError as error:
            raise PolicyError(f"{place}: {error}") from None
    return out


def _summaries(where: str, value: Any, outcome: Outcome) -> dict[Outcome, str]:
    if value is None:
        return {}
    if isinstance(value, str):
        return {outcome: value.strip()}
    if isinstance(value, Mapping):
        return {_outcome(where, k): _text(f"{where}.{k}", v) for k, v in value.items()}
    raise PolicyError(f"{where}: expected text or a mapping by outcome")


def _criteria(where: str, value: Any, lookup: Any) -> tuple[Criterion, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise PolicyError(f"{where}: expected a list of criteria")
    try:
        return tuple(build_criterion(item, lookup) for item in value)
    except (CriterionError, TerminologyError) as error:
        raise PolicyError(f"{where}: {error}") from None


def load_policy(path: Path, systems: CodeSystems, shared: Mapping[str, ValueSet]) -> Policy:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise PolicyError(f"{path.name}: not valid YAML: {error}") from None
    where = path.name
    data = _keys(where, data, {"policy", "triggers", "indication", "rules", "value_sets"})
    head = _keys(f"{where}: policy", data["policy"], {"id", "title", "latest_review"},
                 {"category", "text", "prior_authorization"})
    own = load_value_sets(where, data["value_sets"], systems)
    clash = set(own) & set(shared)
    if clash:
        raise PolicyError(f"{where}: value set(s) {sorted(clash)} already defined in shared-value-sets.yaml")
    value_sets = {**shared, **own}

    def lookup(name: str) -> ValueSet:
        try:
            return value_sets[name]
        except KeyError:
            raise CriterionError(f"unknown value set {name!r}") from None

    triggers = []
    for i, spec in enumerate(data["triggers"] or []):
        place = f"{where}: triggers[{i}]"
        spec = _keys(place, spec, {"resource", "code_in", "label"}, {"exclude", "names_drug", "route"})
        if spec["resource"] not in ORDER_RESOURCES:
            raise PolicyError(f"{place}: resource must be one of {sorted(ORDER_RESOURCES)}")
        try:
            route = spec.get("route")
            if route is not None:
                lookup(route)
            triggers.append(Trigger(
                resource=spec["resource"],
                code_in=lookup(spec["code_in"]),
                label=_text(f"{place}.label", spec["label"]),
                exclude=lookup(spec["exclude"]) if "exclude" in spec else None,
                names_drug=lookup(spec["names_drug"]) if "names_drug" in spec else None,
                route=route,
            ))
        except CriterionError as error:
            raise PolicyError(f"{place}: {error}") from None
    if not triggers:
        raise PolicyError(f"{where}: no triggers")

    indication = _keys(f"{where}: indication", data["indication"], {"recognised", "missing"})
    try:
        recognised = [lookup(n) for n in indication["recognised"]]
    except (CriterionError, TypeError) as error:
        raise PolicyError(f"{where}: indication.recognised: {error}") from None

    rules = []
    seen_ids: set[str] = set()
    for i, spec in enumerate(data["rules"] or []):
        place = f"{where}: rules[{i}]"
        spec = _keys(place, spec, {"id", "clause", "when", "outcome"},
                     {"require", "if_not_met", "summary", "reason", "missing"})
        rule_id = _text(f"{place}.id", spec["id"])
        if rule_id in seen_ids:
            raise PolicyError(f"{place}: duplicate rule id {rule_id!r}")
        seen_ids.add(rule_id)
        place = f"{where}: rule {rule_id!r}"
        outcome = _outcome(place, spec["outcome"])
        if_not_met = _outcome(place, spec.get("if_not_met", "not-covered"))
        missing = spec.get("missing", [])
        if not isinstance(missing, list) or not all(isinstance(m, str) for m in missing):
            raise PolicyError(f"{place}: 'missing' must be a list of text")
        if outcome is Outcome.CONDITIONAL and not missing and not spec.get("require"):
            raise PolicyError(f"{place}: a conditional outcome must say what is 'missing'")
        reasons = _summaries(f"{place}.reason", spec.get("reason"), outcome)
        if not reasons and outcome is not Outcome.OUT_OF_SCOPE:
            raise PolicyError(f"{place}: needs a 'reason'")
        rules.append(Rule(
            id=rule_id,
            clause=_text(f"{place}.clause", spec["clause"]),
            when=_criteria(f"{place}.when", spec["when"], lookup),
            require=_criteria(f"{place}.require", spec.get("require"), lookup),
            outcome=outcome,
            if_not_met=if_not_met,
            summaries=_summaries(f"{place}.summary", spec.get("summary"), outcome),
            reasons=reasons,
            missing=tuple(missing),
        ))
    if not rules:
        raise PolicyError(f"{where}: no rules")
    pa = head.get("prior_authorization", "conditional")
    if pa not in _PAS:
        raise PolicyError(f"{where}: policy.prior_authorization must be one of {sorted(_PAS)}")
    text_path = path.parent / head["text"] if "text" in head else None
    if text_path is not None and not text_path.is_file():
        raise PolicyError(f"{where}: policy.text {head['text']!r} does not exist")
    return Policy(
        id=_text(f"{where}: policy.id", head["id"]),
        title=_text(f"{where}: policy.title", head["title"]),
        latest_review=str(head["latest_review"]),
        category=str(head.get("category", "")),
        text_path=text_path,
        prior_authorization=pa,
        triggers=triggers,
        recognised=recognised,
        missing_indication=_text(f"{where}: indication.missing", indication["missing"]),
        rules=rules,
        value_sets=value_sets,
    )


def load_policies(directory: Path) -> PolicySet:
    """Every ``mp-*.yaml`` policy in ``directory``, with its code systems and shared value sets."""
    try:
        systems = CodeSystems.load(directory / "code-systems.yaml")
    except (OSError, TerminologyError, yaml.YAMLError) as error:
        raise PolicyError(f"code-systems.yaml: {error}") from None
    shared_path = directory / "shared-value-sets.yaml"
    shared: dict[str, ValueSet] = {}
    if shared_path.is_file():
        data = _keys(shared_path.name, yaml.safe_load(shared_path.read_text(encoding="utf-8")), {"value_sets"})
        shared = load_value_sets(shared_path.name, data["value_sets"], systems)
    policies = [load_policy(path, systems, shared) for path in sorted(directory.glob("mp-*.yaml"))]
    if not policies:
        raise PolicyError(f"{directory}: no policy files (mp-*.yaml)")
    ids = [p.id for p in policies]
    if len(set(ids)) != len(ids):
        raise PolicyError(f"{directory}: duplicate policy ids {ids}")
    return PolicySet(systems=systems, policies=policies, directory=directory)

"""The coverage requirements service without its web layer: discovery, and answering a hook request
with cards and coverage-information systemActions. The web layer and the offline ``evaluate``
command both call this."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ..engine.decision import Decision
from ..engine.evaluate import decide
from ..engine.orders import ORDER_TYPES, OrderFacts, order_facts
from ..engine.policy import Policy, PolicySet, Trigger
from ..engine.requirements import data_needs, prefetch_templates
from ..fhir.client import FhirClient, fhir_server_problem
from ..fhir.gather import DataNeed, gather_record
from ..fhir.record import PatientRecord
from .cards import CardRenderer
from .coverage_info import UNKNOWN_COVERAGE, annotated_order, coverage_information, new_assertion_id
from .reading import as_r4_lists, check_order, unreadable_decision
from .request import HookRequest, RequestError, parse_hook_request

SERVICES = {
    "coverage-requirements-order-select": "order-select",
    "coverage-requirements-order-sign": "order-sign",
}
#: hooks whose answer always carries ``systemActions`` (CRD: the Coverage Information response type)
_PRIMARY_HOOKS = {"order-sign"}
_BILLING_SYSTEMS = {"cpt", "hcpcs"}
#: CRD 2.0.1 card type of every card this service returns (CodeSystem temp, ``_cardType``)
CARD_TOPIC = {"system": "http://hl7.org/fhir/us/davinci-crd/CodeSystem/temp", "code": "coverage-info",
              "display": "Coverage Information"}


@dataclass(frozen=True)
class Settings:
    payer_name: str = "Example Health Plan"
    public_base_url: str | None = None
    fhir_timeout_seconds: float = 3.0
    allow_http: bool = False
    contact_fhir_servers: bool = True


@dataclass
class HookResult:
    """The response to send, and what the audit log keeps of the decisions."""

    response: dict[str, Any]
    request: HookRequest
    decisions: list[Decision] = field(default_factory=list)
    card_decisions: dict[str, str] = field(default_factory=dict)  # card uuid -> coverage-assertion-id


@dataclass(frozen=True)
class InScope:
    policy: Policy
    trigger: Trigger
    how: str
    order: OrderFacts


@dataclass
class Scope:
    """The draft orders as read (single objects read as lists), the orders in scope of a policy, and
    what the reading noted per order reference."""

    items: list[InScope]
    facts: list[OrderFacts]
    notes: dict[str, list[str]]


class CoverageService:
    def __init__(self, policies: PolicySet, cards_dir: Path, settings: Settings,
                 transport: httpx.AsyncBaseTransport | None = None,
                 today: Callable[[], dt.date] | None = None) -> None:
        self.policies = policies
        self.settings = settings
        self.renderer = CardRenderer(cards_dir)
        self.all_needs = data_needs(policies.policies, policies.systems)
        self._needs: dict[tuple[str, ...], list[DataNeed]] = {}
        self._transport = transport
        self._today = today or (lambda: dt.datetime.now(dt.UTC).date())

    # --- discovery --------------------------------------------------------------------------

    def discovery(self) -> dict[str, Any]:
        titles = ", ".join(f"{p.id} ({p.title})" for p in self.policies.policies)
        prefetch = prefetch_templates(self.all_needs)
        services = []
        for service_id, hook in SERVICES.items():
            advisory = hook == "order-select"
            services.append({
                "hook": hook,
                "id": service_id,
                "title": f"{self.settings.payer_name} coverage requirements ({hook})",
                "description": (
                    f"Coverage information for draft orders under medical policies {titles}: an advisory card "
                    "and a Da Vinci CRD coverage-information systemAction per order in scope"
                    + (" (advisory only: no documentation requests on order-select)." if advisory else ".")
                ),
                "prefetch": prefetch,
                "usageRequirements": (
                    "Send the prefetch keys advertised here, or fhirServer with fhirAuthorization granting "
                    "patient-scoped read of Condition, Observation, Procedure, MedicationStatement, "
                    "MedicationAdministration, AllergyIntolerance and Coverage. Without either, a request "
                    "with an order in scope is answered with HTTP 412."
                ),
                "extension": {
                    "davinci-crd.configuration-options": [
                        {
                            "code": "coverage-info",
                            "type": "boolean",
                            "name": "Coverage information cards",
                            "description": "Return the coverage cards (External Reference, Instructions) for "
                                           "each order in scope (the coverage-information systemActions are "
                                           "always returned).",
                            "default": True,
                        }
                    ]
                },
            })
        return {"services": services}

    # --- hooks ------------------------------------------------------------------------------

    def hook_of(self, service_id: str) -> str | None:
        return SERVICES.get(service_id)

    def parse(self, service_id: str, body: Any) -> HookRequest:
        hook = self.hook_of(service_id)
        if hook is None:
            raise RequestError(f"no service {service_id!r}", status=404, code="not-found")
        return parse_hook_request(body, hook)

    def in_scope(self, request: HookRequest) -> Scope:
        systems = self.policies.systems
        bundle: list[Mapping[str, Any]] = []
        notes: dict[str, list[str]] = {}
        for resource in request.draft_orders:
            read, found = as_r4_lists(resource)
            bundle.append(read)
            if found:
                notes[_reference(read)] = found
        facts = [order_facts(systems, r, bundle) for r in bundle if r.get("resourceType") in ORDER_TYPES]
        selected = facts
        if request.selections is not None:
            chosen = {_type_and_id(s) for s in request.selections}
            selected = [f for f in facts if f.id and f.reference in chosen]
        found_items = []
        for order in selected:
            for policy in self.policies.policies:
                match = policy.trigger_for(order, facts)
                if match is not None:
                    found_items.append(InScope(policy, match[0], match[1], order))
        return Scope(found_items, facts, notes)

    def unreadable(self, scope: Scope) -> dict[str, list[str]]:
        """Per in-scope order reference: faults on elements the decision reads (the order is decided
        as unreadable). Faults on other elements are noted and otherwise ignored."""
        systems = self.policies.systems
        bundle = [f.raw for f in scope.facts]
        out: dict[str, list[str]] = {}
        for item in scope.items:
            reference = item.order.reference
            if reference in out:
                continue
            check = check_order(item.order.raw, lambda raw: order_facts(systems, raw, bundle))
            out[reference] = check.unreadable
            if check.ignored:
                scope.notes.setdefault(reference, []).append(
                    "not valid FHIR R4, and not read by the decision: " + "; ".join(check.ignored))
        return out

    def needs_for(self, policies: Sequence[Policy]) -> list[DataNeed]:
        """What the in-scope policies read, merged per resource type (a type scoped by several policies'
        value sets keeps what any of them can use); built once per combination of policies."""
        key = tuple(sorted(p.id for p in policies))
        if key not in self._needs:
            self._needs[key] = data_needs(policies, self.policies.systems)
        return self._needs[key]

    async def record_for(self, request: HookRequest, policies: Sequence[Policy],
                         fhir_server_allowlist: Sequence[str] | None) -> PatientRecord:
        needs = self.needs_for(policies)
        factory = None
        problem = None
        if not self.settings.contact_fhir_servers:
            problem = "offline evaluation does not contact FHIR servers"
        elif request.fhir is None or not request.fhir.access_token:
            problem = "the request has no fhirServer and fhirAuthorization"
        else:
            problem = fhir_server_problem(request.fhir.server, self.settings.allow_http, fhir_server_allowlist)
        if problem is None and request.fhir is not None:
            access = request.fhir

            def factory() -> FhirClient:
                return FhirClient(access.server, access.access_token, self.settings.fhir_timeout_seconds,
                                  transport=self._transport)

        return await gather_record(needs, request.prefetch, request.patient_id, factory, problem)

    async def handle(self, service_id: str, body: Any, base_url: str,
                     fhir_server_allowlist: Sequence[str] | None = None) -> HookResult:
        """Answer one hook call. Raises RequestError (4xx) and DataUnavailable (412)."""
        request = self.parse(service_id, body)
        scope = self.in_scope(request)
        result = HookResult(response=self._answer([], [], request.hook), request=request)
        if not scope.items:
            return result
        unreadable = self.unreadable(scope)
        readable = [item.policy for item in scope.items if not unreadable[item.order.reference]]
        policies = list({policy.id: policy for policy in readable}.values())
        record = await self.record_for(request, policies, fhir_server_allowlist) if policies else PatientRecord()
        return self.respond(request, scope, unreadable, record, base_url, result)

    def _answer(self, cards: list[dict[str, Any]], actions: list[dict[str, Any]],
                hook: str | None = None) -> dict[str, Any]:
        """CDS Hooks response: ``systemActions`` only when there are some, except on the hooks where CRD
        requires the field (then possibly empty)."""
        return {"cards": cards, **({"systemActions": actions} if actions or hook in _PRIMARY_HOOKS else {})}

    def respond(self, request: HookRequest, scope: Scope, unreadable: Mapping[str, list[str]],
                record: PatientRecord, base_url: str, result: HookResult) -> HookResult:
        advisory_only = request.hook == "order-select"
        show_cards = request.configuration.get("coverage-info", True) is not False
        today = self._today().isoformat()
        coverage = self._coverage_reference(record)
        cards: list[dict[str, Any]] = []
        actions: list[dict[str, Any]] = []
        annotated: dict[str, dict[str, Any]] = {}
        for item in scope.items:
            reference = item.order.reference
            if unreadable[reference]:
                decision = unreadable_decision(item.policy.id, item.policy.title, reference, unreadable[reference])
            else:
                decision = decide(self.policies, item.policy, item.trigger, item.how, item.order, scope.facts,
                                  record)
            shown_notes = list(decision.notes)
            decision.notes.extend([*request.notes, *scope.notes.get(reference, [])])
            result.decisions.append(decision)
            if not decision.decided:
                continue
            assertion_id = new_assertion_id()
            order_coverage = {"reference": item.order.insurance[0]} if item.order.insurance else coverage
            extension = coverage_information(
                decision,
                assertion_id=assertion_id,
                date=today,
                coverage=order_coverage,
                billing_code=self._billing_code(item),
                prior_authorization=item.policy.prior_authorization,
                advisory_only=advisory_only,
            )
            base = annotated.get(reference, dict(item.order.raw))
            annotated[reference] = annotated_order(base, extension)
            if show_cards:
                for card in self.renderer.cards(
                    decision,
                    trigger_label=item.trigger.label,
                    order_label=f"{item.trigger.label} ({item.order.code.label()})",
                    payer_name=self.settings.payer_name,
                    policy_url=self.policy_url(item.policy, base_url),
                    advisory_only=advisory_only,
                    topic=CARD_TOPIC,
                    coverage_known=order_coverage is not UNKNOWN_COVERAGE,
                    notes=shown_notes,
                ):
                    cards.append(card)
                    result.card_decisions[card["uuid"]] = assertion_id
        for reference, resource in annotated.items():
            actions.append({
                "type": "update",
                "description": f"Add coverage information to {reference}",
                "resource": resource,
            })
        result.response = self._answer(cards, actions, request.hook)
        return result

    def policy_url(self, policy: Policy, base_url: str) -> str:
        base = (self.settings.public_base_url or base_url).rstrip("/")
        return f"{base}/policies/{policy.id}"

    def _coverage_reference(self, record: PatientRecord) -> Mapping[str, Any]:
        """The patient's active Coverage, for the coverage-information extension (it is not evidence
        for a decision, so it is read without validating the resource); without one,
        :data:`UNKNOWN_COVERAGE`."""
        for coverage in record.raw_of_type("Coverage"):
            if coverage.get("status") in (None, "active") and isinstance(coverage.get("id"), str):
                return {"reference": f"Coverage/{coverage['id']}"}
        return UNKNOWN_COVERAGE

    def _billing_code(self, item: InScope) -> Mapping[str, str] | None:
        systems = self.policies.systems
        for coding in item.order.code.codings:
            if coding.system in _BILLING_SYSTEMS and item.trigger.code_in.contains(coding):
                billing = {"system": systems.get(coding.system).canonical, "code": coding.code}
                if coding.display:
                    billing["display"] = coding.display
                return billing
        return None


def _reference(resource: Mapping[str, Any]) -> str:
    rid = resource.get("id")
    return f"{resource.get('resourceType')}/{rid if isinstance(rid, str) else '(no id)'}"


def _type_and_id(reference: str) -> str:
    """"Type/id" of a reference, relative or absolute (the last two path segments)."""
    return "/".join(reference.rstrip("/").split("/")[-2:])

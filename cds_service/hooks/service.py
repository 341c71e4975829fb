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
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from ..engine.decision import Decision
from ..engine.evaluate import decide
from ..engine.orders import ORDER_TYPES, Medications, OrderFacts, medications_from, order_facts
from ..engine.policy import Policy, PolicySet, TriggerMatch
from ..engine.requirements import data_needs, prefetch_templates
from ..fhir.client import FhirClient, ReadLimits
from ..fhir.gather import DataNeed, gather_record
from ..fhir.record import PatientRecord, validation_summary
from ..urls import Allowlist, fhir_server_problem
from .cards import CardRenderer
from .coverage_info import annotated_order, coverage_information, new_assertion_id
from .request import HookRequest, RequestError, parse_hook_request

SERVICES = {
    "coverage-requirements-order-select": "order-select",
    "coverage-requirements-order-sign": "order-sign",
}
_BILLING_SYSTEMS = {"cpt", "hcpcs"}


@dataclass(frozen=True)
class Settings:
    payer_name: str = "Example Health Plan"
    public_base_url: str | None = None
    fhir_timeout_seconds: float = 3.0
    allow_http: bool = False
    contact_fhir_servers: bool = True
    fhir_limits: ReadLimits = field(default_factory=ReadLimits)


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
    match: TriggerMatch
    order: OrderFacts


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
                            "description": "Return a coverage-information card for each order in scope "
                                           "(the coverage-information systemActions are always returned).",
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

    @staticmethod
    def medications(request: HookRequest) -> Medications:
        """Medications a draft order may reference: in the draftOrders Bundle (by fullUrl) and the prefetch."""
        return medications_from([request.context.get("draftOrders"), *request.prefetch.values()])

    def in_scope(self, request: HookRequest, medications: Medications) -> tuple[list[InScope], list[OrderFacts]]:
        systems = self.policies.systems
        bundle = request.draft_orders
        facts = [order_facts(systems, r, medications) for r in bundle if r.get("resourceType") in ORDER_TYPES]
        selected = facts
        if request.selections is not None:
            wanted = set(request.selections)
            selected = [f for f in facts if f.reference in wanted or any(f.matches_reference(s) for s in wanted)]
        found = []
        for order in selected:
            for policy in self.policies.policies:
                match = policy.trigger_for(order, facts)
                if match is not None:
                    found.append(InScope(policy, match, order))
        return found, facts

    @staticmethod
    def validate_orders(scope: Sequence[InScope]) -> None:
        for item in scope:
            model = get_fhir_model_class(item.order.resource_type)
            try:
                model.model_validate(item.order.raw)
            except ValidationError as error:
                raise RequestError(
                    f"draft order {item.order.reference} is not a valid FHIR R4 {item.order.resource_type}: "
                    f"{validation_summary(error)}"
                ) from None

    def needs_for(self, policies: Sequence[Policy]) -> list[DataNeed]:
        """What the in-scope policies read, merged per resource type (a type scoped by several policies'
        value sets keeps what any of them can use); built once per combination of policies."""
        key = tuple(sorted(p.id for p in policies))
        if key not in self._needs:
            self._needs[key] = data_needs(policies, self.policies.systems)
        return self._needs[key]

    async def record_for(self, request: HookRequest, policies: Sequence[Policy],
                         fhir_server_allowlist: Allowlist | None) -> PatientRecord:
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
                                  transport=self._transport, limits=self.settings.fhir_limits)

        return await gather_record(needs, request.prefetch, request.patient_id, factory, problem)

    async def handle(self, service_id: str, body: Any, base_url: str,
                     fhir_server_allowlist: Allowlist | None = None) -> HookResult:
        """Answer one hook call. Raises RequestError (4xx) and DataUnavailable (412)."""
        request = self.parse(service_id, body)
        medications = self.medications(request)
        scope, facts = self.in_scope(request, medications)
        result = HookResult(response={"cards": []}, request=request)
        if not scope:
            return result
        self.validate_orders(scope)
        policies = list({item.policy.id: item.policy for item in scope}.values())
        record = await self.record_for(request, policies, fhir_server_allowlist)
        return self.respond(request, scope, facts, record, base_url, result, medications)

    def respond(self, request: HookRequest, scope: Sequence[InScope], facts: Sequence[OrderFacts],
                record: PatientRecord, base_url: str, result: HookResult,
                medications: Medications | None = None) -> HookResult:
        advisory_only = request.hook == "order-select"
        show_cards = request.configuration.get("coverage-info", True) is not False
        today = self._today().isoformat()
        coverage_ref = self._coverage_reference(record)
        cards: list[dict[str, Any]] = []
        actions: list[dict[str, Any]] = []
        annotated: dict[str, dict[str, Any]] = {}
        known = medications or Medications()
        for raw in record.raw_of_type("Medication"):
            known.add(raw)
        for item in scope:
            decision = decide(self.policies, item.policy, item.match, item.order, facts, record,
                              today=self._today(), medications=known)
            result.decisions.append(decision)
            if not decision.decided:
                continue
            assertion_id = new_assertion_id()
            extension = coverage_information(
                decision,
                assertion_id=assertion_id,
                date=today,
                coverage_reference=item.order.insurance[0] if item.order.insurance else coverage_ref,
                billing_code=self._billing_code(item),
                prior_authorization=item.policy.prior_authorization,
                advisory_only=advisory_only,
            )
            base = annotated.get(item.order.reference, dict(item.order.raw))
            annotated[item.order.reference] = annotated_order(base, extension)
            if show_cards:
                card = self.renderer.card(
                    decision,
                    order_label=f"{item.match.trigger.label} ({item.order.code.label()})",
                    payer_name=self.settings.payer_name,
                    policy_url=self.policy_url(item.policy, base_url),
                    advisory_only=advisory_only,
                )
                cards.append(card)
                result.card_decisions[card["uuid"]] = assertion_id
        for reference, resource in annotated.items():
            actions.append({
                "type": "update",
                "description": f"Add coverage information to {reference}",
                "resource": resource,
            })
        result.response = {"cards": cards, **({"systemActions": actions} if actions else {})}
        return result

    def policy_url(self, policy: Policy, base_url: str) -> str:
        base = (self.settings.public_base_url or base_url).rstrip("/")
        return f"{base}/policies/{policy.id}"

    def _coverage_reference(self, record: PatientRecord) -> str | None:
        """The patient's active Coverage, for the coverage-information extension (it is not evidence
        for a decision, so it is read without validating the resource)."""
        for coverage in record.raw_of_type("Coverage"):
            if coverage.get("status") in (None, "active") and isinstance(coverage.get("id"), str):
                return f"Coverage/{coverage['id']}"
        return None

    def _billing_code(self, item: InScope) -> Mapping[str, str] | None:
        systems = self.policies.systems
        for coding in item.order.code.codings:
            if coding.system in _BILLING_SYSTEMS and item.match.trigger.code_in.contains(coding):
                billing = {"system": systems.get(coding.system).canonical, "code": coding.code}
                if coding.display:
                    billing["display"] = coding.display
                return billing
        return None

"""The coverage requirements service without its web layer: discovery, and answering a hook request
with cards and coverage-information systemActions, in the CRD version the request asks for. The web
layer and the offline ``evaluate`` command both call this."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from ..config import Config
from ..dtr import evidence as form_evidence
from ..dtr.documentation import DocumentationForms
from ..dtr.extract import Documentation, amend, conflicts, extract, sources
from ..engine.context import DECISION_CHECKS
from ..engine.decision import Decision, Gap
from ..engine.evaluate import decide
from ..engine.orders import ORDER_TYPES, Medications, OrderFacts, medications_from, order_facts
from ..engine.policy import Policy, PolicySet, TriggerMatch, load_policies
from ..engine.requirements import COVERAGE_NEED_KEY, data_needs, prefetch_templates
from ..fhir import client as fhir_client
from ..fhir.bundles import is_operation_outcome
from ..fhir.client import CallBudget, FhirClient, FhirPool, ReadLimits
from ..fhir.gather import ClientFactory, DataNeed, Reads, gather_record, read_needs
from ..fhir.record import PatientRecord
from ..paths import data_dir
from ..urls import Allowlist, fhir_server_problem
from .cards import CardRenderer
from .coverage_info import (
    UNKNOWN_COVERAGE,
    annotated_order,
    coverage_information,
    new_assertion_id,
    not_assessed_information,
    with_policy_versions,
)
from .crd_orders import missing_required
from .hook_orders import (
    Decidable,
    appointment_decidables,
    based_on_service_requests,
    reference_of,
    resolve,
    type_and_id,
)
from .payer import PayerIdentifier, payer_problem
from .reading import as_r4_lists, check_order, unreadable_decision, valid_r4
from .request import HookRequest, RequestError, parse_hook_request
from .scopes import parse_scopes
from .versions import declared

SERVICES = {
    "coverage-requirements-order-select": "order-select",
    "coverage-requirements-order-sign": "order-sign",
    "coverage-requirements-order-dispatch": "order-dispatch",
    "coverage-requirements-appointment-book": "appointment-book",
}
#: CRD "primary" hooks: the answer always carries ``systemActions`` (the Coverage Information response type)
PRIMARY_HOOKS = frozenset({"order-sign", "order-dispatch", "appointment-book"})
_BILLING_SYSTEMS = {"cpt", "hcpcs"}
#: decisions x record resources above which deciding leaves the event loop (a typical call is far below)
_INLINE_WORK = 2000
#: what an HTTP Authorization Bearer credential may hold (RFC 6750 section 2.1)
_BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
#: prefetch of the resources a hook names by reference (CDS Hooks 3.0 FHIRPath tokens, CRD 2.2 style)
_REFERENCED_PREFETCH = {
    "order-dispatch": {
        name: f"{rtype}?_id={{{{context.dispatchedOrders.resolve().ofType({rtype}).id}}}}"
        for name, rtype in (("dispatchedServiceRequests", "ServiceRequest"),
                            ("dispatchedDeviceRequests", "DeviceRequest"),
                            ("dispatchedMedicationRequests", "MedicationRequest"))
    },
    "appointment-book": {
        "basedOnServiceRequests": "ServiceRequest?_id={{context.appointments.entry.resource.ofType(Appointment)"
                           ".basedOn.resolve().ofType(ServiceRequest).id}}",
    },
}
_WHAT = {
    "order-select": "draft orders (advisory only: no documentation requests on order-select)",
    "order-sign": "draft orders",
    "order-dispatch": "orders dispatched to a performer",
    "appointment-book": "booked appointments (the ServiceRequest an appointment is based on, or the service it "
                        "books)",
}



def _usage_requirements(prefetch: Mapping[str, str]) -> str:
    """What discovery asks of an EHR: the resource types its prefetch templates search (the same searches run
    on the FHIR server when the prefetch lacks them), and the Medications their ``_include`` brings."""
    types = list(dict.fromkeys(query.split("?", 1)[0] for query in prefetch.values()))
    if any(":medication" in query for query in prefetch.values()):
        types.append("Medication")
    listed = ", ".join(types[:-1]) + " and " + types[-1] if len(types) > 1 else "".join(types)
    return ("Send the prefetch keys advertised here, or fhirServer with fhirAuthorization granting search of "
            f"{listed} for the patient (SMART v1 '.read' or v2 '.rs' scopes). Without either, a request with an "
            "order in scope is answered with HTTP 412. CRD 2.2 answers need extension.davinci-crd.requestedVersion "
            "= \"2.2\"; without it the answer follows CRD 2.0.1.")


def observe_fhir_reads(observer: Callable[[str, float], None]) -> None:
    """Have ``observer(outcome, seconds)`` called after every search of an EHR's FHIR server (the metrics)."""
    if observer not in fhir_client.read_observers:
        fhir_client.read_observers.append(observer)

@dataclass(frozen=True)
class Settings:
    """What the service takes from the configuration (see :meth:`CoverageService.from_config`)."""

    payer_name: str = "Example Health Plan"
    public_base_url: str | None = None
    fhir_timeout_seconds: float = 3.0
    allow_http: bool = False
    contact_fhir_servers: bool = True
    fhir_limits: ReadLimits = field(default_factory=ReadLimits)
    #: hook-13 (CRD 2.2 requests): the payers this deployment handles; empty: every Coverage is ours
    payer_identifiers: tuple[PayerIdentifier, ...] = ()


@dataclass(frozen=True)
class IssuedCard:
    """A card as sent, the decision behind it, and the coverage assertion its order's coverage information
    carries (feedback on the card is linked to the decision through it)."""

    card: dict[str, Any]
    decision: Decision
    assertion_id: str


@dataclass(frozen=True)
class DocumentationContext:
    """What a DTR ``$questionnaire-package`` request will need of a conditional decision with a form, kept
    by its coverage-assertion-id: the policy, the form, the patient, the order, and ``context`` (the form's
    version, the sections, what was missing, the answers pre-filled from the record)."""

    assertion_id: str
    policy_id: str
    form_id: str
    patient_id: str
    order_reference: str
    context: Mapping[str, Any]


@dataclass(frozen=True)
class HookResult:
    """What one hook call issued: the response to send and, for the audit and the metrics, every decision,
    each card with its decision, and the documentation contexts of the decisions that point to a form."""

    response: dict[str, Any]
    request: HookRequest
    decisions: list[Decision] = field(default_factory=list)
    cards: list[IssuedCard] = field(default_factory=list)
    dtr_contexts: list[DocumentationContext] = field(default_factory=list)

    @property
    def crd_version(self) -> str:
        """The CRD version the answer follows (for the audit)."""
        return self.request.version.label

    @property
    def orders(self) -> list[str]:
        """The orders of the call, as ``type/id`` (for order-dispatch, the dispatched orders as read)."""
        return [f"{o.get('resourceType', '?')}/{o.get('id')}" for o in self.request.draft_orders]


@dataclass(frozen=True)
class InScope:
    """An order a policy governs: the policy, how its trigger matched, the order as read, and what its coverage
    information is added to when not the order itself (an Appointment that books a service)."""

    policy: Policy
    match: TriggerMatch
    order: OrderFacts
    #: what the coverage information is added to, when not the order itself
    target: Mapping[str, Any] | None = None


@dataclass
class Scope:
    """The orders as read (single objects read as lists), the orders in scope of a policy, and what the
    reading noted per order reference."""

    items: list[InScope]
    facts: list[OrderFacts]
    notes: dict[str, list[str]]
    #: Medication resources an order may reference (the request's bundle and prefetch)
    medications: Medications = field(default_factory=Medications)
    #: per order reference, the resource its coverage information is added to when not the order itself
    targets: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    #: completed documentation forms (DTR) of the patient: what they add, per order what they added to it
    #: (form reference, finding) and, per order reference or policy id, where they contradict the record
    documentation: Documentation = field(default_factory=Documentation)
    amended: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    conflicts: dict[str, list[Gap]] = field(default_factory=dict)


@dataclass(frozen=True)
class FhirAccessPlan:
    """How the EHR's FHIR server may be read for one request: a client factory, or why not."""

    factory: ClientFactory | None
    problem: str | None
    #: what the whole call may still read (every client the factory makes, and the completed forms' reader)
    budget: CallBudget | None = None


class CoverageService:
    """The coverage requirements service without HTTP, for one generation of the policy files: discovery, and
    :meth:`handle`, which answers a hook call (see README, "A hook call, step by step"). The web layer, the
    command line, the benchmark and the tests build it with :meth:`from_config`; a policy reload builds a new
    one and swaps it in whole."""

    def __init__(self, policies: PolicySet, cards_dir: Path, settings: Settings,
                 transport: httpx.AsyncBaseTransport | None = None,
                 today: Callable[[], dt.date] | None = None, fhir_pool: FhirPool | None = None) -> None:
        self.policies = policies
        self.settings = settings
        self.renderer = CardRenderer(cards_dir)
        self.documentation = DocumentationForms.load(policies)
        self.all_needs = data_needs(policies.policies, policies.systems)
        self.coverage_needs = [n for n in self.all_needs if n.key == COVERAGE_NEED_KEY]
        self._needs: dict[tuple[str, ...], list[DataNeed]] = {}
        #: the process's connections to FHIR servers (one TLS context, keep-alive pools per origin)
        self.fhir_pool = fhir_pool or FhirPool(transport=transport)
        self._today = today or (lambda: dt.datetime.now(dt.UTC).date())

    async def aclose(self) -> None:
        """Close the FHIR connections (at shutdown)."""
        await self.fhir_pool.aclose()

    @classmethod
    def from_config(cls, config: Config, *, policies_dir: Path | None = None, cards_dir: Path | None = None,
                    policies: PolicySet | None = None, offline: bool = False,
                    transport: httpx.AsyncBaseTransport | None = None, fhir_pool: FhirPool | None = None,
                    today: Callable[[], dt.date] | None = None) -> CoverageService:
        """The service a configuration describes. Its policy files are ``policies`` (loaded already), else
        those in ``policies_dir`` (a policy generation's copy), else the configured or packaged ones, loaded
        strictly (raises PolicyError); likewise its card templates. ``offline``: never read an EHR's FHIR
        server (``cds-service evaluate`` and ``policy check``). ``fhir_pool``: the process's FHIR connections,
        shared with the service of the previous policy generation. ``transport``, ``today``: for tests."""
        service = config.service
        settings = Settings(
            payer_name=service.payer_name,
            public_base_url=service.public_base_url,
            fhir_timeout_seconds=config.fhir.timeout_seconds,
            allow_http=config.fhir.allow_http,
            contact_fhir_servers=not offline,
            fhir_limits=ReadLimits(config.fhir.max_total_bytes, config.fhir.max_resources),
            payer_identifiers=tuple(PayerIdentifier.parse(t) for t in service.payer_identifiers),
        )
        if policies is None:
            policies = load_policies(policies_dir or data_dir("policies", service.policies_dir))
        return cls(policies, cards_dir or data_dir("cards", service.cards_dir), settings, transport=transport,
                   today=today, fhir_pool=fhir_pool)

    # --- discovery --------------------------------------------------------------------------

    def discovery(self) -> dict[str, Any]:
        titles = ", ".join(f"{p.id} ({p.title})" for p in self.policies.policies)
        templates = prefetch_templates(self.all_needs)
        services = []
        for service_id, hook in SERVICES.items():
            prefetch = {**_REFERENCED_PREFETCH.get(hook, {}), **templates,
                        **({form_evidence.PREFETCH_KEY: form_evidence.QUERY} if hook != "order-select" else {})}
            services.append({
                "hook": hook,
                "id": service_id,
                "title": f"{self.settings.payer_name} coverage requirements ({hook})",
                "description": (
                    f"Coverage information for {_WHAT[hook]} under medical policies {titles}: a Da Vinci CRD "
                    "coverage-information systemAction per order in scope, an External Reference card with "
                    "the policy, and an Instructions card when something must be done or documented."
                ),
                "prefetch": prefetch,
                "usageRequirements": _usage_requirements(prefetch),
                "extension": {
                    "davinci-crd.version": declared(),
                    "davinci-crd.configuration-options": [
                        {
                            "code": "coverage-info",
                            "type": "boolean",
                            "name": "Coverage information",
                            "description": "Return the coverage cards (External Reference, Instructions) and, "
                                           "for CRD 2.2 requests, the coverage-information systemActions for "
                                           "each order in scope (for CRD 2.0 requests the systemActions are "
                                           "always returned).",
                            "default": True,
                        }
                    ],
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

    def fhir_access(self, request: HookRequest, fhir_server_allowlist: Allowlist | None) -> FhirAccessPlan:
        if not self.settings.contact_fhir_servers:
            return FhirAccessPlan(None, "offline evaluation does not contact FHIR servers")
        if request.fhir is None or not request.fhir.access_token:
            return FhirAccessPlan(None, "the request has no fhirServer and fhirAuthorization")
        if not _BEARER_TOKEN.fullmatch(request.fhir.access_token):
            return FhirAccessPlan(None, "fhirAuthorization.access_token is not a bearer token (RFC 6750 b64token): "
                                        "it cannot be sent to the FHIR server")
        problem = fhir_server_problem(request.fhir.server, self.settings.allow_http, fhir_server_allowlist)
        if problem is not None:
            return FhirAccessPlan(None, problem)
        access = request.fhir
        budget = CallBudget(self.settings.fhir_limits, self.settings.fhir_timeout_seconds)

        def factory() -> FhirClient:
            return FhirClient(access.server, access.access_token, self.settings.fhir_timeout_seconds,
                              limits=self.settings.fhir_limits, pool=self.fhir_pool, call=budget)

        return FhirAccessPlan(factory, None, budget)

    async def decidables(self, request: HookRequest, access: FhirAccessPlan) -> list[Decidable]:
        """The resources the policies decide for this hook (see hook_orders)."""
        scopes = parse_scopes(request.fhir.scope if request.fhir else None)
        if request.dispatched is not None:
            request.draft_orders = await resolve(request.dispatched, request.prefetch, access.factory,
                                                 access.problem, scopes)
            return [Decidable(r) for r in request.draft_orders]
        if request.hook == "appointment-book":
            refs = [r for a in request.draft_orders if a.get("resourceType") == "Appointment"
                    for r in based_on_service_requests(a)]
            found = await resolve(refs, request.prefetch, access.factory, access.problem, scopes) if refs else []
            by_ref = {reference_of(r): r for r in found}
            return appointment_decidables(request.draft_orders, by_ref, request.patient_id)
        return [Decidable(r) for r in request.draft_orders]

    def in_scope(self, request: HookRequest, decidables: Sequence[Decidable] | None = None,
                 fetched: Sequence[Mapping[str, Any]] = (), documentation: Documentation | None = None) -> Scope:
        """The orders of the request as the policies read them, and those in scope of a policy. ``fetched``:
        Medication resources read from the FHIR server (for references the request could not resolve);
        ``documentation``: completed forms, which add to an order what it does not state."""
        systems = self.policies.systems
        items = [Decidable(r) for r in request.draft_orders] if decidables is None else decidables
        bundle: list[Mapping[str, Any]] = []
        targets: dict[str, Mapping[str, Any]] = {}
        notes: dict[str, list[str]] = {}
        for item in items:
            read, found = as_r4_lists(item.resource)
            bundle.append(read)
            if found:
                notes[reference_of(read)] = found
            if item.target is not None:
                targets[reference_of(read)] = item.target
        medications = medications_from([request.context.get("draftOrders"), *request.prefetch.values(), *fetched])
        facts = [order_facts(systems, r, medications) for r in bundle if r.get("resourceType") in ORDER_TYPES]
        amended: dict[str, list[tuple[str, str]]] = {}
        order_conflicts: dict[str, list[Gap]] = {}
        for order in facts if documentation is not None else []:
            assert documentation is not None
            if order.reference in documentation.amendments:
                amended[order.reference], order_conflicts[order.reference] = amend(
                    order, documentation.amendments[order.reference], systems)
        selected = facts
        if request.selections is not None:
            chosen = {type_and_id(s) for s in request.selections}
            selected = [f for f in facts if f.id and f.reference in chosen]
        found_items = []
        for order in selected:
            for policy in self.policies.policies:
                match = policy.trigger_for(order, facts)
                if match is not None:
                    found_items.append(InScope(policy, match, order, targets.get(order.reference)))
        return Scope(found_items, facts, notes, medications, targets, documentation or Documentation(), amended,
                     order_conflicts)

    async def documented(self, request: HookRequest, access: FhirAccessPlan, base_url: str) -> Documentation:
        """What the patient's completed documentation forms add (DTR: the loop closes). Read from the
        prefetch, else from the FHIR server before the record (what they add to an order decides which
        policy governs it), within a share of the call's read limits: a third of the time, an eighth of the
        bytes and resources; never when the token's scope does not grant it."""
        factory = None
        fhir = request.fhir
        scopes = parse_scopes(fhir.scope if fhir else None)
        if access.factory is not None and fhir is not None and scopes.allows_search("QuestionnaireResponse"):
            limits = self.settings.fhir_limits
            share = ReadLimits(max(1, limits.max_total_bytes // 8), max(1, limits.max_resources // 8))

            def factory() -> FhirClient:
                assert fhir is not None
                return FhirClient(fhir.server, fhir.access_token, self.settings.fhir_timeout_seconds / 3,
                                  limits=share, pool=self.fhir_pool, call=access.budget)

        responses, notes = await form_evidence.read_responses(request.prefetch, request.patient_id, factory)
        found, more = sources(responses, self.documentation.forms, self.settings.public_base_url or base_url,
                              request.patient_id)
        documentation = extract(found, request.patient_id, self.policies.systems)
        documentation.notes = [*notes, *more]
        return documentation

    async def fetch_medications(self, scope: Scope, access: FhirAccessPlan) -> list[Mapping[str, Any]]:
        """The Medications that draft orders reference but neither the request nor the prefetch holds, read
        from the EHR's FHIR server with the hook's token (a prefetch cannot resolve them). A reference that
        cannot be read stays unresolved: a decision that depends on the drug then asks to confirm it."""
        if access.factory is None:
            return []
        ids = sorted({type_and_id(f.drug.unresolved_reference).split("/", 1)[1] for f in scope.facts
                      if f.drug is not None and f.drug.unresolved_reference
                      and type_and_id(f.drug.unresolved_reference).startswith("Medication/")})
        ids = [i for i in ids if _FHIR_ID.fullmatch(i)][:50]
        if not ids:
            return []
        async with access.factory() as client:
            found = await client.search_all({"medications": "Medication?_id=" + ",".join(ids)})
        result = found.get("medications")
        return [r for r in result if r.get("resourceType") == "Medication"] if isinstance(result, list) else []

    def unreadable(self, scope: Scope) -> dict[str, list[str]]:
        """Per in-scope order reference: faults on elements the decision reads (the order is decided
        as unreadable). Faults on other elements are noted and otherwise ignored."""
        systems = self.policies.systems
        out: dict[str, list[str]] = {}
        for item in scope.items:
            reference = item.order.reference
            if reference in out:
                continue
            check = check_order(item.order.raw, lambda raw: order_facts(systems, raw, scope.medications))
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

    def denied(self, request: HookRequest, needs: Sequence[DataNeed], access: FhirAccessPlan) -> list[DataNeed]:
        """The needs the server would have to answer but the token's scope does not grant a search for."""
        scopes = parse_scopes(request.fhir.scope if request.fhir else None)
        return [n for n in needs if access.factory is not None and not scopes.allows_search(n.resource_type)
                and (n.key not in request.prefetch or is_operation_outcome(request.prefetch[n.key]))]

    async def read_ahead(self, request: HookRequest, needs: Sequence[DataNeed],
                         access: FhirAccessPlan) -> dict[str, Any]:
        """The record's server searches, made while the completed forms are read (their answers can change
        which policy governs an order: :meth:`gather` then makes what is still missing)."""
        denied = self.denied(request, needs, access)
        return await read_needs([n for n in needs if n not in denied], request.prefetch, request.patient_id,
                                access.factory)

    async def gather(self, request: HookRequest, needs: Sequence[DataNeed], access: FhirAccessPlan,
                     documented: Mapping[str, Any] | None = None, already: Reads | None = None) -> PatientRecord:
        """The record for ``needs``; a search the token's scope does not grant is not made (the data is
        then unavailable, saying why). ``documented``: resources completed forms gave, read first (so that a
        confirmation of a diagnosis comes before the provisional one it confirms). ``already``: searches
        made ahead (:meth:`read_ahead`)."""
        denied = self.denied(request, needs, access)
        prefetch = {"_documentation": documented, **request.prefetch} if documented else request.prefetch
        record = await gather_record([n for n in needs if n not in denied], prefetch, request.patient_id,
                                     access.factory, access.problem, DECISION_CHECKS, already)
        for need in denied:
            record.mark_unavailable(need.resource_type, "the access token's scope does not allow reading it")
        return record

    def check_payer(self, request: HookRequest, record: PatientRecord) -> None:
        """hook-13 (CRD 2.2, payer identifiers configured): 400 unless the primary Coverage is ours."""
        if not request.version.checks_payer or not self.settings.payer_identifiers:
            return
        if "Coverage" in record.unavailable and request.fhir is not None and request.fhir.access_token:
            request.notes.append("the patient's Coverage could not be read, so whose member this is was not "
                                 f"checked ({record.unavailable['Coverage']})")
            return
        problem = payer_problem(record.raw_of_type("Coverage"), self.settings.payer_identifiers)
        if problem is not None:
            raise RequestError(f"not a member of a payer this service handles: {problem}")

    async def handle(self, service_id: str, body: Any, base_url: str,
                     fhir_server_allowlist: Allowlist | None = None) -> HookResult:
        """Answer one hook call. Raises RequestError (4xx) and DataUnavailable (412)."""
        request = self.parse(service_id, body)
        access = self.fhir_access(request, fhir_server_allowlist)
        decidables = await self.decidables(request, access)
        scope = self.in_scope(request, decidables)
        fetched = await self.fetch_medications(scope, access)
        if fetched:
            scope = self.in_scope(request, decidables, fetched)
        ahead: asyncio.Task[dict[str, Any]] | None = None
        if scope.items and request.hook != "order-select":
            if access.factory is not None:
                guess = list({item.policy.id: item.policy for item in scope.items}.values())
                ahead = asyncio.create_task(self.read_ahead(request, self.needs_for(guess), access))
            try:
                documentation = await self.documented(request, access, base_url)
            except BaseException:
                if ahead is not None:
                    ahead.cancel()
                raise
            if documentation.sources or documentation.notes:
                scope = self.in_scope(request, decidables, fetched, documentation)
        already = await ahead if ahead is not None else None
        unreadable = self.unreadable(scope) if scope.items else {}
        readable = [item.policy for item in scope.items if not unreadable[item.order.reference]]
        policies = list({policy.id: policy for policy in readable}.values())
        record = None
        if policies:
            documented = scope.documentation.bundle() if scope.documentation.resources else None
            record = await self.gather(request, self.needs_for(policies), access, documented, already)
            if scope.documentation.sources:
                for source, gap in conflicts(scope.documentation, record, self.policies.systems):
                    scope.conflicts.setdefault(source.form.policy_id, []).append(gap)
        if request.version.checks_payer and self.settings.payer_identifiers:
            if record is None:
                record = await self.gather(request, self.coverage_needs, access)
            self.check_payer(request, record)
        if not scope.items and request.hook not in PRIMARY_HOOKS:
            return HookResult(self._answer([], [], request.hook), request)
        record = record or PatientRecord()
        for medication in record.raw_of_type("Medication"):  # read from the FHIR server with the record
            scope.medications.add(medication)
        if len(scope.items) * (record.size() + 1) < _INLINE_WORK:
            return self.respond(request, scope, unreadable, record, base_url)
        # a large decision runs in a worker thread, so that the event loop keeps answering other calls
        return await asyncio.to_thread(self.respond, request, scope, unreadable, record, base_url)

    @staticmethod
    def _answer(cards: list[dict[str, Any]], actions: list[dict[str, Any]], hook: str) -> dict[str, Any]:
        """CDS Hooks response: ``systemActions`` only when there are some, except on the primary hooks,
        where CRD requires the field (then possibly empty)."""
        return {"cards": cards, **({"systemActions": actions} if actions or hook in PRIMARY_HOOKS else {})}

    def respond(self, request: HookRequest, scope: Scope, unreadable: Mapping[str, list[str]],
                record: PatientRecord, base_url: str) -> HookResult:
        """Decide every in-scope order and answer: per decided order a coverage information update and its
        cards; on the primary hooks, coverage information for every other order too (hook-16)."""
        version = request.version
        advisory_only = request.hook == "order-select"
        wanted = request.configuration.get("coverage-info", True) is not False
        today = self._today().isoformat()
        coverage = self._coverage_reference(record)
        decisions: list[Decision] = []
        cards: list[IssuedCard] = []
        contexts: list[DocumentationContext] = []
        annotated: dict[str, dict[str, Any]] = {}
        for item in scope.items:
            decision = self._decide(item, scope, unreadable, record)
            shown_notes = list(decision.notes)
            decision.notes.extend([*request.notes, *scope.notes.get(item.order.reference, [])])
            decisions.append(decision)
            if not decision.decided:
                continue
            assertion_id = new_assertion_id()
            order_coverage = {"reference": item.order.insurance[0]} if item.order.insurance else coverage
            policy_url = self.policy_url(item.policy, base_url)
            link = self.documentation.link(decision, self.settings.public_base_url or base_url, advisory_only)
            extension = coverage_information(
                decision,
                version=version,
                assertion_id=assertion_id,
                date=today,
                coverage=order_coverage,
                billing_code=self._billing_code(item),
                prior_authorization=item.policy.prior_authorization,
                advisory_only=advisory_only,
                policy_url=policy_url,
                questionnaire=link.canonical if link is not None else None,
            )
            if link is not None:
                contexts.append(DocumentationContext(
                    assertion_id, item.policy.id, link.form.id, request.patient_id, decision.order_reference,
                    self.documentation.context(decision, link, record, order_coverage)))
            target = item.target if item.target is not None else item.order.raw
            reference = decision.order_reference
            annotated[reference] = annotated_order(annotated.get(reference, dict(target)), extension)
            if wanted:
                cards.extend(IssuedCard(card, decision, assertion_id) for card in self.renderer.cards(
                    decision,
                    trigger_label=item.match.trigger.label,
                    order_label=f"{item.match.trigger.label} ({item.order.code.label()})",
                    payer_name=self.settings.payer_name,
                    policy_url=policy_url,
                    advisory_only=advisory_only,
                    topic=version.card_topic,
                    coverage_known=order_coverage is not UNKNOWN_COVERAGE,
                    notes=shown_notes,
                    documentation_form=link.line if link is not None else None,
                ))
        if request.hook in PRIMARY_HOOKS:
            self._not_assessed(request, scope, decisions, annotated, coverage, today, record.unavailable)
        actions = []
        if wanted or not version.configuration_covers_system_actions:
            actions = [{"type": "update", "description": f"Add coverage information to {reference}",
                        "resource": resource} for reference, resource in annotated.items()]
        return HookResult(self._answer([c.card for c in cards], actions, request.hook), request, decisions,
                          cards, contexts)

    def _not_assessed(self, request: HookRequest, scope: Scope, decisions: Sequence[Decision],
                      annotated: dict[str, dict[str, Any]], coverage: Mapping[str, Any], today: str,
                      unavailable: Mapping[str, str]) -> None:
        """Coverage information for every other order of a primary hook (CRD hook-16): no policy of this
        service assesses it, said as such, with nothing asked of the clinician. When the EHR's data could not
        be read for this call, that is said too, as the version's technical answer (CRD 2.2.1 resp-43)."""
        unread = "; ".join(f"{rtype} data could not be read ({why})" for rtype, why in sorted(unavailable.items()))
        ids = ", ".join(p.id for p in self.policies.policies)
        why = {d.order_reference: d for d in decisions if not d.decided and d.reason}
        versions = [p.version for p in self.policies.policies]
        for order in scope.facts:
            reference = order.reference
            target = scope.targets.get(reference)
            shown = reference_of(target) if target is not None else reference
            resource = target if target is not None else order.raw
            if shown in annotated or not order.id or not valid_r4(resource) or missing_required(resource):
                continue  # not valid FHIR, or not a CRD order: it cannot be returned changed only by the extension
            reason = (f"Not assessed by this service: {why[reference].reason}" if reference in why else
                      f"Not assessed by this service, which decides coverage under medical policies {ids} only; "
                      "none of them applies to this order.")
            reason = with_policy_versions(reason + " Coverage depends on the member's benefits and the payer's "
                                          "other policies.",
                                          [why[reference].policy_version] if reference in why else versions)
            extension = not_assessed_information(
                version=request.version, assertion_id=new_assertion_id(), date=today,
                coverage={"reference": order.insurance[0]} if order.insurance else coverage,
                reason=f"{reason} Also: {unread}." if unread else reason, technical=bool(unread))
            annotated[shown] = annotated_order(target if target is not None else order.raw, extension)

    def _decide(self, item: InScope, scope: Scope, unreadable: Mapping[str, list[str]],
                record: PatientRecord) -> Decision:
        """One policy's decision on one order; for a resource decided through another's view (an
        Appointment booking a service), the decision names the resource the EHR sent."""
        reference = item.order.reference
        if unreadable[reference]:
            decision = unreadable_decision(item.policy.id, item.policy.title, reference, unreadable[reference])
            decision.policy_version = item.policy.version
        else:
            found = [*scope.conflicts.get(reference, []), *scope.conflicts.get(item.policy.id, [])]
            decision = decide(self.policies, item.policy, item.match, item.order, scope.facts, record,
                              today=self._today(), medications=scope.medications, conflicts=found)
            if scope.documentation.sources:
                form_evidence.cite(decision, scope.documentation, scope.amended.get(reference, []))
            decision.notes.extend(scope.documentation.notes)
        if item.target is not None:
            target = reference_of(item.target)
            decision.order_reference = target
            decision.evidence = [replace(e, reference=target) if e.reference == reference else e
                                 for e in decision.evidence]
            decision.notes.append(f"{target} books the service decided here (read as {reference})")
        return decision

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
            if coding.system in _BILLING_SYSTEMS and item.match.trigger.code_in.contains(coding):
                billing = {"system": systems.get(coding.system).canonical, "code": coding.code}
                if coding.display:
                    billing["display"] = coding.display
                return billing
        return None

"""The HTTP interface (Starlette): discovery, hook endpoints, feedback, health, policy texts.

Errors are part of the interface: a malformed or misshapen request gets a 4xx with a JSON
OperationOutcome; nothing the client sends causes a 5xx or a stack trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hmac
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from ..auth.jwt import AuthError, JwtAuthenticator, Principal
from ..config import Config, ConfigError, metrics_token
from ..errors import ServiceError
from ..hooks.feedback import parse_feedback
from ..hooks.generations import Generation, RunDirectory
from ..hooks.policy_page import CONTENT_SECURITY_POLICY, policy_page
from ..hooks.request import RequestError, stored_request
from ..hooks.service import SERVICES, CoverageService, HookResult, observe_fhir_reads
from ..jsonutil import JSONDecodeError, JSONTooDeep, dumps, loads
from ..observability import logs, metrics
from ..observability.labels import auth_refusal_label, override_reason_label, service_label
from ..storage.dtr_contexts import context_row
from ..storage.replay import ReplayGuard
from ..storage.store import AuditRecord, Store
from ..urls import is_loopback
from . import dtr
from .errors import BodyTooLarge, Unauthorized, error_response, http_error, internal_error, server_error
from .reloading import POLL_SECONDS, PolicyFollower

log = logging.getLogger("cds_service.web")


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The request body, refusing (without reading it all) anything over ``limit`` bytes, and a body that
    does not arrive within ``timeout`` seconds (408) or ends early because the client went away (400)."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            if int(length) > limit:
                raise BodyTooLarge(limit)
        except ValueError:
            raise BodyTooLarge(limit) from None
    chunks = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge(limit)
                chunks.append(chunk)
    except TimeoutError:
        raise RequestError(f"the request body did not arrive within {timeout:g} s", status=408,
                           code="timeout") from None
    except ClientDisconnect:
        raise RequestError("the client disconnected before the request body was complete") from None
    return b"".join(chunks)


def json_response(body: Any, status: int = 200) -> Response:
    return Response(dumps(body), status_code=status, media_type="application/json")


#: a request that carries one of these came through a proxy: it is not taken as local for /metrics
_PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")
SPOOL_FIGURES_SECONDS = 2.0  # the longest a scrape waits for the audit spool's figures


class CdsApp:
    """The routes of the HTTP interface and what they share: the configuration, the store, the service now
    serving (swapped whole on a policy reload), the authenticator; authentication, body reading, the base URL."""

    def __init__(self, config: Config, store: Store, service: CoverageService,
                 authenticator: JwtAuthenticator | None, metrics_token: str | None = None) -> None:
        self.config = config
        self.store = store
        #: the policies and everything derived from them, replaced whole on a reload: a request reads it once
        self.service = service
        self.authenticator = authenticator
        self.metrics_token = metrics_token

    def swap(self, service: CoverageService) -> None:
        self.service = service

    def public_base(self, request: Request) -> str | None:
        """The base URL EHRs call: ``public_base_url``; without it, for a request that arrived on a loopback
        socket, that socket's address (never the Host or X-Forwarded-* headers, which the caller chooses)."""
        if self.config.service.public_base_url:
            return self.config.service.public_base_url.rstrip("/")
        server = request.scope.get("server")
        if server and is_loopback(server[0]) and server[1]:
            host = f"[{server[0]}]" if ":" in server[0] else server[0]
            return f"http://{host}:{server[1]}"
        return None

    def audiences(self, request: Request, *paths: str) -> list[str]:
        """The ``aud`` values a token for this request may carry: ``[auth] audiences``, else the endpoint's
        URL (each of ``paths``) under :meth:`public_base`; none when neither is known (every token fails)."""
        if self.config.auth.audiences:
            return list(self.config.auth.audiences)
        base = self.public_base(request)
        return [base + path for path in paths] if base else []

    def base_url(self, request: Request) -> str:
        return self.public_base(request) or str(request.base_url)

    async def authenticate(self, request: Request, *paths: str) -> Principal | None:
        """The caller, for a token whose audience is one of ``paths`` (default: this request's path); raises
        :class:`Unauthorized` (the reason logged and counted, never told)."""
        if self.authenticator is None:
            return None
        try:
            return await self.authenticator.authenticate(request.headers.get("authorization"),
                                                         self.audiences(request, *(paths or (request.url.path,))))
        except AuthError as error:
            log.warning("authentication failed: %s", error)
            metrics.JWT_REFUSALS.labels(auth_refusal_label(str(error))).inc()
            raise Unauthorized from None

    def known(self, service: CoverageService, service_id: str) -> None:
        """404 for a service id this service does not have."""
        if service.hook_of(service_id) is None:
            raise ServiceError(f"no service {service_id!r}", 404, "not-found")

    async def read_json(self, request: Request) -> tuple[bytes, Any]:
        """The body as received, and parsed."""
        body = await read_body(request, self.config.service.max_body_bytes,
                               self.config.server.body_read_timeout_seconds)
        if not body.strip():
            raise RequestError("the request body is empty; a JSON object is required")
        try:
            return body, loads(body)
        except JSONTooDeep as error:
            raise RequestError(f"the request body {error.msg}") from None
        except JSONDecodeError:
            raise RequestError("the request body is not valid JSON") from None

    # --- routes -------------------------------------------------------------------------------

    async def discovery(self, request: Request) -> Response:
        try:
            if not self.config.auth.discovery_public:
                await self.authenticate(request)
        except ServiceError as error:
            return error_response(error)
        return json_response(self.service.discovery())

    async def hook(self, request: Request) -> Response:
        started = time.perf_counter()
        received = dt.datetime.now(dt.UTC)
        service = self.service  # one policy generation answers the whole call
        service_id = request.path_params["service_id"]
        principal: Principal | None = None
        authenticated = False  # calls refused before (unknown service, no valid token) are not audited
        raw: bytes | None = None
        body: Any = None
        result: HookResult | None = None
        error_code: str | None = None
        try:
            self.known(service, service_id)
            principal = await self.authenticate(request)
            authenticated = True
            raw, body = await self.read_json(request)
            result = await service.handle(
                service_id, body, self.base_url(request),
                principal.fhir_server_allowlist if principal else None,
            )
            response = json_response(result.response)
        except ServiceError as error:
            error_code = error.code
            response = error_response(error)
        except Exception as error:  # a fault of the service's own: answered 500, and still audited and counted
            error_code = "exception"
            response = internal_error(f"{request.method} {request.url.path}", error)
        if authenticated:
            await self.audit(service_id, raw, body, result, principal, response, received, started)
        self.observe_hook(service_id, body, result, response, started, error_code)
        return response

    def observe_hook(self, service_id: str, body: Any, result: HookResult | None, response: Response,
                     started: float, error_code: str | None) -> None:
        """The call's metrics, and its one log line (ids, status, latency, decisions; never a token or PHI)."""
        latency = time.perf_counter() - started
        label = service_label(service_id, SERVICES)
        metrics.HOOK_CALLS.labels(label, str(response.status_code)).inc()
        metrics.HOOK_LATENCY.labels(label).observe(latency)
        decisions = result.decisions if result is not None else []
        for d in decisions:
            metrics.DECISIONS.labels(d.policy_id, d.outcome.value, d.rule_id).inc()
        logs.hook_call(
            service=label, hook=_text(body, "hook") if label != "unknown" else None,
            hook_instance=_text(body, "hookInstance"), status=response.status_code, latency_ms=latency * 1000,
            crd_version=result.crd_version if result is not None else None,
            decisions=[{"order": d.order_reference, "policy": d.policy_id, "policy_version": d.policy_version,
                        "outcome": d.outcome.value, "rule": d.rule_id} for d in decisions],
            error=error_code)

    async def audit(self, service_id: str, raw: bytes | None, body: Any, result: HookResult | None,
                    principal: Principal | None, response: Response, received: dt.datetime, started: float) -> None:
        """Hand the call's audit record to the store, as compact serialised JSON: the request as the service
        may keep it (``stored_request``), the response as sent, and what the service says it issued."""
        context = body.get("context") if isinstance(body, Mapping) else None
        record = AuditRecord(
            received_at=received,
            service_id=service_id,
            hook=_text(body, "hook"),
            hook_instance=_text(body, "hookInstance"),
            issuer=principal.issuer if principal else None,
            patient_id=_text(context, "patientId"),
            status_code=response.status_code,
            latency_ms=(time.perf_counter() - started) * 1000,
            orders=result.orders if result is not None else [],
            decisions=dumps([d.explain() for d in result.decisions] if result is not None else []),
            response=bytes(response.body) if response.body else None,
            request=stored_request(raw, body),
            cards=[{"card_uuid": c.card["uuid"], "hook_instance": result.request.hook_instance,
                    "coverage_assertion_id": c.assertion_id, "policy_id": c.decision.policy_id,
                    "order_reference": c.decision.order_reference, "outcome": c.decision.outcome.value,
                    "created_at": received} for c in result.cards] if result is not None else [],
            crd_version=result.crd_version if result is not None else None,
            dtr_contexts=[context_row(c.assertion_id, c.policy_id, c.form_id, c.patient_id, c.order_reference,
                                      c.context) for c in result.dtr_contexts] if result is not None else [],
        )
        await self.store.hand_off(record)

    async def feedback(self, request: Request) -> Response:
        service_id = request.path_params["service_id"]
        path = request.url.path
        try:
            self.known(self.service, service_id)
            principal = await self.authenticate(request, path, path.rsplit("/feedback", 1)[0])
            entries = parse_feedback((await self.read_json(request))[1])
        except ServiceError as error:
            return error_response(error)
        await self.store.record_feedback(service_id, entries, principal.issuer if principal else None)
        for entry in entries:
            metrics.FEEDBACK.labels(entry["outcome"], override_reason_label(entry)).inc()
        return Response(status_code=200)

    async def health(self, request: Request) -> Response:
        """Liveness: the process serves requests (it needs no database to answer hooks)."""
        return json_response({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        """Readiness: 503 while the database is unreachable, unresponsive or not at this code's schema;
        reports the audit backlog either way. Answers within a bound even when the database hangs."""
        report = await self.store.readiness()
        return json_response(report, status=200 if report["status"] == "ready" else 503)

    async def metrics_page(self, request: Request) -> Response:
        """The Prometheus metrics, to the clients ``[metrics] access`` admits."""
        try:
            if not self.config.metrics.enabled:
                raise ServiceError("metrics are turned off ([metrics] enabled = false)", 404, "not-found")
            self.metrics_access(request)
        except ServiceError as error:
            return error_response(error)
        figures = await self.audit_figures()
        body = await asyncio.to_thread(metrics.exposition, figures)
        return Response(body, media_type=metrics.CONTENT_TYPE_LATEST)

    def metrics_access(self, request: Request) -> None:
        """Raises unless ``[metrics] access`` admits this client (401 without a token, 403 otherwise)."""
        access = self.config.metrics.access
        peer = request.client.host if request.client else ""
        local = is_loopback(peer) and not any(h in request.headers for h in _PROXY_HEADERS)
        if access == "open" or local:
            return
        if access == "token" and self.metrics_token is not None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.metrics_token.encode()):
                return
            if not token:
                raise Unauthorized
            raise ServiceError("the metrics token is not valid", 403, "forbidden")
        raise ServiceError("metrics are served to local clients only ([metrics] access)", 403, "forbidden")

    async def audit_figures(self) -> metrics.AuditFigures | None:
        """What the audit spool holds and dropped, for the metrics; None without a spool, and only the
        drops' absence when it does not answer in time."""
        spool = self.store.spool
        if spool is None:
            return None
        try:
            status = await asyncio.wait_for(asyncio.to_thread(spool.status), SPOOL_FIGURES_SECONDS)
        except (TimeoutError, OSError):
            return metrics.AuditFigures()
        return metrics.AuditFigures(status.dropped, status.records, status.bytes, status.oldest_age_seconds())

    async def policy_text(self, request: Request) -> Response:
        policy = self.service.policies.get(request.path_params["policy_id"])
        if policy is None or policy.text_path is None:
            return error_response(ServiceError("no such policy", 404, "not-found"))
        page = policy_page(policy.id, policy.title, policy.text_path)
        return HTMLResponse(page, headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY,
                                           "X-Content-Type-Options": "nosniff"})


def _text(data: Any, key: str) -> str | None:
    if isinstance(data, Mapping) and isinstance(data.get(key), str):
        return str(data[key])
    return None


def _observe_fhir_read(outcome: str, seconds: float) -> None:
    metrics.FHIR_READS.labels(outcome).inc()
    metrics.FHIR_READ_LATENCY.labels(outcome).observe(seconds)


def create_app(config: Config, *, fhir_transport: httpx.AsyncBaseTransport | None = None,
               jwks_transport: httpx.AsyncBaseTransport | None = None, run_dir: Path | None = None) -> Starlette:
    """The web app. ``run_dir``: the run directory of ``cds-service serve`` (the app serves its policy
    generation and follows reloads); without it, the configured policy files, never reloaded."""
    follower: PolicyFollower | None = None
    generation: Generation | None = None
    if run_dir is None:
        service = CoverageService.from_config(config, transport=fhir_transport)
    else:
        run = RunDirectory(run_dir)
        generation = run.current()
        if generation is None:
            raise ConfigError(f"{run_dir}: no policy generation published (cds-service serve publishes the first)")

        first: list[CoverageService] = []

        def build(published: Generation) -> CoverageService:  # each generation keeps the process's FHIR connections
            return CoverageService.from_config(config, policies_dir=published.policies_dir,
                                               cards_dir=published.cards_dir, transport=fhir_transport,
                                               fhir_pool=first[0].fhir_pool if first else None)

        service = build(generation)
        first.append(service)
        if run.serving_pid() != os.getpid() and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a worker: reloads are asked of the serving process
    observe_fhir_reads(_observe_fhir_read)
    store = Store(config.storage.url, writer=config.storage.audit_writer, spool_dir=config.storage.spool_dir,
                  spool_max_bytes=config.storage.spool_max_bytes,
                  database_timeout=config.storage.database_timeout_seconds, require_database=False)
    replay = ReplayGuard(store.claim_jti)  # never waits long on the database (storage/replay.py)
    authenticator = JwtAuthenticator(config.auth, replay, jwks_transport) if config.auth.mode == "jwt" else None
    cds = CdsApp(config, store, service, authenticator, metrics_token(config.metrics))
    if run_dir is not None and generation is not None:
        follower = PolicyFollower(run, generation, build, cds.swap)

    async def housekeeping() -> None:
        """The audit queue gauge, and the policy generation (a few times a second)."""
        while True:
            metrics.AUDIT_QUEUE.set(store.audit_queued() or 0)
            if follower is not None:
                try:
                    await follower.poll()
                except OSError as error:
                    log.error("cannot read the policy generation in %s: %s", run_dir, error.strerror)
            await asyncio.sleep(POLL_SECONDS)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if follower is not None:
            follower.started()
        task = asyncio.create_task(housekeeping(), name="cds-housekeeping")
        try:
            yield
        finally:
            task.cancel()
            await cds.service.aclose()  # the process's FHIR connections
            if follower is not None:
                follower.stopped()
            replay.close()
            store.close()

    app = Starlette(
        routes=[
            Route("/cds-services", cds.discovery, methods=["GET"]),
            Route("/cds-services/{service_id}", cds.hook, methods=["POST"]),
            Route("/cds-services/{service_id}/feedback", cds.feedback, methods=["POST"]),
            Route("/health", cds.health, methods=["GET"]),
            Route("/health/ready", cds.ready, methods=["GET"]),
            Route("/metrics", cds.metrics_page, methods=["GET"]),
            Route("/policies/{policy_id}", cds.policy_text, methods=["GET"]),
            *dtr.routes(dtr.DtrRoutes(cds)),
        ],
        middleware=[
            Middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["GET", "POST", "OPTIONS"],
                       allow_headers=["Authorization", "Content-Type", "Accept"], max_age=600),
        ],
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )
    app.state.cds = cds
    return app

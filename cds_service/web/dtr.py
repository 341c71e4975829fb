"""The FHIR base of the documentation forms (Da Vinci DTR 2.2), on the same app under ``/fhir``:
``GET /fhir/metadata``, ``POST /fhir/Questionnaire/$questionnaire-package``, ``GET /fhir/Questionnaire/{id}``,
``GET /fhir/Questionnaire?url=``, ``GET|POST /fhir/ValueSet/$expand``.

The package operation takes the same JWT rules as the hooks (``aud`` = the operation's URL under
``public_base_url``; without authentication only on loopback, as the service itself): its answer holds the
payer's pre-filled answers, which are PHI and never logged. The form definitions (metadata, Questionnaire,
ValueSet) are public when discovery is (``[auth] discovery_public``), else they need a token too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any, Protocol

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..auth.jwt import Principal
from ..config import Config
from ..dtr.package import MAX_TEXT, PackageError, Packager, parse_input, patient_of
from ..errors import ServiceError
from ..hooks.service import CoverageService
from ..jsonutil import dumps
from ..storage.dtr_contexts import find_context
from ..storage.store import Store
from .errors import error_response

log = logging.getLogger("cds_service.web.dtr")
FHIR_JSON = "application/fhir+json"
#: a context written by this call's writer may lag the hook answer by a moment: wait this long for it
CONTEXT_WAIT_SECONDS = 1.5


def fhir_response(body: Any, status: int = 200) -> Response:
    return Response(dumps(body), status_code=status, media_type=FHIR_JSON)


class Host(Protocol):
    """What the routes use of the app they are part of (``web.app.CdsApp``)."""

    config: Config
    store: Store
    #: the service now serving (replaced whole by a policy reload)
    service: CoverageService

    async def authenticate(self, request: Request, *paths: str) -> Principal | None: ...

    async def read_json(self, request: Request) -> tuple[bytes, Any]: ...

    def base_url(self, request: Request) -> str: ...


class DtrRoutes:
    """The FHIR routes of the documentation forms (see the module), served from the service now serving."""

    def __init__(self, cds: Host) -> None:
        self.cds = cds
        self._packager: tuple[CoverageService, Packager] | None = None

    @property
    def packager(self) -> Packager:
        """The packager of the service now serving (a policy reload replaces the service, and its forms)."""
        service = self.cds.service
        if self._packager is None or self._packager[0] is not service:
            self._packager = (service, Packager(service.policies, service.documentation.forms,
                                                self.cds.config.service.payer_name))
        return self._packager[1]

    def base(self, request: Request) -> str:
        return str(self.cds.config.service.public_base_url or self.cds.base_url(request)).rstrip("/")

    async def _allowed(self, request: Request, public: bool) -> None:
        """Raises ``Unauthorized`` unless the caller may read this: a form definition (``public``) when
        discovery is public, else with a valid token."""
        if not (public and self.cds.config.auth.discovery_public):
            await self.cds.authenticate(request)

    async def metadata(self, request: Request) -> Response:
        try:
            await self._allowed(request, public=True)
        except ServiceError as error:
            return error_response(error)
        return fhir_response(self.packager.capability_statement(self.base(request)))

    async def read_questionnaire(self, request: Request) -> Response:
        try:
            await self._allowed(request, public=True)
            form = self.packager.forms.by_id(request.path_params["id"])
            if form is None:
                raise ServiceError("no such Questionnaire", 404, "not-found")
        except ServiceError as error:
            return error_response(error)
        return fhir_response(self.packager.questionnaire(form, self.base(request)))

    async def search_questionnaire(self, request: Request) -> Response:
        try:
            await self._allowed(request, public=True)
            url = request.query_params.get("url")
            if url is not None and len(url) > MAX_TEXT:
                raise ServiceError("url: too long")
        except ServiceError as error:
            return error_response(error)
        return fhir_response(self.packager.questionnaire_search(url, self.base(request)))

    async def expand(self, request: Request) -> Response:
        try:
            await self._allowed(request, public=True)
            url = request.query_params.get("url")
            if request.method == "POST":
                body = (await self.cds.read_json(request))[1]
                params = body.get("parameter") if isinstance(body, Mapping) else None
                named = [p for p in params if isinstance(p, Mapping) and p.get("name") == "url"] \
                    if isinstance(params, list) else []
                url = (named[0].get("valueUri") or named[0].get("valueCanonical")) if named else None
            if not isinstance(url, str) or not url or len(url) > MAX_TEXT:
                raise ServiceError("$expand needs the url of a ValueSet this service serves")
            found = self.packager.expand(url, self.base(request))
            if found is None:
                raise ServiceError(f"no ValueSet {url} is served here", 404, "not-found")
        except ServiceError as error:
            return error_response(error)
        return fhir_response(found)

    async def package(self, request: Request) -> Response:
        try:
            await self.cds.authenticate(request)
            _, body = await self.cds.read_json(request)
            parsed = parse_input(body)
            context = await self.context(parsed.context) if parsed.context else None
            if parsed.context and (context is None or not self._same_patient(parsed.coverage, context)):
                raise PackageError(f"no coverage assertion {parsed.context!r} is known for this Coverage's patient "
                                   "(unknown, or expired)", status=404, code="not-found")
            packager = self.packager  # one policy generation answers the whole call
            # the pre-fill evaluates FHIRPath over the stored chart: off the event loop, so no other call waits
            package = await run_in_threadpool(packager.package, parsed, context, self.base(request))
            return fhir_response(package)
        except ServiceError as error:
            return error_response(error)

    @staticmethod
    def _same_patient(coverage: Mapping[str, Any], context: Mapping[str, Any]) -> bool:
        patient = patient_of(coverage)
        stored = context.get("patient")
        return patient is None or stored is None or patient == f"Patient/{stored}"

    async def context(self, assertion_id: str) -> dict[str, Any] | None:
        """The stored context (its ``context`` document, with the patient id), waiting briefly for one the
        writer has not stored yet; 503 when the database does not answer."""
        store = self.cds.store
        deadline = asyncio.get_running_loop().time() + CONTEXT_WAIT_SECONDS
        while True:
            try:
                row = await asyncio.wait_for(asyncio.to_thread(find_context, store.engine, assertion_id),
                                             store.database_timeout)
            except Exception as error:
                log.error("documentation context store unavailable: %s", type(error).__name__)
                raise PackageError("the documentation context store is unavailable; try again", status=503,
                                   code="transient") from None
            if row is not None:
                return {**row["context"], "patient": row["patient_id"]}
            if asyncio.get_running_loop().time() >= deadline:
                return None
            await asyncio.sleep(0.1)


def routes(dtr: DtrRoutes) -> list[Route]:
    return [
        Route("/fhir/metadata", dtr.metadata, methods=["GET"]),
        Route("/fhir/Questionnaire/$questionnaire-package", dtr.package, methods=["POST"]),
        Route("/fhir/Questionnaire/{id}", dtr.read_questionnaire, methods=["GET"]),
        Route("/fhir/Questionnaire", dtr.search_questionnaire, methods=["GET"]),
        Route("/fhir/ValueSet/$expand", dtr.expand, methods=["GET", "POST"]),
    ]

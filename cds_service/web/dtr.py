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
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..auth.jwt import AuthError
from ..dtr.package import MAX_TEXT, PackageError, Packager, parse_input, patient_of
from ..hooks.request import RequestError
from ..jsonutil import dumps
from ..storage.dtr_contexts import find_context
from .errors import operation_outcome

log = logging.getLogger("cds_service.web.dtr")
FHIR_JSON = "application/fhir+json"
#: a context written by this call's writer may lag the hook answer by a moment: wait this long for it
CONTEXT_WAIT_SECONDS = 1.5


def fhir_response(body: Any, status: int = 200) -> Response:
    return Response(dumps(body), status_code=status, media_type=FHIR_JSON)


class DtrRoutes:
    def __init__(self, cds: Any) -> None:
        self.cds = cds  # the CdsApp: authentication, body reading, base URL, store, the current service
        self._packager: tuple[Any, Packager] | None = None

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

    async def _allowed(self, request: Request, public: bool) -> Response | None:
        if public and self.cds.config.auth.discovery_public:
            return None
        try:
            await self.cds.authenticate(request)
        except AuthError as error:
            from .app import unauthorized

            return unauthorized(error)
        return None

    async def metadata(self, request: Request) -> Response:
        refused = await self._allowed(request, public=True)
        return refused or fhir_response(self.packager.capability_statement(self.base(request)))

    async def read_questionnaire(self, request: Request) -> Response:
        refused = await self._allowed(request, public=True)
        if refused:
            return refused
        form = self.packager.forms.by_id(request.path_params["id"])
        if form is None:
            return operation_outcome(404, "no such Questionnaire", "not-found")
        return fhir_response(self.packager.questionnaire(form, self.base(request)))

    async def search_questionnaire(self, request: Request) -> Response:
        refused = await self._allowed(request, public=True)
        if refused:
            return refused
        url = request.query_params.get("url")
        if url is not None and len(url) > MAX_TEXT:
            return operation_outcome(400, "url: too long")
        return fhir_response(self.packager.questionnaire_search(url, self.base(request)))

    async def expand(self, request: Request) -> Response:
        refused = await self._allowed(request, public=True)
        if refused:
            return refused
        url = request.query_params.get("url")
        if request.method == "POST":
            try:
                body = (await self.cds.read_json(request))[1]
            except RequestError as error:
                return operation_outcome(error.status, str(error), error.code)
            params = body.get("parameter") if isinstance(body, Mapping) else None
            named = [p for p in params if isinstance(p, Mapping) and p.get("name") == "url"] \
                if isinstance(params, list) else []
            url = (named[0].get("valueUri") or named[0].get("valueCanonical")) if named else None
        if not isinstance(url, str) or not url or len(url) > MAX_TEXT:
            return operation_outcome(400, "$expand needs the url of a ValueSet this service serves")
        found = self.packager.expand(url, self.base(request))
        if found is None:
            return operation_outcome(404, f"no ValueSet {url} is served here", "not-found")
        return fhir_response(found)

    async def package(self, request: Request) -> Response:
        try:
            await self.cds.authenticate(request)
        except AuthError as error:
            from .app import unauthorized

            return unauthorized(error)
        from .app import BodyTooLarge

        try:
            _, body = await self.cds.read_json(request)
            parsed = parse_input(body)
            context = await self.context(parsed.context) if parsed.context else None
            if parsed.context and (context is None or not self._same_patient(parsed.coverage, context)):
                raise PackageError(f"no coverage assertion {parsed.context!r} is known for this Coverage's patient "
                                   "(unknown, or expired)", status=404, code="not-found")
            packager = self.packager  # one policy generation answers the whole call
            return fhir_response(packager.package(parsed, context, self.base(request)))
        except BodyTooLarge:
            return operation_outcome(413, "the request body is too large", "too-costly")
        except RequestError as error:
            return operation_outcome(error.status, str(error), error.code)
        except PackageError as error:
            return operation_outcome(error.status, str(error), error.code)

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

"""A FHIR server for the benchmark's FHIR path, on loopback: answers the service's patient-scoped searches
with what the Synthea record of the ``ehr`` size holds (bench/requests.py), after ``BENCH_FHIR_DELAY_MS``
milliseconds per search. A search without ``Authorization: Bearer $BENCH_FHIR_TOKEN`` gets 401, so that a
client that loses or mixes up the token shows as errors.

    BENCH_FHIR_DELAY_MS=50 BENCH_FHIR_TOKEN=t uvicorn bench.fhir_server:app --port PORT
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bench.requests import PUMP_RECORD, ROOT, _service, ehr_prefetch, searchset

DELAY = float(os.environ.get("BENCH_FHIR_DELAY_MS", "0")) / 1000
TOKEN = os.environ.get("BENCH_FHIR_TOKEN", "bench-token")


def _pages() -> dict[str, bytes]:
    """Search results by resource type, as the service's templates select them from the record."""
    record = [e["resource"] for e in json.loads((ROOT / "fixtures/records" / PUMP_RECORD).read_text())["entry"]]
    prefetch = ehr_prefetch(_service(), record)
    out: dict[str, bytes] = {}
    for value in prefetch.values():
        entries = value.get("entry", []) if isinstance(value, Mapping) else []
        by_type: dict[str, list[Any]] = {}
        for entry in entries:
            by_type.setdefault(entry["resource"]["resourceType"], []).append(entry["resource"])
        for rtype, resources in by_type.items():
            out[rtype] = json.dumps(searchset(resources)).encode()
    return out


PAGES = _pages()
EMPTY = json.dumps(searchset([])).encode()


async def search(request: Request) -> Response:
    if request.headers.get("authorization") != f"Bearer {TOKEN}":
        return Response(status_code=401)
    if DELAY:
        await asyncio.sleep(DELAY)
    body = PAGES.get(request.path_params["rtype"], EMPTY)
    return Response(body, media_type="application/fhir+json")


app = Starlette(routes=[Route("/fhir/{rtype}", search, methods=["GET"])])

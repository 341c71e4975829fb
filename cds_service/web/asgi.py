"""ASGI entry point for uvicorn workers: the app built from $CDS_SERVICE_CONFIG (or defaults)."""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from starlette.applications import Starlette

from ..config import ENV_RUN_DIR, load_config
from ..hooks.warmup import warm
from .app import create_app


async def _warm_routes(app: Starlette) -> None:
    """Send through the app itself a request that stores, logs and counts nothing (a health check), so that its
    middleware stack (built on first use), routing and responses are warm too."""

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: Mapping[str, Any]) -> None:
        pass

    for method, path in (("GET", "/health"),):
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")],
                 "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0), "state": {}}
        with contextlib.suppress(Exception):  # a warm-up never stops the service
            await app(scope, receive, send)


def app_from_environment() -> Starlette:
    # Audit records leave the event loop through a helper thread (the queue feeder of the writer
    # process, or the writer thread), which works in short bursts between GIL hand-offs. With the default
    # 5 ms switch interval a busy event loop starves it: measured with bench/run.py, typical-request
    # throughput fell by a quarter and p99 tripled. See bench/README.md.
    sys.setswitchinterval(0.0005)
    run_dir = os.environ.get(ENV_RUN_DIR)  # set by `cds-service serve`: the policy generation to follow
    app = create_app(load_config(), run_dir=Path(run_dir) if run_dir else None)
    service = app.state.cds.service
    serve = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # The first hook call would otherwise pay for everything used for the first time (fhir.resources
        # validators, element checks, templates, the loop's executor and the FHIR client's code): 60-300 ms
        # against a p50 of a few ms. Run in the loop that will serve, before it serves. See
        # cds_service/hooks/warmup.py and bench/README.md.
        await warm(service)
        await _warm_routes(app)
        # Everything built so far (modules, fhir.resources model classes, compiled policies and templates)
        # lives as long as the process. Parsing a request allocates tens of thousands of containers, which
        # triggers the cyclic garbage collector; its full collections would traverse that whole startup
        # heap every time. Freezing it takes it out of collection: measured in process, a typical request
        # went from 10.4 to 5.5 ms. See bench/README.md.
        gc.collect()
        gc.freeze()
        async with serve(app):  # the app's own lifespan (it keeps no state)
            yield

    app.router.lifespan_context = lifespan
    return app

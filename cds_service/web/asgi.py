"""ASGI entry point for uvicorn workers: the app built from $CDS_SERVICE_CONFIG (or defaults)."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

from starlette.applications import Starlette

from ..config import ENV_RUN_DIR, load_config
from .app import create_app


def app_from_environment() -> Starlette:
    # Audit records leave the event loop through a helper thread (the queue feeder of the writer
    # process, or the writer thread), which works in short bursts between GIL hand-offs. With the default
    # 5 ms switch interval a busy event loop starves it: measured with bench/run.py, typical-request
    # throughput fell by a quarter and p99 tripled. See bench/README.md.
    sys.setswitchinterval(0.0005)
    run_dir = os.environ.get(ENV_RUN_DIR)  # set by `cds-service serve`: the policy generation to follow
    app = create_app(load_config(), run_dir=Path(run_dir) if run_dir else None)
    # Everything built so far (modules, fhir.resources model classes, compiled policies and templates)
    # lives as long as the process. Parsing a request allocates tens of thousands of containers, which
    # triggers the cyclic garbage collector; its full collections would traverse that whole startup
    # heap every time. Freezing it takes it out of collection: measured in process, a typical request
    # went from 10.4 to 5.5 ms. See bench/README.md.
    gc.collect()
    gc.freeze()
    return app

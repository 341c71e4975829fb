"""ASGI entry point for uvicorn workers: the app built from $CDS_SERVICE_CONFIG (or defaults)."""

from __future__ import annotations

import sys

from starlette.applications import Starlette

from ..config import load_config
from .app import create_app


def app_from_environment() -> Starlette:
    # The audit writer thread does short bursts of work between GIL hand-offs; with the default 5 ms
    # switch interval a busy event loop starves it (it fell hundreds of records behind under load).
    sys.setswitchinterval(0.0005)
    return create_app(load_config())

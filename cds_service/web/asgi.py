"""ASGI entry point for uvicorn workers: the app built from $CDS_SERVICE_CONFIG (or defaults)."""

from __future__ import annotations

from starlette.applications import Starlette

from ..config import load_config
from .app import create_app


def app_from_environment() -> Starlette:
    return create_app(load_config())

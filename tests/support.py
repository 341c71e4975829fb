"""Helpers shared by the tests: fixture paths; building hook requests from scenario files is the package's
(cds_service.hooks.scenarios, which ``cds-service policy check`` uses too)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cds_service.hooks.scenarios import (
    PREFETCH_KEYS,
    SERVICE_FOR_HOOK,
    hook_request,
    prefetch_for,
    scenario_request,
    searchset,
)

__all__ = ["FIXTURES", "HOOK_CORPUS", "PREFETCH_KEYS", "ROOT", "SCENARIOS", "SERVICE_FOR_HOOK", "coverage_extension",
           "hook_request", "load", "prefetch_for", "scenario_request", "searchset"]

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
SCENARIOS = sorted((FIXTURES / "scenarios").glob("*.json"))
HOOK_CORPUS = sorted((FIXTURES / "hooks").glob("*.json"))

def load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def coverage_extension(resource: dict[str, Any]) -> dict[str, Any]:
    ext = [e for e in resource.get("extension", [])
           if e["url"] == "http://hl7.org/fhir/us/davinci-crd/StructureDefinition/ext-coverage-information"]
    assert len(ext) == 1, ext
    return {p["url"]: p for p in ext[0]["extension"]}

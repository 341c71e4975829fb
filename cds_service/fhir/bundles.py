"""Reading FHIR JSON as it arrives in prefetch and search results, tolerant of common EHR quirks.

A prefetch value may be a resource, a Bundle (with or without ``type`` or ``fullUrl``), ``null``
(the query found nothing) or an OperationOutcome (the EHR's query failed).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Failure:
    """A prefetch value or search response that holds an error instead of data."""

    reason: str


def operation_outcome_text(raw: Mapping[str, Any]) -> str:
    """A short text of an OperationOutcome's first issue (diagnostics are not echoed: they may hold PHI)."""
    issues = raw.get("issue")
    if isinstance(issues, list) and issues and isinstance(issues[0], Mapping):
        code = issues[0].get("code", "unknown")
        severity = issues[0].get("severity", "error")
        return f"OperationOutcome ({severity}: {code})"
    return "OperationOutcome"


def is_operation_outcome(raw: Any) -> bool:
    """A prefetch value that is an OperationOutcome reports a failed query (CDS Hooks 2.0)."""
    return isinstance(raw, Mapping) and raw.get("resourceType") == "OperationOutcome"


def bundle_problem(value: Any) -> str | None:
    """Why a prefetch value that is a Bundle cannot be read (its ``entry`` is not an array), or None."""
    if isinstance(value, Mapping) and value.get("resourceType") == "Bundle":
        entries = value.get("entry")
        if entries is not None and not isinstance(entries, list):
            return "the prefetch Bundle's entry is not an array"
    return None


def resources_in(value: Any) -> Iterator[Mapping[str, Any]]:
    """Every resource in a prefetch value or search Bundle: entries' resources, recursively for
    nested Bundles, skipping entries that hold no resource, an ``entry`` that is not an array (see
    :func:`bundle_problem`) and OperationOutcomes in search results."""
    if not isinstance(value, Mapping):
        return
    rtype = value.get("resourceType")
    if rtype == "Bundle":
        entries = value.get("entry")
        for entry in entries if isinstance(entries, list) else ():
            if isinstance(entry, Mapping):
                yield from resources_in(entry.get("resource"))
    elif rtype == "OperationOutcome":
        return
    elif isinstance(rtype, str):
        yield value


def next_link(bundle: Mapping[str, Any]) -> str | None:
    links = bundle.get("link")
    for link in links if isinstance(links, list) else ():
        if isinstance(link, Mapping) and link.get("relation") == "next" and isinstance(link.get("url"), str):
            return str(link["url"])
    return None

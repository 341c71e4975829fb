"""Whose member is this? CRD 2.2 hook-13: a request whose primary Coverage names no payer this deployment
handles (or has no Coverage at all, or more than one with none marked primary, or one without a payer
identifier) is refused with 400.

The payer's identifiers are configuration (``[service] payer_identifiers``, ``"system|value"`` or a bare
``"value"`` matching any system). Unconfigured, every Coverage is taken as ours and nothing is checked.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PayerIdentifier:
    system: str | None
    value: str

    @staticmethod
    def parse(token: str) -> PayerIdentifier:
        system, bar, value = token.strip().rpartition("|")
        return PayerIdentifier(system or None, value) if bar else PayerIdentifier(None, token.strip())

    def matches(self, identifier: Mapping[str, Any]) -> bool:
        system = identifier.get("system")
        return identifier.get("value") == self.value and (self.system is None or system == self.system)

    def __str__(self) -> str:
        return f"{self.system}|{self.value}" if self.system else self.value


def _active(coverages: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [c for c in coverages if c.get("status") in (None, "active")]


def _order(coverage: Mapping[str, Any]) -> int | None:
    value = coverage.get("order")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _payer_identifiers(coverage: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    payors = coverage.get("payor")
    for payor in payors if isinstance(payors, list) else [payors]:
        identifier = payor.get("identifier") if isinstance(payor, Mapping) else None
        if isinstance(identifier, Mapping):
            yield identifier


def primary_coverage(coverages: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | str:
    """The primary Coverage among those of the request, or why there is none."""
    active = _active(coverages)
    if not active:
        return "the request names no active Coverage of the patient (prefetch 'coverage' or the EHR's FHIR server)"
    if len(active) == 1:
        return active[0]
    ranked = sorted((o, i) for i, c in enumerate(active) if (o := _order(c)) is not None)
    if not ranked or (len(ranked) > 1 and ranked[0][0] == ranked[1][0]):
        return f"the request names {len(active)} active Coverages and none is marked primary (Coverage.order)"
    return active[ranked[0][1]]


def payer_problem(coverages: Sequence[Mapping[str, Any]], ours: Sequence[PayerIdentifier]) -> str | None:
    """Why this request is not for a member of a payer this deployment handles, or None when it is."""
    primary = primary_coverage(coverages)
    if isinstance(primary, str):
        return primary
    where = f"Coverage/{primary.get('id')}" if isinstance(primary.get("id"), str) else "the primary Coverage"
    identifiers = list(_payer_identifiers(primary))
    if not identifiers:
        return f"{where} names no payer identifier (Coverage.payor.identifier)"
    if not any(mine.matches(identifier) for mine in ours for identifier in identifiers):
        named = ", ".join(f"{i.get('system')}|{i.get('value')}" for i in identifiers)
        return f"{where} names a payer this service does not handle ({named})"
    return None

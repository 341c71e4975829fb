"""The SMART scopes of ``fhirAuthorization.scope``, v1 (``patient/Condition.read``) and v2
(``patient/Condition.rs``, CDS Hooks 3.0 / CRD 2.2), read for one question: may the token search a
resource type? The service then does not send the token for a search it does not grant."""

from __future__ import annotations

import re
from dataclasses import dataclass

_SCOPE = re.compile(r"^(?:patient|user|system)/(?P<type>[A-Za-z]+|\*)\.(?P<perm>read|write|\*|c?r?u?d?s?)(?:\?.*)?$")


@dataclass(frozen=True)
class SmartScopes:
    """Resource types the token may search; ``None`` when the scope names no resource access at all
    (absent, or only ``openid launch ...``): then nothing is assumed and every search is tried."""

    searchable: frozenset[str] | None

    def allows_search(self, resource_type: str) -> bool:
        return self.searchable is None or "*" in self.searchable or resource_type in self.searchable


def parse_scopes(scope: str | None) -> SmartScopes:
    """v1: ``.read`` or ``.*`` grants search; v2: the permission letters include ``s``. A v2 scope with
    query parameters (``patient/Observation.rs?category=...``) grants the type: the server applies the
    restriction to what it returns."""
    if not scope:
        return SmartScopes(None)
    searchable: set[str] = set()
    recognised = False
    for token in scope.split():
        match = _SCOPE.match(token)
        if match is None or not match.group("perm"):
            continue
        recognised = True
        perm = match.group("perm")
        if perm in ("read", "*") or (perm != "write" and "s" in perm):
            searchable.add(match.group("type"))
    return SmartScopes(frozenset(searchable) if recognised else None)

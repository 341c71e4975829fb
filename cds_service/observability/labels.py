"""Label values for the metrics, from a small fixed set each: never a patient id, a hookInstance, a token
or free text from a request. A value the caller chose (a service id in the URL, an override reason code) is
used only when it is one the service knows, else it counts under ``unknown`` / ``other``."""

from __future__ import annotations

import re
import threading
from collections.abc import Collection, Mapping
from typing import Any

UNKNOWN = "unknown"
OTHER = "other"

#: JWT refusal reasons: the first fragment of the refusal message (cds_service.auth AuthError) that matches
#: gives the label; tests/test_metrics.py checks that every message the auth package raises has one
AUTH_REFUSALS: tuple[tuple[str, str], ...] = (
    ("no Authorization header", "missing_token"),
    ("not a Bearer token", "malformed"),
    ("token longer than", "malformed"),
    ("not a compact JWS", "malformed"),
    ("is not base64url-encoded JSON", "malformed"),
    ("is not a JSON object", "malformed"),
    ("payload is not JSON", "malformed"),
    ("algorithm", "algorithm"),
    ("typ is not JWT", "header"),
    ("critical extensions", "header"),
    ("issuer is not trusted", "untrusted_issuer"),
    ("already used (replay)", "replay"),
    ("is unusable", "key"),
    ("not on the issuer's allowlist", "key"),
    ("JWK Set at the token's jku", "key"),
    ("no trusted key verifies", "signature"),
    ("aud does not name", "audience"),
    ("token has expired", "expired"),
    ("exp and iat are required", "time_claims"),
    ("iat or nbf is in the future", "time_claims"),
    ("token lifetime", "lifetime"),
    ("tenant is not allowed", "tenant"),
    ("jti is missing", "jti"),
)

#: override reason codes are the EHR's: a code counts under its own label only when it looks like a code
#: and is one of the first MAX_OVERRIDE_CODES distinct codes this process has seen; else ``other``
MAX_OVERRIDE_CODES = 20
_CODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,39}")
_seen_codes: set[str] = set()
_seen_lock = threading.Lock()


def service_label(service_id: str, known: Collection[str]) -> str:
    return service_id if service_id in known else UNKNOWN


def auth_refusal_label(message: str) -> str:
    return next((label for fragment, label in AUTH_REFUSALS if fragment in message), OTHER)


def override_reason_label(entry: Mapping[str, Any]) -> str:
    """``none`` for feedback without an override reason (or accepted), else its code, bounded (see above)."""
    override = entry.get("overrideReason")
    reason = override.get("reason") if isinstance(override, Mapping) else None
    code = reason.get("code") if isinstance(reason, Mapping) else None
    if not isinstance(code, str):
        return "none"
    if not _CODE.fullmatch(code):
        return OTHER
    with _seen_lock:
        if code in _seen_codes:
            return code
        if len(_seen_codes) < MAX_OVERRIDE_CODES:
            _seen_codes.add(code)
            return code
    return OTHER

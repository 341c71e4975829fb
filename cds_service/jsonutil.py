"""Fast JSON (orjson) for requests, responses and the command line.

:func:`loads` refuses documents nested deeper than :data:`MAX_DEPTH`. orjson reads 1024 levels but writes only
254, so a deeper request could be parsed and then fail when echoed or audited; and validating FHIR resources
(fhir.resources) recurses about eight Python frames per JSON level, so a chain of a few hundred levels (nested
extensions, references) overflows the interpreter's stack. Real CDS Hooks requests and FHIR Bundles nest
about 15 levels; 64 leaves room for any of them and keeps validation far from the recursion limit.
"""

from __future__ import annotations

from typing import Any

import orjson

MAX_DEPTH = 64
_WRITER_DEPTH = 254  # orjson.dumps refuses deeper documents ("Recursion limit reached")

JSONDecodeError = orjson.JSONDecodeError


class JSONTooDeep(JSONDecodeError):
    """A JSON document nested deeper than :data:`MAX_DEPTH` levels; the message says so."""


def dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def loads(data: bytes | str) -> Any:
    """The parsed document; :class:`JSONDecodeError` when it is not JSON, :class:`JSONTooDeep` (a subclass)
    when it nests deeper than :data:`MAX_DEPTH` levels."""
    value = orjson.loads(data)
    if isinstance(value, dict | list) and _too_deep(value):
        raise JSONTooDeep(f"is nested deeper than {MAX_DEPTH} levels", "", 0)
    return value


def _too_deep(value: dict[str, Any] | list[Any]) -> bool:
    """Whether ``value`` nests deeper than MAX_DEPTH: orjson's writer, which stops at 254 levels, checks it at
    C speed (a tenth of the parse time) when the value is wrapped in 254 - MAX_DEPTH lists."""
    wrapped: Any = value
    for _ in range(_WRITER_DEPTH - MAX_DEPTH):
        wrapped = [wrapped]
    try:
        orjson.dumps(wrapped)
    except orjson.JSONEncodeError:
        return True
    return False

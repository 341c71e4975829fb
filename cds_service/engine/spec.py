"""Reading the mappings of policy files strictly: unknown keys and missing ones are errors naming them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def strict_keys(where: str, data: Any, required: set[str], optional: set[str], error: type[ValueError],
                noun: str = "key(s)") -> Mapping[str, Any]:
    """``data`` as a mapping with exactly the ``required`` keys and some of the ``optional`` ones; otherwise
    ``error``, naming the place (``where``) and the keys."""
    if not isinstance(data, Mapping):
        raise error(f"{where}: expected a mapping" + ("" if noun == "key(s)" else " of parameters"))
    unknown = set(data) - required - optional
    if unknown:
        raise error(f"{where}: unknown {noun} {sorted(unknown)}")
    missing = required - set(data)
    if missing:
        raise error(f"{where}: missing {'' if noun == 'key(s)' else noun + ' '}{sorted(missing)}")
    return data

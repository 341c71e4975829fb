"""Reading draft orders liberally: what an EHR sends is read as FHIR R4 meant it, and only what a
decision reads can make an order unreadable.

Two steps, both without changing the request:

- :func:`as_r4_lists`: a single JSON object where R4 has a list (the CDS Hooks sandbox sends
  ``MedicationRequest.category`` and ``reasonCode`` so) is read as a one-element list, with a note.
- :func:`check_order`: the order is validated (fhir.resources R4B); each remaining fault is either on an
  element the decision reads (the order is then *unreadable*: the caller gives a conditional decision
  saying so) or on one it never reads (noted, otherwise ignored). What the decision reads is observed,
  not listed: the engine's order reader is run on a recording view of the order.
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from ..engine.decision import Decision, Outcome

#: JSON nesting below which shapes are left as sent (request bodies are small; this bounds recursion)
MAX_DEPTH = 64
_NOT_READ_LIMIT = 5
#: the rule id of the decision for an order whose elements the decision reads are not valid R4
ORDER_UNREADABLE = "order-unreadable"


@dataclass(frozen=True)
class _Field:
    is_list: bool
    model: Any | None  # the fhir.resources class of a complex element; None for primitives


def _leaves(annotation: Any) -> Iterator[Any]:
    args = typing.get_args(annotation)
    if not args:
        yield annotation
        return
    for arg in args:
        yield from _leaves(arg)


def _is_list(annotation: Any) -> bool:
    if typing.get_origin(annotation) is list:
        return True
    return any(_is_list(arg) for arg in typing.get_args(annotation))


@functools.cache
def _fields(model: Any) -> dict[str, _Field]:
    """The JSON names of a fhir.resources model's elements, with their shape."""
    out: dict[str, _Field] = {}
    for name, info in model.model_fields.items():
        element = None
        for leaf in _leaves(info.annotation):
            klass = getattr(leaf, "get_model_klass", None)
            if callable(klass):
                element = klass()
                break
        out[info.alias or name] = _Field(_is_list(info.annotation), element)
    return out


def _model_of(resource_type: Any) -> Any | None:
    if not isinstance(resource_type, str):
        return None
    try:
        return get_fhir_model_class(resource_type)
    except (KeyError, ValueError, AttributeError):
        return None


def _label(path: Sequence[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _listify(value: Any, model: Any, path: list[str | int], notes: list[str], depth: int) -> Any:
    """``value`` (an element of type ``model``) with every single object in a list-typed element wrapped
    in a list. Unchanged parts are shared; changed containers are new objects."""
    if depth > MAX_DEPTH or not isinstance(value, Mapping):
        return value
    if isinstance(value.get("resourceType"), str):
        model = _model_of(value["resourceType"]) or model  # a resource (contained, or the order itself)
    shape = _fields(model) if model is not None else {}
    changed: dict[str, Any] = {}
    for key, item in value.items():
        spec = shape.get(key)
        if spec is None:
            continue
        new = item
        if spec.is_list and isinstance(item, Mapping):
            notes.append(f"{_label([*path, key])} was sent as a single object; read as a one-element list "
                         "(FHIR R4 JSON has a list)")
            new = [item]
        if spec.model is not None:
            if isinstance(new, list):
                items = [_listify(x, spec.model, [*path, key, i], notes, depth + 1) for i, x in enumerate(new)]
                if any(a is not b for a, b in zip(items, new, strict=True)):
                    new = items
            else:
                new = _listify(new, spec.model, [*path, key], notes, depth + 1)
        if new is not item:
            changed[key] = new
    if not changed:
        return value
    return {**value, **changed}


def as_r4_lists(resource: Mapping[str, Any]) -> tuple[Mapping[str, Any], list[str]]:
    """The resource with single objects in list-typed elements read as one-element lists, and a note for
    each. The resource itself is returned when nothing needed it."""
    notes: list[str] = []
    model = _model_of(resource.get("resourceType"))
    if model is None:
        return resource, notes
    return _listify(resource, model, [], notes, 0), notes


# --- what a decision reads ------------------------------------------------------------------------

Path = tuple[str, ...]


class _ReadingMap(Mapping[str, Any]):
    """A read-only view of a JSON object that records the path of every element looked up."""

    def __init__(self, data: Mapping[str, Any], path: Path, seen: set[Path]) -> None:
        self._data = data
        self._path = path
        self._seen = seen

    def __getitem__(self, key: str) -> Any:
        path = (*self._path, key)
        self._seen.add(path)
        return _reading(self._data[key], path, self._seen)

    def __iter__(self) -> Iterator[str]:
        self._seen.add(self._path)
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


class _ReadingList(list[Any]):
    pass


def _reading(value: Any, path: Path, seen: set[Path]) -> Any:
    if isinstance(value, Mapping):
        return _ReadingMap(value, path, seen)
    if isinstance(value, list):
        return _ReadingList(_reading(v, path, seen) for v in value)
    return value


def read_paths(resource: Mapping[str, Any], reader: Callable[[Mapping[str, Any]], object]) -> frozenset[Path]:
    """The element paths (list indexes left out) that ``reader`` looks up in ``resource``."""
    seen: set[Path] = set()
    reader(_ReadingMap(resource, (), seen))
    return frozenset(seen)


def _is_read(location: Sequence[str | int], paths: frozenset[Path]) -> bool:
    """A fault is on a read element when the reader looked the faulty element up, or something inside it."""
    loc = tuple(str(p) for p in location if not isinstance(p, int) and p != "__root__")
    return any(p[: len(loc)] == loc for p in paths)


@dataclass
class OrderCheck:
    """What validation found on one draft order: faults on elements the decision reads make it unreadable."""

    unreadable: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def check_order(resource: Mapping[str, Any], reader: Callable[[Mapping[str, Any]], object]) -> OrderCheck:
    """Validate ``resource`` as FHIR R4 and sort its faults by whether ``reader`` (the engine's order
    reader) looks at them."""
    check = OrderCheck()
    model = _model_of(resource.get("resourceType"))
    if model is None:
        check.unreadable.append(f"resourceType {resource.get('resourceType')!r} is not a FHIR R4 resource type")
        return check
    try:
        model.model_validate(resource)
        return check
    except ValidationError as error:
        errors = error.errors()
    except (RecursionError, TypeError, ValueError) as error:
        check.unreadable.append(f"the order cannot be parsed ({type(error).__name__})")
        return check
    paths = read_paths(resource, reader)
    for item in errors:
        where = _label([p for p in item.get("loc", ()) if p != "__root__"]) or "(resource)"
        text = f"{where}: {item.get('msg', 'invalid')}"
        (check.unreadable if _is_read(item.get("loc", ()), paths) else check.ignored).append(text)
    if len(check.ignored) > _NOT_READ_LIMIT:
        more = len(check.ignored) - _NOT_READ_LIMIT
        check.ignored = [*check.ignored[:_NOT_READ_LIMIT], f"and {more} more"]
    return check


def unreadable_decision(policy_id: str, policy_title: str, order_reference: str,
                        faults: Sequence[str]) -> Decision:
    """The decision for an order a policy governs but whose elements the decision reads are not valid
    FHIR R4: conditional, naming what could not be read (the EHR must correct the order)."""
    shown = list(faults[:_NOT_READ_LIMIT])
    if len(faults) > _NOT_READ_LIMIT:
        shown.append(f"and {len(faults) - _NOT_READ_LIMIT} more")
    return Decision(
        policy_id=policy_id,
        policy_title=policy_title,
        order_reference=order_reference,
        outcome=Outcome.CONDITIONAL,
        rule_id=ORDER_UNREADABLE,
        clause="A coverage decision is made only from an order that can be read.",
        reason="The draft order could not be read (" + "; ".join(shown) + "); coverage is not determined.",
        summary="the order could not be read; coverage not determined",
        missing=[f"a valid order: {fault}" for fault in shown],
    )

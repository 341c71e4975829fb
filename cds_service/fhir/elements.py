"""Checks of the elements a decision reads, with the FHIR R4 definitions (R4B, as fhir.resources carries them).

Validating a whole resource with fhir.resources costs 60-80 us; a decision reads a handful of its elements. An
:class:`ElementChecks` checks, for each resource type, only the named top-level elements, and each of them
whole: its cardinality (one value or a list), its type (a primitive by fhir.resources' own validator for that
primitive, with the FHIR regular expressions; a complex type recursively, element by element, no unknown
element, required sub-elements present, at most one of a choice), and, for a required element, its presence.
A choice element is named by its stem (``onset`` checks ``onsetDateTime``, ``onsetPeriod``, ... and that at most
one is present). The definitions are read from the fhir.resources model classes (the element's type, whether
it repeats, whether it is required, its choice group), so the checks follow the specification rather than a
hand-written copy of it.

A resource that passes comes back as a :class:`Checked` view: the checked elements as fhir.resources would
give them (primitives converted by the same validators: dates, decimals...; complex values as nested views).
Reading an element that was not checked raises :class:`UncheckedElement`, so a decision can never rest on an
element nobody checked: add it to the elements the engine reads instead.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import TypeAdapter, ValidationError

#: keys every element may carry that are not data (fhir.resources accepts them)
_IGNORED = frozenset({"fhir_comments"})
#: primitives fhir.resources types with a plain Python type (e.g. boolean)
_PLAIN = (bool, str, int, float)


class UncheckedElement(AttributeError):
    """A decision read an element that is not among the checked ones (a programming error)."""


class ElementFault(ValueError):
    """An element is not what the FHIR definition says; the message names its path."""


@dataclass
class _Field:
    name: str
    many: bool
    required: bool
    choice: str | None
    kind: str  # "primitive", "complex" or "resource"
    adapter: _Primitive | None = None  # set for primitives only
    type_name: str | None = None


@dataclass
class _Type:
    name: str
    fields: dict[str, _Field] = field(default_factory=dict)
    #: choice group -> its JSON names, and whether one of them is required
    choices: dict[str, tuple[str, ...]] = field(default_factory=dict)
    required_choices: frozenset[str] = frozenset()
    required: tuple[str, ...] = ()


class _Primitive:
    """A primitive type's validator (fhir.resources' own, through pydantic), remembering the text values it has
    accepted: codes, systems, dates and units repeat from resource to resource and request to request. Only
    short text is remembered, at most ``SIZE`` values per type (then it starts afresh), and only what was valid;
    the values it gives are immutable (text, dates, numbers)."""

    SIZE = 4096
    LONGEST = 256

    def __init__(self, annotation: Any) -> None:
        self._adapter: TypeAdapter[Any] = TypeAdapter(annotation)
        self._valid: dict[str, Any] = {}

    def validate(self, value: Any) -> Any:
        if type(value) is str:
            found = self._valid.get(value, _MISSING)
            if found is not _MISSING:
                return found
        result = self._adapter.validate_python(value)
        if type(value) is str and len(value) <= self.LONGEST:
            if len(self._valid) >= self.SIZE:
                self._valid.clear()
            self._valid[value] = result
        return result


_MISSING = object()
_ADAPTERS: dict[str, _Primitive] = {}
_TYPES: dict[str, _Type] = {}


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _field(name: str, info: Any) -> _Field:
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    annotation = _strip_optional(info.annotation)
    many = typing.get_origin(annotation) in (list, typing.List)  # noqa: UP006
    item = _strip_optional(typing.get_args(annotation)[0]) if many else annotation
    required = bool(info.is_required() or extra.get("element_required"))
    choice = extra.get("one_of_many") if isinstance(extra.get("one_of_many"), str) else None
    type_name = getattr(item, "__name__", "")
    if typing.get_origin(item) is typing.Annotated or item in _PLAIN:
        key = repr(item)
        adapter = _ADAPTERS.get(key)
        if adapter is None:
            adapter = _ADAPTERS[key] = _Primitive(item)
        return _Field(name, many, required, choice, "primitive", adapter=adapter)
    if not type_name.endswith("Type"):
        raise TypeError(f"{name}: no check for {item!r}")
    type_name = type_name[: -len("Type")]
    kind = "resource" if type_name == "Resource" else "complex"
    return _Field(name, many, required, choice, kind, type_name=type_name)


def _type(name: str) -> _Type:
    """The definition of a resource or complex type, compiled once."""
    found = _TYPES.get(name)
    if found is not None:
        return found
    model = get_fhir_model_class(name)
    compiled = _Type(name)
    choices: dict[str, list[str]] = {}
    required_choices: set[str] = set()
    required: list[str] = []
    for attribute, info in model.model_fields.items():
        alias = info.alias or attribute
        if alias in _IGNORED:
            continue
        item = _field(alias, info)
        compiled.fields[alias] = item
        if item.choice:
            choices.setdefault(item.choice, []).append(alias)
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            if extra.get("one_of_many_required"):
                required_choices.add(item.choice)
        elif item.required and not alias.startswith("_"):
            required.append(alias)
    compiled.choices = {k: tuple(v) for k, v in choices.items()}
    compiled.required_choices = frozenset(required_choices)
    compiled.required = tuple(required)
    _TYPES[name] = compiled
    return compiled


class Checked:
    """Checked elements, read as attributes (like a fhir.resources model); an absent element is None."""

    __slots__ = ("_names", "_type", "_values")

    def __init__(self, type_name: str, values: dict[str, Any], names: frozenset[str] | None) -> None:
        self._type = type_name
        self._values = values
        self._names = names  # None: every element (a nested value, checked whole)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        names = self._names
        if names is not None and name not in names:
            raise UncheckedElement(f"{self._type}.{name} is read but not checked: add it to the elements the "
                                   "engine reads")
        return self._values.get(name)

    def get_resource_type(self) -> str:
        return self._type

    def __repr__(self) -> str:
        return f"Checked({self._type}, {sorted(self._values)})"


class _Fault(Exception):
    """A fault found inside an element: the path is built on the way out (only when there is a fault)."""

    def __init__(self, message: str, *path: str) -> None:
        self.message = message
        self.path = list(path)

    def within(self, *outer: str) -> _Fault:
        self.path[:0] = outer
        return self

    def fault(self) -> ElementFault:
        return ElementFault(f"{'.'.join(self.path)}: {self.message}")


def _check_value(spec: _Field, value: Any) -> Any:
    if not spec.many:
        return _check_one(spec, value)
    if not isinstance(value, list):
        raise _Fault("expected a list")
    out = []
    for index, item in enumerate(value):
        if item is None:
            raise _Fault("null in a list", str(index))
        try:
            out.append(_check_one(spec, item))
        except _Fault as fault:
            raise fault.within(str(index)) from None
    return out


def _check_one(spec: _Field, value: Any) -> Any:
    adapter = spec.adapter
    if adapter is not None:
        try:
            return adapter.validate(value)
        except ValidationError as error:
            raise _Fault(str(error.errors()[0].get("msg", "invalid"))) from None
    if not isinstance(value, Mapping):
        raise _Fault("expected an object")
    if spec.kind == "resource":
        return _whole_resource(value)
    assert spec.type_name is not None
    return Checked(spec.type_name, _check_complex(_type(spec.type_name), value), None)


def _whole_resource(value: Mapping[str, Any]) -> Any:
    """A resource inside an element (``contained``): validated whole with fhir.resources."""
    rtype = value.get("resourceType")
    try:
        model = get_fhir_model_class(str(rtype))
    except (KeyError, ValueError):
        raise _Fault(f"unknown resourceType {rtype!r}") from None
    try:
        return model.model_validate(value)
    except (ValidationError, TypeError, ValueError) as error:
        raise _Fault(f"invalid {rtype} ({type(error).__name__})") from None


def _check_complex(definition: _Type, value: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    fields = definition.fields
    for key, item in value.items():
        spec = fields.get(key)
        if spec is None:
            if key in _IGNORED:
                continue
            raise _Fault(f"not an element of {definition.name}", key)
        if item is None:
            continue
        try:
            out[key] = _check_value(spec, item)
        except _Fault as fault:
            raise fault.within(key) from None
    if definition.required or definition.choices:
        _check_presence(definition, value, out, None)
    return out


def _check_presence(definition: _Type, value: Mapping[str, Any], out: Mapping[str, Any],
                    only: frozenset[str] | None) -> None:
    for name in definition.required:
        if (only is None or name in only) and name not in out and f"_{name}" not in value:
            raise _Fault("required", name)
    for group, names in definition.choices.items():
        if only is not None and group not in only:
            continue
        present = [n for n in names if not n.startswith("_") and n in out]
        if len(present) > 1:
            raise _Fault(f"only one of {', '.join(present)} is allowed", f"{group}[x]")
        if not present and group in definition.required_choices:
            raise _Fault("required", f"{group}[x]")


@dataclass(frozen=True)
class _ResourceChecks:
    definition: _Type
    #: the JSON names checked (choice groups expanded, primitive extensions ``_x`` included)
    keys: frozenset[str]
    #: the names a decision may read (``keys`` without primitive extensions)
    names: frozenset[str]
    #: the names as given (choice groups by stem), for required-ness and choices
    given: frozenset[str]


class ElementChecks:
    """Per resource type, the top-level elements to check (choice elements by their stem, e.g. ``onset``)."""

    def __init__(self, elements: Mapping[str, Iterable[str]]) -> None:
        self._spec = {rtype: tuple(names) for rtype, names in elements.items()}
        self._compiled: dict[str, _ResourceChecks] = {}

    def covers(self, resource_type: str) -> bool:
        return resource_type in self._spec

    def names(self, resource_type: str) -> frozenset[str]:
        return self._compiled_for(resource_type).names

    def _compiled_for(self, resource_type: str) -> _ResourceChecks:
        found = self._compiled.get(resource_type)
        if found is not None:
            return found
        definition = _type(resource_type)
        keys: set[str] = set()
        for name in (*self._spec[resource_type], "id"):
            if name in definition.choices:
                keys.update(definition.choices[name])
            elif name in definition.fields:
                keys.add(name)
            else:
                raise ValueError(f"{resource_type} has no element {name!r}")
        keys |= {f"_{k}" for k in keys if f"_{k}" in definition.fields}
        compiled = _ResourceChecks(definition, frozenset(keys), frozenset(k for k in keys if not k.startswith("_")),
                                   frozenset(self._spec[resource_type]) | {"id"})
        self._compiled[resource_type] = compiled
        return compiled

    def compile_all(self) -> None:
        """Compile every type now, and every complex type their checked elements can hold (at start-up), so that
        no request pays for it."""
        pending = []
        for rtype in self._spec:
            checks = self._compiled_for(rtype)
            pending += [checks.definition.fields[k] for k in checks.keys]
        seen: set[str] = set()
        while pending:
            spec = pending.pop()
            if spec.kind != "complex" or spec.type_name is None or spec.type_name in seen:
                continue
            seen.add(spec.type_name)
            pending.extend(_type(spec.type_name).fields.values())

    def check(self, raw: Mapping[str, Any]) -> Checked:
        """The checked view of a resource; :class:`ElementFault` naming the first malformed element."""
        rtype = str(raw.get("resourceType"))
        checks = self._compiled_for(rtype)
        fields = checks.definition.fields
        out: dict[str, Any] = {}
        try:
            for key in checks.keys:
                item = raw.get(key)
                if item is None:
                    continue
                try:
                    out[key] = _check_value(fields[key], item)
                except _Fault as fault:
                    raise fault.within(key) from None
            _check_presence(checks.definition, raw, out, checks.given)
        except _Fault as fault:
            raise fault.fault() from None
        return Checked(rtype, out, checks.names)

"""The Da Vinci CRD ``ext-coverage-information`` profile, 2.0.1 and 2.2.1, as a test oracle.

2.0.1 is read from the IG package's StructureDefinition snapshot, value sets and CodeSystem ``temp``
(fixtures/crd/2.0.1); 2.2.1 from a model written from the IG's FSH (fixtures/crd/2.2.1). The check
covers what the profile says of the extension: known sub-extensions, cardinality, value types, required
bindings, codes claimed from CodeSystem ``temp``, the ``detail`` parts, and the invariants
crd-ci-q1..q5 (2.0.1 expressions) or q1..q9 (2.2.1)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from typing import Any

from cds_service.hooks.service import HookResult

from .support import FIXTURES

CI_URL = "http://hl7.org/fhir/us/davinci-crd/StructureDefinition/ext-coverage-information"
TEMP = "http://hl7.org/fhir/us/davinci-crd/CodeSystem/temp"
VERSIONS = ("2.0.1", "2.2.1")
_VALUE_KEYS = {
    "Reference": "valueReference", "code": "valueCode", "Coding": "valueCoding",
    "CodeableConcept": "valueCodeableConcept", "date": "valueDate", "string": "valueString",
    "canonical": "valueCanonical", "boolean": "valueBoolean", "Period": "valuePeriod", "Quantity": "valueQuantity",
    "url": "valueUrl", "ContactPoint": "valueContactPoint", "ContactDetail": "valueContactDetail",
}


def _load(path: str) -> Any:
    return json.loads((FIXTURES / "crd" / path).read_text(encoding="utf-8"))


@functools.cache
def model(version: str) -> dict[str, Any]:
    """{"subs": {name: spec}, "detail_subs": {...}, "valuesets": {url: codes}, "temp": codes}"""
    if version == "2.2.1":
        data = _load("2.2.1/crd-2.2.1-model.json")
        ci = data["coverage_information"]
        return {"subs": ci["subs"], "detail_subs": ci["detail_subs"], "valuesets": data["valuesets"],
                "temp": set(data["codesystems"][TEMP])}
    sd = _load("2.0.1/StructureDefinition-ext-coverage-information.json")
    subs: dict[str, dict[str, Any]] = {}
    detail: dict[str, dict[str, Any]] = {}
    for element in sd["snapshot"]["element"]:
        parts = element["id"].split(".")
        if len(parts) == 3 and parts[1].startswith("extension:") and parts[2] == "value[x]":
            target = subs[parts[1].split(":", 1)[1]]
        elif len(parts) == 4 and parts[1] == "extension:detail" and parts[3] == "value[x]":
            target = detail[parts[2].split(":", 1)[1]]
        elif len(parts) == 2 and parts[1].startswith("extension:"):
            subs[parts[1].split(":", 1)[1]] = {"min": element["min"], "max": element["max"]}
            continue
        elif len(parts) == 3 and parts[1] == "extension:detail" and parts[2].startswith("extension:"):
            detail[parts[2].split(":", 1)[1]] = {"min": element["min"], "max": element["max"]}
            continue
        else:
            continue
        target["types"] = [t["code"] for t in element.get("type", [])]
        target["value_min"] = element["min"]
        binding = element.get("binding", {})
        if binding.get("strength") == "required":
            target["binding"] = binding["valueSet"].split("|")[0]
    valuesets = {}
    for path in (FIXTURES / "crd" / "2.0.1").glob("ValueSet-*.json"):
        vs = json.loads(path.read_text(encoding="utf-8"))
        valuesets[vs["url"]] = [c["code"] for inc in vs["compose"]["include"] for c in inc.get("concept", [])]
    temp: set[str] = set()

    def walk(concepts: list[dict[str, Any]]) -> None:
        for concept in concepts:
            temp.add(concept["code"])
            walk(concept.get("concept", []))

    walk(_load("2.0.1/CodeSystem-temp.json")["concept"])
    subs.pop("detail", None)
    subs["detail"] = {"min": 0, "max": "*", "types": [], "complex": True}
    return {"subs": subs, "detail_subs": detail, "valuesets": valuesets, "temp": temp}


def _values(ext: Mapping[str, Any]) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in ext.items() if k.startswith("value")]


def _part_errors(name: str, part: Mapping[str, Any], spec: Mapping[str, Any], m: Mapping[str, Any]) -> list[str]:
    errors = []
    values = _values(part)
    allowed = {_VALUE_KEYS[t] for t in spec.get("types", []) if t in _VALUE_KEYS}
    if len(values) > 1:
        errors.append(f"{name}: more than one value")
    if values and values[0][0] not in allowed:
        errors.append(f"{name}: {values[0][0]} is not one of {sorted(allowed)}")
    if not values and spec.get("value_min", 0) >= 1:
        errors.append(f"{name}: a value is required")
    if values and spec.get("binding") and values[0][0] == "valueCode":
        codes = m["valuesets"][spec["binding"]]
        if values[0][1] not in codes:
            errors.append(f"{name}: code {values[0][1]!r} is not in {spec['binding']}")
    for _, value in values:
        codings = value.get("coding", []) if isinstance(value, Mapping) else []
        if isinstance(value, Mapping) and "system" in value:
            codings = [value]
        for coding in codings:
            if coding.get("system") == TEMP and coding.get("code") not in m["temp"]:
                errors.append(f"{name}: code {coding.get('code')!r} does not exist in CodeSystem temp")
    return errors


def _cardinality(name: str, count: int, spec: Mapping[str, Any]) -> list[str]:
    errors = []
    if count < spec["min"]:
        errors.append(f"{name}: at least {spec['min']} required, {count} found")
    if spec["max"] != "*" and count > int(spec["max"]):
        errors.append(f"{name}: at most {spec['max']} allowed, {count} found")
    return errors


def _codes(parts: list[Mapping[str, Any]], name: str) -> list[Any]:
    return [p.get("valueCode") for p in parts if p.get("url") == name]


_INVARIANTS: dict[str, list[tuple[str, Callable[[list[Mapping[str, Any]]], bool]]]] = {
    "2.0.1": [
        ("crd-ci-q1", lambda e: not any(p["url"] in ("questionnaire", "response") for p in e)
         or bool(_codes(e, "doc-needed"))),
        ("crd-ci-q2", lambda e: _codes(e, "covered") == ["not-covered"] or bool(_codes(e, "pa-needed"))),
        ("crd-ci-q3", lambda e: not _codes(e, "info-needed")
         or "conditional" in _codes(e, "covered") + _codes(e, "pa-needed") + _codes(e, "doc-needed")),
        ("crd-ci-q5", lambda e: ("satisfied" in _codes(e, "pa-needed")) == any(p["url"] == "satisfied-pa-id"
                                                                             for p in e)),
    ],
    "2.2.1": [
        ("crd-ci-q1", lambda e: not any(p["url"] == "questionnaire" for p in e) or bool(_codes(e, "doc-needed"))),
        ("crd-ci-q2", lambda e: _codes(e, "covered") != ["not-covered"] or not _codes(e, "pa-needed")),
        ("crd-ci-q3", lambda e: "conditional" not in _codes(e, "covered") + _codes(e, "pa-needed")
         + _codes(e, "doc-needed") or bool(_codes(e, "info-needed"))),
        ("crd-ci-q4", lambda e: not (set(_codes(e, "pa-needed")) & {"satisfied", "no-auth"})
         or "withpa" not in _codes(e, "doc-purpose")),
        ("crd-ci-q5", lambda e: ("satisfied" in _codes(e, "pa-needed")) == any(p["url"] == "satisfied-pa-id"
                                                                             for p in e)),
        ("crd-ci-q6", lambda e: "OTH" not in _codes(e, "info-needed") or any(p["url"] == "reason" for p in e)),
        ("crd-ci-q8", lambda e: not _codes(e, "doc-purpose") or any(p["url"] == "reason" for p in e)),
        ("crd-ci-q9", lambda e: "indeterminate" not in _codes(e, "covered") + _codes(e, "pa-needed")
         + _codes(e, "doc-needed") or any(p["url"] == "reason" for p in e)),
    ],
}


def coverage_information_errors(ext: Mapping[str, Any], version: str) -> list[str]:
    """What the CRD ``version`` profile says is wrong with one coverage-information extension."""
    m = model(version)
    if ext.get("url") != CI_URL:
        return [f"url is {ext.get('url')!r}"]
    if _values(ext):
        return ["the extension itself has a value"]
    parts = ext.get("extension") or []
    errors = []
    for name, spec in m["subs"].items():
        found = [p for p in parts if p.get("url") == name]
        errors += _cardinality(name, len(found), spec)
        for part in found:
            if spec.get("complex"):
                inner = part.get("extension") or []
                for dname, dspec in m["detail_subs"].items():
                    dfound = [p for p in inner if p.get("url") == dname]
                    errors += _cardinality(f"detail.{dname}", len(dfound), dspec)
                    errors += [e for p in dfound for e in _part_errors(f"detail.{dname}", p, dspec, m)]
                errors += [f"detail: unknown part {p.get('url')!r}" for p in inner
                           if p.get("url") not in m["detail_subs"]]
            else:
                errors += _part_errors(name, part, spec, m)
    errors += [f"unknown sub-extension {p.get('url')!r}" for p in parts if p.get("url") not in m["subs"]]
    if version == "2.2.1":
        for part in parts:
            reason = part.get("valueCodeableConcept") if part.get("url") == "reason" else None
            if reason is not None and not reason.get("text") and not any(
                    c.get("system") == TEMP and c.get("code") in m["valuesets"][
                        "http://hl7.org/fhir/us/davinci-crd/ValueSet/coverageAssertionReasons"]
                    for c in reason.get("coding", [])):
                errors.append("crd-ci-q7: a reason needs text or a coverageAssertionReasons code")
    errors += [key for key, holds in _INVARIANTS[version] if not holds(parts)]
    return errors


def coverage_extensions(resource: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [e for e in resource.get("extension") or [] if e.get("url") == CI_URL]


def extensions(result: HookResult) -> list[Any]:
    """Every coverage-information extension of an answer's systemActions (there is at least one)."""
    found = [e for a in result.response.get("systemActions", []) for e in coverage_extensions(a["resource"])]
    assert found, result.response
    return found


def assert_valid(result: HookResult, version: str = "2.0.1") -> list[dict[str, Any]]:
    """Every coverage-information of the answer is valid; the parts of those made by a decision (the others
    say that no policy of this service assesses the order)."""
    parts = []
    for ext in extensions(result):
        assert coverage_information_errors(ext, version) == [], ext
        found = {p["url"]: p for p in ext["extension"]}
        if not found["reason"]["valueCodeableConcept"]["text"].startswith("Not assessed"):
            parts.append(found)
    return parts


def in_version(body: dict[str, Any], version: str) -> dict[str, Any]:
    """``body`` asking for CRD ``version`` (2.0.1: as it is; 2.2.1: requestedVersion 2.2)."""
    if version == "2.2.1":
        body["extension"] = {"davinci-crd.requestedVersion": "2.2"}
    return body

"""What the DTR tests share: an EHR's FHIR server (in memory, behind httpx.MockTransport), and a DTR client's
steps: read the CRD answer, ask for the package, complete the draft as a clinician would."""

from __future__ import annotations

import copy
import datetime as dt
import json
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx

from .support import FIXTURES, load

EHR = "http://127.0.0.1:18849/fhir"
COVERAGE_INFO = "http://hl7.org/fhir/us/davinci-crd/StructureDefinition/ext-coverage-information"
DTR = "http://hl7.org/fhir/us/davinci-dtr/StructureDefinition/"
SIGN = "/cds-services/coverage-requirements-order-sign"
PACKAGE = "/fhir/Questionnaire/$questionnaire-package"


class FhirServer:
    """A small FHIR server: search by type with patient, status, code and _id; create (POST)."""

    def __init__(self, resources: list[dict[str, Any]] | None = None) -> None:
        self.resources = list(resources or [])
        self.searches: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = urlsplit(str(request.url)).path.split("/fhir/", 1)[1].strip("/")
        if request.method == "POST":
            resource = json.loads(request.content)
            resource["id"] = resource.get("id") or uuid.uuid4().hex[:12]
            self.resources.append(resource)
            return httpx.Response(201, json=resource)
        self.searches.append(f"{path}?{request.url.query.decode()}")
        hits = [r for r in self.resources if r["resourceType"] == path]
        for name, value in parse_qsl(request.url.query.decode()):
            if name == "patient":
                want = value if "/" in value else f"Patient/{value}"
                hits = [r for r in hits if want in {(r.get(k) or {}).get("reference") for k in
                                                    ("subject", "patient", "beneficiary")}]
            elif name == "status":
                hits = [r for r in hits if r.get("status") in value.split(",")]
            elif name == "_id":
                hits = [r for r in hits if r.get("id") in value.split(",")]
            elif name == "code":
                tokens = {tuple(t.rsplit("|", 1)) for t in value.split(",")}
                hits = [r for r in hits if tokens & {(c.get("system"), c.get("code"))
                                                      for c in (r.get("code") or {}).get("coding", [])}]
        return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset", "total": len(hits),
                                         "entry": [{"resource": r} for r in hits]})


def hook(name: str, *, server: bool = True) -> dict[str, Any]:
    """A request fixture as a CRD 2.2 order-sign call (a fresh hookInstance), reading the EHR's FHIR server for
    what its prefetch lacks (the completed forms)."""
    body: dict[str, Any] = copy.deepcopy(load(FIXTURES / "requests" / f"{name}.json"))
    body["hookInstance"] = str(uuid.uuid4())
    body["extension"] = {"davinci-crd.requestedVersion": "2.2"}
    if server:
        body["fhirServer"] = EHR
        body["fhirAuthorization"] = {"access_token": "ehr-token", "token_type": "Bearer", "expires_in": 300,
                                     "scope": "patient/*.read", "subject": "cds-service"}
    return body


def coverage_info(response: Mapping[str, Any], reference: str) -> dict[str, Any]:
    """The coverage-information of one order in a CDS Hooks answer, as {sub-extension url: value}."""
    for action in response["systemActions"]:
        resource = action["resource"]
        if f"{resource['resourceType']}/{resource['id']}" == reference:
            ext = next(e for e in resource["extension"] if e["url"] == COVERAGE_INFO)
            return {p["url"]: next(v for k, v in p.items() if k.startswith("value")) for p in ext["extension"]
                    if any(k.startswith("value") for k in p)} | {"_order": resource}
    raise AssertionError(f"no coverage information for {reference}")


def package_request(body: Mapping[str, Any], info: Mapping[str, Any], *, questionnaire: bool = True) -> dict[str, Any]:
    """The $questionnaire-package Parameters a DTR client sends after CRD (DTR 2.2 spec-107)."""
    coverage = next(e["resource"] for e in body["prefetch"]["coverage"]["entry"])
    params: list[dict[str, Any]] = [{"name": "coverage", "resource": coverage},
                                    {"name": "order", "resource": info["_order"]}]
    if questionnaire:
        params.append({"name": "questionnaire", "valueCanonical": info["questionnaire"]})
    params.append({"name": "context", "valueString": info["coverage-assertion-id"]})
    return {"resourceType": "Parameters", "parameter": params}


def bundle_of(package: Mapping[str, Any]) -> dict[str, Any]:
    (bundle,) = [p["resource"] for p in package["parameter"] if p["name"] == "packagebundle"]
    return bundle  # type: ignore[no-any-return]


def answers(qr: Mapping[str, Any]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for item in qr.get("item") or []:
        out[item["linkId"]] = [next(v for k, v in a.items() if k.startswith("value")) for a in item.get("answer", [])]
    return out


def pick(bundle: Mapping[str, Any], item: str, display: str) -> dict[str, Any]:
    """The coding a clinician picks by its display from the item's answer ValueSet in the package."""
    q = bundle["entry"][0]["resource"]
    wanted = next(i for i in q["item"] if i["linkId"] == item)["answerValueSet"].split("|")[0]
    vs = next(e["resource"] for e in bundle["entry"] if e["resource"].get("url") == wanted)
    return dict(next(c for c in vs["expansion"]["contains"] if c["display"] == display))


def complete(bundle: Mapping[str, Any], typed: Mapping[str, Any], *, status: str = "completed",
             author: str = "Practitioner/dr1") -> dict[str, Any]:
    """The draft, completed: the payer's answers kept (auto-server), the typed ones added (manual, with the
    author), status and authoring set, as a DTR client stores it."""
    draft: dict[str, Any] = copy.deepcopy(next(e["resource"] for e in bundle["entry"]
                                               if e["resource"]["resourceType"] == "QuestionnaireResponse"))
    items = {i["linkId"]: i for i in draft.get("item", [])}
    manual = {"url": DTR + "information-origin", "extension": [
        {"url": "source", "valueCode": "manual"},
        {"url": "author", "extension": [{"url": "practitioner", "valueReference": {"reference": author}}]}]}
    for link_id, value in typed.items():
        key = {bool: "valueBoolean", int: "valueInteger", dict: "valueCoding"}.get(type(value), "valueString")
        if key == "valueString" and len(str(value)) == 10 and str(value)[4] == "-":
            key = "valueDate"
        if key == "valueString" and "T" in str(value):
            key = "valueDateTime"
        items[link_id] = {"linkId": link_id, "answer": [{"extension": [manual], key: value}]}
    draft["item"] = list(items.values())
    draft["id"] = uuid.uuid4().hex[:12]
    draft["status"] = status
    draft["author"] = {"reference": author}
    draft["authored"] = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
    return draft

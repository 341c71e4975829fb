"""The Da Vinci CRD versions this service answers in, and every difference between them, as data.

A client asks for a version with ``extension."davinci-crd.requestedVersion"`` (major.minor, CRD 2.2
dev-3); without it, the client is a CRD 2.0.1 client (2.0.1 has no such extension) and gets 2.0.1
answers. Any other value is refused (the request parser answers 422). Nothing else in the service tests
a version: it reads the fields of the :class:`CrdVersion` it was handed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

REQUESTED_VERSION = "davinci-crd.requestedVersion"
CRD_TEMP = "http://hl7.org/fhir/us/davinci-crd/CodeSystem/temp"
CARD_TYPES = "http://terminology.hl7.org/CodeSystem/cdshooks-card-type"
NULL_FLAVOR = "http://terminology.hl7.org/CodeSystem/v3-NullFlavor"
COVERAGE_DETAIL = "http://terminology.hl7.org/CodeSystem/crd-coverage-detail"


@dataclass(frozen=True)
class CrdVersion:
    """What differs between the CRD versions, for the answers this service gives."""

    key: str  # major.minor, as declared in discovery and requested by clients
    label: str  # the IG version the answers follow
    #: ``source.topic`` of the cards: the card type "coverage-info"
    card_topic: Mapping[str, str]
    #: ``covered`` when the EHR's data could not be read (2.2.1 resp-43: indeterminate)
    technical_covered: str
    #: ``covered`` for an order no policy of this service assesses (hook-16: primary hooks always carry
    #: coverage information): 2.0.1 has only conditional (with info-needed and a reason), 2.2.1 indeterminate
    not_assessed_covered: str
    #: the ``reason`` coding when the EHR's data could not be read
    technical_reason: Mapping[str, str]
    #: which elements being ``conditional`` call for ``info-needed`` (crd-ci-q3 differs between versions)
    info_needed_when: frozenset[str]
    #: a ``detail`` naming the policy page (2.2.1: code policy-link, category, value url); None: not sent
    policy_link_detail: Mapping[str, str] | None
    #: hook-13: a request whose primary Coverage names no payer this deployment handles is refused
    checks_payer: bool
    #: ``coverage-info: false`` also suppresses the coverage-information systemActions (2.2.1 dev-14)
    configuration_covers_system_actions: bool


CRD_2_0 = CrdVersion(
    key="2.0",
    label="2.0.1",
    card_topic={"system": CRD_TEMP, "code": "coverage-info", "display": "Coverage Information"},
    technical_covered="conditional",
    not_assessed_covered="conditional",
    # CRD 2.0.1's coverageAssertionReasons (extensible) has no code for it; NullFlavor "temporarily unavailable"
    technical_reason={"system": NULL_FLAVOR, "code": "NAV", "display": "temporarily unavailable"},
    info_needed_when=frozenset({"covered"}),
    policy_link_detail=None,
    checks_payer=False,
    configuration_covers_system_actions=False,
)
CRD_2_2 = CrdVersion(
    key="2.2",
    label="2.2.1",
    card_topic={"system": CARD_TYPES, "code": "coverage-info", "display": "Coverage Information"},
    technical_covered="indeterminate",
    not_assessed_covered="indeterminate",
    technical_reason={"system": CRD_TEMP, "code": "technical", "display": "Technical issue"},
    info_needed_when=frozenset({"covered", "pa-needed", "doc-needed"}),
    policy_link_detail={"category": "cat-other", "system": COVERAGE_DETAIL, "code": "policy-link",
                        "display": "Policy link"},
    checks_payer=True,
    configuration_covers_system_actions=True,
)
VERSIONS = {v.key: v for v in (CRD_2_0, CRD_2_2)}
DEFAULT = CRD_2_0
_PATCH = re.compile(r"^(\d+\.\d+)\.\d+$")


def declared() -> list[str]:
    """The versions every service declares in discovery (``davinci-crd.version``)."""
    return list(VERSIONS)


def requested_version(extension: Any) -> CrdVersion | None:
    """The version a request asks for in its root ``extension``: absent means a CRD 2.0.1 client; None
    when the value is not a version served. A patch-level value of a served version ("2.2.1") is read as
    its major.minor."""
    if not isinstance(extension, Mapping) or REQUESTED_VERSION not in extension:
        return DEFAULT
    value = extension[REQUESTED_VERSION]
    if not isinstance(value, str):
        return None
    key = value.strip()
    patch = _PATCH.match(key)
    return VERSIONS.get(patch.group(1) if patch else key)


def unsupported_version_message(value: Any) -> str:
    served = " and ".join(f'"{k}" (CRD {v.label})' for k, v in VERSIONS.items())
    return (f"extension.{REQUESTED_VERSION} {value!r} is not a CRD version this service answers in; it answers in "
            f"{served}, and in CRD {DEFAULT.label} to a request without {REQUESTED_VERSION}")

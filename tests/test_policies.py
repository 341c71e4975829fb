"""Policy files and terminology: strict loading, and code matching across systems and spellings."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from cds_service.engine.policy import PolicyError, load_policies
from cds_service.paths import data_dir
from cds_service.terminology import CodeSystems, Coding, Concept, ValueSet

POLICIES = data_dir("policies")


@pytest.fixture(scope="module")
def systems() -> CodeSystems:
    return CodeSystems.load(POLICIES / "code-systems.yaml")


def vs(systems: CodeSystems, **codes: list[str]) -> ValueSet:
    text = codes.pop("text", [])
    return ValueSet("t", "test", systems, codes, text)


@pytest.mark.parametrize(("entry", "code", "expected"), [
    ("G89.2", "G89.29", True), ("G89.2", "G8921", True), ("G89.2", "G89.4", False),
    ("G35", "G35.C0", True), ("C00-C96", "C50.911", True), ("C00-C96", "C97", False),
    ("C00-C96", "Z85.3", False), ("S06.*S", "S06.2X9S", True), ("S06.*S", "S06.2X9A", False),
    ("I69.35", "I69.351", True), ("I69.35", "I69.311", False), ("G80.1", " g80.1 ", True),
])
def test_icd10_entries_match_their_descendants(systems: CodeSystems, entry: str, code: str, expected: bool) -> None:
    assert vs(systems, icd10cm=[entry]).contains(Coding("icd10cm", code)) is expected


@pytest.mark.parametrize("uri", [
    "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets", "https://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets",
    "urn:oid:2.16.840.1.113883.6.285", "https://bluebutton.cms.gov/resources/codesystem/hcpcs",
])
def test_the_four_hcpcs_uris_are_one_system(systems: CodeSystems, uri: str) -> None:
    coding = systems.coding({"system": uri, "code": "E0783"})
    assert coding is not None and vs(systems, hcpcs=["E0783"]).contains(coding)


def test_both_rxnorm_spellings_are_one_system(systems: CodeSystems) -> None:
    for uri in ("http://www.nlm.nih.gov/research/umls/rxnorm", "http://www.nlm.nih.gov/research/umls/CodeSystem/rxnorm"):
        assert systems.short_name(uri) == "rxnorm"


def test_snomed_is_exact_and_unknown_systems_never_match(systems: CodeSystems) -> None:
    sets = vs(systems, snomed=["82423001"])
    assert sets.contains(Coding("snomed", "82423001"))
    assert not sets.contains(Coding("snomed", "8242300"))
    assert systems.coding({"system": "http://example.org/local", "code": "82423001"}) == Coding(
        "http://example.org/local", "82423001")
    assert not sets.contains(Coding("http://example.org/local", "82423001"))


def test_text_matches_whole_words_only(systems: CodeSystems) -> None:
    ketamine = vs(systems, rxnorm=["6130"], text=["ketamine"])
    assert ketamine.match(Concept((), "Ketamine infusion")) == 'text "Ketamine"'
    assert ketamine.match(Concept((), "esketamine nasal spray")) is None
    assert ketamine.match(Concept((), "S-ketamine")) is None


def broken_copy(tmp_path: Path, edit: str, replacement: str) -> Path:
    target = tmp_path / "policies"
    shutil.copytree(POLICIES, target)
    path = target / "mp-442.yaml"
    text = path.read_text()
    assert edit in text
    path.write_text(text.replace(edit, replacement, 1))
    return target


@pytest.mark.parametrize(("edit", "replacement", "message"), [
    ("      - indication_in: [headache]", "      - indication_like: [headache]",
     "unknown criterion kind 'indication_like'"),
    ("      - indication_in: [headache]", "      - indication_in: [headaches]", "unknown value set 'headaches'"),
    ("    cpt: [\"62350\"", "    cpt4: [\"62350\"", "unknown key(s) ['cpt4']"),
    ("    outcome: not-covered\n    summary: \"pump for headache",
     "    outcome: denied\n    summary: \"pump for headache", "outcome must be one of"),
    ("          more_than_percent: 50", "          more_than_percent: 150", "more_than_percent"),
    ("          more_than_percent: 50", "          more_than_pct: 50", "unknown parameter(s) ['more_than_pct']"),
    ("  latest_review: \"2024-08\"", "  latest_reveiw: \"2024-08\"", "unknown key(s) ['latest_reveiw']"),
    ("    icd10cm: [G24]", "    icd10cm: [C00-D96]", "bad ICD-10-CM range"),
])
def test_policy_mistakes_are_startup_errors_that_name_them(tmp_path: Path, edit: str, replacement: str,
                                                           message: str) -> None:
    with pytest.raises(PolicyError) as error:
        load_policies(broken_copy(tmp_path, edit, replacement))
    assert message in str(error.value)
    assert "mp-442.yaml" in str(error.value)


def test_every_rule_cites_a_clause_and_every_summary_fits_a_card() -> None:
    policy_set = load_policies(POLICIES)
    for policy in policy_set.policies:
        for rule in policy.rules:
            assert rule.clause
            for summary in rule.summaries.values():
                line = f"Not covered: {summary.replace('{drug}', 'lidocaine')} ({policy.id})"
                assert len(line) < 140, (rule.id, line)


def test_policy_files_read_as_the_policy() -> None:
    data = yaml.safe_load((POLICIES / "mp-446.yaml").read_text())
    assert data["policy"]["id"] == "MP-446"
    outcomes = {r["id"]: r["outcome"] for r in data["rules"]}
    assert outcomes["psychiatric-disorders"] == "not-covered" and outcomes["arrhythmia"] == "out-of-scope"

"""Policy files and terminology: strict loading, the source of every code, code matching across systems and
spellings, negation-aware text, and expansion files."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from cds_service.engine.policy import PolicyError, PolicySet, load_policies
from cds_service.paths import data_dir
from cds_service.terminology import (
    CodeBlock,
    CodeSystems,
    Coding,
    Concept,
    TerminologyError,
    TextRules,
    ValueSet,
    load_expansion,
)

POLICIES = data_dir("policies")


@pytest.fixture(scope="module")
def systems() -> CodeSystems:
    return CodeSystems.load(POLICIES / "code-systems.yaml")


@pytest.fixture(scope="module")
def rules() -> TextRules:
    return TextRules.load(POLICIES / "text-matching.yaml")


def vs(systems: CodeSystems, text: list[str] | None = None, rules: TextRules | None = None,
       text_match: str = "when-uncoded", **codes: list[str]) -> ValueSet:
    return ValueSet("t", "test", systems, [CodeBlock("defined in the test", codes)], text=text or [], text_rules=rules,
                    text_match=text_match)


@pytest.mark.parametrize(("entry", "code", "expected"), [
    ("G89.2", "G89.29", True), ("G89.2", "G8921", True), ("G89.2", "G89.4", False),
    ("G35", "G35.C0", True), ("C00-C96", "C50.911", True), ("C00-C96", "C97", False),
    ("C00-C96", "Z85.3", False), ("S06.*S", "S06.2X9S", True), ("S06.*S", "S06.2X9A", False),
    ("I69.35", "I69.351", True), ("I69.35", "I69.311", False), ("G80.1", " g80.1 ", True),
])
def test_icd10_entries_match_their_descendants(systems: CodeSystems, entry: str, code: str, expected: bool) -> None:
    assert vs(systems, icd10cm=[entry]).contains(Coding("icd10cm", code)) is expected


def test_icd10_excludes_take_out_their_descendants(systems: CodeSystems) -> None:
    from cds_service.terminology import CodeBlock

    diabetes = ValueSet("d", "diabetes", systems, [CodeBlock("test", {"icd10cm": ["E10-E13"]})],
                        [CodeBlock("painful neuropathy is pain", {"icd10cm": ["E11.4"]})])
    assert diabetes.contains(Coding("icd10cm", "E11.9"))
    assert not diabetes.contains(Coding("icd10cm", "E11.42"))


def test_an_absurdly_long_code_is_refused_at_once(systems: CodeSystems) -> None:
    sets = vs(systems, icd10cm=["G89.2", "S06.*S"])
    started = time.perf_counter()
    for _ in range(100):
        assert not sets.contains(Coding("icd10cm", "G89.2" + "9" * 80_000))
    assert time.perf_counter() - started < 1.0


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


def test_a_single_coding_object_is_read_as_a_list_of_one(systems: CodeSystems) -> None:
    concept = systems.concept({"coding": {"system": "http://snomed.info/sct", "code": "82423001"}})
    assert concept.codings == (Coding("snomed", "82423001"),)
    assert systems.concept({"coding": 42}).codings == ()


def test_text_matches_whole_words_only(systems: CodeSystems) -> None:
    ketamine = vs(systems, rxnorm=["6130"], text=["ketamine"])
    assert ketamine.match(Concept((), "Ketamine infusion")) == 'text "Ketamine"'
    assert ketamine.match(Concept((), "esketamine nasal spray")) is None
    assert ketamine.match(Concept((), "S-ketamine")) is None


@pytest.mark.parametrize(("text", "found"), [
    ("intolerable sedation", "intolerable"),
    ("stopped: could not tolerate, drowsy", "could not tolerate"),
    ("no side effects; stopped because of cost", None),
    ("patient denies any side effects", None),
    ("did not have side effects", None),
    ("no nausea. Severe side effects at 20 mg", "side effects"),
    ("side effects ruled out", None),
    ("no relief after 3 months", "no relief"),
])
def test_text_is_read_negation_aware(systems: CodeSystems, rules: TextRules, text: str, found: str | None) -> None:
    reasons = vs(systems, text=["intolerable", "could not tolerate", "side effects", "no relief"], rules=rules)
    match = reasons.find(Concept((), text))
    assert (match.phrase if match else None) == found


def test_a_coded_value_beats_text_unless_the_set_reads_product_names(systems: CodeSystems) -> None:
    pain = vs(systems, icd10cm=["G89.2"], text=["chronic pain"])
    coded_otherwise = Concept((Coding("icd10cm", "I10", "Essential hypertension"),), "chronic pain")
    assert pain.find(coded_otherwise) is None
    vendor_only = Concept((Coding("urn:oid:1.2.3", "77", "Chronic pain"),))
    assert pain.find(vendor_only) is not None and pain.find(vendor_only).via_text  # type: ignore[union-attr]
    drug = vs(systems, rxnorm=["6130"], text=["ketamine"], text_match="always")
    assert drug.find(Concept((Coding("rxnorm", "1740010", "ketamine 50 MG/ML Injectable Solution"),))) is not None


# --- the source of every code ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def policy_set() -> PolicySet:
    return load_policies(POLICIES)


def _all_value_sets(policy_set: PolicySet) -> dict[str, ValueSet]:
    return {name: vs for policy in policy_set.policies for name, vs in policy.value_sets.items()}


def test_every_value_set_code_comes_from_a_named_source(policy_set: PolicySet) -> None:
    sets = _all_value_sets(policy_set)
    assert len(sets) > 50
    expansion_names = {p.relative_to(POLICIES).as_posix() for p in (POLICIES / "valuesets").glob("*.json")}
    for name, value_set in sets.items():
        assert value_set.provenance or value_set.text, name
        for (system, code), sources in value_set.provenance.items():
            assert sources and all(s.strip() for s in sources), (name, system, code)
            for source in sources:
                if source.startswith("expansion "):
                    assert source.split()[1] in expansion_names, (name, source)


def test_every_expansion_file_is_used_and_documented(policy_set: PolicySet) -> None:
    """Each file in valuesets/ is an expansion a value set takes whole, or the named source of a curated block;
    and SOURCES.md says where it came from."""
    documented = (POLICIES / "valuesets" / "SOURCES.md").read_text()
    sources = {s for vs in _all_value_sets(policy_set).values() for found in vs.provenance.values() for s in found}
    used = {Path(s.split()[1]).name for s in sources if s.startswith("expansion ")}
    for path in sorted((POLICIES / "valuesets").glob("*.json")):
        assert path.name in used or any(path.name in s for s in sources), path.name
        assert path.name in documented, path.name


@pytest.mark.parametrize(("content", "message"), [
    ("not json", "not valid JSON"),
    (json.dumps({"resourceType": "CodeSystem"}), "not a FHIR ValueSet"),
    (json.dumps({"resourceType": "ValueSet", "compose": {}}), "has no expansion.contains"),
    (json.dumps({"resourceType": "ValueSet", "expansion": {"contains": [{"system": "http://snomed.info/sct"}]}}),
     "lacks a system or a code"),
    (json.dumps({"resourceType": "ValueSet", "expansion": {"contains": {"code": "1"}}}), "must be a list"),
    (json.dumps({"resourceType": "ValueSet", "expansion": {"contains": [
        {"system": "http://snomed.info/sct", "code": "1", "inactive": True}]}}), "no active codes"),
])
def test_the_loader_rejects_a_malformed_expansion(tmp_path: Path, systems: CodeSystems, content: str,
                                                  message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(TerminologyError) as error:
        load_expansion(path, systems)
    assert message in str(error.value) and "bad.json" in str(error.value)


def test_an_expansion_is_read_with_nested_contains(tmp_path: Path, systems: CodeSystems) -> None:
    path = tmp_path / "vs.json"
    path.write_text(json.dumps({"resourceType": "ValueSet", "url": "http://example.org/vs", "expansion": {"contains": [
        {"system": "http://snomed.info/sct", "code": "1",
         "contains": [{"system": "http://snomed.info/sct", "code": "2"}]},
        {"system": "http://terminology.hl7.org/CodeSystem/icd9cm", "code": "338.29"}]}}))
    expansion = load_expansion(path, systems)
    assert expansion.codes == {"snomed": ("1", "2")}
    assert expansion.other_systems == {"http://terminology.hl7.org/CodeSystem/icd9cm": 1}


# --- strict loading -----------------------------------------------------------------------------------


def broken_copy(tmp_path: Path, edit: str, replacement: str, file: str = "mp-442.yaml") -> Path:
    target = tmp_path / "policies"
    shutil.copytree(POLICIES, target)
    path = target / file
    text = path.read_text()
    assert edit in text
    path.write_text(text.replace(edit, replacement, 1))
    return target


@pytest.mark.parametrize(("edit", "replacement", "message"), [
    ("      - indication_in: [headache]", "      - indication_like: [headache]",
     "unknown criterion kind 'indication_like'"),
    ("      - indication_in: [headache]", "      - indication_in: [headaches]", "unknown value set 'headaches'"),
    ("        cpt:\n          - \"62367\"", "        cpt4:\n          - \"62367\"", "unknown key 'cpt4'"),
    ("    outcome: not-covered\n    summary: \"pump for headache",
     "    outcome: denied\n    summary: \"pump for headache", "outcome must be one of"),
    ("                  more_than_percent: 50", "                  more_than_percent: 150", "more_than_percent"),
    ("                  more_than_percent: 50", "                  more_than_pct: 50",
     "unknown parameter(s) ['more_than_pct']"),
    ("  latest_review: \"2024-08\"", "  latest_reveiw: \"2024-08\"", "unknown key(s) ['latest_reveiw']"),
    ("        snomed: [\"38239002\"]", "        icd10cm: [\"C00-D96\"]", "bad ICD-10-CM range"),
    ("      - source: \"MP-442 policy text, CURRENT CODING (text/MP-442.txt)\"",
     "      - source: \"\"", "needs a 'source'"),
    ("    missing:\n      - a diagnosis establishing",
     "    missing: [a diagnosis establishing the origin (for example, MS)]\n"
     "    notes:\n      - a diagnosis establishing", "unknown key(s) ['notes']"),
    ("          indication: pain\n", "          indication: migraine\n", "no approval in the table"),
    ("      - drug: ziconotide\n", "      - drug: ziconotides\n", "unknown value set 'ziconotides'"),
])
def test_policy_mistakes_are_startup_errors_that_name_them(tmp_path: Path, edit: str, replacement: str,
                                                           message: str) -> None:
    directory = broken_copy(tmp_path, edit, replacement)
    with pytest.raises(PolicyError) as error:
        load_policies(directory)
    assert message in str(error.value)
    assert "mp-442.yaml" in str(error.value)


def test_a_yaml_flow_list_that_splits_a_sentence_is_refused(tmp_path: Path) -> None:
    directory = broken_copy(tmp_path, "    missing:\n      - a diagnosis MP-442 recognises as the pump's indication",
                            "    missing: [a diagnosis MP-442 recognises (pain, spasticity, or cancer)]\n"
                            "    reasoning: >-\n      a diagnosis MP-442 recognises as the pump's indication")
    with pytest.raises(PolicyError) as error:
        load_policies(directory)
    assert "unbalanced brackets" in str(error.value)


def test_a_missing_shared_file_is_named(tmp_path: Path) -> None:
    target = tmp_path / "policies"
    shutil.copytree(POLICIES, target)
    (target / "condition-status.yaml").unlink()
    with pytest.raises(PolicyError, match=r"condition-status\.yaml is missing"):
        load_policies(target)


def test_every_rule_cites_a_clause_and_every_summary_fits_a_card(policy_set: PolicySet) -> None:
    for policy in policy_set.policies:
        for rule in policy.rules:
            assert rule.clause
            for summary in rule.summaries.values():
                line = f"Not covered: {summary.replace('{drug}', 'lidocaine')} ({policy.id})"
                assert len(line) < 140, (rule.id, line)
        for name, wording in policy.outcomes.items():
            assert len(f"Conditional: {wording.summary} ({policy.id})") < 140, name


def test_each_policy_has_a_version_that_changes_with_its_files(tmp_path: Path, policy_set: PolicySet) -> None:
    versions = {p.id: p.version for p in policy_set.policies}
    assert versions["MP-442"].startswith("MP-442|2024-08|")
    changed = load_policies(broken_copy(tmp_path, "  category: Surgery", "  category: Surgery  # edited"))
    assert {p.id: p.version for p in changed.policies}["MP-442"] != versions["MP-442"]
    assert {p.id: p.version for p in changed.policies}["MP-446"] == versions["MP-446"]


def test_a_change_to_a_documentation_form_is_a_new_policy_version(tmp_path: Path, policy_set: PolicySet) -> None:
    """Completed forms become evidence through the forms' extraction rules: a decision is reproducible only
    with the same forms."""
    versions = {p.id: p.version for p in policy_set.policies}
    changed = load_policies(broken_copy(tmp_path, "form:\n", "form:  # edited\n", file="forms/mp-442.yaml"))
    assert all(p.version != versions[p.id] for p in changed.policies)

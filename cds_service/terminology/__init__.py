"""Terminology: code systems, value sets (with the source of every code), FHIR expansion files, and
negation-aware reading of free text."""

from .expansions import Expansion, load_expansion
from .systems import CodeSystem, CodeSystems, Coding, Concept, TerminologyError
from .text import PhraseMatcher, TextRules
from .valuesets import CodeBlock, Match, ValueSet, normalise_icd10

__all__ = [
    "CodeBlock", "CodeSystem", "CodeSystems", "Coding", "Concept", "Expansion", "Match", "PhraseMatcher",
    "TerminologyError", "TextRules", "ValueSet", "load_expansion", "normalise_icd10",
]

"""The shape of the code: the layering README states (read from the package's own imports), no import loop,
no dead code, and tests that take their helpers from tests/support.py."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from .support import ROOT

PACKAGE = ROOT / "cds_service"
TESTS = ROOT / "tests"

# README, "Architecture": each layer imports only the layers below it and the infrastructure; the entry points
# reach the engine and the FHIR data only through the service layer; the infrastructure imports no layer.
LAYERS: list[set[str]] = [
    {"web", "cli", "__main__"},  # entry points: HTTP, the command line
    {"hooks", "dtr"},  # the service without HTTP: CDS Hooks and CRD; the DTR documentation forms
    {"engine"},  # decisions under the policy files
    {"fhir", "terminology"},  # FHIR data access; code systems and value sets
]
INFRASTRUCTURE = {"auth", "storage", "observability", "config", "errors", "urls", "jsonutil", "paths"}
#: imports between packages of one layer, in the one direction allowed
WITHIN_A_LAYER = {("hooks", "dtr"), ("__main__", "cli")}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(module: str, path: Path, known: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """The package's modules ``module`` imports (anywhere in it: at the top, in a function, for type checking
    only), with the line."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found = set()
        for name in names:
            while name and name not in known:  # a name imported from a module, not a module itself
                name = name.rpartition(".")[0]
            if name and name != module and name != "cds_service":
                found.add(name)
        for name in sorted(found):
            yield name, node.lineno


def unit(module: str) -> str:
    """The package (or top-level module) of ``cds_service`` a module belongs to."""
    return module.split(".")[1]


def layer_of(name: str) -> int | None:
    return next((i for i, layer in enumerate(LAYERS) if name in layer), None)


def import_problem(source: str, target: str) -> str | None:
    """Why ``source`` may not import ``target`` (packages of cds_service), or None."""
    if source == target or target in INFRASTRUCTURE:
        return None
    if source in INFRASTRUCTURE:
        return "the infrastructure imports no layer"
    here, there = layer_of(source), layer_of(target)
    if here is None or there is None:
        return "a package README's layering does not name"
    if here == there:
        return None if (source, target) in WITHIN_A_LAYER else "an import within a layer, against its direction"
    if there < here:
        return "an import of a layer above"
    if here == 0 and there > 1:
        return "an entry point reaching past the service layer"
    return None


def test_every_package_has_its_place_in_the_layering() -> None:
    units = {unit(m) for m in modules() if m != "cds_service"}
    placed = set().union(*LAYERS) | INFRASTRUCTURE
    assert units == placed, (sorted(units - placed), sorted(placed - units))


def test_imports_follow_the_layering() -> None:
    known = modules()
    wrong = []
    for module, path in known.items():
        for target, line in imports(module, path, known):
            if module == "cds_service":
                continue
            problem = import_problem(unit(module), unit(target))
            if problem:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {module} imports {target}: {problem}")
    assert wrong == []


def test_the_layering_check_catches_what_it_should() -> None:
    assert import_problem("engine", "hooks") == "an import of a layer above"
    assert import_problem("web", "engine") == "an entry point reaching past the service layer"
    assert import_problem("dtr", "hooks") == "an import within a layer, against its direction"
    assert import_problem("storage", "web") == "the infrastructure imports no layer"
    assert import_problem("web", "hooks") is None and import_problem("hooks", "fhir") is None
    assert import_problem("fhir", "errors") is None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_loop() -> None:
    """No module imports, however indirectly or late (inside a function), a module that imports it."""
    known = modules()
    graph = {module: {target for target, _ in imports(module, path, known)} for module, path in known.items()}
    assert cycles(graph) == []


def test_the_loop_check_finds_a_loop() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_dead_code() -> None:
    """vulture (60 % confidence and above: unused functions, methods, classes, attributes, variables) finds
    nothing in the package but what tests/dead-code-allowlist.txt names, each with its reason."""
    allowlist = TESTS / "dead-code-allowlist.txt"
    names = [line.strip() for line in allowlist.read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.startswith("#")]
    result = subprocess.run([sys.executable, "-m", "vulture", str(PACKAGE), "--min-confidence", "60",
                             "--ignore-names", ",".join(names)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_tests_take_helpers_from_support_not_from_tests_or_conftest() -> None:
    wrong = []
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level and node.module:
                if node.module == "conftest" or node.module.startswith("test_"):
                    wrong.append(f"{path.name}:{node.lineno}: from .{node.module}")
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tests."):
                name = node.module.split(".")[1]
                if name == "conftest" or name.startswith("test_"):
                    wrong.append(f"{path.name}:{node.lineno}: from {node.module}")
    assert wrong == []

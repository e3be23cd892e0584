"""The import rules of the architecture (`Packages and what may import what`), enforced.

    guardrail  -> detectors, storage, dashboards   (the composition root)
    storage    -> detectors.types
    dashboards -> detectors.types
    detectors  -> numpy, OpenCV, scikit-image; torch, transformers, onnxruntime only in
                  detectors/scorers (and the reference model's training code in guardrail)

Read from the source with `ast` (imports inside functions count), so a new module that breaks
a rule fails here before anyone reviews it; and imported for real in fresh interpreters, so that
the service's proxy path and `import detectors` never pull in a deep-learning framework.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("detectors", "storage", "dashboards", "guardrail")
HEAVY = ("torch", "transformers", "onnxruntime", "onnx", "safetensors", "tokenizers")


@dataclass(frozen=True)
class Import:
    module: str  # the importing module's file, relative to ROOT
    target: str  # the imported module's dotted name
    line: int
    top_level: bool  # at module level (runs at import time), not inside a function


def _imports(path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[Import] = []
    rel = str(path.relative_to(ROOT))

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend(
                    Import(rel, a.name, child.lineno, not in_function) for a in child.names
                )
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append(Import(rel, child.module, child.lineno, not in_function))
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                continue  # annotations only: never imported at run time
            visit(child, inside)

    visit(tree, False)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _all_imports() -> list[Import]:
    out: list[Import] = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            out.extend(_imports(path))
    return out


IMPORTS = _all_imports()


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def _violations(package: str, allowed: tuple[str, ...]) -> list[str]:
    """Imports from `package` of this project's modules other than `allowed` (dotted prefixes)."""
    bad = []
    for imp in IMPORTS:
        if _top(imp.module.replace("/", ".")) != package or _top(imp.target) not in PACKAGES:
            continue
        if not any(imp.target == a or imp.target.startswith(a + ".") for a in allowed):
            bad.append(f"{imp.module}:{imp.line} imports {imp.target}")
    return bad


def test_the_scanner_sees_imports_inside_functions_and_skips_type_checking(
    tmp_path: Path,
) -> None:
    module = ROOT / "detectors" / "_layering_probe.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "import numpy\n"
        "if TYPE_CHECKING:\n    from guardrail.config import Settings\n"
        "def f():\n    import torch\n    from storage import queue\n"
    )
    try:
        got = {(i.target, i.top_level) for i in _imports(module)}
    finally:
        module.unlink()
    assert got == {("typing", True), ("numpy", True), ("torch", False), ("storage", False)}


def test_detectors_is_a_library_that_imports_nothing_of_the_service() -> None:
    assert _violations("detectors", ("detectors",)) == []


def test_storage_knows_only_the_domain_types() -> None:
    assert _violations("storage", ("storage", "detectors.types")) == []


def test_dashboards_render_domain_data_and_open_no_database() -> None:
    assert _violations("dashboards", ("dashboards", "detectors.types")) == []


def test_frameworks_are_imported_at_module_level_only_by_the_model_code() -> None:
    allowed = ("detectors/scorers/", "guardrail/reference/")
    bad = [
        f"{i.module}:{i.line} imports {i.target} at import time"
        for i in IMPORTS
        if _top(i.target) in HEAVY and i.top_level and not i.module.startswith(allowed)
    ]
    assert bad == []
    # and outside detectors/scorers, detectors never imports them at all
    library = [
        f"{i.module}:{i.line} imports {i.target}"
        for i in IMPORTS
        if _top(i.target) in HEAVY
        and i.module.startswith("detectors/")
        and not i.module.startswith("detectors/scorers/")
    ]
    assert library == []


@pytest.mark.parametrize(
    "module",
    [
        "detectors",
        "storage",
        "dashboards",
        "guardrail.service.api",
        "guardrail.service.proxy",
        "guardrail.cli",
    ],
)
def test_importing_does_not_load_a_framework(module: str) -> None:
    """`import detectors` stays light, and the process serving the proxy loads no model code
    until an audit process does (the audit runs in child processes)."""
    code = f"import sys, {module}; print(sorted(set({HEAVY!r}) & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.strip()
    assert out == "[]", f"import {module} loaded {out}"

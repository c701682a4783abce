"""Every third-party module that src/notelab imports is a declared dependency of the package.

A plain ``pip install notelab`` must run everything: an import outside ``try ... except
ImportError`` (at module level or inside a function) needs its distribution in
``[project.dependencies]``; a guarded import (the code falls back or says which extra to
install) may instead live in an optional-dependency group. Imports under ``if TYPE_CHECKING:``
never run and are not counted.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "notelab"


def normalize(name: str) -> str:
    """PEP 503 name normalisation: ``Pillow`` and ``pillow``, ``scikit_learn`` and ``scikit-learn`` agree."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalize(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1))


def declared() -> tuple[set[str], set[str]]:
    """(runtime distributions, distributions of any extra) named in pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {requirement_name(r) for r in project.get("dependencies", [])}
    extras = {requirement_name(r) for group in project.get("optional-dependencies", {}).values() for r in group}
    return runtime, extras


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError", "Exception") for n in names)


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def third_party_imports(tree: ast.AST) -> list[tuple[str, int, bool]]:
    """(top-level module, line, guarded) for each import of a non-stdlib, non-notelab module."""
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, guarded: bool) -> None:
        if _is_type_checking(node):
            for child in node.orelse:  # only the else branch runs
                visit(child, guarded)
            return
        if isinstance(node, ast.Try):
            inner = guarded or any(_catches_import_error(h) for h in node.handlers)
            for child in node.body:
                visit(child, inner)
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                visit(child, guarded)
            return
        modules: list[str] = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        for module in modules:
            top = module.split(".")[0]
            if top not in sys.stdlib_module_names and top not in ("notelab", "__future__"):
                found.append((top, node.lineno, guarded))
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(tree, False)
    return found


def test_the_import_scanner_sees_guards_and_type_checking_blocks():
    code = (
        "import numpy, os\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import diffusers\n"
        "try:\n    import triton\nexcept ImportError:\n    triton = None\n"
        "def f():\n    from PIL import Image\n    try:\n        import uvicorn\n    except ValueError:\n        pass\n"
    )
    assert third_party_imports(ast.parse(code)) == [
        ("numpy", 1, False),
        ("triton", 6, True),
        ("PIL", 10, False),
        ("uvicorn", 12, False),
    ]
    assert requirement_name("triton>=3.2; sys_platform == 'linux'") == "triton"
    assert requirement_name("Scikit_Learn>=1.3") == "scikit-learn"


def test_every_third_party_import_in_src_is_a_declared_dependency():
    runtime, extras = declared()
    dists = packages_distributions()
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        where = path.relative_to(ROOT)
        for module, line, guarded in third_party_imports(ast.parse(path.read_text(), str(path))):
            names = {normalize(d) for d in dists.get(module, [])}
            if not names:
                problems.append(f"{where}:{line}: imports {module!r}, which no installed distribution provides")
            elif not names & runtime and not (guarded and names & extras):
                needed = "[project.dependencies]" + (" or an extra (the import is guarded)" if guarded else "")
                problems.append(f"{where}:{line}: imports {module!r} ({', '.join(sorted(names))}), not in {needed}")
    assert not problems, "\n".join(problems)


def test_sacrebleu_is_a_runtime_dependency():
    # notelab.seq's BLEU (notelab reproduce transformer-vs-rnn) imports it: a plain install must have it
    runtime, _ = declared()
    assert "sacrebleu" in runtime

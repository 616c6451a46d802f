"""The package's structure rules, checked on its source: layering (import-linter), no hidden imports, no private names
across modules. These read files only; they fail the moment someone adds a shortcut."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tftransfer"
LAZY_OK = {"cli.py", "__init__.py"}  # they name jobs through tftransfer.core.lazy, never with a local import


def _modules() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text())) for p in sorted(PACKAGE.rglob("*.py"))]


def _is_tftransfer(node: ast.AST) -> bool:
    if isinstance(node, ast.ImportFrom):
        return bool(node.module) and (node.module == "tftransfer" or node.module.startswith("tftransfer."))
    if isinstance(node, ast.Import):
        return any(a.name.startswith("tftransfer") for a in node.names)
    return False


def test_no_function_local_imports_of_tftransfer_modules():
    found = []
    for path, tree in _modules():
        top = {id(n) for n in tree.body}
        found += [f"{path.relative_to(PACKAGE)}:{n.lineno}" for n in ast.walk(tree)
                  if _is_tftransfer(n) and id(n) not in top]
    assert found == []


def test_no_private_names_imported_across_modules():
    found = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and _is_tftransfer(node):
                found += [f"{path.relative_to(PACKAGE)}: {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert found == []


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter is not installed")
def test_layers_contract_holds():
    root = PACKAGE.parent
    proc = subprocess.run([shutil.which("lint-imports"), "--config", str(root / "setup.cfg")], cwd=root,
                          capture_output=True, text=True, env={"PYTHONPATH": str(root), "PATH": sys.prefix + "/bin"})
    assert proc.returncode == 0, proc.stdout[-2000:]


MAX_FUNCTION_LINES = 60
# Longer on purpose, and their docstrings say why; or waiting to be split (the test-time adapters).
LONG_FUNCTIONS_OK = {"data/pipeline.py:_stored"}


def test_no_function_over_sixty_lines():
    found = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name, lines = f"{path.relative_to(PACKAGE).as_posix()}:{node.name}", node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and name not in LONG_FUNCTIONS_OK:
                    found.append(f"{name} ({lines} lines)")
    assert found == []

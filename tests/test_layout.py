"""The layout's rules (docs/ARCHITECTURE.md): what imports what, and how long a function gets."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "tinygpt"


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
    return names


def test_the_model_file_imports_torch_and_the_config_only():
    allowed = {"__future__", "math", "torch", "torch.nn", "torch.nn.functional", "tinygpt.config"}
    assert _imports(SRC / "model.py") <= allowed, _imports(SRC / "model.py") - allowed


def test_the_library_never_imports_the_cli():
    offenders = [p.name for p in SRC.glob("*.py")
                 if p.name not in ("cli.py", "__main__.py") and "tinygpt.cli" in _imports(p)]
    assert not offenders


@pytest.mark.parametrize("module", ["errors", "omp", "config", "cli"])
def test_modules_the_cli_starts_with_import_no_torch_at_module_level(module):
    assert not any(name.split(".")[0] in ("torch", "numpy") for name in _imports(SRC / f"{module}.py", True))


@pytest.mark.parametrize("module", ["errors", "omp", "metrics", "utf8"])
def test_leaf_modules_import_nothing_from_tinygpt(module):
    assert not any(name.startswith("tinygpt") for name in _imports(SRC / f"{module}.py"))


def test_the_engine_knows_no_http():
    code = ("import sys, tinygpt.engine\n"
            "print(sorted(m for m in ('fastapi', 'pydantic', 'starlette') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_no_function_in_the_package_is_longer_than_80_lines():
    long = []
    for path in sorted(SRC.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 80:
                    long.append(f"{path.name}:{node.name} ({length} lines)")
    assert not long, long


def test_the_model_file_stays_small():
    assert len((SRC / "model.py").read_text().splitlines()) <= 300

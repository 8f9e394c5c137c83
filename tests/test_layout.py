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


def _tinygpt_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tinygpt"):
            names.update(a.name for a in node.names) if node.module == "tinygpt" else names.add(
                node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("tinygpt."))
    return names - {path.stem}


def test_the_architecture_page_lists_every_module_and_its_real_imports():
    import re

    page = (SRC.parent.parent / "docs" / "ARCHITECTURE.md").read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)\.py` \| .* \| ([\w, ]+) \|$", page, re.M)}
    modules = {p.stem for p in SRC.glob("*.py")} - {"__init__", "__main__"}
    assert set(rows) == modules
    for module, listed in rows.items():
        documented = set() if listed == "nothing" else {name.strip() for name in listed.split(",")}
        assert documented == _tinygpt_imports(SRC / f"{module}.py"), module

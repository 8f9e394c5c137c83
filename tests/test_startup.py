"""What happens before any work: `import tinygpt` changes nothing in the process, the CLI's
help and argument errors answer without loading torch, and the OpenMP wait policy is
chosen per command (omp.py) and said."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tinygpt import omp


def _python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_importing_the_package_sets_no_environment_and_loads_no_torch():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = "import os, sys, tinygpt; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.stdout.split() == ["None", "False"], result.stderr


@pytest.mark.parametrize("argv", [["--help"], ["presets"], ["train"], ["sample", "--top-k", "x", "run"]])
def test_help_presets_and_argument_errors_do_not_import_torch(argv):
    code = (f"import sys\nfrom tinygpt.cli import main\ntry:\n    code = main({argv!r})\nexcept SystemExit as e:\n"
            "    code = e.code\nprint('torch loaded' if 'torch' in sys.modules else 'no torch', code)")
    result = _python(code)
    assert result.stdout.strip().splitlines()[-1].startswith("no torch"), result.stdout + result.stderr


def test_the_library_names_still_load_on_use():
    result = _python("import tinygpt; print(tinygpt.GPT.__name__, tinygpt.generate.__name__, tinygpt.load.__name__)")
    assert result.stdout.split() == ["GPT", "generate_text", "load_model"], result.stderr


def test_wait_policy_per_command_and_machine_state(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert omp.choose("sample")[0] == "ACTIVE" and "quiet" in omp.choose("sample")[1]
    assert omp.choose("train")[0] == "PASSIVE" and omp.choose("serve")[0] == "PASSIVE"
    monkeypatch.setattr(os, "getloadavg", lambda: (1.7, 1.0, 1.0))
    assert omp.choose("sample")[0] == "PASSIVE" and "busy" in omp.choose("sample")[1]
    monkeypatch.setenv("OMP_WAIT_POLICY", "active")
    assert omp.choose("train") == ("ACTIVE", "set in the environment")


def test_the_cli_says_which_wait_policy_it_chose():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = ("import os\nfrom tinygpt.cli import main\nmain(['sample', '/nonexistent-run'])\n"
            "print('chosen', os.environ['OMP_WAIT_POLICY'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.stdout.split()[-1] in ("ACTIVE", "PASSIVE"), result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1  # an error stays one line
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**env, "OMP_WAIT_POLICY": "PASSIVE"})
    assert result.stdout.split()[-1] == "PASSIVE"

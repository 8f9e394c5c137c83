"""benchmarks/gpu_check.sh, tested on the CPU before any GPU time is spent on it: without a GPU
every part is skipped with the reason; a dry run (tiny preset, CPU) runs every part but the CUDA
checks, so that its commands and its table are known to work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinygpt.data import prepare

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"
PARTS = ["cuda checks", "seed eager", "seed compiled", "seed 300 iterations", "bench as it stands"]


def run_script(out: Path, *args, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=environment,
                          timeout=600)


def table(result: subprocess.CompletedProcess) -> dict[str, tuple[str, str]]:
    lines = result.stdout.split("== gpu_check: ", 1)[1].splitlines()[1:]
    rows = {}
    for line in lines:
        part, rest = line[:20].rstrip(), line[21:]
        rows[part] = (rest[:5].strip(), rest[6:])
    return rows


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the script would use it")
def test_without_a_gpu_every_part_is_skipped_with_the_reason(tmp_path):
    result = run_script(tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "no CUDA GPU (torch.cuda.is_available() is False); every CUDA part is skipped" in result.stdout
    rows = table(result)
    assert list(rows) == PARTS
    assert all(status == "SKIP" and "no CUDA GPU" in detail for status, detail in rows.values())


def test_a_python_without_torch_is_one_reason_too(tmp_path):
    result = run_script(tmp_path / "out", PYTHON="/nonexistent/python3")
    assert result.returncode == 0
    assert all(status == "SKIP" and "cannot import torch" in detail for status, detail in table(result).values())


@pytest.mark.slow  # the whole GPU script on the CPU: over a minute
def test_a_dry_run_on_the_cpu_runs_every_part_but_the_cuda_checks(tmp_path):
    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 400)
    prepare([str(tmp_path / "corpus.txt")], tmp_path / "data", progress=False)
    result = run_script(tmp_path / "out", tmp_path / "data", GPU_CHECK_DRY_RUN="1")
    assert result.returncode == 0, result.stderr
    rows = table(result)
    assert list(rows) == PARTS
    assert rows["cuda checks"][0] == "SKIP"
    for part in PARTS[1:]:
        assert rows[part][0] == "PASS", (part, rows[part], (tmp_path / "out").iterdir())
    assert "tok/s" in rows["seed eager"][1] and "% of measured bf16" in rows["seed compiled"][1]
    assert rows["seed 300 iterations"][1].startswith("20 iterations in ") and "-> 10,000 in about" in \
        rows["seed 300 iterations"][1]
    for name in ("bench_seed_eager.json", "bench_seed_compiled.json", "bench_default.json", "seed300.log"):
        assert (tmp_path / "out" / name).is_file()

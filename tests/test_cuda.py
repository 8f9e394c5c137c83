"""tinyGPT's CUDA paths (benchmarks/cuda_checks.py), under pytest: each check runs on a GPU and
skips, with the reason, where there is none (CI never has one; benchmarks/gpu_check.sh runs the
same checks on a GPU machine without pytest)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "cuda_checks.py"
_spec = importlib.util.spec_from_file_location("cuda_checks", _PATH)
cuda_checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cuda_checks)

needs_cuda = pytest.mark.skipif(cuda_checks.cuda_missing() is not None, reason=str(cuda_checks.cuda_missing()))


@needs_cuda
@pytest.mark.parametrize("check", cuda_checks.CHECKS, ids=[c.__name__ for c in cuda_checks.CHECKS])
def test_cuda_path(check, tmp_path):
    assert check(tmp_path)  # each returns what it checked; a failure raises with what went wrong


def test_every_cuda_path_of_the_issue_has_a_check():
    names = {check.__name__ for check in cuda_checks.CHECKS}
    assert names == {"cached_equals_uncached", "save_load_same_logits", "bf16_autocast_chosen", "resume_is_bitwise",
                     "torchrun_nccl"}

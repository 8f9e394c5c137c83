"""tinyGPT's CUDA paths, checked on a GPU: plain functions, so that a bare machine with torch but
without pytest runs them (`benchmarks/gpu_check.sh` does), and tests/test_cuda.py runs the same
functions under pytest, where they skip without a GPU.

    PYTHONPATH=src python3 benchmarks/cuda_checks.py [--out DIR]     # one line per check, then a summary

Each check raises AssertionError (or any error) when the GPU path misbehaves:

* cached_equals_uncached: the KV cache on the device changes nothing but speed (greedy and
  sampled, both position kinds, past the block size);
* save_load_same_logits: a run saved on the GPU loads back with identical logits;
* bf16_autocast_chosen: the speed plan picks bf16 autocast (with its reason) on a GPU with bf16;
* resume_is_bitwise: 2N iterations, or N then --resume to 2N, give identical weights on one GPU;
* torchrun_nccl: `torchrun --nproc_per_node 1` trains over NCCL and saves a checkpoint.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from tinygpt import checkpoint, speed  # noqa: E402
from tinygpt.config import ModelConfig, get_preset  # noqa: E402
from tinygpt.data import prepare  # noqa: E402
from tinygpt.generate import generate_ids  # noqa: E402
from tinygpt.model import GPT  # noqa: E402
from tinygpt.train import train  # noqa: E402

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()


def cuda_missing() -> str | None:
    """Why the checks cannot run here, or None when they can."""
    if not torch.cuda.is_available():
        return "no CUDA GPU (torch.cuda.is_available() is False)"
    return None


def _data(root: Path) -> Path:
    rng = random.Random(0)
    (root / "corpus.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(4000)))
    prepare([str(root / "corpus.txt")], root / "data", progress=False)
    return root / "data"


def _tiny_train(data: Path, run: Path, max_iters: int, resume: bool = False, **train_options):
    model_config, train_config = get_preset("tiny")
    model_config.dropout = 0.0
    train_config.max_iters, train_config.eval_interval, train_config.eval_iters = max_iters, 10, 2
    for key, value in train_options.items():
        setattr(train_config, key, value)
    return train(data, run, model_config, train_config, device="cuda", resume=resume, progress=False,
                 log=lambda *args: None)


def cached_equals_uncached(root: Path) -> str:
    for positions in ("learned", "rope"):
        torch.manual_seed(0)
        config = ModelConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0,
                             positions=positions)
        model = GPT(config).cuda().eval()
        prompt = [1, 2, 3, 4]
        for temperature in (0.0, 0.8):
            cached = [t.tolist() for t in generate_ids(model, prompt, 80, temperature=temperature, seed=3)]
            uncached = [t.tolist() for t in generate_ids(model, prompt, 80, temperature=temperature, seed=3,
                                                         use_cache=False)]
            assert cached == uncached, f"{positions}, temperature {temperature}: cached and uncached differ"
    return "learned and rotary, greedy and sampled, 80 tokens past a 16-token block"


def save_load_same_logits(root: Path) -> str:
    data = _data(root / "save")
    run = root / "save" / "run"
    _tiny_train(data, run, 10, dtype="float32")
    model, _ = checkpoint.load_model(run, device="cuda")
    record = checkpoint.read_record(run, "best")
    again, _, _ = checkpoint.build_model(record)
    checkpoint.load_weights(again, checkpoint.load_tensors(run, record, "model"))
    again = again.cuda().eval()
    ids = torch.randint(0, model.config.vocab_size, (2, model.config.block_size), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids)[0], again(ids)[0]), "logits differ after a reload"
    return "trained on cuda, saved, loaded twice: identical logits"


def bf16_autocast_chosen(root: Path) -> str:
    _, train_config = get_preset("cpu")
    plan = speed.plan(torch.device("cuda"), train_config, 0.0)
    assert plan.precision.name == "bfloat16", f"the plan chose {plan.precision.name}: {plan.precision.reason}"
    return plan.precision.reason


def resume_is_bitwise(root: Path) -> str:
    data = _data(root / "resume")
    straight, resumed = root / "resume" / "straight", root / "resume" / "resumed"
    _tiny_train(data, straight, 20, dtype="bfloat16")
    _tiny_train(data, resumed, 10, dtype="bfloat16")
    _tiny_train(data, resumed, 20, resume=True, dtype="bfloat16")
    a = checkpoint.load_tensors(straight, checkpoint.read_record(straight, "last"), "model")
    b = checkpoint.load_tensors(resumed, checkpoint.read_record(resumed, "last"), "model")
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"weights differ after resume: {', '.join(different[:5])}"
    return "20 iterations vs 10 + resume to 20, bf16 autocast: identical weights"


def torchrun_nccl(root: Path) -> str:
    data = _data(root / "nccl")
    run = root / "nccl" / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", "tinygpt", "train",
               "--data", str(data), "--out", str(run), "--preset", "tiny", "--max-iters", "20", "--device", "cuda",
               "--no-progress", "--set", "eval_interval=10"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, f"torchrun failed ({result.returncode}): {result.stderr[-2000:]}"
    assert (run / "last.json").is_file(), "no checkpoint after torchrun"
    record = checkpoint.read_record(run, "last")
    assert record["iteration"] == 20 and record["device_type"] == "cuda", record
    return "1 process over NCCL: 20 iterations, checkpoint saved"


CHECKS = [cached_equals_uncached, save_load_same_logits, bf16_autocast_chosen, resume_is_bitwise, torchrun_nccl]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="a folder for the checks' files (default: a temporary one)")
    args = parser.parse_args()
    missing = cuda_missing()
    if missing:
        for check in CHECKS:
            print(f"SKIP  {check.__name__}: {missing}")
        return 0
    failed = 0
    with tempfile.TemporaryDirectory() as temporary:
        root = args.out or Path(temporary)
        for check in CHECKS:
            folder = root / check.__name__
            folder.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            try:
                detail = check(folder)
                print(f"PASS  {check.__name__} ({time.perf_counter() - started:.1f} s): {detail}", flush=True)
            except Exception as e:  # a check that fails says why, and the others still run
                failed += 1
                print(f"FAIL  {check.__name__} ({time.perf_counter() - started:.1f} s): {e}", flush=True)
                traceback.print_exc(file=sys.stderr)
    print(f"{len(CHECKS) - failed} of {len(CHECKS)} CUDA checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

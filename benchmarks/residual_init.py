"""GPT-2's residual-projection init (0.02 / sqrt(2 n_layer)) against the plain 0.02, side by side.

    .venv/bin/python benchmarks/residual_init.py --data data/tinyshakespeare --preset cpu --iters 2000 --seeds 2
    .venv/bin/python benchmarks/residual_init.py --data data/tinyshakespeare --preset gpt --iters 300 --seeds 1 \
        --eval-interval 100 --batch-size 64

The init changes no arithmetic per step, so equal iterations are equal time: every variant
trains the same number of iterations (the preset's schedule spans them; no time budget; the
BENCHMARKS.md figures are of the `cpu` preset before issue 16: GELU, cosine), in
bf16 autocast, one thread per run, `--parallel` runs at a time (interleaved variant by
variant), each in its own process. Reported: the whole validation split's bits/char of the
best checkpoint (`tinygpt eval`, consecutive windows), per seed, and the mean difference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

VARIANTS = {"scaled": "true", "plain": "false"}


def command(args, variant: str, seed: int, out: Path) -> list[str]:
    return [sys.executable, "-m", "tinygpt", "train", "--data", str(args.data), "--out", str(out),
            "--preset", args.preset, "--max-iters", str(args.iters), "--seed", str(seed), "--no-progress",
            "--set", "max_time=0", "--set", "dtype=bfloat16", "--set", f"eval_interval={args.eval_interval}",
            "--set", f"scaled_residual_init={VARIANTS[variant]}",
            *(["--set", f"batch_size={args.batch_size}"] if args.batch_size else [])]


def evaluate(run_dir: Path, data: Path, env: dict) -> float:
    result = subprocess.run([sys.executable, "-m", "tinygpt", "eval", str(run_dir), "--data", str(data), "--json",
                             "--no-progress"], capture_output=True, text=True, env=env, check=True)
    return json.loads(result.stdout)["bits_per_char"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--eval-interval", type=int, default=250)
    parser.add_argument("--batch-size", type=int, help="default: the preset's")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/residual_init"))
    args = parser.parse_args()
    src = Path(__file__).resolve().parent.parent / "src"
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    jobs = [(variant, 1337 + s) for s in range(args.seeds) for variant in VARIANTS]
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[tuple[str, int], float] = {}
    for first in range(0, len(jobs), args.parallel):
        batch = jobs[first:first + args.parallel]
        running = []
        for variant, seed in batch:
            out = args.out / f"{args.preset}-{variant}-s{seed}"
            log = open(args.out / f"{out.name}.log", "w")
            running.append((variant, seed, out, subprocess.Popen(command(args, variant, seed, out), env=env,
                                                                  stdout=log, stderr=subprocess.STDOUT)))
        for variant, seed, out, process in running:
            if process.wait() != 0:
                raise SystemExit(f"training {out} failed")
            results[(variant, seed)] = evaluate(out, args.data, env)
            print(f"{args.preset} {variant:6s} seed {seed}: {results[(variant, seed)]:.4f} bits/char", flush=True)
    seeds = sorted({seed for _, seed in jobs})
    print("\n| preset | iterations | seed | scaled (0.02/sqrt(2L)) | plain 0.02 | scaled - plain |")
    print("|---|---|---|---|---|---|")
    for seed in seeds:
        scaled, plain = results[("scaled", seed)], results[("plain", seed)]
        print(f"| {args.preset} | {args.iters} | {seed} | {scaled:.4f} | {plain:.4f} | {scaled - plain:+.4f} |")
    differences = [results[("scaled", s)] - results[("plain", s)] for s in seeds]
    print(f"mean difference {statistics.mean(differences):+.4f} bits/char over {len(seeds)} seed(s)")


if __name__ == "__main__":
    main()

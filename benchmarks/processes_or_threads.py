"""Processes or threads: a preset's (default `cpu`) iterations in a fixed time, as one process using
every core through OpenMP threads (`processes=1`) or as one process per core with one thread
each (`processes=0`, the `cpu` preset's choice), alternating, in separate `tinygpt train` commands.

    .venv/bin/tinygpt prepare ../shared/data/tinyshakespeare.txt --out data/tinyshakespeare
    .venv/bin/python benchmarks/processes_or_threads.py --data data/tinyshakespeare [--seconds 60] [--rounds 2] \
        [--preset seed --batch-size 32]

Each run trains from scratch for --seconds (its time budget, `max_time`), with no evaluation
before the end, so the iteration count is the speed. `OMP_WAIT_POLICY=ACTIVE` rows show the
threads at their fastest on a quiet machine (spinning waits, which `train` does not use).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {
    "1 process, threads (sleeping waits)": (["--set", "processes=1"], {}),
    "1 process, threads (spinning waits)": (["--set", "processes=1"], {"OMP_WAIT_POLICY": "ACTIVE"}),
    "1 process per core, 1 thread each": (["--set", "processes=0"], {}),
}


def iterations(args: argparse.Namespace, extra: list[str], env: dict[str, str], out: Path) -> int:
    tinygpt = str(Path(sys.executable).with_name("tinygpt"))
    command = [tinygpt, "train", "--data", args.data, "--out", str(out), "--preset", args.preset,
               "--set", f"max_time={args.seconds:g}", "--set", "eval_interval=1000000", "--overwrite", "--no-progress",
               *(["--set", f"batch_size={args.batch_size}"] if args.batch_size else []), *extra]
    done = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, check=True).stdout
    return int(re.search(r"^done: (\d+) iterations", done, re.M).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--batch-size", type=int, help="default: the preset's")
    args = parser.parse_args()
    counts: dict[str, list[int]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as work:
        for round_number in range(args.rounds):
            for name, (extra, env) in VARIANTS.items():
                counts[name].append(iterations(args, extra, env, Path(work) / "run"))
                print(f"round {round_number + 1}: {name}: {counts[name][-1]} iterations", flush=True)
    base = statistics.median(counts["1 process, threads (sleeping waits)"])
    print(f"\n| variant | iterations in {args.seconds:g} s (each round) | median | vs threads (sleeping) |")
    print("|---|---|---|---|")
    for name, values in counts.items():
        print(f"| {name} | {', '.join(map(str, values))} | {statistics.median(values):g} | "
              f"{statistics.median(values) / base:.2f}x |")


if __name__ == "__main__":
    main()

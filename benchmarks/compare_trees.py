"""Two source trees (or one tree under two settings) side by side: `tinygpt bench` in each.

    git worktree add /tmp/before <commit>
    .venv/bin/python benchmarks/compare_trees.py --variant before=/tmp/before/src --variant after=src \\
        --variant after-active=src:OMP_WAIT_POLICY=ACTIVE --rounds 3

Each variant runs `tinygpt.bench.run_bench(preset="seed", batch_size=32, ...)` (what
`tinygpt bench --preset seed --batch-size 32` measures, with one generation repeat) from its own
`src` directory in a fresh process; the variants alternate (A B C, A B C, ...) for `--rounds`
rounds, so a noisy, shared machine moves them alike. Every process gets OMP_WAIT_POLICY=PASSIVE
unless its variant sets something else. Printed: per variant, the median over rounds (and the
min..max) of training tokens/s (seed sizes, batch 32, one `train` iteration: forward, backward,
clipping, optimizer step) and of batch-1 generation tokens/s with the KV cache (1,000 new
characters), and each median as a ratio to the first variant's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path


def parse_variant(text: str) -> tuple[str, Path, dict[str, str]]:
    label, _, rest = text.partition("=")
    path, *settings = rest.split(":")
    return label, Path(path).resolve(), dict(setting.split("=", 1) for setting in settings)


def run_bench(src: Path, settings: dict[str, str], args) -> dict:
    """tinygpt.bench.run_bench in a fresh process, from that tree's own source."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_WAIT_POLICY": "PASSIVE", **settings}
    code = ("import json\nfrom tinygpt.bench import run_bench\n"
            f"result = run_bench(preset={args.preset!r}, batch_size={args.batch_size}, repeats={args.repeats}, "
            "generation_tokens=1000, generation_repeats=1, prepare_megabytes=1)\n"
            "print(json.dumps(result.as_dict()))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=src.parent)
    if result.returncode != 0:
        raise SystemExit(f"bench failed in {src}: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", required=True, help="LABEL=SRC_DIR[:KEY=VALUE...]")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--preset", default="seed")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    variants = [parse_variant(v) for v in args.variant]
    figures: dict[str, dict[str, list[float]]] = {label: {"train": [], "generate": []} for label, _, _ in variants}
    for round_ in range(args.rounds):
        order = variants if round_ % 2 == 0 else variants[::-1]
        for label, src, settings in order:
            result = run_bench(src, settings, args)
            figures[label]["train"].append(result["training"]["tokens_per_second"])
            figures[label]["generate"].append(result["generation"]["cached_tokens_per_second"])
            print(f"round {round_ + 1} {label}: train {figures[label]['train'][-1]:,.0f} tok/s, "
                  f"generate {figures[label]['generate'][-1]:,.0f} tok/s", file=sys.stderr, flush=True)
    first = variants[0][0]
    base = {kind: statistics.median(figures[first][kind]) for kind in ("train", "generate")}
    print(f"| variant | training tokens/s ({args.preset}, batch {args.batch_size}) | ratio | "
          f"generation tokens/s (batch 1, cached) | ratio |")
    print("|---|---|---|---|---|")
    for label, _, _ in variants:
        cells = []
        for kind in ("train", "generate"):
            values = figures[label][kind]
            median = statistics.median(values)
            cells += [f"{median:,.0f} ({min(values):,.0f}..{max(values):,.0f})", f"{median / base[kind]:.3f}"]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

"""Characters against byte-level BPE at equal wall-clock time, scored in bits per byte on one text.

    .venv/bin/python benchmarks/tokenizer_quality.py --corpus shakespeare --out runs/tokenizers

Every variant prepares the same corpus (so the validation split is the same text: the last
tenth of each file's characters), trains with the `cpu` preset's time budget (max_time) on both
cores, one run after the other, and is scored by `tinygpt eval` on the whole validation split
(consecutive windows). Bits per byte is the one score that compares across tokenizers; bits
per character is shown beside it. A variant is `char` or `bpeN` (a BPE of N tokens), with
optional `:key=value,...` overrides for its run, e.g. `bpe2048:block_size=64`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_VARIANTS = ["char", "bpe512", "bpe2048", "bpe8192"]


def tinygpt(*args: str, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "tinygpt", *args], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f"tinygpt {' '.join(args)} failed:\n{result.stderr}")
    return result


def parse_variant(text: str) -> tuple[str, list[str], list[str]]:
    """(name, prepare arguments, train --set overrides)."""
    name, _, overrides = text.partition(":")
    if name == "char":
        prepare = []
    elif name.startswith("bpe") and name[3:].isdigit():
        prepare = ["--tokenizer", "bpe", "--vocab-size", name[3:]]
    else:
        sys.exit(f"unknown variant {text!r}: char or bpeN")
    sets = [item for item in overrides.split(",") if item]
    return name, prepare, sets


def run_variant(variant: str, args, env: dict) -> dict:
    name, prepare, sets = parse_variant(variant)
    data = args.out / f"data-{name}"
    run = args.out / f"run-{variant.replace(':', '-').replace(',', '-').replace('=', '')}"
    started = time.perf_counter()
    tinygpt("prepare", args.corpus, "--out", str(data), "--no-progress", *prepare, env=env)
    prepared = time.perf_counter() - started
    meta = json.loads((data / "meta.json").read_text())
    overrides = [x for item in sets for x in ("--set", item)]
    if args.budget is not None:
        overrides += ["--set", f"max_time={args.budget}"]
    started = time.perf_counter()
    tinygpt("train", "--data", str(data), "--out", str(run), "--preset", args.preset, "--overwrite", "--no-progress",
            *overrides, env=env)
    trained = time.perf_counter() - started
    scores = json.loads(tinygpt("eval", str(run), "--data", str(data), "--json", "--no-progress", env=env).stdout)
    record = json.loads((run / "best.json").read_text())
    last = json.loads((run / "last.json").read_text())
    return {"variant": variant, "vocab_size": meta["vocab_size"], "block_size": record["model_config"]["block_size"],
            "characters_per_token": (meta["train_characters"] + meta["val_characters"])
            / (meta["train_tokens"] + meta["val_tokens"]),
            "iterations": last["iteration"], "best_iteration": record["iteration"], "train_seconds": trained,
            "prepare_seconds": prepared, "bits_per_byte": scores["bits_per_byte"],
            "bits_per_char": scores["bits_per_char"], "val_bytes": meta["val_bytes"], "val_tokens": meta["val_tokens"]}


def row(r: dict) -> str:
    return (f"| {r['variant']} | {r['vocab_size']:,} | {r['block_size']} | {r['characters_per_token']:.2f} | "
            f"{r['iterations']:,} | {r['train_seconds']:.0f} | {r['bits_per_byte']:.3f} | {r['bits_per_char']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="shakespeare", help="what `tinygpt prepare` reads (default: shakespeare)")
    parser.add_argument("--out", type=Path, default=Path("runs/tokenizers"))
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--budget", type=float, help="max_time in seconds (default: the preset's)")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    args = parser.parse_args()
    src = Path(__file__).resolve().parent.parent / "src"
    env = {**os.environ, "PYTHONPATH": str(src)}
    args.out.mkdir(parents=True, exist_ok=True)
    print("| variant | vocabulary | block (tokens) | characters/token | iterations | train s | val bits/byte "
          "| val bits/char |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    results = []
    for variant in args.variants:
        results.append(run_variant(variant, args, env))
        print(row(results[-1]), flush=True)
    sizes = {r["val_bytes"] for r in results}
    # (each score leaves out the split's first token, which has no context: a few bytes more or less)
    print(f"validation text: {', '.join(f'{s:,}' for s in sizes)} bytes"
          + (" (the same text for every variant)" if len(sizes) == 1 else " (DIFFERENT texts: not comparable)"))
    best = min(results, key=lambda r: r["bits_per_byte"])
    print(f"best: {best['variant']} at {best['bits_per_byte']:.3f} bits/byte")
    (args.out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

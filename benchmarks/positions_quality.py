"""Learned vs rotary positions: the same small model trained the same way, scored on the
whole validation split.

    .venv/bin/python benchmarks/positions_quality.py                   # 600 iterations each: ~9 min at load 8
    .venv/bin/python benchmarks/positions_quality.py --iters 1500 --seeds 1 2 3

Both models are identical (4 layers, 4 heads, n_embd 128, block 64, pre-LN, GELU: the `cpu`
preset's choices before issue 16, at a smaller size) apart from `positions`, and train on
../shared/data/tinyshakespeare.txt (its last 10 % held out) with the same schedule, batch,
iterations and seeds, alternating learned / rope. Val bits/char is
tinygpt.evaluate.evaluate_tokens over every character of the validation split.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tinygpt.checkpoint import load_model
from tinygpt.config import ModelConfig, get_preset
from tinygpt.data import load_tokens, prepare
from tinygpt.evaluate import evaluate_tokens
from tinygpt.train import train

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--iters", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results: dict[str, list[dict]] = {"learned": [], "rope": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare([str(args.corpus)], data, progress=False)
        val = load_tokens(data, "val")
        for seed in args.seeds:
            for positions in ("learned", "rope"):
                _, train_config = get_preset("cpu")
                train_config.schedule = "cosine"  # the cpu preset's before issue 16, as BENCHMARKS.md measured
                model_config = ModelConfig(
                    block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False, qkv_bias=False,
                    lm_head_bias=False, norm="pre", activation="gelu", positions=positions,
                )
                train_config.max_iters = args.iters
                train_config.eval_interval = args.iters  # one estimate at the end: the time goes to training
                train_config.batch_size = args.batch_size
                train_config.warmup_iters = min(train_config.warmup_iters, args.iters // 10)
                train_config.dtype = "float32"
                train_config.seed = seed
                run = Path(tmp) / f"{positions}-{seed}"
                started = time.perf_counter()
                train(data, run, model_config, train_config, device="cpu", progress=False, log=lambda *a, **k: None)
                seconds = time.perf_counter() - started
                model, _ = load_model(run, "last")
                score = evaluate_tokens(model, val, batch_size=64)
                results[positions].append({"seed": seed, "val_bits_per_char": score.bits_per_char,
                                           "train_seconds": seconds})
                if not args.json:
                    print(f"  {positions:7s} seed {seed}: val {score.bits_per_char:.4f} bits/char "
                          f"({seconds:.0f} s of training)", flush=True)

    if args.json:
        print(json.dumps({"iters": args.iters, "batch_size": args.batch_size, "results": results}))
        return
    print(f"\n4 layers, 4 heads, n_embd 128, block 64; {args.iters} iterations x batch {args.batch_size}; "
          f"val bits/char over the whole split ({len(val) - 1:,} characters)")
    print("| positions | val bits/char (mean) | per seed | training s (mean) |")
    print("|---|---|---|---|")
    for positions, rows in results.items():
        bits = [row["val_bits_per_char"] for row in rows]
        seconds = statistics.mean(row["train_seconds"] for row in rows)
        print(f"| {positions} | {statistics.mean(bits):.4f} | {', '.join(f'{b:.4f}' for b in bits)} | "
              f"{seconds:.0f} |")


if __name__ == "__main__":
    main()

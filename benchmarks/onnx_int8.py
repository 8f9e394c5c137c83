"""ONNX export, float32 and int8 (`tinygpt export --format onnx --int8`): file sizes, batch-1
decode speed in onnxruntime against tinyGPT's own, and what int8 costs in bits per byte.

    .venv/bin/python benchmarks/onnx_int8.py runs/demo --data data/shakespeare --rounds 3 --tokens 200

The ONNX graph has no KV cache: each decode step runs the whole context (up to block_size
tokens) again, so it is compared with tinyGPT both ways, with its cache and without. The
variants take turns, round after round, in this one process (median of the rounds; threads:
each runtime's default). The score is over the whole validation split in consecutive windows
of block_size tokens, as `tinygpt eval` scores it, for float32 and int8 graphs alike.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from tinygpt.checkpoint import load_model  # noqa: E402
from tinygpt.data import load_tokens, text_sizes  # noqa: E402
from tinygpt.evaluate import evaluate_tokens  # noqa: E402
from tinygpt.export import export_run  # noqa: E402
from tinygpt.generate import generate_ids  # noqa: E402


def onnx_decode(session, prompt: list[int], steps: int, block: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        logits = session.run(None, {"input_ids": np.array([ids[-block:]], dtype=np.int64)})[0]
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def onnx_nats(session, tokens: np.ndarray, block: int) -> float:
    """Summed loss of every prediction in consecutive block-size windows (and a last, shorter one)."""
    total = 0.0
    for start in range(0, len(tokens) - 1, block):
        window = np.asarray(tokens[start:start + block + 1], dtype=np.int64)
        logits = session.run(None, {"input_ids": window[None, :-1]})[0][0].astype(np.float64)  # (T, V)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        total -= log_probs[np.arange(len(window) - 1), window[1:]].sum()
    return total


def main() -> None:
    import onnxruntime
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=200)
    args = parser.parse_args()
    model, tokenizer = load_model(args.run_dir)
    block = model.config.block_size
    with tempfile.TemporaryDirectory() as folder:
        export_run(args.run_dir, Path(folder) / "onnx", format="onnx", int8=True)
        paths = {"float32": Path(folder) / "onnx" / "model.onnx", "int8": Path(folder) / "onnx" / "model.int8.onnx"}
        sessions = {name: onnxruntime.InferenceSession(str(path)) for name, path in paths.items()}
        sizes = {name: path.stat().st_size for name, path in paths.items()}
        prompt = tokenizer.encode("ROMEO:")
        timings: dict[str, list[float]] = {name: [] for name in ("onnx float32", "onnx int8", "tinygpt cached",
                                                                  "tinygpt uncached")}
        for _ in range(args.rounds):
            for name, session in sessions.items():
                started = time.perf_counter()
                onnx_decode(session, prompt, args.tokens, block)
                timings[f"onnx {name}"].append(args.tokens / (time.perf_counter() - started))
            for name, cache in (("tinygpt cached", True), ("tinygpt uncached", False)):
                started = time.perf_counter()
                for _ in generate_ids(model, prompt, args.tokens, temperature=0, use_cache=cache):
                    pass
                timings[name].append(args.tokens / (time.perf_counter() - started))
        tokens = load_tokens(args.data, "val")
        _, size = text_sizes(tokens[1:], tokenizer)
        scores = {name: onnx_nats(session, tokens, block) / size / math.log(2) for name, session in sessions.items()}
        with torch.no_grad():
            ours = evaluate_tokens(model, tokens, tokenizer=tokenizer).bits_per_byte
    print(f"run {args.run_dir}: {model.num_parameters():,} parameters, block {block}, "
          f"{args.tokens} greedy tokens after 'ROMEO:', {args.rounds} rounds (median, with the range)")
    print("| variant | file | batch-1 tokens/s | val bits/byte |")
    print("|---|---|---|---|")
    for name, values in timings.items():
        kind = name.split()[-1] if name.startswith("onnx") else None
        file = f"{sizes[kind] / 2**20:.1f} MiB" if kind else ""
        score = f"{scores[kind]:.4f}" if kind else (f"{ours:.4f}" if name == "tinygpt cached" else "")
        print(f"| {name} | {file} | {statistics.median(values):,.0f} ({min(values):,.0f}..{max(values):,.0f}) "
              f"| {score} |")


if __name__ == "__main__":
    main()

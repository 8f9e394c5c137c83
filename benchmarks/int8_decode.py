"""int8 decoding against float32 and against the reference implementation's `generate`.

    git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT && git -C /tmp/nanoGPT checkout 3adf61e1
    .venv/bin/python benchmarks/int8_decode.py --reference /tmp/nanoGPT [--rounds 3] [--threads N]
    .venv/bin/python benchmarks/int8_decode.py --quality RUN_DIR DATA_DIR   # bits/char, float32 vs int8

Speed: batch-1 generation of 1,000 new tokens from a one-token prompt at temperature 0.8,
with models of the seed preset's sizes (12 layers, 8 heads, n_embd 384, block 64, post-LN,
ReLU, learned positions, 84 symbols, random weights: the speed does not depend on them).
Variants, each in its own process, alternating round by round:

* reference: the reference implementation's model.py, unmodified, loaded from --reference
  (its GPT with the same sizes, bias on, dropout 0), and its own `generate` (no cache: the
  last block_size tokens again every step), float32;
* fp32: tinyGPT's `generate_ids` with its KV cache, float32 (what `tinygpt sample` runs);
* int8: the same with `quantize.int8_model` (what `tinygpt sample --int8` runs).

Quality: the run's best checkpoint scored on the data's whole validation split (consecutive
windows, evaluate.py), float32 and int8, in one process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

VOCAB, NEW_TOKENS, TEMPERATURE = 84, 1000, 0.8
VARIANTS = ("reference", "fp32", "int8")


def worker(variant: str, reference: str | None, threads: int | None) -> float:
    """Tokens per second of one variant, generation only (the model is built first)."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    if variant == "reference":
        sys.path.insert(0, reference)
        from model import GPT as ReferenceGPT  # the reference's own file, unmodified
        from model import GPTConfig

        model = ReferenceGPT(GPTConfig(block_size=64, vocab_size=VOCAB, n_layer=12, n_head=8, n_embd=384,
                                       dropout=0.0, bias=True)).eval()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(torch.zeros((1, 1), dtype=torch.long), NEW_TOKENS, temperature=TEMPERATURE)
        return NEW_TOKENS / (time.perf_counter() - start)

    from tinygpt.config import get_preset
    from tinygpt.generate import generate_ids
    from tinygpt.model import GPT
    from tinygpt.quantize import int8_model

    config, _ = get_preset("seed")
    config.vocab_size = VOCAB
    model = GPT(config).eval()
    if variant == "int8":
        model = int8_model(model)
    start = time.perf_counter()
    for _ in generate_ids(model, [0], NEW_TOKENS, temperature=TEMPERATURE, seed=1):
        pass
    return NEW_TOKENS / (time.perf_counter() - start)


def speed_table(reference: str, rounds: int, threads: int | None) -> None:
    results: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for round_ in range(rounds):
        order = VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            command = [sys.executable, __file__, "--worker", variant, "--reference", reference]
            if threads:
                command += ["--threads", str(threads)]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            results[variant].append(json.loads(out.strip().splitlines()[-1])["tokens_per_second"])
            print(f"round {round_ + 1}: {variant} {results[variant][-1]:.1f} tokens/s", file=sys.stderr)
    base = statistics.median(results["reference"])
    print(f"| variant | tokens/s, median of {rounds} (min..max) | vs reference | vs tinyGPT fp32 |")
    print("|---|---|---|---|")
    for variant in VARIANTS:
        values = results[variant]
        median = statistics.median(values)
        print(f"| {variant} | {median:,.1f} ({min(values):,.1f}..{max(values):,.1f}) | {median / base:.2f}x | "
              f"{median / statistics.median(results['fp32']):.2f}x |")


def quality(run_dir: str, data_dir: str) -> None:
    from tinygpt.checkpoint import load_model
    from tinygpt.data import load_tokens
    from tinygpt.evaluate import evaluate_tokens
    from tinygpt.quantize import int8_model

    model, tokenizer = load_model(run_dir, device="cpu")
    tokens = load_tokens(data_dir, "val")
    print("| weights | val bits/char | val bits/byte |\n|---|---|---|")
    for name, variant in (("float32", model), ("int8", int8_model(model))):
        result = evaluate_tokens(variant, tokens, tokenizer=tokenizer)
        print(f"| {name} | {result.bits_per_char:.5f} | {result.bits_per_byte:.5f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", help="folder of the reference implementation's model.py")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--quality", nargs=2, metavar=("RUN_DIR", "DATA_DIR"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps({"tokens_per_second": worker(args.worker, args.reference, args.threads)}))
    elif args.quality:
        quality(*args.quality)
    else:
        if not args.reference:
            parser.error("--reference DIR (the reference's model.py) is needed for the speed table")
        speed_table(args.reference, args.rounds, args.threads)


if __name__ == "__main__":
    main()

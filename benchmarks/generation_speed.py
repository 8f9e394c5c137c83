"""Generation speed: the KV cache against the uncached path, batch 1, 1,000 new characters.

    .venv/bin/python benchmarks/generation_speed.py                        # learned and rope, ~4 minutes
    .venv/bin/python benchmarks/generation_speed.py --positions rope --full   # time every uncached step (~15 min)

The model has the seed preset's sizes (12 layers, 8 heads, n_embd 384, block 64, post-LN,
ReLU) with an 84-symbol vocabulary and random weights (the speed does not depend on them),
in float32, generating from a one-character prompt (what `tinygpt sample` does with no
prompt) at temperature 0.8. Paths, all through tinygpt.generate.generate_ids unless noted:

* cached: the KV cache (the default of `tinygpt sample`);
* uncached: `--no-cache`, the same window rule recomputed from scratch every step; the two
  print the same text, and the benchmark checks it wherever it times both in full;
* crop (rope only, not a tinygpt path): the popular loop that feeds the last block_size
  characters every step. It is cheaper than our uncached rope path (64 characters a step
  instead of n_layer * 63 + 1 = 757) but computes something else (see generate.py), so
  it is shown for honesty, not used for the ratio.

The cached path and learned uncached path are timed over all 1,000 steps. An uncached rope
step (and a crop step) costs only what the text's length makes it cost, so those paths are
timed, unless --full, on `--sample-steps` consecutive steps at each of `--strata` evenly
spaced lengths (generating from a prompt of that length), and the 1,000-step time is the
sum over strata of stratum size x mean step time. Runs alternate path by path (A B, B A, ...)
`--repeats` times; tokens/s is new characters over wall time (prefills, sampling and the
per-step hand-off to Python included); the ratio is per repeat, cached over uncached.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tinygpt.config import get_preset
from tinygpt.generate import generate_ids, sample_next
from tinygpt.hardware import cpu_model_name
from tinygpt.model import GPT

VOCAB = 84
TEMPERATURE = 0.8


def seed_sized_model(positions: str) -> GPT:
    config, _ = get_preset("seed")
    config.vocab_size = VOCAB
    config.positions = positions
    torch.manual_seed(0)
    return GPT(config).eval()


def crop_ids(model: GPT, prompt: list[int], steps: int, seed: int):
    """The popular uncached loop: every step, the last block_size characters from position 0."""
    generator = torch.Generator().manual_seed(seed)
    block = model.config.block_size
    tokens = torch.empty((1, len(prompt) + steps), dtype=torch.long)
    tokens[0, : len(prompt)] = torch.tensor(prompt)
    with torch.inference_mode():
        for length in range(len(prompt), len(prompt) + steps):
            logits, _ = model(tokens[:, max(0, length - block):length])
            next_ids = sample_next(logits[:, -1], TEMPERATURE, generator=generator)
            tokens[:, length] = next_ids
            yield next_ids


def steps_of(model: GPT, path: str, prompt: list[int], steps: int, seed: int):
    if path == "crop":
        return crop_ids(model, prompt, steps, seed)
    return generate_ids(model, prompt, steps, temperature=TEMPERATURE, seed=seed, use_cache=path == "cached")


def time_full(model: GPT, path: str, prompt: list[int], steps: int) -> tuple[float, list[int]]:
    """Seconds for `steps` new characters, and the characters."""
    text = []
    started = time.perf_counter()
    for next_ids in steps_of(model, path, prompt, steps, seed=1):
        text.append(int(next_ids[0]))
    return time.perf_counter() - started, text


def time_sampled(model: GPT, path: str, text: list[int], prompt_length: int, steps: int, strata: int,
                 sample_steps: int) -> float:
    """Estimated seconds for `steps` new characters: a few timed steps per stratum of lengths."""
    total = 0.0
    edges = [round(i * steps / strata) for i in range(strata + 1)]
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        middle = prompt_length + (low + high) // 2 - sample_steps // 2
        count = min(sample_steps, high - low)
        iterator = steps_of(model, path, text[:middle], count, seed=1)
        started = time.perf_counter()
        for next_ids in iterator:
            int(next_ids[0])
        total += (time.perf_counter() - started) / count * (high - low)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", nargs="+", choices=("learned", "rope"), default=["learned", "rope"])
    parser.add_argument("--new-tokens", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--full", action="store_true", help="time every step of every path")
    parser.add_argument("--strata", type=int, default=10)
    parser.add_argument("--sample-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine OpenMP threads spin against other jobs)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompt = [0]
    results = []
    for positions in args.positions:
        model = seed_sized_model(positions)
        paths = ["cached", "uncached"] + (["crop"] if positions == "rope" else [])
        seconds: dict[str, list[float]] = {path: [] for path in paths}
        sampled = {path: not args.full and (positions == "rope" and path != "cached") for path in paths}
        texts: dict[str, list[int]] = {}
        time_full(model, "cached", prompt, 50)  # warm-up
        for repeat in range(args.repeats):
            for path in (paths if repeat % 2 == 0 else paths[::-1]):
                if sampled[path]:
                    reference = texts.get("cached") or time_full(model, "cached", prompt, args.new_tokens)[1]
                    elapsed = time_sampled(model, path, prompt + reference, len(prompt), args.new_tokens,
                                           args.strata, args.sample_steps)
                else:
                    elapsed, texts[path] = time_full(model, path, prompt, args.new_tokens)
                seconds[path].append(elapsed)
        identical = texts["cached"] == texts["uncached"] if "uncached" in texts else None
        speed = {path: args.new_tokens / statistics.median(values) for path, values in seconds.items()}
        ratios = [u / c for u, c in zip(seconds["uncached"], seconds["cached"], strict=True)]
        results.append({
            "positions": positions, "tokens_per_second": speed, "seconds": seconds, "sampled": sampled,
            "ratio_cached_over_uncached": statistics.median(ratios), "ratios": ratios,
            "ratio_cached_over_crop": (statistics.median(seconds["crop"]) / statistics.median(seconds["cached"])
                                       if "crop" in seconds else None),
            "identical_text": identical,
        })

    if args.json:
        print(json.dumps({"cpu": cpu_model_name(), "threads": args.threads, "new_tokens": args.new_tokens,
                          "results": results}))
        return
    print(f"{cpu_model_name()}, {args.threads} thread(s); seed sizes, float32, batch 1, "
          f"{args.new_tokens} new characters; median of {args.repeats} alternated runs")
    print("| positions | path | tokens/s | cached speed-up | identical text |")
    print("|---|---|---|---|---|")
    for row in results:
        for path, value in row["tokens_per_second"].items():
            note = " (sampled steps)" if row["sampled"][path] else ""
            if path == "cached":
                ratio = ""
            elif path == "uncached":
                spread = f"{min(row['ratios']):.1f}-{max(row['ratios']):.1f}"
                ratio = f"**{row['ratio_cached_over_uncached']:.1f}x** ({spread})"
            else:
                ratio = f"{row['ratio_cached_over_crop']:.1f}x (not the same text)"
            same = "" if path != "uncached" else {True: "yes", False: "NO", None: "not checked (sampled)"}[
                row["identical_text"]]
            print(f"| {row['positions']} | {path}{note} | {value:.1f} | {ratio} | {same} |")


if __name__ == "__main__":
    main()

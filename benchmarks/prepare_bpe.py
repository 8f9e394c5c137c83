"""`prepare --tokenizer bpe` on large corpora: MB/s and peak memory of each pass.

    .venv/bin/python benchmarks/prepare_bpe.py --sizes 200 2000 --vocab-size 4096 --work /tmp/prepare_bpe

The corpus is synthetic English-like text (no download is possible here): words drawn from a
Zipf law (exponent 1.05) over about a million made-up words of 1 to 4 syllables, with a full stop
ending one word in 12 and a line break after every third sentence or so, written as 50 MB files with their own random
draws, so the number of distinct words keeps growing with the corpus as in real text. Each size
is prepared in a fresh process; the passes are timed apart (pass 1 counts characters, pass 2
learns the BPE, pass 3 encodes) and the peak resident memory of each is read from the kernel
(VmHWM, reset between passes through /proc/self/clear_refs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

FILE_MB = 50
SYLLABLES = [c + v for c in "bcdfghjklmnprstvwyz" for v in ("a", "e", "i", "o", "u", "ai", "ea", "ou")]


def make_words(count: int, rng: np.random.Generator) -> np.ndarray:
    lengths = rng.integers(1, 5, count)
    parts = rng.integers(0, len(SYLLABLES), (count, 4))
    words = ["".join(SYLLABLES[p] for p in row[:n]) for row, n in zip(parts, lengths, strict=True)]
    distinct = np.array(sorted(set(words)), dtype=object)
    return distinct[rng.permutation(len(distinct))]  # a word's frequency rank owes nothing to its spelling


def write_corpus(folder: Path, megabytes: int) -> None:
    """FILE_MB files of text until `megabytes` in all (kept between runs: same seed, same text)."""
    folder.mkdir(parents=True, exist_ok=True)
    words = make_words(1_000_000, np.random.default_rng(0))
    weights = 1.0 / np.arange(1, len(words) + 1) ** 1.05
    weights /= weights.sum()
    for index in range((megabytes + FILE_MB - 1) // FILE_MB):
        path = folder / f"part{index:03d}.txt"
        if path.exists():
            continue
        rng = np.random.default_rng(index + 1)
        out, size = [], 0
        while size < FILE_MB * 1_000_000:
            drawn = words[rng.choice(len(words), 200_000, p=weights)]
            ends = rng.random(len(drawn)) < 0.08  # sentence ends
            text = " ".join(w + (("." + ("\n" if rng.random() < 0.3 else "")) if e else "")
                            for w, e in zip(drawn, ends, strict=True))
            text = text.replace("\n ", "\n")
            out.append(text)
            size += len(text)
        path.write_text("".join(out)[:FILE_MB * 1_000_000], encoding="utf-8")


CHILD = r"""
import json, sys, time
from tinygpt import data

def peak_and_reset():
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return peak

marks = []
def timed(name, function):
    def wrapper(*args, **kwargs):
        marks.append(("before " + name, time.perf_counter(), peak_and_reset()))
        result = function(*args, **kwargs)
        marks.append((name, time.perf_counter(), peak_and_reset()))
        return result
    return wrapper

data._train_bpe_pass = timed("train", data._train_bpe_pass)
data._encode_pass_bpe = timed("encode", data._encode_pass_bpe)
data._encode_pass = timed("encode", data._encode_pass)
started = time.perf_counter()
peak_and_reset()
kind, vocab, corpus, out = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
report = data.prepare([corpus], out, tokenizer=kind, vocab_size=None if kind == "char" else int(vocab),
                      progress=False, overwrite=True)
finished = time.perf_counter()
print(json.dumps({"started": started, "finished": finished, "marks": marks,
                  "tokens": report.train_tokens + report.val_tokens,
                  "characters": report.train_characters + report.val_characters,
                  "used": report.tokenizer_training.get("characters_used")}))
"""


def measure(kind: str, vocab_size: int, corpus: Path, out: Path) -> dict:
    src = Path(__file__).resolve().parent.parent / "src"
    env = {**os.environ, "PYTHONPATH": str(src)}
    result = subprocess.run([sys.executable, "-c", CHILD, kind, str(vocab_size), str(corpus), str(out)],
                            capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


def phases(measured: dict) -> list[tuple[str, float, int]]:
    """(phase, seconds, peak bytes): counting (up to the first mark), then each timed pass."""
    marks = measured["marks"]
    rows = [("count", marks[0][1] - measured["started"], marks[0][2])]
    for before, after in zip(marks[::2], marks[1::2], strict=True):
        rows.append((after[0], after[1] - before[1], after[2]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 2000], help="corpus sizes in MB")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--work", type=Path, default=Path("/tmp/prepare_bpe"))
    parser.add_argument("--with-char", action="store_true", help="also prepare each corpus with --tokenizer char")
    args = parser.parse_args()
    print("| corpus | tokenizer | pass | seconds | MB/s | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|", flush=True)
    for megabytes in args.sizes:
        corpus = args.work / f"corpus-{megabytes}"
        write_corpus(corpus, megabytes)
        total = sum(p.stat().st_size for p in corpus.glob("*.txt"))
        for kind in (["char"] if args.with_char else []) + ["bpe"]:
            measured = measure(kind, args.vocab_size, corpus, args.work / f"data-{megabytes}-{kind}")
            name = "char" if kind == "char" else f"bpe {args.vocab_size}"
            for phase, seconds, peak in phases(measured):
                size = measured["used"] * 1.0 if phase == "train" else total  # training reads its sample
                print(f"| {total / 1e6:,.0f} MB | {name} | {phase} | {seconds:.1f} | {size / 1e6 / seconds:.1f} | "
                      f"{peak / 2**20:,.0f} |", flush=True)
            seconds = measured["finished"] - measured["started"]
            print(f"| {total / 1e6:,.0f} MB | {name} | all | {seconds:.1f} | {total / 1e6 / seconds:.1f} | |",
                  flush=True)


if __name__ == "__main__":
    main()

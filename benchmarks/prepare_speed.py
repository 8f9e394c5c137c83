"""Preparation speed and memory: `tinygpt.data.prepare` on a generated corpus, by decoding method.

    .venv/bin/python benchmarks/prepare_speed.py                 # both methods, ~200 MiB of each kind
    .venv/bin/python benchmarks/prepare_speed.py --size-mb 2048 --kinds mixed --repeats 1
    .venv/bin/python benchmarks/prepare_speed.py --methods as-is --src /tmp/old/src --src src   # A/B two trees

`--methods plain,vectorised` (the default) runs each kind under both of `tinygpt.utf8`'s
decoding methods: `plain` (Python's decoder, `np.frombuffer(text.encode("utf-32-le"),
np.uint32)`, a lookup table) and `vectorised` (ASCII not decoded, multi-byte characters of
ASCII-heavy chunks decoded with array operations, everything else as plain). `vectorised-all`
is vectorised without its per-chunk rule (mostly non-ASCII chunks are vectorised too), to test
that rule. `as-is` leaves the tree's default, for trees older than `tinygpt.utf8`.

The corpus is random words written into several files: `ascii` is pure ASCII; `mixed` is
ASCII-heavy text where about one word in 25 is taken from other scripts (accented Latin, Greek,
Cyrillic, a few CJK, Arabic, Hebrew, Devanagari, Thai, Hangul) or is an emoji, so every chunk
holds multi-byte UTF-8 (about 4 % of the bytes); `wide` adds CJK words over 300 ideographs, so
the vocabulary outgrows uint8 and ids are uint16; `cjk` is mostly CJK, the opposite of
ASCII-heavy. Generating the corpus is not timed.

Each prepare runs in a fresh child process. MB/s is corpus bytes over the wall time of
`prepare()` (both passes, fsync included, imports excluded); the corpus is read through once
before each run, so the run finds it in the page cache (`--cold` skips that). MB/CPU-s is
corpus bytes over the child's CPU time (user + system) in `prepare()`: on a shared, busy
machine it shows what one free core would do. Peak RSS is the child's ru_maxrss; peak RssAnon
(heap and other anonymous memory, not file pages) is sampled from /proc/<pid>/status every few
milliseconds. The variants (every method under every `--src` tree) take turns, the order
reversed every other round (A B, B A, A B, ...; use an even `--repeats`), so that the ratio is
fair on a noisy machine: `ratio` is the first variant's median time over this one's (above 1 =
faster than the first), for wall and for CPU time, with the lowest and highest per-round ratio.
The output is deleted and synced to disk between runs: without that, the CPU time of the same
variant alternated high, low, high from run to run here (the file system freeing the last
run's blocks during the next, it seems).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BLOCK_BYTES = 1 << 20  # the corpus is made of shuffled 1 MiB blocks of random words
DISTINCT_BLOCKS = 32

OTHER_SCRIPTS = (
    "café naïve façade Ærøskøbing straße über señor garçon déjà-vu fiancée Øresund "
    "λόγος φιλοσοφία ἀρχή Ελλάδα слово Москва привет жизнь Київ "
    "東京 漢字 日本語 中文 北京 学习 電車 ひらがな カタカナ 한국어 서울 "
    "مرحبا العربية עברית שלום नमस्ते हिन्दी ประเทศไทย "
    "“quoted” ‘single’ — – … € £ ¥ © ® ™ ° ± × ÷ "
    "😀 🚀 👍🏽 🎉 ❤️ 🇯🇵 🤖 📚 ✨ 🐍"
).split()


def _ascii_words(rng: np.random.Generator, count: int) -> list[str]:
    letters = np.frombuffer(b"etaoinshrdlcumwfgypbvkjxqz", dtype=np.uint8)
    weights = 1.0 / np.arange(1, len(letters) + 1)
    words = []
    for length in rng.integers(1, 11, size=count):
        word = bytes(rng.choice(letters, size=length, p=weights / weights.sum())).decode()
        words.append(word.capitalize() if rng.random() < 0.1 else word)
    return words + [",", ".", ";", ":", "!", "?", "(1)", "[2024]", "#42", "a+b=c", "'s", '"x"']


def _block(rng: np.random.Generator, words: list[str], others: list[str], other_fraction: float) -> bytes:
    """About BLOCK_BYTES of words, spaces and newlines; `other_fraction` of the words from `others`."""
    n = BLOCK_BYTES // (6 if other_fraction < 0.5 else 8)
    picks = rng.integers(0, len(words), size=n)
    parts = [words[i] for i in picks]
    for i in np.flatnonzero(rng.random(n) < other_fraction):
        parts[i] = others[rng.integers(len(others))]
    seps = np.where(rng.random(n) < 0.08, "\n", " ")
    return "".join(p + s for p, s in zip(parts, seps, strict=True)).encode("utf-8")


def _ideograph_words(rng: np.random.Generator, count: int, alphabet: int) -> list[str]:
    """Words of 1 to 4 CJK ideographs drawn from the first `alphabet` of the block."""
    return ["".join(chr(0x4E00 + int(c)) for c in rng.integers(0, alphabet, size=rng.integers(1, 5)))
            for _ in range(count)]


KINDS = {
    # kind: (description, fraction of words from other scripts, how many CJK ideographs they may use)
    "ascii": ("pure ASCII", 0.0, 0),
    "mixed": ("ASCII-heavy; 1 word in 25 from other scripts or emoji", 1 / 25, 0),
    "wide": ("as mixed, plus CJK words over 300 ideographs (uint16 ids)", 1 / 25, 300),
    "cjk": ("mostly CJK words over 3000 ideographs, ASCII spaces (not ASCII-heavy)", 0.9, 3000),
}


def generate_corpus(directory: Path, size_mb: float, kind: str, files: int, seed: int = 0) -> int:
    """Write about size_mb MiB of `kind` text (see KINDS) into `files` files; return the byte count."""
    rng = np.random.default_rng(seed)
    words = _ascii_words(rng, 5000)
    _, other_fraction, ideographs = KINDS[kind]
    others = list(OTHER_SCRIPTS)
    if ideographs:
        others += _ideograph_words(rng, 2000, ideographs)
        if kind == "cjk":
            others = others[len(OTHER_SCRIPTS):]
    blocks = [_block(rng, words, others, other_fraction) for _ in range(DISTINCT_BLOCKS)]
    directory.mkdir(parents=True, exist_ok=True)
    target = int(size_mb * (1 << 20))
    per_file = -(-target // files)
    total = 0
    for index in range(files):
        with open(directory / f"part{index:02d}.txt", "wb") as f:
            written = 0
            while written < per_file and total < target:
                block = blocks[rng.integers(len(blocks))]
                f.write(block)
                written += len(block)
                total += len(block)
    return total


CHILD = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
method = sys.argv[4]
if method != "as-is":
    import tinygpt.utf8
    if method == "vectorised-all":  # the per-chunk rule off: dense non-ASCII chunks vectorised too
        tinygpt.utf8.DENSE_NON_ASCII, method = 1.0, "vectorised"
    tinygpt.utf8.METHOD = method
from tinygpt.data import prepare
start, cpu_start = time.perf_counter(), time.process_time()
report = prepare([sys.argv[2]], sys.argv[3], progress=False)
seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "vocab": len(report.vocab),
                  "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


class Variant(NamedTuple):
    src: Path
    method: str

    def label(self, several_sources: bool) -> str:
        return f"{self.method} {str(self.src)[-24:]}" if several_sources else self.method


def _rss_anon_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def read_through(corpus: Path) -> None:
    """Read every file once, so the timed run finds the corpus in the page cache (this machine
    pages out memory it sees unused, page cache included)."""
    for path in sorted(corpus.iterdir()):
        with open(path, "rb", buffering=0) as f:
            while f.read(16 << 20):
                pass


def run_prepare(variant: Variant, corpus: Path, out: Path) -> dict:
    """Prepare `corpus` into `out` with the tinygpt found under `variant.src`, in a child process."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(variant.src), str(corpus), str(out), variant.method],
        stdout=subprocess.PIPE, text=True,
    )
    peak_anon = None
    while child.poll() is None:
        anon = _rss_anon_kb(child.pid)
        if anon is not None:
            peak_anon = max(peak_anon or 0, anon)
        time.sleep(0.005)
    output = child.stdout.read()
    if child.returncode != 0:
        hint = "; a tree without tinygpt.utf8 needs --methods as-is" if variant.method != "as-is" else ""
        raise SystemExit(f"prepare failed under {variant.src} with method {variant.method} "
                         f"(exit {child.returncode}){hint}")
    result = json.loads(output.strip().splitlines()[-1])
    result["peak_rss_anon_kb"] = peak_anon
    result["dtype"] = json.loads((out / "meta.json").read_text(encoding="utf-8"))["dtype"]
    return result


def cpu_description() -> str:
    """The CPU's model name, family and model from /proc/cpuinfo (what `lscpu` shows)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return "unknown CPU"
    return (f"{fields.get('model name', 'unknown CPU')}, family {fields.get('cpu family', '?')} "
            f"model {fields.get('model', '?')}, {os.cpu_count()} CPU(s)")


def measure_kind(kind: str, args: argparse.Namespace, variants: list[Variant], workdir: Path) -> list[dict]:
    """Generate one corpus kind, prepare it `args.repeats` times under each variant in turn and
    return one summary row per variant."""
    corpus = workdir / f"corpus-{kind}"
    start = time.perf_counter()
    corpus_bytes = generate_corpus(corpus, args.size_mb, kind, args.files)
    os.sync()  # write the corpus out now, not while prepare is being timed
    print(f"generated {corpus_bytes / 1e6:.0f} MB of {kind} text in {time.perf_counter() - start:.1f} s",
          file=sys.stderr)
    runs: dict[Variant, list[dict]] = {variant: [] for variant in variants}
    for repeat in range(args.repeats):
        for variant in variants if repeat % 2 == 0 else variants[::-1]:
            out = workdir / "out"
            if not args.cold:
                read_through(corpus)
            result = run_prepare(variant, corpus, out)
            shutil.rmtree(out)
            os.sync()  # free the output's blocks now, not during the next run
            runs[variant].append(result)
            print(f"  {kind} run {repeat + 1} {variant.label(True)}: {result['seconds']:.2f} s, "
                  f"{result['cpu_seconds']:.2f} CPU s", file=sys.stderr)
    shutil.rmtree(corpus)
    return summarise(kind, corpus_bytes / 1e6, runs, len({v.src for v in variants}) > 1)


def summarise(kind: str, corpus_mb: float, runs: dict[Variant, list[dict]], several_sources: bool) -> list[dict]:
    """One row per variant: MB/s of wall time and of CPU time (median and range), and the speed
    relative to the first variant: from the medians, from each round's pair of runs, and from
    the fastest runs (on a machine others share, each variant's least disturbed run)."""
    baseline = next(iter(runs.values()))
    rows = []
    for variant, results in runs.items():
        row = {"kind": kind, "variant": variant.label(several_sources), "src": str(variant.src),
               "method": variant.method, "corpus_mb": corpus_mb,
               "vocab": results[0]["vocab"], "dtype": results[0]["dtype"]}
        for key, name in (("seconds", "mb_per_s"), ("cpu_seconds", "mb_per_cpu_s")):
            seconds = [r[key] for r in results]
            per_round = [b[key] / r[key] for b, r in zip(baseline, results, strict=True)]
            row[key] = seconds
            row[f"{name}_median"] = corpus_mb / statistics.median(seconds)
            row[f"{name}_low"], row[f"{name}_high"] = corpus_mb / max(seconds), corpus_mb / min(seconds)
            row[f"{name}_ratio"] = statistics.median(b[key] for b in baseline) / statistics.median(seconds)
            row[f"{name}_ratio_low"], row[f"{name}_ratio_high"] = min(per_round), max(per_round)
            row[f"{name}_ratio_best"] = min(b[key] for b in baseline) / min(seconds)
        anon = [r["peak_rss_anon_kb"] for r in results if r["peak_rss_anon_kb"] is not None]
        row["peak_rss_mb"] = max(r["max_rss_kb"] for r in results) / 1024
        row["peak_rss_anon_mb"] = max(anon) / 1024 if anon else None
        rows.append(row)
    return rows


def print_table(rows: list[dict], repeats: int) -> None:
    print(f"prepare on {cpu_description()}; {repeats} run(s) per variant, MB = 10^6 bytes, MiB for memory")
    print("MB/s: median (lowest..highest run); ratio: speed over the first variant's, of the medians "
          "(lowest..highest round) and of the fastest runs")
    width = max(11, *(len(row["variant"]) for row in rows))
    header = (f"{'kind':<6} {'variant':<{width}} {'MB':>5} {'vocab':>5} {'dtype':>6} "
              f"{'wall MB/s':>15} {'wall ratio':>16} {'best':>5} {'CPU MB/s':>15} {'CPU ratio':>16} {'best':>5} "
              f"{'RSS MiB':>7} {'RssAnon MiB':>11}")
    print(header)
    print("-" * len(header))
    for row in rows:
        cells = []
        for name in ("mb_per_s", "mb_per_cpu_s"):
            low, high, median = (row[f"{name}_{end}"] for end in ("low", "high", "median"))
            cells.append(f"{median:.0f} ({low:.0f}..{high:.0f})")
            low, high, median = (row[f"{name}_ratio{end}"] for end in ("_low", "_high", ""))
            cells.append(f"{median:.2f} ({low:.2f}..{high:.2f})")
            cells.append(f"{row[f'{name}_ratio_best']:.2f}")
        anon = f"{row['peak_rss_anon_mb']:.0f}" if row["peak_rss_anon_mb"] is not None else "n/a"
        print(f"{row['kind']:<6} {row['variant']:<{width}} {row['corpus_mb']:>5.0f} {row['vocab']:>5} "
              f"{row['dtype']:>6} {cells[0]:>15} {cells[1]:>16} {cells[2]:>5} {cells[3]:>15} {cells[4]:>16} "
              f"{cells[5]:>5} "
              f"{row['peak_rss_mb']:>7.0f} {anon:>11}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=200, help="corpus size in MiB (default 200)")
    parser.add_argument("--kinds", default="ascii,mixed,wide,cjk",
                        help="comma-separated corpus kinds: " + "; ".join(f"{k}: {v[0]}" for k, v in KINDS.items()))
    parser.add_argument("--methods", default="plain,vectorised",
                        help="comma-separated decoding methods of tinygpt.utf8 (plain, vectorised, "
                             "vectorised-all: without the per-chunk rule), or as-is "
                             "for the tree's default (default: plain,vectorised; ratios are against the first)")
    parser.add_argument("--files", type=int, default=8, help="number of files the corpus is split into")
    parser.add_argument("--repeats", type=int, default=6, help="prepare runs per kind and variant (default 6)")
    parser.add_argument("--src", action="append", type=Path,
                        help="source tree holding the tinygpt package (repeat to compare; default src/)")
    parser.add_argument("--workdir", type=Path, help="where to write the corpus (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the generated corpus and outputs")
    parser.add_argument("--cold", action="store_true",
                        help="do not read the corpus through before each run (it may then come from disk)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON lines instead of a table")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    sources = [s.resolve() for s in (args.src or [ROOT / "src"])]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    variants = [Variant(src, method) for src in sources for method in methods]
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise SystemExit(f"unknown corpus kind(s): {', '.join(unknown)}")

    workdir = Path(tempfile.mkdtemp(prefix="tinygpt-prepare-", dir=args.workdir))
    try:
        rows = [row for kind in kinds for row in measure_kind(kind, args, variants, workdir)]
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print_table(rows, args.repeats)


if __name__ == "__main__":
    main()

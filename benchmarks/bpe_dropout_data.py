"""BPE-dropout as data augmentation: a prepared BPE data folder whose training tokens hold the
training text several times, each copy after the first segmented with merges dropped at random.

    .venv/bin/python benchmarks/bpe_dropout_data.py runs/quality-vs-reference/data-tinyshakespeare-bpe512 \
        ../shared/data/tinyshakespeare.txt --out runs/bpe-dropout/ts-bpe512-p0.1x4 --dropout 0.1 --copies 4
    tinygpt train --data runs/bpe-dropout/ts-bpe512-p0.1x4 --out runs/bpe-dropout/run --preset cpu \
        --set max_time=600 --set dropout=0.077
    tinygpt eval runs/bpe-dropout/run --data runs/bpe-dropout/ts-bpe512-p0.1x4

The first copy is the folder's own train.bin (the canonical segmentation: this script checks
that the tokenizer gives it back from the text). The others come from the same tokenizer with
Hugging Face `tokenizers`' BPE dropout (each merge skipped with probability --dropout, a fresh
draw per copy; not seedable, so two runs of this script differ). val.bin and tokenizer.json are
copied unchanged: the validation text is scored in its canonical segmentation, as always. The
training samples windows anywhere in train.bin, so each batch mixes the copies. Set dropout by
hand when training on it: `auto_dropout` would count the copies as more text.

For one single-file text prepared with `--tokenizer bpe` (the training split is its first
train_characters characters). BENCHMARKS.md ("Eighth round") has the one measurement.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="a folder made by tinygpt prepare --tokenizer bpe from TEXT")
    parser.add_argument("text", type=Path, help="the one text file that folder was prepared from")
    parser.add_argument("--out", type=Path, required=True, help="a new folder")
    parser.add_argument("--dropout", type=float, default=0.1, help="the chance each merge is skipped")
    parser.add_argument("--copies", type=int, default=4, help="segmentations of the training text, the first canonical")
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; choose a new folder")
    meta = json.loads((args.data / "meta.json").read_text())
    if meta.get("tokenizer_kind") != "bpe" or meta.get("dtype") != "uint16":
        raise SystemExit(f"{args.data} is not a BPE data folder with uint16 tokens")
    text = args.text.read_text(encoding="utf-8")[: meta["train_characters"]]
    tokenizer = Tokenizer.from_file(str(args.data / "tokenizer.json"))
    canonical = np.fromfile(args.data / "train.bin", dtype=np.uint16)
    again = np.array(tokenizer.encode(text).ids, dtype=np.uint16)
    if len(again) != len(canonical) or not (again == canonical).all():
        raise SystemExit(f"{args.text} does not give back {args.data}/train.bin: not the text it was prepared from")
    tokenizer.model.dropout = args.dropout
    copies = [canonical] + [np.array(tokenizer.encode(text).ids, dtype=np.uint16) for _ in range(args.copies - 1)]
    args.out.mkdir(parents=True)
    for name in ("tokenizer.json", "val.bin"):
        shutil.copyfile(args.data / name, args.out / name)
    train = np.concatenate(copies)
    train.tofile(args.out / "train.bin")
    meta["train_tokens"] = int(len(train))
    for key in ("train_characters", "train_bytes"):  # the training text, `copies` times
        if key in meta:
            meta[key] *= args.copies
    meta["bpe_dropout"] = {"dropout": args.dropout, "copies": args.copies, "tokens_per_copy": [len(c) for c in copies]}
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1))
    print(f"{args.out}: {args.copies} segmentations, tokens per copy {[len(c) for c in copies]}")


if __name__ == "__main__":
    main()

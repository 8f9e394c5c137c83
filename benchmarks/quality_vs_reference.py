"""Quality per CPU-minute: tinyGPT's presets against the reference implementation's CPU recipe.

    git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT && git -C /tmp/nanoGPT checkout 3adf61e1
    .venv/bin/python benchmarks/quality_vs_reference.py --reference /tmp/nanoGPT \
        --text ../shared/data/tinyshakespeare.txt [--text OTHER.txt ...] [--budget 600] \
        [--runs reference,previous,new,new-bpe] [--vocab-size 1024] [--set KEY=VALUE ...] \
        [--results benchmarks/results/quality_vs_reference.jsonl]

For each text, one run of each kind, one after the other (the machine otherwise quiet), each
given the same wall-clock budget for its training loop:

* reference: the reference's `train.py`, unmodified, with its README's CPU recipe
  (`config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
  --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
  --dropout=0.0`) and `--max_iters` = `--lr_decay_iters` set to what fills the budget: a short
  run first measures its seconds per iteration, evaluations included. Its data comes from its
  own `data/shakespeare_char/prepare.py`, unmodified, run on a copy of the text in a folder of
  its own (`data/<name>_char` inside the reference's clone).
* previous: `tinygpt train --config benchmarks/configs/cpu_before_issue16.toml` (the `cpu`
  preset before issue 16) with `max_time` = the budget.
* new: `tinygpt train --preset cpu` with `max_time` = the budget.
* new-bpe: the same on the text prepared with a byte-level BPE (`--tokenizer bpe --vocab-size
  N`, learned from the training split only): bits per character of the same validation text,
  the score that compares across tokenizers.

Every model is scored the same way, by tinyGPT's `evaluate.split_nats`: the whole validation
split (the last 10 % of the text in both tools), consecutive windows of the model's own block
size. The reference's checkpoint (its best by its own val estimate) is loaded with
`torch.load(weights_only=True)` into its own `model.py`. Each result is appended to --results
as one JSON line, and the table is printed from all the lines there, so texts and kinds can be
run in separate calls.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tinygpt.hardware import cpu_description

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("reference", "previous", "new", "new-bpe")
REFERENCE_RECIPE = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                    "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                    "--n_embd=128", "--dropout=0.0"]
CALIBRATION_ITERS = 500
PREVIOUS_CONFIG = ROOT / "benchmarks" / "configs" / "cpu_before_issue16.toml"


def timed_lines(command: list[str], cwd: Path, log: Path) -> list[tuple[float, str]]:
    """Run command, keeping each stdout line with the time it arrived; its output goes to log too."""
    stamped = []
    with open(log, "w") as out, subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                 text=True, bufsize=1) as process:
        for line in process.stdout:
            stamped.append((time.monotonic(), line.rstrip("\n")))
            out.write(line)
    if process.returncode:
        sys.exit(f"{' '.join(command)} failed (exit {process.returncode}); see {log}")
    return stamped


def loop_seconds(stamped: list[tuple[float, str]], last_iter: int) -> float:
    """Seconds from the reference's `iter 0` line to its `iter last_iter` line."""
    times = {int(line.split()[1].rstrip(":")): t for t, line in stamped if line.startswith("iter ")}
    return times[last_iter] - times[0]


def reference_data(reference: Path, text: Path, name: str) -> str:
    """The reference's dataset folder for this text, prepared by its own prepare.py."""
    dataset = f"{name}_char"
    folder = reference / "data" / dataset
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(reference / "data" / "shakespeare_char" / "prepare.py", folder / "prepare.py")
    shutil.copyfile(text, folder / "input.txt")
    subprocess.run([sys.executable, "prepare.py"], cwd=folder, check=True, stdout=subprocess.DEVNULL)
    return dataset


def run_reference(reference: Path, text: Path, name: str, budget: float, work: Path) -> dict:
    dataset = reference_data(reference, text, name)
    base = [sys.executable, "train.py", *REFERENCE_RECIPE, f"--dataset={dataset}"]
    calibration = work / f"ref-{name}-calibration"
    stamped = timed_lines([*base, f"--out_dir={calibration}", f"--max_iters={CALIBRATION_ITERS}",
                           f"--lr_decay_iters={CALIBRATION_ITERS}"], reference, work / f"ref-{name}-calibration.log")
    per_iter = loop_seconds(stamped, CALIBRATION_ITERS) / CALIBRATION_ITERS
    iters = int(budget / per_iter)
    out = work / f"ref-{name}"
    stamped = timed_lines([*base, f"--out_dir={out}", f"--max_iters={iters}", f"--lr_decay_iters={iters}"],
                          reference, work / f"ref-{name}.log")
    seconds = loop_seconds(stamped, iters)
    bits = score_reference(reference, out / "ckpt.pt", reference / "data" / dataset / "val.bin")
    return {"iterations": iters, "seconds": round(seconds, 1), "bits_per_char": bits,
            "command": " ".join(["python train.py", *REFERENCE_RECIPE, f"--max_iters={iters}",
                                 f"--lr_decay_iters={iters}"])}


class ReferenceAdapter(torch.nn.Module):
    """The reference's GPT as split_nats calls a model: model(idx) -> (logits of every position, _)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, idx: torch.Tensor):
        # without targets the reference returns the last position's logits only
        logits, _ = self.model(idx, targets=torch.zeros_like(idx))
        return logits, None


def score_reference(reference: Path, checkpoint: Path, val_bin: Path) -> float:
    from tinygpt.evaluate import split_nats
    sys.path.insert(0, str(reference))
    from model import GPT, GPTConfig  # the reference's own model.py
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = GPT(GPTConfig(**saved["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in saved["model"].items()})
    tokens = np.memmap(val_bin, dtype=np.uint16, mode="r")
    nats = split_nats(ReferenceAdapter(model), np.asarray(tokens, dtype=np.int64), batch_size=64)
    return round(nats / (len(tokens) - 1) / math.log(2), 4)


def run_tinygpt(kind: str, text: Path, name: str, budget: float, work: Path, vocab_size: int,
                changes: list[str]) -> dict:
    tinygpt = str(Path(sys.executable).with_name("tinygpt"))
    tokenizer = ["--tokenizer", "bpe", "--vocab-size", str(vocab_size)] if kind == "new-bpe" else []
    data = work / (f"data-{name}-bpe{vocab_size}" if tokenizer else f"data-{name}")
    if not (data / "meta.json").exists():
        subprocess.run([tinygpt, "prepare", str(text), "--out", str(data), "--no-progress", *tokenizer], check=True,
                       stdout=subprocess.DEVNULL)
    # one folder per kind, vocabulary, text and changes: only a rerun of the same replaces it
    out = work / "-".join([f"{kind}{vocab_size}" if tokenizer else kind, name, *changes])
    recipe = ["--config", str(PREVIOUS_CONFIG)] if kind == "previous" else ["--preset", "cpu"]
    recipe += [] if kind == "previous" else [arg for change in changes for arg in ("--set", change)]
    command = [tinygpt, "train", "--data", str(data), "--out", str(out), *recipe, "--set", f"max_time={budget:g}",
               "--overwrite", "--no-progress"]
    started = time.monotonic()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.monotonic() - started
    scored = subprocess.run([tinygpt, "eval", str(out), "--data", str(data), "--json", "--no-progress"], check=True,
                            capture_output=True, text=True)
    result = json.loads(scored.stdout)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    iters = max(m.get("iteration", 0) for m in metrics)
    dropout = json.loads((out / "config.json").read_text())["model"]["dropout"]  # auto_dropout's choice, if on
    shown = " ".join(command[1:]).replace(str(work) + "/", "").replace(str(ROOT) + "/", "")
    prepared = " ".join(["tinygpt prepare", text.name, "--out", data.name, *tokenizer])
    return {"iterations": iters, "seconds": round(seconds, 1), "bits_per_char": round(result["bits_per_char"], 4),
            "dropout": dropout,
            "command": f"{prepared}; tinygpt {shown}", **({"vocab_size": vocab_size} if tokenizer else {}),
            **({"changes": changes} if changes and kind != "previous" else {})}


def table(results: Path) -> str:
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    lines = ["| text | recipe | val bits/char | iterations | seconds | CPU |", "|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: (r["text"], KINDS.index(r["kind"]))):
        kind = f"new-bpe{row['vocab_size']}" if row["kind"] == "new-bpe" else row["kind"]
        kind += "".join(f" {change}" for change in row.get("changes", []))
        lines.append(f"| {row['text']} | {kind} | {row['bits_per_char']:.3f} | {row['iterations']:,} | "
                     f"{row['seconds']:.0f} | {row['cpu']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, help="a clone of the reference implementation")
    parser.add_argument("--text", type=Path, action="append", default=[])
    parser.add_argument("--budget", type=float, default=600.0, help="seconds of training per run")
    parser.add_argument("--vocab-size", type=int, default=1024, help="the BPE of the new-bpe runs")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="a change to the preset for the new and new-bpe runs (as `tinygpt train --set`)")
    parser.add_argument("--runs", default=",".join(KINDS), help="which kinds, comma-separated")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "quality-vs-reference")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" /
                        "quality_vs_reference.jsonl")
    args = parser.parse_args()
    kinds = args.runs.split(",")
    if unknown := set(kinds) - set(KINDS):
        parser.error(f"unknown --runs {sorted(unknown)}; known: {', '.join(KINDS)}")
    if "reference" in kinds and args.reference is None:
        parser.error("--runs reference needs --reference (a clone of the reference implementation)")
    args.work.mkdir(parents=True, exist_ok=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    for text in args.text:
        name = text.stem
        for kind in kinds:
            if kind == "reference":
                result = run_reference(args.reference.resolve(), text.resolve(), name, args.budget, args.work)
            else:
                result = run_tinygpt(kind, text.resolve(), name, args.budget, args.work, args.vocab_size,
                                     args.set or [])
            row = {"text": name, "kind": kind, "budget": args.budget, "cpu": cpu_description(), **result}
            print(json.dumps(row), flush=True)
            with open(args.results, "a") as out:
                out.write(json.dumps(row) + "\n")
    if args.results.exists():
        print(table(args.results))


if __name__ == "__main__":
    main()

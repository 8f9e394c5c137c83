"""Training speed: tinyGPT against the naive notebook model, at the seed configuration.

    python benchmarks/train_speed.py --batch-size 32 --rounds 5

Both models have the seed preset's sizes (n_embd 384, 12 layers, 8 heads, block 64, dropout
0.2, vocabulary 84) and train on the same random batches with the same batch size. Every
measurement runs in a fresh process, and the variants alternate (A B A B ...) over several
rounds, because one eager step on a shared machine moves by +-20 % with process state
alone. Every process gets the same OMP_WAIT_POLICY (PASSIVE unless told otherwise: on a
loaded machine, spinning OpenMP waits make every variant up to 10x slower, and noisier).
Each process warms up, times a few steps and reports the median step; we report, per
variant, the median over rounds and the spread (min..max), the achieved model FLOP/s
(FLOPs/token = 6N + 12*L*C*T, N = matmul weights) and its fraction of the fp32 and bf16
matmul ceilings, which are measured in their own processes in every round too.

Variants: `naive` (benchmarks/naive_reference.py: fp32, eager, plain AdamW), `ours` (the
speed paths `train` decides for this device, eager: precision, attention form, dropout mask),
`ours-fp32`, and `ours-compile` (torch.compile; the first process compiles, later ones reuse Inductor's on-disk cache).
`reference` and `reference-bf16` (they need --reference, a clone of the reference
implementation: `git clone https://github.com/karpathy/nanoGPT && git -C nanoGPT checkout
3adf61e1`): its `model.py`, unmodified, at the seed sizes (bias on, as its default), its own
`configure_optimizers` (AdamW 3e-4, betas 0.9/0.99, decay 0.1) and the step its `train.py` takes
(forward with targets, backward, clip 1.0, step, zero_grad), eager; in fp32, as its `train.py`
runs on a CPU, or under bf16 autocast, its fastest CPU mode where the CPU has bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED_SIZES = dict(vocab_size=84, n_embd=384, n_layer=12, n_head=8, block_size=64, dropout=0.2)
VARIANTS = ("naive", "reference", "reference-bf16", "ours", "ours-fp32", "ours-compile", "ours-fp32-compile")


def build(variant: str, batch_size: int):
    """The model's step function, and what it was built with."""
    import torch

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    T = SEED_SIZES["block_size"]
    x = torch.randint(0, SEED_SIZES["vocab_size"], (batch_size, T), generator=generator)
    y = torch.randint(0, SEED_SIZES["vocab_size"], (batch_size, T), generator=generator)
    if variant == "naive":
        sys.path.insert(0, str(HERE))
        from naive_reference import NaiveGPT, make_optimizer, train_step

        model = NaiveGPT(**SEED_SIZES).train()
        optimizer = make_optimizer(model)
        return (lambda: train_step(model, optimizer, x, y)), "float32 (naive reference)"

    if variant.startswith("reference"):
        return reference_step(variant, x, y)

    import dataclasses

    from tinygpt import speed
    from tinygpt.bench import training_step
    from tinygpt.config import get_preset
    from tinygpt.model import GPT

    model_config, train_config = get_preset("seed")
    model_config.vocab_size = SEED_SIZES["vocab_size"]
    device = torch.device("cpu")
    if "fp32" in variant:
        train_config = dataclasses.replace(train_config, dtype="float32")
    # the speed paths `tinygpt train` decides for this CPU: precision, attention form, dropout mask
    plan = speed.plan(device, train_config, model_config.dropout)
    model = speed.apply(GPT(model_config).train(), plan)
    step_model = torch.compile(model) if "compile" in variant else model
    step = training_step(model, train_config, plan.precision, device, batch_size, step_model)
    return step, "; ".join(plan.describe())


def reference_step(variant: str, x, y):
    """The reference implementation's model and training step (see the module docstring)."""
    import contextlib

    import torch

    sys.path.insert(0, os.environ["TINYGPT_REFERENCE"])
    from model import GPT, GPTConfig  # the reference's own model.py

    model = GPT(GPTConfig(**SEED_SIZES, bias=True)).train()
    optimizer = model.configure_optimizers(0.1, 3e-4, (0.9, 0.99), "cpu")
    bf16 = variant == "reference-bf16"

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, "bf16 autocast (reference)" if bf16 else "float32 (reference)"


def worker(args) -> None:
    """One measurement, in this process: warm up, time `steps` steps, print JSON."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.variant == "ceiling":
        from tinygpt.bench import matmul_ceilings

        ceilings, sides = matmul_ceilings(torch.device("cpu"), size=args.matmul_size, repeats=5)
        print(json.dumps({"variant": "ceiling", **ceilings, "sides": sides}))
        return
    started = time.perf_counter()
    step, precision = build(args.variant, args.batch_size)
    for _ in range(args.warmup):
        step()
    warm = time.perf_counter() - started
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    tokens = args.batch_size * SEED_SIZES["block_size"]
    print(json.dumps({"variant": args.variant, "tokens_per_second": tokens / statistics.median(times),
                      "step_seconds": times, "warmup_seconds": warm, "precision": precision,
                      "threads": torch.get_num_threads()}))


def run_one(variant: str, args) -> dict:
    command = [sys.executable, __file__, "--worker", variant, "--batch-size", str(args.batch_size),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--matmul-size", str(args.matmul_size)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]))
    if args.reference:
        env["TINYGPT_REFERENCE"] = str(Path(args.reference).resolve())
    env.pop("OMP_WAIT_POLICY", None)
    if args.omp_wait_policy != "unset":  # the same for every variant (tinyGPT itself defaults to PASSIVE)
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def flops_per_token() -> tuple[int, int]:
    from tinygpt.config import get_preset
    from tinygpt.model import GPT

    model_config, _ = get_preset("seed")
    model_config.vocab_size = SEED_SIZES["vocab_size"]
    model = GPT(model_config)
    return model.flops_per_token(), model.matmul_parameters()


def cpu_line() -> str:
    from tinygpt.hardware import cpu_description

    return cpu_description()


def best_seconds(run, repeats: int = 5) -> float:
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def parts(args) -> None:
    """The pieces behind the speed-up, each timed in this process at seed shapes (best of 5)."""
    if args.omp_wait_policy != "unset":  # before torch starts OpenMP
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy
    import torch
    import torch.nn.functional as F

    from tinygpt.config import get_preset
    from tinygpt.hardware import explicit_causal_attention
    from tinygpt.model import GPT, Dropout

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_line()}; {torch.get_num_threads()} threads; best of 5 in one process\n")
    B = args.batch_size
    activations = (B, 64, 384)
    print(f"| dropout p=0.2 on {activations}, forward + backward | ns/element |")
    print("|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        x0 = torch.randn(activations).to(dtype)
        for name, layer in (("F.dropout", lambda x: F.dropout(x, 0.2, True)), ("tinyGPT Dropout", Dropout(0.2))):
            def run(layer=layer, x0=x0):
                x = x0.clone().requires_grad_()
                y = layer(x)
                y.backward(y)
            print(f"| {name}, {str(dtype)[6:]} | {best_seconds(run) * 1e9 / x0.numel():.2f} |")
    shape = (B, 8, 64, 48)
    print(f"\n| causal attention on {shape}, forward + backward | ms |")
    print("|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        inputs = [torch.randn(shape).to(dtype) for _ in range(3)]
        for name, attention in (
            ("SDPA (flash kernel)", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
            ("explicit (tinyGPT in training)", explicit_causal_attention),
        ):
            def run(attention=attention, inputs=inputs):
                q, k, v = (t.clone().requires_grad_() for t in inputs)
                attention(q, k, v).sum().backward()
            print(f"| {name}, {str(dtype)[6:]} | {best_seconds(run) * 1e3:.1f} |")
    model_config, _ = get_preset("seed")
    model_config.vocab_size = SEED_SIZES["vocab_size"]
    model = GPT(model_config)
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter)
    print("\n| AdamW step, seed model (21.4 M parameters) | ms |")
    print("|---|---|")
    for name, options in (("for-loop (CPU default)", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, **options)
        print(f"| {name} | {best_seconds(optimizer.step) * 1e3:.1f} |")
    size = args.matmul_size
    a, w = torch.randn(size, size), torch.randn(size, size)
    a_onednn = a.to_mkldnn()
    print(f"\n| {size}^3 fp32 matmul | GFLOP/s |")
    print("|---|---|")
    print(f"| torch.mm (what training uses) | {2 * size**3 / best_seconds(lambda: a @ w.t()) / 1e9:.0f} |")
    print(f"| oneDNN linear (inference-only layout) | "
          f"{2 * size**3 / best_seconds(lambda: torch._C._nn.mkldnn_linear(a_onednn, w, None)) / 1e9:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process (default 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per process (default 2)")
    parser.add_argument("--variants", default="naive,ours", help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--threads", type=int, help="torch threads in every process (default: PyTorch's)")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--omp-wait-policy", choices=("PASSIVE", "ACTIVE", "unset"), default="PASSIVE",
                        help="OpenMP waiting in every process (default PASSIVE, what tinyGPT sets; 'unset': "
                             "the runtime's spinning default, ruinous on a loaded machine)")
    parser.add_argument("--json", metavar="PATH", help="also write every measurement here")
    parser.add_argument("--baseline", default="naive", help="the variant the others are compared with (default naive)")
    parser.add_argument("--reference", help="a clone of the reference implementation (for the reference variants)")
    parser.add_argument("--parts", action="store_true", help="time the pieces (dropout, attention, AdamW, "
                        "fp32 matmul paths) in this process instead")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.variant = args.worker
        worker(args)
        return
    if args.parts:
        parts(args)
        return

    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {VARIANTS}")
    if any(v.startswith("reference") for v in variants) and not args.reference:
        raise SystemExit("the reference variants need --reference (a clone of the reference implementation)")
    per_token, matmul_weights = flops_per_token()
    print(f"CPU: {cpu_line()}")
    print(f"OMP_WAIT_POLICY {args.omp_wait_policy} in every process")
    print(f"seed sizes {SEED_SIZES}, batch {args.batch_size}; {args.rounds} rounds of "
          f"{' '.join(variants)} ceiling, each in its own process ({args.warmup} warm-up + {args.steps} timed steps)")
    print(f"FLOPs/token = 6N + 12*L*C*T = 6 x {matmul_weights:,} + 12 x 12 x 384 x 64 = {per_token:,}")
    results: dict[str, list[dict]] = {v: [] for v in [*variants, "ceiling"]}
    for round_index in range(args.rounds):
        for variant in [*variants, "ceiling"]:
            result = run_one(variant, args)
            results[variant].append(result)
            if variant == "ceiling":
                detail = f"fp32 {result['float32'] / 1e9:.0f}, bf16 {result['bfloat16'] / 1e9:.0f} GFLOP/s"
            else:
                detail = f"{result['tokens_per_second']:,.0f} tokens/s ({result['precision']})"
            print(f"  round {round_index + 1} {variant:18s} {detail}", flush=True)

    ceiling = {name: statistics.median(r[name] for r in results["ceiling"]) for name in ("float32", "bfloat16")}
    sides = {name: sorted({r["sides"][name] for r in results["ceiling"]}) for name in ("float32", "bfloat16")}
    shown = {name: "/".join(f"{side}^3" for side in sides[name]) for name in sides}
    print(f"\nmatmul ceilings (median of rounds): fp32 {ceiling['float32'] / 1e9:.0f} ({shown['float32']}), "
          f"bf16 {ceiling['bfloat16'] / 1e9:.0f} GFLOP/s ({shown['bfloat16']}); "
          f"threads {results[variants[0]][0]['threads']}")
    base = args.baseline if args.baseline in results else None
    header = (f"| variant | tokens/s (median) | min..max | vs {base or '-'} | GFLOP/s | % of fp32 ceiling "
              "| % of bf16 ceiling |")
    print(header)
    print("|" + "---|" * 7)
    base_rate = statistics.median(r["tokens_per_second"] for r in results[base]) if base else None
    for variant in variants:
        rates = [r["tokens_per_second"] for r in results[variant]]
        median = statistics.median(rates)
        achieved = median * per_token
        versus = f"{median / base_rate:.2f}x" if base else "-"
        print(f"| {variant} | {median:,.0f} | {min(rates):,.0f}..{max(rates):,.0f} | {versus} | "
              f"{achieved / 1e9:.1f} | {achieved / ceiling['float32']:.0%} | {achieved / ceiling['bfloat16']:.0%} |")
    for variant in variants if base else []:
        if variant == base:
            continue
        ratios = [o["tokens_per_second"] / n["tokens_per_second"]
                  for o, n in zip(results[variant], results[base], strict=True)]
        print(f"{variant} / {base}, round by round: " + ", ".join(f"{r:.2f}" for r in ratios)
              + f" (median {statistics.median(ratios):.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "cpu": cpu_line(), "flops_per_token": per_token,
                                               "results": results}, indent=1))


if __name__ == "__main__":
    main()

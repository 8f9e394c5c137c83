"""Load test for `tinygpt serve`: concurrent clients on loopback against a real server process.

    python benchmarks/serve_load.py [RUN_DIR] [--clients 32] [--requests 1000] [--max-tokens 64] [--model-speed]
    python benchmarks/serve_load.py --build-run DIR      # build the run once, to serve it from several trees
    python benchmarks/serve_load.py DIR --source /tmp/before/src --label before --json results.jsonl

Starts `python -m tinygpt serve RUN_DIR` on a free loopback port, sends the requests from
`--clients` concurrent connections (alternately a plain and a streamed /v1/completions),
and prints: errors, latency percentiles, time to the first streamed text, generated
characters per second, and the server's resident memory before and after and after each
quarter of the requests (flat memory means no request leaks anything), and the server's CPU
time (all its threads) per request. Without RUN_DIR it
builds a run of the `cpu` preset's shape (trained for one step: speed does not depend on
what the weights learned). `--source` serves from another source tree (its `src` folder, on
PYTHONPATH) with the same Python, to compare two versions of the server on one run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

PROMPTS = ["ROMEO:", "To be, or not to be", "First Citizen:\nBefore we proceed", "O", "The king", "What light"]


def build_run(root: Path, preset: str) -> Path:
    import torch

    from tinygpt.config import get_preset
    from tinygpt.data import prepare
    from tinygpt.train import train

    corpus = root / "corpus.txt"
    # every character of the prompts, and enough text for a block of the cpu preset
    corpus.write_text("\n".join(PROMPTS) * 200 + "abcdefghijklmnopqrstuvwxyz,.;:!?'\n", encoding="utf-8")
    prepare([str(corpus)], root / "data", progress=False)
    model_config, train_config = get_preset(preset)
    train_config.max_iters, train_config.eval_iters, train_config.batch_size = 1, 1, 4
    torch.set_num_threads(1)
    train(root / "data", root / "run", model_config, train_config, device="cpu", progress=False, log=lambda *a: None)
    return root / "run"


def model_speed(run_dir: Path, rounds: int = 3, steps: int = 100) -> None:
    """In-process ms per generated step: 1 vs 2 torch threads at batch 1, then batch 1 vs 8
    at 1 thread; the variants alternate round by round, so machine load hits them alike."""
    import torch

    from tinygpt import load
    from tinygpt.generate import generate_ids

    model, tokenizer = load(run_dir)
    prompt = tokenizer.encode(PROMPTS[0])
    variants = {"1 thread, batch 1": (1, 1), "2 threads, batch 1": (2, 1), "1 thread, batch 8": (1, 8)}
    timings: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (threads, batch) in variants.items():
            torch.set_num_threads(threads)
            started = time.perf_counter()
            for _ in generate_ids(model, prompt, steps, seed=0, num_samples=batch, with_probs=True):
                pass
            timings[name].append((time.perf_counter() - started) / steps * 1000)
    torch.set_num_threads(1)
    for name, values in timings.items():
        batch = variants[name][1]
        median = statistics.median(values)
        print(f"generate, {name}: median {median:.2f} ms/step = {batch * 1000 / median:,.0f} characters/s "
              f"(rounds: {', '.join(f'{v:.2f}' for v in values)})")


def rss_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


def cpu_seconds(pid: int) -> float:
    """The process's CPU time so far (user + system, all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def one_request(http: httpx.AsyncClient, model: str, index: int, max_tokens: int) -> dict:
    body = {"model": model, "prompt": PROMPTS[index % len(PROMPTS)], "max_tokens": max_tokens,
            "temperature": 0.8, "seed": index}
    started = time.perf_counter()
    if index % 2 == 0:
        response = await http.post("/v1/completions", json=body)
        if response.status_code != 200:
            return {"error": f"{response.status_code} {response.text[:200]}"}
        tokens = response.json()["usage"]["completion_tokens"]
        return {"latency": time.perf_counter() - started, "tokens": tokens}
    first, text = None, ""
    async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        if response.status_code != 200:
            return {"error": f"{response.status_code} {(await response.aread())[:200]!r}"}
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                text += "".join(choice["text"] for choice in chunk["choices"])
                if first is None:
                    first = time.perf_counter() - started
    return {"latency": time.perf_counter() - started, "first": first, "tokens": len(text)}


async def load(url: str, model: str, clients: int, requests: int, max_tokens: int,
               on_progress=lambda done: None) -> tuple[list[dict], float]:
    results: list[dict] = []
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:

        async def client() -> None:
            for index in counter:
                try:
                    results.append(await one_request(http, model, index, max_tokens))
                except httpx.HTTPError as e:
                    results.append({"error": repr(e)})
                on_progress(len(results))

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return results, time.perf_counter() - started


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", nargs="?", help="a trained run (default: build one of --preset's shape)")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    parser.add_argument("--max-active", type=int, help="the server's --max-active (default: the server's own)")
    parser.add_argument("--source", help="serve from this source tree's src folder (default: the installed tinygpt)")
    parser.add_argument("--label", default="", help="a name for this run in the printout and --json")
    parser.add_argument("--json", help="append this run's figures to this file, one JSON object per line")
    parser.add_argument("--build-run", metavar="DIR", help="only build a run of --preset's shape in DIR and exit")
    parser.add_argument("--model-speed", action="store_true",
                        help="first time generation in-process: 1 vs 2 torch threads, batch 1 vs 8")
    return parser.parse_args()


@dataclasses.dataclass
class Measured:
    """What one load test measured of the server."""

    results: list[dict]  # one per request: its latency, time to first text and tokens, or its error
    seconds: float  # wall time of all the requests
    rss_before: dict[str, int]  # KiB, after the warm-up
    rss_after: dict[str, int]
    server_cpu: float  # seconds of the server's CPU time over the requests
    quarters: list[float]  # MiB resident after each quarter of the requests
    health: dict  # the server's /health at the end


def wait_for_server(server: subprocess.Popen, url: str) -> str:
    """The served model's name, once the server answers /health (it has 120 s to start)."""
    deadline = time.monotonic() + 120
    while True:
        try:
            return httpx.get(f"{url}/health", timeout=2).json()["model"]
        except httpx.HTTPError:
            if server.poll() is not None or time.monotonic() > deadline:
                print(server.stderr.read().decode(errors="replace") if server.stderr else "", file=sys.stderr)
                raise SystemExit("the server did not start") from None
            time.sleep(0.2)


def measure(run_dir: Path, args: argparse.Namespace) -> Measured:
    """Start the server on run_dir, warm it up, send the requests, and stop it."""
    port = free_port()
    command = [sys.executable, "-m", "tinygpt", "serve", str(run_dir), "--port", str(port), "--device", "cpu",
               "--threads", str(args.threads), "--max-queue", str(max(64, args.clients))]
    if args.max_active:
        command += ["--max-active", str(args.max_active)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.source:
        env["PYTHONPATH"] = str(Path(args.source).resolve())
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        model = wait_for_server(server, url)
        asyncio.run(load(url, model, 4, 20, args.max_tokens))  # warm up: first calls allocate buffers
        before, cpu_before = rss_kib(server.pid), cpu_seconds(server.pid)
        quarters: list[float] = []

        def sample_memory(done: int) -> None:
            if done % max(1, args.requests // 4) == 0:
                quarters.append(rss_kib(server.pid)["VmRSS"] / 1024)

        results, seconds = asyncio.run(load(url, model, args.clients, args.requests, args.max_tokens, sample_memory))
        after, server_cpu = rss_kib(server.pid), cpu_seconds(server.pid) - cpu_before
        return Measured(results, seconds, before, after, server_cpu, quarters, httpx.get(f"{url}/health").json())
    finally:
        server.terminate()
        server.wait(timeout=30)


def report(args: argparse.Namespace, run_dir: Path, measured: Measured) -> int:
    """Print the figures (and append them to --json); the number of requests that failed."""
    seconds, before, after, quarters, health = (measured.seconds, measured.rss_before, measured.rss_after,
                                                measured.quarters, measured.health)
    errors = [r["error"] for r in measured.results if "error" in r]
    done = [r for r in measured.results if "error" not in r]
    latencies = [r["latency"] * 1000 for r in done]
    firsts = [r["first"] * 1000 for r in done if r.get("first") is not None]
    tokens = sum(r["tokens"] for r in done)
    print(f"{args.label + ': ' if args.label else ''}server from {args.source or 'the installed tinygpt'}, "
          f"run {run_dir} ({args.preset if not args.run_dir else 'given run'}), torch threads {args.threads}, "
          f"max active {args.max_active or 'default'}")
    print(f"{args.requests} requests from {args.clients} concurrent clients, max_tokens {args.max_tokens}, "
          "half plain, half streamed")
    print(f"errors:                {len(errors)}" + (f"  first: {errors[0]}" if errors else ""))
    print(f"wall time:             {seconds:.1f} s  ({len(done) / seconds:.1f} requests/s)")
    print(f"latency p50 / p99:     {percentile(latencies, 50):.0f} / {percentile(latencies, 99):.0f} ms")
    if firsts:
        print(f"first text p50 / p99:  {percentile(firsts, 50):.0f} / {percentile(firsts, 99):.0f} ms (streamed)")
    print(f"generated:             {tokens:,} characters, {tokens / seconds:,.0f} characters/s")
    print(f"server CPU time:       {measured.server_cpu:.1f} s, "
          f"{measured.server_cpu * 1000 / max(1, len(done)):.1f} ms per request")
    print(f"server RSS before:     {before['VmRSS'] / 1024:.1f} MiB")
    print(f"server RSS after:      {after['VmRSS'] / 1024:.1f} MiB  (peak {after['VmHWM'] / 1024:.1f} MiB, "
          f"change {(after['VmRSS'] - before['VmRSS']) / 1024:+.1f} MiB)")
    print(f"server RSS by quarter: {', '.join(f'{q:.1f}' for q in quarters)} MiB")
    print(f"server counters:       completed {health['completed']}, cancelled {health['cancelled']}, "
          f"active {health['active']}, queued {health['queued']}")
    mean = statistics.fmean(latencies) if latencies else 0.0
    print(f"mean latency:          {mean:.0f} ms")
    if args.json:
        figures = {
            "label": args.label, "source": args.source, "clients": args.clients, "requests": args.requests,
            "max_active": args.max_active, "errors": len(errors), "seconds": seconds,
            "characters_per_second": tokens / seconds, "latency_ms": {q: percentile(latencies, q) for q in (50, 99)},
            "first_text_ms": {q: percentile(firsts, q) for q in (50, 99)} if firsts else None,
            "mean_latency_ms": mean, "rss_mib_before": before["VmRSS"] / 1024, "rss_mib_after": after["VmRSS"] / 1024,
            "server_cpu_seconds": measured.server_cpu,
            "rss_mib_by_quarter": quarters,
        }
        with open(args.json, "a", encoding="utf-8") as out:
            out.write(json.dumps(figures) + "\n")
    return len(errors)


def main() -> int:
    args = parse_arguments()
    if args.build_run:
        print(build_run(Path(args.build_run), args.preset))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.run_dir) if args.run_dir else build_run(Path(tmp), args.preset)
        if args.model_speed:
            model_speed(run_dir)
        if args.requests <= 0:
            return 0
        measured = measure(run_dir, args)
    return 1 if report(args, run_dir, measured) else 0


if __name__ == "__main__":
    sys.exit(main())

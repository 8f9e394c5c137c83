"""The `tinygpt` command: argument parsing only; the work happens in the library.

Errors a user can cause arrive here as TinyGPTError and leave as one line on stderr
and exit status 1 (2 for unusable arguments).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path

from tinygpt import omp
from tinygpt.config import PRESETS, apply_overrides, config_toml, get_preset, known_keys, load_config_file
from tinygpt.errors import ConfigError, PeerLost, TinyGPTError

# commands whose speed depends on how OpenMP threads wait (omp.py), and which say what they chose
TORCH_COMMANDS = ("train", "eval", "sample", "chat", "serve", "bench", "sweep")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        self.exit(2, f"{self.prog}: error: {message}\n")


def cmd_prepare(args) -> int:
    from tinygpt.data import BPE_DEFAULT_SAMPLE_BYTES, prepare

    if args.bpe_sample_mb is not None and args.tokenizer != "bpe":
        raise TinyGPTError("--bpe-sample-mb is for --tokenizer bpe")
    if args.bpe_sample_mb is not None and not 0 < args.bpe_sample_mb < 1e12:
        raise TinyGPTError(f"--bpe-sample-mb must be a positive number of megabytes, got {args.bpe_sample_mb}")
    sample_mb = args.bpe_sample_mb if args.bpe_sample_mb is not None else BPE_DEFAULT_SAMPLE_BYTES / 1e6
    report = prepare(args.inputs, args.out, val_fraction=args.val_fraction, glob=args.glob,
                     encoding_errors=args.encoding_errors, progress=None if not args.no_progress else False,
                     keep_line_endings=args.keep_line_endings, overwrite=args.overwrite, tokenizer=args.tokenizer,
                     vocab_size=args.vocab_size, bpe_sample_bytes=round(sample_mb * 1e6))
    kept = [f for f in report.files if f.status != "skipped"]
    tokenizer = report.tokenizer
    tokens = report.train_tokens + report.val_tokens
    characters_per_token = (report.train_characters + report.val_characters) / max(1, tokens)
    what = (f"{tokenizer.vocab_size} symbols" if tokenizer.kind == "char" else
            f"byte-level BPE of {tokenizer.vocab_size} tokens ({characters_per_token:.2f} characters per token)")
    print(f"prepared {len(kept)} file(s) into {report.out_dir}: vocabulary {what}, "
          f"{report.train_tokens:,} train + {report.val_tokens:,} val tokens")
    return 0


def _configs(args):
    """The preset's configs with the command line's changes. Resuming without --preset starts
    from the run's own configs instead; either way train refuses any change a continuing run
    cannot make, naming the key. --init-from RUN (a new run) starts from RUN's model config and
    the --preset's (or --config file's) training config, else RUN's. --config FILE.toml starts
from the file (its [model] and [train] over the preset it names) instead of a preset."""
    last = Path(args.out) / "last.json" if getattr(args, "resume", False) else None
    config_file = getattr(args, "config", None)
    if getattr(args, "init_from", None) and not (last is not None and last.is_file()):
        from tinygpt.train import init_from_configs

        preset_train = (load_config_file(config_file, args.preset, model_table=False)[1] if config_file is not None
                        else get_preset(args.preset)[1] if args.preset is not None else None)
        model_config, train_config = init_from_configs(Path(args.init_from), preset_train, args.set or [])
    elif args.preset is None and config_file is None and last is not None and last.is_file():
        from tinygpt.checkpoint import read_record
        from tinygpt.config import model_config_from_dict, train_config_from_dict
        from tinygpt.training_state import check_resumable

        record = read_record(args.out, "last")
        check_resumable(Path(args.out), record)
        model_config = model_config_from_dict(record["model_config"])
        train_config = train_config_from_dict(record["train_config"])
    elif config_file is not None:
        model_config, train_config = load_config_file(config_file, args.preset)
    else:
        model_config, train_config = get_preset(args.preset or "cpu")
    apply_overrides(model_config, train_config, args.set or [])
    if getattr(args, "max_iters", None) is not None:
        train_config.max_iters = args.max_iters
    if getattr(args, "seed", None) is not None:
        train_config.seed = args.seed
    if getattr(args, "compile", False):
        train_config.compile = True
    return model_config, train_config


def cmd_train(args) -> int:
    from tinygpt.train import train

    model_config, train_config = _configs(args)
    if args.resume and args.overwrite:
        raise ConfigError("--resume continues a run and --overwrite starts it over: choose one")
    if train_config.processes != 1:
        from tinygpt import distributed

        train_config.validate()
        processes, why = distributed.local_processes(
            train_config.processes, train_config.batch_size // train_config.grad_accum, args.device)
        if processes > 1:
            print(f"processes: {processes} ({why}); --set processes=1 trains in one", flush=True)
            environment = dict(os.environ)
            if args.omp_wait_policy_asked is None:  # each process chooses (and says) its own
                environment.pop("OMP_WAIT_POLICY", None)
            return distributed.run_local_workers(args.argv, processes, environment)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, once
        print(args.threads_line)
    result = train(args.data, args.out, model_config, train_config, device=args.device, resume=args.resume,
                   progress=not args.no_progress, overwrite=args.overwrite, init_from=args.init_from)
    if result.val_loss is not None and result.rank == 0:
        print(f"done: {result.iterations} iterations; val loss {result.val_loss:.4f} nats/token "
              f"({result.val_bits_per_byte:.3f} bits/byte, {result.val_bits_per_char:.3f} bits/char, as logged); "
              f"run saved in {args.out}")
    return 130 if result.interrupted else 0


def cmd_eval(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from tinygpt.checkpoint import load_model
    from tinygpt.data import load_tokenizer, load_tokens
    from tinygpt.evaluate import evaluate_tokens
    from tinygpt.hardware import resolve_device

    device = resolve_device(args.device)
    torch.manual_seed(0)
    model, tokenizer = load_model(args.run_dir, device=device)
    data_tokenizer = load_tokenizer(args.data)
    if data_tokenizer.to_dict() != tokenizer.to_dict():
        which = "vocabulary" if data_tokenizer.kind == tokenizer.kind else \
            f"tokenizer ({data_tokenizer.kind}; the run's is {tokenizer.kind})"
        raise TinyGPTError(f"the {which} of {args.data} differs from the run's; evaluate on the data it was "
                           f"trained on")
    tokens = load_tokens(args.data, args.split)
    with tqdm(total=max(0, len(tokens) - 1), unit="token", unit_scale=True, desc=f"eval {args.split}",
              disable=args.json or args.no_progress, leave=False) as bar:
        result = evaluate_tokens(model, tokens, batch_size=args.batch_size, device=device, progress=bar.update,
                                 stride=args.stride, tokenizer=tokenizer)
    if not args.json:
        print(args.threads_line, file=sys.stderr)
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(f"{args.split} loss: {result.loss:.4f} nats/token over {result.tokens:,} tokens "
              f"({result.characters:,} characters, {result.bytes:,} bytes)")
        print(f"{args.split} bits/byte: {result.bits_per_byte:.3f}")
        print(f"{args.split} bits/char: {result.bits_per_char:.3f}")
        print(f"{args.split} perplexity: {result.perplexity:.3f} (per token)")
    return 0


def cmd_sample(args) -> int:
    from tinygpt.checkpoint import load_model
    from tinygpt.generate import check_sampling, stream_text
    from tinygpt.hardware import resolve_device

    # the library's own check (generate_ids makes it too), before the model loads
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, args.num_samples)
    model, tokenizer = load_model(args.run_dir, device=resolve_device(args.device))
    tokenizer.encode(args.prompt)  # unknown characters: one line, before anything is printed
    if args.int8:
        from tinygpt.quantize import int8_model

        model = int8_model(model)
    print(args.threads_line, file=sys.stderr)
    steps = stream_text(model, tokenizer, args.prompt, args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, seed=args.seed, num_samples=args.num_samples,
                        use_cache=not args.no_cache)
    if args.num_samples == 1:
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
        for step in steps:
            sys.stdout.write(step[0])
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    samples = [args.prompt] * args.num_samples
    for step in steps:
        samples = [s + c for s, c in zip(samples, step, strict=True)]
    for i, text in enumerate(samples):
        print(f"--- sample {i + 1} ---")
        print(text)
    return 0


def cmd_info(args) -> int:
    from tinygpt.checkpoint import best_or_last, build_model, read_record

    if args.run_dir:
        record = read_record(args.run_dir, best_or_last(args.run_dir))
        model, _, model_config = build_model(record, allocate=False)  # shapes only: nothing to allocate
        train_config = record.get("train_config", {})
    elif args.preset:
        if args.vocab_size is None:
            raise TinyGPTError("info --preset needs --vocab-size (the number of symbols in your data)")
        model_config, train_config_obj = get_preset(args.preset)
        apply_overrides(model_config, train_config_obj, args.set or [])
        from tinygpt.tokenizer import MAX_VOCAB_SIZE

        if args.vocab_size > MAX_VOCAB_SIZE:
            raise TinyGPTError(f"--vocab-size must be at most {MAX_VOCAB_SIZE}, got {args.vocab_size}")
        model_config.vocab_size = args.vocab_size
        import torch

        from tinygpt.model import GPT

        with torch.device("meta"):  # shapes only: counting needs no memory, whatever the size
            model = GPT(model_config)
        train_config = dataclasses.asdict(train_config_obj)
    else:
        raise TinyGPTError("info needs a RUN_DIR or --preset NAME --vocab-size V")
    parameters = model.num_parameters()
    if args.json:
        print(json.dumps({"parameters": parameters, "matmul_parameters": model.matmul_parameters(),
                          "flops_per_token": model.flops_per_token(),
                          "model_config": dataclasses.asdict(model_config), "train_config": train_config}))
        return 0
    print(f"parameters: {parameters:,} ({parameters / 1e6:.2f} M)")
    print(f"training FLOPs per token: {model.flops_per_token():,} (6 x {model.matmul_parameters():,} matmul weights "
          f"+ 12 x n_layer x n_embd x block_size)")
    for key, value in dataclasses.asdict(model_config).items():
        print(f"  {key} = {value}")
    for key, value in train_config.items():
        print(f"  {key} = {value}")
    return 0


def cmd_bench(args) -> int:
    from tinygpt.bench import format_table, run_bench

    progress = None if args.json else (lambda message: print(f"measuring {message} ...", file=sys.stderr))
    result = run_bench(preset=args.preset, run_dir=args.run_dir, device=args.device, batch_size=args.batch_size,
                       repeats=args.repeats, compile=args.compile, generation_tokens=args.new_tokens,
                       prepare_megabytes=args.prepare_mb, threads=args.threads, dtype=args.dtype,
                       matmul_size=args.matmul_size, progress=progress)
    result.omp_wait_policy = args.threads_line.removeprefix("threads: ")
    print(json.dumps(result.as_dict()) if args.json else format_table(result))
    return 0


def cmd_export(args) -> int:
    if args.format == "gguf":
        return _export_gguf(args)
    from tinygpt.export import export_run

    result = export_run(args.run_dir, args.out, format=args.format, int8=args.int8, overwrite=args.overwrite)
    what = f"Hugging Face {result.target}" if args.format == "hf" else "ONNX"
    print(f"exported {args.run_dir} ({result.checkpoint}, iteration {result.iteration:,}) as {what} to "
          f"{result.out_dir}: {', '.join(result.files)}")
    return 0


def _export_gguf(args) -> int:
    from tinygpt.gguf_export import export_gguf

    if args.int8:
        raise TinyGPTError("--int8 is for --format onnx")
    out = Path(args.out)
    path = export_gguf(args.run_dir, out if out.suffix == ".gguf" else out / "model.gguf", overwrite=args.overwrite)
    print(f"exported {args.run_dir} as GGUF (for llama.cpp) to {path}")
    return 0


def cmd_presets(args) -> int:
    if args.show is not None:
        if args.show not in PRESETS:
            raise ConfigError(f"unknown preset {args.show!r}; known presets: {', '.join(PRESETS)}")
        model_config, train_config = get_preset(args.show)
        print(config_toml(model_config, train_config, preset=args.show,
                          comment=f"preset {args.show}: {PRESETS[args.show].description}"), end="")
        return 0
    for name, preset in PRESETS.items():
        m, t = preset.model, preset.train
        print(f"{name:6s} {preset.description}")
        print(f"       n_layer {m.n_layer}, n_head {m.n_head}, n_embd {m.n_embd}, block_size {m.block_size}, "
              f"batch {t.batch_size}, lr {t.learning_rate:g} ({t.schedule}), {t.max_iters} iterations")
    return 0


def cmd_serve(args) -> int:
    from tinygpt.serve import Limits, serve

    for name in ("max_active", "max_queue", "max_tokens", "threads"):
        if getattr(args, name) < (0 if name == "max_queue" else 1):
            raise TinyGPTError(f"--{name.replace('_', '-')} must be a positive number")
    if any(not name.strip() for name in args.allow_host):
        raise TinyGPTError("--allow-host needs a host name (or * for any)")
    api_key = args.api_key if args.api_key is not None else os.environ.get("TINYGPT_API_KEY")
    if api_key is not None and not api_key.strip():
        raise TinyGPTError("--api-key (or TINYGPT_API_KEY) is empty; give a key, or unset it to serve without one")
    if any(not origin.strip() or origin.endswith("/") for origin in args.cors_origin):
        raise TinyGPTError("--cors-origin takes an origin such as https://app.example (scheme and host, no path; "
                           "* for any)")
    limits = Limits(max_active=args.max_active, max_queue=args.max_queue, max_tokens=args.max_tokens)
    print(args.threads_line, flush=True)
    serve(args.run_dir, host=args.host, port=args.port, device=args.device, limits=limits, threads=args.threads,
          allow_hosts=args.allow_host, docs=args.docs, api_key=api_key, cors_origins=args.cors_origin,
          chat_template=args.chat_template)
    return 0


def cmd_chat(args) -> int:
    from tinygpt.checkpoint import load_model
    from tinygpt.generate import stream_text
    from tinygpt.hardware import resolve_device

    model, tokenizer = load_model(args.run_dir, device=resolve_device(args.device))
    print(args.threads_line, file=sys.stderr)
    print(f"tinygpt chat: {args.run_dir}. Type the start of a text and press Enter; the model continues it.\n"
          "Ctrl-C stops a reply; Ctrl-D (or Ctrl-C at the prompt) quits.")
    for turn in range(1_000_000_000):
        try:
            prompt = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        try:
            tokenizer.encode(prompt)
        except TinyGPTError as e:
            print(f"tinygpt chat: {e}", file=sys.stderr)
            continue
        seed = None if args.seed is None else args.seed + turn
        try:
            sys.stdout.write(prompt)
            for step in stream_text(model, tokenizer, prompt, args.max_new_tokens, temperature=args.temperature,
                                    top_k=args.top_k, top_p=args.top_p, seed=seed):
                sys.stdout.write(step[0])
                sys.stdout.flush()
            print()
        except KeyboardInterrupt:
            print(" [stopped]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tinygpt",
                     description="Train, evaluate and sample small GPTs (characters or a byte-level BPE).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    _add_training_commands(sub)
    _add_sampling_commands(sub)
    _add_serving_and_measuring_commands(sub)
    _add_export_command(sub)
    _add_experiment_commands(sub)
    return parser


def _add_training_commands(sub) -> None:
    p = sub.add_parser("prepare", help="turn text files into token files")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="files, directories, or 'shakespeare' (the built-in complete works)")
    p.add_argument("--out", required=True, metavar="DATA_DIR",
                   help="a new or empty folder, or an earlier prepare's output (its files are replaced)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty folder that holds no tinyGPT data, replacing any meta.json, "
                        "train.bin and val.bin there (and tokenizer.json with --tokenizer bpe; other files stay)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="tail of each file held out (default 0.1)")
    p.add_argument("--glob", default="*.txt", help="file pattern inside directories (default *.txt)")
    p.add_argument("--encoding-errors", choices=("strict", "replace", "skip"), default="strict",
                   help="invalid UTF-8: stop (strict), substitute U+FFFD (replace) or skip the file")
    p.add_argument("--keep-line-endings", action="store_true",
                   help="keep CR LF and lone CR as they are (default: each becomes LF)")
    p.add_argument("--tokenizer", default="char", metavar="{char,bpe}",
                   help="char: one id per character the corpus has (default); bpe: a byte-level BPE learned "
                        "from the corpus, which encodes any text")
    p.add_argument("--vocab-size", type=int, metavar="N",
                   help="the BPE's vocabulary (256 to 65536 tokens; e.g. 4096)")
    p.add_argument("--bpe-sample-mb", type=float, metavar="MB",
                   help="learn the BPE's merges from at most this much of the training text, the same share "
                        "of every file (default 1073.7 MB: 1 GiB)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a model")
    p.add_argument("--data", required=True, metavar="DATA_DIR")
    p.add_argument("--out", required=True, metavar="RUN_DIR")
    p.add_argument("--preset", choices=list(PRESETS), help="the starting configuration (default cpu)")
    p.add_argument("--config", metavar="FILE.toml",
                   help="the configuration from a TOML file (`tinygpt presets --show NAME` writes one)")
    p.add_argument("--max-iters", type=int)
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help=f"override a config value; keys: {', '.join(known_keys())}")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in RUN_DIR when it holds a run: deletes that run's checkpoints and metrics")
    p.add_argument("--init-from", metavar="RUN",
                   help="fine-tune: start from RUN's best (else last) weights and model config, with a fresh "
                        "optimizer and schedule (training config: --preset's, else RUN's); the data must be "
                        "tokenized as RUN's was")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="loss per token, bits/byte, bits/char and perplexity over a whole split")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--data", required=True, metavar="DATA_DIR")
    p.add_argument("--split", choices=("val", "train"), default="val")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--stride", type=int, metavar="N",
                   help="overlapping windows N tokens apart: every token after the first window is "
                        "predicted from at least block_size - N + 1 tokens (default: block_size, no overlap)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)



def _add_sampling_commands(sub) -> None:
    p = sub.add_parser("sample", help="generate text, streamed")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=int, default=500,
                   help="tokens to generate (characters with a char tokenizer; default 500)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context every step")
    p.add_argument("--int8", action="store_true",
                   help="decode with int8 weights (CPU; faster, text slightly different: BENCHMARKS.md)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("info", help="parameter count and config of a run or preset")
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR")
    p.add_argument("--preset", choices=list(PRESETS))
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)



def _add_serving_and_measuring_commands(sub) -> None:
    p = sub.add_parser("serve", help="serve a run: OpenAI-compatible API and a browser playground")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for the model (default 1)")
    p.add_argument("--max-active", type=int, default=32,
                   help="requests generating at once, one decode step for all (default 32)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond those; more get 429 (default 64)")
    p.add_argument("--max-tokens", type=int, default=1024, help="the cap on max_tokens per request (default 1024)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests whose Host header is NAME (repeatable; * for any), e.g. behind a "
                        "reverse proxy or on a LAN (default: the --host address, and loopback names on loopback)")
    p.add_argument("--docs", action="store_true", help="serve the API's documentation at /docs, /redoc, /openapi.json")
    p.add_argument("--api-key", metavar="KEY", help="require Authorization: Bearer KEY on /v1/*, /api/* and /metrics "
                   "(default: the TINYGPT_API_KEY environment variable, which keeps the key out of the process list)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. https://app.example; repeatable; * for any) call the API "
                        "(default: none, no CORS headers)")
    p.add_argument("--chat-template", metavar="FILE",
                   help="a JSON chat template for /v1/chat/completions (see the README; default: USER:/ASSISTANT: "
                        "turns)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("chat", help="type prompts, watch the model continue them (streamed)")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--max-new-tokens", type=int, default=300, help="tokens per reply (default 300)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, help="seed of the first reply (default: random)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("bench", help="measure training, generation and preparation speed on this device")
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="measure a run's model (default: --preset cpu)")
    p.add_argument("--preset", choices=list(PRESETS))
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, help="training batch (default: the preset's or run's)")
    p.add_argument("--repeats", type=int, default=5, help="timed training steps, after 2 warm-up steps (default 5)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for the training figure")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="training precision (default: picked for this device)")
    p.add_argument("--new-tokens", type=int, default=1000, help="characters generated (default 1000)")
    p.add_argument("--prepare-mb", type=float, default=16.0, help="size of the generated corpus (default 16 MB)")
    p.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's choice)")
    p.add_argument("--matmul-size", type=int,
                   help="side of the ceiling matmuls (default 2048; 8192 on CUDA; smaller where one would take "
                        "over a second, as bf16 on a CPU without it)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("presets", help="list the named presets, or print one as a config file")
    p.add_argument("--show", metavar="NAME", help="print preset NAME as TOML, to start a --config file from")
    p.set_defaults(func=cmd_presets)


def _add_export_command(sub) -> None:
    p = sub.add_parser("export", help="write a run's model for another runtime: Hugging Face transformers, "
                                      "llama.cpp (GGUF) or ONNX")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run (its best checkpoint, else its last)")
    p.add_argument("--format", required=True, choices=("hf", "gguf", "onnx"),
                   help="hf: a folder transformers' AutoModelForCausalLM and AutoTokenizer load (gpt2, starcoder2 "
                        "or arcee, whichever computes exactly this model); gguf: one file llama.cpp loads "
                        "(gpt2, starcoder2 or nemotron); onnx: model.onnx (input_ids -> logits)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="a new or empty folder (gguf: the folder for model.gguf, or the path of a .gguf file)")
    p.add_argument("--int8", action="store_true",
                   help="onnx: also write model.int8.onnx (onnxruntime's dynamic quantization: int8 weights)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty folder, replacing the files this export writes (others stay); "
                        "never into a tinyGPT run or data folder")
    p.set_defaults(func=cmd_export)


def cmd_compare(args) -> int:
    from tinygpt.experiments import compare_runs

    comparison = compare_runs(args.runs, out=args.out, x=args.x, overwrite=args.overwrite)
    for line in comparison.warnings:
        print(line, file=sys.stderr)
    if args.json:
        print(json.dumps(comparison.as_dict()))
    else:
        print(comparison.table())
        print(f"curves: {comparison.png} (bits per byte against {args.x})")
    return 0


def cmd_lr_find(args) -> int:
    from tinygpt.experiments import check_lr_find_args, lr_find

    check_lr_find_args(args.steps, args.min_lr, args.max_lr)  # before torch loads
    model_config, train_config = get_preset(args.preset)
    apply_overrides(model_config, train_config, args.set or [])
    result = lr_find(args.data, model_config, train_config, steps=args.steps, min_lr=args.min_lr,
                     max_lr=args.max_lr, out=args.out, device=args.device, progress=not args.no_progress,
                     overwrite=args.overwrite)
    end = (f"stopped after {len(result.learning_rates)} steps: the smoothed loss passed 4x its minimum"
           if result.stopped_early else f"all {len(result.learning_rates)} steps")
    print(f"range test: learning rate {result.learning_rates[0]:.2e} to {result.learning_rates[-1]:.2e}, {end}; "
          f"plot: {result.png}")
    print(f"suggested learning_rate: {result.suggested_lr:.2e} (rule: {result.rule})")
    return 0


def cmd_sweep(args) -> int:
    from tinygpt.sweep import plan_sweep, run_sweep

    if args.config is not None:
        model_config, train_config = load_config_file(args.config, args.preset)
    else:
        model_config, train_config = get_preset(args.preset or "cpu")
    apply_overrides(model_config, train_config, args.set or [])
    plan = plan_sweep(args.data, model_config, train_config, args.grid, seeds=args.seeds, budget=args.budget,
                      one_at_a_time=args.one_at_a_time)
    print(args.threads_line)
    state = run_sweep(plan, args.out, device=args.device, progress=not args.no_progress)
    print(f"sweep done: {len(state.results)} runs; table in {state.out / 'sweep.md'}, curves in "
          f"{state.out / 'sweep.png'}")
    return 0


def _add_experiment_commands(sub) -> None:
    p = sub.add_parser("compare", help="overlay runs' loss curves; table of the config keys that differ and scores")
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument("--out", default="compare.png", help="the plot (default compare.png); never inside a run")
    p.add_argument("--overwrite", action="store_true", help="replace a PNG already at --out")
    p.add_argument("--x", default="iterations", metavar="{iterations,tokens,seconds}",
                   help="the plot's x axis (default iterations)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("lr-find", help="learning-rate range test on a fresh model; suggests a learning rate")
    p.add_argument("--data", required=True, metavar="DATA_DIR")
    p.add_argument("--preset", choices=list(PRESETS), default="cpu", help="the model and training config (default cpu)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, as in train")
    p.add_argument("--steps", type=int, default=200, help="training steps, at most (default 200)")
    p.add_argument("--min-lr", type=float, default=1e-6, help="the first step's learning rate (default 1e-6)")
    p.add_argument("--max-lr", type=float, default=1.0, help="the last step's learning rate (default 1)")
    p.add_argument("--out", default="lr_find.png", help="the plot (default lr_find.png); never inside a run")
    p.add_argument("--overwrite", action="store_true", help="replace a PNG already at --out")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_lr_find)

    p = sub.add_parser("sweep", help="train a grid of configurations in turn, each under the same time budget")
    p.add_argument("--data", required=True, metavar="DATA_DIR")
    p.add_argument("--preset", choices=list(PRESETS), help="the base configuration (default cpu)")
    p.add_argument("--config", metavar="FILE.toml", help="the base configuration from a TOML file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="change the base configuration, as in train")
    p.add_argument("--grid", action="append", metavar="KEY=V1,V2", help="values of one key (repeat for more keys)")
    p.add_argument("--one-at-a-time", action="store_true",
                   help="vary each --grid key alone from the base (plus the base itself), not every product")
    p.add_argument("--seeds", type=int, default=1, help="runs per combination, seeds counting up from the "
                                                           "config's (default 1)")
    p.add_argument("--budget", type=float, required=True, metavar="SECONDS", help="wall-clock training time per run")
    p.add_argument("--out", required=True, metavar="SWEEP_DIR",
                   help="the sweep's folder; the same command again continues it")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_sweep)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.omp_wait_policy_asked = os.environ.get("OMP_WAIT_POLICY")
    if args.command in TORCH_COMMANDS:
        # before torch loads; said once the command is under way (errors stay one line)
        args.threads_line = f"threads: {omp.set_for(args.command)}"
    try:
        return args.func(args)
    except TinyGPTError as e:
        print(f"tinygpt {args.command}: error: {e}", file=sys.stderr)
        if isinstance(e, PeerLost):
            # The process group is broken. Letting Python free the DDP wrapper now can deadlock:
            # its destructor joins gloo's worker threads while holding the GIL, and a worker may
            # be waiting for the GIL to free its last task. Checkpoints and metrics are already
            # on disk, so the process ends here, at once.
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(OSError):
                    stream.flush()
            os._exit(1)
        return 1
    except BrokenPipeError:  # e.g. `tinygpt sample ... | head`: the reader left, nothing to report
        sys.stderr.close()
        return 0
    except OSError as e:
        print(f"tinygpt {args.command}: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"tinygpt {args.command}: interrupted", file=sys.stderr)
        return 130

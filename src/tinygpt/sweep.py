"""Sweeps: a grid of configurations, each trained in turn under the same wall-clock budget.

    tinygpt sweep --data DATA --preset P --grid key=v1,v2 [--grid ...] [--seeds N] --budget S --out DIR

plan_sweep(): the grid -> its combinations: every product of the --grid values, or, with
              one_at_a_time, the preset itself and each key's values varied alone from it
run_sweep():  each combination x seed trained into DIR/<combination>-s<seed>/ with max_time =
              the budget (so a slower variant pays for its cost in iterations), its best
              checkpoint scored on the whole validation split (evaluate.py), then DIR/sweep.md
              and DIR/sweep.png rewritten and the table printed

Resumable. DIR/sweep.json holds the plan and every finished run's scores; the same command
again keeps each finished run as it is (nothing retrained, its files untouched), continues an
interrupted run from its last checkpoint (`train --resume`: after a kill, the work since that
checkpoint is lost and the budget counts on from that checkpoint's clock), and trains the rest.
A different plan in the same DIR is refused: a sweep's rows must be comparable. A run that
diverges (a NaN loss) is recorded as diverged, shown so in the table, and the sweep goes on.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from tinygpt.checkpoint import atomic_write_bytes, read_record
from tinygpt.config import ModelConfig, TrainConfig, apply_overrides, known_keys
from tinygpt.errors import ConfigError, TinyGPTError, TrainingDiverged
from tinygpt.experiments import plot_comparison, summarize_run

SWEEP_FORMAT = "tinygpt-sweep"
UNBOUNDED_ITERS = 10**9  # the budget, not an iteration count, ends each run
NAME_VALUE = re.compile(r"[A-Za-z0-9_.+-]+")  # values that can be part of a folder's name
NOT_IN_GRID = {"seed": "--seeds", "max_time": "--budget", "max_iters": "--budget"}


class SweepInterrupted(TinyGPTError):
    """Ctrl-C or SIGTERM stopped a run; it saved its state, and the same command continues."""


@dataclass
class SweepPlan:
    data: str  # the data directory, resolved
    base_model: ModelConfig
    base_train: TrainConfig
    axes: list[tuple[str, list[str]]]  # (key, its values as given), in --grid order
    one_at_a_time: bool
    seeds: int
    budget: float
    combinations: list[dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"format": SWEEP_FORMAT, "data": self.data, "model": dataclasses.asdict(self.base_model),
                "train": dataclasses.asdict(self.base_train), "grid": [[k, v] for k, v in self.axes],
                "one_at_a_time": self.one_at_a_time, "seeds": self.seeds, "budget": self.budget}

    def runs(self) -> list[tuple[str, dict[str, str], int]]:
        """(run name, overrides, seed) of every run, in the order they train: seed by seed, so a
        sweep cut short has every combination once before any twice."""
        first_seed = self.base_train.seed
        return [(f"{combination_name(c)}-s{first_seed + s}", c, first_seed + s)
                for s in range(self.seeds) for c in self.combinations]

    def configs(self, overrides: dict[str, str], seed: int) -> tuple[ModelConfig, TrainConfig]:
        model, train = dataclasses.replace(self.base_model), dataclasses.replace(self.base_train)
        apply_overrides(model, train, [f"{k}={v}" for k, v in overrides.items()])
        train.seed, train.max_time = seed, self.budget
        return model, train


def combination_name(overrides: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in overrides.items()) or "base"


def parse_grid(specs: list[str]) -> list[tuple[str, list[str]]]:
    """`key=v1,v2,...` strings -> (key, values); keys must be known and distinct."""
    if not specs:
        raise ConfigError("the grid is empty: give at least one --grid key=v1,v2")
    axes: list[tuple[str, list[str]]] = []
    for spec in specs:
        key, sep, raw = spec.partition("=")
        key = key.strip()
        values = [v.strip() for v in raw.split(",")]
        if not sep or not key or not all(values):
            raise ConfigError(f"--grid expects key=v1,v2,... with no empty value, got {spec!r}")
        if key in NOT_IN_GRID:
            raise ConfigError(f"{key} is not a grid key: {NOT_IN_GRID[key]} sets it for every run")
        if key not in known_keys():
            raise ConfigError(f"unknown grid key {key!r}; known keys: "
                              f"{', '.join(k for k in known_keys() if k not in NOT_IN_GRID)}")
        if any(k == key for k, _ in axes):
            raise ConfigError(f"--grid {key} is given twice; list all its values in one --grid")
        if len(set(values)) != len(values):
            raise ConfigError(f"--grid {key} repeats a value: {raw!r}")
        bad = [v for v in values if not NAME_VALUE.fullmatch(v)]
        if bad:
            raise ConfigError(f"--grid {key} value {bad[0]!r} cannot name a run folder "
                              f"(letters, digits and _ . + - only)")
        axes.append((key, values))
    return axes


def plan_sweep(data: str | Path, base_model: ModelConfig, base_train: TrainConfig, grid: list[str],
               seeds: int = 1, budget: float = 0.0, one_at_a_time: bool = False) -> SweepPlan:
    """The sweep's plan; every run's configuration is checked before anything trains."""
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
        raise ConfigError(f"--budget must be a positive number of seconds, got {budget!r}")
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    axes = parse_grid(grid)
    base_train = dataclasses.replace(base_train, max_time=float(budget))
    base_train.max_iters = UNBOUNDED_ITERS
    plan = SweepPlan(str(Path(data).resolve()), base_model, base_train, axes, one_at_a_time, seeds, float(budget))
    if one_at_a_time:
        combinations: list[dict[str, str]] = [{}]
        for key, values in axes:
            base_value = _value_of(base_model, base_train, key)
            combinations += [{key: v} for v in values if not _same_value(plan, key, v, base_value)]
    else:
        combinations = [dict(zip([k for k, _ in axes], values, strict=True))
                        for values in itertools.product(*(v for _, v in axes))]
    plan.combinations = combinations
    for overrides in combinations:
        model, train = plan.configs(overrides, base_train.seed)
        try:
            model.validate()
            train.validate()
        except ConfigError as e:
            raise ConfigError(f"combination {combination_name(overrides)}: {e}") from None
    return plan


def _value_of(model: ModelConfig, train: TrainConfig, key: str):
    return getattr(model, key) if hasattr(model, key) else getattr(train, key)


def _same_value(plan: SweepPlan, key: str, raw: str, base_value) -> bool:
    model, train = plan.configs({key: raw}, plan.base_train.seed)
    # a dropout given by hand turns auto_dropout off: the base's own dropout is then another run
    return _value_of(model, train, key) == base_value and train.auto_dropout == plan.base_train.auto_dropout


# ----------------------------------------------------------------------------- running it


@dataclass
class SweepState:
    out: Path
    plan: SweepPlan
    results: dict[str, dict] = field(default_factory=dict)  # run name -> its scores

    @property
    def path(self) -> Path:
        return self.out / "sweep.json"

    def save(self) -> None:
        atomic_write_bytes(self.path, json.dumps({**self.plan.as_dict(), "results": self.results}, indent=1).encode())


def open_sweep(out: Path, plan: SweepPlan) -> SweepState:
    """A new sweep in a new or empty folder, or the same sweep continued; anything else refused."""
    state = SweepState(out, plan)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file, not a directory")
    if state.path.is_file():
        try:
            saved = json.loads(state.path.read_text(encoding="utf-8"))
            results = saved.pop("results")
        except (OSError, ValueError, KeyError, AttributeError, TypeError):
            raise ConfigError(f"{str(state.path)!r} is not a readable sweep record; nothing was changed") from None
        if saved.get("format") != SWEEP_FORMAT:
            raise ConfigError(f"{str(state.path)!r} is not a tinyGPT sweep; nothing was changed")
        differ = [k for k, v in plan.as_dict().items() if saved.get(k) != json.loads(json.dumps(v))]
        if differ:
            raise ConfigError(f"{str(out)!r} holds another sweep (its {', '.join(differ)} differ); run its own "
                              f"command again to continue it, or choose another --out")
        state.results = results if isinstance(results, dict) else {}
    elif out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"--out {str(out)!r} is not empty and holds no sweep; choose a new or empty folder "
                          f"(nothing was changed)")
    else:
        out.mkdir(parents=True, exist_ok=True)
        state.save()
    return state


def _training_done(run_dir: Path, train: TrainConfig) -> bool:
    """Whether the run's last checkpoint is its final one (budget spent or max_iters reached)."""
    if not (run_dir / "last.json").is_file():
        return False
    record = read_record(run_dir, "last")
    return record["iteration"] >= train.max_iters or float(record.get("elapsed", 0.0)) >= train.max_time


def _score(run_dir: Path, data: str, device: str) -> dict:
    """The run's best checkpoint on the whole validation split, and its speed."""
    from tinygpt.checkpoint import load_model
    from tinygpt.data import load_tokens
    from tinygpt.evaluate import evaluate_tokens
    from tinygpt.hardware import resolve_device

    torch_device = resolve_device(device)
    model, tokenizer = load_model(run_dir, device=torch_device)
    result = evaluate_tokens(model, load_tokens(data, "val"), device=torch_device, tokenizer=tokenizer)
    summary = summarize_run(run_dir)
    return {"val_bits_per_char": result.bits_per_char, "val_bits_per_byte": result.bits_per_byte,
            "iterations": summary.iterations, "tokens_per_second": summary.tokens_per_second,
            "wall_time": summary.wall_time, "parameters": summary.parameters}


def run_sweep(plan: SweepPlan, out: str | Path, device: str = "auto", progress: bool = True, log=print) -> SweepState:
    """Train and score every run of the plan not yet finished in `out`; see the module docstring."""
    from tinygpt.train import train

    state = open_sweep(Path(out), plan)
    runs = plan.runs()
    score_seconds: list[float] = []
    for number, (name, overrides, seed) in enumerate(runs, 1):
        if name in state.results:
            continue
        left = sum(name_ not in state.results for name_, _, _ in runs[number - 1:])
        per_run = plan.budget + (statistics.mean(score_seconds) if score_seconds else 0.0)
        log(f"sweep: run {number} of {len(runs)}: {name}; about {_duration(left * per_run)} left for the sweep")
        run_dir = state.out / name
        model_config, train_config = plan.configs(overrides, seed)
        entry = {"combination": combination_name(overrides), "seed": seed}
        try:
            if not _training_done(run_dir, train_config):
                # always --resume: a run killed before its first checkpoint starts again from 0
                result = train(plan.data, run_dir, model_config, train_config, device=device, resume=True,
                               progress=progress, log=log)
                if result.interrupted:
                    raise SweepInterrupted(f"stopped during {name}; its state is saved: run the same command "
                                           f"again to continue the sweep")
            started = time.perf_counter()
            entry |= _score(run_dir, plan.data, device)
            score_seconds.append(time.perf_counter() - started)
        except TrainingDiverged as e:
            # a combination that diverges is a result too: recorded, and the sweep goes on
            log(f"sweep: {name} diverged: {e}")
            entry |= {"diverged": True, "val_bits_per_char": None, "val_bits_per_byte": None, "iterations": None,
                      "tokens_per_second": None}
        state.results[name] = entry
        state.save()
        write_report(state)
        log(sweep_table(state))
    return state


def _duration(seconds: float) -> str:
    minutes = seconds / 60
    return f"{seconds:.0f} s" if minutes < 2 else f"{minutes:.0f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


# ----------------------------------------------------------------------------- the report


def table_rows(state: SweepState) -> list[dict]:
    """One row per combination, over the seeds finished so far: mean and sample standard
    deviation of the whole-split validation bits per character, mean iterations and tokens/s."""
    rows = []
    for overrides in state.plan.combinations:
        name = combination_name(overrides)
        done = [r for r in state.results.values() if r["combination"] == name]
        trained = [r for r in done if not r.get("diverged")]
        scores = [r["val_bits_per_char"] for r in trained]
        speeds = [r["tokens_per_second"] for r in trained if r["tokens_per_second"]]
        rows.append({"combination": name, "seeds": len(done), "of": state.plan.seeds,
                     "diverged": len(done) - len(trained),
                     "val_bits_per_char": statistics.mean(scores) if scores else None,
                     "spread": statistics.stdev(scores) if len(scores) > 1 else None,
                     "iterations": statistics.mean(r["iterations"] for r in trained) if trained else None,
                     "tokens_per_second": statistics.mean(speeds) if speeds else None})
    return rows


def sweep_table(state: SweepState) -> str:
    """The table as Markdown, best score marked."""
    rows = table_rows(state)
    scored = [r["val_bits_per_char"] for r in rows if r["val_bits_per_char"] is not None]
    lines = ["| combination | val bits/char (whole split) | seeds | iterations | tokens/s |", "|---|---|---|---|---|"]
    for r in rows:
        score = "-" if r["val_bits_per_char"] is None else f"{r['val_bits_per_char']:.3f}" + (
            f" ± {r['spread']:.3f}" if r["spread"] is not None else "")
        if scored and r["val_bits_per_char"] == min(scored):
            score = f"**{score}**"
        seeds = f"{r['seeds']}/{r['of']}" + (f" ({r['diverged']} diverged)" if r["diverged"] else "")
        lines.append(f"| {r['combination']} | {score} | {seeds} | {_count(r['iterations'])} | "
                     f"{_count(r['tokens_per_second'])} |")
    return "\n".join(lines)


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def write_report(state: SweepState) -> None:
    """sweep.md (the plan and the table) and sweep.png (every finished run's curves)."""
    plan = state.plan
    grid = " ".join(f"--grid {k}={','.join(v)}" for k, v in plan.axes)
    text = (f"# Sweep\n\ndata: `{plan.data}`; {grid}{' (each key alone)' if plan.one_at_a_time else ''}; "
            f"{plan.seeds} seed(s) from {plan.base_train.seed}; budget {plan.budget:g} s per run\n\n"
            f"Score: the best checkpoint's loss over the whole validation split, in bits per character; "
            f"± is the sample standard deviation over seeds.\n\n{sweep_table(state)}\n")
    atomic_write_bytes(state.out / "sweep.md", text.encode("utf-8"))
    summaries = [dataclasses.replace(summarize_run(state.out / name), run_dir=Path(name))
                 for name, result in state.results.items() if not result.get("diverged")]
    plot_comparison(summaries, state.out / "sweep.png", "seconds")

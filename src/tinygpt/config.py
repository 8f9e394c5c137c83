"""Configuration: two plain dataclasses, the named presets, and validation.

`ModelConfig` describes the network; `TrainConfig` describes how it is trained. Both are
plain dataclasses so a checkpoint can store them as JSON and a user can override any
field from the command line with `--set key=value` (keys are unqualified: `n_embd`,
`learning_rate`, ...).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tinygpt.errors import ConfigError, PeerLost, TinyGPTError

__all__ = ["ConfigError", "PeerLost", "TinyGPTError", "ModelConfig", "TrainConfig", "PRESETS", "get_preset"]


@dataclass
class ModelConfig:
    vocab_size: int = 65
    block_size: int = 64  # the context length, in characters
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True  # biases on the output projections, MLP and norms
    qkv_bias: bool = True  # bias on the fused query/key/value projection
    lm_head_bias: bool = False
    norm: str = "pre"  # "pre": x + f(LN(x)); "post": LN(x + f(x)) as in the original notebook
    norm_type: str = "layernorm"  # "layernorm" or "rmsnorm"
    activation: str = "gelu"  # "gelu", "relu", or "relu2" (ReLU squared)
    positions: str = "learned"  # "learned" absolute embeddings or "rope" (rotary)
    tie_embeddings: bool = False  # share the token embedding with the LM head
    scaled_residual_init: bool = True  # GPT-2's init: residual projections at 0.02 / sqrt(2 n_layer)
    zero_init_proj: bool = False  # the projections into the residual stream start at zero
    qk_norm: bool = False  # RMS-normalise each head's queries and keys before attention
    logit_softcap: float = 0.0  # > 0: logits = cap * tanh(logits / cap)

    def validate(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ConfigError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if self.positions == "rope" and (self.n_embd // self.n_head) % 2 != 0:
            raise ConfigError("rotary positions need an even head size (n_embd / n_head)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        _check_choice("norm", self.norm, ("pre", "post"))
        _check_choice("norm_type", self.norm_type, ("layernorm", "rmsnorm"))
        _check_choice("activation", self.activation, ("gelu", "relu", "relu2"))
        if not self.logit_softcap >= 0:
            raise ConfigError(f"logit_softcap must be >= 0 (0: off), got {self.logit_softcap}")
        _check_choice("positions", self.positions, ("learned", "rope"))


@dataclass
class TrainConfig:
    batch_size: int = 32
    learning_rate: float = 1e-3
    min_lr: float = 1e-4  # the floor the cosine schedule decays to
    schedule: str = "cosine"  # "cosine" (linear warmup, cosine decay), "wsd" or "constant"
    decay_fraction: float = 0.3  # wsd: the last share of the run, decayed linearly to min_lr
    warmup_iters: int = 100
    max_iters: int = 2000
    max_time: float = 0.0  # seconds; > 0 also ends training (and its schedule) at this wall-clock budget
    eval_interval: int = 250
    eval_iters: int = 20  # batches of train and of val per evaluation
    weight_decay: float = 0.1
    decay_all_params: bool = False  # True: decay biases and norms too (plain AdamW)
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 turns clipping off
    grad_accum: int = 1  # micro-batches per optimizer step; batch_size is the total
    optimizer: str = "adamw"  # "adamw", or "muon" for hidden matrices (AdamW for the rest)
    muon_lr: float = 0.0  # Muon's peak rate (0: learning_rate); the schedule scales it as it scales learning_rate
    # raise dropout above the model's (its floor) by how many times the run will see its training
    # tokens (train.dropout_for_epochs); decided once, early, and recorded in the run's config
    auto_dropout: bool = False
    # > 0: evaluate, and keep as `best`, an exponential moving average of the weights, at this
    # decay per iteration (training itself goes on from the raw weights); 0: off
    ema: float = 0.0
    # > 0: the same average, but the decay grows with the run so that its mean age is this fraction
    # of the iterations so far (iteration s weighs s^(1/ema_horizon - 2)): a time budget's average
    # then spans the same share of the run on a slow CPU as on a fast one; 0: off
    ema_horizon: float = 0.0
    dtype: str = "auto"  # "auto", "float32" or "bfloat16" (autocast)
    compile: bool = False  # torch.compile the model
    # CPU training as several processes of one data-parallel job, the cores shared out, which
    # `tinygpt train` starts itself (0: one per physical core, as many as divide the batch)
    processes: int = 1
    seed: int = 1337
    # per-device speed paths (speed.py): "auto" is decided once when a run starts and the
    # decision replaces it in the run's saved config, so a resume or a load never re-decides
    attention: str = "auto"  # training attention: "sdpa" or "explicit" (matmuls + softmax)
    dropout_mask: str = "auto"  # "torch" (nn.Dropout) or "bits16" (16 random bits per element)
    decode_copies: str = "auto"  # batch-1 decoding from per-core weight copies: "on" or "off"

    def validate(self) -> None:
        for name in ("batch_size", "max_iters", "eval_interval", "eval_iters", "grad_accum"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.processes, int) or self.processes < 0:
            raise ConfigError(f"processes must be 0 (one per core) or a positive integer, got {self.processes!r}")
        if self.warmup_iters < 0:
            raise ConfigError(f"warmup_iters must be >= 0, got {self.warmup_iters}")
        if self.batch_size % self.grad_accum != 0:
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})"
            )
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if not self.muon_lr >= 0:
            raise ConfigError(f"muon_lr must be >= 0 (0: learning_rate), got {self.muon_lr}")
        if not 0 <= self.ema < 1:
            raise ConfigError(f"ema must be in [0, 1) (0: off), got {self.ema}")
        if not 0 <= self.ema_horizon <= 0.5:
            raise ConfigError(f"ema_horizon must be in [0, 0.5] (0: off; 0.5: every iteration weighs the same), "
                              f"got {self.ema_horizon}")
        if self.ema > 0 and self.ema_horizon > 0:
            raise ConfigError("ema and ema_horizon are two ways to average the weights: set one of them")
        if self.max_time < 0:
            raise ConfigError(f"max_time must be >= 0 seconds, got {self.max_time}")
        if self.min_lr < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("min_lr, weight_decay and grad_clip must be >= 0")
        _check_choice("schedule", self.schedule, ("cosine", "wsd", "constant"))
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        _check_choice("optimizer", self.optimizer, ("adamw", "muon"))
        if self.optimizer == "muon":
            import torch

            if not hasattr(torch.optim, "Muon"):
                raise ConfigError(
                    f"optimizer muon needs torch.optim.Muon (torch >= 2.9); this is torch {torch.__version__}")
        _check_choice("dtype", self.dtype, ("auto", "float32", "bfloat16"))
        _check_choice("attention", self.attention, ("auto", "sdpa", "explicit"))
        _check_choice("dropout_mask", self.dropout_mask, ("auto", "torch", "bits16"))
        _check_choice("decode_copies", self.decode_copies, ("auto", "on", "off"))


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


@dataclass
class Preset:
    description: str
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)


PRESETS: dict[str, Preset] = {
    # The original notebook, exactly: post-LN blocks, ReLU MLP, no bias on Q/K/V, a biased
    # LM head, untied embeddings, plain AdamW (decay 0.01 on every parameter) at a constant
    # 3e-4, and no gradient clipping.
    "seed": Preset(
        "the original notebook's model and schedule, exactly (21.4 M parameters at 145 symbols)",
        ModelConfig(
            block_size=64, n_layer=12, n_head=8, n_embd=384, dropout=0.2, bias=True,
            qkv_bias=False, lm_head_bias=True, norm="post", activation="relu",
            positions="learned", tie_embeddings=False, scaled_residual_init=False,
        ),
        TrainConfig(
            batch_size=256, learning_rate=3e-4, schedule="constant", warmup_iters=0,
            max_iters=10000, eval_interval=100, eval_iters=100, weight_decay=0.01,
            decay_all_params=True, beta1=0.9, beta2=0.999, grad_clip=0.0,
        ),
    ),
    # The same sizes with the choices modern small GPTs make.
    "gpt": Preset(
        "seed sizes with modern choices: pre-LN, GELU, rotary positions, warmup + cosine",
        ModelConfig(
            block_size=64, n_layer=12, n_head=8, n_embd=384, dropout=0.2, bias=False,
            qkv_bias=False, lm_head_bias=False, norm="pre", activation="gelu",
            positions="rope", tie_embeddings=False,
        ),
        TrainConfig(
            batch_size=256, learning_rate=1e-3, min_lr=1e-4, schedule="cosine",
            warmup_iters=200, max_iters=10000, eval_interval=250, eval_iters=100,
            weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0,
        ),
    ),
    # The demo: the best model 2 CPU cores train in about 10 minutes.
    # ReLU² and warmup-stable-decay: what won at equal time (BENCHMARKS.md, "Quality per CPU-minute").
    "cpu": Preset(
        "the demo: the best model 2 CPU cores train in 9 minutes (a time budget: max_time 540 s)",
        ModelConfig(
            block_size=128, n_layer=4, n_head=4, n_embd=256, dropout=0.05, bias=False,
            qkv_bias=False, lm_head_bias=False, norm="pre", activation="relu2",
            positions="rope", tie_embeddings=False,
        ),
        TrainConfig(
            batch_size=32, learning_rate=2e-3, min_lr=2e-4, schedule="wsd", decay_fraction=0.3,
            warmup_iters=100, max_iters=20000, max_time=540.0, eval_interval=250, eval_iters=20,
            weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0, processes=0, auto_dropout=True,
            ema_horizon=0.25,
        ),
    ),
    # Small enough for the test suite to train in seconds.
    "tiny": Preset(
        "for tests: trains in seconds",
        ModelConfig(block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0),
        TrainConfig(
            batch_size=16, learning_rate=3e-3, min_lr=3e-4, warmup_iters=10, max_iters=100,
            eval_interval=50, eval_iters=4,
        ),
    ),
}


def get_preset(name: str) -> tuple[ModelConfig, TrainConfig]:
    """Fresh copies of a preset's configs (callers may mutate them)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    return dataclasses.replace(preset.model), dataclasses.replace(preset.train)


def _parse_value(raw: str, current: Any, key: str) -> Any:
    if isinstance(current, bool):
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key} expects true or false, got {raw!r}")
    try:
        if isinstance(current, int):
            return int(raw)
        if isinstance(current, float):
            return float(raw)
    except ValueError:
        kind = type(current).__name__
        raise ConfigError(f"{key} expects {'an' if kind == 'int' else 'a'} {kind}, got {raw!r}") from None
    return raw


def known_keys() -> list[str]:
    return [f.name for f in fields(ModelConfig) if f.name != "vocab_size"] + [
        f.name for f in fields(TrainConfig)
    ]


def apply_overrides(model: ModelConfig, train: TrainConfig, pairs: list[str]) -> None:
    """Apply `key=value` strings to whichever config owns the key."""
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        for config in (model, train):
            if key in {f.name for f in fields(config)} and key != "vocab_size":
                setattr(config, key, _parse_value(raw.strip(), getattr(config, key), key))
                break
        else:
            raise ConfigError(f"unknown config key {key!r}; known keys: {', '.join(known_keys())}")
    _hand_set_keys_win(train, {pair.partition("=")[0].strip() for pair in pairs})


def _hand_set_keys_win(train: TrainConfig, keys_given: set[str]) -> None:
    """A dropout given by hand is the dropout: auto_dropout goes off unless it was given too.
    Likewise one of the two weight averages given by hand replaces the other (a preset's)."""
    if "dropout" in keys_given and "auto_dropout" not in keys_given:
        train.auto_dropout = False
    for given, other in (("ema", "ema_horizon"), ("ema_horizon", "ema")):
        if given in keys_given and other not in keys_given and getattr(train, given) > 0:
            setattr(train, other, 0.0)


def _config_from_dict(cls, data: Any, what: str):
    """A config from a JSON object (a checkpoint's or config.json's): every key known, every
    value of its field's type (JSON numbers: an int is a valid float, a bool is no number)."""
    if not isinstance(data, dict):
        raise ConfigError(f"the {what} config is not a JSON object")
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ConfigError(f"unknown {what} config keys: {', '.join(sorted(map(str, unknown)))}")
    for key, value in data.items():
        kind = type(getattr(cls(), key))
        ok = (isinstance(value, bool) if kind is bool
              else isinstance(value, kind) and not isinstance(value, bool) if kind is int
              else isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float
              else isinstance(value, kind))
        if not ok:
            raise ConfigError(f"{what} config {key} must be {'an' if kind is int else 'a'} {kind.__name__}, "
                              f"got {value!r}")
    return cls(**{k: float(v) if type(getattr(cls(), k)) is float else v for k, v in data.items()})


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    if isinstance(data, dict) and "scaled_residual_init" not in data:
        data = {**data, "scaled_residual_init": False}  # saved before the option existed: the plain init
    return _config_from_dict(ModelConfig, data, "model")


def train_config_from_dict(data: dict[str, Any]) -> TrainConfig:
    return _config_from_dict(TrainConfig, data, "training")


# ----------------------------------------------------------------------------- config files (TOML)

CONFIG_FILE_NOTE = "# `tinygpt train --config FILE` reads this; `--set key=value` still overrides it."


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # Python's shortest round-trip form is valid TOML (1e-05, 540.0, inf)
    return json.dumps(value)  # a TOML basic string: the same escapes as JSON's


def config_toml(model: ModelConfig, train: TrainConfig, preset: str | None = None, comment: str = "") -> str:
    """Both configs as a TOML file a person keeps in version control. The vocabulary size is
    left out: it comes from the data."""
    lines = [f"# {line}" for line in comment.splitlines()] + [CONFIG_FILE_NOTE]
    if preset is not None:
        lines += ["# keys this file leaves out come from this preset", f"preset = {_toml_value(preset)}"]
    for table, config in (("model", model), ("train", train)):
        lines += ["", f"[{table}]"]
        lines += [f"{f.name} = {_toml_value(getattr(config, f.name))}" for f in fields(config)
                  if f.name != "vocab_size"]
    return "\n".join(lines) + "\n"


def load_config_file(path: str | Path, preset: str | None = None,
                     model_table: bool = True) -> tuple[ModelConfig, TrainConfig]:
    """The configs a TOML file describes: its [model] and [train] tables over the preset it
    names (or `preset`, else cpu). Every key must be known and of its field's type. With
    model_table=False (fine-tuning: the model is the run's) a [model] table is refused."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: the same parser, from PyPI
        import tomli as tomllib

    path = Path(path)
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read the config file {str(path)!r}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"the config file {str(path)!r} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"the config file {str(path)!r} is not valid TOML: {e}") from None
    unknown = set(data) - {"preset", "model", "train"}
    if unknown:
        raise ConfigError(f"the config file {str(path)!r} has unknown entries {', '.join(sorted(unknown))}; "
                          f"it holds `preset`, [model] and [train]")
    named = data.get("preset")
    if named is not None and not isinstance(named, str):
        raise ConfigError(f"the config file {str(path)!r}: preset must be a string, got {named!r}")
    if named is not None and preset is not None and named != preset:
        raise ConfigError(f"--preset {preset} and the config file's preset {named!r} differ: give one")
    base_model, base_train = get_preset(named or preset or "cpu")
    tables = {}
    for table in ("model", "train"):
        tables[table] = data.get(table, {})
        if not isinstance(tables[table], dict):
            raise ConfigError(f"the config file {str(path)!r}: {table} must be a table ([{table}])")
    if not model_table and "model" in data:
        raise ConfigError(f"the config file {str(path)!r} has a [model] table, but --init-from takes the model "
                          f"from its run: remove the table (training keys stay)")
    if "vocab_size" in tables["model"]:
        raise ConfigError(f"the config file {str(path)!r} sets vocab_size; it comes from the data: remove it")
    try:
        model = _config_from_dict(ModelConfig, {**dataclasses.asdict(base_model), **tables["model"]}, "model")
        train = _config_from_dict(TrainConfig, {**dataclasses.asdict(base_train), **tables["train"]}, "training")
    except ConfigError as e:
        raise ConfigError(f"the config file {str(path)!r}: {e}") from None
    _hand_set_keys_win(train, set(tables["model"]) | set(tables["train"]))
    return model, train

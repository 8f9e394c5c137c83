"""Checkpoints: tensors in safetensors files, everything else in one JSON record.

A checkpoint named `last` (or `best`) in a run directory is:

    last-00000500.model.safetensors   model weights
    last-00000500.state.safetensors   optimizer state and RNG states (only `last`)
    last.json                         configs, tokenizer, iteration, SHA-256 of both files

The JSON record is the commit point. Tensor files get fresh names, are fsynced, and only
then does `last.json` replace its predecessor by an atomic rename (followed by an fsync
of the directory). A crash at any moment leaves the previous record pointing at complete
files. Nothing is ever pickled: loading a checkpoint cannot run code.

A checkpoint is input like any other: its record is validated against one schema
(`Record`), tensor file names must be plain names of this run's own pattern, sizes are
compared (with `stat`) before anything is read, the configured model's size must match its
weights file before anything is allocated, and tensors must have the model's shapes and
dtypes. Each failure is one CheckpointError line.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

import safetensors
import safetensors.torch
import torch
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError

from tinygpt.config import ModelConfig, model_config_from_dict, train_config_from_dict
from tinygpt.errors import CheckpointError, ConfigError, TinyGPTError
from tinygpt.model import GPT
from tinygpt.rundir import TENSOR_FILE
from tinygpt.tokenizer import Tokenizer, tokenizer_from_dict

FORMAT = "tinygpt-checkpoint"
VERSION = 1


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file of a unique name, fsync it, rename it over `path`, fsync the
    directory. If anything fails, the temporary file goes and `path` is as it was."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def model_tensors(model: GPT) -> dict[str, torch.Tensor]:
    state = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    if model.config.tie_embeddings:
        del state["lm_head.weight"]  # the same tensor as token_embedding.weight
    return state


def save_checkpoint(
    run_dir: str | Path,
    name: str,
    record: dict[str, Any],
    tensors: dict[str, dict[str, torch.Tensor]],
) -> None:
    """Save tensor groups (e.g. {"model": ..., "state": ...}) and the JSON record. On a
    failure (a full disk) what this save wrote is removed and the previous checkpoint stays."""
    run_dir = Path(run_dir)
    previous = _files_of(run_dir / f"{name}.json")
    written: list[Path] = []
    files, target = {}, run_dir / f"{name}.json"
    try:
        stem = _reserve_stem(run_dir, name, int(record["iteration"]))
        written = [run_dir / f"{stem}.{kind}.safetensors" for kind in tensors]
        for (kind, group), target in zip(tensors.items(), written, strict=True):
            data = safetensors.torch.save(group, metadata={"format": FORMAT, "kind": kind})
            atomic_write_bytes(target, data)
            files[kind] = {"file": target.name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        record = {"format": FORMAT, "version": VERSION, "name": name, **record, "files": files}
        target = run_dir / f"{name}.json"
        atomic_write_bytes(target, json.dumps(record, ensure_ascii=False, indent=1).encode())
    except OSError as e:
        if _files_of(run_dir / f"{name}.json") == {f["file"] for f in files.values()} and len(files) == len(tensors):
            # the record was renamed into place: the save is committed, only syncing its directory failed
            raise CheckpointError(f"saved checkpoint {name!r}, but syncing {str(run_dir)!r} failed: "
                                  f"{e.strerror or e}") from None
        for path in written:
            path.unlink(missing_ok=True)
        raise CheckpointError(f"could not write {str(target)!r}: {e.strerror or e}; the checkpoint {name!r} "
                              f"of the last save is intact and nothing of this save was kept") from None
    # only now are the files of the record this one replaced unreferenced; delete those
    # (names tinyGPT wrote, of this checkpoint only), never anything else
    for old in previous - {f["file"] for f in files.values()}:
        if TENSOR_FILE.fullmatch(old) and old.startswith(f"{name}-"):
            (run_dir / old).unlink(missing_ok=True)


def _files_of(record_path: Path) -> set[str]:
    try:
        files = json.loads(record_path.read_text(encoding="utf-8")).get("files", {})
        return {entry["file"] for entry in files.values()}
    except (OSError, ValueError, AttributeError, TypeError, KeyError):
        return set()


def _reserve_stem(run_dir: Path, name: str, iteration: int) -> str:
    """`last-00000500`, or `last-00000500-1`, ... when that iteration was saved before (an
    interrupted run saves again where it stopped): the first stem whose model file does not
    exist, claimed by creating it (O_EXCL), so no file a record points to is ever
    overwritten, not even by another process saving at the same moment."""
    counter = 0
    while True:
        stem = f"{name}-{iteration:08d}" + (f"-{counter}" if counter else "")
        try:
            os.close(os.open(run_dir / f"{stem}.model.safetensors", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            if not (run_dir / f"{stem}.state.safetensors").exists():
                return stem
            (run_dir / f"{stem}.model.safetensors").unlink()
        except FileExistsError:
            pass
        counter += 1


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: str = Field(pattern=f"^{TENSOR_FILE.pattern}$")  # a plain name of this run's own pattern: no path
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(gt=0, strict=True)


class Record(BaseModel):
    """The schema of a checkpoint's JSON record (`last` has the training state's fields too)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=(), populate_by_name=True)

    format: Literal["tinygpt-checkpoint"]
    version: Literal[1]
    name: Literal["last", "best"]
    iteration: int = Field(ge=0, strict=True)
    model_settings: dict[str, Any] = Field(alias="model_config")
    train_config: dict[str, Any] | None = None
    tokenizer: dict[str, Any]
    best_val_loss: StrictFloat | None = None
    val_loss: StrictFloat | None = None
    metrics_bytes: int = Field(0, ge=0, strict=True)
    precision: Literal["float32", "bfloat16"] = "float32"
    device_type: StrictStr = "cpu"
    world_size: int = Field(1, ge=1, strict=True)
    elapsed: float = Field(0.0, ge=0, strict=True)
    files: dict[Literal["model", "state"], FileEntry]
    optimizer_groups: list[Annotated[list[dict[str, Any]], Field(min_length=1)]] | None = None
    # random.getstate() and numpy's legacy state, as lists: (version, 625 words, gauss) and
    # ("MT19937", 624 words, position, has_gauss, cached_gaussian)
    python_rng: tuple[StrictInt, Annotated[list[StrictInt], Field(min_length=625, max_length=625)],
                      StrictFloat | None] | None = None
    numpy_rng: tuple[Literal["MT19937"], Annotated[list[StrictInt], Field(min_length=624, max_length=624)],
                     StrictInt, StrictInt, StrictFloat] | None = None


def read_record(run_dir: str | Path, name: str) -> dict[str, Any]:
    """A checkpoint's record, validated: one CheckpointError line for anything malformed."""
    path = Path(run_dir) / f"{name}.json"
    if not path.is_file():
        raise CheckpointError(f"no checkpoint {name!r} in {str(run_dir)!r} (missing {path.name})")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        raise CheckpointError(f"{str(path)!r} is corrupt: not valid JSON") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a tinygpt checkpoint")
    if record.get("version") != VERSION:
        raise CheckpointError(f"{str(path)!r} has checkpoint version {record.get('version')}; "
                              f"this tinygpt reads {VERSION}")
    try:
        Record.model_validate(record)
        model_config_from_dict(record["model_config"])
        if record.get("train_config") is not None:
            train_config_from_dict(record["train_config"])
    except ValidationError as e:
        error = e.errors()[0]
        where = ".".join(str(part) for part in error["loc"]).replace("model_settings", "model_config")
        missing = " (the record is incomplete)" if error["type"] == "missing" else ""
        raise CheckpointError(f"{str(path)!r} is malformed: {where}: {error['msg']}{missing}") from None
    except ConfigError as e:
        raise CheckpointError(f"{str(path)!r} is malformed: {e}") from None
    return record


def load_tensors(run_dir: str | Path, record: dict[str, Any], kind: str) -> dict[str, torch.Tensor]:
    """Read one tensor file of a checkpoint: its size checked before it is read, its SHA-256
    as it is read."""
    entry = (record.get("files") or {}).get(kind)
    if not isinstance(entry, dict) or not TENSOR_FILE.fullmatch(str(entry.get("file"))):
        raise CheckpointError(f"checkpoint {record.get('name')!r} names no valid {kind} tensor file")
    path = Path(run_dir) / entry["file"]
    try:
        status = path.lstat()
    except OSError:
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing") from None
    if not stat.S_ISREG(status.st_mode):
        raise CheckpointError(f"checkpoint file {str(path)!r} is not a regular file")
    size = status.st_size
    if size != entry.get("bytes"):
        raise CheckpointError(f"checkpoint file {str(path)!r} is truncated or altered (checksum mismatch: "
                              f"{size:,} bytes, its record says {entry.get('bytes')})")
    digest, data = hashlib.sha256(), bytearray()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
            data += chunk
    if digest.hexdigest() != entry.get("sha256"):
        raise CheckpointError(f"checkpoint file {str(path)!r} is truncated or altered (checksum mismatch)")
    try:
        return safetensors.torch.load(bytes(data))
    except Exception as e:  # safetensors raises its own error types for malformed headers
        raise CheckpointError(f"checkpoint file {str(path)!r} is not a valid safetensors file: {e}") from None


def best_or_last(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"no such run directory: {run_dir}")
    for name in ("best", "last"):
        if (run_dir / f"{name}.json").is_file():
            return name
    raise CheckpointError(f"{run_dir} holds no checkpoint (no best.json or last.json)")


def build_model(record: dict[str, Any], allocate: bool = True) -> tuple[GPT, Tokenizer, ModelConfig]:
    """The model a record describes. Its size is checked against the weights file first
    (shapes only, on the meta device), so an absurd config cannot allocate memory;
    allocate=False returns the meta-device model (enough to count parameters)."""
    try:
        config = model_config_from_dict(record["model_config"])
        config.validate()
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint record is incomplete: {e}") from None
    except TinyGPTError as e:
        raise CheckpointError(f"checkpoint record has an impossible model config: {e}") from None
    try:
        tokenizer = tokenizer_from_dict(record.get("tokenizer"))
    except TinyGPTError as e:
        raise CheckpointError(f"checkpoint record has an unusable tokenizer: {e}") from None
    if config.vocab_size != tokenizer.vocab_size:
        raise CheckpointError("checkpoint's vocabulary size and tokenizer disagree")
    weights_bytes = (record.get("files") or {}).get("model", {}).get("bytes", 0)
    estimate = 4 * estimated_parameters(config)  # float32 weights
    if not estimate <= weights_bytes * 1.5 + (1 << 20) or weights_bytes > 2 * estimate + (1 << 20):
        raise CheckpointError(f"checkpoint's model config describes about {estimate:,} bytes of weights, "
                              f"its weights file has {weights_bytes:,}: the record does not fit its weights")
    with torch.device("meta"):
        shapes = GPT(config)
    if not allocate:
        return shapes, tokenizer, config
    with torch.random.fork_rng(devices=[]):  # the initial weights are overwritten: leave the caller's RNG
        model = GPT(config)
    return model, tokenizer, config


def estimated_parameters(config: ModelConfig) -> int:
    """The parameter count from the config alone, to within biases and norms: embeddings,
    4 C^2 of attention and 8 C^2 of MLP per layer, the head (plus the rotary tables)."""
    C, V = config.n_embd, config.vocab_size
    # learned: an embedding per position; rotary: cos and sin tables (not weights, but memory)
    positions = config.block_size * (C if config.positions == "learned" else C // config.n_head)
    head = 0 if config.tie_embeddings else V * C
    return V * C + positions + config.n_layer * 12 * C * C + head


def load_weights(model: GPT, tensors: dict[str, torch.Tensor]) -> None:
    """Load weights of exactly the model's names, shapes and dtypes (nothing is cast)."""
    if model.config.tie_embeddings and "token_embedding.weight" in tensors:
        tensors = {**tensors, "lm_head.weight": tensors["token_embedding.weight"]}
    expected = model.state_dict()
    for name, tensor in tensors.items():
        if name in expected and tensor.dtype != expected[name].dtype:
            raise CheckpointError(f"weights: {name} is {tensor.dtype}, the model's is {expected[name].dtype}; "
                                  f"this checkpoint was not written by tinygpt")
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"weights do not fit the model config: {' '.join(first[:2])}") from None


def load_model(
    run_dir: str | Path, name: str | None = None, device: str | torch.device = "cpu"
) -> tuple[GPT, Tokenizer]:
    """The model (in eval mode) and tokenizer of a run's `best` (else `last`) checkpoint,
    on the decode path the run recorded (speed.py; nothing is timed)."""
    name = name or best_or_last(run_dir)
    record = read_record(run_dir, name)
    model, tokenizer, _ = build_model(record)
    load_weights(model, load_tensors(run_dir, record, "model"))
    model = model.to(device).eval()
    recorded = (record.get("train_config") or {}).get("decode_copies", "auto")
    if recorded in ("on", "off") and record.get("device_type") == torch.device(device).type:
        model.decode_copies = recorded == "on"  # else speed.decoding's rule for this device
    return model, tokenizer

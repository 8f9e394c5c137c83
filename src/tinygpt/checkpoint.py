"""Checkpoints: tensors in safetensors files, everything else in one JSON record.

A checkpoint named `last` (or `best`) in a run directory is:

    last-00000500.model.safetensors   model weights
    last-00000500.state.safetensors   optimizer state and RNG states (only `last`)
    last.json                         configs, tokenizer, iteration, SHA-256 of both files

The JSON record is the commit point. Tensor files get fresh names, are fsynced, and only
then does `last.json` replace its predecessor by an atomic rename (followed by an fsync
of the directory). A crash at any moment leaves the previous record pointing at complete
files. Nothing is ever pickled: loading a checkpoint cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from tinygpt.config import ModelConfig, model_config_from_dict
from tinygpt.errors import CheckpointError
from tinygpt.model import GPT
from tinygpt.tokenizer import CharTokenizer

FORMAT = "tinygpt-checkpoint"
VERSION = 1


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file, fsync it, rename it over `path`, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_directory(path.parent)


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
    """Save tensor groups (e.g. {"model": ..., "state": ...}) and the JSON record."""
    run_dir = Path(run_dir)
    stem = _fresh_stem(run_dir, name, int(record["iteration"]))
    files = {}
    for kind, group in tensors.items():
        filename = f"{stem}.{kind}.safetensors"
        data = safetensors.torch.save(group, metadata={"format": FORMAT, "kind": kind})
        atomic_write_bytes(run_dir / filename, data)
        files[kind] = {"file": filename, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    record = {"format": FORMAT, "version": VERSION, "name": name, **record, "files": files}
    atomic_write_bytes(run_dir / f"{name}.json", json.dumps(record, ensure_ascii=False, indent=1).encode())
    # only now are older tensor files of this checkpoint unreferenced; temporary files
    # left by a save that was killed go too
    keep = {f["file"] for f in files.values()}
    for old in [*run_dir.glob(f"{name}-*.safetensors"), *run_dir.glob(f".{name}-*.safetensors.tmp")]:
        if old.name not in keep:
            old.unlink(missing_ok=True)


def _fresh_stem(run_dir: Path, name: str, iteration: int) -> str:
    """`last-00000500`, or `last-00000500-1`, ... when that iteration was saved before (an
    interrupted run saves again where it stopped): a file the current record points to is
    never overwritten."""
    stem, counter = f"{name}-{iteration:08d}", 0
    while any(run_dir.glob(f"{stem}.*.safetensors")):
        counter += 1
        stem = f"{name}-{iteration:08d}-{counter}"
    return stem


def read_record(run_dir: str | Path, name: str) -> dict[str, Any]:
    path = Path(run_dir) / f"{name}.json"
    if not path.is_file():
        raise CheckpointError(f"no checkpoint {name!r} in {run_dir} (missing {path.name})")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        raise CheckpointError(f"{path} is corrupt: not valid JSON") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a tinygpt checkpoint")
    if record.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {record.get('version')}; this tinygpt reads {VERSION}")
    return record


def load_tensors(run_dir: str | Path, record: dict[str, Any], kind: str) -> dict[str, torch.Tensor]:
    """Read one tensor file of a checkpoint after checking its size and SHA-256."""
    try:
        entry = record["files"][kind]
        path = Path(run_dir) / entry["file"]
    except (KeyError, TypeError):
        raise CheckpointError(f"checkpoint {record.get('name')!r} has no {kind} tensors") from None
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    data = path.read_bytes()
    if len(data) != entry.get("bytes") or hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise CheckpointError(f"checkpoint file {path} is truncated or altered (checksum mismatch)")
    try:
        return safetensors.torch.load(data)
    except Exception as e:  # safetensors raises its own error types for malformed headers
        raise CheckpointError(f"checkpoint file {path} is not a valid safetensors file: {e}") from None


def best_or_last(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"no such run directory: {run_dir}")
    for name in ("best", "last"):
        if (run_dir / f"{name}.json").is_file():
            return name
    raise CheckpointError(f"{run_dir} holds no checkpoint (no best.json or last.json)")


def build_model(record: dict[str, Any]) -> tuple[GPT, CharTokenizer, ModelConfig]:
    try:
        config = model_config_from_dict(record["model_config"])
        tokenizer = CharTokenizer.from_dict(record["tokenizer"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint record is incomplete: {e}") from None
    if config.vocab_size != tokenizer.vocab_size:
        raise CheckpointError("checkpoint's vocabulary size and tokenizer disagree")
    return GPT(config), tokenizer, config


def load_weights(model: GPT, tensors: dict[str, torch.Tensor]) -> None:
    if model.config.tie_embeddings and "token_embedding.weight" in tensors:
        tensors = {**tensors, "lm_head.weight": tensors["token_embedding.weight"]}
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"weights do not fit the model config: {' '.join(first[:2])}") from None


def load_model(
    run_dir: str | Path, name: str | None = None, device: str | torch.device = "cpu"
) -> tuple[GPT, CharTokenizer]:
    """The model (in eval mode) and tokenizer of a run's `best` (else `last`) checkpoint,
    on the decode path the run recorded (speed.py; nothing is timed)."""
    name = name or best_or_last(run_dir)
    record = read_record(run_dir, name)
    model, tokenizer, _ = build_model(record)
    load_weights(model, load_tensors(run_dir, record, "model"))
    model = model.to(device).eval()
    recorded = (record.get("train_config") or {}).get("decode_copies", "auto")
    if recorded in ("on", "off"):
        model.decode_copies = recorded == "on"
    return model, tokenizer

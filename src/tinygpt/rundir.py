"""A run directory: which folders training may write into, what it may delete, and who holds it.

Rules, so that nothing a user made is lost:

* `train` writes only into a new or empty folder, or into a folder that holds a tinyGPT run
  (its `config.json`, `last.json` or `best.json` are tinyGPT's). Any other non-empty folder is
  refused, whatever the flags.
* A folder that holds a run is continued with `--resume`; without it, training refuses, unless
  `--overwrite` says to start over, which deletes the run's own files (the names below) and
  nothing else.
* The only files tinyGPT deletes in a run are the ones it writes: checkpoint tensor files named
  exactly `NAME-NNNNNNNN[-K].{model,state}.safetensors`, its JSON records, metrics, plot, configs,
  and its own temporary files.
* One process trains a run at a time: `lock` takes an exclusive `flock` on `.tinygpt.lock` in the
  folder for the whole run (released by the kernel if the process dies) and writes its PID there;
  a second process stops at once with one line naming the holder.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from pathlib import Path

from tinygpt.errors import ConfigError

LOCK_NAME = ".tinygpt.lock"
CHECKPOINT_NAMES = ("last", "best")
RUN_FILES = ("config.json", "config.toml", "tokenizer.json", "metrics.jsonl", "loss.png", "last.json", "best.json")
TENSOR_FILE = re.compile(r"(last|best)-([0-9]{8})(-[0-9]+)?\.(model|state)\.safetensors")
# temporary files of tinyGPT's atomic writes: ".<final name>.<random>.tmp" (before the
# random part existed: ".<final name>.tmp")
TEMPORARY_FILE = re.compile(r"\.(?:(?:last|best)-[0-9]{8}(?:-[0-9]+)?\.(?:model|state)\.safetensors"
                            r"|last\.json|best\.json|loss\.png|metrics\.jsonl|config\.json|config\.toml)(?:\.[A-Za-z0-9_]+)?\.tmp")
RUN_FORMAT = "tinygpt-run"  # config.json's "format": what marks a folder as a run


def is_tinygpt_file(name: str) -> bool:
    return name in RUN_FILES or name == LOCK_NAME or bool(TENSOR_FILE.fullmatch(name)
                                                          or TEMPORARY_FILE.fullmatch(name))


def holds_run(run_dir: Path) -> bool:
    """Whether the folder holds a tinyGPT run: a checkpoint record, or a config.json that is a
    run's (marked as one, or, for runs from before the mark, whose two configs are exactly
    tinyGPT's)."""
    from tinygpt.config import model_config_from_dict, train_config_from_dict

    for name in ("last.json", "best.json", "config.json"):
        try:
            data = json.loads((run_dir / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        if data.get("format") in ("tinygpt-checkpoint", RUN_FORMAT):
            return True
        if name == "config.json" and set(data) == {"model", "train"}:
            try:
                model_config_from_dict(data["model"])
                train_config_from_dict(data["train"])
                return True
            except ConfigError:
                continue
    return False


def check_target(run_dir: Path, resume: bool, overwrite: bool) -> bool:
    """Refuse to train into a folder that is not new, empty or a run; refuse to restart a run
    without --overwrite. True when it holds a run that is to be started over."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {str(run_dir)!r} is a file, not a directory")
    entries = [p.name for p in run_dir.iterdir()] if run_dir.is_dir() else []
    if not entries or entries == [LOCK_NAME]:
        return False
    if resume and (run_dir / "last.json").exists():
        return False  # continuing: reading the record says whether it is a run (and what is wrong with it)
    if not holds_run(run_dir):
        raise ConfigError(f"--out {str(run_dir)!r} is not empty and holds no tinyGPT run; "
                          f"train into a new or empty directory (nothing was changed)")
    if resume:
        return False
    if not overwrite:
        raise ConfigError(f"--out {str(run_dir)!r} holds a run; continue it with --resume, or start over "
                          f"with --overwrite (deletes its checkpoints and metrics)")
    return True


def remove_run_files(run_dir: Path) -> None:
    """--overwrite: the old run's own files go (tinyGPT's names only); anything else stays."""
    for path in run_dir.iterdir():
        if is_tinygpt_file(path.name) and path.name != LOCK_NAME:
            path.unlink(missing_ok=True)


def remove_leftovers(run_dir: Path) -> None:
    """What a killed save left behind: its temporary files, and tensor files of tinyGPT's own
    names that its record does not point to and that are not older than that record (a save
    in progress writes newer files; older ones may be referenced by a copy of a record).
    Nothing is swept when a record is present but unreadable: it may still name files.
    Only while this process holds the run's lock."""
    referenced, newest = set(), {}
    for name in CHECKPOINT_NAMES:
        path = run_dir / f"{name}.json"
        if not path.exists():
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            referenced |= {entry["file"] for entry in record["files"].values()}
            newest[name] = int(record["iteration"])
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            return
    for path in run_dir.iterdir():
        tensor = TENSOR_FILE.fullmatch(path.name)
        if TEMPORARY_FILE.fullmatch(path.name):
            path.unlink(missing_ok=True)
        elif (tensor and path.name not in referenced and tensor.group(1) in newest
              and int(tensor.group(2)) >= newest[tensor.group(1)]):
            path.unlink(missing_ok=True)


def claim(run_dir: Path, resume: bool, overwrite: bool) -> tuple[RunLock, bool]:
    """Check the folder may be trained into, create it, lock it, tidy what a killed run left.
    Also says whether the run there is to be started over: the caller deletes its files
    (remove_run_files) once everything else has been checked."""
    try:
        start_over = check_target(run_dir, resume, overwrite)
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(run_dir)
        lock.acquire()
    except OSError as e:
        raise ConfigError(f"cannot use {str(run_dir)!r}: {e.strerror or e}") from None
    try:
        if not start_over:
            remove_leftovers(run_dir)
    except BaseException:
        lock.release()
        raise
    return lock, start_over


class RunLock:
    """An exclusive lock on a run directory, held from start to finish of a training run."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise ConfigError(f"{str(self.path.parent)!r} is being trained by another process (PID {holder}); "
                                  f"wait for it to finish or stop it, then --resume") from None
            try:  # the holder before us removes the file as it leaves: lock the file that is there now
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still held: nobody can be inside it
            os.close(self.fd)
            self.fd = None

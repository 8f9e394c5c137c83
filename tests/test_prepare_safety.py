"""What `prepare` may write into, what it never reads, and what a failed or interrupted
`prepare` leaves behind (nothing), library and command alike."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import tinygpt.data
import tinygpt.utf8
from helpers import read_meta, read_split, write_text
from tinygpt.cli import main
from tinygpt.data import DataError, prepare
from tinygpt.tokenizer import MAX_CODE_POINT


def contents(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, hidden ones included, by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def corpus(root: Path, text: str = "to be or not to be\n" * 20) -> Path:
    write_text(root / "a.txt", text)
    write_text(root / "sub" / "b.txt", "that is the question\n" * 10)
    return root


# ----------------------------------------------------------------------------- where prepare writes


def test_a_folder_of_other_files_is_refused_and_left_as_it_was(tmp_path):
    out = tmp_path / "mine"
    write_text(out / "notes.txt", "my notes\n")
    write_text(out / "meta.json", '{"mine": true}')
    (out / "train.bin").write_bytes(b"my own train.bin")
    before = contents(out)
    with pytest.raises(DataError) as info:
        prepare([str(corpus(tmp_path / "corpus"))], out)
    message = str(info.value)
    assert f"--out {out} is not empty" in message and "--overwrite" in message
    assert contents(out) == before


def test_overwrite_writes_into_a_foreign_folder_replacing_only_its_three_files(tmp_path):
    out = tmp_path / "mine"
    write_text(out / "notes.txt", "my notes\n")
    write_text(out / "meta.json", '{"mine": true}')
    prepare([str(corpus(tmp_path / "corpus"))], out, overwrite=True)
    assert read_meta(out)["format"] == "tinygpt-data"
    assert (out / "notes.txt").read_text() == "my notes\n"
    assert sorted(contents(out)) == ["meta.json", "notes.txt", "train.bin", "val.bin"]


def test_new_empty_and_earlier_data_folders_are_written(tmp_path):
    source = corpus(tmp_path / "corpus")
    prepare([str(source)], tmp_path / "new" / "deeper")  # made, parents and all
    assert read_meta(tmp_path / "new" / "deeper")["train_tokens"] > 0
    (tmp_path / "empty").mkdir()
    prepare([str(source)], tmp_path / "empty")
    assert read_meta(tmp_path / "empty")["train_tokens"] > 0

    # an earlier data directory: its own three files are replaced, nothing else is touched
    data = tmp_path / "data"
    prepare([str(source)], data)
    write_text(data / "README", "what this data is\n")
    other = write_text(tmp_path / "other.txt", "xyz\n" * 30)
    prepare([str(other)], data, val_fraction=0.0)
    assert read_split(data, "train") == "xyz\n" * 30
    assert (data / "README").read_text() == "what this data is\n"
    assert sorted(contents(data)) == ["README", "meta.json", "train.bin", "val.bin"]


def test_another_prepares_temporaries_do_not_make_a_folder_foreign_and_are_left_alone(tmp_path):
    """A running prepare's temporaries (its PID is alive; here, ours) are not touched; those of
    killed prepares are reclaimed (test_temporaries_of_killed_prepares_are_reclaimed...)."""
    out = tmp_path / "out"
    stale = {f".train.bin.{os.getpid()}_0a1b2c3d.tmp": b"a live prepare's",
             f".val.bin.{os.getpid()}_0a1b2c3e.tmp": b"another of its files"}
    for name, data in stale.items():
        write_text(out / name, "")
        (out / name).write_bytes(data)
    prepare([str(corpus(tmp_path / "corpus"))], out)
    found = contents(out)
    assert {name: found[name] for name in stale} == stale
    assert {"meta.json", "train.bin", "val.bin"} <= set(found)


def test_out_that_is_a_file_is_refused(tmp_path):
    write_text(tmp_path / "out", "a file\n")
    with pytest.raises(DataError, match="exists and is not a folder"):
        prepare([str(corpus(tmp_path / "corpus"))], tmp_path / "out")
    assert (tmp_path / "out").read_text() == "a file\n"


def run_in_process(capsys, *args) -> tuple[int, str, str]:
    """`tinygpt ARGS...` through `tinygpt.cli.main` in this process (torch is loaded already)."""
    status = main([str(a) for a in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_the_command_refuses_a_foreign_folder_in_one_line(tmp_path, capsys):
    write_text(tmp_path / "out" / "notes.txt", "mine\n")
    status, _, stderr = run_in_process(capsys, "prepare", corpus(tmp_path / "corpus"), "--out", tmp_path / "out",
                                       "--no-progress")
    assert status == 1 and len(stderr.splitlines()) == 1
    assert stderr.startswith("tinygpt prepare: error: --out ") and "--overwrite" in stderr
    assert contents(tmp_path / "out") == {"notes.txt": b"mine\n"}


# ----------------------------------------------------------------------------- what prepare reads


def test_preparing_a_folder_into_itself_never_reads_its_own_output(tmp_path):
    folder = corpus(tmp_path / "folder")
    texts = [(folder / "a.txt").read_text(), (folder / "sub" / "b.txt").read_text()]
    prepare([str(folder)], folder, glob="*", val_fraction=0.0, overwrite=True)  # a folder of text: foreign
    first = contents(folder)
    prepare([str(folder)], folder, glob="*", val_fraction=0.0)  # now its own data directory
    meta = read_meta(folder)
    assert [f["path"] for f in meta["files"]] == [str(folder / "a.txt"), str(folder / "sub" / "b.txt")]
    assert read_split(folder, "train") == "".join(texts)
    assert contents(folder) == first  # the same files, byte for byte


def test_data_directories_inside_an_input_are_skipped(tmp_path):
    source = corpus(tmp_path / "corpus")
    prepare([str(source)], source / "data")  # the output inside the input
    old = source / "old" / "prepared"
    prepare([str(write_text(tmp_path / "elsewhere.txt", "QQQ\n" * 9))], old)
    write_text(old / "notes.txt", "QQQ notes kept with the data\n")
    # stray temporaries of a prepare into the output folder, killed before it could clean up
    (source / "data" / ".train.bin.77_deadbeef.tmp").write_bytes(b"\x01\x02")

    for out in (source / "data", tmp_path / "fresh"):
        prepare([str(source)], out, glob="*", val_fraction=0.0)
        meta = read_meta(out)
        assert [Path(f["path"]).name for f in meta["files"]] == ["a.txt", "b.txt"]
        assert "Q" not in meta["tokenizer"]["chars"]


def test_the_outputs_named_as_inputs_are_refused(tmp_path):
    data = tmp_path / "data"
    prepare([str(corpus(tmp_path / "corpus"))], data)
    with pytest.raises(DataError, match="is a file prepare writes into --out"):
        prepare([str(data / "train.bin"), str(tmp_path / "corpus" / "a.txt")], data)

    # a folder that holds nothing but prepare's own files has nothing to read
    with pytest.raises(DataError, match=r"no files matching '\*' under .* besides tinyGPT's own data files \(3\)"):
        prepare([str(data)], tmp_path / "again", glob="*")


# ----------------------------------------------------------------------------- failures leave nothing


def fail_on_second_chunk(monkeypatch, error: BaseException, folder: Path) -> list[str]:
    """Make pass 2 raise `error` on its second chunk. Returns the names that were in `folder`
    at that moment (filled in when it happens)."""
    encode = tinygpt.utf8.encode
    calls, seen = [], []

    def failing(chunk, table, ascii_ids):
        calls.append(1)
        if len(calls) == 2:
            seen.extend(sorted(p.name for p in folder.iterdir()))
            raise error
        return encode(chunk, table, ascii_ids)

    monkeypatch.setattr(tinygpt.utf8, "encode", failing)
    return seen


@pytest.mark.parametrize("error", [KeyboardInterrupt(), OSError(28, "No space left on device")])
def test_an_interrupted_prepare_leaves_an_earlier_data_directory_as_it_was(tmp_path, monkeypatch, error):
    data = tmp_path / "data"
    prepare([str(corpus(tmp_path / "old"))], data)
    before = contents(data)
    seen = fail_on_second_chunk(monkeypatch, error, data)
    with pytest.raises(type(error)):
        prepare([str(corpus(tmp_path / "new", "different text\n" * 9))], data)
    # while it ran, its temporaries had names of their own: the process id and a random part
    temporaries = [name for name in seen if name not in before]
    assert len(temporaries) == 2, seen
    assert all(re.fullmatch(rf"\.(train|val)\.bin\.{os.getpid()}_[0-9a-f]{{8}}\.tmp", name) for name in temporaries)
    assert contents(data) == before  # no temporaries left, the old data intact


def test_renames_wait_for_the_folder_lock_another_prepare_holds(tmp_path):
    """The three renames happen under an exclusive flock on the folder, so two prepares into one
    folder leave one's complete set of files, never train.bin of one and meta.json of the other."""
    if not Path("/proc/locks").exists():
        pytest.skip("needs /proc/locks to see the other prepare wait")
    data = tmp_path / "data"
    prepare([str(corpus(tmp_path / "old"))], data)
    before = contents(data)
    waiter = re.compile(rf"->\s+FLOCK\s+\S+\s+WRITE\s+\d+\s+[0-9a-f]+:[0-9a-f]+:{os.stat(data).st_ino}\s")
    fd = os.open(data, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as another prepare does while it renames
    try:
        worker = threading.Thread(target=prepare, args=([str(write_text(tmp_path / "new.txt", "new\n" * 9))], data))
        worker.start()
        deadline = time.monotonic() + 60
        while not waiter.search(Path("/proc/locks").read_text()):  # the worker waits for the lock
            assert worker.is_alive() and time.monotonic() < deadline
            time.sleep(0.005)
        assert {name: before[name] for name in ("meta.json", "train.bin", "val.bin")} == {
            name: (data / name).read_bytes() for name in ("meta.json", "train.bin", "val.bin")}
    finally:
        os.close(fd)  # releases the lock
    worker.join(60)
    assert read_split(data, "train") + read_split(data, "val") == "new\n" * 9
    assert sorted(contents(data)) == ["meta.json", "train.bin", "val.bin"]


def test_a_failed_prepare_into_a_new_folder_leaves_no_folder(tmp_path, monkeypatch):
    seen = fail_on_second_chunk(monkeypatch, KeyboardInterrupt(), tmp_path)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(corpus(tmp_path / "corpus"))], tmp_path / "new")
    assert "new" in seen  # it was made, and written into
    assert not (tmp_path / "new").exists()


def test_a_file_that_changes_between_the_passes_stops_prepare(tmp_path, monkeypatch):
    source = corpus(tmp_path / "corpus")
    vocabulary = tinygpt.data._vocabulary

    def then_grow_a_file(counts):
        with open(source / "a.txt", "a", encoding="utf-8") as f:
            f.write("more text after pass 1\n")
        return vocabulary(counts)

    monkeypatch.setattr(tinygpt.data, "_vocabulary", then_grow_a_file)
    with pytest.raises(DataError, match=r"a\.txt changed while prepare read it; prepare again"):
        prepare([str(source)], tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_ctrl_c_while_torch_imports_is_one_line_and_exit_130(tmp_path):
    """SIGINT once the child has begun loading torch's libraries (prepare's first import):
    `tinygpt prepare: interrupted`, status 130, no traceback, no data folder."""
    maps = Path(f"/proc/{os.getpid()}/maps")
    if not maps.exists():
        pytest.skip("needs /proc to see when torch starts loading")
    source = corpus(tmp_path / "corpus")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    for _ in range(5):  # a fast machine may finish this small prepare before the signal lands: try again
        child = subprocess.Popen([sys.executable, "-m", "tinygpt", "prepare", str(source), "--out",
                                  str(tmp_path / "data"), "--no-progress", "--overwrite"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                 # a job started in the background inherits SIGINT ignored: undo that
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 60
            while "libtorch" not in Path(f"/proc/{child.pid}/maps").read_text():
                assert child.poll() is None and time.monotonic() < deadline, child.communicate()
                time.sleep(0.002)
            child.send_signal(signal.SIGINT)
            stdout, stderr = child.communicate(timeout=60)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        if child.returncode != 0:
            break
        shutil.rmtree(tmp_path / "data")
    assert child.returncode == 130, (stdout, stderr)
    assert stderr == "tinygpt prepare: interrupted\n" and stdout == ""
    assert not (tmp_path / "data").exists()


# ----------------------------------------------------------------------------- paths in messages


def test_a_newline_in_a_file_name_stays_inside_one_line(tmp_path, capsys):
    bad = tmp_path / "corpus" / "two\nlines.txt"
    write_text(bad, "")
    bad.write_bytes(b"ok \xff")
    with pytest.raises(DataError) as info:
        prepare([str(bad.parent)], tmp_path / "data")
    assert "\n" not in str(info.value) and repr(str(bad)) in str(info.value)
    with pytest.raises(DataError) as info:
        prepare([str(tmp_path / "no\nsuch")], tmp_path / "data")
    assert "\n" not in str(info.value) and repr(str(tmp_path / "no\nsuch")) in str(info.value)
    status, _, stderr = run_in_process(capsys, "prepare", bad, "--out", tmp_path / "data", "--no-progress")
    assert status == 1 and len(stderr.splitlines()) == 1 and "invalid UTF-8 at byte offset 3" in stderr

    write_text(tmp_path / "corpus" / "\tgood.txt", "fine\n")  # a tab, and a name that starts with it
    prepare([str(bad.parent)], tmp_path / "data", encoding_errors="skip")
    skipped = capsys.readouterr().err
    assert skipped == f"skipping {repr(str(bad))}: invalid UTF-8 at byte offset 3 (invalid start byte)\n"
    assert read_meta(tmp_path / "data")["skipped_files"] == [str(bad)]  # JSON keeps the name as it is
    with pytest.raises(DataError, match=r"no such file or directory: '.*\\t x'$"):
        prepare([str(tmp_path / "\t x")], tmp_path / "data")


# ----------------------------------------------------------------------------- cost per file


def test_per_file_work_never_spans_the_code_point_table(tmp_path, monkeypatch):
    """Counting a file allocates nothing as long as the 1.1 M-entry code-point table: only the
    whole corpus's tables are that long, however many files there are."""
    large = []

    def recording(make):
        def made(*args, **kwargs):
            result = make(*args, **kwargs)
            if result.size >= MAX_CODE_POINT // 16:
                large.append(result.size)
            return result
        return made

    for name in ("zeros", "full", "empty", "ones", "bincount"):
        monkeypatch.setattr(np, name, recording(getattr(np, name)))

    per_run = []
    for n_files in (3, 30):
        folder = tmp_path / f"files{n_files}"
        for i in range(n_files):
            write_text(folder / f"{i:02d}.txt", f"file {i} 😀 \U0010fffd\n")  # code points far apart
        large.clear()
        prepare([str(folder)], tmp_path / f"data{n_files}")
        per_run.append(len(large))
        assert read_meta(tmp_path / f"data{n_files}")["symbol_counts"]["😀"] == n_files
    assert per_run[0] == per_run[1] <= 3  # the corpus counts, the tokenizer's table and nothing per file


# ----------------------------------------------------------------------------- the command's options


def test_the_command_passes_keep_line_endings_and_overwrite(tmp_path, capsys):
    write_text(tmp_path / "corpus" / "dos.txt", "line one\r\nline two\r\n")
    write_text(tmp_path / "out" / "notes.txt", "mine\n")
    status, stdout, stderr = run_in_process(capsys, "prepare", tmp_path / "corpus", "--out", tmp_path / "out",
                                            "--keep-line-endings", "--overwrite", "--no-progress")
    assert status == 0 and stderr == "" and "prepared 1 file(s)" in stdout
    meta = json.loads((tmp_path / "out" / "meta.json").read_text(encoding="utf-8"))
    assert meta["line_endings"] == "kept" and "\r" in meta["tokenizer"]["chars"]
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine\n"


def test_temporaries_of_killed_prepares_are_reclaimed_and_a_live_ones_kept(tmp_path):
    source = corpus(tmp_path / "corpus")
    out = tmp_path / "data"
    prepare([str(source)], out, progress=False)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = [f".train.bin.{gone.pid}_abcd1234.tmp", ".val.bin.tmp"]
    alive = [f".meta.json.{os.getpid()}_0000ffff.tmp", ".train.bin.notes.tmp"]
    for name in dead + alive:
        (out / name).write_bytes(b"x" * 100)
    prepare([str(source)], out, progress=False)
    left = {p.name for p in out.iterdir()}
    assert not set(dead) & left and set(alive) <= left

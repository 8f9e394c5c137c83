"""Shared by the serving tests: a tiny trained run (built once per session), a live
uvicorn server on a free loopback port, running in a thread, and the events of a stream."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

CORPUS = (
    "To be, or not to be, that is the question:\n"
    "Whether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\n"
    "Or to take arms against a sea of troubles\n"
    "And by opposing end them. To die: to sleep;\n"
) * 30

_runs: dict[str, Path] = {}


def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory named `tiny-run` holding a briefly trained tiny model (cached per session)."""
    if "run" not in _runs:
        from tinygpt.config import get_preset
        from tinygpt.data import prepare
        from tinygpt.train import train

        root = tmp_path_factory.mktemp("serve")
        (root / "corpus.txt").write_text(CORPUS, encoding="utf-8")
        prepare([str(root / "corpus.txt")], root / "data", progress=False)
        model_config, train_config = get_preset("tiny")
        train_config.max_iters = 60
        train_config.eval_interval = 60
        train_config.eval_iters = 2
        train_config.dtype = "float32"
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # on a shared machine, extra threads mostly wait for each other
        try:
            train(root / "data", root / "tiny-run", model_config, train_config, device="cpu", progress=False,
                  log=lambda *args: None)
        finally:
            torch.set_num_threads(threads)
        _runs["run"] = root / "tiny-run"
    return _runs["run"]


@contextmanager
def live_server(app) -> Iterator[str]:
    """Serve app with uvicorn in a thread; yield its base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def events(response) -> list:
    """The data of each server-sent event; [DONE] as the string."""
    out = []
    for block in response.text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def read_to_first_token(lines: Iterator[str]) -> dict:
    """Read a playground stream's lines up to its first generated token's event. The opening
    event does not count: it names the tokenizer, whose kind may be "char" too, and comes
    before the request has joined the batch."""
    for line in lines:
        if line.startswith("data: {") and "char" in (event := json.loads(line[len("data: "):])):
            return event
    raise AssertionError("the stream ended before its first token")

"""What `tinygpt serve` guarantees when things go wrong or someone else comes knocking: a model
that fails gets a JSON 500 (or an error event that ends its stream) and the server goes on;
requests must name an allowed host (DNS rebinding); the API's docs are off unless asked for."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch
from fastapi.testclient import TestClient

from serve_helpers import events, trained_run
from tinygpt import load
from tinygpt.cli import main
from tinygpt.engine import Limits
from tinygpt.serve import LOOPBACK_HOSTS, create_app, hosts_for_bind

COMPLETION = {"model": "tiny-run", "prompt": "To be", "max_tokens": 20, "temperature": 1.0, "seed": 1}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def loaded(run_dir):
    """A model of the module's own, free to be broken and mended."""
    return load(run_dir)


def app_for(run_dir, loaded, **options):
    model, tokenizer = loaded
    return create_app(run_dir, device="cpu", model=model, tokenizer=tokenizer, **options)


# ----------------------------------------------------------------------------- a model that fails


def break_weights(model) -> Callable[[], None]:
    """Set every weight of model to NaN; return the function that puts them back."""
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))

    def mend() -> None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(saved[name])

    return mend


@pytest.fixture
def broken(run_dir, loaded):
    """A client of a server with one slot and no queue (a slot a failure kept would refuse the
    next request with 429) whose model has NaN weights, and the function that mends them."""
    app = app_for(run_dir, loaded, limits=Limits(max_active=1, max_queue=0), allowed_hosts=["testserver"])
    mend = break_weights(loaded[0])
    try:
        with TestClient(app) as client:
            yield client, mend
    finally:
        mend()


def assert_server_error(error: dict, *needles: str) -> None:
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "server_error"
    for needle in needles:
        assert needle in error["message"], error["message"]
    assert "Traceback" not in error["message"] and 'File "' not in error["message"]


def test_a_failing_model_answers_a_json_500_and_the_server_goes_on(broken, caplog):
    broken, mend = broken
    with caplog.at_level(logging.ERROR, logger="tinygpt.engine"):
        sampled = broken.post("/v1/completions", json=COMPLETION)
    assert sampled.status_code == 500, sampled.text
    # torch.multinomial raised on the model thread: the message says so, the log holds the traceback
    assert_server_error(sampled.json()["error"], "the model failed while generating", "RuntimeError", "nan")
    assert any(record.exc_info for record in caplog.records)
    greedy = broken.post("/v1/completions", json={**COMPLETION, "temperature": 0})  # argmax of NaN raises nothing
    assert greedy.status_code == 500
    assert_server_error(greedy.json()["error"], "not finite")
    attention = broken.post("/api/attention", json={"text": "To be"})
    assert attention.status_code == 500
    assert_server_error(attention.json()["error"], "attention weights are not finite")
    health = broken.get("/health").json()
    assert (health["active"], health["failed"]) == (0, 3)
    mend()
    answer = broken.post("/v1/completions", json=COMPLETION)
    assert answer.status_code == 200 and len(answer.json()["choices"][0]["text"]) == 20
    assert broken.post("/api/attention", json={"text": "To be"}).status_code == 200


def test_a_stream_whose_model_fails_ends_with_an_error_event_then_done(broken):
    broken, mend = broken
    for path, body in (("/v1/completions", {**COMPLETION, "stream": True}), ("/api/generate", {"prompt": "To be"})):
        response = broken.post(path, json=body)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        streamed = events(response)
        assert streamed[-1] == "[DONE]"
        assert_server_error(streamed[-2]["error"], "the model failed while generating")
        assert not any("finish_reason" in e for e in streamed[:-2] if isinstance(e, dict))
    assert broken.get("/health").json()["active"] == 0
    mend()
    streamed = events(broken.post("/api/generate", json={"prompt": "To be", "max_tokens": 10}))
    assert streamed[-2]["tokens"] == 10 and streamed[-1] == "[DONE]"


def test_a_model_that_fails_midway_streams_what_it_made_then_the_error(run_dir, loaded, monkeypatch):
    model = loaded[0]
    forward, calls = model.forward, []

    def failing_forward(*args, **kwargs):  # one forward pass per character, with the cache
        calls.append(1)
        if len(calls) > 6:
            raise RuntimeError("out of memory on purpose")
        return forward(*args, **kwargs)

    # a long time slice: the failure comes in the middle of one, after steps that must still arrive
    app = app_for(run_dir, loaded, limits=Limits(max_active=1, max_queue=0, time_slice=60),
                  allowed_hosts=["testserver"])
    with TestClient(app) as client:
        monkeypatch.setattr(model, "forward", failing_forward)
        streamed = events(client.post("/api/generate", json={"prompt": "To be", "max_tokens": 50}))
        monkeypatch.setattr(model, "forward", forward)
        assert len([e for e in streamed if isinstance(e, dict) and "char" in e]) == 6
        assert streamed[-1] == "[DONE]"
        assert_server_error(streamed[-2]["error"], "RuntimeError: out of memory on purpose")
        assert client.post("/v1/completions", json=COMPLETION).status_code == 200


# ----------------------------------------------------------------------------- the Host header


def test_requests_must_name_a_loopback_host_by_default(run_dir, loaded):
    with TestClient(app_for(run_dir, loaded)) as client:
        for host in ("localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST.", "127.0.0.1"):
            assert client.get("/health", headers={"Host": host}).status_code == 200, host
        for host in ("testserver", "evil.example", "localhost.evil.example:8000", "127.0.0.1.nip.io"):
            refused = client.get("/health", headers={"Host": host})
            assert refused.status_code == 403, host
            error = refused.json()["error"]
            assert error["type"] == "invalid_request_error" and host in error["message"]
            assert "--allow-host" in error["message"] and "localhost" in error["message"]
        # refused before anything else: not the body limit (413), not the model
        big = {**COMPLETION, "prompt": "a" * 100_000}
        assert client.post("/v1/completions", json=big, headers={"Host": "evil.example"}).status_code == 403
        assert client.get("/", headers={"Host": "evil.example"}).status_code == 403
        assert client.get("/health", headers={"Host": "localhost"}).json()["completed"] == 0


def test_allowed_hosts_replace_the_default_and_star_allows_any(run_dir, loaded):
    with TestClient(app_for(run_dir, loaded, allowed_hosts=["My.LAN", "10.0.0.5"])) as client:
        assert client.get("/health", headers={"Host": "my.lan:8000"}).status_code == 200
        assert client.get("/health", headers={"Host": "10.0.0.5"}).status_code == 200
        assert client.get("/health", headers={"Host": "localhost"}).status_code == 403
    with TestClient(app_for(run_dir, loaded, allowed_hosts=["*"])) as client:
        assert client.get("/health", headers={"Host": "anything.example"}).status_code == 200


def test_the_hosts_a_bind_answers():
    assert hosts_for_bind("127.0.0.1") == list(LOOPBACK_HOSTS)
    assert hosts_for_bind("localhost") == list(LOOPBACK_HOSTS)
    assert hosts_for_bind("::1") == list(LOOPBACK_HOSTS)
    assert hosts_for_bind("127.0.0.2") == [*LOOPBACK_HOSTS, "127.0.0.2"]
    assert hosts_for_bind("0.0.0.0") == [*LOOPBACK_HOSTS, "0.0.0.0"]  # every address includes loopback
    assert hosts_for_bind("::") == [*LOOPBACK_HOSTS, "::"]
    assert hosts_for_bind("192.168.1.5") == ["192.168.1.5"]  # not reachable through loopback


def test_the_api_docs_are_off_unless_asked_for(run_dir, loaded):
    local = {"Host": "localhost"}
    with TestClient(app_for(run_dir, loaded)) as client:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert client.get(path, headers=local).status_code == 404, path
    with TestClient(app_for(run_dir, loaded, docs=True)) as client:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert client.get(path, headers=local).status_code == 200, path
        assert "/v1/completions" in client.get("/openapi.json", headers=local).json()["paths"]


# ----------------------------------------------------------------------------- tinygpt serve


def test_serve_warns_beyond_loopback_and_takes_allow_host_and_docs(run_dir, served, capsys):
    assert main(["serve", str(run_dir), "--host", "0.0.0.0", "--port", "0", "--device", "cpu",
                 "--allow-host", "my.lan", "--allow-host", "proxy.example", "--docs"]) == 0
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and warning.startswith("tinygpt: warning: listening on 0.0.0.0")
    assert "my.lan" in warning
    with TestClient(served[-1]) as client:
        for host in ("my.lan", "proxy.example:443", "localhost:8000", "0.0.0.0:8000"):
            assert client.get("/health", headers={"Host": host}).status_code == 200, host
        assert client.get("/health", headers={"Host": "evil.example"}).status_code == 403
        assert client.get("/docs", headers={"Host": "my.lan"}).status_code == 200


def test_serve_on_loopback_says_nothing_and_keeps_docs_off(run_dir, served, capsys):
    assert main(["serve", str(run_dir), "--port", "0", "--device", "cpu"]) == 0
    assert capsys.readouterr().err == ""
    with TestClient(served[-1]) as client:
        assert client.get("/health", headers={"Host": "127.0.0.1:8000"}).status_code == 200
        assert client.get("/health", headers={"Host": "evil.example"}).status_code == 403
        assert client.get("/openapi.json", headers={"Host": "127.0.0.1"}).status_code == 404


def test_serve_refuses_an_empty_allow_host(run_dir, capsys):
    assert main(["serve", str(run_dir), "--allow-host", " ", "--device", "cpu"]) == 1
    assert capsys.readouterr().err == "tinygpt serve: error: --allow-host needs a host name (or * for any)\n"


def test_a_bug_in_the_server_still_answers_a_json_500(run_dir, loaded, monkeypatch):
    def broken_body(self):
        raise ValueError("a bug")

    monkeypatch.setattr("tinygpt.serve.Completion.body", broken_body)
    app = app_for(run_dir, loaded, allowed_hosts=["testserver"])
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post("/v1/completions", json=COMPLETION)
        assert response.status_code == 500
        assert_server_error(response.json()["error"], "internal server error (ValueError)")
        assert client.get("/health").json()["active"] == 0


def test_no_such_route_and_the_wrong_method_are_openai_errors_too(run_dir, loaded):
    with TestClient(app_for(run_dir, loaded, allowed_hosts=["testserver"])) as client:
        missing = client.get("/v2/nothing")
        assert missing.status_code == 404
        assert missing.json() == {"error": {"message": "Not Found", "type": "not_found_error", "param": None,
                                            "code": None}}
        wrong = client.put("/v1/completions", json=COMPLETION)
        assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
        assert wrong.json()["error"]["message"] == "Method Not Allowed"

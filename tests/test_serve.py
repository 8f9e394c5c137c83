"""The HTTP API of `tinygpt serve`, in process (fastapi's TestClient), plus the behaviours
that need a real connection (a client that leaves, a full queue) on a live loopback server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from serve_helpers import events, live_server, read_to_first_token, trained_run
from tinygpt.cli import main
from tinygpt.engine import Engine, Limits, PromptRejected
from tinygpt.errors import ServerBusy, ServerOverloaded
from tinygpt.generate import generate_text
from tinygpt.serve import Choice, create_app


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_run(tmp_path_factory)


TEST_CLIENT_HOSTS = ["testserver"]  # the Host header TestClient sends


@pytest.fixture(scope="module")
def app(run_dir):
    return create_app(run_dir, device="cpu", limits=Limits(max_prompt_chars=500, max_body_bytes=4096),
                      allowed_hosts=TEST_CLIENT_HOSTS)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as client:
        yield client


def engine_of(app) -> Engine:
    return app.state.engine


def reference(app, prompt: str, max_new_tokens: int, **options) -> str:
    """What the library generates, computed on the server's model thread (same torch threads, same numerics)."""
    engine = engine_of(app)
    text = engine.executor.submit(generate_text, engine.model, engine.tokenizer, prompt, max_new_tokens,
                                  **options).result()
    return text[len(prompt):]


def test_health_and_models_name_the_run(client):
    assert client.get("/health").json()["status"] == "ok"
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["tiny-run"]


def test_completion_matches_the_library_and_counts_usage(app, client):
    body = {"model": "tiny-run", "prompt": "To be", "max_tokens": 40, "temperature": 0.9, "top_k": 10, "seed": 7}
    result = client.post("/v1/completions", json=body).json()
    assert result["object"] == "text_completion" and result["id"].startswith("cmpl-")
    (choice,) = result["choices"]
    assert choice["text"] == reference(app, "To be", 40, temperature=0.9, top_k=10, seed=7)
    assert choice["finish_reason"] == "length"
    assert result["usage"] == {"prompt_tokens": 5, "completion_tokens": 40, "total_tokens": 45}
    again = client.post("/v1/completions", json=body).json()
    assert again["choices"][0]["text"] == choice["text"]  # seeded: reproducible


def test_n_choices_are_independent_samples(client):
    result = client.post("/v1/completions", json={"model": "tiny-run", "prompt": "The ", "max_tokens": 30,
                                                   "n": 3, "seed": 1}).json()
    assert [c["index"] for c in result["choices"]] == [0, 1, 2]
    assert all(len(c["text"]) == 30 for c in result["choices"])
    assert len({c["text"] for c in result["choices"]}) == 3
    assert result["usage"]["completion_tokens"] == 90


def test_stop_sequence_cuts_the_text_in_both_modes(app, client):
    text = reference(app, "To be", 60, temperature=0.8, seed=2)
    stop = text[20:23]  # a sequence the seeded continuation is known to contain
    expected = text[:text.index(stop)]
    assert len(expected) >= 5  # the cut is inside the text, not at its start
    body = {"model": "tiny-run", "prompt": "To be", "max_tokens": 60, "temperature": 0.8, "seed": 2,
            "stop": [stop, "\x00?"]}
    result = client.post("/v1/completions", json=body).json()
    assert result["choices"][0] == {"index": 0, "text": expected, "logprobs": None, "finish_reason": "stop"}
    streamed = events(client.post("/v1/completions", json={**body, "stream": True}))
    assert streamed[-1] == "[DONE]"
    assert "".join(c["text"] for e in streamed[:-1] for c in e["choices"]) == expected
    assert streamed[-2]["choices"][-1]["finish_reason"] == "stop"


def test_stream_equals_the_plain_completion_and_reports_usage(client):
    body = {"model": "tiny-run", "prompt": "Or to", "max_tokens": 50, "seed": 3, "n": 2}
    plain = client.post("/v1/completions", json=body).json()
    response = client.post("/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert response.headers["content-type"].startswith("text/event-stream")
    streamed = events(response)
    assert streamed[-1] == "[DONE]"
    assert streamed[-2]["usage"] == plain["usage"] and streamed[-2]["choices"] == []
    for i in range(2):
        chunks = [c for e in streamed[:-2] for c in e["choices"] if c["index"] == i]
        assert "".join(c["text"] for c in chunks) == plain["choices"][i]["text"]
        assert chunks[-1]["finish_reason"] == "length"
        assert all(c["finish_reason"] is None for c in chunks[:-1])


def test_held_back_text_is_released_once_it_cannot_start_a_stop_sequence():
    choice = Choice(["abc"])
    for char in "xab":
        choice.add(char)
    assert choice.delta() == "x"  # "ab" may be the start of "abc"
    choice.add("d")
    assert choice.delta() == "abd"
    for char in "abc":
        choice.add(char)
    assert (choice.text, choice.finish_reason, choice.delta()) == ("xabd", "stop", "")


@pytest.mark.parametrize(("body", "status", "needle"), [
    ('{"model": "tiny-run", "prompt": "To', 422, "not valid JSON"),
    ('{"model": "tiny-run", "prompt": "To be \u00e9\u00a7"}', 400, "'\u00a7', '\u00e9'"),
    ('{"model": "tiny-run", "max_tokens": 5000}', 400, "at most 1024"),
    ('{"model": "tiny-run", "n": 50}', 400, "at most 8 choices"),
    ('{"model": "tiny-run", "prompt": "' + "a" * 600 + '"}', 400, "at most 500"),
    ('{"model": "tiny-run", "prompt": "' + "a" * 5000 + '"}', 413, "at most 4096 bytes"),
    ('{"model": "gpt-4", "prompt": "To"}', 404, "serves 'tiny-run'"),
    ('{"model": "tiny-run", "temperature": 3}', 422, "temperature"),
    ('{"model": "tiny-run", "max_tokens": "many"}', 422, "max_tokens"),
    ('{"model": "tiny-run", "logprobs": 50}', 400, "at most 20 alternatives per token"),
    ('{"model": "tiny-run", "suffix": "end"}', 400, "suffix is not supported"),
    ('{"prompt": "To"}', 422, "model"),
])
def test_bad_requests_get_clear_errors(client, body, status, needle):
    response = client.post("/v1/completions", content=body.encode(), headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]["message"]


def test_generate_streams_characters_with_probabilities_and_alternatives(app, client):
    body = {"prompt": "To be", "max_tokens": 25, "temperature": 0.8, "seed": 11, "alternatives": 4}
    streamed = events(client.post("/api/generate", json=body))
    assert streamed[0]["block_size"] == 32 and streamed[-1] == "[DONE]"
    steps = [e for e in streamed if isinstance(e, dict) and "char" in e]
    assert "".join(s["char"] for s in steps) == reference(app, "To be", 25, temperature=0.8, seed=11)
    assert streamed[-2] == {**streamed[-2], "finish_reason": "length", "tokens": 25}
    for step in steps:
        probs = [alt["prob"] for alt in step["top"]]
        assert len(probs) == 4 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0001
        assert 0 < step["prob"] <= probs[0]
        if step["char"] in [alt["char"] for alt in step["top"]]:
            assert step["prob"] == next(alt["prob"] for alt in step["top"] if alt["char"] == step["char"])
    # the probabilities are the model's own (temperature 1): check the first step against a forward pass
    engine = engine_of(app)
    with torch.no_grad():
        logits, _ = engine.model(torch.tensor([engine.tokenizer.encode("To be")]))
    first = logits[0, -1].softmax(-1)
    assert steps[0]["prob"] == pytest.approx(float(first[engine.tokenizer.index[steps[0]["char"]]]), abs=1e-4)


def test_generate_rejects_unknown_characters_and_fields(client):
    response = client.post("/api/generate", json={"prompt": "Zebra"})
    assert response.status_code == 400 and "'Z'" in response.json()["error"]["message"]
    assert client.post("/api/generate", json={"prompt": "To", "max_new_tokens": 5}).status_code == 422
    assert client.post("/api/generate", json={"prompt": "To", "alternatives": 100}).status_code == 400


def test_attention_is_causal_per_layer_and_head(client):
    full = client.post("/api/attention", json={"text": "To be, or"}).json()
    weights = torch.tensor(full["weights"])
    assert full["tokens"] == list("To be, or") and full["offset"] == 0
    assert weights.shape == (2, 2, 9, 9)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 2, 9), atol=1e-3)
    assert weights.triu(diagonal=1).abs().max() == 0  # no position looks ahead
    row = client.post("/api/attention", json={"text": "To be, or", "query": -1}).json()
    assert row["query"] == 8
    assert torch.allclose(torch.tensor(row["weights"]), weights[:, :, 8], atol=1e-4)


def test_attention_crops_long_text_to_the_context_window(client):
    text = "To be, or not to be, that is the question:\n"
    result = client.post("/api/attention", json={"text": text, "query": 0}).json()
    assert result["tokens"] == list(text[-32:]) and result["offset"] == len(text) - 32
    assert torch.tensor(result["weights"])[:, :, 0].tolist() == [[1.0, 1.0], [1.0, 1.0]]
    assert client.post("/api/attention", json={"text": "To", "query": 5}).status_code == 400
    assert client.post("/api/attention", json={"text": "Zz"}).status_code == 400


def test_playground_page_and_assets_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="output"' in page.text and "/static/app.js" in page.text
    assert "api/generate" in client.get("/static/app.js").text
    assert client.get("/static/style.css").headers["content-type"].startswith("text/css")


def test_admission_queues_in_order_then_refuses(run_dir):
    app = create_app(run_dir, device="cpu", limits=Limits(max_active=1, max_queue=1, queue_timeout=0.3))
    engine = engine_of(app)
    order = []

    async def scenario():
        async def request(name, hold):
            async with engine.slot():
                order.append(name)
                await asyncio.sleep(hold)

        first = asyncio.create_task(request("first", 0.1))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(request("second", 0))
        await asyncio.sleep(0.01)
        with pytest.raises(ServerBusy) as refused:
            await request("third", 0)
        await asyncio.gather(first, second)
        assert "retry" in str(refused.value) and refused.value.retry_after == 1
        # a slot held past the queue timeout: the waiter is told the server is overloaded
        blocker = asyncio.create_task(request("blocker", 1.0))
        await asyncio.sleep(0.01)
        with pytest.raises(ServerOverloaded) as timed_out:
            await request("late", 0)
        assert "waited 0.3 s" in str(timed_out.value) and timed_out.value.retry_after == 5
        await blocker
        assert engine.active == 0 and not engine.waiters

    asyncio.run(scenario())
    assert order == ["first", "second", "blocker"]


@pytest.mark.parametrize("stream", [False, True])
def test_refusals_at_admission_become_429_and_503_with_retry_after(run_dir, stream):
    body = {"model": "tiny-run", "prompt": "To", "max_tokens": 5, "stream": stream}
    for max_queue, status, kind, retry_after in ((0, 429, "rate_limit_error", "1"), (1, 503, "server_error", "5")):
        app = create_app(run_dir, device="cpu", limits=Limits(max_active=1, max_queue=max_queue, queue_timeout=0.05),
                         allowed_hosts=TEST_CLIENT_HOSTS)
        engine = engine_of(app)
        engine.active = 1  # the one slot is taken, as if by a request that never ends
        with TestClient(app) as client:
            response = client.post("/v1/completions", json=body)
        assert response.status_code == status, response.text
        assert response.headers["retry-after"] == retry_after
        assert response.json()["error"]["type"] == kind
        assert engine.active == 1 and not engine.waiters  # a refused request takes and leaves nothing


def test_engine_rejects_prompts_with_a_typed_error_the_api_answers_as_400(app, client):
    engine = engine_of(app)
    with pytest.raises(PromptRejected, match="at most 500"):
        engine.encode_prompt("a" * 501)
    with pytest.raises(PromptRejected, match="prompt has characters not in the vocabulary: 'Z'"):
        engine.encode_prompt("Zebra")
    assert engine.encode_prompt("") == [engine.tokenizer.index["\n"]]
    error = client.post("/v1/completions", json={"model": "tiny-run", "prompt": "Zebra"}).json()["error"]
    assert error == {"message": "prompt has characters not in the vocabulary: 'Z'", "type": "invalid_request_error",
                     "param": "prompt", "code": None}


@pytest.mark.parametrize("module", ["tinygpt.engine", "tinygpt.playground"])
def test_modules_import_on_their_own_and_the_engine_knows_no_http(module):
    check = (f"import json, sys, {module}; "
             "print(json.dumps(sorted(name for name in ('fastapi', 'pydantic', 'starlette') if name in sys.modules)))")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    web = json.loads(result.stdout)
    if module == "tinygpt.engine":
        assert web == []
    else:
        assert web == ["fastapi", "pydantic", "starlette"]


def test_a_client_that_leaves_stops_its_generation_and_a_full_server_says_429(run_dir):
    app = create_app(run_dir, device="cpu", limits=Limits(max_tokens=10**6, max_active=1, max_queue=0))
    with live_server(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        body = {"prompt": "To be", "max_tokens": 10**6}  # minutes of work if nobody stops it
        with http.stream("POST", "/api/generate", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            read_to_first_token(lines)
            busy = http.post("/v1/completions", json={"model": "tiny-run", "prompt": "To"})
            assert busy.status_code == 429 and "busy" in busy.json()["error"]["message"]
            assert busy.headers["retry-after"] == "1"
        deadline = time.monotonic() + 10
        while (health := http.get("/health").json())["active"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health["active"] == 0 and health["cancelled"] == 1
        assert http.post("/v1/completions", json={"model": "tiny-run", "prompt": "To"}).status_code == 200


def test_cli_serve_reports_a_busy_port_in_one_line(run_dir, capsys):
    with live_server(create_app(run_dir, device="cpu")) as url:
        port = url.rsplit(":", 1)[1]
        assert main(["serve", str(run_dir), "--port", port, "--device", "cpu"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("tinygpt serve: error: cannot listen on 127.0.0.1:") and "\n" not in error


def test_cli_chat_continues_each_prompt(run_dir, monkeypatch, capsys):
    import io

    from tinygpt import load

    model, tokenizer = load(run_dir)
    monkeypatch.setattr("sys.stdin", io.StringIO("To be\nZz\nThe \n"))
    assert main(["chat", str(run_dir), "--max-new-tokens", "12", "--seed", "5", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    # one seed per turn, counting the refused one: "The " is turn 2
    assert generate_text(model, tokenizer, "To be", 12, temperature=0.8, seed=5) in captured.out
    assert generate_text(model, tokenizer, "The ", 12, temperature=0.8, seed=7) in captured.out
    assert "'Z'" in captured.err

"""The serving API's features beyond plain completions: log-probabilities and echo (scoring a
text over HTTP), chat completions and their template, /metrics, the API key and CORS."""

from __future__ import annotations

import json
import math
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from serve_helpers import events, live_server, read_to_first_token, trained_run
from tinygpt.chat import ChatTemplate
from tinygpt.cli import main
from tinygpt.data import load_tokens
from tinygpt.engine import Limits
from tinygpt.serve import create_app

openai = pytest.importorskip("openai")

KEY = "test-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
# a template in the tiny corpus's own characters (the default's USER:/ASSISTANT: are not in its vocabulary)
TEMPLATE = {"system": "{content}\n", "user": "To: {content}\n", "assistant": "Or: {content}\n", "generation": "Or:",
            "stop": ["e"]}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def template_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "template.json"
    path.write_text(json.dumps(TEMPLATE), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def app(run_dir, template_file):
    # time_slice 0: one trip to the model thread per token, so that a stream arrives in many pieces
    return create_app(run_dir, device="cpu", limits=Limits(time_slice=0), allowed_hosts=["testserver", "127.0.0.1"],
                      api_key=KEY, chat_template=ChatTemplate.load(template_file),
                      cors_origins=["https://app.example"])


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app, headers=AUTH) as client:
        yield client


@pytest.fixture(scope="module")
def openai_client(app):
    with live_server(app) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


def complete(client, **body) -> dict:
    response = client.post("/v1/completions", json={"model": "tiny-run", **body})
    assert response.status_code == 200, response.text
    return response.json()


# ----------------------------------------------------------------------------- logprobs and echo


def test_echo_with_logprobs_scores_a_text_exactly_as_tinygpt_eval_does(run_dir, openai_client, capsys):
    data = run_dir.parent / "data"
    assert main(["eval", str(run_dir), "--data", str(data), "--json", "--device", "cpu"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    from tinygpt.data import load_tokenizer

    text = load_tokenizer(data).decode(load_tokens(data, "val"))
    assert len(text) > 3 * 32  # several block_size windows: the window rule matters

    # the README's example, as it is there (its model name and text aside)
    text_to_score = text
    client = openai_client
    scored = client.completions.create(model="tiny-run", prompt=text_to_score, max_tokens=0, echo=True,
                                       logprobs=0).choices[0].logprobs
    nats = -sum(scored.token_logprobs[1:])  # the first token has no prediction: its logprob is None
    bits_per_char = nats / math.log(2) / (len(text_to_score) - scored.text_offset[1])

    assert scored.token_logprobs[0] is None and scored.top_logprobs[0] is None
    assert len(scored.tokens) == len(text) and "".join(scored.tokens) == text
    assert scored.text_offset == list(range(len(text)))
    assert nats / (len(text) - 1) == pytest.approx(evaluated["loss"], rel=1e-5)
    assert bits_per_char == pytest.approx(evaluated["bits_per_char"], rel=1e-5)
    # logprobs=0: no alternatives beyond the token itself (OpenAI's rule: the chosen one is always there)
    assert all(top == {token: lp} for top, token, lp in
               zip(scored.top_logprobs[1:], scored.tokens[1:], scored.token_logprobs[1:], strict=True))


def test_generated_logprobs_are_the_models_own_distribution_not_the_samplers(client):
    # hot, top-k sampling: the logprobs must still be those the model gives at temperature 1
    generated = complete(client, prompt="To be", max_tokens=12, temperature=1.6, top_k=3, seed=8,
                         logprobs=3)["choices"][0]
    text, logprobs = generated["text"], generated["logprobs"]
    assert len(text) == 12 and "".join(logprobs["tokens"]) == text
    assert logprobs["text_offset"] == list(range(5, 17))  # counted from the prompt's start, echoed or not
    for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"],
                                   strict=True):
        assert top[token] == logprob and 3 <= len(top) <= 4  # the top 3, and the token when it is not among them
        assert sorted(top.values(), reverse=True)[:3] == list(top.values())[:3]
        assert all(value <= 0 for value in top.values())
    # the same text scored as a prompt (it fits in one block_size window: the same context)
    scored = complete(client, prompt="To be" + text, max_tokens=0, echo=True, logprobs=3)["choices"][0]
    assert scored["text"] == "To be" + text and scored["finish_reason"] == "length"
    assert scored["logprobs"]["token_logprobs"][5:] == pytest.approx(logprobs["token_logprobs"], abs=1e-4)
    assert scored["logprobs"]["top_logprobs"][5:] == [pytest.approx(top, abs=1e-4) for top in logprobs["top_logprobs"]]


def test_streamed_logprobs_are_the_plain_answers_cut_where_the_stop_cuts(client):
    options = {"prompt": "The sl", "max_tokens": 40, "seed": 9, "logprobs": 2, "echo": True}
    unstopped = complete(client, **options)["choices"][0]["text"][len("The sl"):]
    stop = unstopped[15:17]
    expected = unstopped[:unstopped.index(stop)]
    whole = complete(client, **options, stop=stop)["choices"][0]
    assert whole["text"] == "The sl" + expected and whole["finish_reason"] == "stop"
    assert "".join(whole["logprobs"]["tokens"]) == whole["text"]  # no token cut off with the stop
    chunks = events(client.post("/v1/completions", json={"model": "tiny-run", **options, "stop": stop,
                                                        "stream": True}))
    assert chunks[-1] == "[DONE]"
    choices = [c for chunk in chunks[:-1] for c in chunk["choices"]]
    assert choices[0]["text"] == "The sl" and choices[0]["logprobs"]["token_logprobs"][0] is None  # the echo first
    assert len(choices) > 3  # piece by piece
    assert "".join(c["text"] for c in choices) == whole["text"]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [v for c in choices for v in c["logprobs"][key]] == whole["logprobs"][key], key


def test_echo_without_logprobs_prepends_the_prompt_and_n_choices_score_alike(client):
    plain = complete(client, prompt="To be", max_tokens=8, seed=2, n=2)
    echoed = complete(client, prompt="To be", max_tokens=8, seed=2, n=2, echo=True)
    assert [c["text"] for c in echoed["choices"]] == ["To be" + c["text"] for c in plain["choices"]]
    assert all(c["logprobs"] is None for c in echoed["choices"])
    scored = complete(client, prompt="To be", max_tokens=3, seed=2, n=2, echo=True, logprobs=1)["choices"]
    assert scored[0]["logprobs"]["token_logprobs"][:5] == scored[1]["logprobs"]["token_logprobs"][:5]
    assert [len(c["logprobs"]["tokens"]) for c in scored] == [8, 8]


@pytest.mark.parametrize(("body", "status", "needle"), [
    ({"prompt": "To", "logprobs": 21}, 400, "at most 20 alternatives per token"),
    ({"prompt": "To", "logprobs": -1}, 422, "logprobs"),
    ({"prompt": "Zebra", "echo": True, "logprobs": 1, "max_tokens": 0}, 400, "not in the vocabulary: 'Z'"),
])
def test_bad_logprob_requests_get_clear_errors(client, body, status, needle):
    response = client.post("/v1/completions", json={"model": "tiny-run", **body})
    assert response.status_code == status and needle in response.json()["error"]["message"]


def test_a_bpe_models_echo_gives_each_tokens_text_offset(tmp_path):
    import torch

    from helpers import MIXED_TEXT
    from tinygpt.config import ModelConfig
    from tinygpt.evaluate import evaluate_tokens
    from tinygpt.model import GPT
    from tinygpt.tokenizer import train_bpe

    tokenizer = train_bpe(iter([MIXED_TEXT * 20]), 300)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16,
                            dropout=0.0)).eval()
    app = create_app(tmp_path, device="cpu", model=model, tokenizer=tokenizer, allowed_hosts=["testserver"])
    text = "Ωμέγα 😀 " + MIXED_TEXT[:120]
    with TestClient(app) as bpe:
        scored = bpe.post("/v1/completions", json={"model": tmp_path.name, "prompt": text, "max_tokens": 0,
                                                   "echo": True, "logprobs": 2}).json()["choices"][0]["logprobs"]
    ids = tokenizer.encode(text)
    assert scored["tokens"] == [tokenizer.display(i) for i in ids] and len(ids) > 2 * 16
    offsets = scored["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] < len(text)
    for token, offset in zip(ids, offsets, strict=True):
        if tokenizer.token_bytes[token][0] & 0xC0 != 0x80:  # a token that starts a character starts at its offset
            assert text[offset:].encode("utf-8").startswith(tokenizer.token_bytes[token])
    import numpy as np

    expected = evaluate_tokens(model, np.array(ids), tokenizer=tokenizer)
    assert -sum(scored["token_logprobs"][1:]) / (len(ids) - 1) == pytest.approx(expected.loss, rel=1e-5)


# ----------------------------------------------------------------------------- chat completions


def test_the_default_template_reads_like_a_play():
    template = ChatTemplate.default()
    messages = [{"role": "system", "content": "A scene."}, {"role": "user", "content": "Who is there?"},
                {"role": "assistant", "content": "Nay, answer me."}, {"role": "user", "content": "{content}"}]
    assert template.render(messages) == ("A scene.\n\nUSER:\nWho is there?\n\nASSISTANT:\nNay, answer me.\n\n"
                                         "USER:\n{content}\n\nASSISTANT:\n")
    assert template.stop == ["\n\n"]


def test_chat_is_the_completion_of_the_rendered_messages_cut_at_the_templates_stop(client):
    messages = [{"role": "system", "content": "To be"}, {"role": "user", "content": "or not"},
                {"role": "developer", "content": "the question"}]
    rendered = "To be\nTo: or not\nthe question\nOr:"
    reference = complete(client, prompt=rendered, max_tokens=40, seed=3, n=2, stop=["e"])
    chat = client.post("/v1/chat/completions", json={"model": "tiny-run", "messages": messages, "max_tokens": 40,
                                                     "seed": 3, "n": 2}).json()
    assert chat["object"] == "chat.completion" and chat["id"].startswith("chatcmpl-")
    assert [c["message"] for c in chat["choices"]] == [{"role": "assistant", "content": c["text"]}
                                                       for c in reference["choices"]]
    assert [c["finish_reason"] for c in chat["choices"]] == [c["finish_reason"] for c in reference["choices"]]
    assert "stop" in [c["finish_reason"] for c in chat["choices"]]
    assert chat["usage"] == reference["usage"]


def test_the_openai_package_streams_a_chat_completion_with_usage(openai_client):
    options = {"model": "tiny-run", "messages": [{"role": "user", "content": "To be"}], "max_tokens": 30,
               "seed": 5, "temperature": 0.9, "stop": ["q"]}
    whole = openai_client.chat.completions.create(**options)
    chunks = list(openai_client.chat.completions.create(**options, stream=True,
                                                        stream_options={"include_usage": True}))
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.delta.content or "" for chunk in chunks for c in chunk.choices)
    assert text == whole.choices[0].message.content and len([c for c in chunks if c.choices]) > 3
    finishes = [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(chunk.usage is None for chunk in chunks[:-1])


@pytest.mark.parametrize(("messages", "param", "needle"), [
    ([], "messages", "non-empty list"),
    ("To be", "messages", "non-empty list"),
    (None, "messages", "non-empty list"),
    (["To be"], "messages[0]", "must be an object"),
    ([{"content": "To be"}], "messages[0].role", "has no role"),
    ([{"role": "user", "content": "To"}, {"role": "wizard", "content": "be"}], "messages[1].role", "'wizard'"),
    ([{"role": "tool", "content": "To"}], "messages[0].role", "'tool'"),
    ([{"role": "user"}], "messages[0].content", "must be a string (it is missing)"),
    ([{"role": "user", "content": [{"type": "text", "text": "To"}]}], "messages[0].content", "(it is a list)"),
    ([{"role": "user", "content": 42}], "messages[0].content", "(it is a int)"),
    ([{"role": "user", "content": "Zebra"}], "messages", "not in the vocabulary: 'Z'"),
])
def test_malformed_chat_messages_get_a_400_that_names_them(client, messages, param, needle):
    response = client.post("/v1/chat/completions", json={"model": "tiny-run", "messages": messages})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and needle in error["message"] and error["type"] == "invalid_request_error"


def test_chat_refuses_what_it_cannot_honour(client):
    body = {"model": "tiny-run", "messages": [{"role": "user", "content": "To"}]}
    assert client.post("/v1/chat/completions", json={**body, "logprobs": True}).status_code == 400
    assert client.post("/v1/chat/completions", json={**body, "tools": [{"type": "function"}]}).status_code == 400
    assert client.post("/v1/chat/completions", json={**body, "max_tokens": 5000}).status_code == 400
    assert client.post("/v1/chat/completions", json={**body, "model": "gpt-4o"}).status_code == 404


@pytest.mark.parametrize(("content", "needle"), [
    ("{not json", "is not a JSON file"),
    ('{"user": "{content}", "bot": "x"}', "must be a JSON object with the keys"),
    ('{"user": 3}', "must be strings"),
    ('{"stop": [""]}', "non-empty strings"),
])
def test_a_bad_chat_template_is_one_line_before_the_model_loads(run_dir, tmp_path, capsys, content, needle):
    path = tmp_path / "template.json"
    path.write_text(content, encoding="utf-8")
    assert main(["serve", str(run_dir), "--chat-template", str(path), "--device", "cpu"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("tinygpt serve: error: the chat template") and needle in error and error.count("\n") == 1
    assert main(["serve", str(run_dir), "--chat-template", str(tmp_path / "missing.json")]) == 1
    assert "cannot read the chat template" in capsys.readouterr().err


# ----------------------------------------------------------------------------- /metrics


def scrape(client) -> dict[str, float]:
    """Every sample of /metrics as {"name{label=value,...}": value}."""
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def test_metrics_count_requests_tokens_and_first_token_times(client):
    engine = client.app.state.engine
    before, engine_before = scrape(client), engine.generated_tokens
    usage = complete(client, prompt="To be", max_tokens=7, n=3)["usage"]
    assert scrape(client)["tinygpt_generated_tokens_total{}"] - before["tinygpt_generated_tokens_total{}"] == 21
    # choices that stop at different steps: a stopped choice's row still generates while the
    # others go on, and the engine counts it; the counter must say what the engine says
    stopping = complete(client, prompt="To", max_tokens=30, n=3, stop=["e"], seed=1)["choices"]
    assert len({len(choice["text"]) for choice in stopping}) > 1
    events(client.post("/v1/chat/completions", json={"model": "tiny-run", "messages": [
        {"role": "user", "content": "To"}], "max_tokens": 30, "stream": True, "stop": ["\n"]}))
    events(client.post("/api/generate", json={"prompt": "To", "max_tokens": 4}))
    assert client.post("/v1/completions", json={"model": "tiny-run", "logprobs": 99}).status_code == 400
    assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    after = scrape(client)

    def moved(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert moved("tinygpt_requests_total{route=/v1/completions,status=200}") == 2
    assert moved("tinygpt_requests_total{route=/v1/completions,status=400}") == 1
    assert moved("tinygpt_requests_total{route=/v1/chat/completions,status=200}") == 1
    assert moved("tinygpt_requests_total{route=/api/generate,status=200}") == 1
    assert moved("tinygpt_requests_total{route=/v1/models,status=401}") == 1
    assert moved("tinygpt_requests_total{route=/metrics,status=200}") == 2  # the scrapes before this one
    assert moved("tinygpt_generated_tokens_total{}") == engine.generated_tokens - engine_before
    assert moved("tinygpt_generated_tokens_total{}") >= 7 * 3 + 3 * max(len(c["text"]) for c in stopping) + 4 + 1
    assert usage["completion_tokens"] == 21
    for route, count in (("/v1/completions", 2), ("/v1/chat/completions", 1), ("/api/generate", 1)):
        assert moved(f"tinygpt_time_to_first_token_seconds_count{{route={route}}}") == count, route
        assert moved(f"tinygpt_request_duration_seconds_count{{route={route}}}") >= 1, route
    assert after["tinygpt_request_duration_seconds_bucket{le=+Inf,route=/v1/completions}"] == after[
        "tinygpt_request_duration_seconds_count{route=/v1/completions}"]
    assert client.get("/no/such/page").status_code == 404
    assert "tinygpt_requests_total{route=other,status=404}" in scrape(client)  # unknown paths: one label


def test_each_app_counts_its_own_requests(run_dir, client):
    complete(client, prompt="To", max_tokens=2)  # counted by the module's app, not by the one below
    with TestClient(create_app(run_dir, device="cpu", allowed_hosts=["testserver"])) as fresh:
        first = scrape(fresh)
        assert first["tinygpt_generated_tokens_total{}"] == 0
        assert not any(name.startswith("tinygpt_requests_total") for name in first)
    assert scrape(client)["tinygpt_generated_tokens_total{}"] >= 2


def test_gauges_show_the_queue_and_a_client_that_leaves_a_chat_stream_frees_its_slot(run_dir):
    endless = ChatTemplate(**{key: TEMPLATE[key] for key in ("system", "user", "assistant", "generation")}, stop=[])
    app = create_app(run_dir, device="cpu", limits=Limits(max_tokens=10**6, max_active=1, max_queue=4),
                     chat_template=endless)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        queued: list[int] = []
        waiter = threading.Thread(target=lambda: queued.append(http.post("/v1/completions", json={
            "model": "tiny-run", "prompt": "To", "max_tokens": 3}).status_code))
        with http.stream("POST", "/api/generate", json={"prompt": "To be", "max_tokens": 10**6}) as response:
            lines = response.iter_lines()
            read_to_first_token(lines)
            waiter.start()  # it waits for the one slot
            gauges = wait_for_metrics(http, lambda m: m["tinygpt_queue_depth{}"] == 1)
            assert gauges["tinygpt_active_sequences{}"] == gauges["tinygpt_active_requests{}"] == 1
        waiter.join(timeout=60)
        assert queued == [200]  # the slot passed on when the first client left
        body = {"model": "tiny-run", "messages": [{"role": "user", "content": "To be"}], "max_tokens": 10**6,
                "stream": True, "n": 3}  # minutes of work if nobody stops it
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            # the opening chunk (the role), then the reply's first text. The lines' iterator is kept:
            # one dropped after a break is closed at once, and closing it closes the connection
            # (the server would see the client leave)
            lines = response.iter_lines()
            for line in lines:
                if line and json.loads(line[len("data: "):])["choices"][0]["delta"].get("content"):
                    break
            # one request, three choices: three sequences in the batch (waited for: the slot count
            # of the requests before settles on the event loop, which this scrape may overtake)
            wait_for_metrics(http, lambda m: (m["tinygpt_active_requests{}"],
                                              m["tinygpt_active_sequences{}"]) == (1, 3))
        gauges = wait_for_metrics(http, lambda m: m["tinygpt_active_sequences{}"] == 0)
        assert gauges["tinygpt_active_requests{}"] == 0
        health = http.get("/health").json()
        assert health["cancelled"] == 2 and health["active"] == 0 and gauges["tinygpt_queue_depth{}"] == 0
        reply = http.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 5, "n": 1}).json()
        assert reply["choices"][0]["finish_reason"] == "length" and len(reply["choices"][0]["message"]["content"]) == 5


def wait_for_metrics(http, condition, patience: float = 30.0) -> dict[str, float]:
    """Scrape /metrics until condition(samples) holds (the server works in another thread)."""
    deadline = time.monotonic() + patience
    while True:
        samples = scrape(http)
        if condition(samples) or time.monotonic() > deadline:
            gauges = {name: value for name, value in samples.items()
                      if name.startswith(("tinygpt_active", "tinygpt_queue"))}
            assert condition(samples), gauges  # the gauges alone: the whole scrape is too long to read
            return samples
        time.sleep(0.02)


# ----------------------------------------------------------------------------- the API key and CORS


def test_the_api_key_guards_the_api_the_playground_routes_and_metrics(app):
    with TestClient(app) as anonymous:
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                             ("GET", "/api/info"), ("POST", "/api/generate"), ("GET", "/metrics")):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                            {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"}):
                response = anonymous.request(method, path, headers=headers, json={"model": "tiny-run"})
                assert response.status_code == 401, (path, headers)
                assert response.json()["error"]["code"] == "invalid_api_key"
                assert response.headers["www-authenticate"] == "Bearer"
        missing = anonymous.get("/v1/models").json()["error"]
        assert missing["type"] == "invalid_request_error" and "Authorization: Bearer" in missing["message"]
        assert anonymous.get("/health").status_code == 200  # liveness needs no key
        assert anonymous.get("/").status_code == 200  # the page, which asks for the key
        assert anonymous.get("/v1/models", headers={"Authorization": f"bearer  {KEY}"}).status_code == 200


def test_the_openai_package_sends_the_key_and_a_wrong_one_is_an_authentication_error(app, openai_client):
    assert [model.id for model in openai_client.models.list()] == ["tiny-run"]
    wrong = openai.OpenAI(base_url=str(openai_client.base_url), api_key="nope", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
        wrong.completions.create(model="tiny-run", prompt="To", max_tokens=2)


def test_the_key_comes_from_the_flag_or_the_environment(run_dir, served, monkeypatch, capsys):
    monkeypatch.setenv("TINYGPT_API_KEY", "from-env")
    assert main(["serve", str(run_dir), "--port", "0", "--device", "cpu"]) == 0
    assert main(["serve", str(run_dir), "--port", "0", "--device", "cpu", "--api-key", "from-flag"]) == 0
    for app, key in zip(served, ("from-env", "from-flag"), strict=True):
        with TestClient(app) as client:
            assert client.get("/v1/models", headers={"Host": "127.0.0.1"}).status_code == 401
            assert client.get("/v1/models", headers={"Host": "127.0.0.1",
                                                     "Authorization": f"Bearer {key}"}).status_code == 200
    monkeypatch.setenv("TINYGPT_API_KEY", " ")
    assert main(["serve", str(run_dir), "--port", "0", "--device", "cpu"]) == 1
    assert "TINYGPT_API_KEY) is empty" in capsys.readouterr().err


def test_cors_lets_the_named_origin_in_and_no_other(app, run_dir):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    with TestClient(app) as browser:
        allowed = browser.options("/v1/completions", headers=preflight)  # no key: a preflight carries none
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
        refused = browser.options("/v1/completions", headers={**preflight, "Origin": "https://evil.example"})
        assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
        unauthorised = browser.get("/v1/models", headers={"Origin": "https://app.example"})
        assert unauthorised.status_code == 401  # and the page may read why
        assert unauthorised.headers["access-control-allow-origin"] == "https://app.example"
    with TestClient(create_app(run_dir, device="cpu", allowed_hosts=["testserver"])) as default:
        response = default.options("/v1/completions", headers=preflight)
        assert response.status_code == 405 and "access-control-allow-origin" not in response.headers
        answered = default.get("/v1/models", headers={"Origin": "https://app.example"})
        assert answered.status_code == 200 and "access-control-allow-origin" not in answered.headers


def test_serve_takes_cors_origins_and_refuses_a_path(run_dir, served, capsys):
    assert main(["serve", str(run_dir), "--port", "0", "--device", "cpu", "--cors-origin", "https://a.example",
                 "--cors-origin", "http://localhost:5173"]) == 0
    with TestClient(served[-1]) as client:
        for origin in ("https://a.example", "http://localhost:5173"):
            response = client.get("/v1/models", headers={"Host": "127.0.0.1", "Origin": origin})
            assert response.headers["access-control-allow-origin"] == origin
    assert main(["serve", str(run_dir), "--cors-origin", "https://a.example/", "--device", "cpu"]) == 1
    assert "--cors-origin takes an origin" in capsys.readouterr().err

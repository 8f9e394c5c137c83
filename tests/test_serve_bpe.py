"""Serving a byte-level BPE model: /v1/completions, /api/generate and /api/attention count,
stream and show tokens, and a token that ends inside a character never reaches a client as
half a character. Tiny untrained models, in process (fastapi's TestClient)."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

import serve_helpers
from helpers import MIXED_TEXT
from tinygpt.config import ModelConfig
from tinygpt.engine import Limits
from tinygpt.generate import generate_ids
from tinygpt.model import GPT
from tinygpt.serve import create_app
from tinygpt.tokenizer import CharTokenizer, train_bpe

HOSTS = ["testserver"]  # the Host header TestClient sends
PROMPT = "Ça va? 日本語のテキスト"  # more tokens than characters with this BPE
EMOJI_CYCLE_TEXT = "😀éa"  # what the scripted model writes, again and again


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(iter([MIXED_TEXT * 20]), 300)


def random_model(vocab_size: int) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32))


def scripted_model(vocab_size: int, cycle: list[int]) -> GPT:
    """A model that, after any token of cycle, gives the next one of cycle (wrapping round) a
    probability of almost 1. Every block adds nothing to the residual stream, so the logits
    depend on the last token only: its one-hot embedding picks a row of the LM head."""
    assert len(set(cycle)) == len(cycle) <= 16
    model = GPT(ModelConfig(vocab_size=vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    with torch.no_grad():
        for tensor in (model.token_embedding.weight, model.position_embedding.weight, model.lm_head.weight):
            tensor.zero_()
        for block in model.blocks:
            for projection in (block.attn.proj, block.mlp.down):
                projection.weight.zero_()
                projection.bias.zero_()
        for slot, (token, following) in enumerate(zip(cycle, cycle[1:] + cycle[:1], strict=True)):
            model.token_embedding.weight[token, slot] = 1.0
            model.lm_head.weight[following, slot] = 10.0
    return model.eval()


def emoji_cycle(bpe) -> list[int]:
    """'a', then 😀 as the merged token F0 9F and the single bytes 98 and 80, then é as its two
    single bytes: four of these six tokens end inside a character."""
    ids = [bpe.token_bytes.index(b) for b in (b"a", b"\xf0\x9f", b"\x98", b"\x80", b"\xc3", b"\xa9")]
    assert bpe.encode("a") == ids[:1]
    return ids


def client_for(model: GPT, tokenizer, **limits) -> TestClient:
    app = create_app("bpe-run", device="cpu", model=model, tokenizer=tokenizer, allowed_hosts=HOSTS,
                     limits=Limits(**limits))
    return TestClient(app)


@pytest.fixture(scope="module")
def random_client(bpe):
    with client_for(random_model(bpe.vocab_size), bpe) as client:
        yield client


@pytest.fixture(scope="module")
def scripted_client(bpe):
    # time slice 0: one step per trip to the model thread, so one streamed chunk per token
    with client_for(scripted_model(bpe.vocab_size, emoji_cycle(bpe)), bpe, time_slice=0.0) as client:
        yield client


def events(response) -> list:
    """serve_helpers.events of a stream that must have been admitted (200)."""
    assert response.status_code == 200, response.text
    return serve_helpers.events(response)


def streamed_texts(response, n: int) -> tuple[list[list[str]], list]:
    """Each choice's streamed pieces, and the usage events."""
    pieces: list[list[str]] = [[] for _ in range(n)]
    streamed = events(response)
    assert streamed[-1] == "[DONE]"
    for event in streamed[:-1]:
        for choice in event["choices"]:
            pieces[choice["index"]].append(choice["text"])
    return pieces, [e["usage"] for e in streamed[:-1] if "usage" in e]


def is_whole_text(text: str) -> bool:
    """No replacement character, no lone surrogate: text a model of valid UTF-8 bytes must give."""
    return "\ufffd" not in text and not any(0xD800 <= ord(c) <= 0xDFFF for c in text)


def expected_texts(client, prompt: str, max_tokens: int, **options) -> list[str]:
    """The library's own samples, decoded whole (on the server's model thread, same numerics)."""
    engine = client.app.state.engine
    prompt_ids = engine.tokenizer.encode(prompt)

    def run() -> list[list[int]]:
        steps = [ids.tolist() for ids in generate_ids(engine.model, prompt_ids, max_tokens, **options)]
        return [list(row) for row in zip(*steps, strict=True)]

    return [engine.tokenizer.decode(row) for row in engine.executor.submit(run).result()]


# ----------------------------------------------------------------------------- /v1/completions


def test_streamed_pieces_add_up_to_the_plain_completion_and_usage_counts_tokens(random_client, bpe):
    body = {"model": "bpe-run", "prompt": PROMPT, "max_tokens": 40, "temperature": 1.0, "seed": 5, "n": 2}
    plain = random_client.post("/v1/completions", json=body).json()
    texts = [choice["text"] for choice in plain["choices"]]
    assert texts == expected_texts(random_client, PROMPT, 40, temperature=1.0, seed=5, num_samples=2)
    assert len(bpe.encode(PROMPT)) != len(PROMPT)  # so that counting characters would fail
    assert plain["usage"] == {"prompt_tokens": len(bpe.encode(PROMPT)), "completion_tokens": 80,
                              "total_tokens": len(bpe.encode(PROMPT)) + 80}
    response = random_client.post("/v1/completions", json={**body, "stream": True,
                                                            "stream_options": {"include_usage": True}})
    pieces, usage = streamed_texts(response, 2)
    assert ["".join(p) for p in pieces] == texts
    assert usage == [plain["usage"]]


def test_a_character_split_across_tokens_is_streamed_whole_once_complete(scripted_client, bpe):
    body = {"model": "bpe-run", "prompt": "a", "max_tokens": 12, "temperature": 0}
    plain = scripted_client.post("/v1/completions", json=body).json()
    assert plain["choices"][0]["text"] == EMOJI_CYCLE_TEXT * 2
    assert plain["usage"] == {"prompt_tokens": 1, "completion_tokens": 12, "total_tokens": 13}
    pieces, _ = streamed_texts(scripted_client.post("/v1/completions", json={**body, "stream": True}), 1)
    # one chunk per token that completes a character (the tokens ending inside one send
    # nothing), then the last chunk's finish_reason
    assert pieces[0] == ["😀", "é", "a", "😀", "é", "a", ""]
    assert all(is_whole_text(p) and p.encode("utf-8").decode("utf-8") == p for p in pieces[0])


def test_stop_sequences_apply_to_the_decoded_text(scripted_client):
    body = {"model": "bpe-run", "prompt": "a", "max_tokens": 12, "temperature": 0, "stop": ["éa"]}
    plain = scripted_client.post("/v1/completions", json=body).json()["choices"][0]
    assert (plain["text"], plain["finish_reason"]) == ("😀", "stop")
    pieces, _ = streamed_texts(scripted_client.post("/v1/completions", json={**body, "stream": True}), 1)
    assert "".join(pieces[0]) == "😀" and all(is_whole_text(p) for p in pieces[0])


def test_a_character_left_unfinished_at_max_tokens_ends_as_one_replacement_character(scripted_client):
    body = {"model": "bpe-run", "prompt": "a", "max_tokens": 2, "temperature": 0}  # F0 9F, 98: 80 never comes
    plain = scripted_client.post("/v1/completions", json=body).json()["choices"][0]
    assert (plain["text"], plain["finish_reason"]) == ("\ufffd", "length")
    pieces, _ = streamed_texts(scripted_client.post("/v1/completions", json={**body, "stream": True}), 1)
    assert "".join(pieces[0]) == "\ufffd"


def test_an_empty_prompt_starts_from_the_tokenizers_start(random_client, bpe):
    assert random_client.app.state.engine.encode_prompt("") == bpe.start_ids()
    body = {"model": "bpe-run", "prompt": "", "max_tokens": 5, "seed": 1}
    assert random_client.post("/v1/completions", json=body).json()["usage"]["prompt_tokens"] == 0


# ----------------------------------------------------------------------------- the playground


def test_generate_streams_one_event_per_token(scripted_client, bpe):
    body = {"prompt": "a", "max_tokens": 6, "temperature": 0, "alternatives": 3}
    streamed = events(scripted_client.post("/api/generate", json=body))
    assert streamed[0]["prompt_tokens"] == 1 and streamed[-2]["tokens"] == 6
    steps = [e for e in streamed if isinstance(e, dict) and "token" in e]
    assert [s["token"] for s in steps] == ["\\xf0\\x9f", "\\x98", "\\x80", "\\xc3", "\\xa9", "a"]
    assert [s["char"] for s in steps] == ["", "", "😀", "", "é", "a"]
    for step in steps:
        assert step["prob"] == pytest.approx(1.0, abs=1e-4)
        assert step["top"][0] == {"char": step["token"], "id": step["id"], "prob": step["prob"]}
        assert [alt["char"] for alt in step["top"]] == [bpe.display(alt["id"]) for alt in step["top"]]
    # the last token ends inside 😀: the character it cannot finish ends the text as U+FFFD
    cut = events(scripted_client.post("/api/generate", json={**body, "max_tokens": 2}))
    assert [(e["token"], e["char"]) for e in cut if isinstance(e, dict) and "token" in e] == [
        ("\\xf0\\x9f", ""), ("\\x98", "\ufffd")]


def test_generate_reports_the_models_own_probability_of_each_token(random_client, bpe):
    body = {"prompt": PROMPT, "max_tokens": 20, "temperature": 0.9, "seed": 4, "alternatives": 5}
    streamed = events(random_client.post("/api/generate", json=body))
    assert streamed[0]["prompt_tokens"] == len(bpe.encode(PROMPT))
    steps = [e for e in streamed if isinstance(e, dict) and "token" in e]
    assert len(steps) == 20
    assert "".join(s["char"] for s in steps) == expected_texts(random_client, PROMPT, 20, temperature=0.9, seed=4)[0]
    assert [s["token"] for s in steps] == [bpe.display(s["id"]) for s in steps]
    engine = random_client.app.state.engine
    with torch.no_grad():
        logits, _ = engine.model(torch.tensor([bpe.encode(PROMPT)]))
    first = logits[0, -1].softmax(-1)
    assert steps[0]["prob"] == pytest.approx(float(first[steps[0]["id"]]), abs=1e-4)
    for step in steps:
        probs = [alt["prob"] for alt in step["top"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True)
        assert 0 < step["prob"] <= probs[0]


def test_attention_shows_the_last_block_size_tokens(random_client, bpe):
    ids = bpe.encode(MIXED_TEXT)
    assert len(ids) > 32
    result = random_client.post("/api/attention", json={"text": MIXED_TEXT}).json()
    assert result["tokens"] == [bpe.display(i) for i in ids[-32:]]
    assert result["offset"] == len(ids) - 32
    assert torch.tensor(result["weights"]).shape == (2, 2, 32, 32)
    row = random_client.post("/api/attention", json={"text": MIXED_TEXT, "query": -1}).json()
    assert row["query"] == 31 and torch.tensor(row["weights"]).shape == (2, 2, 32)


def test_attention_query_bounds_count_tokens(random_client, bpe):
    many = "日本語のテキスト"  # 8 characters, more tokens
    assert len(bpe.encode(many)) > 10
    assert random_client.post("/api/attention", json={"text": many, "query": 10}).json()["query"] == 10
    few = "and and and and"  # 15 characters, fewer tokens
    n = len(bpe.encode(few))
    assert n < 10
    assert random_client.post("/api/attention", json={"text": few, "query": -n}).json()["query"] == 0
    response = random_client.post("/api/attention", json={"text": few, "query": 10})
    assert response.status_code == 400 and f"{n} tokens" in response.json()["error"]["message"]


def test_attention_over_a_generation_reads_the_ids_it_made(random_client, bpe):
    # "and" made of its single bytes, then the first two bytes of 😀: encoded again, that text
    # would be the token "and" (its bytes unfinished, no text at all)
    made = [bpe.token_bytes.index(b) for b in (b"a", b"n", b"d", b"\xf0", b"\x9f")]
    result = random_client.post("/api/attention", json={"text": "Ça", "ids": made, "query": -1}).json()
    assert result["tokens"] == [bpe.display(i) for i in bpe.encode("Ça") + made]
    assert result["tokens"][-5:] == ["a", "n", "d", "\\xf0", "\\x9f"] and result["query"] == len(result["tokens"]) - 1
    # an empty text stands for what an empty prompt starts from
    start = random_client.post("/api/attention", json={"text": "", "ids": made[:1]}).json()
    assert start["tokens"] == [bpe.display(i) for i in bpe.start_ids() + made[:1]]
    # the query may pick any of the tokens, the text's and the ids'
    assert random_client.post("/api/attention", json={"text": "a", "ids": [0, 2, 4, 6, 8, 10], "query": 6}).json()[
        "query"] == 6
    for bad in ([bpe.vocab_size], [-1]):
        response = random_client.post("/api/attention", json={"text": "a", "ids": bad})
        assert response.status_code == 400 and response.json()["error"]["param"] == "ids"


# ----------------------------------------------------------------------------- either tokenizer


def test_a_prompt_outside_a_character_vocabulary_is_refused_but_a_bpe_takes_it(random_client):
    chars = CharTokenizer(sorted(set("To be, or not\n")))
    with client_for(random_model(chars.vocab_size), chars) as char_client:
        body = {"model": "bpe-run", "prompt": PROMPT, "max_tokens": 4}
        refused = char_client.post("/v1/completions", json=body)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "prompt"
        assert char_client.post("/api/generate", json={"prompt": PROMPT}).status_code == 400
        assert char_client.post("/api/attention", json={"text": PROMPT}).status_code == 400
        # a character model's tokens are its characters: the same text in `char` and `token`
        steps = [e for e in events(char_client.post("/api/generate", json={"prompt": "To", "max_tokens": 8}))
                 if isinstance(e, dict) and "token" in e]
        assert len(steps) == 8 and all(s["char"] == s["token"] == chars.chars[s["id"]] for s in steps)
    accepted = random_client.post("/v1/completions", json=body)
    assert accepted.status_code == 200 and accepted.json()["usage"]["completion_tokens"] == 4
    assert random_client.post("/api/attention", json={"text": PROMPT}).status_code == 200


def test_a_stop_inside_a_token_of_several_characters_is_found_and_cut_at_its_start():
    from tinygpt.serve import Choice

    cases = [(["ab", "\nxyz"], ["\n"], "ab"), (["xx END of it"], ["END"], "xx "), (["xa", "bcd"], ["ab"], "x"),
             (["one", "\n\n"], ["\n"], "one"), (["abc"], ["zz"], "abc")]
    for pieces, stops, expected in cases:
        choice = Choice(stops)
        for piece in pieces:
            if choice.finish_reason is None:
                choice.add(piece)
        assert choice.text == expected, (pieces, stops)
        assert choice.finish_reason == ("stop" if expected != "abc" else None)

"""The official `openai` Python package, pointed at a live `tinygpt serve` on loopback."""

from __future__ import annotations

import pytest

from serve_helpers import live_server, trained_run
from tinygpt.serve import Limits, create_app

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    # time_slice 0: one trip to the model thread per character, so a stream arrives in many pieces
    app = create_app(trained_run(tmp_path_factory), device="cpu", limits=Limits(time_slice=0))
    with live_server(app) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0, timeout=60)


def test_lists_the_model(client):
    assert [model.id for model in client.models.list()] == ["tiny-run"]


def test_completes(client):
    completion = client.completions.create(model="tiny-run", prompt="To be", max_tokens=20, seed=4, n=2,
                                           temperature=0.7)
    assert [choice.index for choice in completion.choices] == [0, 1]
    assert all(len(choice.text) == 20 and choice.finish_reason == "length" for choice in completion.choices)
    assert completion.usage.prompt_tokens == 5 and completion.usage.completion_tokens == 40
    again = client.completions.create(model="tiny-run", prompt="To be", max_tokens=20, seed=4, n=2, temperature=0.7)
    assert [c.text for c in again.choices] == [c.text for c in completion.choices]
    texts = [c.text for c in completion.choices]
    assert texts[0] != texts[1]  # two samples, not one copied
    other = client.completions.create(model="tiny-run", prompt="To be", max_tokens=20, seed=5, n=2, temperature=0.7)
    assert [c.text for c in other.choices] != texts  # the seed is used
    greedy = client.completions.create(model="tiny-run", prompt="To be", max_tokens=20, seed=4, n=2, temperature=0)
    assert greedy.choices[0].text == greedy.choices[1].text and greedy.choices[0].text not in texts


def test_streams_the_same_text(client):
    options = {"model": "tiny-run", "prompt": "The sl", "max_tokens": 40, "seed": 9}
    unstopped = client.completions.create(**options).choices[0].text
    stop = unstopped[20:23]  # a sequence the seeded text is known to contain
    expected = unstopped[:unstopped.index(stop)]
    assert len(expected) >= 5  # the stop cuts a text, not nothing
    options["stop"] = [stop, "\n\n"]
    whole = client.completions.create(**options)
    assert whole.choices[0].text == expected and whole.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(**options, stream=True, stream_options={"include_usage": True}))
    text = "".join(choice.text for chunk in chunks for choice in chunk.choices)
    assert len([chunk for chunk in chunks if chunk.choices]) >= len(text) // 2  # piece by piece
    assert text == expected
    assert [c.finish_reason for chunk in chunks for c in chunk.choices][-1] == "stop"
    assert chunks[-1].usage == whole.usage


def test_errors_arrive_as_openai_exceptions(client):
    with pytest.raises(openai.BadRequestError, match="not in the vocabulary"):
        client.completions.create(model="tiny-run", prompt="Zebra", max_tokens=5)
    with pytest.raises(openai.NotFoundError, match="serves 'tiny-run'"):
        client.completions.create(model="gpt-4o", prompt="To", max_tokens=5)

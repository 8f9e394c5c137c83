"""The playground: a browser page that shows the model thinking, and the routes it calls.

    POST /api/generate    streamed tokens with their probability and top-k alternatives
    POST /api/attention   attention weights of every layer and head for a text
    GET  /                the page (src/tinygpt/static/), its script and styles under /static

`add_playground_routes` registers them on the app that `serve.create_app` builds. They drive
the same `Engine` as /v1/completions, so their requests queue with the API's in one FIFO, and
they answer with the adapter's error bodies and server-sent events (serve.py).

How /api/generate flows: the request is checked against the limits, the engine encodes the
prompt and admits the request, and each generated token becomes one event: `char`, the text
it adds (through one `tokenizer.stream()`, so "" for a BPE token that ends inside a
character, whose bytes come with the token that completes it; the last event adds what an
unfinished character leaves, as U+FFFD), `token` and `id`, the token as a readable string
(`tokenizer.display`: partial UTF-8 bytes as \\xNN) and its id, `prob`, its probability, and
`top`, the top-k alternatives as `{"char": display string, "id", "prob"}`. For a character
model `char` and `token` are the same one character. A first event describes the model
(`prompt_tokens` counts the prompt's tokens), a last one counts the tokens and the seconds
they took. Once admitted, the stream always ends with `data: [DONE]`: when the model fails
on the way (engine.ModelFailed), an OpenAI-style error event (`data: {"error": {...}}`)
takes the place of the last one.

/api/attention works in tokens too: the model's window is the last block_size tokens of
the text followed by `ids`, when given (a generation's tokens as it made them: the text
they decode to, encoded again, may give other tokens), and `query` picks one of them.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.responses import FileResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from tinygpt.engine import Engine, Sampling
from tinygpt.serve import DONE, MAX_TOKENS_DESCRIPTION, APIError, check_sampling, event_stream, sse, stream_failure
from tinygpt.server_metrics import ServerMetrics

STATIC_DIR = Path(str(resources.files("tinygpt") / "static"))


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = ""
    max_tokens: int = Field(200, ge=1, description=MAX_TOKENS_DESCRIPTION)
    temperature: float = Field(0.8, ge=0.0, le=2.0)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    alternatives: int = Field(5, ge=1)


class AttentionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = ""  # "": what a generation with an empty prompt starts from
    ids: list[int] = []  # token ids that follow the text's tokens: a generation's, exactly as made
    query: int | None = None  # one query token (negative counts from the end), or None for all


def add_playground_routes(app: FastAPI, engine: Engine) -> None:
    """Register the playground's page, assets and routes on app, served by engine."""

    @app.post("/api/generate")
    async def generate(body: GenerateRequest):
        return await _generate(engine, body, app.state.metrics)

    @app.post("/api/attention")
    async def attention(body: AttentionRequest) -> dict[str, Any]:
        return await _attention(engine, body)

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


def _step_converter(engine: Engine, sampling: Sampling, alternatives: int) -> Callable[..., dict[str, Any]]:
    """What turns each generated step into its event (called on the model thread, step by step)."""
    tokenizer = engine.tokenizer
    stream = tokenizer.stream()
    k = min(alternatives, tokenizer.vocab_size)
    made = 0

    def convert(ids: torch.Tensor, probs: torch.Tensor) -> dict[str, Any]:
        nonlocal made
        made += 1
        token = int(ids[0])
        text = stream.feed(token)
        if made == sampling.max_tokens:  # the last step: an unfinished character ends the text as U+FFFD
            text += stream.flush()
        # probabilities of the model itself (temperature 1, unfiltered), not of the sampler
        top = probs[0].topk(k)
        alternatives = zip(top.values.tolist(), top.indices.tolist(), strict=True)
        return {"char": text, "token": tokenizer.display(token), "id": token, "prob": round(float(probs[0, token]), 5),
                "top": [{"char": tokenizer.display(i), "id": i, "prob": round(p, 5)} for p, i in alternatives]}

    return convert


async def _generate(engine: Engine, body: GenerateRequest, metrics: ServerMetrics) -> StreamingResponse:
    check_sampling(engine.limits, body.max_tokens, 1)
    if body.alternatives > engine.limits.max_alternatives:
        raise APIError(400, f"alternatives is {body.alternatives}; at most {engine.limits.max_alternatives}",
                       param="alternatives")
    prompt_ids = engine.encode_prompt(body.prompt)
    prompt_tokens = len(prompt_ids) if body.prompt else 0  # an empty prompt starts from a newline of its own
    sampling = Sampling(body.max_tokens, body.temperature, body.top_k or None, body.top_p, body.seed, 1)
    convert = _step_converter(engine, sampling, body.alternatives)

    arrived = time.perf_counter()

    async def events() -> AsyncIterator[str]:
        started = time.perf_counter()
        count = 0
        failure = None
        async with engine.slot():
            yield sse({"model": engine.model_id, "tokenizer": engine.tokenizer.kind, "prompt_tokens": prompt_tokens,
                       "block_size": engine.model.config.block_size})
            try:
                async with aclosing(engine.steps(prompt_ids, sampling, convert)) as steps:
                    async for results in steps:
                        if count == 0:
                            metrics.time_to_first_token.labels("/api/generate").observe(time.perf_counter() - arrived)
                        count += len(results)
                        yield "".join(sse(step) for step in results)
            except Exception as error:  # the model failed: say so, then end the stream as always
                failure = error
        if failure is not None:
            yield stream_failure(failure)
            return
        seconds = time.perf_counter() - started
        yield sse({"finish_reason": "length", "tokens": count, "seconds": round(seconds, 4)})
        yield DONE

    return await event_stream(events())


async def _attention(engine: Engine, body: AttentionRequest) -> dict[str, Any]:
    text, ids, limits, block = body.text, body.ids, engine.limits, engine.model.config.block_size
    if len(text) > limits.max_prompt_chars:
        raise APIError(400, f"text is {len(text)} characters; at most {limits.max_prompt_chars}", param="text")
    vocab_size = engine.tokenizer.vocab_size
    if any(not 0 <= i < vocab_size for i in ids):
        raise APIError(400, f"ids must be token ids from 0 to {vocab_size - 1}", param="ids")
    # PromptRejected (a 400) on characters outside a character vocabulary
    shown = min(len(engine.encode_prompt(text)) + len(ids), block)
    if body.query is not None and not -shown <= body.query < shown:
        raise APIError(400, f"query {body.query} is outside the {shown} tokens the model sees", param="query")
    async with engine.slot():
        return await engine.call(engine.attention, text, body.query, ids, doing="reading attention")

"""The playground: a browser page that shows the model thinking, and the routes it calls.

    POST /api/generate    streamed characters with their probability and top-k alternatives
    POST /api/attention   attention weights of every layer and head for a text
    GET  /                the page (src/tinygpt/static/), its script and styles under /static

`add_playground_routes` registers them on the app that `serve.create_app` builds. They drive
the same `Engine` as /v1/completions, so their requests queue with the API's in one FIFO, and
they answer with the adapter's error bodies and server-sent events (serve.py).

How /api/generate flows: the request is checked against the limits, the engine encodes the
prompt and admits the request, and each generated step becomes one event holding the sampled
character, its probability and the top-k alternatives; a first event describes the model, a
last one counts the characters and the seconds they took. Once admitted, the stream always
ends with `data: [DONE]`: when the model fails on the way (engine.ModelFailed), an OpenAI-style
error event (`data: {"error": {...}}`) takes the place of the last one.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
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
from tinygpt.serve import DONE, APIError, check_sampling, event_stream, sse, stream_failure

STATIC_DIR = Path(str(resources.files("tinygpt") / "static"))


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = ""
    max_tokens: int = Field(200, ge=1)
    temperature: float = Field(0.8, ge=0.0, le=2.0)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    alternatives: int = Field(5, ge=1)


class AttentionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1)
    query: int | None = None  # one query position (negative counts from the end), or None for all


def add_playground_routes(app: FastAPI, engine: Engine) -> None:
    """Register the playground's page, assets and routes on app, served by engine."""

    @app.post("/api/generate")
    async def generate(body: GenerateRequest):
        return await _generate(engine, body)

    @app.post("/api/attention")
    async def attention(body: AttentionRequest) -> dict[str, Any]:
        return await _attention(engine, body)

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


async def _generate(engine: Engine, body: GenerateRequest) -> StreamingResponse:
    check_sampling(engine.limits, body.max_tokens, 1)
    if body.alternatives > engine.limits.max_alternatives:
        raise APIError(400, f"alternatives is {body.alternatives}; at most {engine.limits.max_alternatives}",
                       param="alternatives")
    prompt_ids = engine.encode_prompt(body.prompt)
    sampling = Sampling(body.max_tokens, body.temperature, body.top_k or None, body.top_p, body.seed, 1)
    chars = engine.tokenizer.chars
    k = min(body.alternatives, len(chars))

    def convert(ids: torch.Tensor, probs: torch.Tensor) -> dict[str, Any]:
        # probabilities of the model itself (temperature 1, unfiltered), not of the sampler
        token = int(ids[0])
        top = probs[0].topk(k)
        alternatives = zip(top.values.tolist(), top.indices.tolist(), strict=True)
        return {"char": chars[token], "prob": round(float(probs[0, token]), 5),
                "top": [{"char": chars[i], "prob": round(p, 5)} for p, i in alternatives]}

    async def events() -> AsyncIterator[str]:
        started = time.perf_counter()
        count = 0
        failure = None
        async with engine.slot():
            yield sse({"model": engine.model_id, "prompt_tokens": len(body.prompt),
                       "block_size": engine.model.config.block_size})
            try:
                async with aclosing(engine.steps(prompt_ids, sampling, convert)) as steps:
                    async for results in steps:
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
    text, limits, block = body.text, engine.limits, engine.model.config.block_size
    if len(text) > limits.max_prompt_chars:
        raise APIError(400, f"text is {len(text)} characters; at most {limits.max_prompt_chars}", param="text")
    shown = len(text[-block:])
    if body.query is not None and not -shown <= body.query < shown:
        raise APIError(400, f"query {body.query} is outside the {shown} characters the model sees", param="query")
    engine.encode_prompt(text[-block:])  # PromptRejected (a 400) on characters outside the vocabulary
    async with engine.slot():
        return await engine.call(engine.attention, text, body.query, doing="reading attention")

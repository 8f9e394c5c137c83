"""`tinygpt serve`: an OpenAI-compatible HTTP API and a browser playground for one run.

    POST /v1/completions   the OpenAI completions subset that applies to a character model
    GET  /v1/models        the one model this server holds
    GET  /health           liveness, plus how busy the server is
    POST /api/generate     streamed characters with their probability and top-k alternatives
    POST /api/attention    attention weights of every layer and head for a text
    GET  /                 the playground page (src/tinygpt/static/)

How a request flows. The event loop only parses, admits and streams. Every model call
runs on one dedicated model thread (`Engine.executor`, a single worker) in time slices of
`Limits.time_slice` seconds, so concurrent requests take turns over one model instance,
and an attention request never runs in the middle of a generation step (model.py's
attention recorder is switched on for the whole model). Admission is a FIFO of
`max_active` slots; up to `max_queue` more requests wait for one, beyond that the server
answers 429, and a request that waits longer than `queue_timeout` gets 503. A client
that disconnects cancels its request: the loop stops asking the model thread for more,
so its generation ends within one time slice.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from tinygpt.checkpoint import load_model
from tinygpt.config import TinyGPTError
from tinygpt.generate import generate_ids
from tinygpt.hardware import resolve_device
from tinygpt.model import GPT
from tinygpt.tokenizer import CharTokenizer

STATIC_DIR = Path(str(resources.files("tinygpt") / "static"))


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how much work the server takes on at once."""

    max_prompt_chars: int = 8192
    max_tokens: int = 1024  # the cap on max_tokens (characters generated per choice)
    max_n: int = 8  # the cap on n (choices per request)
    max_alternatives: int = 20  # the cap on top-k alternatives in /api/generate
    max_body_bytes: int = 65536
    max_active: int = 8  # requests generating at once (interleaved step by step)
    max_queue: int = 64  # requests waiting for a slot; more get 429
    queue_timeout: float = 60.0  # seconds a request may wait for a slot before a 503
    time_slice: float = 0.02  # seconds of generation a request gets before the next one's turn


class APIError(Exception):
    """An error answered as OpenAI's {"error": {...}} body with an HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# ----------------------------------------------------------------------------- request bodies


class CompletionRequest(BaseModel):
    """The fields of OpenAI's POST /v1/completions that a character model can honour."""

    model: str
    prompt: str | list[str] = ""
    max_tokens: int | None = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)  # not OpenAI's, but other local servers accept it too
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    # accepted only at their neutral values: the server cannot honour anything else
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None


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


# ----------------------------------------------------------------------------- the engine


@dataclasses.dataclass
class Sampling:
    max_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int | None
    n: int


class Engine:
    """One model, one model thread, and the FIFO that admits requests to it."""

    def __init__(self, model: GPT, tokenizer: CharTokenizer, model_id: str, limits: Limits, threads: int | None = 1):
        self.model, self.tokenizer, self.model_id, self.limits = model, tokenizer, model_id, limits
        # Torch's CPU thread count is per calling thread. One is the default: a small model at
        # batch 1 gains little from more, and on a busy machine the extra threads wait for each
        # other at every operation (benchmarks/serve_load.py --model-speed: 15-44x slower steps).
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tinygpt-model",
                                           initializer=torch.set_num_threads if threads else None,
                                           initargs=(threads,) if threads else ())
        self.active = 0
        self.waiters: collections.deque[asyncio.Future] = collections.deque()
        self.completed = 0
        self.cancelled = 0

    # -- admission: a FIFO semaphore made of futures, so it binds to no particular event loop

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        limits = self.limits
        if self.active >= limits.max_active:
            if len(self.waiters) >= limits.max_queue:
                raise APIError(429, f"server busy: {self.active} requests running and {len(self.waiters)} queued; "
                                    "retry shortly", kind="rate_limit_error", headers={"Retry-After": "1"})
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            try:
                await asyncio.wait_for(asyncio.shield(waiter), limits.queue_timeout)
            except BaseException as e:
                if waiter.done() and not waiter.cancelled():
                    self._release()  # the slot was handed over just as we gave up: pass it on
                else:
                    waiter.cancel()
                    self.waiters.remove(waiter)
                if isinstance(e, asyncio.TimeoutError):  # not yet the builtin TimeoutError on 3.10
                    raise APIError(503, f"server overloaded: waited {limits.queue_timeout:g} s for a free slot",
                                   kind="server_error", headers={"Retry-After": "5"}) from None
                raise
            # the releasing request handed its slot straight to us: `active` already counts it
        else:
            self.active += 1
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # hand the slot over without decrementing
                return
        self.active -= 1

    async def call(self, function: Callable, *args) -> Any:
        """Run function(*args) on the model thread."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    # -- generation

    def encode_prompt(self, prompt: str) -> list[int]:
        if len(prompt) > self.limits.max_prompt_chars:
            raise APIError(400, f"prompt is {len(prompt)} characters; this server accepts at most "
                                f"{self.limits.max_prompt_chars}", param="prompt")
        try:
            ids = self.tokenizer.encode(prompt)
        except TinyGPTError as e:
            raise APIError(400, f"prompt has {e}", param="prompt") from None
        # an empty prompt starts from a newline, as `tinygpt sample` does
        return ids or [self.tokenizer.index.get("\n", 0)]

    async def steps(self, prompt_ids: list[int], sampling: Sampling, convert: Callable[..., Any],
                    stop_early: Callable[[], bool] | None = None) -> AsyncIterator[list[Any]]:
        """Yield lists of convert(ids (n,), probs (n, V)), one per generated step, a time
        slice at a time; stop when the steps run out or stop_early() says so."""
        iterator = generate_ids(
            self.model, prompt_ids, sampling.max_tokens, temperature=sampling.temperature, top_k=sampling.top_k,
            top_p=sampling.top_p, seed=sampling.seed, num_samples=sampling.n, with_probs=True,
        )

        def time_slice() -> tuple[list[Any], bool]:
            # Several steps per trip to the model thread: one trip costs two thread switches,
            # which on a busy machine cost more than a step of a small model.
            results: list[Any] = []
            deadline = time.perf_counter() + self.limits.time_slice
            for ids, probs in iterator:
                results.append(convert(ids, probs))
                if stop_early is not None and stop_early():
                    return results, True
                if time.perf_counter() >= deadline:
                    return results, False
            return results, True

        finished = False
        try:
            while not finished:
                results, finished = await self.call(time_slice)
                if results:
                    yield results
        finally:
            # close the generator on the model thread, after any step still running there
            self.executor.submit(iterator.close)
            if finished:
                self.completed += 1
            else:
                self.cancelled += 1

    def attention(self, text: str, query: int | None) -> dict[str, Any]:
        """Attention weights for the last block_size characters of text (runs on the model thread)."""
        block = self.model.config.block_size
        shown = text[-block:]
        ids = torch.tensor([self.tokenizer.encode(shown)], device=next(self.model.parameters()).device)
        maps = self.model.attention_maps(ids).float()  # (L, nh, T, T)
        if query is not None:
            maps = maps[:, :, query, :]  # (L, nh, T)
        return {
            "tokens": list(shown),
            "offset": len(text) - len(shown),
            "query": None if query is None else query % len(shown),
            "n_layer": maps.size(0),
            "n_head": maps.size(1),
            "weights": maps.double().mul(10000).round().div(10000).tolist(),
        }


# ----------------------------------------------------------------------------- stop sequences


class Choice:
    """One completion's text as it grows, with OpenAI's stop-sequence rules: the stop
    sequence is cut off, and text that might be the start of one is held back from the
    stream until it is known not to be."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.text = ""
        self.sent = 0  # characters already streamed
        self.tokens = 0
        self.finish_reason: str | None = None
        self.reported = False  # whether the stream has sent this choice's finish_reason

    def add(self, char: str) -> None:
        self.text += char
        self.tokens += 1
        cuts = [i for stop in self.stops if (i := self.text.find(stop, max(0, len(self.text) - len(stop)))) >= 0]
        if cuts:
            self.text = self.text[:min(cuts)]
            self.finish_reason = "stop"

    def delta(self, final: bool = False) -> str:
        """The text not streamed yet that is safe to stream now."""
        end = len(self.text)
        if not final and self.finish_reason is None:
            end -= self._held_back()
        piece = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return piece

    def _held_back(self) -> int:
        longest = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:k]):
                    longest = k
                    break
        return longest


# ----------------------------------------------------------------------------- the app


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class BodyLimit:
    """ASGI middleware: reject request bodies over max_bytes with 413 before the app parses them."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._too_large(scope, receive, send)
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            if not message.get("more_body", False):
                break
        if messages[-1]["type"] == "http.request":
            body = b"".join(m.get("body", b"") for m in messages)
            replay = [{"type": "http.request", "body": body, "more_body": False}]
        else:  # the client left while sending: let the app see the disconnect
            replay = messages[-1:]

        async def replayed_receive():
            return replay.pop(0) if replay else await receive()

        return await self.app(scope, replayed_receive, send)

    async def _too_large(self, scope, receive, send):
        error = APIError(413, f"request body too large: this server accepts at most {self.max_bytes} bytes")
        await error.response()(scope, receive, send)


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    first = error.errors()[0] if error.errors() else {}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return f"request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})", None
    param = ".".join(location) or None
    message = first.get("msg", "invalid request")
    return (f"{param}: {message}" if param else message), param


def create_app(run_dir: str | Path, device: str = "auto", limits: Limits | None = None, threads: int | None = 1,
               model: GPT | None = None, tokenizer: CharTokenizer | None = None) -> FastAPI:
    """The ASGI app serving the run in run_dir (or an already loaded model and tokenizer).
    threads: torch CPU threads for the model (None: torch's default)."""
    limits = limits or Limits()
    if model is None or tokenizer is None:
        model, tokenizer = load_model(run_dir, device=resolve_device(device))
    model.eval()
    engine = Engine(model, tokenizer, Path(run_dir).resolve().name or "tinygpt", limits, threads)
    app = FastAPI(title="tinyGPT", version="0.1.0", summary="a small character-level GPT, served")
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        message, param = _validation_message(error)
        return APIError(422, message, param=param).response()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.model_id, "active": engine.active, "queued": len(engine.waiters),
                "completed": engine.completed, "cancelled": engine.cancelled}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": engine.model_id, "object": "model", "created": 0, "owned_by": "tinygpt"}]}

    @app.get("/api/info")
    async def info() -> dict[str, Any]:
        return {"model": engine.model_id, "config": dataclasses.asdict(model.config),
                "parameters": model.num_parameters(), "limits": dataclasses.asdict(limits)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _completions(engine, body, request)

    @app.post("/api/generate")
    async def generate(body: GenerateRequest):
        return await _generate(engine, body)

    @app.post("/api/attention")
    async def attention(body: AttentionRequest) -> dict[str, Any]:
        text = body.text
        if len(text) > limits.max_prompt_chars:
            raise APIError(400, f"text is {len(text)} characters; at most {limits.max_prompt_chars}", param="text")
        shown = len(text[-model.config.block_size:])
        if body.query is not None and not -shown <= body.query < shown:
            raise APIError(400, f"query {body.query} is outside the {shown} characters the model sees", param="query")
        engine.encode_prompt(text[-model.config.block_size:])  # 400 on characters outside the vocabulary
        async with engine.slot():
            return await engine.call(engine.attention, text, body.query)

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    return app


def _check_sampling(engine: Engine, max_tokens: int, n: int) -> None:
    limits = engine.limits
    if max_tokens > limits.max_tokens:
        raise APIError(400, f"max_tokens is {max_tokens}; this server generates at most {limits.max_tokens}",
                       param="max_tokens")
    if n > limits.max_n:
        raise APIError(400, f"n is {n}; this server returns at most {limits.max_n} choices", param="n")


async def _completions(engine: Engine, body: CompletionRequest, request: Request):
    if body.model != engine.model_id:
        raise APIError(404, f"model {body.model!r} is not served here; this server serves {engine.model_id!r}",
                       param="model", kind="not_found_error")
    for name, neutral in (("echo", False), ("logprobs", None), ("suffix", None), ("logit_bias", None),
                          ("frequency_penalty", 0.0), ("presence_penalty", 0.0)):
        if getattr(body, name) not in (neutral, {}):
            raise APIError(400, f"{name} is not supported by this server", param=name)
    if body.best_of not in (None, 1, body.n):
        raise APIError(400, "best_of is not supported by this server", param="best_of")
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise APIError(400, "send one prompt per request (a list of exactly one string)", param="prompt")
        prompt = prompt[0]
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise APIError(400, "stop takes up to 4 non-empty sequences", param="stop")
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    _check_sampling(engine, max_tokens, body.n)
    prompt_ids = engine.encode_prompt(prompt)
    sampling = Sampling(max_tokens, body.temperature, body.top_k or None, body.top_p, body.seed, body.n)
    chars = engine.tokenizer.chars
    choices = [Choice(stops) for _ in range(body.n)]
    header = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
              "model": engine.model_id}

    def usage() -> dict[str, int]:
        completion = sum(c.tokens for c in choices)
        return {"prompt_tokens": len(prompt), "completion_tokens": completion,
                "total_tokens": len(prompt) + completion}

    def add(ids: torch.Tensor, probs: torch.Tensor) -> None:  # runs on the model thread, step by step
        for choice, token in zip(choices, ids.tolist(), strict=True):
            if choice.finish_reason is None:
                choice.add(chars[token])

    def all_stopped() -> bool:
        return all(c.finish_reason is not None for c in choices)

    if not body.stream:
        async with engine.slot():
            if max_tokens > 0:
                async with aclosing(engine.steps(prompt_ids, sampling, add, all_stopped)) as steps:
                    async for _ in steps:
                        if await request.is_disconnected():
                            break
        return {**header, "choices": [
            {"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason or "length"}
            for i, c in enumerate(choices)], "usage": usage()}

    include_usage = bool((body.stream_options or {}).get("include_usage"))

    def stream_choices(final: bool = False) -> list[dict[str, Any]]:
        out = []
        for i, choice in enumerate(choices):
            if choice.reported:
                continue
            text = choice.delta(final)
            finish_reason = choice.finish_reason or ("length" if final else None)
            if text or finish_reason:
                out.append({"index": i, "text": text, "logprobs": None, "finish_reason": finish_reason})
                choice.reported = finish_reason is not None
        return out

    async def events() -> AsyncIterator[str]:
        async with engine.slot():
            if max_tokens > 0:
                async with aclosing(engine.steps(prompt_ids, sampling, add, all_stopped)) as steps:
                    async for _ in steps:
                        if out := stream_choices():
                            yield _sse({**header, "choices": out})
        if out := stream_choices(final=True):
            yield _sse({**header, "choices": out})
        if include_usage:
            yield _sse({**header, "choices": [], "usage": usage()})
        yield "data: [DONE]\n\n"

    return await _stream(events())


async def _stream(events: AsyncIterator[str]) -> StreamingResponse:
    """Start the stream only once its first event is ready, so that a request refused at
    admission (429/503) still gets a plain JSON error with its status code."""
    first = await anext(events, None)

    async def chained() -> AsyncIterator[str]:
        try:
            if first is not None:
                yield first
            async for event in events:
                yield event
        finally:
            await events.aclose()

    return StreamingResponse(chained(), media_type="text/event-stream", headers=SSE_HEADERS)


async def _generate(engine: Engine, body: GenerateRequest):
    _check_sampling(engine, body.max_tokens, 1)
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
        async with engine.slot():
            yield _sse({"model": engine.model_id, "prompt_tokens": len(body.prompt),
                        "block_size": engine.model.config.block_size})
            async with aclosing(engine.steps(prompt_ids, sampling, convert)) as steps:
                async for results in steps:
                    count += len(results)
                    yield "".join(_sse(step) for step in results)
        seconds = time.perf_counter() - started
        yield _sse({"finish_reason": "length", "tokens": count, "seconds": round(seconds, 4)})
        yield "data: [DONE]\n\n"

    return await _stream(events())


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          limits: Limits | None = None, threads: int | None = 1, log_level: str = "info") -> None:
    """Load the run and serve it with uvicorn until interrupted."""
    import uvicorn

    app = create_app(run_dir, device=device, limits=limits, threads=threads)
    # bind here rather than inside uvicorn, so that a busy port is one clear error line
    try:
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        raise TinyGPTError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    shown = f"[{host}]" if ":" in host else host
    print(f"tinygpt: serving {run_dir} at http://{shown}:{port}/ (OpenAI base URL: http://{shown}:{port}/v1)",
          flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level))
    server.run(sockets=[sock])

"""`tinygpt serve`: an OpenAI-compatible HTTP API over the engine, and the app that holds it.

    POST /v1/completions   the OpenAI completions subset that applies to a character model
    GET  /v1/models        the one model this server holds
    GET  /health           liveness, plus how busy the server is
    GET  /api/info         the model's configuration and size, and the server's limits
    POST /api/generate, POST /api/attention, GET /: the playground (playground.py)

This module owns HTTP: the request schemas, the body-size limit, OpenAI's error bodies and
server-sent events. The model thread, the admission queue and the time slices are the
engine's (engine.py); `create_app` builds one `Engine` and registers these routes and the
playground's on one app.

How a completion flows. The event loop only parses, admits and streams. `BodyLimit` refuses
a body over `max_body_bytes` (413) before the app parses it; pydantic parses it (422 on
invalid JSON or a field out of range); `_completion_arguments` checks it against the limits
and what a character model can honour (400, or 404 for another model's name);
`Engine.encode_prompt` turns the prompt into ids; `Engine.slot()` admits the request and
`Engine.steps` generates a time slice at a time on the model thread, each step's characters
going into one `Choice` per sample, which applies the stop sequences. A plain request is
answered when its steps end; a streamed one sends each slice's new text as an event. The
engine's typed errors become statuses here (`_engine_error`): `PromptRejected` 400,
`ServerBusy` 429 and `ServerOverloaded` 503, both with Retry-After. A client that
disconnects cancels its request: the loop stops asking the engine for more steps.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from tinygpt.checkpoint import load_model
from tinygpt.engine import Engine, Limits, PromptRejected, Sampling
from tinygpt.errors import ServerBusy, ServerOverloaded, TinyGPTError
from tinygpt.hardware import resolve_device
from tinygpt.model import GPT
from tinygpt.tokenizer import CharTokenizer

__all__ = ["APIError", "Choice", "Engine", "Limits", "create_app", "serve"]


class APIError(Exception):
    """An error answered as OpenAI's {"error": {...}} body with an HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _engine_error(error: PromptRejected | ServerBusy | ServerOverloaded) -> APIError:
    """The HTTP status and OpenAI error body for an error the engine raised."""
    if isinstance(error, ServerBusy):
        return APIError(429, str(error), kind="rate_limit_error", headers={"Retry-After": str(error.retry_after)})
    if isinstance(error, ServerOverloaded):
        return APIError(503, str(error), kind="server_error", headers={"Retry-After": str(error.retry_after)})
    return APIError(400, str(error), param="prompt")


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


def check_sampling(limits: Limits, max_tokens: int, n: int) -> None:
    """Refuse (400) more characters or choices than the limits allow."""
    if max_tokens > limits.max_tokens:
        raise APIError(400, f"max_tokens is {max_tokens}; this server generates at most {limits.max_tokens}",
                       param="max_tokens")
    if n > limits.max_n:
        raise APIError(400, f"n is {n}; this server returns at most {limits.max_n} choices", param="n")


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


class Completion:
    """One /v1/completions request's choices as they grow, and the bodies that report them."""

    def __init__(self, engine: Engine, prompt: str, stops: list[str], n: int):
        self.chars = engine.tokenizer.chars
        self.prompt_tokens = len(prompt)
        self.choices = [Choice(stops) for _ in range(n)]
        self.header = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                       "model": engine.model_id}

    def add(self, ids: torch.Tensor, probs: torch.Tensor) -> None:
        """Append one step's characters (runs on the model thread, step by step)."""
        for choice, token in zip(self.choices, ids.tolist(), strict=True):
            if choice.finish_reason is None:
                choice.add(self.chars[token])

    def all_stopped(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def usage(self) -> dict[str, int]:
        completion = sum(c.tokens for c in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def body(self) -> dict[str, Any]:
        """The answer to a plain (not streamed) request."""
        return {**self.header, "choices": [
            {"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason or "length"}
            for i, c in enumerate(self.choices)], "usage": self.usage()}

    def stream_choices(self, final: bool = False) -> list[dict[str, Any]]:
        """The choices of the next streamed chunk: new text, and each finish_reason once."""
        out = []
        for i, choice in enumerate(self.choices):
            if choice.reported:
                continue
            text = choice.delta(final)
            finish_reason = choice.finish_reason or ("length" if final else None)
            if text or finish_reason:
                out.append({"index": i, "text": text, "logprobs": None, "finish_reason": finish_reason})
                choice.reported = finish_reason is not None
        return out


# ----------------------------------------------------------------------------- server-sent events


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data: Any) -> str:
    """One server-sent event carrying data as JSON."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
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


# ----------------------------------------------------------------------------- the app


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


def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, error: APIError):
        return error.response()

    async def engine_error(request: Request, error: PromptRejected | ServerBusy | ServerOverloaded):
        return _engine_error(error).response()

    async def validation_error(request: Request, error: RequestValidationError):
        message, param = _validation_message(error)
        return APIError(422, message, param=param).response()

    app.add_exception_handler(APIError, api_error)
    for kind in (PromptRejected, ServerBusy, ServerOverloaded):
        app.add_exception_handler(kind, engine_error)
    app.add_exception_handler(RequestValidationError, validation_error)


def create_app(run_dir: str | Path, device: str = "auto", limits: Limits | None = None, threads: int | None = 1,
               model: GPT | None = None, tokenizer: CharTokenizer | None = None) -> FastAPI:
    """The ASGI app serving the run in run_dir (or an already loaded model and tokenizer).
    threads: torch CPU threads for the model (None: torch's default)."""
    # imported here: the playground's routes build on this module's errors and event stream
    from tinygpt.playground import add_playground_routes

    limits = limits or Limits()
    if model is None or tokenizer is None:
        model, tokenizer = load_model(run_dir, device=resolve_device(device))
    model.eval()
    engine = Engine(model, tokenizer, Path(run_dir).resolve().name or "tinygpt", limits, threads)
    app = FastAPI(title="tinyGPT", version="0.1.0", summary="a small character-level GPT, served")
    app.state.engine = engine
    _add_error_handlers(app)

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

    add_playground_routes(app, engine)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    return app


# ----------------------------------------------------------------------------- /v1/completions


def _completion_arguments(engine: Engine, body: CompletionRequest) -> tuple[str, list[str], int]:
    """The prompt, stop sequences and max_tokens of a request that asks only for what this
    server can do; APIError otherwise."""
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
    check_sampling(engine.limits, max_tokens, body.n)
    return prompt, stops, max_tokens


async def _completions(engine: Engine, body: CompletionRequest, request: Request):
    prompt, stops, max_tokens = _completion_arguments(engine, body)
    prompt_ids = engine.encode_prompt(prompt)
    sampling = Sampling(max_tokens, body.temperature, body.top_k or None, body.top_p, body.seed, body.n)
    completion = Completion(engine, prompt, stops, body.n)
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return await event_stream(_completion_events(engine, prompt_ids, sampling, completion, include_usage))
    async with engine.slot():
        if max_tokens > 0:
            async with aclosing(engine.steps(prompt_ids, sampling, completion.add, completion.all_stopped)) as steps:
                async for _ in steps:
                    if await request.is_disconnected():
                        break
    return completion.body()


async def _completion_events(engine: Engine, prompt_ids: list[int], sampling: Sampling, completion: Completion,
                             include_usage: bool) -> AsyncIterator[str]:
    async with engine.slot():
        if sampling.max_tokens > 0:
            async with aclosing(engine.steps(prompt_ids, sampling, completion.add, completion.all_stopped)) as steps:
                async for _ in steps:
                    if out := completion.stream_choices():
                        yield sse({**completion.header, "choices": out})
    if out := completion.stream_choices(final=True):
        yield sse({**completion.header, "choices": out})
    if include_usage:
        yield sse({**completion.header, "choices": [], "usage": completion.usage()})
    yield "data: [DONE]\n\n"


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

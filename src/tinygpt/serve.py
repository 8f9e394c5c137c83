"""`tinygpt serve`: an OpenAI-compatible HTTP API over the engine, and the app that holds it.

    POST /v1/completions   the OpenAI completions subset that applies to a small local model
    GET  /v1/models        the one model this server holds
    GET  /health           liveness, plus how busy the server is
    GET  /api/info         the model's configuration, size and tokenizer kind, and the server's limits
    POST /api/generate, POST /api/attention, GET /: the playground (playground.py)

This module owns HTTP: the request schemas, the body-size limit, OpenAI's error bodies and
server-sent events. The model thread, the admission queue and the time slices are the
engine's (engine.py); `create_app` builds one `Engine` and registers these routes and the
playground's on one app.

How a completion flows. The event loop only parses, admits and streams. `BodyLimit` refuses
a body over `max_body_bytes` (413) before the app parses it; pydantic parses it (422 on
invalid JSON or a field out of range); `_completion_arguments` checks it against the limits
and what this server can honour (400, or 404 for another model's name);
`Engine.encode_prompt` turns the prompt into ids; `Engine.slot()` admits the request and
`Engine.steps` generates a time slice at a time on the model thread. Each sample's tokens
go through its own `tokenizer.stream()`, so that its text never holds half a character (a
BPE token may end inside one: its bytes wait for the token that completes it), into one
`Choice` per sample, which applies the stop sequences to that text. A plain request is
answered when its steps end; a streamed one sends each slice's new text as an event. The
engine's typed errors become statuses here (`api_error_of`): `PromptRejected` 400,
`ServerBusy` 429 and `ServerOverloaded` 503, both with Retry-After, `ModelFailed` 500. A
client that disconnects cancels its request: the loop stops asking the engine for more steps.

What is guaranteed:

* Every error is OpenAI's JSON body `{"error": {"message", "type", "param", "code"}}` with
  its status: 4xx for what the request asked, 429/503 for a full server, 500 (type
  "server_error") when the model fails (it raises on the model thread, or its numbers are
  not finite, as with NaN weights) or the server has a bug. A 500's message names what
  failed; the traceback goes to the server's log only.
* A streamed request, once admitted, always ends with `data: [DONE]`; a failure on the way
  is sent first as one event `data: {"error": {...}}`. Refusals at admission (429/503)
  come before the stream starts, as plain JSON errors.
* A failed request releases its slot like any other, and the server goes on serving.
* Every request must name an allowed host in its `Host` header, or it gets 403 (the check
  comes before anything else, the body limit included). By default those are this
  machine's loopback names (localhost, 127.0.0.1, ::1); `serve` adds the address it listens
  on, and `--allow-host NAME` (`*`: any) adds more, for a reverse proxy or a LAN. This
  stops a web page from driving the API through DNS rebinding: its requests name its own
  host. `serve` warns on stderr when it listens beyond loopback.
* `/docs`, `/redoc` and `/openapi.json` exist only with `--docs` (`create_app(docs=True)`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import aclosing
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from tinygpt.checkpoint import load_model
from tinygpt.engine import Engine, Limits, ModelFailed, PromptRejected, Sampling
from tinygpt.errors import ServerBusy, ServerOverloaded, TinyGPTError
from tinygpt.hardware import resolve_device
from tinygpt.model import GPT
from tinygpt.tokenizer import Tokenizer

__all__ = ["APIError", "Choice", "Engine", "Limits", "LOOPBACK_HOSTS", "create_app", "hosts_for_bind", "serve"]

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")  # the Host names an app answers by default


class APIError(Exception):
    """An error answered as OpenAI's {"error": {...}} body with an HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def api_error_of(error: Exception) -> APIError:
    """The HTTP status and OpenAI error body for any exception a request ended with."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, ServerBusy):
        return APIError(429, str(error), kind="rate_limit_error", headers={"Retry-After": str(error.retry_after)})
    if isinstance(error, ServerOverloaded):
        return APIError(503, str(error), kind="server_error", headers={"Retry-After": str(error.retry_after)})
    if isinstance(error, PromptRejected):
        return APIError(400, str(error), param="prompt")
    if isinstance(error, ModelFailed):
        return APIError(500, str(error), kind="server_error")
    if isinstance(error, TinyGPTError):  # what the request asked for, refused by the library
        return APIError(400, str(error))
    return APIError(500, f"internal server error ({type(error).__name__}); the server's log has the details",
                    kind="server_error")


# ----------------------------------------------------------------------------- request bodies


MAX_TOKENS_DESCRIPTION = ("how many tokens to generate per choice: characters for a character model, "
                          "byte-level BPE tokens (a few bytes each) for a BPE model")


class CompletionRequest(BaseModel):
    """The fields of OpenAI's POST /v1/completions that this server can honour."""

    model: str
    prompt: str | list[str] = ""
    max_tokens: int | None = Field(16, ge=0, description=MAX_TOKENS_DESCRIPTION)
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
    """Refuse (400) more tokens or choices than the limits allow."""
    if max_tokens > limits.max_tokens:
        raise APIError(400, f"max_tokens is {max_tokens}; this server generates at most {limits.max_tokens}",
                       param="max_tokens")
    if n > limits.max_n:
        raise APIError(400, f"n is {n}; this server returns at most {limits.max_n} choices", param="n")


# ----------------------------------------------------------------------------- stop sequences


class Choice:
    """One completion's text as it grows, with OpenAI's stop-sequence rules: the stop
    sequence is cut off, and text that might be the start of one is held back from the
    stream until it is known not to be. It is given whole characters only (a `TextStream`
    holds back a character's first bytes), one piece per token, "" for a token that ends
    inside a character."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.text = ""
        self.sent = 0  # characters already streamed
        self.tokens = 0
        self.finish_reason: str | None = None
        self.reported = False  # whether the stream has sent this choice's finish_reason

    def add(self, text: str, tokens: int = 1) -> None:
        """Append the text that `tokens` more generated tokens completed."""
        before = len(self.text)
        self.text += text
        self.tokens += tokens
        # the text before had no stop in it: a stop found now ends inside the new piece (a BPE
        # token may bring several characters, a stop among them)
        cuts = [i for stop in self.stops if (i := self.text.find(stop, max(0, before - len(stop) + 1))) >= 0]
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

    def __init__(self, engine: Engine, prompt_tokens: int, stops: list[str], n: int):
        self.prompt_tokens = prompt_tokens
        self.choices = [Choice(stops) for _ in range(n)]
        self.streams = [engine.tokenizer.stream() for _ in range(n)]  # bytes to text, one per choice
        self.header = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                       "model": engine.model_id}

    def add(self, ids: torch.Tensor, probs: torch.Tensor) -> None:
        """Append one step's tokens (runs on the model thread, step by step)."""
        for choice, stream, token in zip(self.choices, self.streams, ids.tolist(), strict=True):
            if choice.finish_reason is None:
                choice.add(stream.feed(token))

    def finish(self) -> None:
        """The steps are over: what an unfinished character left in a stream ends its text (as U+FFFD)."""
        for choice, stream in zip(self.choices, self.streams, strict=True):
            if choice.finish_reason is None:
                choice.add(stream.flush(), tokens=0)

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


DONE = "data: [DONE]\n\n"


def sse(data: Any) -> str:
    """One server-sent event carrying data as JSON."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def stream_failure(error: Exception) -> str:
    """How a stream that failed after it was admitted ends: an event holding the OpenAI
    error body, then [DONE]. An error that is not tinyGPT's own (a bug) is logged first."""
    if not isinstance(error, (APIError, TinyGPTError)):
        log.error("tinygpt: a stream failed", exc_info=error)
    return sse(api_error_of(error).body()) + DONE


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


def host_name(value: str) -> str:
    """The host a Host header (or an --allow-host value) names, in the form hosts are compared
    in: lower case, without the port, the brackets of an IPv6 address or a trailing dot, an
    IP address in its shortest spelling."""
    value = value.strip().lower()
    if value.startswith("["):  # [IPv6]:port
        value = value[1:].partition("]")[0]
    elif value.count(":") == 1:  # name:port (more colons: an IPv6 address without a port)
        value = value.partition(":")[0]
    value = value.rstrip(".")
    try:
        return ipaddress.ip_address(value).compressed
    except ValueError:
        return value


def is_loopback(host: str) -> bool:
    """Whether host names this machine only (localhost, 127.0.0.0/8, ::1)."""
    name = host_name(host)
    try:
        return name == "localhost" or ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def hosts_for_bind(host: str) -> list[str]:
    """The Host names a server listening on host answers: host itself, plus the loopback
    names when it listens on loopback or on every address (which includes loopback)."""
    name = host_name(host)
    every_address = name in ("", "0.0.0.0", "::")
    names = list(LOOPBACK_HOSTS) if every_address or is_loopback(name) else []
    return names + [name] if name and name not in names else names


class HostCheck:
    """ASGI middleware: answer 403 unless the Host header names one of allowed_hosts ("*": any).

    A web page elsewhere can reach a server on this machine by DNS rebinding (its own name,
    re-resolved to 127.0.0.1), but its browser still sends that name as Host."""

    def __init__(self, app, allowed_hosts: Iterable[str]):
        self.app = app
        self.allowed = {host_name(h) for h in allowed_hosts}
        self.shown = ", ".join(sorted(self.allowed))

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or "*" in self.allowed:
            return await self.app(scope, receive, send)
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        if host_name(host) in self.allowed:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        named = f"Host {host[:100]!r}" if host else "a request without a Host header"
        error = APIError(403, f"{named} is not served here: this server answers requests for {self.shown} "
                              "(start it with --allow-host NAME to add a name)")
        await error.response()(scope, receive, send)


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
    async def api_error(request: Request, error: Exception):
        return api_error_of(error).response()

    async def validation_error(request: Request, error: RequestValidationError):
        message, param = _validation_message(error)
        return APIError(422, message, param=param).response()

    async def http_error(request: Request, error: HTTPException):  # no such route (404), wrong method (405)
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return APIError(error.status_code, str(error.detail), kind=kind, headers=error.headers).response()

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(TinyGPTError, api_error)  # the engine's errors and ModelFailed among them
    app.add_exception_handler(RequestValidationError, validation_error)
    # anything else is a bug: still a JSON 500 (starlette then re-raises it for the server's log)
    app.add_exception_handler(Exception, api_error)


def create_app(run_dir: str | Path, device: str = "auto", limits: Limits | None = None, threads: int | None = 1,
               model: GPT | None = None, tokenizer: Tokenizer | None = None,
               allowed_hosts: Iterable[str] | None = None, docs: bool = False) -> FastAPI:
    """The ASGI app serving the run in run_dir (or an already loaded model and tokenizer).
    threads: torch CPU threads for the model (None: torch's default). allowed_hosts: the
    names a request's Host header may give, all of them ("*": any; default LOOPBACK_HOSTS);
    any other host gets 403. docs: serve /docs, /redoc and /openapi.json."""
    # imported here: the playground's routes build on this module's errors and event stream
    from tinygpt.playground import add_playground_routes

    limits = limits or Limits()
    if model is None or tokenizer is None:
        model, tokenizer = load_model(run_dir, device=resolve_device(device))
    model.eval()
    engine = Engine(model, tokenizer, Path(run_dir).resolve().name or "tinygpt", limits, threads)
    shown = {} if docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="tinyGPT", version="0.1.0", summary="a small GPT, served", **shown)
    app.state.engine = engine
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.model_id, "active": engine.active, "queued": len(engine.waiters),
                "completed": engine.completed, "cancelled": engine.cancelled, "failed": engine.failed}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": engine.model_id, "object": "model", "created": 0, "owned_by": "tinygpt"}]}

    @app.get("/api/info")
    async def info() -> dict[str, Any]:
        return {"model": engine.model_id, "tokenizer": tokenizer.kind, "config": dataclasses.asdict(model.config),
                "parameters": model.num_parameters(), "limits": dataclasses.asdict(limits)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _completions(engine, body, request)

    add_playground_routes(app, engine)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    # added last, so it runs first: a request for another host is refused before its body is read
    app.add_middleware(HostCheck, allowed_hosts=LOOPBACK_HOSTS if allowed_hosts is None else list(allowed_hosts))
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
    # the prompt's own tokens: an empty prompt counts none, though generation starts from a newline
    completion = Completion(engine, len(prompt_ids) if prompt else 0, stops, body.n)
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return await event_stream(_completion_events(engine, prompt_ids, sampling, completion, include_usage))
    async with engine.slot():
        if max_tokens > 0:
            async with aclosing(engine.steps(prompt_ids, sampling, completion.add, completion.all_stopped)) as steps:
                async for _ in steps:
                    if await request.is_disconnected():
                        break
    completion.finish()
    return completion.body()


async def _completion_events(engine: Engine, prompt_ids: list[int], sampling: Sampling, completion: Completion,
                             include_usage: bool) -> AsyncIterator[str]:
    failure = None
    async with engine.slot():  # ServerBusy/ServerOverloaded here: before the stream starts
        try:
            if sampling.max_tokens > 0:
                async with aclosing(engine.steps(prompt_ids, sampling, completion.add,
                                                 completion.all_stopped)) as steps:
                    async for _ in steps:
                        if out := completion.stream_choices():
                            yield sse({**completion.header, "choices": out})
        except Exception as error:  # admitted: the stream ends with an error event and [DONE]
            failure = error
    if failure is not None:
        yield stream_failure(failure)
        return
    completion.finish()
    if out := completion.stream_choices(final=True):
        yield sse({**completion.header, "choices": out})
    if include_usage:
        yield sse({**completion.header, "choices": [], "usage": completion.usage()})
    yield DONE


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          limits: Limits | None = None, threads: int | None = 1, log_level: str = "info",
          allow_hosts: Iterable[str] = (), docs: bool = False) -> None:
    """Load the run and serve it with uvicorn until interrupted. Requests must name host
    (and the loopback names, when host is loopback or every address) or one of allow_hosts
    ("*": any) in their Host header; listening beyond loopback prints a warning on stderr.
    docs: serve /docs, /redoc and /openapi.json."""
    import uvicorn

    hosts = hosts_for_bind(host)
    hosts += [name for name in map(host_name, allow_hosts) if name not in hosts]
    app = create_app(run_dir, device=device, limits=limits, threads=threads, allowed_hosts=hosts, docs=docs)
    # bind here rather than inside uvicorn, so that a busy port is one clear error line
    try:
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        raise TinyGPTError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    if not is_loopback(host):
        answered = "any host name" if "*" in hosts else ", ".join(hosts) + " (more with --allow-host NAME)"
        print(f"tinygpt: warning: listening on {host}, beyond this machine: whoever can reach it can use the model "
              f"(it answers requests for {answered})", file=sys.stderr, flush=True)
    shown = f"[{host}]" if ":" in host else host
    print(f"tinygpt: serving {run_dir} at http://{shown}:{port}/ (OpenAI base URL: http://{shown}:{port}/v1)",
          flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level))
    server.run(sockets=[sock])

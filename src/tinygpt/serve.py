"""`tinygpt serve`: an OpenAI-compatible HTTP API over the engine, and the app that holds it.

    POST /v1/completions        the OpenAI completions subset that applies to a small local model,
                                logprobs and echo included (scoring a text: scoring.py)
    POST /v1/chat/completions   chat, through a chat template (chat.py)
    GET  /v1/models             the one model this server holds
    GET  /health                liveness, plus how busy the server is
    GET  /metrics               Prometheus metrics (server_metrics.py)
    GET  /api/info              the model's configuration, size and tokenizer kind, and the server's limits
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
* With an API key (`create_app(api_key=...)`), /v1/*, /api/* and /metrics answer 401 without
  `Authorization: Bearer KEY`; the page at / and /health stay open. The key check comes after
  the Host check and CORS (a browser's preflight carries no key) and before the body is read.
  CORS headers are sent only for the origins given (`cors_origins`), none by default.
"""

from __future__ import annotations

import dataclasses
import hmac
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
from typing import TYPE_CHECKING, Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from tinygpt.checkpoint import load_model
from tinygpt.engine import Engine, Limits, ModelFailed, PromptRejected, Sampling
from tinygpt.errors import ServerBusy, ServerOverloaded, TinyGPTError
from tinygpt.hardware import resolve_device
from tinygpt.model import GPT
from tinygpt.scoring import prompt_logprobs, step_logprobs
from tinygpt.server_metrics import CONTENT_TYPE_LATEST, RequestCounting, ServerMetrics
from tinygpt.tokenizer import Tokenizer

if TYPE_CHECKING:
    from tinygpt.chat import ChatTemplate

__all__ = ["APIError", "Choice", "Engine", "Limits", "LOOPBACK_HOSTS", "create_app", "hosts_for_bind", "serve"]

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")  # the Host names an app answers by default


class APIError(Exception):
    """An error answered as OpenAI's {"error": {...}} body with an HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

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


class SamplingRequest(BaseModel):
    """The fields /v1/completions and /v1/chat/completions share: the model and how to sample."""

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)  # not OpenAI's, but other local servers accept it too
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None


class CompletionRequest(SamplingRequest):
    """The fields of OpenAI's POST /v1/completions that this server can honour."""

    prompt: str | list[str] = ""
    max_tokens: int | None = Field(16, ge=0, description=MAX_TOKENS_DESCRIPTION)
    echo: bool = False  # the prompt before the completion's text (and its tokens' logprobs, with logprobs)
    logprobs: int | None = Field(None, ge=0)  # the top-N alternatives of each token (at most Limits.max_alternatives)
    # accepted only at their neutral values: the server cannot honour anything else
    best_of: int | None = None
    suffix: str | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None


def check_stops(stop: str | list[str] | None) -> list[str]:
    """A request's stop sequences as a list; APIError 400 unless there are at most 4, none empty."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise APIError(400, "stop takes up to 4 non-empty sequences", param="stop")
    return stops


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


class TokenLogprobs:
    """One choice's `logprobs`, as OpenAI's completions API shapes them: four lists with an
    entry per token: `tokens` (as `tokenizer.display` shows them), `token_logprobs`,
    `top_logprobs` ({token: logprob} of the N most likely tokens and of the token itself, so N
    or N + 1 of them) and `text_offset`, the character where the token's text starts, counted
    from the start of the prompt whether it is echoed or not. An echoed prompt's first token
    has no prediction: its logprob and its top_logprobs are null."""

    def __init__(self):
        self.entries: list[tuple[str, float | None, dict[str, float] | None, int]] = []
        self.taken = 0  # entries already sent in a stream

    def take(self, end: int | None = None) -> dict[str, list]:
        """The entries not taken yet whose text starts before character `end` (None: all of them)."""
        first = self.taken
        while self.taken < len(self.entries) and (end is None or self.entries[self.taken][3] < end):
            self.taken += 1
        part = self.entries[first:self.taken]
        return {"tokens": [e[0] for e in part], "token_logprobs": [e[1] for e in part],
                "top_logprobs": [e[2] for e in part], "text_offset": [e[3] for e in part]}


class Completion:
    """One completion request's choices as they grow, and the bodies that report them. With
    `logprobs` (N) each generated token's logprob and top-N alternatives are recorded
    (scoring.py: the model's distribution, before the sampler's temperature, top-k or top-p);
    with `echo` the prompt comes before each choice's text, its tokens scored too."""

    def __init__(self, engine: Engine, prompt_tokens: int, stops: list[str], n: int, prompt: str = "",
                 echo: bool = False, logprobs: int | None = None, metrics: ServerMetrics | None = None,
                 route: str = "/v1/completions"):
        self.tokenizer = engine.tokenizer
        self.prompt_tokens = prompt_tokens
        self.choices = [Choice(stops) for _ in range(n)]
        self.streams = [engine.tokenizer.stream() for _ in range(n)]  # bytes to text, one per choice
        self.header = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                       "model": engine.model_id}
        self.prompt, self.echo, self.top = prompt, echo, logprobs
        self.logprobs = None if logprobs is None else [TokenLogprobs() for _ in range(n)]
        self.metrics, self.route = metrics, route
        self.started = time.perf_counter()
        self.generated = 0  # steps so far

    # -- on the model thread

    def score_prompt(self, model: GPT, ids: list[int]) -> None:
        """Record the prompt's tokens' logprobs in every choice (echo with logprobs)."""
        chosen, top_ids, top_logprobs = prompt_logprobs(model, ids, self.top)
        if not (bool(chosen.isfinite().all()) and bool(top_logprobs.isfinite().all())):
            raise ModelFailed("the model failed while scoring the prompt: its logprobs are not finite numbers "
                              "(are its weights NaN or infinite?)")
        stream, offset = self.tokenizer.stream(), 0
        entries = [(self.tokenizer.display(ids[0]), None, None, 0)]
        offset += len(stream.feed(ids[0]))
        for token, logprob, top, logprob_of_top in zip(ids[1:], chosen.tolist(), top_ids.tolist(),
                                                       top_logprobs.tolist(), strict=True):
            entries.append((self.tokenizer.display(token), logprob, self._alternatives(top, logprob_of_top,
                                                                                        token, logprob), offset))
            offset += len(stream.feed(token))
        for record in self.logprobs or []:
            record.entries.extend(entries)

    def add(self, ids: torch.Tensor, probs: torch.Tensor) -> None:
        """Append one step's tokens (runs on the model thread, step by step)."""
        if self.generated == 0 and self.metrics is not None:
            self.metrics.time_to_first_token.labels(self.route).observe(time.perf_counter() - self.started)
        self.generated += 1
        scores = None if self.logprobs is None else [t.tolist() for t in step_logprobs(ids, probs, self.top)]
        for i, (choice, stream, token) in enumerate(zip(self.choices, self.streams, ids.tolist(), strict=True)):
            if choice.finish_reason is not None:
                continue
            if scores is not None and self.logprobs is not None:
                logprob, top, logprob_of_top = scores[0][i], scores[1][i], scores[2][i]
                self.logprobs[i].entries.append((self.tokenizer.display(token), logprob, self._alternatives(
                    top, logprob_of_top, token, logprob), len(self.prompt) + len(choice.text)))
            choice.add(stream.feed(token))

    def _alternatives(self, ids: list[int], logprobs: list[float], token: int, logprob: float) -> dict[str, float]:
        top = {self.tokenizer.display(i): p for i, p in zip(ids, logprobs, strict=True)}
        top.setdefault(self.tokenizer.display(token), logprob)  # OpenAI's rule: the chosen token is always there
        return top

    # -- on the event loop

    async def prepare(self, engine: Engine, prompt_ids: list[int]) -> None:
        """What comes before generation: scoring the prompt, when the request echoes it with logprobs."""
        if self.echo and self.logprobs is not None and self.prompt:
            await engine.call(self.score_prompt, engine.model, prompt_ids, doing="scoring the prompt")

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

    def _take_logprobs(self, i: int, finish_reason: str | None) -> dict[str, list] | None:
        """Choice i's logprobs not sent yet, up to the text sent so far; after a stop, none of the
        tokens cut off with it; after the last step, all."""
        if self.logprobs is None:
            return None
        choice = self.choices[i]
        return self.logprobs[i].take(None if finish_reason == "length" else len(self.prompt) + choice.sent)

    def body(self) -> dict[str, Any]:
        """The answer to a plain (not streamed) request."""
        choices = []
        for i, c in enumerate(self.choices):
            c.sent = len(c.text)
            finish_reason = c.finish_reason or "length"
            choices.append({"index": i, "text": (self.prompt if self.echo else "") + c.text,
                            "logprobs": self._take_logprobs(i, finish_reason), "finish_reason": finish_reason})
        return {**self.header, "choices": choices, "usage": self.usage()}

    def chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        """One streamed chunk carrying these choices."""
        return {**self.header, "choices": choices}

    def opening_choices(self) -> list[dict[str, Any]]:
        """The choices of a stream's first chunk, sent before generation: the echoed prompt."""
        if not (self.echo and self.prompt):
            return []
        return [{"index": i, "text": self.prompt, "logprobs": None if self.logprobs is None else
                 self.logprobs[i].take(len(self.prompt)), "finish_reason": None} for i in range(len(self.choices))]

    def stream_choices(self, final: bool = False) -> list[dict[str, Any]]:
        """The choices of the next streamed chunk: new text, and each finish_reason once."""
        out = []
        for i, choice in enumerate(self.choices):
            if choice.reported:
                continue
            text = choice.delta(final)
            finish_reason = choice.finish_reason or ("length" if final else None)
            if text or finish_reason:
                out.append({"index": i, "text": text, "logprobs": self._take_logprobs(i, finish_reason),
                            "finish_reason": finish_reason})
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


def is_protected(path: str) -> bool:
    """Whether an API key, when set, guards path: the API (/v1/*), the playground's routes (/api/*)
    and /metrics. The page at / and its files stay open (it asks for the key), and so does /health."""
    return any(path == prefix or path.startswith(prefix + "/") for prefix in ("/v1", "/api", "/metrics"))


class APIKeyCheck:
    """ASGI middleware: answer 401 (OpenAI's `invalid_api_key` error) unless a request to a
    protected path carries `Authorization: Bearer <api_key>`. The key is compared in constant
    time, so the time of a refusal tells nothing about how much of a guess was right."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode("utf-8")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not is_protected(scope["path"]):
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.strip().partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        message = ("incorrect API key provided" if given else
                   "this server needs an API key: send the header Authorization: Bearer KEY")
        error = APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
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
               allowed_hosts: Iterable[str] | None = None, docs: bool = False, api_key: str | None = None,
               cors_origins: Iterable[str] = (), chat_template: ChatTemplate | None = None) -> FastAPI:
    """The ASGI app serving the run in run_dir (or an already loaded model and tokenizer).
    threads: torch CPU threads for the model (None: torch's default). allowed_hosts: the
    names a request's Host header may give, all of them ("*": any; default LOOPBACK_HOSTS);
    any other host gets 403. docs: serve /docs, /redoc and /openapi.json. api_key: required
    as `Authorization: Bearer KEY` on /v1/*, /api/* and /metrics (401 otherwise). cors_origins:
    the web origins whose pages may call the API (default none: no CORS headers).
    chat_template: how /v1/chat/completions renders messages (default ChatTemplate.default())."""
    # imported here: these routes build on this module's errors, completions and event stream
    from tinygpt.chat import ChatTemplate, add_chat_routes
    from tinygpt.playground import add_playground_routes

    limits = limits or Limits()
    if model is None or tokenizer is None:
        model, tokenizer = load_model(run_dir, device=resolve_device(device))
    model.eval()
    engine = Engine(model, tokenizer, Path(run_dir).resolve().name or "tinygpt", limits, threads)
    shown = {} if docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="tinyGPT", version="0.1.0", summary="a small GPT, served", **shown)
    metrics = ServerMetrics(engine)
    app.state.engine, app.state.metrics = engine, metrics
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.model_id, "active": engine.active, "queued": len(engine.waiters),
                "completed": engine.completed, "cancelled": engine.cancelled, "failed": engine.failed}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

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
        return await _completions(engine, body, request, metrics)

    add_chat_routes(app, engine, chat_template or ChatTemplate.default())
    add_playground_routes(app, engine)
    _add_middleware(app, limits, metrics, allowed_hosts, api_key, cors_origins)
    return app


def _add_middleware(app: FastAPI, limits: Limits, metrics: ServerMetrics, allowed_hosts: Iterable[str] | None,
                    api_key: str | None, cors_origins: Iterable[str]) -> None:
    """The layers around the app; the last added runs first: Host check, CORS, counting, API key, body limit."""
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    if api_key:  # before the body limit: a caller without the key cannot make the server read a body
        app.add_middleware(APIKeyCheck, api_key=api_key)
    app.add_middleware(RequestCounting, metrics=metrics)  # counts the 401s and 413s too
    if origins := list(cors_origins):
        # outside the key check: a browser's preflight carries no Authorization header, and a
        # page must be able to read a 401's body
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], expose_headers=["Retry-After"])
    # added last, so it runs first: a request for another host is refused before its body is read
    app.add_middleware(HostCheck, allowed_hosts=LOOPBACK_HOSTS if allowed_hosts is None else list(allowed_hosts))


# ----------------------------------------------------------------------------- /v1/completions


def _completion_arguments(engine: Engine, body: CompletionRequest) -> tuple[str, list[str], int]:
    """The prompt, stop sequences and max_tokens of a request that asks only for what this
    server can do; APIError otherwise."""
    if body.model != engine.model_id:
        raise APIError(404, f"model {body.model!r} is not served here; this server serves {engine.model_id!r}",
                       param="model", kind="not_found_error")
    for name, neutral in (("suffix", None), ("logit_bias", None), ("frequency_penalty", 0.0),
                          ("presence_penalty", 0.0)):
        if getattr(body, name) not in (neutral, {}):
            raise APIError(400, f"{name} is not supported by this server", param=name)
    if body.logprobs is not None and body.logprobs > engine.limits.max_alternatives:
        raise APIError(400, f"logprobs is {body.logprobs}; this server returns at most "
                            f"{engine.limits.max_alternatives} alternatives per token", param="logprobs")
    if body.best_of not in (None, 1, body.n):
        raise APIError(400, "best_of is not supported by this server", param="best_of")
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise APIError(400, "send one prompt per request (a list of exactly one string)", param="prompt")
        prompt = prompt[0]
    stops = check_stops(body.stop)
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    check_sampling(engine.limits, max_tokens, body.n)
    return prompt, stops, max_tokens


async def _completions(engine: Engine, body: CompletionRequest, request: Request, metrics: ServerMetrics | None):
    prompt, stops, max_tokens = _completion_arguments(engine, body)
    prompt_ids = engine.encode_prompt(prompt)
    sampling = Sampling(max_tokens, body.temperature, body.top_k or None, body.top_p, body.seed, body.n)
    # the prompt's own tokens: an empty prompt counts none, though generation starts from a newline
    completion = Completion(engine, len(prompt_ids) if prompt else 0, stops, body.n, prompt=prompt, echo=body.echo,
                            logprobs=body.logprobs, metrics=metrics)
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    return await run_completion(engine, request, prompt_ids, sampling, completion, body.stream, include_usage)


async def run_completion(engine: Engine, request: Request, prompt_ids: list[int], sampling: Sampling,
                         completion: Completion, stream: bool, include_usage: bool):
    """Answer a completion (of either API): admitted, its prompt scored if asked, generated,
    then as one body or as a stream of chunks."""
    if stream:
        return await event_stream(_completion_events(engine, prompt_ids, sampling, completion, include_usage))
    async with engine.slot():
        await completion.prepare(engine, prompt_ids)
        if sampling.max_tokens > 0:
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
            await completion.prepare(engine, prompt_ids)
            if out := completion.opening_choices():
                yield sse(completion.chunk(out))
            if sampling.max_tokens > 0:
                async with aclosing(engine.steps(prompt_ids, sampling, completion.add,
                                                 completion.all_stopped)) as steps:
                    async for _ in steps:
                        if out := completion.stream_choices():
                            yield sse(completion.chunk(out))
        except Exception as error:  # admitted: the stream ends with an error event and [DONE]
            failure = error
    if failure is not None:
        yield stream_failure(failure)
        return
    completion.finish()
    if out := completion.stream_choices(final=True):
        yield sse(completion.chunk(out))
    if include_usage:
        yield sse({**completion.chunk([]), "usage": completion.usage()})
    yield DONE


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          limits: Limits | None = None, threads: int | None = 1, log_level: str = "info",
          allow_hosts: Iterable[str] = (), docs: bool = False, api_key: str | None = None,
          cors_origins: Iterable[str] = (), chat_template: str | Path | None = None) -> None:
    """Load the run and serve it with uvicorn until interrupted. Requests must name host
    (and the loopback names, when host is loopback or every address) or one of allow_hosts
    ("*": any) in their Host header; listening beyond loopback prints a warning on stderr.
    docs: serve /docs, /redoc and /openapi.json. api_key, cors_origins: as for create_app.
    chat_template: a template file for /v1/chat/completions (chat.py describes it)."""
    import uvicorn

    from tinygpt.chat import ChatTemplate

    template = None if chat_template is None else ChatTemplate.load(chat_template)  # its errors before the model loads

    hosts = hosts_for_bind(host)
    hosts += [name for name in map(host_name, allow_hosts) if name not in hosts]
    app = create_app(run_dir, device=device, limits=limits, threads=threads, allowed_hosts=hosts, docs=docs,
                     api_key=api_key, cors_origins=cors_origins, chat_template=template)
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

"""`POST /v1/chat/completions`: OpenAI's chat API over a model that only continues text.

A tinyGPT model has no chat format: it was trained on whatever text it was given (plays,
notes, code) and knows no roles. The chat template turns the messages into one text for it
to continue, and says where its reply ends. The template is a JSON file (`tinygpt serve
--chat-template FILE`) of plain strings:

    {"system": "{content}\\n\\n", "user": "USER:\\n{content}\\n\\n", "assistant": "ASSISTANT:\\n{content}\\n\\n",
     "generation": "ASSISTANT:\\n", "stop": ["\\n\\n"]}

A key left out is an empty string (no "stop": the reply runs to max_tokens). Each message
becomes its role's string with every `{content}` replaced by the message's
content (nothing else in a template or a message is interpreted: no code, no attribute
lookups, and a message holding "{content}" stays as it is); the texts of all messages are
joined in order and followed by "generation", where the model's reply begins. The reply
ends at any of the template's "stop" strings (plus the request's own `stop`), cut off as in
/v1/completions. "developer" messages (OpenAI's newer name for system) use "system". The
default above reads like a play: a speaker's name, a colon, a speech, a blank line, which
is the shape a char model trained on Shakespeare continues best.

Messages must be a non-empty list of objects with a `role` (system, developer, user or
assistant) and a string `content`; anything else is a 400 naming the message and field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from pydantic import Field

from tinygpt.engine import Engine, PromptRejected, Sampling
from tinygpt.errors import TinyGPTError
from tinygpt.serve import (
    MAX_TOKENS_DESCRIPTION,
    APIError,
    Completion,
    SamplingRequest,
    check_sampling,
    check_stops,
    run_completion,
)

ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"developer": "system"}


class ChatTemplate:
    """How messages become the model's prompt, and where its reply stops (see the module docstring)."""

    def __init__(self, system: str, user: str, assistant: str, generation: str, stop: list[str]):
        self.roles = {"system": system, "user": user, "assistant": assistant}
        self.generation, self.stop = generation, stop

    @classmethod
    def default(cls) -> ChatTemplate:
        return cls("{content}\n\n", "USER:\n{content}\n\n", "ASSISTANT:\n{content}\n\n", "ASSISTANT:\n", ["\n\n"])

    @classmethod
    def load(cls, path: str | Path) -> ChatTemplate:
        """Read a template file; TinyGPTError, naming the file and what is wrong, for anything else."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise TinyGPTError(f"cannot read the chat template {path}: {e.strerror or e}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TinyGPTError(f"the chat template {path} is not a JSON file ({e})") from None
        keys = (*ROLES, "generation")
        if not isinstance(data, dict) or set(data) - {*keys, "stop"}:
            raise TinyGPTError(f"the chat template {path} must be a JSON object with the keys "
                               f"{', '.join(keys)} and optionally stop")
        strings = {key: data.get(key, "") for key in keys}
        stop = data.get("stop", [])
        if not all(isinstance(s, str) for s in strings.values()) or not isinstance(stop, list) or not all(
                isinstance(s, str) and s for s in stop):
            raise TinyGPTError(f"the chat template {path}: {', '.join(keys)} must be strings and stop a list of "
                               "non-empty strings")
        return cls(**strings, stop=stop)

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt for these (checked) messages: each through its role's string, then "generation"."""
        parts = [self.roles[m["role"]].replace("{content}", m["content"]) for m in messages]
        return "".join(parts) + self.generation


def checked_messages(messages: Any) -> list[dict[str, str]]:
    """The messages as {role, content} pairs of strings, roles normalised; APIError 400 otherwise."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise APIError(400, f"{where} must be an object with a role and a content", param=where)
        role = message.get("role")
        if role is None:
            raise APIError(400, f"{where} has no role", param=f"{where}.role")
        role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in ROLES:
            raise APIError(400, f"{where}.role is {str(role)[:50]!r}; this server takes system, developer, user "
                                "and assistant messages", param=f"{where}.role")
        content = message.get("content")
        if not isinstance(content, str):
            kind = "missing" if content is None else f"a {type(content).__name__}"
            raise APIError(400, f"{where}.content must be a string (it is {kind}): this model reads text only",
                           param=f"{where}.content")
        out.append({"role": role, "content": content})
    return out


class ChatRequest(SamplingRequest):
    """The fields of OpenAI's POST /v1/chat/completions that this server can honour."""

    messages: Any = None  # checked by checked_messages, for 400s that name the message at fault
    max_tokens: int | None = Field(None, ge=0, description=MAX_TOKENS_DESCRIPTION)
    max_completion_tokens: int | None = Field(None, ge=0, description=MAX_TOKENS_DESCRIPTION)
    # accepted only at their neutral values
    logprobs: bool = False
    top_logprobs: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


class ChatCompletion(Completion):
    """A chat completion's choices, reported as OpenAI's chat.completion(.chunk) objects."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.header = {**self.header, "id": "chat" + self.header["id"], "object": "chat.completion.chunk"}
        self.usage_in_chunks = False  # stream_options.include_usage: every chunk carries "usage": null

    def chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {**self.header, "choices": choices, **({"usage": None} if self.usage_in_chunks else {})}

    def opening_choices(self) -> list[dict[str, Any]]:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(len(self.choices))]

    def stream_choices(self, final: bool = False) -> list[dict[str, Any]]:
        return [{"index": c["index"], "delta": {"content": c["text"]} if c["text"] else {}, "logprobs": None,
                 "finish_reason": c["finish_reason"]} for c in super().stream_choices(final)]

    def body(self) -> dict[str, Any]:
        return {**self.header, "object": "chat.completion", "choices": [
            {"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
             "finish_reason": c.finish_reason or "length"} for i, c in enumerate(self.choices)],
                "usage": self.usage()}


def _chat_arguments(engine: Engine, body: ChatRequest, template: ChatTemplate) -> tuple[str, list[str], int]:
    if body.model != engine.model_id:
        raise APIError(404, f"model {body.model!r} is not served here; this server serves {engine.model_id!r}",
                       param="model", kind="not_found_error")
    for name, neutral in (("logprobs", False), ("top_logprobs", None), ("logit_bias", None), ("tools", None),
                          ("response_format", None), ("frequency_penalty", 0.0), ("presence_penalty", 0.0)):
        if getattr(body, name) not in (neutral, {}, []):
            raise APIError(400, f"{name} is not supported by this server's chat completions", param=name)
    prompt = template.render(checked_messages(body.messages))
    stops = check_stops(body.stop) + template.stop
    max_tokens = next((m for m in (body.max_completion_tokens, body.max_tokens) if m is not None),
                      engine.limits.max_tokens)  # no limit asked: as many as the server allows
    return prompt, stops, max_tokens


def add_chat_routes(app: FastAPI, engine: Engine, template: ChatTemplate) -> None:
    """Register POST /v1/chat/completions on app, rendering messages with template."""

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        prompt, stops, max_tokens = _chat_arguments(engine, body, template)
        check_sampling(engine.limits, max_tokens, body.n)
        try:
            prompt_ids = engine.encode_prompt(prompt)
        except PromptRejected as e:
            raise APIError(400, f"the messages, rendered by the chat template, are no prompt for this model: {e}",
                           param="messages") from None
        sampling = Sampling(max_tokens, body.temperature, body.top_k or None, body.top_p, body.seed, body.n)
        completion = ChatCompletion(engine, len(prompt_ids), stops, body.n, metrics=app.state.metrics,
                                    route="/v1/chat/completions")
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        completion.usage_in_chunks = include_usage
        return await run_completion(engine, request, prompt_ids, sampling, completion, body.stream, include_usage)

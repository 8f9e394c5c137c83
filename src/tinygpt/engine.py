"""The serving engine: one model, the thread it runs on, and the queue in front of it.

It knows nothing of HTTP. `serve.py` (the OpenAI-compatible adapter) and `playground.py`
(the browser's routes) parse a request, then drive the engine:

1. `encode_prompt` turns the prompt into token ids, or raises `PromptRejected`. The engine
   serves either tokenizer (character or byte-level BPE) through their shared interface:
   it counts and generates tokens, and limits a prompt's length in characters.
2. `slot()` admits the request: a FIFO of `Limits.max_active` slots. Up to `max_queue`
   more requests wait for one; beyond that `slot()` raises `ServerBusy`, and a request
   that waits longer than `queue_timeout` gets `ServerOverloaded`. Both carry a
   `retry_after` in seconds. The adapter answers these as 400, 429 and 503.
3. `steps` generates, `attention` reads attention maps. Every model call runs on one
   dedicated model thread (`Engine.executor`, a single worker) in time slices of
   `Limits.time_slice` seconds, so concurrent requests take turns over one model instance,
   and an attention request never runs in the middle of a generation step (model.py's
   attention recorder is switched on for the whole model).
4. A request that stops asking (its client left) ends its generation within one time
   slice: the model thread only works when the event loop asks it for the next slice.
5. When the model itself fails (it raises on the model thread, or its probabilities or
   attention weights are not finite numbers, as with NaN weights) the request gets
   `ModelFailed`, whose message names what failed (the traceback goes to the log, not to
   the client). Its slot is released as for any other ending, and the model thread and
   the engine go on serving the next request.

Scheduling (who gets the model thread, for how long, on how many rows) lives here only.
The per-request text state of a completion (`Choice`: stop sequences, text held back from
the stream) stays in the adapter: it implements OpenAI's rules on decoded text, while the
engine deals in token ids and probabilities and learns that a request is done through the
`stop_early` callback it is given.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import torch

from tinygpt.errors import ServerBusy, ServerOverloaded, TinyGPTError
from tinygpt.generate import generate_ids
from tinygpt.model import GPT
from tinygpt.tokenizer import Tokenizer, UnknownCharacterError

BUSY_RETRY_AFTER = 1  # seconds a client refused at a full queue is told to wait
OVERLOADED_RETRY_AFTER = 5  # seconds a client that timed out in the queue is told to wait

log = logging.getLogger(__name__)


class PromptRejected(TinyGPTError):
    """A prompt the engine cannot take: longer than `Limits.max_prompt_chars`, or holding
    characters outside a character tokenizer's vocabulary (HTTP 400 on `prompt`). A BPE
    encodes any text."""


class ModelFailed(TinyGPTError):
    """The model failed on a request: it raised on the model thread, or produced numbers
    that are not finite (NaN weights, say). The request ends (HTTP 500); the engine does not."""


def _describe(error: BaseException) -> str:
    """The exception's type and the first line of its message: what failed, without a traceback."""
    first_line = (str(error).strip().splitlines() or [""])[0][:300]
    return f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how much work the server takes on at once."""

    max_prompt_chars: int = 8192
    max_tokens: int = 1024  # the cap on max_tokens (tokens generated per choice)
    max_n: int = 8  # the cap on n (choices per request)
    max_alternatives: int = 20  # the cap on top-k alternatives in /api/generate
    max_body_bytes: int = 65536
    max_active: int = 8  # requests generating at once (interleaved step by step)
    max_queue: int = 64  # requests waiting for a slot; more get ServerBusy
    queue_timeout: float = 60.0  # seconds a request may wait for a slot before ServerOverloaded
    time_slice: float = 0.02  # seconds of generation a request gets before the next one's turn


@dataclasses.dataclass
class Sampling:
    """How one request samples: the arguments of `generate_ids`, and n rows of them."""

    max_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int | None
    n: int


class Engine:
    """One model, one model thread, and the FIFO that admits requests to it."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, model_id: str, limits: Limits,
                 threads: int | None = 1):
        self.model, self.tokenizer, self.model_id, self.limits = model, tokenizer, model_id, limits
        # Torch's CPU thread count is per calling thread. One is the default: a small model at
        # batch 1 gains little from more, and on a busy machine the extra threads wait for each
        # other at every operation (BENCHMARKS.md, "Serving").
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tinygpt-model",
                                           initializer=torch.set_num_threads if threads else None,
                                           initargs=(threads,) if threads else ())
        self.active = 0
        self.waiters: collections.deque[asyncio.Future] = collections.deque()
        self.completed = 0
        self.cancelled = 0
        self.failed = 0  # requests the model failed (ModelFailed)

    # -- admission: a FIFO semaphore made of futures, so it binds to no particular event loop

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the `max_active` slots for the body of the `async with`."""
        limits = self.limits
        if self.active >= limits.max_active:
            if len(self.waiters) >= limits.max_queue:
                busy = ServerBusy(f"server busy: {self.active} requests running and {len(self.waiters)} queued; "
                                  "retry shortly")
                busy.retry_after = BUSY_RETRY_AFTER
                raise busy
            await self._wait_for_slot()
            # the releasing request handed its slot straight to us: `active` already counts it
        else:
            self.active += 1
        try:
            yield
        finally:
            self._release()

    async def _wait_for_slot(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.limits.queue_timeout)
        except BaseException as e:
            if waiter.done() and not waiter.cancelled():
                self._release()  # the slot was handed over just as we gave up: pass it on
            else:
                waiter.cancel()
                self.waiters.remove(waiter)
            if isinstance(e, asyncio.TimeoutError):  # not yet the builtin TimeoutError on 3.10
                overloaded = ServerOverloaded(
                    f"server overloaded: waited {self.limits.queue_timeout:g} s for a free slot")
                overloaded.retry_after = OVERLOADED_RETRY_AFTER
                raise overloaded from None
            raise

    def _release(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # hand the slot over without decrementing
                return
        self.active -= 1

    async def call(self, function: Callable, *args, doing: str = "running") -> Any:
        """Run function(*args) on the model thread. A TinyGPTError it raises arrives as it is;
        any other exception is logged with its traceback and arrives as ModelFailed, whose
        message says what the model was doing and what failed."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)
        except ModelFailed:
            self.failed += 1
            raise
        except TinyGPTError:
            raise
        except Exception as e:
            self.failed += 1
            log.error("tinygpt: the model failed while %s", doing, exc_info=e)
            raise ModelFailed(f"the model failed while {doing}: {_describe(e)}") from e

    # -- generation

    def encode_prompt(self, prompt: str) -> list[int]:
        """The prompt's token ids; raises PromptRejected when it is too long or not in the vocabulary."""
        if len(prompt) > self.limits.max_prompt_chars:
            raise PromptRejected(f"prompt is {len(prompt)} characters; this server accepts at most "
                                 f"{self.limits.max_prompt_chars}")
        try:
            ids = self.tokenizer.encode(prompt)
        except UnknownCharacterError as e:
            raise PromptRejected(f"prompt has {e}") from None
        # an empty prompt starts where `tinygpt sample` starts one (a newline)
        return ids or self.tokenizer.start_ids()

    async def steps(self, prompt_ids: list[int], sampling: Sampling, convert: Callable[..., Any],
                    stop_early: Callable[[], bool] | None = None) -> AsyncIterator[list[Any]]:
        """Yield lists of convert(ids (n,), probs (n, V)), one per generated step, a time
        slice at a time; stop when the steps run out or stop_early() says so. convert and
        stop_early run on the model thread. ModelFailed when the model raises or its
        probabilities are not finite numbers."""
        iterator = generate_ids(
            self.model, prompt_ids, sampling.max_tokens, temperature=sampling.temperature, top_k=sampling.top_k,
            top_p=sampling.top_p, seed=sampling.seed, num_samples=sampling.n, with_probs=True,
        )

        failure: list[Exception] = []  # a failure that came after some steps of a slice

        def time_slice() -> tuple[list[Any], bool]:
            # Several steps per trip to the model thread: one trip costs two thread switches,
            # which on a busy machine cost more than a step of a small model.
            if failure:
                raise failure.pop()
            results: list[Any] = []
            deadline = time.perf_counter() + self.limits.time_slice
            try:
                for ids, probs in iterator:
                    # a greedy step takes the argmax of NaN without complaint: refuse to return garbage
                    if not bool(probs.isfinite().all()):
                        raise ModelFailed("the model failed while generating: its probabilities are not finite "
                                          "numbers (are its weights NaN or infinite?)")
                    results.append(convert(ids, probs))
                    if stop_early is not None and stop_early():
                        return results, True
                    if time.perf_counter() >= deadline:
                        return results, False
            except Exception as e:
                if not results:
                    raise
                failure.append(e)  # deliver the steps made so far; the next trip raises it
                return results, False
            return results, True

        finished = failed = False
        try:
            while not finished:
                try:
                    results, finished = await self.call(time_slice, doing="generating")
                except ModelFailed:
                    failed = True
                    raise
                if results:
                    yield results
        finally:
            # close the generator on the model thread, after any step still running there
            self.executor.submit(iterator.close)
            if finished:
                self.completed += 1
            elif not failed:
                self.cancelled += 1

    def attention(self, text: str, query: int | None, following: Sequence[int] = ()) -> dict[str, Any]:
        """Attention weights over the last block_size tokens of text (followed by the token ids
        `following`, as a generation appends them), the window the model sees; runs on the
        model thread. An empty text is what a generation with an empty prompt starts from.
        `tokens` are those tokens as readable strings, `offset` counts the tokens before them,
        and `query` (negative: from the end) picks one position's row, all in tokens.
        ModelFailed when the weights are not finite numbers."""
        # A generation's tokens, re-encoded from their text, may come out as other tokens (a
        # BPE can merge across them, and bytes of an unfinished character are no text yet):
        # `following` gives the ones the model saw.
        ids = (self.tokenizer.encode(text) or self.tokenizer.start_ids()) + list(following)
        shown = ids[-self.model.config.block_size:]
        maps = self.model.attention_maps(torch.tensor([shown], device=next(self.model.parameters()).device))
        maps = maps.float()  # (L, nh, T, T)
        if not bool(maps.isfinite().all()):  # JSON has no NaN: say so rather than fail to answer
            raise ModelFailed("the model failed while reading attention: its attention weights are not finite "
                              "numbers (are its weights NaN or infinite?)")
        if query is not None:
            maps = maps[:, :, query, :]  # (L, nh, T)
        return {
            "tokens": [self.tokenizer.display(i) for i in shown],
            "offset": len(ids) - len(shown),
            "query": None if query is None else query % len(shown),
            "n_layer": maps.size(0),
            "n_head": maps.size(1),
            "weights": maps.double().mul(10000).round().div(10000).tolist(),
        }

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
   dedicated model thread (`Engine.executor`, a single worker). Generation is continuously
   batched (batching.py): the running requests' choices are rows of one batch, and each
   trip to the model thread runs steps of the whole batch, each step one token for every
   request at once, for `Limits.time_slice` seconds or until a request ends. A request
   joins the batch at the next step (its prefill), leaves it when done, and its rows go to
   the next one, so a short request never waits for a long one. Whichever waiting request
   asks first starts the next trip; an attention request runs between trips, never in the
   middle of a step (model.py's attention recorder is switched on for the whole model).
4. A request that stops asking (its client left) is given up at once: its admission slot
   is released, and its rows leave the batch before the next step; the others go on.
5. When the model itself fails (it raises on the model thread, or its probabilities or
   attention weights are not finite numbers, as with NaN weights) the request gets
   `ModelFailed`, whose message names what failed (the traceback goes to the log, not to
   the client). What a failure ends:
   - its own request only: its prefill failing (the forward pass, or room for its rows in
     the cache), its draw from its own generator failing, its probabilities not finite, its
     `convert` or `stop_early` raising, or its not being able to join the batch;
   - every request of that step that samples alike (the same temperature, top-k and top-p):
     their sampling distribution (`sampling_probs`) is computed once for all of them;
   - every request of that step's batched decode: one forward pass for all of them;
   - every request in the batch: any other failure of a trip; the engine then starts a
     fresh batch.
   Their slots are released as for any other ending, and the model thread and the engine go
   on serving the next request.

Scheduling (who gets the model thread, for how long, which requests are in the batch) lives here only.
The per-request text state of a completion (`Choice`: stop sequences, text held back from
the stream) stays in the adapter: it implements OpenAI's rules on decoded text, while the
engine deals in token ids and probabilities and learns that a request is done through the
`stop_early` callback it is given.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import torch

from tinygpt.batching import Batch, Step
from tinygpt.errors import ServerBusy, ServerOverloaded, TinyGPTError
from tinygpt.generate import check_sampling
from tinygpt.model import GPT
from tinygpt.tokenizer import Tokenizer, UnknownCharacterError

BUSY_RETRY_AFTER = 1  # seconds a client refused at a full queue is told to wait
OVERLOADED_RETRY_AFTER = 5  # seconds a client that timed out in the queue is told to wait
STREAM_SLICES = 5  # time slices a request's steps are held by default (BENCHMARKS.md "Serving")

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
    max_active: int = 32  # requests generating at once: the batch (one decode step for all)
    max_queue: int = 64  # requests waiting for a slot; more get ServerBusy
    queue_timeout: float = 60.0  # seconds a request may wait for a slot before ServerOverloaded
    time_slice: float = 0.02  # seconds of batch steps per trip to the model thread
    # seconds a request's steps are held before they go out together (its first step and its
    # end go at once): each delivery costs the server and the client a chunk of work.
    # None: STREAM_SLICES time slices (so time_slice 0 delivers every step as it comes)
    stream_interval: float | None = None


@dataclasses.dataclass
class Sampling:
    """How one request samples: the arguments of `generate_ids`, and n rows of them."""

    max_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int | None
    n: int


class _Request:
    """One request's generation as the two threads share it: the model thread pushes its
    steps (or its failure, or its end), the event loop takes them; a lock keeps each
    exchange whole. `cancelled` is set by the event loop when the request is given up."""

    def __init__(self, prompt_ids: list[int], sampling: Sampling, convert: Callable[..., Any],
                 stop_early: Callable[[], bool] | None):
        self.prompt_ids, self.sampling, self.convert, self.stop_early = prompt_ids, sampling, convert, stop_early
        self.lock = threading.Lock()
        self.results: list[Any] = []
        self.error: Exception | None = None
        self.done = False
        self.cancelled = False
        self.generation = None  # its place in the batch (model thread only)

    def push(self, result: Any) -> None:
        with self.lock:
            self.results.append(result)

    def finish(self) -> None:
        with self.lock:
            self.done = True

    def fail(self, error: Exception) -> None:
        with self.lock:
            self.error, self.done = error, True

    def take(self, hold: bool = False) -> tuple[list[Any], Exception | None, bool]:
        """The steps made since the last take; then, once they are all taken, the error or
        the end. hold: keep the steps for a later take, unless the request has ended."""
        with self.lock:
            if hold and not self.done:
                return [], None, False
            results, self.results = self.results, []
            return results, self.error, self.done


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
        self.generated_tokens = 0  # tokens generated and delivered, every choice counted
        self.batch = Batch(model)  # the running generations (model thread only)
        self._joining: collections.deque[_Request] = collections.deque()  # admitted, not yet in the batch
        self._trip: Future | None = None  # the batch's trip on the model thread, running or last
        self._trip_awaitable: tuple[Future, asyncio.AbstractEventLoop, asyncio.Future] | None = None

    @property
    def active_sequences(self) -> int:
        """Rows (choices) of the generations in the running batch. Counted from the generations,
        not from the cache's rows in use: those dip while a generation whose context slid
        re-prefills on the model thread, and this is read from the event loop."""
        return sum(generation.n for generation in list(self.batch.generations))

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
        """Yield lists of convert(ids (n,), probs (n, V)), one per generated step, as the
        batch makes them: the first step at once, then what came in each `stream_interval`,
        and the rest at the end; stop when the steps run out or stop_early() says so. convert
        and stop_early run on the model thread. ModelFailed when the model raises or its
        probabilities are not finite numbers; ConfigError for sampling arguments out of range."""
        check_sampling(sampling.max_tokens, sampling.temperature, sampling.top_k, sampling.top_p, sampling.seed,
                       sampling.n)
        if not prompt_ids:
            raise ValueError("generation needs a prompt of at least one token")
        request = _Request(prompt_ids, sampling, convert, stop_early)
        finished = failed = False
        try:
            if sampling.max_tokens == 0:
                finished = True
                return
            self._joining.append(request)
            interval = self.limits.stream_interval
            interval = STREAM_SLICES * self.limits.time_slice if interval is None else interval
            last_yield = None
            while True:
                results, error, done = request.take(
                    hold=last_yield is not None and time.perf_counter() - last_yield < interval)
                if results:
                    last_yield = time.perf_counter()
                    yield results
                elif error is not None:
                    failed = True
                    self.failed += 1
                    raise error
                elif done:
                    finished = True
                    return
                else:
                    await self._advance()
        finally:
            if finished:
                self.completed += 1
            elif not failed:
                self.cancelled += 1
                request.cancelled = True
                self.executor.submit(self._admit)  # free its rows now, not at the next trip

    async def _advance(self) -> None:
        """Wait for the next trip of the batch on the model thread, starting one unless one
        is running: whichever request asks first drives the batch for all."""
        trip = self._trip
        if trip is None or trip.done():
            trip = self._trip = self.executor.submit(self._run_trip)
        # One asyncio future per trip, which every waiting request awaits: a future wrapped
        # for each of them would wake the event loop once per request at the trip's end.
        loop = asyncio.get_running_loop()
        wrapped = self._trip_awaitable
        if wrapped is None or wrapped[0] is not trip or wrapped[1] is not loop:
            wrapped = self._trip_awaitable = (trip, loop, asyncio.wrap_future(trip))
        # shielded: a request that is cancelled while it waits must not cancel the others' trip
        await asyncio.shield(wrapped[2])

    # -- the model thread's side of generation

    def _admit(self) -> None:
        """Requests that joined enter the batch (their prefill comes at the next step); those
        given up leave it."""
        while self._joining:
            request = self._joining.popleft()
            if not request.cancelled:
                s = request.sampling
                try:
                    request.generation = self.batch.add(request.prompt_ids, s.n, s.max_tokens, s.temperature,
                                                        s.top_k, s.top_p, s.seed, owner=request)
                except Exception as error:  # popped but not in the batch: only this request knows it failed
                    log.error("tinygpt: the model failed while adding a request to the batch", exc_info=error)
                    request.fail(error if isinstance(error, TinyGPTError) else ModelFailed(
                        f"the model failed while adding the request to the batch: {_describe(error)}"))
        for generation in list(self.batch.generations):
            if generation.owner.cancelled:
                self.batch.remove(generation)

    def _run_trip(self) -> None:
        """Steps of the whole batch until a time slice has passed (or no request is left).
        Several steps per trip: one trip costs two thread switches, which on a busy machine
        cost more than a step of a small model. A request that ends waits for the end of the
        trip; one that joins enters the batch at the next step."""
        deadline = time.perf_counter() + self.limits.time_slice
        try:
            while True:
                self._admit()
                if not self.batch.generations:
                    return
                for step in self.batch.step():
                    self._deliver(step)
                if time.perf_counter() >= deadline:
                    return
        except Exception as error:  # a failure outside any one request: fail them all, keep serving
            log.error("tinygpt: the batch failed", exc_info=error)
            failure = ModelFailed(f"the model failed while generating: {_describe(error)}")
            for generation in list(self.batch.generations):
                generation.owner.fail(failure)
            # The failure may have left the batch's rows inconsistent, so removing its
            # generations one by one could fail again: drop the whole batch instead.
            with contextlib.suppress(Exception):
                self.batch.modes.close()  # the model's mode back, the decode weight copies dropped
            self.batch = Batch(self.model)

    def _deliver(self, step: Step) -> None:
        """Hand one step to its request: convert it and ask stop_early; an ended request leaves the batch."""
        request: _Request = step.generation.owner
        if request.cancelled:
            self.batch.remove(step.generation)
            return
        error = step.error
        if error is None:
            try:
                # a greedy step takes the argmax of NaN without complaint: refuse to return garbage
                if not step.finite:
                    raise ModelFailed("the model failed while generating: its probabilities are not finite "
                                      "numbers (are its weights NaN or infinite?)")
                request.push(request.convert(step.ids, step.probs))
                self.generated_tokens += step.ids.numel()
                stopped = request.stop_early is not None and request.stop_early()
            except Exception as e:
                error = e
        if error is not None:
            if not isinstance(error, TinyGPTError):
                log.error("tinygpt: the model failed while generating", exc_info=error)
                error = ModelFailed(f"the model failed while generating: {_describe(error)}")
            request.fail(error)
            self.batch.remove(step.generation)
        elif stopped or step.done:
            request.finish()
            self.batch.remove(step.generation)

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

"""Continuous batching: many generations, one decode step for all of them.

A `Batch` holds the generations a server is running. Each `step()` moves every one of them
on by one token: a generation that has just joined (or whose learned-position context has
just slid, generate.py's re-prefill rule) runs its prefill on its own, and all the others
run one decode step together, as one batch of rows through the model. A generation joins
the batch at the step after its prefill and leaves when it is done, and its rows go to the
next one, so a short generation never waits for a long one.

Each generation follows generate.py's context-window rule on its own (`window_start`), and
samples from its own rows with its own generator, temperature, top-k and top-p. What is the
same for many rows is done once for them: each step's probabilities (and the check that
they are finite numbers), and the sampling distribution of all the rows that sample alike;
only the draw is per generation, from its own generator.

Rows. The cache (`SlotCache`) holds one row per choice (a request with n choices has n
rows). The rows in use are always 0..count-1, so a decode step reads the cache as a view,
without copying it: a generation that leaves moves the last rows into its place. A prefill
writes into the rows just past count, through a `KVCache` sharing those rows' memory.

Numerics. Alone in the batch, a generation runs exactly the operations `generate_ids` runs
(the same prefill; its decode step is generate.py's own, through a `KVCache` over its rows,
its position one number: no per-row slots, mask or gather; at one row the decode weight
copies of speed.decoding apply as they do there), so it produces the same ids and
probabilities, bit for bit. Batched with others, its rows go
through matrix products of more rows, and attend through a mask when the rows hold
different numbers of keys: the sums are the same numbers added in another order, so its
probabilities differ from those it gets alone in the last bits (tests/test_batching.py
bounds the difference). A sampled token can only differ when a draw lands that close to the
edge between two tokens.

Everything here runs on one thread (the engine's model thread); nothing is locked.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch

from tinygpt import speed
from tinygpt.config import ModelConfig
from tinygpt.generate import BUFFER_STEPS, KVCache, eval_mode, first_start, sampling_probs, window_start
from tinygpt.model import GPT

FIRST_ROWS = 8  # rows the cache has room for before it first doubles


class SlotCache:
    """Keys and values of every layer for many sequences, one row each: (L, rows, nh, block, hd).

    A row is a `KVCache` row of its own: position p of a row lives in slot (p - first) %
    block_size, `first` being that row's first position of its last prefill, so each row
    rolls on its own. `decode_step` prepares the per-row slots of one decode step; `store`
    (called by every layer) then writes each row's new key and returns the keys to attend
    to, with a mask when the rows hold different numbers of keys.
    """

    def __init__(self, config: ModelConfig, device, dtype: torch.dtype):
        self.shape = (config.n_layer, 0, config.n_head, config.block_size, config.n_embd // config.n_head)
        self.size = config.block_size
        self.device, self.dtype = device, dtype
        self.keys = self.values = torch.zeros(self.shape, device=device, dtype=dtype)
        self._leading: KVCache | None = None
        self.grow(FIRST_ROWS)

    @property
    def rows(self) -> int:
        return self.keys.size(1)

    def grow(self, rows: int) -> None:
        """Room for at least `rows` rows (doubling); the rows held keep their keys."""
        if rows <= self.rows:
            return
        shape = (self.shape[0], max(rows, 2 * self.rows), *self.shape[2:])
        keys = torch.zeros(shape, device=self.device, dtype=self.dtype)  # (L, rows, nh, block, hd)
        values = torch.zeros(shape, device=self.device, dtype=self.dtype)
        keys[:, :self.rows].copy_(self.keys)
        values[:, :self.rows].copy_(self.values)
        self.keys, self.values = keys, values
        self.layer_keys, self.layer_values = keys.unbind(0), values.unbind(0)  # (rows, nh, block, hd) each
        self._leading = None  # a view of the old buffers

    def prefill_cache(self, first_row: int, count: int) -> KVCache:
        """A KVCache over rows first_row..first_row+count-1, sharing their memory."""
        rows = slice(first_row, first_row + count)
        return KVCache.sharing(self.keys[:, rows], self.values[:, rows])

    def leading(self, count: int) -> KVCache:
        """A KVCache over rows 0..count-1 (kept while those rows and buffers last: a
        generation alone in the batch decodes through it step after step)."""
        if self._leading is None or self._leading.keys.size(1) != count:
            self._leading = self.prefill_cache(0, count)
        return self._leading

    def move(self, source: int, target: int) -> None:
        """Copy row source's keys and values into row target."""
        self.keys[:, target].copy_(self.keys[:, source])
        self.values[:, target].copy_(self.values[:, source])

    def decode_step(self, positions: torch.Tensor, firsts: torch.Tensor) -> SlotCache:
        """Prepare a decode step of rows 0..A-1 at these positions (A,), whose last prefills
        started at firsts (A,); returns self, to be passed to the model as its cache."""
        offsets = positions - firsts  # (A,) positions stored in each row since its prefill
        self.count = positions.size(0)
        self.row_index = torch.arange(self.count, device=positions.device)  # (A,)
        self.slots = offsets % self.size  # (A,) where each row's new key goes
        held = (offsets + 1).clamp(max=self.size)  # (A,) keys each row attends to
        self.held = int(held.max())
        self.mask = None
        if int(held.min()) != self.held:  # rows hold different numbers of keys: mask the slots not yet written
            self.mask = (torch.arange(self.held, device=positions.device) < held[:, None]).view(self.count, 1, 1, -1)
        return self

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, start) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Store one new key/value (A, nh, 1, hd) per row at the slots decode_step chose, and
        return the keys and values (A, nh, S, hd) the rows attend to, and the mask (A, 1, 1, S)
        of the keys each row holds (None when all hold all S). `start` (the positions) is
        what decode_step was given."""
        keys, values = self.layer_keys[layer], self.layer_values[layer]
        keys[self.row_index, :, self.slots] = k[:, :, 0]  # (A, nh, hd) into each row's slot
        values[self.row_index, :, self.slots] = v[:, :, 0]
        return keys[:self.count, :, :self.held], values[:self.count, :, :self.held], self.mask


@dataclasses.dataclass(eq=False)
class Generation:
    """One request's generation: its n rows, how it samples, and where it stands."""

    tokens: torch.Tensor  # (n, capacity): the prompt, then each step's ids
    length: int  # tokens so far
    remaining: int  # steps left
    temperature: float
    top_k: int | None
    top_p: float | None
    generator: torch.Generator
    owner: Any = None  # whoever asked for it (the engine's request)
    start: int = 0  # the context is tokens[:, start:length]
    first: int = 0  # the cache's first position of the last prefill
    prefilled: bool = False
    rows: list[int] = dataclasses.field(default_factory=list)  # cache rows, choice by choice

    @property
    def n(self) -> int:
        return self.tokens.size(0)


@dataclasses.dataclass
class Step:
    """What one step made for one generation: its ids (n,) and the logits (n, V) they were
    drawn from, or the error that ended it. `done` says that it has left the batch."""

    generation: Generation
    ids: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    probs: torch.Tensor | None = None  # (n, V): the logits' softmax, as generate_ids gives it with_probs
    finite: bool = True  # whether every one of those probabilities is a finite number
    error: Exception | None = None
    done: bool = False


class Batch:
    """The generations running on one model, and their rows of one cache."""

    def __init__(self, model: GPT):
        self.model = model
        self.generations: list[Generation] = []
        self.count = 0  # rows in use: 0..count-1
        self.owners: list[tuple[Generation, int]] = []  # row -> (generation, choice)
        self.cache: SlotCache | None = None
        # eval mode and the decode weight copies, held while any generation runs
        self.modes = contextlib.ExitStack()

    @torch.inference_mode()
    def add(self, prompt: list[int], n: int, max_tokens: int, temperature: float = 1.0,
            top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
            owner: Any = None) -> Generation:
        """A new generation of n choices; its prefill runs at the next step. The arguments
        are generate_ids's, already checked (generate.check_sampling)."""
        if not prompt or max_tokens < 1:
            raise ValueError("a generation needs a prompt of at least one token and at least one step")
        parameter = next(self.model.parameters())
        generator = torch.Generator(device=parameter.device)
        if seed is None:
            generator.seed()  # a fresh random seed for this generator alone: the global RNG is not touched
        else:
            generator.manual_seed(seed)
        tokens = torch.empty((n, len(prompt) + min(max_tokens, BUFFER_STEPS)), dtype=torch.long,
                             device=parameter.device)
        tokens[:, :len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=parameter.device)
        generation = Generation(tokens, len(prompt), max_tokens, temperature, top_k, top_p, generator, owner,
                                start=first_start(self.model.config, len(prompt)))
        if self.cache is None:  # before the modes: a cache that cannot be made leaves none held
            self.cache = SlotCache(self.model.config, parameter.device, parameter.dtype)
        if not self.generations:
            self.modes.enter_context(eval_mode(self.model))
            self.modes.enter_context(speed.decoding(self.model))
        self.generations.append(generation)
        return generation

    @torch.inference_mode()
    def remove(self, generation: Generation) -> None:
        """Take a generation out of the batch (done, failed or given up); its rows are freed."""
        if generation not in self.generations:
            return
        self._free_rows(generation)
        self.generations.remove(generation)
        if not self.generations:
            self.modes.close()  # the model's mode back; the weight copies dropped (weights may change)

    def clear(self) -> None:
        for generation in list(self.generations):
            self.remove(generation)

    @property
    def rows(self) -> int:
        """Rows (choices) generating now."""
        return self.count

    def _free_rows(self, generation: Generation) -> None:
        """Free a generation's rows, keeping the rows in use at 0..count-1: the last row in
        use moves into each hole. Highest hole first: the last row is then either that hole
        itself or a row still in use."""
        for hole in sorted(generation.rows, reverse=True):
            last = self.count - 1
            if hole != last:
                self.cache.move(last, hole)
                moved, choice = self.owners[hole] = self.owners[last]
                moved.rows[choice] = hole
            self.owners.pop()
            self.count -= 1
        generation.rows = []

    def _take_rows(self, generation: Generation) -> None:
        self.cache.grow(self.count + generation.n)
        generation.rows = list(range(self.count, self.count + generation.n))
        self.owners.extend((generation, choice) for choice in range(generation.n))
        self.count += generation.n

    @torch.inference_mode()
    def step(self) -> list[Step]:
        """One token for every generation: prefills on their own, every other one in one
        decode step. Generations that are done (no steps left) or failed leave the batch."""
        config = self.model.config
        to_prefill = []
        for generation in self.generations:
            generation.start, moved = window_start(config, generation.length, generation.start)
            if moved or not generation.prefilled:
                if generation.rows:  # its context slid: it leaves its rows and prefills into new ones
                    self._free_rows(generation)
                to_prefill.append(generation)
        decoding = [g for g in self.generations if g not in to_prefill]
        # decode first: the decoding generations hold rows 0..count-1, the prefills take the next ones
        steps = self._decode(decoding) if decoding else []
        steps += [self._prefill(generation) for generation in to_prefill]
        self._draw([step for step in steps if step.error is None])
        for step in steps:
            if step.error is not None or step.generation.remaining == 0:
                step.done = True
                self.remove(step.generation)
        return steps

    def _offset(self, generation: Generation) -> int:
        # rotary positions are absolute (only distances matter); learned ones count from start
        return 0 if self.model.config.positions == "rope" else generation.start

    def _prefill(self, generation: Generation) -> Step:
        """Run a generation's context through the model into its new rows (its own batch of n)."""
        position = generation.start - self._offset(generation)
        try:
            self._take_rows(generation)  # the cache may grow: out of memory fails this generation only
            cache = self.cache.prefill_cache(generation.rows[0], generation.n)
            cache.reset(position)
            logits, _ = self.model(generation.tokens[:, generation.start:generation.length], start=position,
                                   cache=cache, last_only=True)
        except Exception as error:  # this generation fails; the others go on
            return Step(generation, error=error)
        generation.first, generation.prefilled = position, True
        logits = logits[:, -1, :]  # (n, V)
        probs = logits.float().softmax(dim=-1)  # (n, V)
        return Step(generation, logits=logits, probs=probs, finite=bool(probs.isfinite().all()))

    def _decode(self, decoding: list[Generation]) -> list[Step]:
        """One decode step of the newest token of every row of these generations, which hold
        rows 0..count-1 between them."""
        count = self.count
        try:
            if len(decoding) == 1 and decoding[0].rows == list(range(count)):
                logits = self._decode_alone(decoding[0])
            else:
                logits = self._decode_rows(decoding)
        except Exception as error:  # one forward pass for all: they all fail, the batch goes on
            return [Step(generation, error=error) for generation in decoding]
        probs = logits.float().softmax(dim=-1)  # (count, V), for every row at once
        finite = probs.isfinite().all(dim=-1).tolist()  # (count,)
        return [Step(generation, logits=_rows(logits, generation.rows), probs=_rows(probs, generation.rows),
                     finite=all(finite[row] for row in generation.rows)) for generation in decoding]

    def _decode_alone(self, generation: Generation) -> torch.Tensor:
        """The logits (n, V) of the decode step of a generation that holds every row, in
        order: generate.py's own decode step, through a KVCache over those rows."""
        cache = self.cache.leading(generation.n)
        cache.first = generation.first  # where its last prefill started, as its KVCache would hold it
        position = generation.length - 1 - self._offset(generation)
        logits, _ = self.model(generation.tokens[:, generation.length - 1:generation.length], start=position,
                               cache=cache)
        return logits[:, -1, :]  # (n, V)

    def _decode_rows(self, decoding: list[Generation]) -> torch.Tensor:
        """The logits (count, V) of the decode step of every row, each at its own position."""
        count = self.count
        ids, positions, firsts = [0] * count, [0] * count, [0] * count
        for generation in decoding:
            last = generation.tokens[:, generation.length - 1].tolist()
            position = generation.length - 1 - self._offset(generation)
            for choice, row in enumerate(generation.rows):
                ids[row], positions[row], firsts[row] = last[choice], position, generation.first
        device = generation.tokens.device
        start = torch.tensor(positions, device=device)  # (count,)
        cache = self.cache.decode_step(start, torch.tensor(firsts, device=device))
        logits, _ = self.model(torch.tensor(ids, device=device)[:, None], start=start, cache=cache)
        return logits[:, -1, :]  # (count, V)

    def _draw(self, steps: list[Step]) -> None:
        """Draw every step's next ids and append them. The rows of the generations that sample
        alike (temperature, top-k, top-p) get their distribution in one computation, row by
        row as sample_next computes it; each generation then draws from its own rows with its
        own generator, so a draw that fails (NaN probabilities, say) ends its generation only."""
        groups: dict[tuple, list[Step]] = {}
        for step in steps:
            generation = step.generation
            groups.setdefault((generation.temperature, generation.top_k, generation.top_p), []).append(step)
        for (temperature, top_k, top_p), group in groups.items():
            logits = group[0].logits if len(group) == 1 else torch.cat([step.logits for step in group])
            logits = logits.float()  # (rows, V)
            try:
                chosen = logits.argmax(dim=-1) if temperature <= 0 else None  # (rows,)
                probs = None if temperature <= 0 else sampling_probs(logits, temperature, top_k, top_p)  # (rows, V)
            except Exception as error:  # one computation for the group: it fails together
                for step in group:
                    step.error = error
                continue
            first = 0
            for step in group:
                generation = step.generation
                rows = slice(first, first + generation.n)
                first += generation.n
                try:
                    ids = chosen[rows] if probs is None else torch.multinomial(
                        probs[rows], 1, generator=generation.generator)[:, 0]  # (n,)
                except Exception as error:  # e.g. NaN probabilities: this generation fails
                    step.error = error
                    continue
                self._append(generation, ids)
                step.ids = ids

    def _append(self, generation: Generation, ids: torch.Tensor) -> None:
        if generation.length == generation.tokens.size(1):
            generation.tokens = torch.cat([generation.tokens, torch.empty_like(generation.tokens)], dim=1)
        generation.tokens[:, generation.length] = ids
        generation.length += 1
        generation.remaining -= 1


def _rows(tensor: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """tensor[rows]: a view when the rows follow each other in order (as they mostly do)."""
    if rows[-1] - rows[0] == len(rows) - 1 and rows == list(range(rows[0], rows[0] + len(rows))):
        return tensor[rows[0]:rows[0] + len(rows)]
    return tensor[rows]

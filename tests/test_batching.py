"""Continuous batching (batching.py, engine.py): requests share decode steps, and each one
gets the text it would get alone."""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch

from tinygpt.batching import FIRST_ROWS, Batch, SlotCache
from tinygpt.config import ModelConfig
from tinygpt.engine import Engine, Limits, ModelFailed, Sampling
from tinygpt.generate import generate_ids
from tinygpt.model import GPT

BLOCK = 16
# Batched rows go through products of more rows (and a mask when their rows hold different
# numbers of keys): the same numbers summed in another order. Their probabilities must stay
# this close to the ones the same request gets alone; alone they are equal bit for bit.
TOLERANCE = 1e-6

# (prompt, n, max_tokens, temperature, top_k, top_p, seed): sampled, filtered, greedy, several
# choices; all run past block_size, and one prompt is longer than the context
REQUESTS = [
    ([1, 2, 3], 1, 5 * BLOCK, 1.0, None, None, 5),
    ([4] * (2 * BLOCK), 3, 3 * BLOCK, 0.8, 12, 0.9, 6),
    ([7, 8], 2, 2 * BLOCK, 0.0, None, None, 0),
    ([9], 1, 6 * BLOCK, 1.0, None, 0.95, 8),
    ([5, 6], 2, 10, 1.2, 5, None, 9),
]


def small_model(positions: str) -> GPT:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=40, block_size=BLOCK, n_layer=3, n_head=2, n_embd=32, positions=positions)
    return GPT(config).eval()


def alone(model: GPT, request) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """What generate_ids makes for this request: each step's ids (n,) and probabilities (n, V)."""
    prompt, n, steps, temperature, top_k, top_p, seed = request
    return list(generate_ids(model, prompt, steps, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                             num_samples=n, with_probs=True))


def run_batch(model: GPT, joins: dict[int, list[int]], leaves: dict[int, list[int]] | None = None):
    """Step one Batch to the end; joins[s] are the REQUESTS that join before step s, and
    leaves[s] those taken out (given up) before it. Each request's steps, and the most rows
    any step ran."""
    batch, made, leaves = Batch(model), {}, leaves or {}
    generations, step, most_rows = {}, 0, 0
    while True:
        for index in joins.get(step, []):
            prompt, n, steps, temperature, top_k, top_p, seed = REQUESTS[index]
            generations[index] = batch.add(prompt, n, steps, temperature, top_k, top_p, seed, owner=index)
            made[index] = []
        for index in leaves.get(step, []):
            batch.remove(generations[index])
        if not batch.generations and step > max(joins):
            return made, most_rows
        for result in batch.step():
            assert result.error is None
            made[result.generation.owner].append((result.ids, result.logits.float().softmax(dim=-1)))
        most_rows = max(most_rows, batch.rows + sum(len(g.rows) == 0 for g in batch.generations))
        step += 1


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_a_request_alone_in_the_batch_makes_what_generate_ids_makes_bit_for_bit(positions):
    model = small_model(positions)
    for index, request in enumerate(REQUESTS):
        made, _ = run_batch(model, {0: [index]})
        expected = alone(model, request)
        assert len(made[index]) == len(expected) == request[2]
        for (ids, probs), (want_ids, want_probs) in zip(made[index], expected, strict=True):
            assert torch.equal(ids, want_ids) and torch.equal(probs, want_probs)


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_batched_requests_make_what_each_makes_alone(positions):
    model = small_model(positions)
    # joining at different steps: the rows hold different numbers of keys, and a learned
    # model's contexts slide (and prefill again) at different steps
    made, most_rows = run_batch(model, {0: [0, 1], 3: [2], 7: [3], 20: [4]})
    assert most_rows >= 6  # they really ran together
    for index, request in enumerate(REQUESTS):
        expected = alone(model, request)
        assert len(made[index]) == len(expected)
        for (ids, probs), (want_ids, want_probs) in zip(made[index], expected, strict=True):
            assert torch.equal(ids, want_ids)
            torch.testing.assert_close(probs, want_probs, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_requests_that_leave_free_their_rows_and_change_nothing_for_the_others(positions):
    model = small_model(positions)
    # nine rows: more than the cache's first size, so it has grown by then
    made, _ = run_batch(model, {0: [0, 1, 2, 3, 4]}, leaves={5: [1], 9: [0]})
    assert len(made[1]) == 5 and len(made[0]) == 9
    for index in (2, 3, 4):
        expected = alone(model, REQUESTS[index])
        assert [ids.tolist() for ids, _ in made[index]] == [ids.tolist() for ids, _ in expected]


def test_requests_that_sample_alike_share_one_distribution_and_keep_their_own_draws():
    model = small_model("rope")
    # the same temperature, top-k and top-p: one sampling distribution for all their rows
    alike = [([1, 2, 3], 1, 2 * BLOCK, 0.9, 8, 0.9, 1), ([1, 2, 3], 1, 2 * BLOCK, 0.9, 8, 0.9, 2),
             ([4, 5], 2, BLOCK, 0.9, 8, 0.9, 3), ([6], 1, BLOCK, 0.9, 8, 0.9, 4)]
    batch = Batch(model)
    generations = [batch.add(prompt, n, steps, temperature, top_k, top_p, seed, owner=index)
                   for index, (prompt, n, steps, temperature, top_k, top_p, seed) in enumerate(alike)]
    generations[3].generator = "not a generator"  # its draw fails at its first step
    made: dict[int, list] = {index: [] for index in range(len(alike))}
    failed = []
    while batch.generations:
        for result in batch.step():
            if result.error is not None:
                failed.append(result.generation.owner)
                assert result.done and result.generation not in batch.generations
            else:
                made[result.generation.owner].append((result.ids, result.probs))
    assert failed == [3] and made[3] == []
    for index, request in enumerate(alike[:3]):
        expected = alone(model, request)
        assert len(made[index]) == len(expected)
        for (ids, probs), (want_ids, want_probs) in zip(made[index], expected, strict=True):
            assert torch.equal(ids, want_ids)
            torch.testing.assert_close(probs, want_probs, rtol=0, atol=TOLERANCE)
    # one distribution, two generators: the same prompt draws its own text with each seed
    assert [ids.tolist() for ids, _ in made[0]] != [ids.tolist() for ids, _ in made[1]]


def test_the_batch_decodes_every_request_in_one_forward_pass_per_step(monkeypatch):
    model = small_model("rope")
    calls = []
    forward = model.forward

    def counting_forward(idx, *args, **kwargs):
        calls.append(idx.shape)
        return forward(idx, *args, **kwargs)

    monkeypatch.setattr(model, "forward", counting_forward)
    run_batch(model, {0: [0, 1, 2, 3]})
    longest = max(r[2] for r in REQUESTS[:4])
    # a prefill per request (rotary: no context ever prefills again), then one forward pass
    # per step for every running row: the longest request's steps after its first
    assert len(calls) == 4 + longest - 1
    assert max(shape[0] for shape in calls) == 1 + 3 + 2 + 1  # every choice of the four, at once


def test_per_row_positions_give_each_row_its_own_logits():
    for positions in ("learned", "rope"):
        model = small_model(positions)
        tokens = torch.randint(0, 40, (3, 1))
        starts = torch.tensor([0, 5, BLOCK - 1])
        with torch.no_grad():
            together, _ = model(tokens, start=starts)
            for row in range(3):
                apart, _ = model(tokens[row:row + 1], start=int(starts[row]))
                torch.testing.assert_close(together[row], apart[0], rtol=0, atol=TOLERANCE)


def test_a_prefill_that_cannot_grow_the_cache_fails_its_generation_only(monkeypatch):
    model = small_model("rope")
    grow = SlotCache.grow

    def grow_until_full(self, rows):
        if rows > FIRST_ROWS:
            raise torch.OutOfMemoryError("out of memory for more rows")
        grow(self, rows)

    monkeypatch.setattr(SlotCache, "grow", grow_until_full)
    batch = Batch(model)
    # eight rows fill the first buffer; the last request's prefill needs a ninth
    order = [0, 1, 2, 4, 3]
    for index in order:
        prompt, n, steps, temperature, top_k, top_p, seed = REQUESTS[index]
        batch.add(prompt, n, steps, temperature, top_k, top_p, seed, owner=index)
    made: dict[int, list] = {index: [] for index in order}
    failed = []
    while batch.generations:
        for result in batch.step():
            if result.error is not None:
                failed.append((result.generation.owner, type(result.error)))
            else:
                made[result.generation.owner].append(result.ids.tolist())
    assert failed == [(3, torch.OutOfMemoryError)] and made[3] == []
    for index in (0, 1, 2, 4):
        assert made[index] == [ids.tolist() for ids, _ in alone(model, REQUESTS[index])]
    assert batch.rows == 0


def test_a_generation_that_cannot_make_the_cache_leaves_no_mode_held(monkeypatch):
    model = small_model("rope").train()

    def no_memory(self, rows):
        raise torch.OutOfMemoryError("out of memory")

    monkeypatch.setattr(SlotCache, "grow", no_memory)
    batch = Batch(model)
    with pytest.raises(torch.OutOfMemoryError):
        batch.add([1, 2], 1, 4)
    assert model.training and batch.generations == []  # eval mode was not entered for it


# ----------------------------------------------------------------------------- through the engine


class NoTokenizer:
    """The engine's steps deal in ids; these tests need no text."""


def engine_for(model: GPT, **limits) -> Engine:
    """An engine that hands each request its steps as soon as a trip ends, unless told otherwise."""
    return Engine(model, NoTokenizer(), "tiny", Limits(**{"stream_interval": 0, **limits}), threads=1)


async def generate(engine: Engine, request, log: list | None = None, name=None, convert=None) -> list[list[int]]:
    prompt, n, steps, temperature, top_k, top_p, seed = request
    made = []

    def record(ids, probs):
        if log is not None:
            log.append(name)
        return ids.tolist()

    async with engine.slot():
        async for results in engine.steps(prompt, Sampling(steps, temperature, top_k, top_p, seed, n),
                                          convert or record):
            made += results
    return made


def test_concurrent_requests_through_the_engine_get_their_own_text():
    model = small_model("learned")
    engine = engine_for(model)

    async def scenario():
        return await asyncio.gather(*(generate(engine, request) for request in REQUESTS))

    made = asyncio.run(scenario())
    for request, got in zip(REQUESTS, made, strict=True):
        assert got == [ids.tolist() for ids, _ in alone(model, request)]
    assert (engine.completed, engine.active, engine.active_sequences) == (len(REQUESTS), 0, 0)
    assert engine.generated_tokens == sum(r[1] * r[2] for r in REQUESTS)


def test_a_short_request_started_with_a_long_one_finishes_first():
    engine = engine_for(small_model("rope"), time_slice=0)  # a trip of one step: an ending is seen at once
    long, short = ([1, 2], 1, 40 * BLOCK, 1.0, None, None, 1), ([3], 1, 10, 1.0, None, None, 2)
    log: list[str] = []
    finished: list[str] = []

    async def timed(name, request):
        await generate(engine, request, log, name)
        finished.append(name)

    async def scenario():
        await asyncio.gather(timed("long", long), timed("short", short))

    asyncio.run(scenario())
    assert finished == ["short", "long"]
    # they stepped together: when the short one ended, the long one had made about as many tokens
    steps_of_long_before_short_ended = log[:log.index("short") + log.count("short")].count("long")
    assert steps_of_long_before_short_ended <= short[2] + 1


def test_a_request_that_leaves_mid_batch_frees_its_rows_and_the_others_go_on():
    model = small_model("rope")
    engine = engine_for(model, time_slice=0)  # a trip of one step: the leaver is seen at once
    stayers = [REQUESTS[0], REQUESTS[3]]
    leaver = REQUESTS[1]

    async def leave_after(steps: int) -> None:
        prompt, n, max_tokens, temperature, top_k, top_p, seed = leaver
        async with engine.slot():
            made = 0
            stream = engine.steps(prompt, Sampling(max_tokens, temperature, top_k, top_p, seed, n),
                                  lambda ids, probs: ids)
            async for results in stream:
                made += len(results)
                if made >= steps:
                    break
            await stream.aclose()
        assert engine.active == 2  # its admission slot is free at once
        await engine.call(lambda: None)  # the model thread has dropped its rows
        assert engine.active_sequences == 2  # the two stayers' rows (one choice each) only

    async def scenario():
        return await asyncio.gather(generate(engine, stayers[0]), leave_after(3), generate(engine, stayers[1]))

    first, _, second = asyncio.run(scenario())
    for request, got in zip(stayers, (first, second), strict=True):
        assert got == [ids.tolist() for ids, _ in alone(model, request)]
    assert (engine.completed, engine.cancelled, engine.active, engine.active_sequences) == (2, 1, 0, 0)


def test_a_request_that_fails_ends_alone_and_the_batch_goes_on():
    model = small_model("learned")
    engine = engine_for(model)

    def broken_convert(ids, probs):
        raise KeyError("a bug in one request's adapter")

    async def failing():
        with pytest.raises(ModelFailed, match="KeyError"):
            await generate(engine, REQUESTS[2], convert=broken_convert)

    async def scenario():
        return await asyncio.gather(generate(engine, REQUESTS[0]), failing(), generate(engine, REQUESTS[3]))

    first, _, second = asyncio.run(scenario())
    assert first == [ids.tolist() for ids, _ in alone(model, REQUESTS[0])]
    assert second == [ids.tolist() for ids, _ in alone(model, REQUESTS[3])]
    assert (engine.completed, engine.failed, engine.active, engine.active_sequences) == (2, 1, 0, 0)


def test_rows_are_reused_request_after_request():
    engine = engine_for(small_model("rope"))

    async def waves():
        for _ in range(3):
            await asyncio.gather(*(generate(engine, request) for request in REQUESTS[:4]))

    asyncio.run(waves())
    assert engine.completed == 12
    assert engine.batch.cache.rows == FIRST_ROWS  # 7 rows at most at once: the first buffer was enough


def test_a_request_gets_its_first_step_at_once_and_the_rest_paced():
    engine = engine_for(small_model("rope"), time_slice=0, stream_interval=60)  # an interval no test reaches
    request = REQUESTS[0]
    deliveries = []

    async def scenario():
        prompt, n, steps, temperature, top_k, top_p, seed = request
        async with engine.slot():
            async for results in engine.steps(prompt, Sampling(steps, temperature, top_k, top_p, seed, n),
                                              lambda ids, probs: ids.tolist()):
                deliveries.append(results)

    asyncio.run(scenario())
    assert [len(d) for d in deliveries] == [1, request[2] - 1]  # the first token, then everything at the end


def test_a_request_that_cannot_join_the_batch_fails_alone_and_the_others_go_on(monkeypatch, caplog):
    model = small_model("rope")
    engine = engine_for(model, time_slice=0)
    add = Batch.add
    unlucky = ([1, 2], 2, BLOCK, 1.0, None, None, 99)

    def add_out_of_memory(self, *args, **kwargs):
        if args[6] == unlucky[6]:  # its seed
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return add(self, *args, **kwargs)

    monkeypatch.setattr(Batch, "add", add_out_of_memory)

    async def failing():
        with pytest.raises(ModelFailed, match="adding the request to the batch: OutOfMemoryError: CUDA out of memory"):
            await generate(engine, unlucky)

    async def scenario():
        # without a failure of its own, the request would wait for its steps forever
        return await asyncio.wait_for(
            asyncio.gather(generate(engine, REQUESTS[0]), failing(), generate(engine, REQUESTS[3])), 60)

    with caplog.at_level(logging.ERROR, logger="tinygpt.engine"):
        first, _, second = asyncio.run(scenario())
    assert first == [ids.tolist() for ids, _ in alone(model, REQUESTS[0])]
    assert second == [ids.tolist() for ids, _ in alone(model, REQUESTS[3])]
    assert (engine.completed, engine.failed, engine.active, engine.active_sequences) == (2, 1, 0, 0)
    assert any(record.exc_info and record.exc_info[0] is torch.OutOfMemoryError for record in caplog.records)


def test_a_batch_that_fails_fails_every_request_in_it_and_a_fresh_batch_serves_the_next(monkeypatch, caplog):
    model = small_model("rope").train()
    engine = engine_for(model, time_slice=0)
    draw = Batch._draw
    broken = []

    def draw_and_break(self, steps):
        if len(self.generations) == 3 and not broken:
            broken.append(True)
            self.owners.clear()  # the rows' bookkeeping is left inconsistent: removing them fails too
            raise RuntimeError("a bug in the batch")
        draw(self, steps)

    monkeypatch.setattr(Batch, "_draw", draw_and_break)
    in_the_batch = [REQUESTS[0], REQUESTS[1], REQUESTS[3]]  # long enough for all three to join

    async def failing(request):
        with pytest.raises(ModelFailed, match="while generating: RuntimeError: a bug in the batch"):
            await generate(engine, request)

    async def scenario():
        await asyncio.wait_for(asyncio.gather(*(failing(request) for request in in_the_batch)), 60)
        return await asyncio.wait_for(generate(engine, REQUESTS[4]), 60)

    with caplog.at_level(logging.ERROR, logger="tinygpt.engine"):
        after = asyncio.run(scenario())
    assert broken == [True]
    assert after == [ids.tolist() for ids, _ in alone(model, REQUESTS[4])]
    assert (engine.completed, engine.failed, engine.active, engine.active_sequences) == (1, 3, 0, 0)
    assert model.training  # the failed batch's eval mode was given back
    assert any(record.exc_info and record.exc_info[0] is RuntimeError for record in caplog.records)

"""Evaluation split across processes: the shards' sums add up to the whole split's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tinygpt.config import ModelConfig
from tinygpt.evaluate import evaluate_tokens, split_nats
from tinygpt.model import GPT


@pytest.mark.parametrize("stride", [16, 5, 1])
@pytest.mark.parametrize("length", [17, 100, 333])
@pytest.mark.parametrize("shards", [2, 3])
def test_shards_add_up_to_the_whole_split(stride, length, shards):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=20, block_size=16, n_layer=1, n_head=2, n_embd=16))
    tokens = np.random.default_rng(length).integers(0, 20, length).astype(np.uint8)
    whole = split_nats(model, tokens, batch_size=3, stride=stride)
    counted = []
    parts = [split_nats(model, tokens, batch_size=3, stride=stride, shard=(rank, shards),
                        progress=counted.append) for rank in range(shards)]
    assert sum(parts) == pytest.approx(whole, rel=1e-6)  # float32 sums, grouped differently
    assert sum(counted) == length - 1  # every prediction scored by exactly one shard
    if length >= shards * 16:  # enough windows for every shard: each did only its share
        assert all(0 < part < whole for part in parts)
    mean = evaluate_tokens(model, tokens, batch_size=3, stride=stride).loss
    assert mean == pytest.approx(whole / (length - 1), rel=1e-6)


def test_under_torchrun_each_process_scores_its_share_of_the_validation_split(monkeypatch):
    """train.validation_loss on rank 1 of 2 scores shard (1, 2) and adds the ranks' sums."""
    from types import SimpleNamespace

    from tinygpt import distributed, train
    from tinygpt.config import TrainConfig
    from tinygpt.distributed import Distributed
    from tinygpt.hardware import Precision

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=20, block_size=16, n_layer=1, n_head=2, n_embd=16))
    tokens = np.random.default_rng(0).integers(0, 20, 200).astype(np.uint8)
    shards = []
    real = train.split_nats
    monkeypatch.setattr(train, "split_nats", lambda *a, **k: shards.append(k["shard"]) or real(*a, **k))
    other_rank = split_nats(model, tokens, batch_size=8, shard=(0, 2))
    monkeypatch.setattr(distributed, "all_reduce_sum", lambda value, world, device: value + other_rank)
    run = SimpleNamespace(config=TrainConfig(batch_size=8, eval_iters=20), model_config=model.config,
                          val_tokens=tokens, precision=Precision(torch.float32, "test"), device=torch.device("cpu"),
                          world=Distributed(rank=1, world_size=2))
    loss = train.validation_loss(run, seed=0, model=model)
    assert shards == [(1, 2)]
    assert loss == pytest.approx(split_nats(model, tokens, batch_size=8) / 199, rel=1e-6)

"""Context parallelism without processes: what validate() accepts and refuses (naming the keys
and numbers), and the loss weights of a masked (sft) micro-batch's chunks. The training parity
runs on gloo ranks: tests/distributed/test_context_parallel.py."""

from __future__ import annotations

import pytest
import torch

from framework.config import ConfigError, validate
from framework.data.loader import Batch
from framework.parallel.cp import chunk_weight
from tests.helpers import make_cfg

CP = ["trainer.seq_len=256", "trainer.micro_batch_size=1", "trainer.global_batch_size=2"]


@pytest.mark.parametrize(
    ("overrides", "world"),
    [
        (["strategy=fsdp", "strategy.cp=2"], 2),
        (["strategy=ddp", "strategy.cp=2"], 4),
        (["strategy=fsdp", "strategy.cp=4"], 8),
        (["strategy=tp_fsdp", "strategy.tp=2", "strategy.cp=2", "model=debug-llama"], 4),
    ],
)
def test_cp_layouts_are_accepted(overrides, world):
    validate(make_cfg([*CP, *overrides]), world, device="cpu")


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (["strategy=zero2", "strategy.cp=2"], 2, r"strategy.cp=2 needs strategy=ddp\|fsdp\|tp_fsdp .*DeepSpeed"),
        (["strategy=fsdp", "strategy.cp=2", "trainer.seq_len=255", "model.block_size=256"], 2,
         r"trainer.seq_len=255 is not divisible by strategy.cp = 2"),
        (["strategy=tp_fsdp", "strategy.tp=2", "strategy.cp=4"], 8,
         r"model.n_head=4 is not divisible by strategy.tp=2 x strategy.cp=4"),
        (["strategy=fsdp", "strategy.cp=3"], 4, r"world size 4 is not divisible by .*strategy.cp=3"),
        (["strategy=fsdp", "strategy.cp=2", "strategy.cp_method=ring"], 2,
         r"cp_method=ring .*needs CUDA.*device cpu(.|\n)*supports causal attention only"),
    ],
)  # fmt: skip
def test_cp_misconfigurations_are_refused_naming_the_keys(overrides, world, message):
    with pytest.raises(ConfigError, match=message):
        validate(make_cfg([*CP, *overrides]), world, device="cpu")


def test_chunk_weights_keep_the_global_trained_token_mean():
    """An sft micro-batch of weight w over n trained targets: its chunks' weighted means,
    averaged over the cp ranks (as the gradients and the reported loss are), sum to w x mean."""
    g = torch.Generator().manual_seed(0)
    per_token = torch.rand(2, 8, generator=g)  # each target's loss
    targets = torch.ones(2, 8, dtype=torch.long)
    targets[:, :5] = -100  # chunk 0 (positions 0..3) has no trained target at all
    targets[1, 6] = -100
    batch = Batch(targets.clone(), targets, loss_weight=0.75)
    trained = targets != -100
    whole = batch.loss_weight * per_token[trained].mean()
    total = 0.0
    for part in (slice(0, 4), slice(4, 8)):
        w, t = chunk_weight(batch, targets[:, part], cp=2)
        kept = t != -100
        assert kept.any()  # a chunk without trained targets gets valid dummy ones (weight 0)
        total += w * per_token[:, part][kept].mean() / 2
    assert abs(total - whole) < 1e-6
    assert chunk_weight(Batch(targets, targets), targets[:, :4], 2)[0] is None  # pretraining

"""LR schedules and weight-decay groups as pure functions."""

from __future__ import annotations

import math

import pytest
import torch

from framework.config import OptimConfig
from framework.model import GPT, ModelConfig
from framework.optim import build_optimizer, lr_at, param_groups


def test_warmup_then_cosine_to_min():
    cfg = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule="cosine")
    assert lr_at(1, cfg, 110) == pytest.approx(0.1)
    assert lr_at(10, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone after warmup


def test_wsd_is_flat_then_linear_decay():
    cfg = OptimConfig(lr=2.0, min_lr_ratio=0.0, warmup_steps=0, schedule="wsd", decay_fraction=0.2)
    assert lr_at(1, cfg, 100) == 2.0 and lr_at(80, cfg, 100) == 2.0
    assert lr_at(90, cfg, 100) == pytest.approx(1.0)
    assert lr_at(100, cfg, 100) == pytest.approx(0.0)


def test_constant_schedule():
    cfg = OptimConfig(lr=0.5, warmup_steps=0, schedule="constant")
    assert {lr_at(s, cfg, 50) for s in (1, 25, 50)} == {0.5}


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_no_weight_decay_on_norms_biases_embeddings(style):
    model = GPT(
        ModelConfig(
            style=style,
            n_layer=2,
            n_embd=32,
            n_head=4,
            vocab_size=40,
            multiple_of=16,
            tie_embeddings=style == "gpt2",
            bias=style == "gpt2",
        )
    )
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(
        n.endswith("weight") and ("attn.w" in n or "mlp.w" in n or n == "lm_head.weight")
        for n in decayed
    )
    assert not any("norm" in n or "emb" in n or n.endswith("bias") for n in decayed)
    # every parameter is in exactly one group
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_optimizer_is_fused_only_on_cuda():
    model = torch.nn.Linear(4, 4)
    opt = build_optimizer(model, OptimConfig(), "cpu")
    assert opt.defaults["fused"] in (False, None)


def test_wsd_decays_to_min_lr_not_zero():
    """WSD ends at lr * min_lr_ratio (a decay to 0 that ignores the ratio fails here)."""
    cfg = OptimConfig(lr=2.0, min_lr_ratio=0.25, warmup_steps=0, schedule="wsd", decay_fraction=0.2)
    assert lr_at(80, cfg, 100) == 2.0  # last flat step
    assert lr_at(90, cfg, 100) == pytest.approx(2.0 - 1.5 * 0.5)  # half way from 2.0 to 0.5
    assert lr_at(100, cfg, 100) == pytest.approx(0.5)
    assert min(lr_at(s, cfg, 100) for s in range(1, 101)) == pytest.approx(0.5)


def test_zero3_placeholders_keep_their_weight_decay():
    """deepspeed.zero.Init leaves each parameter an empty 1-D placeholder with its real shape in
    `ds_shape`: grouping by the placeholder's dim put every matrix in the no-decay group."""
    import torch
    from torch import nn

    from framework.optim import param_groups

    model = nn.Linear(4, 3)
    for p in model.parameters():
        p.ds_shape = p.shape
        p.data = torch.empty(0)
    decay, no_decay = param_groups(model, 0.1)
    assert [tuple(p.ds_shape) for p in decay["params"]] == [(3, 4)]
    assert [tuple(p.ds_shape) for p in no_decay["params"]] == [(3,)]

"""The arithmetic of one optimizer step in the torch engine: the LR the loop schedules is the
LR AdamW applies (checked against a hand-computed first AdamW update), and gradients are the
mean over the accumulated micro-batches (the grad norm of 4 micro-batches of 1 equals that of
one micro-batch of 4). AdamW's first update is almost scale-invariant, so losses alone cannot
see an LR or a gradient scale that is off by a constant: these tests look at the numbers."""

from __future__ import annotations

import pytest
import torch

from framework.data.loader import Batch
from framework.dist import Dist
from framework.model.gpt import GPT
from framework.optim import lr_at
from framework.parallel import build_engine
from framework.train import train
from tests.helpers import TINY, make_cfg, read_metrics

SMALL = [
    "model.n_layer=2",
    "model.n_embd=64",
    "model.dropout=0",
    "trainer.seq_len=32",
    "trainer.device=cpu",
]


def engine_for(*overrides: str):
    cfg = make_cfg([*SMALL, *overrides])
    torch.manual_seed(cfg.trainer.seed)
    return build_engine(GPT(cfg.model), cfg, Dist()), cfg


def tokens(cfg, rows: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.model.vocab_size, (rows, cfg.trainer.seq_len + 1), generator=g)


def test_step_applies_the_given_lr_as_one_adamw_update():
    """Parameter deltas of the first step equal AdamW's at the LR passed to step(), not at
    optim.lr: at step 1 Adam's bias-corrected m/sqrt(v) is g/(|g|+eps)."""
    engine, cfg = engine_for(
        "trainer.micro_batch_size=2", "trainer.global_batch_size=2", "optim.grad_clip=0",
        "optim.lr=1e-3", "optim.weight_decay=0.1",
    )  # fmt: skip
    lr, eps, wd = 3.7e-4, cfg.optim.eps, cfg.optim.weight_decay
    t = tokens(cfg, 2)
    engine.forward_backward(Batch(t[:, :-1], t[:, 1:]), 1)
    decays = {id(p): g["weight_decay"] for g in engine.optimizer.param_groups for p in g["params"]}
    before = {n: (p.detach().clone(), p.grad.clone(), decays[id(p)])
              for n, p in engine.plain_model().named_parameters()}  # fmt: skip
    engine.step(lr)
    assert [g["lr"] for g in engine.optimizer.param_groups] == [lr, lr]
    assert {wd, 0.0} == set(decays.values())  # both groups are exercised below
    for name, p in engine.plain_model().named_parameters():
        p0, g, decay = before[name]
        expected = p0 * (1 - lr * decay) - lr * g / (g.abs() + eps)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-8, msg=name)


def test_gradients_are_averaged_over_accumulated_micro_batches():
    """grad_norm with 4 micro-batches of 1 equals that of 1 micro-batch of the same 4 samples:
    an accumulation that sums instead of averaging gives 4x (losses hide it: AdamW ignores a
    constant gradient scale)."""
    clip = "optim.grad_clip=0"  # the returned norm is pre-clip anyway; keep the steps identical
    accum, cfg = engine_for("trainer.micro_batch_size=1", "trainer.global_batch_size=4", clip)
    whole, _ = engine_for("trainer.micro_batch_size=4", "trainer.global_batch_size=4", clip)
    norms = {"accum": [], "whole": []}
    for step in range(2):  # the second step starts from the first step's (equal) update
        t = tokens(cfg, 4, seed=step)
        for i in range(4):
            accum.forward_backward(Batch(t[i : i + 1, :-1], t[i : i + 1, 1:]), 4)
        whole.forward_backward(Batch(t[:, :-1], t[:, 1:]), 1)
        norms["accum"].append(accum.step(1e-3).grad_norm)
        norms["whole"].append(whole.step(1e-3).grad_norm)
    assert norms["accum"] == pytest.approx(norms["whole"], rel=1e-5, abs=0)
    assert norms["whole"][0] > 0.1  # a real gradient, not a vacuous 0 == 0


def test_training_loop_hands_the_scheduled_lr_to_the_optimizer(tmp_path, sample_data, monkeypatch):
    """Through framework.train: the LR in the optimizer at each step is lr_at(step) (warmup
    then cosine), equal to the logged one -- not only logged."""
    from framework.parallel.engine import TorchEngine

    applied = []
    original = TorchEngine.apply  # the loop's update (step() = grad_norm() + apply())

    def spy(self, lr):
        res = original(self, lr)
        applied.append([g["lr"] for g in self.optimizer.param_groups])
        return res

    monkeypatch.setattr(TorchEngine, "apply", spy)
    cfg = make_cfg([*TINY, f"run.dir={tmp_path}", "trainer.max_steps=5", "optim.warmup_steps=2"])
    train(cfg)
    want = [lr_at(s, cfg.optim, 5) for s in range(1, 6)]
    assert len(set(want)) == 5  # warmup and decay: every step's LR differs
    assert applied == [[lr, lr] for lr in want]
    assert [r["lr"] for r in read_metrics(tmp_path) if "loss" in r] == want

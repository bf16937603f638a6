"""GPU tier (marker `gpu`): the bf16, fp16 (dynamic loss scaling) and fp8 paths train the debug
model on one CUDA device; fp8 is refused clearly below sm_90; the train entry runs on CUDA; and
the memory plan (framework.plan) is checked against the allocator's real peak.

    pytest -m gpu tests/gpu          # bench/run_gpu.sh runs this on a lent GPU machine
"""

from __future__ import annotations

import json

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from framework import precision as precision_mod  # noqa: E402
from framework.config import ConfigError, PrecisionConfig  # noqa: E402
from framework.data.loader import Batch  # noqa: E402
from framework.dist import Dist  # noqa: E402
from framework.model.gpt import GPT  # noqa: E402
from framework.parallel import build_engine  # noqa: E402
from framework.plan import make_plan  # noqa: E402
from tests.helpers import make_cfg  # noqa: E402

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda", 0)
HOPPER = torch.cuda.get_device_capability(0) >= (9, 0)

DEBUG = [
    "model=debug",
    "trainer.device=cuda",
    "trainer.seq_len=64",
    "trainer.micro_batch_size=8",
    "trainer.global_batch_size=8",
    "optim.lr=1e-3",
    "optim.warmup_steps=0",
]


def train_fixed_batch(overrides: list[str], steps: int = 20):
    """Overfit one fixed batch of random tokens: the loss must fall from about ln(vocab)."""
    cfg = make_cfg([*DEBUG, *overrides])
    torch.manual_seed(0)
    engine = build_engine(GPT(cfg.model).to(CUDA), cfg, Dist(device=CUDA))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.model.vocab_size, (8, 65), generator=g)
    batch = Batch(ids[:, :-1].contiguous(), ids[:, 1:].contiguous())
    losses, skipped = [], 0
    for _ in range(steps):
        losses.append(float(engine.forward_backward(batch, 1)))
        skipped += engine.step(cfg.optim.lr).skipped
    return losses, skipped, engine


def assert_learns(losses: list[float]) -> None:
    assert all(torch.isfinite(torch.tensor(losses))), losses
    # Random tokens over 257 ids start near ln(257) = 5.55; 20 AdamW steps at lr 1e-3 memorise
    # part of one batch.
    assert losses[0] == pytest.approx(5.55, abs=0.5)
    assert losses[-1] < losses[0] - 0.5, losses


def test_bf16_trains():
    losses, skipped, engine = train_fixed_batch(["precision=bf16"])
    assert engine.precision.autocast_dtype == torch.bfloat16
    assert skipped == 0
    assert_learns(losses)


def test_fp16_trains_with_dynamic_loss_scaling():
    losses, skipped, engine = train_fixed_batch(["precision=fp16"], steps=30)
    assert engine.precision.autocast_dtype == torch.float16
    assert engine.scaler is not None
    assert engine.scaler.get_scale() >= 1.0
    assert skipped < 10  # an overflow or two at the start lowers the scale, then it trains
    assert_learns(losses)


def test_fp16_overflow_skips_the_step_and_halves_the_scale():
    _, _, engine = train_fixed_batch(["precision=fp16"], steps=2)
    cfg = make_cfg([*DEBUG, "precision=fp16"])
    ids = torch.randint(0, cfg.model.vocab_size, (8, 65))
    engine.forward_backward(Batch(ids[:, :-1].contiguous(), ids[:, 1:].contiguous()), 1)
    before = {n: p.detach().clone() for n, p in engine.plain_model().named_parameters()}
    next(iter(engine.plain_model().parameters())).grad.fill_(float("inf"))
    scale = engine.scaler.get_scale()
    result = engine.step(cfg.optim.lr)
    assert result.skipped
    assert engine.scaler.get_scale() == scale / 2
    for n, p in engine.plain_model().named_parameters():
        assert torch.equal(p, before[n]), n  # no update applied


@pytest.mark.skipif(not HOPPER, reason="fp8 needs sm_90 (Hopper) or newer")
def test_fp8_trains_on_hopper():
    # fp8_min_dim=128 puts the debug model's linears in the fp8 path; vocab 256 keeps every
    # dimension a multiple of 16, which fp8 matmuls require.
    losses, skipped, _ = train_fixed_batch(
        ["precision=fp8", "precision.fp8_min_dim=128", "model.vocab_size=256"]
    )
    assert skipped == 0
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5, losses


def test_fp8_below_sm90_is_refused_clearly(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (8, 0))  # an A100
    with pytest.raises(ConfigError, match="fp8.*Hopper"):
        precision_mod.resolve(PrecisionConfig(name="fp8"), "cuda")


def test_train_entry_runs_on_cuda(tmp_path):
    from framework.train import train

    cfg = make_cfg(
        [
            "model=debug",
            "precision=bf16",
            "trainer.device=cuda",
            "trainer.max_steps=30",
            "trainer.seq_len=128",
            "trainer.eval_every=0",
            "trainer.sample_tokens=0",
            "trainer.log_every=1",
            "checkpoint.every=0",
            f"run.dir={tmp_path}",
        ]
    )
    train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 30 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5  # the sample corpus is learnable
    mfus = [r["mfu"] for r in rows if "mfu" in r]
    assert all(m is None or 0 < m < 1 for m in mfus)


def test_memory_plan_matches_allocator_peak():
    """One bf16 step of GPT-2 124M (micro-batch 8 x 1024 tokens, single GPU): the allocator's
    peak should be within 35% of framework.plan's per-GPU total (the plan leaves out
    backward's transient buffers and allocator rounding)."""
    cfg = make_cfg(
        [
            "model=gpt2-124m",
            "precision=bf16",
            "trainer.device=cuda",
            "trainer.seq_len=1024",
            "trainer.micro_batch_size=8",
            "trainer.global_batch_size=8",
        ]
    )
    planned = make_plan(cfg, 1).memory_bytes
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(CUDA)
    engine = build_engine(GPT(cfg.model).to(CUDA), cfg, Dist(device=CUDA))
    ids = torch.randint(0, cfg.model.vocab_size, (8, 1025))
    batch = Batch(ids[:, :-1].contiguous(), ids[:, 1:].contiguous())
    for _ in range(2):  # the second step has the AdamW state allocated
        engine.forward_backward(batch, 1)
        engine.step(cfg.optim.lr)
    peak = torch.cuda.max_memory_allocated(CUDA)
    print(json.dumps({"planned_gib": planned / 2**30, "peak_gib": peak / 2**30}))
    assert peak == pytest.approx(planned, rel=0.35)

"""Engine behaviour in one process (no launcher): fp16 loss scaling (skip, halve, abort),
activation checkpointing, the TP plan as data, the generated DeepSpeed config, and the errors
for impossible strategy/precision combinations."""

from __future__ import annotations

import fnmatch
import sys

import pytest
import torch

from framework.config import ConfigError, grad_accum_steps
from framework.data.loader import Batch
from framework.dist import Dist
from framework.model.gpt import GPT
from framework.parallel import build_engine
from framework.precision import LossScaleAbort, Precision, apply_fp8, resolve
from tests.helpers import make_cfg

TINY = [
    "model.n_layer=2",
    "model.n_embd=64",
    "model.dropout=0",
    "trainer.seq_len=32",
    "trainer.micro_batch_size=2",
    "trainer.global_batch_size=4",
    "trainer.device=cpu",
]


def batches(cfg, n: int, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = torch.randint(
            0, cfg.model.vocab_size, (cfg.trainer.micro_batch_size, cfg.trainer.seq_len + 1), generator=g
        )
        out.append(Batch(t[:, :-1], t[:, 1:]))
    return out


def engine_for(*overrides: str):
    cfg = make_cfg([*TINY, *overrides])
    torch.manual_seed(cfg.trainer.seed)
    return build_engine(GPT(cfg.model), cfg, Dist()), cfg


def train_steps(engine, cfg, steps: int) -> list[float]:
    accum = grad_accum_steps(cfg, engine.dp_size)
    data = batches(cfg, steps * accum)
    out = []
    for s in range(steps):
        loss = sum(float(engine.forward_backward(b, accum)) for b in data[s * accum : (s + 1) * accum])
        engine.step(cfg.optim.lr)
        out.append(loss / accum)
    return out


def test_single_engine_coordinates_and_memory():
    engine, _ = engine_for()
    assert (engine.dp_rank, engine.dp_size) == (0, 1)
    assert engine.peak_memory_bytes() is None  # CPU: torch does not track it


# -- fp16 dynamic loss scaling (torch.amp.GradScaler) -------------------------------------


def inject_inf(engine) -> None:
    next(iter(engine.plain_model().parameters())).grad.fill_(float("inf"))


def test_fp16_overflow_skips_the_step_and_halves_the_scale():
    engine, cfg = engine_for("precision=fp16", "precision.initial_loss_scale=1024")
    accum = grad_accum_steps(cfg, 1)
    for b in batches(cfg, accum):
        engine.forward_backward(b, accum)
    before = {k: v.clone() for k, v in engine.plain_model().state_dict().items()}
    inject_inf(engine)
    res = engine.step(1e-3)
    assert res.skipped and engine.skipped_steps == 1
    assert engine.scaler.get_scale() == 512.0
    after = engine.plain_model().state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no update applied
    # a clean step updates the parameters and keeps the scale
    for b in batches(cfg, accum, seed=1):
        engine.forward_backward(b, accum)
    res = engine.step(1e-3)
    assert not res.skipped and engine.scaler.get_scale() == 512.0
    assert not torch.equal(before["tok_emb.weight"], engine.plain_model().state_dict()["tok_emb.weight"])
    assert engine.extra_state()["scaler"]["scale"] == 512.0


def test_fp16_consecutive_overflows_at_min_scale_abort():
    engine, cfg = engine_for(
        "precision=fp16",
        "precision.initial_loss_scale=8",
        "precision.min_loss_scale=2",
        "precision.max_overflows_at_min=3",
    )
    accum = grad_accum_steps(cfg, 1)
    scales = []
    with pytest.raises(LossScaleAbort, match=r"3 consecutive overflowing steps .*min_loss_scale=2"):
        for _ in range(10):
            for b in batches(cfg, accum):
                engine.forward_backward(b, accum)
            inject_inf(engine)
            engine.step(1e-3)
            scales.append(engine.scaler.get_scale())
    # 8 -> 4 -> 2, then held at the floor: the 3rd overflow at scale 2 aborts
    assert scales == [4.0, 2.0, 2.0, 2.0]


# -- activation checkpointing -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_losses_and_names(mode):
    plain, cfg = engine_for()
    ref = train_steps(plain, cfg, 3)
    ac, _ = engine_for(f"strategy.activation_checkpointing={mode}")
    wrapped = type(ac.plain_model().blocks["0"]).__name__
    assert wrapped == "CheckpointWrapper"
    assert train_steps(ac, cfg, 3) == ref  # recompute is exact on CPU
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    # checkpoints stay interchangeable with and without AC
    assert set(get_model_state_dict(ac.plain_model())) == set(get_model_state_dict(plain.plain_model()))


# -- tensor-parallel plan as data ---------------------------------------------------------


@pytest.mark.parametrize("model", ["debug", "debug-llama"])
@pytest.mark.parametrize("sp", [True, False])
def test_tp_plan_covers_every_linear_and_matches_modules(model, sp):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from framework.parallel.tp import tp_plan

    cfg = make_cfg([f"model={model}"]).model
    gpt = GPT(cfg)
    plan = tp_plan(cfg.style, cfg.n_layer, sp)
    names = [n for n, _ in gpt.named_modules()]
    for pattern in plan:
        assert any(fnmatch.fnmatchcase(n, pattern) for n in names), pattern
    for name, mod in gpt.named_modules():
        if isinstance(mod, torch.nn.Linear):  # every matmul is split, none replicated
            styles = [s for p, s in plan.items() if fnmatch.fnmatchcase(name, p)]
            assert len(styles) == 1 and isinstance(styles[0], (ColwiseParallel, RowwiseParallel)), name
    assert ("blocks.*.mlp.w3" in plan) == (cfg.style == "llama")
    assert ("blocks.*.attn_norm" in plan) == sp


# -- DeepSpeed config generated from ours --------------------------------------------------


def test_deepspeed_config_is_generated_from_ours():
    from framework.parallel.zero import deepspeed_config

    cfg = make_cfg(
        [*TINY, "strategy=zero3", "strategy.zero_offload=true", "trainer.global_batch_size=16",
         "optim.grad_clip=0.5", "precision=fp16", "precision.initial_loss_scale=4096",
         "precision.loss_scale_window=200", "precision.min_loss_scale=4"]
    )  # fmt: skip
    ds = deepspeed_config(cfg, 2, Precision("fp16", "cpu", torch.float16))
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4  # 16 / (2 x 2)
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["fp16"] == {
        "enabled": True,
        "loss_scale": 0,
        "initial_scale_power": 12,
        "loss_scale_window": 200,
        "hysteresis": 1,
        "consecutive_hysteresis": False,
        "min_loss_scale": 4,
    }
    assert ds["bf16"] == {"enabled": False}
    bf = deepspeed_config(
        make_cfg([*TINY, "strategy=zero1"]), 1, Precision("bf16", "cpu", torch.bfloat16)
    )
    assert bf["bf16"] == {"enabled": True} and bf["zero_optimization"]["stage"] == 1
    assert "offload_optimizer" not in bf["zero_optimization"]


def test_overlap_comm_is_on_for_cuda_off_for_cpu_unless_set():
    """It was hard-coded off (for bitwise CPU parity), costing the overlap on GPUs."""
    from framework.parallel.zero import deepspeed_config

    auto, off, on = (make_cfg([*TINY, "strategy=zero2", *o]) for o in
                     ([], ["strategy.overlap_comm=false"], ["strategy.overlap_comm=true"]))  # fmt: skip
    cpu, cuda = Precision("fp32", "cpu", None), Precision("bf16", "cuda", torch.bfloat16)
    got = [deepspeed_config(c, 2, p)["zero_optimization"]["overlap_comm"] for c in (auto, off, on)
           for p in (cpu, cuda)]  # fmt: skip
    assert got == [False, True, False, False, True, True]


# -- errors that name the keys -------------------------------------------------------------


def test_fp8_needs_hopper():
    cfg = make_cfg([*TINY, "precision=fp8"])
    with pytest.raises(ConfigError, match="precision=fp8 needs a Hopper"):
        resolve(cfg.precision, "cpu")


def test_fp8_without_torchao_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    cfg = make_cfg([*TINY, "precision=fp8"])
    with pytest.raises(ConfigError, match="needs torchao"):
        apply_fp8(GPT(cfg.model), cfg.precision)


@pytest.mark.slow  # inductor compiles the block on CPU (~35 s on 2 shared cores)
def test_compile_per_block_keeps_losses_and_names():
    plain, cfg = engine_for()
    ref = train_steps(plain, cfg, 2)
    compiled, _ = engine_for("strategy.compile=true", "strategy.activation_checkpointing=full")
    got = train_steps(compiled, cfg, 2)
    assert max(abs(a - b) / abs(b) for a, b in zip(got, ref)) <= 1e-5  # fused kernels reorder sums
    # compiled in place: parameter names (checkpoint keys) unchanged
    assert set(compiled.plain_model().state_dict()) == set(plain.plain_model().state_dict())

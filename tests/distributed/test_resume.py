"""Checkpoints on 2 gloo ranks (fsdp, ddp, tp, zero2, zero3): stop and resume in a new invocation
reproduces the uninterrupted run bitwise (dropout on, so RNG state matters); an FSDP
checkpoint saved at dp=2 loads at dp=1 (DCP reshards; vocab 257 is not divisible by 2) and
continues with the same losses as a same-topology resume."""

from __future__ import annotations

import pytest

from framework.train import train
from tests.distributed.launch import PARITY, losses, max_rel_diff, run_train
from tests.helpers import make_cfg, read_metrics

DROPOUT = "model.dropout=0.1"


def grad_norms(run_dir) -> list[float]:
    return [r["grad_norm"] for r in read_metrics(run_dir) if "loss" in r]


@pytest.mark.parametrize("strategy", ["fsdp", "ddp", "tp", "zero2", "zero3"])
def test_resume_is_bitwise_exact(tmp_path, sample_data, strategy):
    full, split = tmp_path / "full", tmp_path / "split"
    run_train(full, f"strategy={strategy}", DROPOUT)
    run_train(split, f"strategy={strategy}", DROPOUT, "trainer.stop_at_step=4")
    assert len(losses(split)) == 4
    assert (split / "checkpoints/latest").read_text().strip() == "step_00000004"
    run_train(split, f"strategy={strategy}", DROPOUT)  # resume=auto picks step 4
    # 4 optimizer steps past the resume point, all bitwise equal
    assert losses(split) == losses(full)
    assert grad_norms(split) == grad_norms(full)


def test_fsdp_checkpoint_saved_at_dp2_loads_at_dp1(tmp_path, sample_data):
    src = tmp_path / "src"
    run_train(src, "strategy=fsdp", "trainer.stop_at_step=4")
    ckpt = src / "checkpoints/step_00000004"
    # same topology (dp=2) and resharded (dp=1, one process) continuations from step 4
    same, resharded = tmp_path / "same", tmp_path / "resharded"
    run_train(same, "strategy=fsdp", f"checkpoint.path={ckpt}")
    train(make_cfg([*PARITY, f"run.dir={resharded}", f"checkpoint.path={ckpt}"]))
    a, b = losses(same), losses(resharded)
    assert len(a) == len(b) == 4  # steps 5..8
    assert abs(a[0] - b[0]) / abs(a[0]) <= 1e-6  # next step: same weights, optimizer, data
    assert max_rel_diff(b, a) <= 1e-5


@pytest.mark.slow
def test_async_save_resume_equals_sync_run_on_2_ranks(tmp_path, sample_data):
    """checkpoint.async_save on 2 fsdp ranks: DCP writes through its own gloo group while the
    loop trains; the resume of the async run reproduces the synchronous run's losses bitwise."""
    sync, split = tmp_path / "sync", tmp_path / "async"
    every = ("checkpoint.every=2", "checkpoint.keep=2")
    run_train(sync, "strategy=fsdp", DROPOUT, *every)
    run_train(
        split, "strategy=fsdp", DROPOUT, *every, "checkpoint.async_save=true", "trainer.stop_at_step=6"
    )
    ck = split / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000006"
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000004", "step_00000006"]
    run_train(split, "strategy=fsdp", DROPOUT, *every, "checkpoint.async_save=true")
    assert losses(split) == losses(sync) and len(losses(sync)) == 8
    assert grad_norms(split) == grad_norms(sync)
    assert (ck / "latest").read_text().strip() == "step_00000008"

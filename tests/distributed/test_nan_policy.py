"""RELIABILITY B1 and trainer.on_nan on gloo ranks: a NaN in ONE rank's gradient (after the
data-parallel reduction, so under DDP the other rank's copy is finite) is seen by every rank
before any update, under every strategy. Before the decision moved into one all-reduce, DDP's
rank 0 applied and logged the step while rank 1 raised, and DeepSpeed ZeRO (bf16/fp32) applied
the step before any check.

The per-strategy checks run in one launch (tests/distributed/nan_harness.py builds each engine
in turn in the same process group); one end-to-end DDP run through framework.train checks
what the user sees (error lines, metrics, checkpoints)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.distributed.launch import BIN, PARITY, ROOT, free_port, launch_cmd
from tests.helpers import read_metrics

pytestmark = pytest.mark.slow

TWO_RANKS = ["ddp", "fsdp", "tp", "zero1", "zero2", "zero3", "pp"]


def run_harness(out, strategies: list[str], nproc: int, *extra: str) -> list[list[dict]]:
    """Per rank, per strategy: what nan_harness.py saw."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MASTER_PORT=str(port))
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(port),
           str(ROOT / "tests/distributed/nan_harness.py"), str(out), ",".join(strategies),
           *PARITY, *extra]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return [json.loads((out / f"rank_{r}.json").read_text()) for r in range(nproc)]


def check_policy(per_rank: list[list[dict]], strategies: list[str]) -> None:
    nproc = len(per_rank)
    for i, strategy in enumerate(strategies):
        seen = [results[i] for results in per_rank]
        assert [s["strategy"] for s in seen] == [strategy] * nproc
        for rank, s in enumerate(seen):
            where = f"{strategy}, rank {rank}"
            assert "error" not in s, f"{where}:\n{s['error']}"
            assert s["step1"]["action"] == "apply", where
            # abort: raised on every rank (not only the one holding the NaN), nothing changed
            assert s["abort"]["raised"], where
            assert s["abort"]["changed"] == [], where
            # skip: every local weight, master copy and Adam tensor bitwise as before the step
            assert s["skip"]["action"] == "skip" and s["skip"]["skipped"] is True, where
            assert s["skip"]["changed"] == [], where
            assert s["skip"]["counters"] == {"skipped_nonfinite": 1}, where
            if strategy.startswith("zero"):  # DeepSpeed's own counter agrees: no half-taken step
                assert s["skip"]["ds_skipped_steps"] == 1, where
            # engine.skip() of finite gradients (the spike detector's skip): nothing applied
            assert s["skip_finite"] == {"skipped": True, "changed": []}, where
            # negative control: the next clean step trains again (the NaN gradients were dropped)
            step4 = s["step4"]
            assert step4["action"] == "apply" and step4["finite"], where
            assert step4["changed"] >= step4["of"] // 2, where
            assert step4["counters"] == {"skipped_nonfinite": 1}, where  # a running count
        # one decision, taken from the all-reduced flags: identical on every rank
        for key in ("abort", "skip"):
            assert len({s[key]["what"] for s in seen}) == 1, (strategy, key, [s[key] for s in seen])
        assert len({s["skip"]["loss"] for s in seen}) == 1, strategy
        # under DDP the gradients are replicated after the reduction: only the poisoned copy is
        # non-finite, and the other rank still skips; elsewhere the norm is global (pp: summed
        # over the stages)
        n_bad = 1 if strategy == "ddp" else nproc
        assert seen[0]["skip"]["what"] == f"gradient norm is non-finite on {n_bad} of {nproc} rank(s)"


def test_nan_grad_on_one_rank_every_two_rank_strategy(tmp_path):
    per_rank = run_harness(tmp_path, TWO_RANKS, 2)
    check_policy(per_rank, TWO_RANKS)


def test_nan_grad_on_one_rank_tp_fsdp_four_ranks(tmp_path):
    per_rank = run_harness(tmp_path, ["tp_fsdp"], 4)
    check_policy(per_rank, ["tp_fsdp"])


def test_nan_grad_on_one_rank_aborts_every_rank_through_train(tmp_path, sample_data):
    """End to end under DDP: every rank exits with the same decision, step 3 is neither logged
    nor saved (the engine-level checks above cover the other strategies and on_nan=skip)."""
    run_dir = tmp_path / "ddp"
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MASTER_PORT=str(port))
    cmd = [*launch_cmd("torchrun", 2, port), *PARITY, f"run.dir={run_dir}", "strategy=ddp",
           "checkpoint.every=1", "checkpoint.keep=0", "faults.nan_grad_at_step=3", "faults.rank=1"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    # one clean line per failing rank (framework.cli), tagged with the rank that prints it; the
    # bad rank names itself, rank 0's replicated copy is finite
    assert "error: [rank 1] step 3 (rank 1): gradient norm is non-finite on 1 of 2" in out
    assert "error: [rank 0] step 3 (another rank): gradient norm is non-finite on 1 of 2" in out
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2]  # step 3 not logged
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == [
        "step_00000001",
        "step_00000002",
    ]

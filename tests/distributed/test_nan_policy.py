"""RELIABILITY B1 on 2 gloo ranks: a NaN in ONE rank's gradient (after the data-parallel
reduction, so the other rank's copy is finite) is seen by every rank before any update. Before
the decision moved into one all-reduce, DDP's rank 0 applied and logged the step while rank 1
raised, and DeepSpeed ZeRO (bf16/fp32) applied the step before any check."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

from framework.checkpoint import load_model
from tests.distributed.launch import PARITY, ROOT, free_port, launch_cmd, run_train
from tests.helpers import read_metrics

pytestmark = pytest.mark.slow


def weights(run_dir, step: int) -> dict[str, torch.Tensor]:
    return load_model(run_dir / "checkpoints" / f"step_{step:08d}")[0].state_dict()


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_nan_grad_on_one_rank_aborts_every_rank_before_the_update(tmp_path, sample_data, strategy):
    run_dir = tmp_path / strategy
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MASTER_PORT=str(port))
    cmd = [*launch_cmd("torchrun", 2, port), *PARITY, f"run.dir={run_dir}", f"strategy={strategy}",
           "checkpoint.every=1", "checkpoint.keep=0", "faults.nan_grad_at_step=3", "faults.rank=1"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    # every rank stops with the same decision; the bad rank names itself. DDP's gradients are
    # replicated (rank 0's copy is finite); DeepSpeed's norm is already global.
    # one clean line per failing rank (framework.cli), tagged with the rank that prints it
    assert "error: [rank 1] step 3 (rank 1): gradient norm is non-finite on" in out
    peer = "another rank" if strategy == "ddp" else "rank 0"
    assert f"error: [rank 0] step 3 ({peer}): gradient norm is non-finite on" in out
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2]  # step 3 not logged
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == [
        "step_00000001",
        "step_00000002",
    ]


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_nan_grad_on_one_rank_skipped_leaves_weights_bitwise(tmp_path, sample_data, strategy):
    run_dir = tmp_path / strategy
    run_train(run_dir, f"strategy={strategy}", "trainer.max_steps=4", "checkpoint.every=1",
              "checkpoint.keep=0", "trainer.on_nan=skip", "faults.nan_grad_at_step=3",
              "faults.rank=1")  # fmt: skip
    w2, w3, w4 = (weights(run_dir, s) for s in (2, 3, 4))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)  # step 3: no update on any rank
    assert not all(torch.equal(w3[k], w4[k]) for k in w3)  # step 4 trained again
    rows = {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}
    assert rows[3]["skipped_nonfinite"] == 1 and rows[3]["skipped"] is True
    assert "skipped_nonfinite" not in rows[2]

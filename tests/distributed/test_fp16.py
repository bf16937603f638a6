"""fp16 dynamic loss scaling under sharding: an overflow in ONE rank's gradient shard makes
every rank skip the step and halve the scale (the found-inf flag is all-reduced), so the
ranks never diverge."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

from framework.precision import deepspeed_cpu_fp16_supported
from tests.distributed.launch import BIN, ROOT, free_port

SMALL = [
    "model.n_layer=2",
    "model.n_embd=64",
    "model.dropout=0",
    "trainer.seq_len=32",
    "trainer.global_batch_size=8",
    "trainer.micro_batch_size=2",
    "trainer.max_steps=4",
    "trainer.device=cpu",
    "precision=fp16",
    "precision.initial_loss_scale=1024",
]


@pytest.mark.parametrize("strategy", ["fsdp", "tp"])
def test_overflow_on_one_rank_skips_the_step_on_all(tmp_path, strategy):
    out = tmp_path / "rows.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), FW_TEST_INJECT_INF="1:2")
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "tests/distributed/engine_harness.py"), str(out), *SMALL, f"strategy={strategy}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    rows = json.loads(out.read_text())[:-1]  # rank 0's view; the inf was in rank 1's shard
    assert [r["skipped"] for r in rows] == [False, True, False, False]
    assert [r["scale"] for r in rows] == [1024.0, 512.0, 512.0, 512.0]
    assert all(r["loss"] == r["loss"] for r in rows)  # finite losses after the skip


def run_harness(tmp_path, *overrides: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "rows.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "tests/distributed/engine_harness.py"), str(out), *SMALL, *overrides]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300), out


@pytest.mark.skipif(
    not deepspeed_cpu_fp16_supported(),
    reason="DeepSpeed's CPU accelerator has no fp16 on this CPU (oneDNN reports none, e.g. AMD EPYC); "
    "the config refusal is tested in tests/unit/test_fp16_capability.py",
)
def test_deepspeed_fp16_skips_halves_and_aborts_at_the_floor(tmp_path):
    # 2^20 overflows this model's fp16 gradients, 2^18 does not (measured)
    proc, out = run_harness(tmp_path, "strategy=zero2", "precision.initial_loss_scale=1048576")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    rows = json.loads(out.read_text())[:-1]
    assert [r["skipped"] for r in rows] == [True, True, False, False]
    assert [r["scale"] for r in rows] == [2.0**19, 2.0**18, 2.0**18, 2.0**18]
    assert math.isinf(rows[0]["grad_norm"]) and math.isfinite(rows[2]["grad_norm"])
    # floor at 2^19, where it still overflows: the 2nd consecutive overflow there aborts
    proc, _ = run_harness(
        tmp_path, "strategy=zero2", "precision.initial_loss_scale=1048576",
        "precision.min_loss_scale=524288", "precision.max_overflows_at_min=2",
    )  # fmt: skip
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "LossScaleAbort: fp16: 2 consecutive overflowing steps at the minimum loss scale" in text
    assert "terminate called" not in text

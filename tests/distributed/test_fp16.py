"""fp16 dynamic loss scaling under sharding: an overflow in ONE rank's gradient shard makes
every rank skip the step and halve the scale (the found-inf flag is all-reduced), so the
ranks never diverge."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

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


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))

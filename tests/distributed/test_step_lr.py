"""The scheduled LR reaches the optimizer that applies the update under a sharded engine
(DeepSpeed ZeRO-2 on 2 gloo ranks, its own step() implementation), not only the log. The
torch engine's step is checked in-process in tests/unit/test_step_math.py."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from framework.optim import lr_at
from tests.distributed.launch import BIN, ROOT, free_port
from tests.helpers import make_cfg

SMALL = [
    "model.n_layer=2",
    "model.n_embd=64",
    "model.dropout=0",
    "trainer.seq_len=32",
    "trainer.global_batch_size=8",
    "trainer.micro_batch_size=2",
    "trainer.max_steps=4",
    "trainer.device=cpu",
    "optim.warmup_steps=2",
    "optim.lr=1e-3",
]


@pytest.mark.slow  # a DeepSpeed launch on 2 processes (~20 s idle, minutes on a loaded box)
def test_zero2_optimizer_receives_the_scheduled_lr(tmp_path):
    out = tmp_path / "rows.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), FW_TEST_LR_SCHEDULE="1")
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "tests/distributed/engine_harness.py"), str(out), *SMALL, "strategy=zero2"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    rows = json.loads(out.read_text())[:-1]
    cfg = make_cfg(SMALL).optim
    want = [lr_at(s, cfg, 4) for s in range(1, 5)]
    assert len(set(want)) == 4 and want[0] == 5e-4  # warmup, then decay: none equals optim.lr
    assert [r["lr"] for r in rows] == want
    assert all(set(r["lr_applied"]) == {r["lr"]} for r in rows), rows

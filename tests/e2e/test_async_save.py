"""checkpoint.async_save end to end on one process (TINY model): RELIABILITY A6, a crash after
the async save's dispatch and write but before its commit leaves `latest` on the previous
checkpoint, keep-k spares it and a resume from it continues bitwise like a synchronous run."""

from __future__ import annotations

import pytest

from framework.checkpoint import CRASH_EXIT_CODE, verify
from framework.train import train
from tests.helpers import TINY, make_cfg, run_module, train_losses

EVERY = ["trainer.max_steps=8", "checkpoint.every=2", "checkpoint.keep=2"]
ASYNC = [*EVERY, "checkpoint.async_save=true"]


@pytest.mark.slow  # three runs, one of them a subprocess
def test_crash_before_async_commit_keeps_latest_and_resumes_bitwise(tmp_path, sample_data):
    sync, d = tmp_path / "sync", tmp_path / "run"
    train(make_cfg([*TINY, *EVERY, f"run.dir={sync}"]))  # the reference: synchronous saves
    # step 6's save is dispatched and written while step 7 trains; at step 8's save its commit
    # starts and the process dies first (faults.crash_in_async_save exits with CRASH_EXIT_CODE)
    proc = run_module("framework.train", *TINY, *ASYNC, f"run.dir={d}", "faults.crash_in_async_save=6")
    assert proc.returncode == CRASH_EXIT_CODE, proc.stderr[-3000:]
    ck = d / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000004"
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000002", "step_00000004"]
    partial = ck / ".tmp-step_00000006"
    assert (partial / "state" / ".metadata").is_file()  # written, never committed
    assert not (partial / "COMMITTED").exists()
    assert max(train_losses(d)) == 8  # training went on while step 6 was written
    assert train_losses(d) == train_losses(sync)  # async saving changed nothing in training
    assert verify(ck / "step_00000004")["step"] == 4

    train(make_cfg([*TINY, *ASYNC, f"run.dir={d}"]))  # resume=auto: from step 4, async again
    assert not partial.exists()  # the partial folder is removed at the next start
    assert train_losses(d) == train_losses(sync)  # steps 5-8 redone from step 4, bitwise
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000006", "step_00000008"]
    assert (ck / "latest").read_text().strip() == "step_00000008"
    assert verify(ck / "step_00000008")["step"] == 8

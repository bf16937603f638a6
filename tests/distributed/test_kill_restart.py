"""RELIABILITY A5: kill -9 of one rank mid-training under torchrun --max-restarts=1 (the shipped
launchers/torchrun.sh; torchrun reads PET_MAX_RESTARTS for its --max-restarts). B7: SIGUSR1 to
the launcher (a bare torchrun dies of it and orphans its workers) leaves no worker behind."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from tests.distributed.test_faults import (  # noqa: F401 (uninterrupted is a fixture)
    SLOW_STEPS,
    alive,
    finish,
    logged_steps,
    start,
    stop_steps,
    uninterrupted,
    wait_for,
    workers,
)
from tests.helpers import train_losses

pytestmark = pytest.mark.slow


def restart_count(pid: int) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    found = [e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"TORCHELASTIC_RESTART_COUNT=")]
    return found[0] if found else None


def test_kill_9_of_one_rank_restarts_from_latest_and_ends_bitwise(
    tmp_path,
    sample_data,
    uninterrupted,  # noqa: F811 (the fixture imported above)
    monkeypatch,
):
    monkeypatch.setenv("PET_MAX_RESTARTS", "1")
    run_dir = tmp_path / "run"
    proc = start(run_dir, SLOW_STEPS, "checkpoint.every=2")
    latest = run_dir / "checkpoints/latest"
    wait_for(lambda: logged_steps(run_dir) >= 3 and latest.is_file(), proc, "step 3")
    first = workers(proc.pid)
    assert sorted(first) == [0, 1] and {restart_count(p) for p in first.values()} == {"0"}
    killed_at = logged_steps(run_dir)
    os.kill(first[1], signal.SIGKILL)

    def restarted() -> bool:
        try:
            now = workers(proc.pid)
        except OSError:  # torchrun tearing the old workers down
            return False
        return len(now) == 2 and not set(now.values()) & set(first.values())

    wait_for(restarted, proc, "restarted workers")
    assert {restart_count(p) for p in workers(proc.pid).values()} == {"1"}
    out = finish(proc)
    assert proc.returncode == 0, out[-3000:]
    resumed = [int(s) for s in re.findall(r"resumed from \S+ \(step (\d+)\)", out)]
    assert resumed and set(resumed) == {resumed[0]}, out[-3000:]  # every rank, the same checkpoint
    assert 0 <= killed_at - resumed[0] <= 2  # lost work <= checkpoint.every steps
    assert train_losses(run_dir) == uninterrupted  # steps 1..8, bitwise


def test_sigusr1_to_the_launcher_leaves_no_worker_behind(tmp_path, sample_data):
    """B7: torchrun.sh forwards SIGUSR1 (Slurm's --signal) instead of dying of it: both workers
    stop after the same step, save, and are gone once the launcher has exited."""
    run_dir = tmp_path / "run"
    proc = start(run_dir, SLOW_STEPS)
    wait_for(lambda: logged_steps(run_dir) >= 2, proc, "step 2")
    pids = workers(proc.pid)
    assert sorted(pids) == [0, 1]
    proc.send_signal(signal.SIGUSR1)
    out = finish(proc)
    # the launcher handled the signal (a bare torchrun dies of it: -SIGUSR1); torchrun exits 1
    # after a handled stop even though the workers saved
    assert proc.returncode in (0, 1), (proc.returncode, out[-3000:])
    assert not [p for p in pids.values() if alive(p)]
    steps = stop_steps(out)
    assert len(steps) == 2 and steps[0] == steps[1], out[-3000:]
    assert (run_dir / f"checkpoints/step_{steps[0]:08d}/COMMITTED").is_file()

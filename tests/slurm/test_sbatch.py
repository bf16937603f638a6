"""launchers/slurm/train.sbatch on the real local Slurm: a zero2 job of 2 processes trains to
completion, and a job preempted with Slurm's USR1 (what --signal=B:USR1@180 sends before the
time limit) checkpoints, requeues itself and finishes with the uninterrupted losses."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.distributed.launch import PARITY, ROOT, losses, max_rel_diff
from tests.helpers import make_cfg, read_metrics

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
SBATCH = ROOT / "launchers/slurm/train.sbatch"


def _submit(run_dir: Path, *overrides: str, wait: bool) -> str:
    env = dict(os.environ, NPROC_PER_NODE="2", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # fmt: skip
    cmd = [
        "sbatch",
        "--parsable",
        f"--output={run_dir}.slurm.out",
        "--cpus-per-task",
        str(os.cpu_count() or 1),
    ]
    cmd += ["--wait"] if wait else []
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    p = subprocess.run([*cmd, str(SBATCH), *PARITY, *overrides, f"run.dir={run_dir}"], cwd=run_dir.parent,
                       env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    log = Path(f"{run_dir}.slurm.out")
    out = log.read_text() if log.exists() else ""
    assert p.returncode == 0, f"sbatch exited {p.returncode}: {p.stderr}\n{out[-5000:]}"
    return p.stdout.strip().split(";")[0]


def _scontrol(*args: str) -> None:
    p = subprocess.run(
        ["scontrol", *args], capture_output=True, text=True, env=dict(os.environ), cwd="/"
    )
    assert p.returncode == 0, f"scontrol {' '.join(args)}: {p.stderr}"


def _nodes_idle() -> bool:
    """Every node idle: none still completing (cleaning up) an ended or requeued job."""
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout.split()
    return bool(out) and all(state == "idle" for state in out)


def _job(job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def test_sbatch_trains_zero2_on_two_processes(slurm, tmp_path, sample_data):
    run_dir = tmp_path / "zero2"
    _submit(run_dir, "strategy=zero2", wait=True)
    got = losses(run_dir)
    ref_dir = tmp_path / "single"
    from framework.train import train

    train(make_cfg([*PARITY, f"run.dir={ref_dir}"]))
    assert len(got) == 8 and max_rel_diff(got, losses(ref_dir)) <= 1e-5
    assert (run_dir / "logs").is_dir()  # the job's log is kept beside the run


def test_preempted_job_checkpoints_requeues_and_resumes(slurm, tmp_path, sample_data):
    steps = ["trainer.max_steps=24", "checkpoint.every=100", "strategy=ddp"]
    ref_dir = tmp_path / "ref"
    from tests.distributed.launch import run_train

    run_train(ref_dir, *steps[:2], "strategy=ddp")
    run_dir = tmp_path / "preempted"
    job = _submit(run_dir, *steps, "faults.sleep_in_step_s=0.5", wait=False)
    deadline = time.time() + 600
    while time.time() < deadline:  # preempt once training is under way
        if (run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir)) >= 3:
            break
        time.sleep(1)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    hurried = False
    while time.time() < deadline:
        info = _job(job)
        pending = info.get("JobState") == "PENDING" and info.get("Restarts") == "1"
        if not hurried and pending and _nodes_idle():
            # slurmctld holds a requeued job back for ~2 minutes (its begin time is pushed
            # out); what is under test is that the job requeued itself, not that wait. Only
            # once the node has finished the first run: started while it still completes, the
            # second run failed at launch (no output, run time 0, seen 1 in 3 on a loaded box)
            _scontrol("update", f"JobId={job}", "StartTime=now")
            hurried = True
        if info.get("JobState") == "COMPLETED" and info.get("Restarts") == "1":
            break
        if info.get("JobState") in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            # while slurmctld requeues, the job shows the ended run's state for a moment before
            # PENDING (seen as FAILED on a loaded box): an end only if it is still so later
            time.sleep(10)
            info = _job(job)
            if info.get("JobState") in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
                break
            continue
        time.sleep(2)
    log = Path(f"{run_dir}.slurm.out").read_text()
    assert info.get("JobState") == "COMPLETED" and info.get("Restarts") == "1", (info, log[-4000:])
    assert "requeueing" in log and "restart 1" in log
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert len(ckpts) >= 2 and ckpts[-1] == "step_00000024"  # the preemption save + the final
    assert [repr(x) for x in losses(run_dir)] == [repr(x) for x in losses(ref_dir)]

"""Sweeps (`-m`) give every point its own run directory; the Slurm sweep launcher composes;
TensorBoard shows each step once after a resume from an earlier checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from framework.train import train
from tests.helpers import TINY, compose, make_cfg, read_metrics

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_sweep_points_train_in_their_own_run_dirs(tmp_path, sample_data):
    """Each point trains in `<its run.dir>/<job number>`; run.dir may use a Hydra resolver
    (`${hydra:runtime.cwd}`, resolved by Hydra's sweeper before any job: issue 17) and a swept
    key (`${optim.lr}`)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "framework.train", "-m", *TINY, "trainer.max_steps=2",
           "checkpoint.every=1", "optim.lr=1e-3,3e-4",
           "run.dir=${hydra:runtime.cwd}/sweep/lr${optim.lr}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    dirs = [tmp_path / "sweep/lr0.001/0", tmp_path / "sweep/lr0.0003/1"]
    for d, lr in zip(dirs, (1e-3, 3e-4)):
        assert [r["step"] for r in read_metrics(d) if "loss" in r] == [1, 2]  # trained, not resumed
        assert f"lr: {lr}" in (d / "config.yaml").read_text()
        assert (d / "checkpoints" / "step_00000002" / "COMMITTED").is_file()
    losses = [[r["loss"] for r in read_metrics(d) if "loss" in r] for d in dirs]
    assert losses[0][1] != losses[1][1]  # different learning rates, different second steps


def test_slurm_sweep_launcher_composes():
    cfg = compose(["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.signal_delay_s == 180 and launcher.gpus_per_node is None


def test_tensorboard_purges_steps_past_the_resume_point(tmp_path, sample_data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    base = [*TINY, f"run.dir={tmp_path}", "logger=tensorboard", "checkpoint.every=2"]
    train(make_cfg([*base, "trainer.max_steps=4"]))
    # resume from the step-2 checkpoint: steps 3 and 4 are trained again
    train(
        make_cfg([*base, "trainer.max_steps=4", f"checkpoint.path={tmp_path}/checkpoints/step_00000002"])
    )
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("loss")]
    assert steps == [1, 2, 3, 4], steps
    final = {r["step"]: r["loss"] for r in read_metrics(tmp_path) if "loss" in r}
    assert sorted(final) == [1, 2, 3, 4]  # metrics.jsonl: one record per step too
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx([final[s] for s in steps], rel=1e-6)

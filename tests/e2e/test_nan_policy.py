"""RELIABILITY B1/B2 in one process: trainer.on_nan=skip|rollback and the loss-spike detector,
driven by the faults.* injections (the 2-rank cases are in tests/distributed/test_nan_policy.py)."""

from __future__ import annotations

import json

import pytest
import torch

from framework.checkpoint import load_model
from framework.faults import SKIPPED_WINDOWS
from framework.train import train
from tests.helpers import TINY, make_cfg, read_metrics, train_losses


def run(run_dir, *extra: str):
    train(make_cfg([*TINY, f"run.dir={run_dir}", *extra]))
    return run_dir


def weights(run_dir, step: int) -> dict[str, torch.Tensor]:
    return load_model(run_dir / "checkpoints" / f"step_{step:08d}")[0].state_dict()


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def optim_state(run_dir, step: int) -> dict:
    """The optimizer state tensors of a single-process checkpoint (flattened by name:
    state.<fqn>.exp_avg | exp_avg_sq | step)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = run_dir / f"dcp_{step}.pt"
    dcp_to_torch_save(run_dir / "checkpoints" / f"step_{step:08d}" / "state", out)
    optim = torch.load(out, weights_only=False)["optim"]
    return {k: v for k, v in optim.items() if k.startswith("state.")}


def test_on_nan_skip_drops_the_update_and_counts_it(tmp_path, sample_data):
    d = run(tmp_path / "skip", "trainer.on_nan=skip", "faults.nan_grad_at_step=3", "checkpoint.every=1",
            "checkpoint.keep=0", "trainer.max_steps=4")  # fmt: skip
    assert_same_weights(weights(d, 3), weights(d, 2))  # step 3 applied nothing
    before, after = optim_state(d, 2), optim_state(d, 3)
    assert before.keys() == after.keys() and any(k.endswith(".exp_avg_sq") for k in before)
    for k in before:  # Adam moments and step counts unchanged
        assert torch.equal(before[k], after[k]), k
    with pytest.raises(AssertionError):  # negative control: step 4 did update
        assert_same_weights(weights(d, 4), weights(d, 3))
    rows = {r["step"]: r for r in read_metrics(d) if "loss" in r}
    assert "skipped_nonfinite" not in rows[2]
    assert rows[3]["skipped_nonfinite"] == 1 and rows[3]["skipped"] is True
    assert rows[4]["skipped_nonfinite"] == 1  # a running count


def test_on_nan_rollback_skips_the_window_and_a_resume_honours_it(tmp_path, sample_data):
    """NaN loss at step 5: reload step 4, drop step 5's global batch (samples [32, 40) of 8 per
    step), carry on; a later resume from step 4 in the same run dir drops it again."""
    d = run(tmp_path / "rb", "trainer.on_nan=rollback", "faults.nan_loss_at_step=5", "checkpoint.every=2",
            "checkpoint.keep=0", "trainer.max_steps=8")  # fmt: skip
    assert json.loads((d / SKIPPED_WINDOWS).read_text()) == [{"step": 5, "start": 32, "end": 40}]
    rolled = train_losses(d)
    assert sorted(rolled) == list(range(1, 9)) and rolled[5] != "nan"
    # the same run without the NaN takes other data at step 5: the window really was skipped
    clean = train_losses(run(tmp_path / "clean", "trainer.max_steps=8"))
    assert rolled[4] == clean[4] and rolled[5] != clean[5]
    # resume from step 4 (no fault now): the recorded window is skipped, same losses as before
    for late in ("step_00000006", "step_00000008"):
        import shutil

        shutil.rmtree(d / "checkpoints" / late)
    (d / "checkpoints/latest").write_text("step_00000004\n")
    run(d, "trainer.max_steps=8", "checkpoint.every=2", "checkpoint.keep=0")
    assert train_losses(d) == rolled


def test_loss_spike_is_skipped_and_the_detector_survives_a_resume(tmp_path, sample_data):
    """B2: a 50x loss at step 7 with trainer.spike_zscore=3 over the last 4 losses: skipped,
    counted, weights unchanged; a run stopped at step 6 and resumed matches bitwise (the window
    of recent losses comes back from the checkpoint, so the same step is judged a spike)."""
    spike = ["trainer.spike_zscore=3", "trainer.spike_window=4", "faults.spike_at_step=7"]
    full = run(tmp_path / "full", *spike, "checkpoint.every=1", "checkpoint.keep=0")
    assert_same_weights(weights(full, 7), weights(full, 6))
    rows = {r["step"]: r for r in read_metrics(full) if "loss" in r}
    assert rows[7]["skipped_spikes"] == 1 and "skipped_spikes" not in rows[6]
    split = tmp_path / "split"
    run(split, *spike, "trainer.stop_at_step=6")
    run(split, *spike)
    assert train_losses(split) == train_losses(full)
    # negative control: without the restored window the resumed run would not detect the spike
    assert json.loads((split / "checkpoints/step_00000006/trainer.json").read_text())["faults"][
        "recent_losses"
    ] == [float(train_losses(full)[s]) for s in (3, 4, 5, 6)]

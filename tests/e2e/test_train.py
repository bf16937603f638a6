"""Training end to end in-process: run-dir contract, exact resume (with negative controls),
checkpoint policies and errors for bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from framework import checkpoint as ckpt_mod
from framework import train as train_mod
from framework.checkpoint import CheckpointError, load_model
from framework.config import ConfigError
from framework.data.loader import MixtureLoader
from framework.parallel import NonFiniteError
from framework.train import train
from tests.helpers import ROOT, TINY, checkout_env, make_cfg, read_metrics, train_losses

FINAL = "checkpoints/step_00000010"


def file_hashes(ckpt) -> dict[str, str]:
    """Each file's content hash as the manifest records it (xxh3_128)."""
    return {
        k: v["xxh3_128"] for k, v in json.loads((ckpt / "manifest.json").read_text())["files"].items()
    }


def run(tmp_path, name: str, *extra: str):
    cfg = make_cfg([*TINY, f"run.dir={tmp_path / name}", *extra])
    train(cfg)
    return tmp_path / name


@pytest.fixture(scope="module")
def reference(tmp_path_factory, sample_data):
    """An uninterrupted 10-step run: the reference for every resume test."""
    return run(tmp_path_factory.mktemp("ref"), "full")


def test_run_directory_contract(reference):
    names = {p.name for p in reference.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "train.log", "checkpoints"} <= names
    ck = reference / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000010"
    step = ck / "step_00000010"
    assert {"COMMITTED", "manifest.json", "trainer.json", "state", "rng"} <= {
        p.name for p in step.iterdir()
    }
    records = read_metrics(reference)
    assert [r["step"] for r in records] == list(range(1, 11))
    for r in records:
        assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu"} <= set(r)
        assert math.isfinite(r["loss"]) and r["tokens"] == r["step"] * 8 * 32
    # per-source token counters add up to everything drawn so far
    last = records[-1]
    drawn = sum(v for k, v in last.items() if k.startswith("data/tokens/"))
    assert drawn == last["tokens"]
    assert "model:" in (reference / "config.yaml").read_text()


def test_resume_is_bitwise_exact(tmp_path, reference):
    d = run(tmp_path, "split", "trainer.stop_at_step=6")
    assert max(train_losses(d)) == 6
    assert (d / "checkpoints/latest").read_text().strip() == "step_00000006"
    run(tmp_path, "split")  # a new invocation resumes from step 6 (resume=auto)
    assert train_losses(d) == train_losses(reference)
    grad = {r["step"]: repr(r["grad_norm"]) for r in read_metrics(d)}
    assert grad == {r["step"]: repr(r["grad_norm"]) for r in read_metrics(reference)}
    a, _ = load_model(d)
    b, _ = load_model(reference)
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k
    # A1 asks for every piece of state: the DCP data files (model and optimizer tensors) and each
    # rank's RNG file are byte-identical; the data position, the step (the LR schedule is a
    # function of it) and the NaN/spike detector window are equal.
    got, want = file_hashes(d / FINAL), file_hashes(reference / FINAL)
    tensors = [f for f in want if f.endswith(".distcp") or f.startswith("rng/")]
    assert tensors and all(got[f] == want[f] for f in tensors), (got, want)
    a, b = (json.loads((p / FINAL / "trainer.json").read_text()) for p in (d, reference))
    for key in ("step", "loader", "engine", "faults"):
        assert a[key] == b[key], key
    assert a["loader"]["position"] == 80  # 10 steps x 8 sequences


def test_resume_with_a_restarted_lr_schedule_diverges(tmp_path, reference, monkeypatch):
    """A2 (b), negative control: the scheduler's state is the resumed step; a resume that
    restarted the schedule at 0 (warmup again) must fail the equality the test above asserts."""
    run(tmp_path, "nosched", "trainer.stop_at_step=6")
    real = train_mod.lr_at
    monkeypatch.setattr(train_mod, "lr_at", lambda step, o, n: real(step - 6, o, n))
    d = run(tmp_path, "nosched")
    got, want = train_losses(d), train_losses(reference)
    assert all(got[s] == want[s] for s in range(1, 8))  # step 7's loss precedes its update
    assert any(got[s] != want[s] for s in range(8, 11))


def test_resume_without_rng_state_diverges(tmp_path, reference, monkeypatch):
    """Negative control: the test above would catch a lost RNG state (dropout masks)."""
    run(tmp_path, "norng", "trainer.stop_at_step=6")
    monkeypatch.setattr(ckpt_mod, "set_rng_state", lambda s: None)
    d = run(tmp_path, "norng")
    got, want = train_losses(d), train_losses(reference)
    assert all(got[s] == want[s] for s in range(1, 7))
    assert any(got[s] != want[s] for s in range(7, 11))


def test_resume_without_data_position_diverges(tmp_path, reference, monkeypatch):
    run(tmp_path, "nodata", "trainer.stop_at_step=6")
    monkeypatch.setattr(MixtureLoader, "load_state_dict", lambda self, sd: None)
    d = run(tmp_path, "nodata")
    got, want = train_losses(d), train_losses(reference)
    assert any(got[s] != want[s] for s in range(7, 11))


@pytest.mark.slow  # a train subprocess to kill (~15 s idle)
def test_kill_9_between_data_files_and_commit_resumes_from_the_previous(tmp_path, reference):
    """A4: a process killed while its step-8 checkpoint has data files and a manifest but no
    commit marker: no COMMITTED and no `latest` update; the next start removes the partial
    folder, resumes from step 6 and reproduces the reference losses bitwise."""
    d = run(tmp_path, "kill", "trainer.stop_at_step=6")
    partial = d / "checkpoints/.tmp-step_00000008"
    proc = subprocess.Popen(
        [sys.executable, "-m", "framework.train", *TINY, f"run.dir={d}", "checkpoint.every=8"],
        cwd=ROOT,
        env=checkout_env(FW_TEST_PAUSE_BEFORE_COMMIT="120"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (partial / "manifest.json").is_file():
        if proc.poll() is not None:
            pytest.fail(f"train exited {proc.returncode} before the save:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no step-8 save within 120 s")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (partial / "COMMITTED").exists() and not (d / "checkpoints/step_00000008").exists()
    assert (d / "checkpoints/latest").read_text().strip() == "step_00000006"
    run(tmp_path, "kill")
    assert not partial.exists()
    assert train_losses(d) == train_losses(reference)
    assert json.loads((d / FINAL / "trainer.json").read_text())["step"] == 10


def test_resume_required_without_checkpoint_fails_naming_path(tmp_path, sample_data):
    with pytest.raises(CheckpointError, match=str(tmp_path / "empty" / "checkpoints")):
        run(tmp_path, "empty", "checkpoint.resume=required")
    assert not list((tmp_path / "empty" / "checkpoints").glob("step_*"))


def test_unwritable_run_dir_is_refused(tmp_path, sample_data):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match=r"run.dir=.*file/run is not writable"):
        train(make_cfg([*TINY, f"run.dir={blocker}/run"]))


def test_retention_keeps_newest_and_latest(tmp_path, sample_data):
    d = run(tmp_path, "keep", "checkpoint.every=2", "checkpoint.keep=2")
    kept = sorted(p.name for p in (d / "checkpoints").glob("step_*"))
    assert kept == ["step_00000008", "step_00000010"]
    assert (d / "checkpoints/latest").read_text().strip() == "step_00000010"


def test_corrupt_checkpoint_is_refused_before_loading(tmp_path, sample_data):
    d = run(tmp_path, "bad", "trainer.stop_at_step=4")
    shard = next((d / "checkpoints/step_00000004/state").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # still parseable: DCP alone would load it silently
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{shard.name}: xxh3_128 \w+, expected \w+"):
        run(tmp_path, "bad")


def test_incomplete_checkpoint_is_ignored_and_cleaned(tmp_path, sample_data):
    d = run(tmp_path, "partial", "trainer.stop_at_step=4")
    partial = d / "checkpoints" / ".tmp-step_00000006"
    partial.mkdir()
    (partial / "trainer.json").write_text("{}")
    fake = d / "checkpoints" / "step_00000008"  # no COMMITTED marker: not a checkpoint
    fake.mkdir()
    run(tmp_path, "partial", "trainer.stop_at_step=6")
    assert not partial.exists()
    assert train_losses(d)[5]  # resumed from step 4, not 8
    assert json.loads((d / "checkpoints/step_00000006/trainer.json").read_text())["step"] == 6


def test_changed_model_shape_is_refused_on_resume(tmp_path, sample_data):
    run(tmp_path, "shape", "trainer.stop_at_step=4")
    with pytest.raises(CheckpointError, match=r"n_layer: checkpoint 2 vs config 3"):
        run(tmp_path, "shape", "model.n_layer=3")


def test_stop_at_step_keeps_schedule_of_max_steps(reference, tmp_path):
    d = run(tmp_path, "lr", "trainer.stop_at_step=3")
    assert {r["step"]: r["lr"] for r in read_metrics(d)} == {
        r["step"]: r["lr"] for r in read_metrics(reference) if r["step"] <= 3
    }


def test_nan_loss_stops_before_the_update_and_saves_nothing(tmp_path, sample_data, monkeypatch):
    """RELIABILITY B1: a NaN loss at step 3 stops the run before optimizer.step; the last
    checkpoint is step 2 and holds step 2's weights."""
    from framework.model.gpt import GPT

    real_forward, calls = GPT.forward, {"n": 0}

    def poisoned(self, idx, targets=None, *rest):
        out = real_forward(self, idx, targets, *rest)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] == 5:  # 2 micro-batches per step: the first one of step 3
                out = out * float("nan")
        return out

    monkeypatch.setattr(GPT, "forward", poisoned)
    with pytest.raises(NonFiniteError, match=r"step 3 \(rank 0\): loss is non-finite"):
        run(tmp_path, "nan", "checkpoint.every=1")
    ck = tmp_path / "nan" / "checkpoints"
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000001", "step_00000002"]
    assert max(train_losses(tmp_path / "nan")) == 2


def test_fp16_overflow_skips_step_halves_scale_and_logs(tmp_path, sample_data, monkeypatch):
    """An inf in the gradients (finite loss) at step 2: the update is skipped, the loss scale
    halves, and both show in metrics.jsonl; training continues."""
    from framework.model.gpt import GPT

    real_forward, calls = GPT.forward, {"n": 0}

    def overflowing(self, idx, targets=None, *rest):
        out = real_forward(self, idx, targets, *rest)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] == 3:  # the first micro-batch of step 2
                out.register_hook(lambda g: g * float("inf"))
        return out

    monkeypatch.setattr(GPT, "forward", overflowing)
    d = run(
        tmp_path, "fp16", "precision=fp16", "precision.initial_loss_scale=1024", "trainer.max_steps=4"
    )
    rows = read_metrics(d)
    assert [r.get("skipped", False) for r in rows] == [False, True, False, False]
    assert [r["loss_scale"] for r in rows] == [1024.0, 512.0, 512.0, 512.0]
    assert "fp16 gradient overflow: update skipped" in (d / "train.log").read_text()

"""Checkpoint commit protocol, latest fallback, retention with a failing delete, verification."""

from __future__ import annotations

import json
import shutil
import threading
from concurrent.futures import Future
from pathlib import Path

import pytest

from framework.checkpoint import Checkpointer, CheckpointError, resolve, verify
from framework.config import CheckpointConfig
from framework.data.shards import sha256_file
from framework.dist import Dist
from framework.metrics import JsonlSink


class FakeEngine:
    """Writes one file per save, like an engine's state dir."""

    def __init__(self):
        self.loaded = None

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        (path / "weights.bin").write_bytes(b"w" * 100)

    def load(self, path: Path) -> None:
        self.loaded = path


def save(ck: Checkpointer, step: int) -> Path:
    return ck.save(step, FakeEngine(), {"step": step, "model": {}, "tokenizer": "t"})


def test_commit_marker_manifest_and_latest(tmp_path):
    ck = Checkpointer(tmp_path, CheckpointConfig(keep=0), Dist())
    p = save(ck, 3)
    assert p.name == "step_00000003" and (p / "COMMITTED").is_file()
    files = json.loads((p / "manifest.json").read_text())["files"]
    assert set(files) == {"rng/rank_00000.pt", "state/weights.bin", "trainer.json"}
    assert files["state/weights.bin"]["bytes"] == 100
    assert ck.latest() == p and resolve(tmp_path.parent / tmp_path.name) == p


def test_latest_falls_back_to_newest_committed(tmp_path):
    ck = Checkpointer(tmp_path, CheckpointConfig(keep=0), Dist())
    save(ck, 2)
    save(ck, 4)
    (tmp_path / "latest").write_text("step_00000009\n")  # points at nothing
    assert ck.latest().name == "step_00000004"
    (tmp_path / "step_00000004" / "COMMITTED").unlink()
    assert ck.latest().name == "step_00000002"


def test_retention_survives_a_failing_delete(tmp_path, monkeypatch):
    ck = Checkpointer(tmp_path, CheckpointConfig(keep=2), Dist())
    real_rmtree = shutil.rmtree
    calls = {"n": 0}

    def flaky(path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 1 and Path(path).name.startswith("step_"):
            raise OSError("injected delete failure")
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", flaky)
    for step in range(1, 11):
        save(ck, step)
    kept = sorted(p.name for p in tmp_path.glob("step_*"))
    # the failed delete leaves one extra, never fewer than keep; latest's target survives
    assert kept[-2:] == ["step_00000009", "step_00000010"]
    assert len(kept) <= 3
    assert (tmp_path / "latest").read_text().strip() == "step_00000010"


def test_verify_names_missing_truncated_and_extra_files(tmp_path):
    ck = Checkpointer(tmp_path, CheckpointConfig(keep=0), Dist())
    p = save(ck, 1)
    (p / "state" / "weights.bin").write_bytes(b"w" * 99)
    (p / "state" / "extra.bin").write_bytes(b"x")
    (p / "trainer.json").rename(p / "moved.json")
    with pytest.raises(CheckpointError) as e:
        verify(p)
    msg = str(e.value)
    assert "weights.bin: 99 bytes, expected 100" in msg
    assert "trainer.json: missing" in msg
    assert "extra.bin: not in the manifest" in msg


def test_uncommitted_directory_is_not_a_checkpoint(tmp_path):
    (tmp_path / "step_00000005").mkdir()
    with pytest.raises(CheckpointError, match="not a committed checkpoint"):
        Checkpointer(tmp_path, CheckpointConfig(keep=0), Dist()).find_resume(
            "auto", str(tmp_path / "step_00000005")
        )


def test_jsonl_on_resume_drops_steps_past_the_checkpoint(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 10)))
    sink = JsonlSink(f, resume_step=6)
    sink.log({"step": 7, "loss": 0.5})
    sink.close()
    steps = [json.loads(x)["step"] for x in f.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6, 7]


class FullDiskEngine(FakeEngine):
    """The write fails the way a full disk or a read-only folder makes it fail (tests run as
    root, where chmod does not stop writes: inject the error)."""

    def __init__(self, error: BaseException):
        super().__init__()
        self.error = error

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        (path / "weights.bin").write_bytes(b"w" * 10)  # partly written
        raise self.error


@pytest.mark.parametrize(
    "error, named",
    [
        (OSError(28, "No space left on device"), "No space left on device"),
        (PermissionError(13, "Permission denied"), "Permission denied"),
        # what torch.save says on a full disk
        (
            RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 576 vs 470"),
            "disk is probably full",
        ),
    ],
)
def test_io_error_during_save_names_directory_and_keeps_latest(tmp_path, error, named):
    """Issue 8 failure 8 / Build 9."""
    ck = Checkpointer(tmp_path, CheckpointConfig(keep=0), Dist())
    save(ck, 2)
    with pytest.raises(CheckpointError) as e:
        ck.save(4, FullDiskEngine(error), {"step": 4, "model": {}, "tokenizer": "t"})
    msg = str(e.value)
    assert str(tmp_path / ".tmp-step_00000004") in msg and named in msg
    assert "still names step_00000002" in msg
    assert (tmp_path / "latest").read_text().strip() == "step_00000002"
    assert ck.latest().name == "step_00000002" and (tmp_path / ".tmp-step_00000004").is_dir()
    Checkpointer(tmp_path, CheckpointConfig(keep=0), Dist())  # the next start
    assert not (tmp_path / ".tmp-step_00000004").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000002"]


def test_fresh_start_is_logged_once_at_warning_by_rank_0_only(tmp_path, caplog):
    """RELIABILITY A10 / issue 8 failure 8: resume=auto on an empty folder warns once per run."""
    caplog.set_level("INFO", logger="framework")
    assert Checkpointer(tmp_path, CheckpointConfig(keep=0), Dist()).find_resume("auto", None) is None
    ck1 = Checkpointer.__new__(Checkpointer)  # rank 1 of 2 (no process group needed to look)
    ck1.root, ck1.keep, ck1.dist = tmp_path, 0, Dist(rank=1, world_size=2)
    assert ck1.find_resume("auto", None) is None
    fresh = [r for r in caplog.records if "fresh start" in r.getMessage()]
    assert [r.levelname for r in fresh] == ["WARNING"]


class OldZeroEngine(FakeEngine):
    def save(self, path: Path) -> None:
        (path / "zero").mkdir(parents=True)
        (path / "zero" / "mp_rank_00_model_states.pt").write_bytes(b"pickle")


def test_deepspeed_format_checkpoint_is_refused_before_anything_is_unpickled(tmp_path):
    ck = Checkpointer(tmp_path, CheckpointConfig(keep=0), Dist())
    p = ck.save(1, OldZeroEngine(), {"step": 1, "model": {}, "tokenizer": "t"})
    engine = FakeEngine()
    with pytest.raises(CheckpointError, match="state/zero: DeepSpeed's own checkpoint files"):
        ck.load(p, engine, expect_shape={}, tokenizer_fingerprint="t")
    assert engine.loaded is None


def flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_manifest_xxh3_detects_one_flipped_byte(tmp_path):
    """Issue 8 item 8: the faster manifest hash (xxh3_128) still catches any flipped byte."""
    p = save(Checkpointer(tmp_path, CheckpointConfig(keep=0), Dist()), 1)
    entry = json.loads((p / "manifest.json").read_text())["files"]["state/weights.bin"]
    assert set(entry) == {"bytes", "xxh3_128"}
    verify(p)
    flip_middle_byte(p / "state" / "weights.bin")  # same size: only the hash can tell
    with pytest.raises(CheckpointError, match=r"state/weights.bin: xxh3_128 [0-9a-f]{32}, expected"):
        verify(p)


def test_sha256_manifest_of_an_older_checkpoint_still_verifies(tmp_path):
    p = save(Checkpointer(tmp_path, CheckpointConfig(keep=0), Dist()), 1)
    mf = p / "manifest.json"
    files = json.loads(mf.read_text())["files"]
    old = {f: {"bytes": e["bytes"], "sha256": sha256_file(p / f)} for f, e in files.items()}
    mf.write_text(json.dumps({"files": old}))
    verify(p)
    flip_middle_byte(p / "trainer.json")
    with pytest.raises(CheckpointError, match=r"trainer.json: sha256 [0-9a-f]{64}, expected"):
        verify(p)


class AsyncFakeEngine(FakeEngine):
    """save_async returns a Future the test resolves: the write 'finishes' when it says so."""

    def __init__(self):
        super().__init__()
        self.write: Future | None = None

    def save_async(self, path: Path, group, stager) -> Future:
        path.mkdir(parents=True, exist_ok=True)
        (path / "weights.bin").write_bytes(b"w" * 100)
        self.write = Future()
        return self.write


def test_async_save_commits_only_after_the_write_and_prunes_after_commit(tmp_path):
    """RELIABILITY A6 (protocol): until the write finished nothing is committed, `latest` and
    keep-k's checkpoints stay as they were; finish() waits for the write, then commits and prunes."""
    ck = Checkpointer(tmp_path, CheckpointConfig(keep=2, async_save=True), Dist())
    engine = AsyncFakeEngine()
    for step in (2, 4):
        ck.save(step, engine, {"step": step, "model": {}, "tokenizer": "t"})
        engine.write.set_result(None)
    ck.save(6, engine, {"step": 6, "model": {}, "tokenizer": "t"})  # commits 4, dispatches 6
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000004"]
    assert (tmp_path / "latest").read_text().strip() == "step_00000004"
    assert (tmp_path / ".tmp-step_00000006").is_dir()

    def late_write():  # a file that appears just before the write completes is in the manifest
        (tmp_path / ".tmp-step_00000006" / "state" / "late.bin").write_bytes(b"late")
        engine.write.set_result(None)

    threading.Timer(0.2, late_write).start()
    ck.finish()  # blocks until the write resolved
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000004", "step_00000006"]
    assert (tmp_path / "latest").read_text().strip() == "step_00000006"
    assert (
        "state/late.bin" in json.loads((tmp_path / "step_00000006/manifest.json").read_text())["files"]
    )
    assert verify(tmp_path / "step_00000006")["step"] == 6
    ck.finish()  # nothing pending: a no-op


def test_failed_async_write_names_the_folder_and_commits_nothing(tmp_path):
    ck = Checkpointer(tmp_path, CheckpointConfig(keep=0, async_save=True), Dist())
    engine = AsyncFakeEngine()
    ck.save(2, engine, {"step": 2, "model": {}, "tokenizer": "t"})
    engine.write.set_exception(OSError(28, "No space left on device"))
    with pytest.raises(
        CheckpointError, match=r"could not write checkpoint .*\.tmp-step_00000002.*No space"
    ):
        ck.finish()
    assert not (tmp_path / "latest").exists() and not list(tmp_path.glob("step_*"))


def test_latest_commits_the_async_save_in_flight_first(tmp_path):
    """on_nan=rollback asks for latest() while step N's save may still be in flight: that save
    (taken before the bad step) is committed and named, not the one before it."""
    ck = Checkpointer(tmp_path, CheckpointConfig(keep=0, async_save=True), Dist())
    engine = AsyncFakeEngine()
    ck.save(2, engine, {"step": 2, "model": {}, "tokenizer": "t"})
    engine.write.set_result(None)
    assert not (tmp_path / "latest").exists()
    assert ck.latest() == tmp_path / "step_00000002"
    assert (tmp_path / "latest").read_text().strip() == "step_00000002"

"""Checkpoint commit protocol, latest fallback, retention with a failing delete, verification."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from framework.checkpoint import Checkpointer, CheckpointError, resolve, verify
from framework.metrics import JsonlSink
from framework.parallel.dist import Dist


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
    ck = Checkpointer(tmp_path, keep=0, dist=Dist())
    p = save(ck, 3)
    assert p.name == "step_00000003" and (p / "COMMITTED").is_file()
    files = json.loads((p / "manifest.json").read_text())["files"]
    assert set(files) == {"rng/rank_00000.pt", "state/weights.bin", "trainer.json"}
    assert files["state/weights.bin"]["bytes"] == 100
    assert ck.latest() == p and resolve(tmp_path.parent / tmp_path.name) == p


def test_latest_falls_back_to_newest_committed(tmp_path):
    ck = Checkpointer(tmp_path, keep=0, dist=Dist())
    save(ck, 2)
    save(ck, 4)
    (tmp_path / "latest").write_text("step_00000009\n")  # points at nothing
    assert ck.latest().name == "step_00000004"
    (tmp_path / "step_00000004" / "COMMITTED").unlink()
    assert ck.latest().name == "step_00000002"


def test_retention_survives_a_failing_delete(tmp_path, monkeypatch):
    ck = Checkpointer(tmp_path, keep=2, dist=Dist())
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
    ck = Checkpointer(tmp_path, keep=0, dist=Dist())
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
        Checkpointer(tmp_path, keep=0, dist=Dist()).find_resume("auto", str(tmp_path / "step_00000005"))


def test_jsonl_on_resume_drops_steps_past_the_checkpoint(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 10)))
    sink = JsonlSink(f, resume_step=6)
    sink.log({"step": 7, "loss": 0.5})
    sink.close()
    steps = [json.loads(x)["step"] for x in f.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6, 7]

"""RELIABILITY A7 (retention: exactly k remain despite a failed delete; latest's target always
exists) and A10 (a mistyped checkpoint.path fails fast naming it, for every resume mode that
reads it); A11 for the tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from framework.checkpoint import Checkpointer, CheckpointError
from framework.config import CheckpointConfig
from framework.dist import Dist
from tests.unit.test_checkpoint import FakeEngine, save


def test_keep_2_over_10_saves_with_a_failed_delete_leaves_exactly_2(tmp_path, monkeypatch):
    ck = Checkpointer(tmp_path, CheckpointConfig(keep=2), Dist())
    real_rmtree, failed = shutil.rmtree, []

    def flaky(path, *a, **k):
        if not failed and Path(path).name.startswith("step_"):
            failed.append(Path(path).name)
            raise PermissionError(13, "injected delete failure", str(path))
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", flaky)
    for step in range(1, 11):
        save(ck, step)
        target = tmp_path / (tmp_path / "latest").read_text().strip()
        assert (target / "COMMITTED").is_file(), step  # latest's target is never deleted
        complete = [p for p in tmp_path.glob("step_*") if (p / "COMMITTED").is_file()]
        assert 1 <= len(complete) <= 3, step  # one extra only while a delete failed
    assert failed == ["step_00000001"]
    # the next save retried the failed delete: exactly keep complete checkpoints remain
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000009", "step_00000010"]


@pytest.mark.parametrize("mode", ["required", "auto"])
def test_mistyped_checkpoint_path_fails_naming_it(tmp_path, mode):
    ck = Checkpointer(tmp_path / "checkpoints", CheckpointConfig(keep=0), Dist())
    save(ck, 2)  # a good checkpoint exists: it must not be picked instead of the named one
    typo = tmp_path / "checkpoints" / "step_0000002"
    with pytest.raises(CheckpointError, match=rf"checkpoint.path={typo} is not a committed checkpoint"):
        ck.find_resume(mode, str(typo))


def test_changed_tokenizer_refused_on_resume_before_loading(tmp_path):
    """A11: a checkpoint saved with one tokenizer does not load under another: the error names
    data.tokenizer with the old and new fingerprints, and no engine state is read."""
    ck = Checkpointer(tmp_path, CheckpointConfig(keep=0), Dist())
    p = ck.save(2, FakeEngine(), {"step": 2, "model": {"n_layer": 2}, "tokenizer": "byte-v1"})
    engine = FakeEngine()
    with pytest.raises(
        CheckpointError, match=r"data.tokenizer: checkpoint 'byte-v1' vs config 'bpe-v2'"
    ):
        ck.load(p, engine, expect_shape={"n_layer": 2}, tokenizer_fingerprint="bpe-v2")
    assert engine.loaded is None

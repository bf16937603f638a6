"""A resume on other data (issue 8 failure 3, RELIABILITY A11): the checkpoint records each
source's manifest fingerprint, the tokenizer, seq_len and the mixture; a change is refused naming
it, unless data.allow_change_on_resume=true, which logs it and keeps positions by source name."""

from __future__ import annotations

import json
import shutil

import pytest

from framework.checkpoint import CheckpointError
from framework.train import train
from tests.e2e.test_data_errors import source
from tests.helpers import TINY, make_cfg, read_metrics


def run(tmp_path, srcs: dict, steps: int, *extra):
    spec = ",".join(f"{{name:{n},path:'{p}',weight:{w}}}" for n, (p, w) in srcs.items())
    cfg = make_cfg(
        [
            *TINY,
            f"data.sources=[{spec}]",
            f"run.dir={tmp_path}/run",
            f"data.cache_dir={tmp_path}/cache",
            f"trainer.max_steps={steps}",
            *extra,
        ]
    )
    return train(cfg)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Two sources and a run of 2 steps on them, trained once for the module."""
    root = tmp_path_factory.mktemp("base")
    a, b = source(root / "a", n_docs=80), source(root / "b", n_docs=80, seed=1)
    run(root, {"a": (a, 0.7), "b": (b, 0.3)}, 2)
    return root, a, b


@pytest.fixture
def two_sources(tmp_path, base):
    """This test's copy of the base run directory (and verification cache); the sources are shared."""
    root, a, b = base
    shutil.copytree(root / "run", tmp_path / "run")
    shutil.copytree(root / "cache", tmp_path / "cache")
    return a, b


def ckpt_names(tmp_path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))


def test_checkpoint_records_the_data_identity(tmp_path, two_sources):
    state = json.loads((tmp_path / "run/checkpoints/step_00000002/trainer.json").read_text())
    data = state["data"]
    assert set(data["sources"]) == {"a", "b"}
    assert data["sources"]["a"]["fingerprint"] != data["sources"]["b"]["fingerprint"]
    assert data["weights"] == {"a": 0.7, "b": 0.3} and data["seq_len"] == 32 and data["schedule"] == []


def test_swapped_source_paths_refused_naming_both(tmp_path, two_sources):
    a, b = two_sources
    with pytest.raises(CheckpointError) as e:
        run(tmp_path, {"a": (b, 0.7), "b": (a, 0.3)}, 3)
    msg = str(e.value)
    assert "source 'a': manifest fingerprint" in msg and "source 'b': manifest fingerprint" in msg
    assert f"({a}) in the checkpoint vs" in msg and f"({b}) now" in msg
    assert "data.allow_change_on_resume=true" in msg
    assert ckpt_names(tmp_path) == ["step_00000002"]


def test_changed_weight_refused(tmp_path, two_sources):
    a, b = two_sources
    with pytest.raises(CheckpointError, match=r"source 'b' weight: 0.3 in the checkpoint vs 0.5 now"):
        run(tmp_path, {"a": (a, 0.7), "b": (b, 0.5)}, 3)
    assert ckpt_names(tmp_path) == ["step_00000002"]


def test_allow_change_trains_logs_and_maps_positions_by_name(tmp_path, two_sources):
    a, b = two_sources
    c = source(tmp_path / "c", n_docs=80, seed=2)
    saved = json.loads((tmp_path / "run/checkpoints/step_00000002/trainer.json").read_text())
    before = saved["loader"]["counts"]
    # b removed, c added, a's weight changed: allowed, logged, a keeps its position
    run(tmp_path, {"a": (a, 0.5), "c": (c, 0.5)}, 3, "data.allow_change_on_resume=true")
    log = (tmp_path / "run" / "train.log").read_text()
    assert "WARNING resuming" in log and "data.allow_change_on_resume=true" in log
    assert "source 'a' weight: 0.7 in the checkpoint vs 0.5 now" in log
    assert "data source 'b' is gone" in log and "data source 'c' is new" in log
    after = json.loads((tmp_path / "run/checkpoints/step_00000003/trainer.json").read_text())["loader"]
    drawn = after["counts"]["a"] - before["a"] + after["counts"]["c"]
    assert drawn == 8 and after["counts"]["a"] >= before["a"]  # one step of 8 samples from a's position
    # the new data is the checkpoint's now: a plain resume continues without the flag
    run(tmp_path, {"a": (a, 0.5), "c": (c, 0.5)}, 4)
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r] == [1, 2, 3, 4]


def test_changed_seq_len_refused(tmp_path, two_sources):
    a, b = two_sources
    with pytest.raises(CheckpointError, match=r"trainer.seq_len: 32 in the checkpoint vs 16 now"):
        run(tmp_path, {"a": (a, 0.7), "b": (b, 0.3)}, 3, "trainer.seq_len=16")

"""A resume names every config key it changes beyond those a resume may change (issue 9:
`resuming with a changed config ... warns naming the keys`)."""

from __future__ import annotations

from framework.config import resume_changes, to_dict
from framework.train import train
from tests.helpers import TINY, make_cfg


def test_changed_keys_are_named_with_old_and_new():
    saved = to_dict(make_cfg(TINY))
    cfg = make_cfg([*TINY, "optim.weight_decay=0.0", "trainer.seed=7", "model.dropout=0.2"])
    assert resume_changes(saved, cfg) == [
        "model.dropout: 0.1 -> 0.2",
        "optim.weight_decay: 0.1 -> 0.0",
        "trainer.seed: 1337 -> 7",
    ]


def test_keys_a_resume_may_change_are_not_named():
    saved = to_dict(make_cfg(TINY))
    cfg = make_cfg([*TINY, "run.dir=elsewhere", "checkpoint.every=5", "strategy=zero2",
                    "trainer.log_every=3", "trainer.max_steps=20", "logger=tensorboard"])  # fmt: skip
    assert resume_changes(saved, cfg) == []
    assert resume_changes(None, cfg) == []  # a checkpoint from before saved configs


def test_resume_logs_the_changed_keys(tmp_path, sample_data):
    base = [*TINY, f"run.dir={tmp_path}", "trainer.max_steps=4"]
    train(make_cfg([*base, "trainer.stop_at_step=2"]))
    train(make_cfg([*base, "optim.weight_decay=0.0"]))
    lines = [ln for ln in (tmp_path / "train.log").read_text().splitlines() if "changed config" in ln]
    assert len(lines) == 1 and "WARNING" in lines[0], lines
    assert lines[0].endswith("with a changed config: optim.weight_decay: 0.1 -> 0.0")

"""Ends of runs: the summary as a pure function of metrics.jsonl records, the warning of a
resume that moves the LR schedule, and progress lines printed once on a terminal."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import sys

import pytest

from framework import metrics
from framework.config import Config
from framework.optim import schedule_change_warning

RECORDS = [
    {"step": 0, "val_loss": 5.6, "val_loss/a": 5.5, "val_loss/b": 5.7, "val_ppl": 270.0},
    {"step": 1, "loss": 5.0, "lr": 1e-4, "tokens": 256, "tokens_per_s": 100.0, "mfu": None},
    {"step": 2, "loss": 4.0, "lr": 2e-4, "tokens": 512, "tokens_per_s": 200.0, "mfu": None},
    {"step": 3, "loss": 3.0, "lr": 3e-4, "tokens": 768, "tokens_per_s": 100.0, "mfu": 0.2},
    {"step": 4, "loss": 2.5, "lr": 3e-4, "tokens": 1024, "tokens_per_s": 400.0, "mfu": 0.4},
    {"step": 4, "val_loss": 2.75, "val_loss/a": 2.5, "val_loss/b": 3.0, "val_ppl": 15.6},
]


def test_summary_of_a_resumed_invocation():
    s = metrics.summarize(RECORDS, start_step=2, max_steps=10, wall_s=12.5)
    assert (s["steps_run"], s["first_step"], s["last_step"], s["max_steps"]) == (2, 3, 4, 10)
    assert (s["tokens"], s["tokens_run"], s["wall_s"], s["last_loss"]) == (1024, 512, 12.5, 2.5)
    # 512 tokens over 256/100 + 256/400 = 3.2 s of step time: 160 tokens/s, not the mean 250
    assert s["tokens_per_s"] == pytest.approx(160.0)
    assert s["mfu"] == pytest.approx(0.3)
    assert (s["val_step"], s["val_loss"], s["val_loss_per_source"]) == (4, 2.75, {"a": 2.5, "b": 3.0})


def test_summary_of_the_whole_run_and_of_nothing():
    s = metrics.summarize(RECORDS)
    assert (s["steps_run"], s["tokens_run"], s["mfu"]) == (4, 1024, pytest.approx(0.3))
    assert s["tokens_per_s"] == pytest.approx(1024 / (2.56 + 1.28 + 2.56 + 0.64))
    empty = metrics.summarize([], start_step=5, max_steps=5)
    assert (empty["steps_run"], empty["last_step"], empty["tokens"], empty["val_loss"]) == (
        0,
        5,
        None,
        None,
    )
    assert metrics.summary_rows(empty) == [("steps", "0 this run; at step 5 of 5")]


def test_summary_rows_read_as_numbers():
    rows = dict(metrics.summary_rows(metrics.summarize(RECORDS, 2, 10, 12.5)))
    assert rows == {
        "steps": "2 this run (3..4); at step 4 of 10",
        "tokens": "512 this run; 1,024 in total",
        "wall time": "12.5 s",
        "last train loss": "2.5000",
        "val loss (step 4)": "2.7500  (a 2.5000  b 3.0000)",
        "mean tokens/s": "160",
        "mean MFU": "30.0%",
    }


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@contextlib.contextmanager
def fake_terminal(monkeypatch, log_file):
    """stdout and stderr as one terminal, the framework logger set up on it and on train.log.
    Patched inside the test body: pytest's capture re-binds sys.stderr at each test phase."""
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.setattr(sys, "stdout", term)
    metrics.setup_logging(0, log_file)
    try:
        yield term
    finally:
        for h in metrics.log.handlers:
            h.close()
        metrics.log.handlers.clear()


def test_eval_line_once_on_a_terminal_and_in_train_log(monkeypatch, tmp_path):
    with fake_terminal(monkeypatch, tmp_path / "train.log") as terminal:
        p = metrics.Progress(0, 10, 1)
        assert p.bar is not None
        p.write("eval step 5: val_loss 2.0000")
        p.update({"step": 1, "loss": 3.0, "lr": 1e-4, "grad_norm": 1.0, "tokens_per_s": 10.0})
        metrics.log.warning("a warning during the bar")
        p.close()
        # the console handler is the logger's own again once the bar is gone
        assert any(type(h) is logging.StreamHandler for h in metrics.log.handlers)
    assert terminal.getvalue().count("eval step 5: val_loss 2.0000") == 1
    assert terminal.getvalue().count("a warning during the bar") == 1
    log_text = (tmp_path / "train.log").read_text()
    assert log_text.count("eval step 5") == 1 and log_text.count("a warning during the bar") == 1


def test_summary_is_a_table_on_a_terminal_and_lines_in_train_log(monkeypatch, tmp_path):
    with fake_terminal(monkeypatch, tmp_path / "train.log") as terminal:
        metrics.show_summary(metrics.summarize(RECORDS, 2, 10, 12.5), terminal=True)
    out = terminal.getvalue()
    assert "run summary" in out and "2 this run (3..4); at step 4 of 10" in out and "│" in out
    assert "mean tokens/s: 160" in (tmp_path / "train.log").read_text()
    assert "mean tokens/s: 160" not in out  # the plain lines are the file's, not a second copy


def test_summary_as_log_lines_off_a_terminal(tmp_path):
    metrics.setup_logging(0, tmp_path / "train.log")
    try:
        metrics.show_summary(metrics.summarize(RECORDS, 2, 10, 12.5), terminal=False)
    finally:
        for h in metrics.log.handlers:
            h.close()
    assert "  mean MFU: 30.0%" in (tmp_path / "train.log").read_text()


def test_schedule_change_warning_names_keys_and_lrs():
    cfg = Config()  # cosine, lr 6e-4, min_lr_ratio 0.1, warmup 10, max_steps 200
    saved = {"trainer": {"max_steps": 100}, "optim": {"lr": 6e-4, "min_lr_ratio": 0.1, "warmup_steps": 10,
             "schedule": "cosine", "decay_fraction": 0.2}}  # fmt: skip
    msg = schedule_change_warning(saved, cfg, 100)
    # old: step 101 is past the end of a 100-step cosine: min_lr; new: 91/190 of the way down
    new_lr = 6e-5 + 0.5 * (6e-4 - 6e-5) * (1 + math.cos(math.pi * 91 / 190))
    assert msg == (
        "resuming from step 100 with a changed LR schedule: trainer.max_steps 100 -> 200; the LR of "
        f"step 101 moves from 6e-05 to {new_lr:.3g} (keep the checkpoint's values to continue the old schedule)"
    )
    saved["optim"].update(lr=3e-4, schedule="constant")
    msg = schedule_change_warning(saved, cfg, 100)
    assert "optim.lr 0.0003 -> 0.0006" in msg and "optim.schedule 'constant' -> 'cosine'" in msg
    assert "moves from 0.0003 to" in msg
    same = {"trainer": {"max_steps": 200}, "optim": {"lr": 6e-4}}
    assert schedule_change_warning(same, cfg, 100) is None
    assert schedule_change_warning(None, cfg, 100) is None

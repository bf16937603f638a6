"""Ends of runs through the real loop (in-process): the summary, a finished run launched again
does nothing and touches nothing, a resume that moves the LR schedule warns with numbers."""

from __future__ import annotations

from framework.train import train
from tests.helpers import TINY, make_cfg, read_metrics


def snapshot(run_dir) -> dict:
    """Every file of the run dir with its bytes and mtime (train.log aside: it records the run)."""
    return {
        str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != "train.log"
    }


def test_summary_nothing_to_do_and_schedule_warning(tmp_path, sample_data, capsys):
    d = tmp_path / "run"
    args = [*TINY, f"run.dir={d}", "trainer.max_steps=4"]
    train(make_cfg(args))
    err = capsys.readouterr().err
    assert "run summary:" in err and "steps: 4 this run (1..4); at step 4 of 4" in err
    assert f"tokens: {4 * 8 * 32:,} this run; {4 * 8 * 32:,} in total" in err

    before = snapshot(d)
    assert train(make_cfg(args)) == {}
    err = capsys.readouterr().err
    assert "already at max_steps=4 (checkpoint step 4), nothing to do" in err
    assert "run summary" not in err
    assert snapshot(d) == before  # metrics.jsonl, config.yaml and checkpoints untouched

    train(make_cfg([*args, "trainer.max_steps=6"]))
    err = capsys.readouterr().err
    assert "WARNING resuming from step 4 with a changed LR schedule: trainer.max_steps 4 -> 6;" in err
    assert "steps: 2 this run (5..6); at step 6 of 6" in err
    assert [r["step"] for r in read_metrics(d) if "loss" in r] == [1, 2, 3, 4, 5, 6]

"""`python -m framework.report run.dir=...`: the end-of-run summary of any run directory, also
one still being written, and a redrawn loss.png."""

from __future__ import annotations

import json

import pytest

from framework.errors import EXIT_CONFIG
from framework.metrics import summarize
from framework.train import train
from tests.helpers import TINY, make_cfg, read_metrics, run_module


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, sample_data):
    d = tmp_path_factory.mktemp("report") / "run"
    train(make_cfg([*TINY, "trainer.max_steps=4", "trainer.eval_every=2", f"run.dir={d}"]))
    return d


def test_report_prints_the_summary_and_redraws_loss_png(run_dir, tmp_path):
    (run_dir / "loss.png").unlink()
    out = run_module("framework.report", f"run.dir={run_dir}", cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    want = summarize(read_metrics(run_dir), 0, 4)
    assert got == json.loads(json.dumps(want))
    assert got["steps_run"] == 4 and got["last_step"] == 4 and got["max_steps"] == 4
    assert set(got["val_loss_per_source"]) == {"markov", "zipf", "arith"}
    assert "run summary" in out.stderr and "val loss (step 4)" in out.stderr
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_of_a_run_still_being_written(run_dir, tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    train_lines = [ln for ln in lines if '"loss"' in ln]
    # two complete steps, then a line cut mid-write
    (live / "metrics.jsonl").write_text("\n".join(train_lines[:2]) + "\n" + train_lines[2][:17])
    out = run_module("framework.report", f"run.dir={live}", "plot=false", cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["steps_run"] == 2 and got["last_step"] == 2 and got["max_steps"] is None
    assert not (live / "loss.png").exists()


def test_report_of_a_directory_without_metrics_is_one_clean_error(tmp_path):
    out = run_module("framework.report", f"run.dir={tmp_path}", cwd=tmp_path, timeout=120)
    assert out.returncode == EXIT_CONFIG
    assert "no metrics.jsonl" in out.stderr and "Traceback" not in out.stderr


def test_report_of_a_hung_run_prints_the_diagnosis_first(tmp_path):
    """A run that hung before its first logged step: no metrics.jsonl, only stacks/. The report
    prints which rank is behind on which collective, and the JSON line carries it."""
    stacks = tmp_path / "run" / "stacks"
    stacks.mkdir(parents=True)
    for rank, entries in ((0, [[1, True], [2, False]]), (1, [[1, True]])):
        rec = {"rank": rank, "world_size": 2, "host": "n0", "step": 1, "source": "torch",
               "entries": [{"seq": s, "op": "nccl:all_gather", "group": "0", "group_desc": "default_pg",
                            "sizes": [[64]], "completed": c, "entered_ns": s} for s, c in entries]}  # fmt: skip
        (stacks / f"flight_rank_{rank}.json").write_text(json.dumps(rec))
    out = run_module("framework.report", f"run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.startswith("hang diagnosis")
    assert "=> rank(s) 1 behind: never entered collective #2 nccl:all_gather sizes [[64]]" in out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["hang"]["behind"] == [1] and got["steps_run"] == 0

"""RELIABILITY B8 (straggler alarm) and the profiler on two gloo ranks, in ONE launch: rank 1
sleeps faults.slow_ms in every step (faults.slow_rank) and is named a straggler within the
checks of an 8-step run (trainer.straggler_every=2, 3 slow checks in a row: by step 6); both
ranks trace steps 3-4 (trainer.profile.steps, a window inside the run). The healthy run that
names nobody and makes no profiler is test_faults.py's uninterrupted reference run."""

from __future__ import annotations

import json

import pytest

from framework.metrics import summary_rows
from framework.report import ReportConfig, ReportRun, report
from tests.distributed.launch import run_train
from tests.helpers import read_metrics

pytestmark = pytest.mark.slow

SLOW_MS = 150  # the tiny model's lead to its first collective is ~10-60 ms here: >= 2x slower


@pytest.fixture(scope="module")
def slow_run(tmp_path_factory, sample_data):
    run_dir = tmp_path_factory.mktemp("straggler") / "run"
    proc = run_train(
        run_dir, "strategy=ddp", "trainer.straggler_every=2", "faults.slow_rank=1",
        f"faults.slow_ms={SLOW_MS}", "trainer.profile.steps=[3,4]",
    )  # fmt: skip
    return run_dir, proc.stdout + proc.stderr


def test_slow_rank_is_named_a_straggler_in_the_log_metrics_and_summary(slow_run):
    run_dir, out = slow_run
    warnings = [ln for ln in out.splitlines() if "WARNING straggler: rank" in ln]
    assert warnings and all("straggler: rank 1 (host " in ln for ln in warnings), out[-3000:]
    assert "waits on compute" in warnings[0] and "checks in a row" in warnings[0]
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    checks = [r for r in records if "straggler/max_ratio" in r]
    assert [r["step"] for r in checks] == [2, 4, 6, 8]
    named = [r for r in records if "straggler/rank" in r]
    assert named and {r["straggler/rank"] for r in named} == {1}
    assert named[0]["step"] <= 8 and all(r["straggler/ratio"] > 1.2 for r in named)
    assert "stragglers: rank 1 named at" in out  # the run summary (rank 0's log)


def test_each_rank_traces_exactly_the_chosen_steps_and_the_report_shows_the_phases(slow_run):
    run_dir, _ = slow_run
    for rank in (0, 1):
        events = json.loads((run_dir / f"profile/step_3/rank_{rank}.json").read_text())["traceEvents"]
        names = {e.get("name", "") for e in events}
        assert {n for n in names if n.startswith("ProfilerStep#")} == {
            "ProfilerStep#3",
            "ProfilerStep#4",
        }
        assert any(n.startswith("gloo:all_reduce") or "allreduce" in n.lower() for n in names), rank
    summary = report(ReportConfig(run=ReportRun(dir=str(run_dir)), plot=False))
    assert set(summary["time_s"]) >= {"step", "data", "forward_backward", "optimizer"}
    assert summary["time_s"]["step"]["steps"] == 8  # log_every=1: every step measured
    assert summary["stragglers"]["named"]["1"]["checks"] >= 1
    rows = dict(summary_rows(summary))
    assert rows["  data wait"].startswith("mean ") and rows["stragglers"].startswith("rank 1 named at")

"""trainer.profile on one process: the trace holds exactly the chosen steps (ProfilerStep#<n>
markers, our step numbers) and real operators, the top-operator table is written and logged.
A window inside the run, on two ranks, and a run without one: tests/distributed/test_observe.py;
which profiler is built: tests/unit/test_observe.py."""

from __future__ import annotations

import json

from framework.train import train
from tests.helpers import TINY, make_cfg


def profiled_steps(trace_path) -> tuple[set[str], set[str]]:
    """(ProfilerStep#n names, other event names) of a Chrome trace."""
    events = json.loads(trace_path.read_text())["traceEvents"]
    names = {e.get("name", "") for e in events}
    return {n for n in names if n.startswith("ProfilerStep#")}, names


def test_profile_window_ending_at_the_last_step_traces_exactly_those_steps(tmp_path, sample_data):
    run_dir = tmp_path / "run"
    train(make_cfg([*TINY, "trainer.max_steps=4", "trainer.profile.steps=[3,4]", f"run.dir={run_dir}"]))
    out = run_dir / "profile" / "step_3"
    assert sorted(p.name for p in out.iterdir()) == ["rank_0.json", "rank_0.txt"]
    steps, names = profiled_steps(out / "rank_0.json")
    assert steps == {"ProfilerStep#3", "ProfilerStep#4"}  # saved by the run's end (close)
    assert {"aten::mm", "aten::addmm"} & names and any("Optimizer.step" in n for n in names)
    table = (out / "rank_0.txt").read_text()
    assert "Self CPU" in table and "aten::" in table
    logged = (run_dir / "train.log").read_text()
    assert "profile of steps 3-4" in logged and "top operators by self time" in logged

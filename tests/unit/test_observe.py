"""framework.observe and its neighbours, without a process group: the straggler judgement and its
lead measure, the memory snapshot (CUDA calls faked) and its OOM path through train(), the
step timer's sync decision, the Watchdog's flight record, the hang diagnosis of
framework.report, and the phase/straggler numbers of the run summary."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import torch

from framework import dist as dist_mod
from framework import faults, observe
from framework.config import ProfileConfig, validate
from framework.metrics import summarize, summary_rows
from framework.parallel.engine import TorchEngine
from framework.perf import StepTimer
from framework.report import hang_diagnosis, top_frames
from framework.train import train
from tests.helpers import TINY, make_cfg


# -- stragglers -----------------------------------------------------------------------------
class FakeDist:
    """The two things StragglerCheck asks of Dist besides the all-gather."""

    def __init__(self, world: int, entries: list[dict] | None = None):
        self.world_size, self.rank, self.is_main, self.device = world, 0, True, torch.device("cpu")
        self.entries = entries or []

    def all_gather_object(self, obj) -> list:
        return [f"node{r}" for r in range(self.world_size)]

    def flight_record(self) -> dict:
        return {"source": "torch", "entries": self.entries}


def check(world: int = 4, factor: float = 1.2) -> observe.StragglerCheck:
    return observe.StragglerCheck(every=2, factor=factor, dist=FakeDist(world), start=0)


def test_a_rank_slow_three_checks_in_a_row_is_named_with_host_and_cause(caplog):
    c = check()
    healthy = [[0.10, 0.01], [0.11, 0.01], [0.10, 0.01], [0.10, 0.01]]
    slow = [[0.10, 0.01], [0.10, 0.01], [0.25, 0.01], [0.11, 0.01]]  # rank 2: 2.4x the median 0.105
    with caplog.at_level(logging.WARNING, logger="framework"):
        assert c.judge(2, healthy) == {"straggler/max_ratio": pytest.approx(0.11 / 0.10)}
        assert "straggler/rank" not in c.judge(4, slow)
        assert "straggler/rank" not in c.judge(6, slow)
        assert not caplog.records
        out = c.judge(8, slow)
    assert out["straggler/rank"] == 2 and out["straggler/ratio"] == pytest.approx(0.25 / 0.105)
    (rec,) = caplog.records
    msg = rec.getMessage()
    assert "straggler: rank 2 (host node2)" in msg and "0.250 s" in msg and "0.105 s" in msg
    assert "2.38x" in msg and "3 checks in a row" in msg and "waits on compute" in msg
    # one healthy check resets the count: three more slow ones before it is named again
    c.judge(10, healthy)
    assert "straggler/rank" not in c.judge(12, slow) and "straggler/rank" not in c.judge(14, slow)


def test_data_wait_is_named_as_the_cause_and_jitter_below_the_floor_is_not_slow(caplog):
    c = check()
    data_slow = [[0.10, 0.01], [0.10, 0.01], [0.30, 0.20], [0.10, 0.01]]
    with caplog.at_level(logging.WARNING, logger="framework"):
        for step in (2, 4, 6):
            out = c.judge(step, data_slow)
    assert out["straggler/rank"] == 2 and "waits on data" in caplog.records[-1].getMessage()
    # 2x the median but 2 ms: the host leads of a GPU run, not a straggler
    c = check()
    for step in (2, 4, 6, 8):
        out = c.judge(step, [[0.002, 0.0], [0.002, 0.0], [0.004, 0.0], [0.002, 0.0]])
    assert "straggler/rank" not in out and out["straggler/max_ratio"] == pytest.approx(2.0)


def test_lead_is_the_time_to_each_steps_first_collective_from_the_flight_record():
    """Steps 2 and 3 start at 1.0 s and 2.0 s; their first collectives are entered 0.3 s and
    0.5 s later (later collectives of the step do not count); step 1 (allocations, compile) is
    left out. Data waits come from the step timer."""
    ns = 1_000_000_000
    entries = [
        {"entered_ns": t}
        for t in (int(0.5 * ns), int(1.3 * ns), int(1.9 * ns), int(2.5 * ns), int(2.6 * ns))
    ]
    c = observe.StragglerCheck(every=3, factor=1.2, dist=FakeDist(2, entries), start=0)
    c.started = {1: 0, 2: 1 * ns, 3: 2 * ns}
    c.data = {1: 9.0, 2: 0.1, 3: 0.2}
    lead, data = c._window(3)
    assert lead == pytest.approx(0.4) and data == pytest.approx(0.15)


def test_straggler_check_is_off_for_one_rank_or_every_0():
    cfg = make_cfg(["trainer.straggler_every=0"])
    assert isinstance(observe.build_straggler_check(cfg, FakeDist(4), 0), observe.NullStragglerCheck)
    cfg = make_cfg(["trainer.straggler_every=5"])
    assert isinstance(observe.build_straggler_check(cfg, FakeDist(1), 0), observe.NullStragglerCheck)
    assert isinstance(observe.build_straggler_check(cfg, FakeDist(2), 0), observe.StragglerCheck)


# -- profiler -------------------------------------------------------------------------------
def test_a_profiler_is_built_only_for_a_window_ahead_on_a_listed_rank(tmp_path):
    cpu = torch.device("cpu")
    build = observe.build_profiler
    assert isinstance(build(ProfileConfig(), tmp_path, 0, cpu, 0), observe.NullProfiler)  # off
    assert isinstance(build(ProfileConfig([3, 4], [1]), tmp_path, 0, cpu, 0), observe.NullProfiler)
    assert isinstance(build(ProfileConfig([3, 4]), tmp_path, 0, cpu, 4), observe.NullProfiler)  # behind
    p = build(ProfileConfig([3, 6], [1]), tmp_path, 1, cpu, 4)  # resumed inside: steps 5-6
    assert isinstance(p, observe.StepProfiler) and (p.first, p.last) == (5, 6)
    assert p.prof is not None and p.prof.step_num == 4  # made before step 5, its first
    p.close()
    assert p.prof is None and not (tmp_path / "profile").exists()  # nothing recorded, nothing saved


# -- memory snapshot ------------------------------------------------------------------------
class FakeCudaMemory:
    """torch.cuda.memory's recording and dump calls, recorded."""

    def __init__(self):
        self.calls: list = []

    def _record_memory_history(self, enabled="all", max_entries=None):
        self.calls.append(("record", enabled, max_entries))

    def _dump_snapshot(self, path):
        self.calls.append(("dump", path))
        Path(path).write_bytes(b"snapshot")


def test_memory_history_is_recorded_for_the_first_steps_then_dumped_and_stopped(tmp_path):
    fake = FakeCudaMemory()
    snap = observe.CudaMemorySnapshot(tmp_path, rank=1, memory=fake)
    assert fake.calls == [("record", "all", observe.MEMORY_HISTORY_ENTRIES)]
    snap.start(start_step=10)  # a resumed run: the first 3 steps of this invocation
    for step in (11, 12):
        snap.end_step(step)
    assert len(fake.calls) == 1
    snap.end_step(13)
    path = tmp_path / "memory" / "rank_1.pickle"
    assert fake.calls[1:] == [("dump", str(path)), ("record", None, None)] and path.is_file()
    snap.end_step(14)
    snap.close()
    assert len(fake.calls) == 3  # dumped once, stopped once


def test_memory_snapshot_accepted_for_a_cuda_target_and_null_on_a_cpu_device():
    cfg = make_cfg(["trainer.memory_snapshot=true", "trainer.device=cuda"])
    validate(cfg, 1, device="cuda")  # framework.plan sizes GPUs: accepted there
    assert isinstance(observe.Watch(cfg, FakeDist(1)).memory, observe.NullMemorySnapshot)  # CPU Dist


def test_out_of_memory_in_a_step_dumps_the_snapshot_first_and_names_it(
    tmp_path, sample_data, monkeypatch
):
    """train()'s OOM path: the error propagates from the step, after the snapshot is dumped, and
    its message names the file (CUDA calls faked: the Watch gets a CudaMemorySnapshot on CPU)."""
    fake = FakeCudaMemory()
    real_init = observe.Watch.__init__

    def watch_with_snapshot(self, cfg, dist):
        real_init(self, cfg, dist)
        self.memory = observe.CudaMemorySnapshot(cfg.run.dir, dist.rank, memory=fake)

    calls = {"n": 0}
    real_fb = TorchEngine.forward_backward

    def oom_in_step_2(self, batch, accum):
        calls["n"] += 1
        if calls["n"] > 2:  # 2 micro-batches per step
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_fb(self, batch, accum)

    monkeypatch.setattr(observe.Watch, "__init__", watch_with_snapshot)
    monkeypatch.setattr(TorchEngine, "forward_backward", oom_in_step_2)
    run_dir = tmp_path / "run"
    with pytest.raises(torch.OutOfMemoryError) as e:
        train(make_cfg([*TINY, "trainer.max_steps=4", f"run.dir={run_dir}"]))
    path = run_dir / "memory" / "rank_0.pickle"
    assert str(path) in str(e.value) and "Tried to allocate 2.00 GiB" in str(e.value)
    assert "pytorch.org/memory_viz" in str(e.value)
    assert ("dump", str(path)) in fake.calls and path.read_bytes() == b"snapshot"
    assert fake.calls[-1] == ("record", None, None)  # recording stopped on the way out


# -- step timer -----------------------------------------------------------------------------
def test_step_timer_syncs_and_reports_only_on_logged_steps_and_the_last():
    syncs = []
    timer = StepTimer(every=3, last=7, sync=lambda: syncs.append(step))
    reported = {}
    for step in range(1, 8):
        timer.begin(step)
        for phase in ("data", "forward_backward", "data", "optimizer"):
            with timer(phase):
                pass
        reported[step] = timer.record()
        assert set(timer.spent) == {"data", "forward_backward", "optimizer"}  # host time: every step
    # a sync at the step's start and at the end of each of its 4 phases, on steps 3, 6, 7 only
    assert syncs == [3] * 5 + [6] * 5 + [7] * 5
    assert {s for s, r in reported.items() if r} == {3, 6, 7}
    assert set(reported[6]) == {
        "time/data_s",
        "time/forward_backward_s",
        "time/optimizer_s",
        "time/step_s",
    }
    assert reported[6]["time/step_s"] >= reported[6]["time/data_s"] + reported[6]["time/optimizer_s"]


# -- flight record on a hang ----------------------------------------------------------------
def test_watchdog_writes_the_flight_record_before_its_deadline_and_removes_a_near_miss(
    tmp_path, monkeypatch, caplog
):
    armed = []  # faulthandler is faked: a real one would end this process
    monkeypatch.setattr(faults.faulthandler, "dump_traceback_later", lambda s, **kw: armed.append(s))
    monkeypatch.setattr(faults.faulthandler, "cancel_dump_traceback_later", lambda: None)
    record = {"source": "torch", "entries": [{"seq": 7, "op": "gloo:all_reduce", "completed": False}]}
    w = faults.Watchdog(tmp_path, rank=1, step_s=2.0, save_s=60.0, record=lambda: record, world_size=2)
    flight = tmp_path / "stacks" / "flight_rank_1.json"
    w.step(5)  # first step: the save limit, 60 s; the record would come 5 s before it
    w.step(6)  # 2 s: the record comes 0.2 s before faulthandler's dump, at 1.8 s
    t0 = time.monotonic()
    while not flight.exists() and time.monotonic() - t0 < 10:
        time.sleep(0.02)
    assert 1.7 <= time.monotonic() - t0 < 10
    got = json.loads(flight.read_text())
    assert got["rank"] == 1 and got["world_size"] == 2 and got["step"] == 6 and got["limit_s"] == 2.0
    assert got["entries"] == record["entries"] and got["written_before_timeout_s"] == pytest.approx(0.2)
    assert armed == [60.0, 2.0]
    with caplog.at_level(logging.WARNING, logger="framework"):
        w.step(7)  # the step finished after all: a near miss, not a hang
    assert not flight.exists() and "step 6 came within 0.2 s of its 2 s limit" in caplog.text
    w.close()
    assert not (tmp_path / "stacks").exists()


# -- hang diagnosis -------------------------------------------------------------------------
def entry(seq: int, completed: bool, op: str = "gloo:all_reduce", group: str = "0") -> dict:
    return {"seq": seq, "op": op, "group": group, "group_desc": "default_pg", "sizes": [[4]],
            "completed": completed, "entered_ns": seq}  # fmt: skip


def write_hang(stacks: Path, records: dict[int, list[dict]], dumps: dict[int, str], world: int = 3):
    stacks.mkdir(parents=True)
    for rank, entries in records.items():
        rec = {"rank": rank, "world_size": world, "host": f"n{rank}", "step": 9, "entries": entries}
        (stacks / f"flight_rank_{rank}.json").write_text(json.dumps(rec))
    for rank, text in dumps.items():
        (stacks / f"rank_{rank}.txt").write_text(text)


STACK = """Timeout (0:00:05)!
Thread 0x1 (most recent call first):
  File "/usr/lib/python3.11/threading.py", line 327 in wait

Thread 0x2 (most recent call first):
  File "/venv/lib/python3.11/site-packages/torch/autograd/graph.py", line 979 in _engine_run_backward
  File "/src/framework/parallel/engine.py", line 203 in forward_backward
  File "/src/framework/train.py", line 150 in _train
  File "/src/framework/train.py", line 52 in train
"""


def test_diagnosis_names_the_rank_behind_the_collective_the_others_wait_in(tmp_path):
    stacks = tmp_path / "stacks"
    waiting = [entry(1, True), entry(2, False)]
    write_hang(stacks, {0: waiting, 1: [entry(1, True)], 2: waiting}, {0: STACK, 1: STACK, 2: STACK})
    d = hang_diagnosis(stacks)
    assert d["behind"] == [1] and d["missing"] == [] and d["collective"]["seq"] == 2
    text = "\n".join(d["lines"])
    assert "=> rank(s) 1 behind: never entered collective #2 gloo:all_reduce" in text
    assert "which rank(s) 0, 2 wait in" in text
    assert (
        "rank 1 stack (most recent call first): _engine_run_backward (torch/autograd/graph.py:979)"
        in text
    )
    assert (
        "forward_backward (framework/parallel/engine.py:203) <- _train (framework/train.py:150)" in text
    )


def test_diagnosis_names_a_rank_that_wrote_nothing_and_a_hang_inside_the_collective(tmp_path):
    write_hang(tmp_path / "a", {0: [entry(3, False)], 1: [entry(3, False)]}, {0: STACK, 1: STACK})
    d = hang_diagnosis(tmp_path / "a")  # world 3: rank 2 was SIGSTOPed (it writes nothing)
    assert d["missing"] == [2] and d["behind"] == []
    assert "rank 2: no stacks and no flight record: stopped (SIGSTOP)" in "\n".join(d["lines"])
    write_hang(tmp_path / "b", {0: [entry(3, False)], 1: [entry(3, False)]}, {}, world=2)
    d = hang_diagnosis(tmp_path / "b")
    assert "every rank is inside collective #3" in d["lines"][-1]
    assert hang_diagnosis(tmp_path / "none") is None


def test_top_frames_pick_the_training_thread():
    assert top_frames(STACK) == [
        "_engine_run_backward (torch/autograd/graph.py:979)",
        "forward_backward (framework/parallel/engine.py:203)",
        "_train (framework/train.py:150)",
    ]
    assert top_frames("Timeout (0:00:05)!\n") == []


# -- summary --------------------------------------------------------------------------------
def test_summary_has_phase_percentiles_shares_and_the_stragglers_named():
    records = [{"step": s, "loss": 1.0, "tokens": 8 * s, "tokens_per_s": 8.0} for s in range(1, 11)]
    for s in range(2, 11, 2):  # the logged (measured) steps
        records[s - 1].update(
            {"time/step_s": 0.1 * s, "time/data_s": 0.01 * s, "straggler/max_ratio": 1.0 + s / 10}
        )
    records[7].update({"straggler/rank": 3, "straggler/ratio": 1.5})
    records[9].update({"straggler/rank": 3, "straggler/ratio": 1.9})
    s = summarize(records)
    step, data = s["time_s"]["step"], s["time_s"]["data"]
    assert (
        step["steps"] == 5 and step["mean"] == pytest.approx(0.6) and step["p50"] == pytest.approx(0.6)
    )
    assert step["p90"] == pytest.approx(1.0) and data["share"] == pytest.approx(0.1)
    assert s["stragglers"] == {
        "checks": 5,
        "max_ratio": 2.0,
        "named": {"3": {"checks": 2, "max_ratio": 1.9}},
    }
    rows = dict(summary_rows(s))
    assert rows["stragglers"] == "rank 3 named at 2 of 5 checks (up to 1.90x the median lead)"
    assert rows["  data wait"].startswith("mean 0.0600 s, p50 0.0600, p90 0.1000, 10% of the step")


def test_dist_keeps_its_own_collective_record_where_torch_has_none(monkeypatch):
    """The fallback flight record: the collectives Dist issued, in order, each marked completed
    once it returned (one that raised stays open, as a hung one would)."""
    monkeypatch.setattr(dist_mod, "torch_flight_entries", lambda backend: [])  # a backend without one
    torch.distributed.init_process_group(
        "gloo", store=torch.distributed.HashStore(), rank=0, world_size=1
    )
    try:
        d = dist_mod.Dist()
        d.all_reduce_sum(torch.ones(4))
        d.barrier()
        assert d.all_gather(torch.tensor([1.0, 2.0])).tolist() == [[1.0, 2.0]]
        with pytest.raises(RuntimeError), d.collectives.track("all_reduce", [[8]]):
            raise RuntimeError("timed out")
        rec = d.flight_record()
    finally:
        torch.distributed.destroy_process_group()
    assert rec["source"] == "framework"
    got = [(e["seq"], e["op"], e["sizes"], e["completed"]) for e in rec["entries"]]
    assert got == [(1, "all_reduce", [[4]], True), (2, "barrier", [], True),
                   (3, "all_gather", [[2]], True), (4, "all_reduce", [[8]], False)]  # fmt: skip

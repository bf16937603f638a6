"""Seeing inside a run (docs/observability.md): a profiler trace of chosen steps, the CUDA
allocator's history, and stragglers named. Each piece is chosen once at build time (a Null*
stand-in when off: no profiler object, no recording, no collective), and the loop calls
`Watch.begin_step` and `Watch.end_step` and nothing else.

The other two views of a run live where their data is: the per-phase step time in
framework.perf.StepTimer (device-synchronised only on logged steps), the collectives every rank
was in when a step hung in framework.faults.Watchdog (with Dist.flight_record). `python -m
framework.report run.dir=DIR` reads all of them back.
"""

from __future__ import annotations

import logging
import math
import socket
import statistics
import time
from pathlib import Path

import torch

from framework.config import Config, ProfileConfig

log = logging.getLogger("framework")

PROFILE_DIR = "profile"
MEMORY_DIR = "memory"
MEMORY_SNAPSHOT_STEPS = 3
"""Steps of allocator history recorded from the start of a run (trainer.memory_snapshot): the
first forward/backward and optimizer steps allocate the peak (activations, gradients, optimizer
state) and the next two show the steady state. Recording keeps a stack per allocation, which
costs too much to leave on (a fixed number rather than one more key: nobody asked to tune it)."""
MEMORY_HISTORY_ENTRIES = 100_000
"""Allocator events kept in the ring while recording (torch's default is 1M; a few MB)."""
TOP_OPS = 10
"""Rows of the top-operator table written beside each trace and logged."""
STRAGGLER_CHECKS = 3
"""Consecutive checks a rank must be slow in before it is named: one slow window is often a
garbage collection, a checkpoint write or a neighbour on a shared node; three are a pattern."""
STRAGGLER_MIN_EXCESS_S = 0.005
"""A rank is slow only if it also exceeds the median by this much per step: on a GPU the host
reaches the first collective within a few milliseconds, where 1.2x is jitter, not a straggler."""


# -- profiler -------------------------------------------------------------------------------
class NullProfiler:
    def begin_step(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class StepProfiler:
    """torch.profiler over optimizer steps [first, last] (trainer.profile.steps, inclusive).

    Steps are marked in the trace as `ProfilerStep#<step>`, our step numbers. The profiler
    object is made at the start of step first - 1 (before the loop when that is the resume
    step) with `step_num` set to it, and a schedule of absolute step numbers that records
    first..last and saves at last: the trace holds exactly those steps (the profiler's own
    start-up falls in the unrecorded step before). Saved when step last + 1 begins, or when the
    run ends: <run.dir>/profile/step_<first>/rank_<r>.json (Chrome trace: Perfetto and
    TensorBoard's profiler plugin open it) and rank_<r>.txt, the top operators by self time."""

    def __init__(self, p: ProfileConfig, run_dir: Path, rank: int, device: torch.device, start: int):
        self.first, self.last = max(p.steps[0], start + 1), p.steps[1]
        self.p, self.rank, self.cuda = p, rank, device.type == "cuda"
        self.dir = run_dir / PROFILE_DIR / f"step_{self.first}"
        self.prof: torch.profiler.profile | None = None
        if self.first - 1 == start:
            self._create(start)

    def _schedule(self, step: int) -> torch.profiler.ProfilerAction:
        A = torch.profiler.ProfilerAction
        if step == self.last:
            return A.RECORD_AND_SAVE
        return A.RECORD if self.first <= step < self.last else A.NONE

    def _create(self, step: int) -> None:
        acts = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(
            activities=acts,
            schedule=self._schedule,
            on_trace_ready=self._save,
            record_shapes=self.p.record_shapes,
            with_stack=self.p.with_stack,
            profile_memory=self.p.with_memory,
        )
        self.prof.step_num = step  # ProfilerStep#<n> carries our step numbers
        self.prof.start()

    def begin_step(self, step: int) -> None:
        if self.prof is None:
            if step == self.first - 1:
                self._create(step)
            return
        self.prof.step()  # ends ProfilerStep#<step - 1>; at last + 1 the trace is saved
        if step > self.last:
            self.close()

    def _save(self, prof) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        trace = self.dir / f"rank_{self.rank}.json"
        prof.export_chrome_trace(str(trace))
        ops = prof.key_averages(group_by_input_shape=self.p.record_shapes)
        tables = [ops.table(sort_by="self_cpu_time_total", row_limit=TOP_OPS)]
        if self.cuda:
            tables.append(ops.table(sort_by="self_device_time_total", row_limit=TOP_OPS))
        (self.dir / f"rank_{self.rank}.txt").write_text("\n".join(tables))
        log.info(
            "profile of steps %d-%d: %s (open it in https://ui.perfetto.dev); top operators by "
            "self time:\n%s",
            self.first, self.last, trace, "\n".join(tables),
        )  # fmt: skip

    def close(self) -> None:
        if self.prof is not None:
            prof, self.prof = self.prof, None
            prof.stop()  # saves the trace if the run ended inside the window


def build_profiler(p: ProfileConfig, run_dir: Path, rank: int, device, start: int):
    if not p.steps or (p.ranks and rank not in p.ranks):
        return NullProfiler()
    if p.steps[1] <= start:
        log.info("trainer.profile.steps=%s: before the resume step %d, no profile", p.steps, start)
        return NullProfiler()
    return StepProfiler(p, run_dir, rank, device, start)


# -- memory snapshot ------------------------------------------------------------------------
class NullMemorySnapshot:
    def start(self, start_step: int) -> None:
        pass

    def end_step(self, step: int) -> None:
        pass

    def out_of_memory(self, error: BaseException) -> None:
        pass

    def close(self) -> None:
        pass


class CudaMemorySnapshot:
    """The CUDA caching allocator's history (torch.cuda.memory._record_memory_history), recorded
    from before the model is built through MEMORY_SNAPSHOT_STEPS steps, then dumped to
    <run.dir>/memory/rank_<r>.pickle (the format https://pytorch.org/memory_viz reads) and
    stopped. An out-of-memory error dumps it again first (the allocator's blocks at the failure,
    with stacks for those allocated while recording) and names the file in the error.
    On CPU trainer.memory_snapshot is refused by validate(): host memory is in metrics.jsonl."""

    def __init__(self, run_dir: str | Path, rank: int, memory=None):
        self.memory = memory or torch.cuda.memory  # tests pass a fake
        self.path = Path(run_dir) / MEMORY_DIR / f"rank_{rank}.pickle"
        self.rank, self.until = rank, MEMORY_SNAPSHOT_STEPS
        self.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
        self.recording = True

    def start(self, start_step: int) -> None:
        self.until = start_step + MEMORY_SNAPSHOT_STEPS

    def dump(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.memory._dump_snapshot(str(self.path))
        return self.path

    def end_step(self, step: int) -> None:
        if self.recording and step >= self.until:
            log.info(
                "memory snapshot of steps 1-%d: %s (https://pytorch.org/memory_viz)", step, self.dump()
            )
            self.close()

    def out_of_memory(self, error: BaseException) -> None:
        """Dump before the error propagates, and name the file in its message."""
        path = self.dump()
        msg = error.args[0] if error.args else ""
        error.args = (
            f"{msg}\nrank {self.rank}: memory snapshot written to {path} "
            "(drag it into https://pytorch.org/memory_viz)",
            *error.args[1:],
        )

    def close(self) -> None:
        if self.recording:
            self.memory._record_memory_history(enabled=None)
            self.recording = False


# -- stragglers -----------------------------------------------------------------------------
class NullStragglerCheck:
    def begin_step(self, step: int) -> None:
        pass

    def end_step(self, step: int, data_s: float) -> dict:
        return {}


class StragglerCheck:
    """Names a rank that the others keep waiting for (RELIABILITY B8).

    What is measured: a slow rank makes every other rank wait inside the step's collectives, so
    every rank's wall step time is the same and says nothing. What differs is the *lead*: the
    time from the start of a step until the rank enters the step's first collective (data wait
    plus its own work before any peer can hold it up). Each rank takes it from its own flight
    record (Dist.flight_record: the entry time of every collective, DDP's, FSDP's and
    DeepSpeed's included, in torch's recorder), against the wall clock at the step's start;
    its data wait is the StepTimer's `data` phase.

    Every `every` steps the ranks all-gather their mean (lead, data wait) over the window
    (2 floats per rank, one collective every `every` steps; the first step of an invocation,
    with its allocations and compilation, is left out). A rank whose lead exceeds the median
    rank's by more than `factor` (and by STRAGGLER_MIN_EXCESS_S) in STRAGGLER_CHECKS checks in a
    row is named on rank 0: a WARNING with the word "straggler", its rank, host, lead vs the
    median and whether the excess is data wait or compute; `straggler/rank` and
    `straggler/ratio` in metrics.jsonl (and so the run summary). Every check also logs
    `straggler/max_ratio`, the slowest rank's lead over the median.

    Limits: on CUDA the host reaches a collective once its kernels are queued, so a rank whose
    GPU is slow (not its host, data or input pipeline) leads no more than the others and is
    not seen; under FSDP the first collective comes at the start of the forward, so only the
    data wait and host work before it are compared. Where torch keeps no flight record, the
    first collective is Dist's own (the loss all-reduce), which a strategy's gradient
    collectives precede: then only data stragglers stand out."""

    def __init__(self, every: int, factor: float, dist, start: int):
        self.every, self.factor, self.dist = every, factor, dist
        self.first = start + 2  # the invocation's first step (allocations, compilation) is left out
        self.hosts = dist.all_gather_object(socket.gethostname())
        self.started: dict[int, int] = {}  # step -> wall clock (ns) at its start
        self.data: dict[int, float] = {}  # step -> data wait (s)
        self.slow_checks = [0] * dist.world_size

    def begin_step(self, step: int) -> None:
        self.started[step] = time.time_ns()  # the flight recorder stamps collectives in wall ns

    def end_step(self, step: int, data_s: float) -> dict:
        self.data[step] = data_s
        if step % self.every:
            return {}
        lead, data = self._window(step)
        gathered = self.dist.all_gather(
            torch.tensor([lead, data], dtype=torch.float64, device=self.dist.device)
        )
        self.started, self.data = {}, {}
        return self.judge(step, gathered.cpu().tolist())

    def _window(self, step: int) -> tuple[float, float]:
        """Mean lead and data wait (s) over this window's steps that the flight record covers."""
        entered = sorted(e["entered_ns"] for e in self.dist.flight_record()["entries"])
        steps = sorted(s for s in self.started if s >= self.first and s in self.data)
        leads, waits = [], []
        for i, s in enumerate(steps):
            end = self.started.get(steps[i + 1]) if i + 1 < len(steps) else None
            first = next((t for t in entered if t >= self.started[s] and (end is None or t < end)), None)
            if first is not None:
                leads.append((first - self.started[s]) / 1e9)
                waits.append(self.data[s])
        if not leads:  # the first window, or a recorder ring too short for a whole step
            return math.nan, math.nan
        return statistics.fmean(leads), statistics.fmean(waits)

    def judge(self, step: int, per_rank: list[list[float]]) -> dict:
        """[[lead_s, data_s] per rank] -> the metrics of this check (rank 0 warns)."""
        leads = [r[0] for r in per_rank if math.isfinite(r[0])]
        if len(leads) < 2:
            return {}
        med, med_data = (
            statistics.median(leads),
            statistics.median(r[1] for r in per_rank if math.isfinite(r[1])),
        )
        ratios = [r[0] / med if med > 0 and math.isfinite(r[0]) else math.nan for r in per_rank]
        named = []
        for rank, ((lead, data), ratio) in enumerate(zip(per_rank, ratios)):
            slow = ratio > self.factor and lead - med > STRAGGLER_MIN_EXCESS_S
            self.slow_checks[rank] = self.slow_checks[rank] + 1 if slow else 0
            if self.slow_checks[rank] >= STRAGGLER_CHECKS:
                named.append(rank)
                cause = "data" if data - med_data > 0.5 * (lead - med) else "compute"
                if self.dist.is_main:
                    log.warning(
                        "straggler: rank %d (host %s) reaches the first collective of a step "
                        "%.3f s after its start vs the median rank's %.3f s (%.2fx, over %d "
                        "checks in a row, steps to %d): it waits on %s (data wait %.3f s vs "
                        "median %.3f s)",
                        rank, self.hosts[rank], lead, med, ratio, self.slow_checks[rank], step,
                        cause, data, med_data,
                    )  # fmt: skip
        out = {"straggler/max_ratio": max(r for r in ratios if math.isfinite(r))}
        if named:
            worst = max(named, key=lambda r: ratios[r])
            out.update({"straggler/rank": worst, "straggler/ratio": ratios[worst]})
        return out


def build_straggler_check(cfg: Config, dist, start: int):
    t = cfg.trainer
    if not t.straggler_every or dist.world_size < 2:
        return NullStragglerCheck()
    return StragglerCheck(t.straggler_every, t.straggler_factor, dist, start)


# -- the loop's one object ------------------------------------------------------------------
class Watch:
    """The loop's observability piece: made before the model is built (the memory history must
    see its allocations), start() once the run directory and the resume step are known, then
    begin_step() at the top of each step, end_step() after the update (its metrics go into the
    step's record), out_of_memory() on an OOM and close() at the end."""

    def __init__(self, cfg: Config, dist):
        self.cfg, self.dist = cfg, dist
        self.memory = NullMemorySnapshot()
        if cfg.trainer.memory_snapshot and dist.device.type == "cuda":
            self.memory = CudaMemorySnapshot(cfg.run.dir, dist.rank)
        self.profiler, self.straggler = NullProfiler(), NullStragglerCheck()

    def start(self, run_dir: Path, start_step: int) -> None:
        t, d = self.cfg.trainer, self.dist
        self.profiler = build_profiler(t.profile, run_dir, d.rank, d.device, start_step)
        self.straggler = build_straggler_check(self.cfg, d, start_step)
        self.memory.start(start_step)

    def begin_step(self, step: int) -> None:
        self.profiler.begin_step(step)
        self.straggler.begin_step(step)

    def end_step(self, step: int, timer) -> dict:
        self.memory.end_step(step)
        return self.straggler.end_step(step, timer.spent.get("data", 0.0))

    def out_of_memory(self, error: BaseException) -> None:
        self.memory.out_of_memory(error)

    def close(self) -> None:
        self.profiler.close()
        self.memory.close()

"""What seeing inside a run costs (issue 18), on CPU, as JSON lines:

    python bench/observe.py                      # every part
    python bench/observe.py --part logging --repeats 6 --steps 80

logging     tokens/s of framework.train with trainer.log_every=1 against log_every=100, both in
            this one run (--repeats each), the debug model on CPU.
            A step's time is the time between consecutive metrics records (so its logging,
            metrics.jsonl write and time/* bookkeeping are inside it), in CPU seconds of this
            process (one torch thread); a run's tokens/s is over its median step (the first
            --skip left out: a garbage collection or a page-fault burst moves a mean, not the
            median); ratio = every-step / every-100 of the runs' medians (goal >= 0.98: logging
            every step costs < 2%). A third configuration repeats log_every=100: its ratio to the
            first is the machine's noise. The order rotates every repeat (against drift).
profiler    the same loop's step time inside a trainer.profile.steps window against the steps
            outside it (one run), and the cost of the NullProfiler call made when it is off.
flight      torch's flight recorder: microseconds per gloo all-reduce of 4 floats (one process,
            a world of 1) with TORCH_FR_BUFFER_SIZE=2000 (our default) against 0 (off), in
            alternating subprocesses (the fastest run of each: the intrinsic cost); the dump + parse of a full ring (Dist.flight_record, what
            a hang record and each straggler check read); the Watchdog's per-step arm with and
            without the flight thread.
straggler   StragglerCheck's per-step bookkeeping and one check (flight record read, window,
            all-gather, judgement) in a world of 1; per step = check / trainer.straggler_every.

Timings on a shared machine move with its load: read the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, uninstalled

import torch  # noqa: E402
import torch.distributed as tdist  # noqa: E402

from framework import faults, metrics, observe  # noqa: E402
from framework.config import CONF_DIR, Config, load  # noqa: E402
from framework.dist import Dist  # noqa: E402
from framework.train import train  # noqa: E402

GOAL_LOGGING_RATIO = 0.98
SINK_CPU_S: list[float] = []  # CPU time inside Metrics.log_train, per step of the last runs


def compose(overrides: list[str]) -> Config:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return load(hydra_compose(config_name="config", overrides=overrides))


def timed_run(run_dir: str, steps: int, *overrides: str) -> list[float]:
    """This process's CPU time at each train record of one framework.train run (debug model,
    CPU, one torch thread): on a shared machine wall time swings with the neighbours' load, the
    CPU time a step takes does not (the loop does not sleep or wait on other processes)."""
    stamps: list[float] = []
    real = metrics.Metrics.log_train

    def stamped(self, record):
        t0 = time.process_time()
        real(self, record)
        stamps.append(time.process_time())
        SINK_CPU_S.append(stamps[-1] - t0)

    metrics.Metrics.log_train = stamped
    try:
        train(compose([
            "model=debug", "trainer.device=cpu", "trainer.seq_len=128", "trainer.micro_batch_size=8",
            "trainer.global_batch_size=16", f"trainer.max_steps={steps}", "trainer.eval_every=0",
            "trainer.sample_tokens=0", "checkpoint.every=0", "checkpoint.resume=never",
            "optim.warmup_steps=0", f"run.dir={run_dir}", *overrides,
        ]))  # fmt: skip
    finally:
        metrics.Metrics.log_train = real
    return stamps


def part_logging(args) -> dict:
    tokens_per_step = 16 * 128
    # "100b" repeats "100": the ratio of two identical configurations is this machine's noise
    configs = {
        "1": "trainer.log_every=1",
        "100": "trainer.log_every=100",
        "100b": "trainer.log_every=100",
    }
    runs: dict[str, list[float]] = {k: [] for k in configs}
    sink: dict[str, list[float]] = {k: [] for k in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            order = list(configs)[i % 3 :] + list(configs)[: i % 3]  # rotated against drift
            for name in order:
                SINK_CPU_S.clear()
                stamps = timed_run(f"{tmp}/{name}_{i}", args.steps, configs[name])
                sink[name] += SINK_CPU_S[args.skip :]
                steady = stamps[args.skip :]
                step_s = statistics.median(b - a for a, b in zip(steady, steady[1:]))
                runs[name].append(tokens_per_step / step_s)
    med = {k: statistics.median(v) for k, v in runs.items()}
    ratio = med["1"] / med["100"]
    sink_us = {k: 1e6 * statistics.fmean(v) for k, v in sink.items() if k != "100b"}
    return {
        "part": "logging",
        "tokens_per_cpu_s_log_every_1": med["1"],
        "tokens_per_cpu_s_log_every_100": med["100"],
        "runs": {k: [round(x) for x in v] for k, v in runs.items()},
        "ratio": ratio,
        "control_ratio_100b_over_100": med["100b"] / med["100"],
        # the direct cost: metrics.jsonl line, the log line every log_every steps (train.log and
        # stderr), the sinks; the time/* and data/tokens bookkeeping add microseconds
        "log_train_us_per_step": sink_us,
        "direct_cost_fraction": (sink_us["1"] - sink_us["100"]) * 1e-6 * med["1"] / tokens_per_step,
        "goal": GOAL_LOGGING_RATIO,
        "meets_goal": ratio >= GOAL_LOGGING_RATIO,
    }


def part_profiler(args) -> dict:
    first, last = args.steps // 2, args.steps // 2 + 9
    with tempfile.TemporaryDirectory() as tmp:
        stamps = timed_run(
            f"{tmp}/p", args.steps, "trainer.log_every=100", f"trainer.profile.steps=[{first},{last}]"
        )
    step_s = {s + 2: stamps[s + 1] - stamps[s] for s in range(len(stamps) - 1)}  # step -> its time
    # step last + 1 also saves the trace (export + top-operator table): counted apart
    inside = [t for s, t in step_s.items() if first <= s <= last]
    outside = [t for s, t in step_s.items() if s > args.skip and not first - 1 <= s <= last + 1]
    null = observe.NullProfiler()
    n = 200_000
    null_ns = timeit.timeit(lambda: null.begin_step(1), number=n) / n * 1e9
    return {
        "part": "profiler",
        "window": [first, last],
        "step_s_profiled_median": statistics.median(inside),
        "step_s_unprofiled_median": statistics.median(outside),
        "profiled_over_unprofiled": statistics.median(inside) / statistics.median(outside),
        "save_step_s": step_s.get(last + 1),
        "off_call_ns": null_ns,
    }


FLIGHT_CHILD = """
import os, sys, time, torch, torch.distributed as d
d.init_process_group("gloo", store=d.HashStore(), rank=0, world_size=1)
t = torch.ones(4)
for _ in range(200):
    d.all_reduce(t)
best = 1e9
for _ in range(5):
    t0 = time.perf_counter()
    for _ in range(2000):
        d.all_reduce(t)
    best = min(best, (time.perf_counter() - t0) / 2000)
print(best * 1e6)
d.destroy_process_group()
"""


def part_flight(args) -> dict:
    per_op: dict[str, list[float]] = {"2000": [], "0": []}
    for _ in range(args.repeats):
        for size in ("2000", "0"):
            env = dict(os.environ, TORCH_FR_BUFFER_SIZE=size, OMP_NUM_THREADS="1")
            out = subprocess.run(
                [sys.executable, "-c", FLIGHT_CHILD], env=env, capture_output=True, text=True, check=True
            )
            per_op[size].append(float(out.stdout.strip().splitlines()[-1]))
    # min over runs: the intrinsic cost (a run placed on a busy core is 4x slower, either way)
    med = {k: min(v) for k, v in per_op.items()}
    # a full ring read back, as the hang record and every straggler check do
    os.environ.setdefault("TORCH_FR_BUFFER_SIZE", "2000")
    dist = one_rank_group()
    t = torch.ones(4)
    for _ in range(2100):
        dist.all_reduce_sum(t)
    reads = []
    for _ in range(5):
        t0 = time.perf_counter()
        rec = dist.flight_record()
        reads.append(time.perf_counter() - t0)
    arm: dict[str, list[float]] = {"without_thread": [], "with_flight_thread": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):  # alternating: faulthandler's own re-arm dominates both
            for name, record in (("without_thread", None), ("with_flight_thread", dist.flight_record)):
                w = faults.Watchdog(Path(tmp) / f"{name}_{i}", 0, 300.0, 1800.0, record, 1)
                w.step(1)
                n = 5000
                arm[name].append(timeit.timeit(lambda w=w: w.step(2), number=n) / n * 1e6)
                w.close()
    tdist.destroy_process_group()
    return {
        "part": "flight",
        "all_reduce_us_recorder_on": med["2000"],
        "all_reduce_us_recorder_off": med["0"],
        "recorder_us_per_collective": med["2000"] - med["0"],
        "runs_us": per_op,
        "ring_entries": len(rec["entries"]),
        "ring_read_ms": 1e3 * statistics.median(reads),
        "watchdog_arm_us": {k: statistics.median(v) for k, v in arm.items()},
    }


def one_rank_group() -> Dist:
    tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    return Dist()


def part_straggler(args) -> dict:
    os.environ.setdefault("TORCH_FR_BUFFER_SIZE", "2000")
    dist = one_rank_group()  # the all-gather and judgement of one rank: the record read dominates
    every = 50
    check = observe.StragglerCheck(every=every, factor=1.2, dist=dist, start=0)
    t = torch.ones(4)
    begin_s, end_s, check_s = [], [], []
    for step in range(1, 4 * every + 1):  # 4 checks, each reading a full ring of 2000
        t0 = time.perf_counter()
        check.begin_step(step)
        begin_s.append(time.perf_counter() - t0)
        for _ in range(40):  # a strategy's collectives in the step
            dist.all_reduce_sum(t)
        t0 = time.perf_counter()
        check.end_step(step, 0.001)
        (end_s if step % every else check_s).append(time.perf_counter() - t0)
    tdist.destroy_process_group()
    per_step = statistics.median(begin_s) + statistics.median(end_s) + statistics.median(check_s) / every
    return {
        "part": "straggler",
        "begin_step_us": 1e6 * statistics.median(begin_s),
        "end_step_us_between_checks": 1e6 * statistics.median(end_s),
        "check_ms": [round(1e3 * c, 1) for c in check_s],
        "per_step_us_at_every_50": 1e6 * per_step,
    }


PARTS = {
    "logging": part_logging,
    "profiler": part_profiler,
    "flight": part_flight,
    "straggler": part_straggler,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=[*PARTS, "all"], default="all")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--skip", type=int, default=5, help="first steps of each run left out")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    for name in PARTS if args.part == "all" else [args.part]:
        results.append(PARTS[name](args))
        print(json.dumps(results[-1]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

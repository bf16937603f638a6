"""RELIABILITY B5-B7 (preemption), B4 (hung rank, with its flight records and the report's
diagnosis), A5 (kill -9 of a rank under --max-restarts=1; torchrun reads PET_MAX_RESTARTS) on 2
gloo ranks launched through the shipped launchers/torchrun.sh, signalled from outside while they
run; and B8's negative control: the uninterrupted reference run checks for stragglers and names
nobody (the slow rank: test_observe.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from framework.checkpoint import verify
from framework.report import ReportConfig, ReportRun, report
from tests.distributed.launch import BIN, PARITY, ROOT, free_port, run_train
from tests.helpers import read_metrics, train_losses

SCRIPT = ROOT / "launchers/torchrun.sh"
SLOW_STEPS = "faults.sleep_in_step_s=0.5"  # time to signal mid-run (8 steps: ~4 s)

pytestmark = pytest.mark.slow


def start(run_dir: Path, *overrides: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MASTER_PORT=str(free_port()),
               SHUTDOWN_TIMEOUT_S="60", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")  # fmt: skip
    cmd = ["bash", str(SCRIPT), "2", *PARITY, "strategy=ddp", f"run.dir={run_dir}", *overrides]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def wait_for(cond, proc: subprocess.Popen, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(
                f"exited {proc.returncode} before {what}:\n{proc.stdout.read()[-4000:]}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {what} within {timeout_s}s")
        time.sleep(0.05)


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(read_metrics(run_dir)) if path.is_file() and path.stat().st_size else 0


def workers(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the framework.train workers that torchrun started."""
    out = {}
    for task in Path(f"/proc/{launcher_pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            ranks = [e[5:] for e in env if e.startswith(b"RANK=")]
            if ranks:
                out[int(ranks[0])] = int(pid)
    return out


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


def finish(proc: subprocess.Popen, timeout_s: float = 120) -> str:
    out, _ = proc.communicate(timeout=timeout_s)
    assert "terminate called" not in out, out[-3000:]
    return out


def stop_steps(out: str) -> list[int]:
    return [int(s) for s in re.findall(r"stopping after step (\d+) \(stop signal", out)]


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory) -> tuple[Path, str]:
    """The run the interrupted ones must reproduce (its dir and output). It also checks for
    stragglers every 2 steps: an all-gather of timings, which changes no loss."""
    full = tmp_path_factory.mktemp("full")
    proc = run_train(full, "strategy=ddp", "trainer.straggler_every=2")
    return full, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run) -> dict[int, str]:
    """step -> repr(loss) of the run the interrupted ones must reproduce."""
    return train_losses(uninterrupted_run[0])


def test_healthy_run_names_no_straggler_and_makes_no_profile(uninterrupted_run):
    """B8's control: 4 straggler checks ran (steps 2, 4, 6, 8) and none named a rank; no
    trainer.profile.steps, no profiler (nothing under profile/)."""
    run_dir, out = uninterrupted_run
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in records if "straggler/max_ratio" in r] == [2, 4, 6, 8]
    assert not [r for r in records if "straggler/rank" in r]
    assert "straggler:" not in out and "stragglers: none in 4 checks" in out
    assert not (run_dir / "profile").exists() and not (run_dir / "stacks").exists()


def assert_resumes_bitwise(run_dir: Path, stopped_at: int, full: dict[int, str]) -> None:
    """checkpoint.resume=auto continues with the uninterrupted run's losses, by repr."""
    run_train(run_dir, "strategy=ddp")
    assert stopped_at <= 6  # >= 2 steps compared after the resume point
    assert train_losses(run_dir) == full


def test_sigterm_to_the_launcher_saves_once_and_resumes_bitwise(tmp_path, sample_data, uninterrupted):
    """B5 and B7: SIGTERM to torchrun.sh is forwarded to both workers, which stop after the same
    step, commit one checkpoint there and exit 0; no worker outlives the launcher."""
    script = SCRIPT.read_text()  # B7: the guard against orphaned workers is in the script
    assert re.search(r"--signals-to-handle \S*SIGTERM\S*", script) and "SIGUSR1" in script
    assert "--shutdown-timeout" in script
    run_dir = tmp_path / "split"
    proc = start(run_dir, SLOW_STEPS)
    wait_for(lambda: logged_steps(run_dir) >= 2, proc, "step 2")
    pids = workers(proc.pid)
    assert sorted(pids) == [0, 1]
    proc.send_signal(signal.SIGTERM)
    out = finish(proc)
    # torchrun re-raises the signal after its workers exited: status 1 even though they saved
    assert proc.returncode == 1, out[-3000:]
    assert not [p for p in pids.values() if alive(p)]
    steps = stop_steps(out)
    assert len(steps) == 2 and steps[0] == steps[1], out[-3000:]  # both ranks, the same step
    ck = run_dir / "checkpoints"
    assert [p.name for p in ck.glob("step_*")] == [f"step_{steps[0]:08d}"]
    assert max(train_losses(run_dir)) == steps[0]
    assert_resumes_bitwise(run_dir, steps[0], uninterrupted)


def test_sigusr1_to_one_worker_stops_every_rank_and_a_second_signal_spares_the_save(
    tmp_path, sample_data, uninterrupted
):
    """B6: SIGUSR1 to rank 1's worker only: both ranks stop at the same step and save (no
    deadlock); signals to both workers while the save is in progress change nothing; the
    launcher exits 0 (it was not signalled)."""
    run_dir = tmp_path / "split"
    proc = start(run_dir, SLOW_STEPS, "faults.sleep_in_save_s=3")
    wait_for(lambda: logged_steps(run_dir) >= 2, proc, "step 2")
    pids = workers(proc.pid)
    os.kill(pids[1], signal.SIGUSR1)
    wait_for(lambda: any((run_dir / "checkpoints").glob(".tmp-step_*")), proc, "a save in progress")
    for pid in pids.values():
        os.kill(pid, signal.SIGTERM)
    out = finish(proc)
    assert proc.returncode == 0, out[-3000:]
    assert "ignored, the stop is under way" in out
    steps = stop_steps(out)
    assert len(steps) == 2 and steps[0] == steps[1], out[-3000:]
    ckpt = run_dir / "checkpoints" / f"step_{steps[0]:08d}"
    assert verify(ckpt)["step"] == steps[0]
    assert_resumes_bitwise(run_dir, steps[0], uninterrupted)


def test_hung_rank_makes_every_rank_exit_with_stacks(tmp_path, sample_data):
    """B4: rank 1 sleeps forever inside step 3; with trainer.collective_timeout_s=5 both ranks
    dump every thread's stack into run.dir/stacks and exit non-zero within 2x the timeout."""
    run_dir = tmp_path / "hang"
    timeout = 5
    proc = start(
        run_dir, "faults.hang_at_step=3", "faults.rank=1", f"trainer.collective_timeout_s={timeout}"
    )
    t0, lines = None, []
    for line in proc.stdout:  # the hung rank logs when it starts to hang; the clock starts there
        lines.append(line)
        if t0 is None and "hanging on purpose" in line:
            t0 = time.monotonic()
    proc.wait(timeout=60)
    out = "".join(lines)
    assert t0 is not None, out[-3000:]
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0, out[-3000:]
    assert elapsed <= 2 * timeout, (elapsed, out[-3000:])
    stacks = {r: (run_dir / "stacks" / f"rank_{r}.txt").read_text() for r in (0, 1)}
    for text in stacks.values():  # faulthandler's dump of every thread
        assert f"Timeout (0:00:0{timeout})!" in text and "framework/train.py" in text, text
    assert "in begin" in stacks[1]  # the hung rank, inside the step
    # its peer, waiting in a collective of the same step (DDP's gradient all-reduce)
    assert "in forward_backward" in stacks[0] or "in decide" in stacks[0], stacks[0]
    assert not list((run_dir / "checkpoints").glob("step_*"))
    # beside the stacks, each rank's flight record (torch's recorder): rank 0 is inside a
    # collective that rank 1, hung before it, never entered
    flight = {r: json.loads((run_dir / f"stacks/flight_rank_{r}.json").read_text()) for r in (0, 1)}
    assert {f["source"] for f in flight.values()} == {"torch"} and flight[0]["step"] == 3
    waiting = flight[0]["entries"][-1]
    assert not waiting["completed"] and waiting["op"] == "gloo:all_reduce" and waiting["sizes"]
    last_1 = max(e["seq"] for e in flight[1]["entries"])
    assert all(e["completed"] for e in flight[1]["entries"]) and last_1 < waiting["seq"]
    # and the report's diagnosis names the hung rank, the collective and its stack
    hang = report(ReportConfig(run=ReportRun(dir=str(run_dir)), plot=False))["hang"]
    assert hang["behind"] == [1] and hang["collective"]["seq"] == waiting["seq"]
    text = "\n".join(hang["lines"])
    assert f"=> rank(s) 1 behind: never entered collective #{waiting['seq']} gloo:all_reduce" in text
    assert "rank 1 stack (most recent call first): begin (framework/faults.py:" in text


def restart_count(pid: int) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    found = [e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"TORCHELASTIC_RESTART_COUNT=")]
    return found[0] if found else None


def test_kill_9_of_one_rank_restarts_from_latest_and_ends_bitwise(
    tmp_path,
    sample_data,
    uninterrupted,
    monkeypatch,
):
    """A5: rank 1 killed with SIGKILL after step 3; torchrun restarts both workers once
    (TORCHELASTIC_RESTART_COUNT=1), they resume from the latest checkpoint (at most
    checkpoint.every steps lost) and finish with the uninterrupted run's losses bitwise."""
    monkeypatch.setenv("PET_MAX_RESTARTS", "1")
    run_dir = tmp_path / "run"
    proc = start(run_dir, SLOW_STEPS, "checkpoint.every=2")
    try:
        killed_and_restarted(proc, run_dir, uninterrupted)
    finally:  # never leave a launcher or its workers behind on a failure
        if proc.poll() is None:
            for pid in [*workers(proc.pid).values(), proc.pid]:
                os.kill(pid, signal.SIGKILL)
            proc.wait()


def killed_and_restarted(proc, run_dir: Path, uninterrupted: dict[int, str]) -> None:
    latest = run_dir / "checkpoints/latest"
    wait_for(lambda: logged_steps(run_dir) >= 3 and latest.is_file(), proc, "step 3")
    first = workers(proc.pid)
    assert sorted(first) == [0, 1] and {restart_count(p) for p in first.values()} == {"0"}
    killed_at = logged_steps(run_dir)
    os.kill(first[1], signal.SIGKILL)

    def restarted() -> bool:
        try:
            now = workers(proc.pid)
        except OSError:  # torchrun tearing the old workers down
            return False
        return len(now) == 2 and not set(now.values()) & set(first.values())

    wait_for(restarted, proc, "restarted workers")
    assert {restart_count(p) for p in workers(proc.pid).values()} == {"1"}
    out = finish(proc)
    assert proc.returncode == 0, out[-3000:]
    resumed = [int(s) for s in re.findall(r"resumed from \S+ \(step (\d+)\)", out)]
    assert resumed and set(resumed) == {resumed[0]}, out[-3000:]  # every rank, the same checkpoint
    assert 0 <= killed_at - resumed[0] <= 2  # lost work <= checkpoint.every steps
    assert train_losses(run_dir) == uninterrupted  # steps 1..8, bitwise


def test_sigusr1_to_the_launcher_leaves_no_worker_behind(tmp_path, sample_data):
    """B7: torchrun.sh forwards SIGUSR1 (Slurm's --signal) instead of dying of it: both workers
    stop after the same step, save, and are gone once the launcher has exited."""
    run_dir = tmp_path / "run"
    proc = start(run_dir, SLOW_STEPS)
    wait_for(lambda: logged_steps(run_dir) >= 2, proc, "step 2")
    pids = workers(proc.pid)
    assert sorted(pids) == [0, 1]
    proc.send_signal(signal.SIGUSR1)
    out = finish(proc)
    # the launcher handled the signal (a bare torchrun dies of it: -SIGUSR1); torchrun exits 1
    # after a handled stop even though the workers saved
    assert proc.returncode in (0, 1), (proc.returncode, out[-3000:])
    assert not [p for p in pids.values() if alive(p)]
    steps = stop_steps(out)
    assert len(steps) == 2 and steps[0] == steps[1], out[-3000:]
    assert (run_dir / f"checkpoints/step_{steps[0]:08d}/COMMITTED").is_file()

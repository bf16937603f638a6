"""Fault handling that the training loop calls at a few points (DESIGN: "a new concern adds a
call, not a branch"):

- preemption: SIGTERM, SIGUSR1 (Slurm's --signal) and SIGINT only set a flag; the flag rides
  on the step's one all-reduce, so every rank stops after the same step and saves once;
- hangs: a faulthandler timer armed per step; a rank stuck longer than
  trainer.collective_timeout_s (every rank waiting on it is stuck as long) writes all its
  threads' stacks to run.dir/stacks/rank_<r>.txt and exits 1; shortly before, a Python thread
  writes the collectives it last entered and completed to run.dir/stacks/flight_rank_<r>.json
  (`python -m framework.report run.dir=...` compares the ranks' records);
- the NaN/Inf policy and the loss-spike detector, decided from that same all-reduce before
  any optimizer (or DeepSpeed) step;
- test-only fault injection (cfg.faults, all off by default).

Exit status (docs/checkpoints.md, "Preemption"): a stop by signal saves a checkpoint and the worker
exits 0. torchrun exits 0 when the signal went to a worker only; when the launcher itself was
signalled it re-raises the signal as an exception after its workers finished and exits 1,
even though every worker saved: judge the run by its checkpoint (and the workers' logs).
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import math
import os
import signal
import socket
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from framework.errors import NonFiniteError

log = logging.getLogger("framework")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
MAX_ROLLBACKS = 3
"""Rollbacks of the same step before on_nan=rollback gives up."""
SKIPPED_WINDOWS = "skipped_windows.json"
"""Run-directory record of the data windows dropped by on_nan=rollback (honoured on resume)."""


class StopSignal:
    """Turns the stop signals into a flag. Installed first thing in train() (a signal before
    that kills the process as usual) and restored on the way out."""

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def install(self) -> StopSignal:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread (e.g. in tests)
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            log.warning("received %s: stopping after this step with a checkpoint", name)
        else:  # never raises: a second signal cannot interrupt the save that the first started
            log.warning(
                "received %s again (first: %s): ignored, the stop is under way", name, self.received
            )

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


FLIGHT_FILE = "flight_rank_{rank}.json"
"""Beside stacks/rank_<r>.txt: the collectives rank r last entered and completed when it hung."""


def flight_lead_s(limit_s: float) -> float:
    """How long before faulthandler's dump (and exit) the flight record is written: the dump
    takes milliseconds; a step that finishes within the lead only leaves a near-miss warning."""
    return min(0.1 * limit_s, 5.0)


class Watchdog:
    """faulthandler's timer: it runs in its own C thread, so it fires even while the main
    thread sleeps or blocks inside a collective; it dumps every thread's Python stack and
    exits the process (status 1), which makes torchrun stop the other workers.

    faulthandler cannot run Python when it fires, so the flight record (`record()`: the
    collectives this rank last entered and completed, Dist.flight_record) is written by a
    Python thread that wakes flight_lead_s() before faulthandler's deadline. Arming costs a
    float store per step (the thread is woken only when a deadline moves earlier, e.g. after a
    save). The thread needs the GIL, which a rank blocked in a collective or a sleep releases;
    a rank spinning in C code while holding it gets its stacks but no flight record."""

    def __init__(
        self, run_dir: Path, rank: int, step_s: float, save_s: float, record=None, world_size: int = 1
    ):
        self.step_s, self.save_s = step_s, save_s
        stacks = run_dir / "stacks"
        stacks.mkdir(parents=True, exist_ok=True)
        self.path = stacks / f"rank_{rank}.txt"
        self.flight_path = stacks / FLIGHT_FILE.format(rank=rank)
        self._file = open(self.path, "w")  # noqa: SIM115 (faulthandler keeps writing to it)
        self.first = True
        self.rank, self.world_size, self.step_num, self.limit_s = rank, world_size, 0, step_s
        self._record = record
        self._due: float | None = None  # monotonic time at which the flight thread writes
        self._wake = threading.Condition()
        self._closed = False
        self._fired_at: int | None = None  # the step whose record was written
        self._thread = None
        if record is not None:
            self._thread = threading.Thread(target=self._flight, name="flight-record", daemon=True)
            self._thread.start()

    def arm(self, seconds: float) -> None:
        faulthandler.dump_traceback_later(seconds, exit=True, file=self._file)
        if self._thread is None:
            return
        if self._fired_at is not None:  # the step went on after all: not a hang
            log.warning(
                "step %d came within %.1f s of its %.0f s limit (trainer.collective_timeout_s or "
                "checkpoint.save_timeout_s); its flight record is removed",
                self._fired_at, flight_lead_s(self.limit_s), self.limit_s,
            )  # fmt: skip
            self.flight_path.unlink(missing_ok=True)
            self._fired_at = None
        due, self.limit_s = time.monotonic() + seconds - flight_lead_s(seconds), seconds
        if self._due is not None and due >= self._due:
            self._due = due  # later than the thread's wait: it re-reads on waking (no wake-up now)
            return
        with self._wake:
            self._due = due
            self._wake.notify()

    def step(self, step: int = 0) -> None:
        # the first step compiles and allocates: it gets the save limit
        self.step_num = step
        self.arm(self.save_s if self.first else self.step_s)
        self.first = False

    def _flight(self) -> None:
        with self._wake:
            while not self._closed:
                now = time.monotonic()
                if self._due is not None and now >= self._due:
                    self._due = None
                    self._write_flight()
                    continue
                self._wake.wait(None if self._due is None else self._due - now)

    def _write_flight(self) -> None:
        record = {
            "rank": self.rank,
            "world_size": self.world_size,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "step": self.step_num,
            "limit_s": self.limit_s,
            "written_before_timeout_s": flight_lead_s(self.limit_s),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        try:
            record.update(self._record())
        except Exception as e:  # noqa: BLE001 (the stacks still follow; say why this is thin)
            record["error"] = f"{type(e).__name__}: {e}"
        tmp = self.flight_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(self.flight_path)
        self._fired_at = self.step_num

    def close(self) -> None:
        faulthandler.cancel_dump_traceback_later()
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._file.close()
        if self.path.stat().st_size == 0:  # nothing dumped: leave no empty file behind
            self.flight_path.unlink(missing_ok=True)  # a near miss at the last step
            self.path.unlink()
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()


@dataclass
class Verdict:
    loss: float
    """The step's mean loss over all ranks."""
    action: str = "apply"
    """apply | skip | rollback"""
    stop: bool = False
    """Some rank received a stop signal: every rank saves after this step and exits."""
    reason: str = ""


class _Injector:
    """cfg.faults on the ranks it names: a forward hook on the plain model scales the training
    loss (NaN or spike, so its gradients follow), engine.poison_grad() corrupts one reduced
    gradient element, and sleeps or hangs happen inside the step."""

    def __init__(self, fcfg, rank: int):
        self.f, self.mine = fcfg, fcfg.rank is None or fcfg.rank == rank
        self.slow_s = fcfg.slow_ms / 1000 if fcfg.slow_rank == rank else 0.0
        self.loss_factor: float | None = None
        self._hooked = False
        self._fired: set[str] = set()  # each injection fires once: a rollback re-runs its step

    def _due(self, key: str, step: int) -> bool:
        if self.mine and step == getattr(self.f, key) and key not in self._fired:
            self._fired.add(key)
            return True
        return False

    def hook(self, model: torch.nn.Module) -> None:
        if self.mine and (self.f.nan_loss_at_step or self.f.spike_at_step) and not self._hooked:
            model.register_forward_hook(self._scale_loss)
            self._hooked = True

    def _scale_loss(self, module, args, out):
        if self.loss_factor is not None and module.training and out.dim() == 0:  # the training loss
            return out * self.loss_factor
        return None

    def begin(self, step: int) -> None:
        f = self.f
        if f.sleep_in_step_s:
            time.sleep(f.sleep_in_step_s)
        if self.slow_s:  # a straggler: before the step's first collective, outside the data wait
            time.sleep(self.slow_s)
        self.loss_factor = None
        if self._due("nan_loss_at_step", step):
            self.loss_factor = float("nan")
        elif self._due("spike_at_step", step):
            self.loss_factor = f.spike_factor
        if self._due("hang_at_step", step):
            log.warning("step %d: hanging on purpose (faults.hang_at_step)", step)
            while True:
                time.sleep(3600)

    def grads(self, step: int, engine) -> None:
        if self._due("nan_grad_at_step", step):
            engine.poison_grad()


class Guard:
    """The loop's fault-handling piece: begin_step() before the micro-batches, decide() after
    them (one all-reduce), saving() around a checkpoint, state_dict() into the trainer state."""

    def __init__(self, cfg, stop: StopSignal):
        self.cfg, self.t, self.stop = cfg, cfg.trainer, stop
        self.zscore = self.t.spike_zscore or 0.0
        self.recent: deque[float] = deque(maxlen=self.t.spike_window)
        self.counts = {"skipped_nonfinite": 0, "skipped_spikes": 0}
        self.windows: list[dict] = []
        self.rollbacks: dict[int, int] = {}
        self.watchdog: Watchdog | None = None
        self.run_dir: Path | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, run_dir: Path, dist, engine) -> None:
        self.run_dir, self.dist = run_dir, dist
        self.inject = _Injector(self.cfg.faults, dist.rank)
        self.inject.hook(engine.plain_model())
        self.watchdog = Watchdog(
            run_dir,
            dist.rank,
            self.t.collective_timeout_s,
            self.cfg.checkpoint.save_timeout_s,
            dist.flight_record,
            dist.world_size,
        )
        path = run_dir / SKIPPED_WINDOWS
        if path.is_file():
            self.windows = json.loads(path.read_text())

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.close()
            self.watchdog = None
        self.stop.restore()

    # -- checkpointed state -----------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"recent_losses": list(self.recent), **self.counts}

    def load_state_dict(self, sd: dict | None) -> None:
        sd = sd or {}
        self.recent.clear()
        self.recent.extend(sd.get("recent_losses", []))
        for k in self.counts:
            self.counts[k] = int(sd.get(k, 0))

    def counters(self) -> dict:
        """The non-zero skip counters, for metrics.jsonl."""
        return {k: v for k, v in self.counts.items() if v}

    # -- per step ---------------------------------------------------------------------------
    def begin_step(self, step: int, loader, accum: int) -> None:
        """Arm the watchdog, drop the data windows that a rollback skipped, inject faults."""
        self.watchdog.step(step)
        self.skip_windows(loader, accum)
        self.inject.begin(step)

    def skip_windows(self, loader, accum: int) -> None:
        starts = {w["start"] for w in self.windows}
        while loader.state.position in starts:
            log.warning("skipping data window at sample %d (%s)", loader.state.position, SKIPPED_WINDOWS)
            for _ in range(accum):
                next(loader)

    def decide(self, step: int, loss: torch.Tensor, engine, loader) -> Verdict:
        """One all-reduce of [loss, stop, non-finite loss, non-finite grad] so that every rank
        takes the same decision before any update is applied."""
        self.inject.grads(step, engine)
        norm = engine.grad_norm()
        # under a dynamic loss scaler (fp16) non-finite gradients are overflows that the scaler
        # skips itself (and halves the scale): only the loss counts then
        grad_bad = engine.loss_scale() is None and not math.isfinite(norm)
        loss_bad = not math.isfinite(loss.item())
        flags = torch.tensor(
            [0.0, self.stop.received is not None, loss_bad, grad_bad], device=loss.device
        )
        flags[0] = loss  # the same float32 sum as a plain all-reduce of the loss
        d = self.dist
        d.all_reduce_sum(flags)
        mean = (flags[0] / d.world_size).item()
        v = Verdict(mean, stop=bool(flags[1].item()))
        n_loss, n_grad = int(flags[2].item()), int(flags[3].item())
        if n_loss or n_grad:
            where = f"rank {d.rank}" if loss_bad or grad_bad else "another rank"
            what = []
            if n_loss:
                what.append(f"loss is non-finite on {n_loss} of {d.world_size} rank(s)")
            if n_grad:
                what.append(f"gradient norm is non-finite on {n_grad} of {d.world_size} rank(s)")
            v.reason = f"step {step} ({where}): {'; '.join(what)} (loss {mean}, grad norm {norm})"
            self._nonfinite(v, step, loader)
        elif self._is_spike(mean):
            v.action, v.reason = (
                "skip",
                f"step {step}: loss spike {mean:.4g} ({self._z(mean):.1f} sigma)",
            )
            self.counts["skipped_spikes"] += 1
            log.warning("%s: update skipped (trainer.spike_zscore=%g)", v.reason, self.zscore)
        else:
            self.recent.append(mean)
        return v

    def _nonfinite(self, v: Verdict, step: int, loader) -> None:
        policy = self.t.on_nan
        if policy == "abort":
            raise NonFiniteError(f"{v.reason}; no update applied, nothing saved (trainer.on_nan=abort)")
        self.counts["skipped_nonfinite"] += 1
        v.action = policy
        if policy == "skip":
            log.warning("%s: update skipped (trainer.on_nan=skip)", v.reason)
            return
        self.rollbacks[step] = self.rollbacks.get(step, 0) + 1
        if self.rollbacks[step] > MAX_ROLLBACKS:  # NaNs that follow the weights, not the data
            raise NonFiniteError(
                f"{v.reason}; step {step} rolled back {MAX_ROLLBACKS} times already (each time "
                f"skipping the next data window): stopping (trainer.on_nan=rollback)"
            )
        end = loader.state.position  # the step's batches are consumed: the window ends here
        self.windows.append({"step": step, "start": end - self.t.global_batch_size, "end": end})
        if self.dist.is_main:
            tmp = self.run_dir / (SKIPPED_WINDOWS + ".tmp")
            tmp.write_text(json.dumps(self.windows, indent=1))
            tmp.replace(self.run_dir / SKIPPED_WINDOWS)
        log.warning(
            "%s: rolling back to the last checkpoint; samples [%d, %d) recorded in %s",
            v.reason,
            end - self.t.global_batch_size,
            end,
            self.run_dir / SKIPPED_WINDOWS,
        )

    def _z(self, loss: float) -> float:
        sd = statistics.pstdev(self.recent)
        return (loss - statistics.fmean(self.recent)) / sd if sd > 0 else 0.0

    def _is_spike(self, loss: float) -> bool:
        return self.zscore > 0 and len(self.recent) == self.recent.maxlen and self._z(loss) > self.zscore

    @contextlib.contextmanager
    def saving(self):
        """A save runs under checkpoint.save_timeout_s; signals stay ignored (flag only)."""
        self.watchdog.arm(self.cfg.checkpoint.save_timeout_s)
        try:
            yield
        finally:
            self.watchdog.arm(self.t.collective_timeout_s)

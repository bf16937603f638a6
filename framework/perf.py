"""Throughput math as small pure functions: FLOPs per token, device peak FLOPs, MFU, and the
cost-balanced split of the blocks into pipeline stages.

One formula everywhere (DESIGN "Parallelism and precision"):
    FLOPs/token = 6 N + 12 L H Q T
N non-embedding parameters a token goes through (token/position tables and an untied output head
left out; in a mixture of experts the active ones: router, top_k experts, shared experts), L layers,
H heads, Q head size, T sequence length (attention counted in full, causal mask ignored).
The output projection is not in N, so our MFU is conservative against counts that include it.
"""

from __future__ import annotations

import os
import resource
import time

import torch

from framework.model.gpt import ModelConfig, num_params

# Dense bf16 peak per device (FLOP/s), without sparsity. Matched against the CUDA device name,
# most specific first.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("h200", 989e12),
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),
    ("h100", 989e12),
    ("gh200", 989e12),
    ("b200", 2250e12),
    ("a100", 312e12),
    ("a10g", 125e12),
    ("l40s", 362e12),
    ("l4", 121e12),
    ("v100", 125e12),
]


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward); a sparse model counts its active
    parameters (the routed experts a token does not visit cost it nothing)."""
    n = num_params(cfg, non_embedding=True, active=True)
    return 6.0 * n + 12.0 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of a device from its name (e.g. 'NVIDIA H100 80GB HBM3'); None if unknown."""
    name = device_name.lower()
    for key, value in PEAK_BF16_FLOPS:
        if key in name:
            return value
    return None


def mfu(
    tokens_per_s: float, flops_per_tok: float, peak: float | None, n_devices: int = 1
) -> float | None:
    """Model FLOPs utilisation in [0, 1] over n_devices; None where the peak is unknown (CPU)."""
    if not peak:
        return None
    return tokens_per_s * flops_per_tok / (peak * n_devices)


def no_sync() -> None:
    """The device sync of a CPU run: host time is the time."""


class StepTimer:
    """Wall time of one step split into phases (data wait, forward/backward, optimizer), as
    `time/<phase>_s` metrics, plus `time/step_s` (from begin() to record()).

    On CUDA a phase ends on the host when its kernels are queued, not run, so an honest split
    needs a device sync at every phase boundary, and a sync stalls the queue. The split is
    therefore measured (synchronised and reported) only on the steps that log it: every
    `every` steps (trainer.log_every) and the `last` one; other steps report no time/* keys and
    never sync. Host time of every phase is still kept every step (`spent`): the data wait is
    host work, which the straggler check compares across ranks every step."""

    def __init__(self, every: int = 1, last: int | None = None, sync=no_sync) -> None:
        self.every, self.last, self.sync = every, last, sync
        self.spent: dict[str, float] = {}
        self.measured = False
        self.t0 = 0.0

    def begin(self, step: int) -> None:
        self.spent = {}
        self.measured = step % self.every == 0 or step == self.last
        if self.measured:
            self.sync()  # the previous step's queued work is not this step's
        self.t0 = time.perf_counter()

    def __call__(self, phase: str):
        return _Phase(self, phase)

    def record(self) -> dict:
        """The step's time/* figures on a measured step; {} on others."""
        if not self.measured:
            return {}
        out = {f"time/{k}_s": v for k, v in self.spent.items()}
        out["time/step_s"] = time.perf_counter() - self.t0
        return out


class _Phase:
    def __init__(self, timer: StepTimer, phase: str):
        self.timer, self.phase = timer, phase

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        if self.timer.measured:
            self.timer.sync()  # this phase's kernels finish inside this phase
        self.timer.spent[self.phase] = (
            self.timer.spent.get(self.phase, 0.0) + time.perf_counter() - self.t0
        )


def device_sync(device: torch.device):
    """The sync StepTimer needs on `device`: CUDA's, or none."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return no_sync


def host_memory() -> dict:
    """This process's resident host memory now and at its peak (GiB)."""
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    try:
        rss_pages = int(open("/proc/self/statm").read().split()[1])
        rss = rss_pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        rss = peak_kib * 1024
    return {"host_rss_gib": rss / 2**30, "host_peak_rss_gib": peak_kib / 2**20}

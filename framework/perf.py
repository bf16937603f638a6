"""Throughput math as small pure functions: FLOPs per token, device peak FLOPs, MFU.

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


class StepTimer:
    """Wall time of one step split into phases (data wait, forward/backward, optimizer,
    checkpoint), as `time/<phase>_s` metrics. Host time: on CUDA a phase ends when its kernels
    are queued, so forward/backward work may show up in the next phase that synchronises (the
    loss all-reduce or the optimizer step); the total is exact."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}

    def reset(self) -> None:
        self.spent = {}

    def __call__(self, phase: str):
        return _Phase(self, phase)

    def record(self) -> dict:
        return {f"time/{k}_s": v for k, v in self.spent.items()}


class _Phase:
    def __init__(self, timer: StepTimer, phase: str):
        self.timer, self.phase = timer, phase

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.timer.spent[self.phase] = (
            self.timer.spent.get(self.phase, 0.0) + time.perf_counter() - self.t0
        )


def host_memory() -> dict:
    """This process's resident host memory now and at its peak (GiB)."""
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    try:
        rss_pages = int(open("/proc/self/statm").read().split()[1])
        rss = rss_pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        rss = peak_kib * 1024
    return {"host_rss_gib": rss / 2**30, "host_peak_rss_gib": peak_kib / 2**20}

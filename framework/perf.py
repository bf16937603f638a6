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


def stage_costs(cfg: ModelConfig) -> tuple[int, int, int]:
    """Forward FLOPs per token of (one block, the embedding, the output head), the weights of the
    pipeline split. Block: 2 per matmul weight (q, k, v, o; the MLP's 2 or 3 matrices) plus
    attention's scores and mix, 4 T C at T = model.block_size (the causal mask ignored, as in
    flops_per_token). Embedding: a table lookup, no matmul; C for the position add. Head: 2 V C
    (V: vocab_size, or num_labels for a classifier); the final norm and the loss, O(C + V), are
    left out. Backward costs about twice the forward for all three, so the ratio is the same."""
    C, kv = cfg.n_embd, cfg.kv_heads * cfg.head_dim
    matrices = 2 * C * C + 2 * C * kv + (3 if cfg.style == "llama" else 2) * C * cfg.ffn_dim
    block = 2 * matrices + 4 * cfg.block_size * C
    head = 2 * (cfg.num_labels or cfg.vocab_size) * C
    return block, C, head


def stage_layers(m: ModelConfig, n_stages: int, layers: list[int] | None = None) -> list[int]:
    """Blocks per pipeline stage, in order: contiguous runs, every stage at least one block,
    the embedding on the first stage and the final norm + head on the last.

    layers (strategy.pp_layers) is checked and returned as given. Otherwise the split minimises
    the load of the most loaded stage (stage_costs; with GPT-2's 50k vocabulary the head costs
    about 4.5 blocks of gpt2-124m, so the last stage gets fewer blocks), then, within that bound,
    the sum of squared loads (the other stages as even as they can be); among equally good
    splits earlier stages get fewer blocks (under 1F1B they hold the most micro-batches of
    activations). Exact (integer costs), two dynamic programmes over (stage, blocks left), each
    O(n_stages x n_layer^2)."""
    L, S = m.n_layer, n_stages
    if layers is not None:
        if len(layers) != S or any(n < 1 for n in layers) or sum(layers) != L:
            raise ValueError(
                f"strategy.pp_layers={list(layers)} must give each of the {S} pipeline stages at "
                f"least one block and sum to model.n_layer={L}"
            )
        return list(layers)
    if not 1 <= S <= L:
        raise ValueError(f"{S} pipeline stages need at least as many blocks: model.n_layer={L}")
    block, embed, head = stage_costs(m)

    def load(stage: int, n: int) -> int:
        return n * block + (embed if stage == 0 else 0) + (head if stage == S - 1 else 0)

    def choices(s: int, k: int) -> range:
        """Blocks stage s may take of the last k, leaving one for each later stage."""
        return range(k, k + 1) if s == S - 1 else range(1, k - (S - 1 - s) + 1)

    # 1. bound: the smallest possible maximum load; peak[s][k] for stages s.. over the last k blocks
    peak = [[0] * (L + 1) for _ in range(S + 1)]
    for s in range(S - 1, -1, -1):
        for k in range(S - s, L + 1):
            peak[s][k] = min(max(load(s, n), peak[s + 1][k - n]) for n in choices(s, k))
    bound = peak[0][L]
    # 2. within the bound, the smallest sum of squared loads (None: no split fits the bound)
    squares: list[list[tuple[int, int] | None]] = [[None] * (L + 1) for _ in range(S + 1)]
    squares[S][0] = (0, 0)
    for s in range(S - 1, -1, -1):
        for k in range(S - s, L + 1):
            fits = [
                (load(s, n) ** 2 + squares[s + 1][k - n][0], n)
                for n in choices(s, k)
                if load(s, n) <= bound and squares[s + 1][k - n] is not None
            ]
            squares[s][k] = min(fits) if fits else None  # ties: the smaller n
    out, k = [], L
    for s in range(S):
        out.append(squares[s][k][1])
        k -= out[-1]
    return out


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

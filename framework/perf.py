"""Throughput math as small pure functions: FLOPs per token, device peak FLOPs, MFU.

One formula everywhere (DESIGN "Parallelism and precision"):
    FLOPs/token = 6 N + 12 L H Q T
N non-embedding parameters (token/position tables and an untied output head left out), L layers,
H heads, Q head size, T sequence length (attention counted in full, causal mask ignored).
The output projection is not in N, so our MFU is conservative against counts that include it.
"""

from __future__ import annotations

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
    """Training FLOPs per token (forward + backward)."""
    n = num_params(cfg, non_embedding=True)
    return 6.0 * n + 12.0 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of a device from its name (e.g. 'NVIDIA H100 80GB HBM3'); None if unknown."""
    name = device_name.lower()
    for key, value in PEAK_BF16_FLOPS:
        if key in name:
            return value
    return None


def mfu(tokens_per_s: float, flops_per_tok: float, peak: float | None, n_devices: int = 1) -> float | None:
    """Model FLOPs utilisation in [0, 1] over n_devices; None where the peak is unknown (CPU)."""
    if not peak:
        return None
    return tokens_per_s * flops_per_tok / (peak * n_devices)

"""framework.perf: FLOPs per token against a hand count, peak detection by device name, MFU."""

from __future__ import annotations

import pytest

from framework.model.gpt import ModelConfig
from framework.perf import flops_per_token, mfu, peak_flops

GPT2_124M = ModelConfig(
    name="gpt2-124m", n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024
)


def test_flops_per_token_gpt2_124m_matches_hand_count():
    C, L, T = 768, 12, 1024
    attn = 4 * C * C + 4 * C  # q, k, v, o weights + biases: 2,362,368
    mlp = 2 * C * 4 * C + 4 * C + C  # fc, proj weights + biases: 4,722,432
    norms = 2 * 2 * C  # two LayerNorms (weight + bias): 3,072
    n = L * (attn + mlp + norms) + 2 * C  # + final LayerNorm
    assert n == 85_056_000  # 124,439,808 minus token (50257 x 768) and position (1024 x 768) tables
    attention = 12 * L * 12 * 64 * T  # 12 L H Q T
    assert attention == 113_246_208
    assert flops_per_token(GPT2_124M, T) == 6 * n + attention == 623_582_208


def test_flops_per_token_grows_linearly_with_seq_len():
    # Only the attention term depends on T: 12 L H Q per extra token of context.
    delta = flops_per_token(GPT2_124M, 2048) - flops_per_token(GPT2_124M, 1024)
    assert delta == 12 * 12 * 12 * 64 * 1024


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L40S", 362e12),  # must not match the shorter "l4" entry
        ("NVIDIA L4", 121e12),
    ],
)
def test_peak_flops_from_device_name(name, peak):
    assert peak_flops(name) == peak


@pytest.mark.parametrize("name", ["cpu", "AMD Instinct MI300X", ""])
def test_peak_flops_unknown_device_is_none(name):
    assert peak_flops(name) is None


def test_mfu_arithmetic():
    # 400k tokens/s x 623.58 MFLOP/token = 249.4 TFLOP/s on one 989 TFLOP/s H100 = 25.2%.
    assert mfu(400_000, 623_582_208, 989e12) == pytest.approx(400_000 * 623_582_208 / 989e12)
    assert mfu(400_000, 623_582_208, 989e12) == pytest.approx(0.25221, abs=1e-5)
    # The same tokens/s spread over 8 devices is an eighth of the utilisation.
    assert mfu(400_000, 623_582_208, 989e12, n_devices=8) == pytest.approx(0.25221 / 8, abs=1e-6)


def test_mfu_unknown_peak_is_none():
    assert mfu(1e6, 1e9, None) is None
    assert mfu(1e6, 1e9, 0.0) is None

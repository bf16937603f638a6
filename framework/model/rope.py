"""Rotary position embedding frequencies, with the scalings used to extend a model's context
(`model.rope_scaling`): linear (position interpolation), llama3 (Llama 3.1's per-frequency
scaling) and yarn (YaRN: per-frequency ramp between interpolation and extrapolation, plus an
attention temperature). Each follows the published method with the parameter names and
defaults of Hugging Face's `rope_parameters` so that an exported model computes the same
logits in transformers (tests/unit/test_rope_scaling.py compares them).

Also the translation to and from a Hugging Face config.json (`rope_scaling_to_hf`,
`rope_scaling_from_hf`), used by export and model.init_from.
"""

from __future__ import annotations

import math
from typing import Any

import torch

SCALINGS = ("none", "linear", "llama3", "yarn")
# our key -> the HF rope_parameters field, per scaling type (model.rope_theta travels apart)
HF_FIELDS = {
    "linear": {"rope_factor": "factor"},
    "llama3": {
        "rope_factor": "factor",
        "rope_original_max_position": "original_max_position_embeddings",
        "rope_low_freq_factor": "low_freq_factor",
        "rope_high_freq_factor": "high_freq_factor",
    },
    "yarn": {
        "rope_factor": "factor",
        "rope_original_max_position": "original_max_position_embeddings",
        "rope_beta_fast": "beta_fast",
        "rope_beta_slow": "beta_slow",
        "rope_attention_factor": "attention_factor",
    },
}
# HF defaults of the optional fields (absent from a config.json: these values)
HF_DEFAULTS = {"beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": None, "truncate": True}


def inv_freq_and_scale(cfg) -> tuple[torch.Tensor, float]:
    """(hs/2,) inverse frequencies of the rotary pairs and the factor on cos/sin (yarn's attention
    temperature; 1 otherwise) for ModelConfig `cfg`, computed in fp32 on the CPU."""
    hs, theta = cfg.head_dim, cfg.rope_theta
    exponent = torch.arange(0, hs, 2, dtype=torch.int64).float() / hs  # (hs/2,)
    inv_freq = 1.0 / (theta**exponent)
    kind, factor = cfg.rope_scaling, cfg.rope_factor
    if kind == "none":
        return inv_freq, 1.0
    if kind == "linear":  # positions squeezed by `factor` = every frequency divided by it
        return inv_freq / factor, 1.0
    if kind == "llama3":
        return _llama3(inv_freq, cfg), 1.0
    if kind == "yarn":
        return _yarn(theta**exponent, cfg)
    raise ValueError(f"model.rope_scaling={kind!r} is not one of {', '.join(SCALINGS)}")


def _llama3(inv_freq: torch.Tensor, cfg) -> torch.Tensor:
    """Llama 3.1: wavelengths longer than original/low_freq_factor are divided by `factor`,
    those shorter than original/high_freq_factor are kept, the band between is blended by how
    many times the wave fits into the original context."""
    factor, original = cfg.rope_factor, cfg.rope_original_max_position
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
    blend = (original / wavelength - low) / (high - low)  # 0 at the long end, 1 at the short end
    blended = (1 - blend) * scaled / factor + blend * scaled
    in_band = ~(wavelength < original / high) * ~(wavelength > original / low)
    return torch.where(in_band, blended, scaled)


def _yarn(base_powers: torch.Tensor, cfg) -> tuple[torch.Tensor, float]:
    """YaRN: dimensions that rotate more than beta_fast times over the original context keep
    their frequency (extrapolation), those rotating fewer than beta_slow times are interpolated
    (divided by `factor`), a linear ramp over the dimensions between; cos/sin are multiplied by
    the attention factor (default 0.1 ln(factor) + 1)."""
    hs, theta, factor = cfg.head_dim, cfg.rope_theta, cfg.rope_factor
    original = cfg.rope_original_max_position

    def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times
        return hs * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(dim_of(cfg.rope_beta_fast)), 0)
    high = min(math.ceil(dim_of(cfg.rope_beta_slow)), hs - 1)
    if low == high:
        high += 0.001  # a ramp of width 0 would divide by zero
    ramp = ((torch.arange(hs // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate
    inv_freq = (1.0 / (factor * base_powers)) * (1 - keep) + (1.0 / base_powers) * keep
    attention = cfg.rope_attention_factor
    if attention is None:
        attention = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, float(attention)


def scaling_errors(cfg) -> list[str]:
    """Problems of the model.rope_* keys (ModelConfig.validate adds them to its own)."""
    kind = cfg.rope_scaling
    if kind not in SCALINGS:
        return [f"model.rope_scaling={kind!r} must be one of {' | '.join(SCALINGS)}"]
    if kind == "none":
        return []
    errors = []
    if cfg.style != "llama":
        errors.append(
            f"model.rope_scaling={kind} scales rotary positions, but model.style={cfg.style} has "
            "learned position embeddings: set model.rope_scaling=none (or use a llama-style model)"
        )
    if not cfg.rope_factor >= 1:
        errors.append(f"model.rope_factor={cfg.rope_factor} must be >= 1 (the extension factor)")
    if kind in ("llama3", "yarn") and not (cfg.rope_original_max_position or 0) > 0:
        errors.append(
            f"model.rope_scaling={kind} needs model.rope_original_max_position: the context length "
            "the model was pretrained at (e.g. 2048)"
        )
    if kind == "llama3" and not cfg.rope_high_freq_factor > cfg.rope_low_freq_factor:
        errors.append(
            f"model.rope_high_freq_factor={cfg.rope_high_freq_factor} must exceed "
            f"model.rope_low_freq_factor={cfg.rope_low_freq_factor}"
        )
    if kind == "yarn" and not cfg.rope_beta_fast > cfg.rope_beta_slow:
        errors.append(
            f"model.rope_beta_fast={cfg.rope_beta_fast} must exceed model.rope_beta_slow={cfg.rope_beta_slow}"
        )
    return errors


def rope_scaling_to_hf(cfg) -> dict[str, Any] | None:
    """The HF `rope_scaling` dict of ModelConfig `cfg` (rope_type + its parameters; without
    rope_theta), or None for plain RoPE. Export writes it as `rope_scaling` (transformers 4.x
    reads that) and merged into `rope_parameters` with rope_theta (transformers 5.x)."""
    if cfg.rope_scaling == "none":
        return None
    out: dict[str, Any] = {"rope_type": cfg.rope_scaling}
    for ours, theirs in HF_FIELDS[cfg.rope_scaling].items():
        value = getattr(cfg, ours)
        if value is not None:
            out[theirs] = float(value) if isinstance(value, float) else value
    return out


def rope_scaling_from_hf(hf_cfg: dict) -> dict[str, Any]:
    """Our model.rope_* keys (without `model.`) that a config.json's RoPE fields mean, read from
    `rope_parameters` (transformers 5.x) or `rope_scaling` (4.x, also `type` for rope_type).
    Raises ValueError naming a scaling type or field we do not implement."""
    # as transformers 5 reads it: rope_scaling, when set, replaces rope_parameters; rope_theta
    # comes from that dict or else from the top level
    params = dict(hf_cfg.get("rope_scaling") or hf_cfg.get("rope_parameters") or {})
    top = hf_cfg.get("rope_theta")
    theta = params.pop("rope_theta", None)
    if theta is not None and top is not None and theta != top:
        raise ValueError(
            f"rope_theta: {top} at the top level of config.json but {theta} in its RoPE parameters"
        )
    theta = theta if theta is not None else (top if top is not None else 10000.0)
    kind = params.pop("rope_type", params.pop("type", "default"))
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if kind == "default":
        kind = "none"
    if kind not in HF_FIELDS and kind != "none":
        raise ValueError(
            f"rope_scaling: rope_type {kind!r} is not implemented (we support "
            f"{' | '.join(['default', *HF_FIELDS])})"
        )
    out["rope_scaling"] = kind
    fields = HF_FIELDS.get(kind, {})
    for ours, theirs in fields.items():
        value = params.pop(theirs, HF_DEFAULTS.get(theirs))
        out[ours] = (
            float(value)
            if isinstance(value, float | int) and ours != "rope_original_max_position"
            else value
        )
    if params.pop("truncate", True) is not True:
        raise ValueError("rope_scaling: truncate=false (an untruncated YaRN ramp) is not implemented")
    if params:
        raise ValueError(
            f"rope_scaling: field(s) {sorted(params)} of rope_type {kind!r} are not implemented"
        )
    return out

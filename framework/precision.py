"""Precision policies: fp32, bf16 (autocast, fp32 master weights), fp16 (autocast + dynamic
loss scaling), fp8 (Hopper only). `auto` is bf16 on CUDA and fp32 elsewhere."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from framework.config import ConfigError, PrecisionConfig


@dataclass
class Precision:
    name: str
    device_type: str
    autocast_dtype: torch.dtype | None

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)


def resolve(cfg: PrecisionConfig, device_type: str) -> Precision:
    name = cfg.name
    if name == "auto":
        name = "bf16" if device_type == "cuda" else "fp32"
    if name == "fp32":
        return Precision(name, device_type, None)
    if name == "bf16":
        return Precision(name, device_type, torch.bfloat16)
    if name == "fp16":
        return Precision(name, device_type, torch.float16)
    if name == "fp8":
        if device_type != "cuda" or torch.cuda.get_device_capability() < (9, 0):
            raise ConfigError("precision=fp8 needs a Hopper (sm_90) or newer CUDA GPU")
        return Precision(name, device_type, torch.bfloat16)
    raise ConfigError(f"precision.name={cfg.name!r} must be auto|fp32|bf16|fp16|fp8")

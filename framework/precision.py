"""Precision policies: fp32, bf16 (autocast, fp32 master weights), fp16 (autocast + dynamic
loss scaling), fp8 (torchao float8 on Hopper, bf16 elsewhere in the model). `auto` is bf16 on
CUDA and fp32 elsewhere.

Where the compute dtype comes from depends on the engine: autocast for single/DDP/TP, FSDP2's
MixedPrecisionPolicy under FSDP (parameters all-gathered in bf16, gradients reduced in fp32),
DeepSpeed's own bf16/fp16 modes under ZeRO. Master weights and optimizer state stay fp32 in
every case.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from framework.errors import ConfigError, DivergedError


@dataclass
class PrecisionConfig:
    name: str = "auto"
    """auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16 | fp8."""
    initial_loss_scale: float = 65536.0
    """fp16: starting dynamic loss scale."""
    loss_scale_window: int = 1000
    """fp16: overflow-free steps before the scale doubles."""
    min_loss_scale: float = 1.0
    """fp16: the loss scale never drops below this."""
    max_overflows_at_min: int = 5
    """fp16: abort after this many consecutive overflowing steps at min_loss_scale."""
    fp8_min_dim: int = 2048
    """fp8: linear layers with a smaller in/out dimension stay in bf16 (too small to gain)."""


def deepspeed_cpu_fp16_supported() -> bool:
    """Whether DeepSpeed's CPU accelerator accepts fp16 here. It asks oneDNN (the same probe as
    deepspeed.accelerator.cpu_accelerator.is_fp16_supported), which says no on e.g. AMD EPYC;
    importing deepspeed itself just to ask would cost seconds in every config check."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


@dataclass
class Precision:
    name: str
    device_type: str
    autocast_dtype: torch.dtype | None

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The low-precision compute dtype (None for fp32)."""
        return self.autocast_dtype


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
            where = torch.cuda.get_device_name() if device_type == "cuda" else device_type
            raise ConfigError(
                f"precision=fp8 needs a Hopper (sm_90) or newer CUDA GPU, this run is on {where}: "
                "use precision=bf16"
            )
        return Precision(name, device_type, torch.bfloat16)
    raise ConfigError(f"precision.name={cfg.name!r} must be auto|fp32|bf16|fp16|fp8")


def apply_fp8(model: nn.Module, cfg: PrecisionConfig) -> nn.Module:
    """Swap large nn.Linear layers for torchao Float8Linear (before TP/FSDP, like any other
    change of the module tree). Layers with a dimension below precision.fp8_min_dim stay bf16:
    the casts cost more than fp8 matmuls gain at small sizes. The output head stays bf16
    (its logits feed the loss, and it is tied to the embedding in GPT-2 style)."""
    try:  # torchao is optional (not in setup.cfg): only precision=fp8 needs it
        from torchao.float8 import convert_to_float8_training
    except ImportError as e:
        raise ConfigError(
            "precision=fp8 needs torchao (`pip install torchao`), which is not installed"
        ) from e

    def big_enough(mod: nn.Module, fqn: str) -> bool:
        if not isinstance(mod, nn.Linear) or fqn.endswith("lm_head"):
            return False
        dims = (mod.in_features, mod.out_features)
        # float8 matmuls need dimensions divisible by 16
        return min(dims) >= cfg.fp8_min_dim and all(d % 16 == 0 for d in dims)

    convert_to_float8_training(model, module_filter_fn=big_enough)
    return model


class LossScaleAbort(DivergedError):
    """fp16 gradients overflow even at the minimum loss scale: training cannot continue."""


class OverflowGuard:
    """Counts consecutive skipped (overflowed) fp16 steps taken at precision.min_loss_scale
    and aborts after precision.max_overflows_at_min of them: the run is diverging, and
    skipping steps forever would silently waste the allocation."""

    def __init__(self, cfg: PrecisionConfig):
        self.min_scale, self.limit = cfg.min_loss_scale, cfg.max_overflows_at_min
        self.consecutive = 0

    def update(self, skipped: bool, scale: float) -> None:
        if not skipped or scale > self.min_scale:
            self.consecutive = 0
            return
        self.consecutive += 1
        if self.consecutive >= self.limit:
            raise LossScaleAbort(
                f"fp16: {self.consecutive} consecutive overflowing steps at the minimum loss scale "
                f"{scale} (precision.min_loss_scale={self.min_scale}, "
                f"precision.max_overflows_at_min={self.limit}); gradients are inf/nan: lower "
                "optim.lr, use precision=bf16, or resume from an earlier checkpoint"
            )


def make_grad_scaler(cfg: PrecisionConfig, precision: Precision):
    """torch.amp.GradScaler for fp16 (None otherwise): an overflowing step is skipped and the
    scale halved; loss_scale_window clean steps double it. It works on DTensor gradients
    (FSDP2, TP): the inf check runs per local shard and the found-inf flag is all-reduced by
    `sync_found_inf` in the engine, as ShardedGradScaler does for FSDP1."""
    if precision.name != "fp16":
        return None
    return torch.amp.GradScaler(
        precision.device_type,
        init_scale=cfg.initial_loss_scale,
        growth_factor=2.0,
        backoff_factor=0.5,
        growth_interval=cfg.loss_scale_window,
    )

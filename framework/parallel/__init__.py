"""Parallelism applied to the plain model by functions, in one documented order:
tensor parallel -> activation checkpointing -> torch.compile -> FSDP/DDP; DeepSpeed ZeRO
runs its own engine behind the same `Engine` interface."""

from __future__ import annotations

from torch import nn

from framework.config import Config
from framework.optim import build_optimizer
from framework.parallel.dist import Dist
from framework.parallel.engine import Engine, NonFiniteError, StepResult, TorchEngine
from framework.precision import resolve

__all__ = ["Engine", "NonFiniteError", "StepResult", "TorchEngine", "build_engine"]


def build_engine(model: nn.Module, cfg: Config, dist: Dist) -> Engine:
    """Wrap `model` (already on its device, weights initialised) for cfg.strategy."""
    precision = resolve(cfg.precision, dist.device.type)
    name = cfg.strategy.name
    if name != "single":
        raise NotImplementedError(f"strategy={name} is not implemented yet")
    optimizer = build_optimizer(model, cfg.optim, dist.device.type)
    scaler = None
    if precision.name == "fp16":
        import torch

        scaler = torch.amp.GradScaler(
            dist.device.type,
            init_scale=cfg.precision.initial_loss_scale,
            growth_interval=cfg.precision.loss_scale_window,
        )
    return TorchEngine(model, model, optimizer, precision, cfg.optim.grad_clip, dist.device, scaler)

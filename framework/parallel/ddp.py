"""Data parallel: every rank holds the whole model; gradients are all-reduced (averaged) in
buckets during backward. DistributedDataParallel rather than Accelerate's `prepare`: it is
the same DDP underneath, and wrapping it ourselves keeps the build order (TP -> AC -> compile
-> DDP) and the no-sync gradient accumulation in one place."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def apply_ddp(
    model: nn.Module,
    device: torch.device,
    group=None,
    init_sync: bool = True,
    ignore: list[str] = (),
) -> DistributedDataParallel:
    """group: the ranks that average gradients (None: all; under context parallelism the dp x cp
    ranks, which hold the same weights). init_sync=False skips the start-up broadcast of the
    weights (framework.plan's dry run, whose fake tensors have no data to send). `ignore`:
    parameter names DDP leaves alone (expert parallelism reduces those itself)."""
    if ignore:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(ignore))
    # broadcast_buffers off: the model's only buffers (RoPE tables) are identical by construction
    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        broadcast_buffers=False,
        init_sync=init_sync,
        process_group=group,
    )


def ddp_grad_sync(model: DistributedDataParallel):
    """Context factory for one micro-batch: skip the all-reduce on all but the last
    micro-batch of an optimizer step (gradients accumulate locally, reduced once)."""

    def sync(last: bool):
        return contextlib.nullcontext() if last else model.no_sync()

    return sync

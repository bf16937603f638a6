"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over the
data-parallel mesh; each block is its own all-gather / reduce-scatter unit, the root holds
the embeddings, final norm and (tied) output head.

HSDP: with strategy.hsdp_replicas > 1 the mesh is 2-D (replicate, shard): parameters are
sharded inside each group of world/replicas ranks and gradients all-reduced across groups.
Mixed precision: bf16/fp16 compute with fp32 master weights and fp32 gradient reduction.

FSDP2 directly rather than Accelerate's FSDP plugin: the plugin wraps the same `fully_shard`,
but it would have to run after our TP and compile steps anyway and brings its own state-dict
handling; DCP on the plain module is all we need.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def mixed_precision_policy(compute_dtype: torch.dtype | None) -> MixedPrecisionPolicy:
    """Parameters all-gathered in the compute dtype; gradients reduced in fp32 (summing many
    ranks' bf16 gradients loses bits); the sharded fp32 master weights stay fp32."""
    if compute_dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    reshard_after_forward: bool,
    mp: MixedPrecisionPolicy,
    per_block: bool = True,
) -> nn.Module:
    """Shard each block, then the root (in place; `model` becomes an FSDPModule). per_block=False:
    the root alone, one unit for the whole module (a pipeline stage under a split-backward
    schedule, framework/parallel/pp.py)."""
    for block in model.blocks.values() if per_block else ():
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)
    # the root is all-gathered last in forward and needed first in backward: keeping it
    # unsharded after forward saves one all-gather per step for little memory
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=mp)
    return model


def fsdp_grad_sync(model: FSDPModule):
    """Skip the reduce-scatter on all but the last micro-batch of an optimizer step."""

    def sync(last: bool):
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    return sync


def apply_replicate(
    model: nn.Module, mesh: DeviceMesh, mp: MixedPrecisionPolicy, per_block: bool = True
) -> nn.Module:
    """Whole replicas over `mesh`, gradients all-reduced (averaged) once per step: FSDP2's
    `replicate` (DDP semantics on FSDP2's machinery), for pipeline stages
    (framework/parallel/pp.py says why not DDP). Each block is its own all-reduce unit, as
    under fully_shard, so the reduction of early blocks overlaps the backward of later ones."""
    for block in model.blocks.values() if per_block else ():
        replicate(block, mesh=mesh, mp_policy=mp)
    replicate(model, mesh=mesh, mp_policy=mp)
    return model

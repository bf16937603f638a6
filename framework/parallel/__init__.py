"""Parallelism applied to the plain model by functions, in one documented order:

    fp8 conversion -> tensor / expert parallel -> activation checkpointing -> torch.compile
    -> FSDP/DDP

(each a file here: tp.py, ep.py, ac.py, compile.py, fsdp.py, ddp.py); the optimizer is built last,
over the final (possibly DTensor) parameters. DeepSpeed ZeRO runs its own engine (zero.py)
behind the same `Engine` interface, so the training loop never branches on the strategy.

Accelerate is supported as a launcher (`accelerate launch` sets RANK/WORLD_SIZE/... which
init_distributed reads; configs in launchers/accelerate/). Its Accelerator is not used to
wrap the model: it would apply DDP/FSDP in its own order (we need TP -> AC -> compile -> FSDP)
and does not do tensor parallel of a non-Hugging-Face model, ZeRO on CPU, or our DCP layout,
so it would add a second code path without removing any of ours.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from framework.config import Config, ConfigError, Layout, layout
from framework.dist import Dist
from framework.optim import build_optimizer
from framework.parallel.ac import apply_ac
from framework.parallel.compile import apply_compile
from framework.parallel.ddp import apply_ddp, ddp_grad_sync
from framework.parallel.engine import Engine, NonFiniteError, StepResult, TorchEngine
from framework.parallel.ep import apply_ep, expert_grad_sync, expert_param_names, shard_experts
from framework.parallel.fsdp import apply_fsdp, fsdp_grad_sync, mixed_precision_policy
from framework.parallel.materialize import initial_values, materialize, meta_model, zero3_model
from framework.parallel.mesh import Mesh, build_mesh
from framework.parallel.tp import apply_tp
from framework.parallel.zero import build_zero, deepspeed_config, ensure_process_group
from framework.precision import OverflowGuard, apply_fp8, make_grad_scaler, resolve

__all__ = ["Engine", "NonFiniteError", "StepResult", "TorchEngine", "build_engine"]


def _meshes(
    cfg: Config, dist: Dist, tp: bool, dp: str | None
) -> tuple[DeviceMesh | None, DeviceMesh | None, Layout, Mesh]:
    """(tp_mesh, dp_mesh, layout, the whole mesh) for this strategy; dp_mesh is 2-D (replicate,
    shard) under HSDP. DDP needs no mesh: it reduces over the default group."""
    lay = layout(cfg.strategy, dist.world_size)
    mesh = build_mesh(lay, dist.device.type)
    return (mesh.get("tp") if tp else None), (mesh.fsdp() if dp == "fsdp" else None), lay, mesh


def _build_torch(
    model: nn.Module | None, cfg: Config, dist: Dist, *, tp: bool, dp: str | None, dry_run: bool = False
) -> Engine:
    """single / ddp / fsdp / tp / tp_fsdp: transform the plain model in the documented order.
    model=None: built here on meta and materialised per rank (dry_run: left on meta)."""
    s = cfg.strategy
    precision = resolve(cfg.precision, dist.device.type)
    tp_mesh, dp_mesh, lay, mesh = _meshes(cfg, dist, tp, dp)
    values = None
    if model is None:
        model, values = meta_model(cfg.model), initial_values(cfg)
    else:
        model.to(dist.device)  # a plain model built and initialised by the caller
    if dry_run:
        values = None
    if precision.name == "fp8":
        apply_fp8(model, cfg.precision)
    if tp:
        apply_tp(model, tp_mesh, s.sequence_parallel)
    experts, edp_mesh = [], None
    if lay.ep > 1:
        edp_mesh, ep_mesh = mesh.experts()
        experts = apply_ep(model, ep_mesh, mesh.get("dp_replicate", "dp_shard").get_group())
    apply_ac(model, s.activation_checkpointing)
    if s.compile:
        apply_compile(model)
    if values is not None and dp != "fsdp":
        materialize(model, dist.device, values)  # the whole (tp: this rank's tp part of the) model
    wrapped, extra = model, {}
    if dp == "ddp" and dry_run:
        extra = {}  # DDP cannot wrap meta tensors
    elif dp == "ddp":
        wrapped = apply_ddp(model, dist.device, ignore=expert_param_names(model, experts))
        sync = ddp_grad_sync(wrapped)
        if experts:  # the ranks that hold the same experts reduce their gradients themselves
            edp = edp_mesh.get_group() if edp_mesh.size() > 1 else None
            sync = expert_grad_sync(experts, edp, lay.dp, sync)
        extra = dict(grad_sync=sync)
    elif dp == "fsdp":
        mp = mixed_precision_policy(precision.compute_dtype)
        if experts:  # their own units over the ranks holding the same experts, first
            shard_experts(experts, edp_mesh, lay.dp, s.reshard_after_forward, mp)
        apply_fsdp(model, dp_mesh, s.reshard_after_forward, mp)
        precision = replace(precision, autocast_dtype=None)  # the FSDP policy casts instead
        if values is not None:
            materialize(model, dist.device, values)  # only this rank's shards
        extra = dict(grad_sync=fsdp_grad_sync(model))
    # the loader's coordinate: ranks of one TP group share a dp rank (same data)
    extra.update(dp_rank=lay.dp_rank(dist.rank), dp_size=lay.dp)
    if tp and s.sequence_parallel:
        extra["seq_multiple"] = s.tp
        extra["rng_rank"] = dist.rank  # every dropout acts on rank-local slices
    optimizer = build_optimizer(model, cfg.optim, dist.device.type)
    scaler = make_grad_scaler(cfg.precision, precision)
    guard = OverflowGuard(cfg.precision) if scaler is not None else None
    return TorchEngine(
        wrapped,
        model,
        optimizer,
        precision,
        cfg.optim.grad_clip,
        dist.device,
        scaler,
        overflow_guard=guard,
        min_loss_scale=cfg.precision.min_loss_scale,
        **extra,
    )


def _build_zero(model: nn.Module | None, cfg: Config, dist: Dist, dry_run: bool = False) -> Engine:
    """zero1/2/3: AC and compile still apply to the plain model; DeepSpeed does the rest.
    model=None: zero1/2 materialise the whole model (replicated weights); zero3 partitions it
    while it is built (deepspeed.zero.Init)."""
    precision = resolve(cfg.precision, dist.device.type)
    if dry_run:
        raise ConfigError(
            f"plan.dry_run: strategy={cfg.strategy.name} runs DeepSpeed's engine, which cannot "
            "be built over a fake process group; dry-run strategy=fsdp|tp_fsdp|tp|ddp|single"
        )
    if model is None and cfg.strategy.name == "zero3":
        ensure_process_group(dist)
        ds_config = deepspeed_config(cfg, dist.world_size, precision)
        model = zero3_model(cfg.model, ds_config, initial_values(cfg))
    elif model is None:
        model = meta_model(cfg.model)
        materialize(model, dist.device, initial_values(cfg))
    apply_ac(model, cfg.strategy.activation_checkpointing)
    if cfg.strategy.compile:
        apply_compile(model)
    optimizer = build_optimizer(model, cfg.optim, dist.device.type)
    return build_zero(model, cfg, dist, precision, optimizer)


BUILDERS: dict[str, Callable[[nn.Module, Config, Dist], Engine]] = {
    "single": partial(_build_torch, tp=False, dp=None),
    "ddp": partial(_build_torch, tp=False, dp="ddp"),
    "fsdp": partial(_build_torch, tp=False, dp="fsdp"),
    "tp": partial(_build_torch, tp=True, dp=None),
    "tp_fsdp": partial(_build_torch, tp=True, dp="fsdp"),
    "zero1": _build_zero,
    "zero2": _build_zero,
    "zero3": _build_zero,
}


def build_engine(model: nn.Module | None, cfg: Config, dist: Dist, *, dry_run: bool = False) -> Engine:
    """The engine for cfg.strategy and cfg.precision.

    model=None (training): the model is built on `meta`, parallelised, and each rank allocates
    and initialises only its part (framework.parallel.materialize); the initial weights depend
    on trainer.seed (or model.init_from), not on the strategy or world size. A plain GPT
    passed in (tests, benchmarks) must already be initialised identically on every rank.
    dry_run=True (framework.plan): the parallel functions run over a (fake) process group and
    the parameters stay on `meta`."""
    try:
        builder = BUILDERS[cfg.strategy.name]
    except KeyError:
        raise ConfigError(
            f"strategy.name={cfg.strategy.name!r} is not one of {', '.join(BUILDERS)}"
        ) from None
    return builder(model, cfg, dist, dry_run=dry_run)

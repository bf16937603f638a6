"""Parallelism applied to the plain model by functions, in one documented order:

    fp8 conversion -> tensor parallel -> context parallel -> activation checkpointing
    -> torch.compile -> FSDP/DDP

(each a file here: tp.py, cp.py, ac.py, compile.py, fsdp.py, ddp.py); the optimizer is built last,
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

from framework.config import Config, ConfigError, layout
from framework.dist import Dist
from framework.model.attention import kernel_for
from framework.optim import build_optimizer
from framework.parallel.ac import apply_ac
from framework.parallel.compile import apply_compile
from framework.parallel.cp import ContextSplit, RingContext, WholeSequence, apply_ulysses
from framework.parallel.ddp import apply_ddp, ddp_grad_sync
from framework.parallel.engine import Engine, NonFiniteError, StepResult, TorchEngine
from framework.parallel.fsdp import apply_fsdp, fsdp_grad_sync, mixed_precision_policy
from framework.parallel.materialize import initial_values, materialize, meta_model, zero3_model
from framework.parallel.mesh import Mesh, build_mesh
from framework.parallel.tp import apply_tp
from framework.parallel.zero import build_zero, deepspeed_config, ensure_process_group
from framework.precision import OverflowGuard, apply_fp8, make_grad_scaler, resolve

__all__ = ["Engine", "NonFiniteError", "StepResult", "TorchEngine", "build_engine"]


def _meshes(
    cfg: Config, dist: Dist, tp: bool, dp: str | None
) -> tuple[DeviceMesh | None, DeviceMesh | None, Mesh]:
    """(tp_mesh, dp_mesh, mesh) for this strategy; dp_mesh is 2-D (replicate, shard) under
    HSDP. DDP needs no mesh: it reduces over the dp x cp group."""
    mesh = build_mesh(layout(cfg.strategy, dist.world_size), dist.device.type)
    return (mesh.get("tp") if tp else None), (mesh.fsdp() if dp == "fsdp" else None), mesh


def _sequence(cfg: Config, mesh: Mesh, model: nn.Module, sp: int):
    """What each rank computes of a sequence (framework/parallel/cp.py): its context-parallel
    chunk (the model's attention wrapped for ulysses) or all of it. sp: the sequence-parallel
    TP degree that splits each chunk again."""
    cp_mesh = mesh.get("cp")
    if cp_mesh is None:
        return WholeSequence(sp)
    if cfg.strategy.cp_method == "ring":
        return RingContext(cp_mesh)
    apply_ulysses(model, cp_mesh)
    return ContextSplit(cp_mesh, sp)


def _build_torch(
    model: nn.Module | None, cfg: Config, dist: Dist, *, tp: bool, dp: str | None, dry_run: bool = False
) -> Engine:
    """single / ddp / fsdp / tp / tp_fsdp: transform the plain model in the documented order.
    model=None: built here on meta and materialised per rank (dry_run: left on meta)."""
    s = cfg.strategy
    precision = resolve(cfg.precision, dist.device.type)
    tp_mesh, dp_mesh, mesh = _meshes(cfg, dist, tp, dp)
    lay = mesh.layout
    values = None
    if model is None:
        model, values = meta_model(cfg.model), initial_values(cfg)
    else:
        model.to(dist.device)  # a plain model built and initialised by the caller
    model.use_attention(kernel_for(dist.device.type, cfg.model.dropout, cfg.trainer.seq_len))
    if dry_run:
        values = None
    if precision.name == "fp8":
        apply_fp8(model, cfg.precision)
    if tp:
        apply_tp(model, tp_mesh, s.sequence_parallel)
    sp = s.tp if tp and s.sequence_parallel else 1
    sequence = _sequence(cfg, mesh, model, sp)
    apply_ac(model, s.activation_checkpointing)
    if s.compile:
        apply_compile(model)
    if values is not None and dp != "fsdp":
        materialize(model, dist.device, values)  # the whole (tp: this rank's tp part of the) model
    wrapped, extra = model, {}
    if dp == "ddp" and dry_run:
        extra = {}  # DDP cannot wrap meta tensors
    elif dp == "ddp":
        group = None  # every rank
        if lay.cp > 1:  # the dp x cp ranks (tp peers hold other weights)
            group = mesh.get("dp_replicate", "dp_shard", "cp").get_group()
        wrapped = apply_ddp(model, dist.device, group)
        extra = dict(grad_sync=ddp_grad_sync(wrapped))
    elif dp == "fsdp":
        apply_fsdp(
            model, dp_mesh, s.reshard_after_forward, mixed_precision_policy(precision.compute_dtype)
        )
        precision = replace(precision, autocast_dtype=None)  # the FSDP policy casts instead
        if values is not None:
            materialize(model, dist.device, values)  # only this rank's shards
        extra = dict(grad_sync=fsdp_grad_sync(model))
    # the loader's coordinate: ranks of one TP or CP group share a dp rank (same data)
    extra.update(dp_rank=lay.dp_rank(dist.rank), dp_size=lay.dp, sequence=sequence)
    if sp > 1:
        extra["rng_rank"] = dist.rank  # every dropout acts on rank-local slices
    elif lay.cp > 1:  # each cp rank its own chunk; TP peers (no SP) share their activations
        extra["rng_rank"] = lay.dp_rank(dist.rank) * lay.cp + lay.coords(dist.rank)["cp"]
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
    model.use_attention(kernel_for(dist.device.type, cfg.model.dropout, cfg.trainer.seq_len))
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

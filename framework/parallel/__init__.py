"""Parallelism applied to the plain model by functions, in one documented order:

    fp8 conversion -> tensor parallel -> context / expert parallel -> activation checkpointing
    -> torch.compile -> FSDP/DDP

(each a file here: tp.py, cp.py, ep.py, ac.py, compile.py, fsdp.py, ddp.py); the optimizer is built last,
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

import torch
from torch import nn

from framework.config import Config, ConfigError, grad_accum_steps, layout
from framework.dist import Dist
from framework.model.attention import kernel_for
from framework.model.gpt import canonical_name
from framework.optim import build_optimizer
from framework.parallel.ac import apply_ac
from framework.parallel.compile import apply_compile
from framework.parallel.cp import ContextSplit, RingContext, WholeSequence, apply_ulysses
from framework.parallel.ddp import apply_ddp, ddp_grad_sync
from framework.parallel.engine import Engine, NonFiniteError, StepResult, TorchEngine
from framework.parallel.ep import apply_ep, expert_grad_sync, expert_param_names, shard_experts
from framework.parallel.fsdp import apply_fsdp, apply_replicate, fsdp_grad_sync, mixed_precision_policy
from framework.parallel.materialize import (
    Values,
    initial_values,
    materialize,
    meta_model,
    zero3_model,
)
from framework.parallel.mesh import Mesh, build_mesh
from framework.parallel.pp import (
    SPLIT_BACKWARD,
    TIED_COPY,
    TIED_NAME,
    PipelineEngine,
    TiedEmbedding,
    build_stages,
    initial_name,
)
from framework.parallel.tp import apply_tp
from framework.parallel.zero import build_zero, deepspeed_config, ensure_process_group
from framework.precision import OverflowGuard, Precision, apply_fp8, make_grad_scaler, resolve
from framework.stages import stage_rank

__all__ = ["Engine", "NonFiniteError", "StepResult", "TorchEngine", "build_engine"]


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


def _parallelize(
    module: nn.Module,
    cfg: Config,
    mesh: Mesh,
    precision: Precision,
    device: torch.device,
    values: Values | None,
    *,
    tp: bool,
    dp: str | None,
    dry_run: bool,
    pipeline: bool = False,
) -> tuple[nn.Module, Precision, dict]:
    """The documented order on one plain (meta or materialised) module: fp8 -> tensor parallel
    -> context parallel -> activation checkpointing -> compile -> DDP/FSDP, each rank writing
    its part of the initial values (`values`; None: the module already holds them, or a dry run
    on meta). Returns (the module to call, the precision after FSDP's policy took over the
    casts, the engine's extra arguments). Under a pipeline (a stage module), data parallel over
    whole replicas is FSDP2's `replicate` instead of DDP (framework/parallel/pp.py says why)."""
    s = cfg.strategy
    module.use_attention(kernel_for(device.type, cfg.model.dropout, cfg.trainer.seq_len))
    if precision.name == "fp8":
        apply_fp8(module, cfg.precision)
    if tp:
        apply_tp(module, mesh.get("tp"), s.sequence_parallel)
    sequence = _sequence(cfg, mesh, module, s.tp if tp and s.sequence_parallel else 1)
    lay, experts, edp_mesh = mesh.layout, [], None
    if lay.ep > 1:  # the experts split over ep ranks, tokens exchanged by all-to-all
        edp_mesh, ep_mesh = mesh.experts()
        experts = apply_ep(module, ep_mesh, mesh.get("dp_replicate", "dp_shard").get_group())
    apply_ac(module, s.activation_checkpointing)
    if s.compile:
        apply_compile(module)
    replicas = mesh.get("dp_replicate") if pipeline and dp == "ddp" else None
    per_block = not (pipeline and s.pp_schedule in SPLIT_BACKWARD)
    sharded = dp == "fsdp" or replicas is not None
    if values is not None and not sharded:
        materialize(module, device, values)  # the whole (tp: this rank's tp part of the) model
    wrapped, extra = module, {"sequence": sequence}
    if dp == "ddp" and not pipeline and not dry_run:  # (DDP cannot wrap a dry run's meta tensors)
        group = None  # every rank
        if lay.cp > 1:  # the dp x cp ranks (tp peers hold other weights)
            group = mesh.get("dp_replicate", "dp_shard", "cp").get_group()
        wrapped = apply_ddp(module, device, group, ignore=expert_param_names(module, experts))
        sync = ddp_grad_sync(wrapped)
        if experts:  # the ranks that hold the same experts reduce their gradients themselves
            edp = edp_mesh.get_group() if edp_mesh.size() > 1 else None
            sync = expert_grad_sync(experts, edp, lay.dp, sync)
        extra["grad_sync"] = sync
    elif sharded:
        policy = mixed_precision_policy(precision.compute_dtype)
        if experts:  # their own units over the ranks holding the same experts, first
            shard_experts(experts, edp_mesh, lay.dp, s.reshard_after_forward, policy)
        if dp == "fsdp":
            apply_fsdp(module, mesh.fsdp(), s.reshard_after_forward, policy, per_block)
        else:
            apply_replicate(module, replicas, policy, per_block)
        precision = replace(precision, autocast_dtype=None)  # the FSDP policy casts instead
        if values is not None:
            materialize(module, device, values)  # only this rank's shards
        extra["grad_sync"] = fsdp_grad_sync(module)
    return wrapped, precision, extra


def _build_torch(
    model: nn.Module | None, cfg: Config, dist: Dist, *, tp: bool, dp: str | None, dry_run: bool = False
) -> Engine:
    """single / ddp / fsdp / tp / tp_fsdp (and pp): transform the plain model in the documented
    order. model=None: built here on meta and materialised per rank (dry_run: left on meta)."""
    s = cfg.strategy
    precision = resolve(cfg.precision, dist.device.type)
    mesh = build_mesh(layout(s, dist.world_size), dist.device.type)
    lay = mesh.layout
    tp = tp and lay.tp > 1  # tp=1 (a world of one under a launcher): no tensor parallelism
    values = None
    if model is None:
        values = initial_values(cfg)
    elif s.pp > 1:
        whole = model.state_dict()  # a plain model built and initialised by the caller
        values = lambda name, shape: whole[canonical_name(name)]  # noqa: E731
    else:
        model.to(dist.device)  # a plain model built and initialised by the caller
    if dry_run:
        values = None
    # the loader's coordinate: ranks of one TP or CP group (and pipeline stages) share a dp rank
    extra = dict(dp_rank=lay.dp_rank(dist.rank), dp_size=lay.dp)
    if tp and s.sequence_parallel:
        extra["rng_rank"] = dist.rank  # every dropout acts on rank-local slices
    elif lay.cp > 1:  # each cp rank its own chunk; TP peers (no SP) share their activations
        extra["rng_rank"] = lay.dp_rank(dist.rank) * lay.cp + lay.coords(dist.rank)["cp"]
    common = dict(grad_clip=cfg.optim.grad_clip, device=dist.device)
    if s.pp > 1:
        return _build_pipeline(
            cfg, dist, mesh, precision, values, tp=tp, dp=dp, dry_run=dry_run, **extra, **common
        )
    if model is None:
        model = meta_model(cfg.model)
    wrapped, precision, more = _parallelize(
        model, cfg, mesh, precision, dist.device, values, tp=tp, dp=dp, dry_run=dry_run
    )
    optimizer = build_optimizer(model, cfg.optim, dist.device.type)
    scaler = make_grad_scaler(cfg.precision, precision)
    guard = OverflowGuard(cfg.precision) if scaler is not None else None
    return TorchEngine(
        wrapped,
        model,
        optimizer,
        precision=precision,
        scaler=scaler,
        overflow_guard=guard,
        min_loss_scale=cfg.precision.min_loss_scale,
        **common,
        **extra,
        **more,
    )


def _build_pipeline(
    cfg: Config,
    dist: Dist,
    mesh: Mesh,
    precision: Precision,
    values: Values | None,
    *,
    tp: bool,
    dp: str | None,
    dry_run: bool,
    **engine_kw,
) -> Engine:
    """strategy.pp > 1: this rank's stages (framework/parallel/pp.py), each parallelised like a
    whole model and given its own optimizer, behind one PipelineEngine."""
    m, s = cfg.model, cfg.strategy
    pp_mesh = mesh.get("pp")
    used = {}

    def parallelize(module: nn.Module) -> nn.Module:
        stage_values = None
        if values is not None:
            stage_values = lambda name, shape: values(initial_name(m, name), shape)  # noqa: E731
        wrapped, used["precision"], more = _parallelize(
            module, cfg, mesh, precision, dist.device, stage_values, tp=tp, dp=dp,
            dry_run=dry_run, pipeline=True,
        )  # fmt: skip
        used["sequence"] = more["sequence"]  # (context parallel is refused under pp)
        return wrapped

    stages, parts = build_stages(m, s, cfg.trainer.seq_len, pp_mesh.get_local_rank(), parallelize)
    last = stage_rank(len(stages) - 1, s.pp, s.pp_schedule)
    group = TiedEmbedding.pair_groups(dist.world_size, s.pp, last) if m.tie_embeddings else None
    tie = None
    if m.tie_embeddings:
        tied = [p for part in parts for n, p in part.named_parameters() if n in (TIED_NAME, TIED_COPY)]
        tie = TiedEmbedding(tied, group) if tied else None
    return PipelineEngine(
        parts,
        stages,
        s.pp_schedule,
        [build_optimizer(part, cfg.optim, dist.device.type) for part in parts],
        pp_mesh,
        grad_accum_steps(cfg, mesh.layout.dp),
        m.num_labels or m.vocab_size,
        tie,
        precision=used["precision"],
        sequence=used["sequence"],
        **engine_kw,
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
    # pipeline alone (whole replicas across dp); strategy.pp > 1 builds stages in every torch strategy
    "pp": partial(_build_torch, tp=False, dp="ddp"),
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

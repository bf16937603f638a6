"""`python -m framework.plan`: validate a composed config for a target world size and print the
per-GPU memory, FLOPs, communication and step-time plan, without a process group and without
touching a GPU (nothing here calls into CUDA), so a 1024-GPU config is checked on a laptop in
a second or two.

    python -m framework.plan model=gpt3-175b strategy=zero3 plan.world_size=1024 plan.gpu=h100 \
        trainer.seq_len=2048 trainer.micro_batch_size=1 trainer.global_batch_size=2048 \
        strategy.activation_checkpointing=full

Same config tree as training (conf/config.yaml); plan.world_size (default: the launcher's
WORLD_SIZE, else 1), plan.gpu, plan.mfu, plan.gpus_per_node and plan.*_node_gbps pick the
target. The estimate is framework/estimate.py over the memory model (framework/memory.py), the
collectives and what overlaps (framework/comm.py) and the pipeline split and bubble
(framework/stages.py). A config that cannot run exits 2 with a ConfigError naming the keys. The
last stdout line is one JSON object (memory_gib, flops_per_token, the breakdown, comm_bytes,
compute_s, comm_s, bubble, step_time_s, fits).

plan.search=true ranks the layouts of the model on the world size (tp x pp x dp x cp x schedule
x micro-batch x checkpointing x data-parallel flavour) by estimated step time
(framework.estimate.search); the JSON line is the top layout's, plus "search": the table's rows.

plan.dry_run=true (RELIABILITY D5) also runs the real build path: the model on `meta`, the
real parallel functions (TP, AC, compile, FSDP) over torch's fake process group of
plan.world_size ranks, this process playing rank 0, and counts the bytes of the local shards
themselves; then one optimizer step on fake tensors, counting the bytes each collective moves
(`count_comm`). The JSON line gains "dry_run". Still no GPU, no memory for weights, no real peers.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

import torch
import torch.distributed as tdist
from omegaconf import DictConfig
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.distributed.tensor import DTensor
from torch.testing._internal.distributed.fake_pg import FakeStore  # registers backend "fake"
from torch.utils._python_dispatch import TorchDispatchMode

from framework import comm, memory, stages
from framework.cli import entry
from framework.config import Config, ConfigError, grad_accum_steps, layout, load, validate
from framework.data.loader import Batch
from framework.data.vocab import resolve_vocab_size
from framework.dist import Dist
from framework.estimate import Plan, cluster, dp_kind, estimate, search, search_row
from framework.parallel import build_engine
from framework.parallel.ddp import apply_ddp, ddp_grad_sync
from framework.parallel.materialize import allocate
from framework.task import resolve_task

GIB = memory.GIB


def resolve_world_size(requested: int | None, env: dict[str, str] | None = None) -> int:
    """plan.world_size, else the launcher's WORLD_SIZE, else 1."""
    if requested is not None:
        return requested
    env = os.environ if env is None else env
    raw = env.get("WORLD_SIZE", "1")
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={raw!r} is not an integer; set plan.world_size instead") from None


def resolve(cfg: Config) -> None:
    """What the config leaves to the data: model.vocab_size=auto (from the manifests or the
    tokenizer) and, for task=classify, model.num_labels (the head's rows)."""
    resolve_vocab_size(cfg)
    resolve_task(cfg)


def make_plan(cfg: Config, world_size: int) -> Plan:
    """Validate `cfg` for `world_size` GPUs (ConfigError naming the keys) and size one GPU."""
    resolve(cfg)
    # the plan sizes GPUs, whatever this machine has, for a launch (torchrun, srun, ...) of
    # world_size processes: a world of 1 is a valid launch of every strategy
    validate(cfg, world_size, device="cuda", launched=True)
    return estimate(cfg, world_size)


def _count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def _si(x: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} "


def _copies_note(p: Plan) -> str:
    if p.pp > 1 and p.strategy in ("fsdp", "tp_fsdp"):
        return "the stage's gathered weights, kept from the first backward to the step's end"
    if p.strategy in ("zero3", "fsdp", "tp_fsdp"):
        return "ZeRO-3/FSDP gathered blocks in flight"
    if p.weight_copies_bytes:
        return "autocast's 16-bit casts of the fp32 matrices"
    return "none: the weights are already in the compute dtype"


def _sharding(divisor: int) -> str:
    return f"sharded over {divisor} dp ranks" if divisor > 1 else "replicated over dp"


def render(p: Plan, cfg: Config) -> str:
    """The human-readable plan (the JSON line follows it)."""
    s = cfg.strategy
    kind = dp_kind(p.strategy)
    sb = memory.state_bytes(p.precision, kind)
    shards = memory.dp_shards(kind, p.dp * p.cp, s.hsdp_replicas)
    tp_note = f", block matrices split over tp={p.tp}" if p.tp > 1 else ""
    if s.zero_offload:
        optim_note = "in host memory: strategy.zero_offload"
    elif sb.param < 4:
        optim_note = "fp32 m, v + fp32 master"
    elif p.precision == "fp32":
        optim_note = "fp32 m, v"
    else:
        optim_note = "fp32 m, v; the fp32 weights are the master"
    sp_note = " / tp (sequence parallel)" if p.tp > 1 and s.sequence_parallel else ""
    gib = lambda x: f"{x / GIB:9.2f}"  # noqa: E731
    by_mode = ", ".join(f"{k} {v / GIB:.2f}" for k, v in p.activations_by_mode_bytes.items())
    axes = f"dp={p.dp}, tp={p.tp}" + "".join(
        f", {k}={v}" for k, v in (("pp", p.pp), ("cp", p.cp), ("ep", p.ep)) if v > 1
    )
    pipeline = []
    if p.pp > 1:
        in_flight = stages.in_flight(p.pp, p.grad_accum, s.pp_schedule, s.pp_stages_per_rank)
        pipeline = [
            f"  pipeline     {p.pp} ranks, schedule {p.schedule}, blocks per stage {p.stage_layers}; "
            f"bubble {p.bubble:.1%} of the step; the first rank holds {in_flight:g} micro-batches "
            "of activations"
        ]
    lines = [
        f"plan: {p.model} on {p.world_size} x {p.gpu} ({p.gpu_memory_gib:g} GiB), strategy={p.strategy} "
        f"({axes}), precision={p.precision}, activation_checkpointing={p.activation_checkpointing}",
        f"  parameters   {_count(p.params)} in the model, {_count(p.params_per_gpu)} stored per GPU",
        f"  batch        {cfg.trainer.global_batch_size} sequences x {cfg.trainer.seq_len} tokens = "
        f"{_count(p.tokens_per_step)} tokens/step; micro-batch {p.micro_batch_size} x "
        f"{p.grad_accum} accumulation steps per dp rank",
        f"  compute      {_si(p.flops_per_token)}FLOP/token (6N + 12 L H Q T); "
        f"{p.flops_per_token * p.tokens_per_step:.3g} FLOP/step",
        *pipeline,
        f"  step time    {p.step_time_s:.3g} s = compute {p.compute_s:.3g} s (at {p.mfu:.0%} MFU of "
        f"{p.peak_flops / 1e12:g} TFLOP/s per GPU) + exposed communication {p.comm_s:.3g} s + bubble "
        f"{p.bubble_s:.3g} s: {_count(p.tokens_per_step / p.step_time_s)} tokens/s, "
        f"{p.mfu_estimated:.0%} MFU",
        *render_comm(p),
        "  memory per GPU (GiB)" + (", the most loaded pipeline rank" if p.pp > 1 else ""),
        f"    weights       {gib(p.params_bytes)}  {sb.param} B/param, {_sharding(shards.params)}{tp_note}",
        f"    gradients     {gib(p.grads_bytes)}  {sb.grad} B/param, {_sharding(shards.grads)}",
        f"    optimizer     {gib(p.optimizer_bytes)}  {sb.optimizer} B/param ({optim_note}), "
        f"{_sharding(shards.optimizer)}",
        f"    weight copies {gib(p.weight_copies_bytes)}  {_copies_note(p)}",
        *(
            [
                f"    unsharded grads {gib(p.unsharded_grads_bytes)[2:]}  FSDP's whole fp32 gradients "
                "between micro-batches (gradient sync on the last only)"
            ]
            if p.unsharded_grads_bytes
            else []
        ),  # fmt: skip
        f"    activations   {gib(p.activations_bytes)}  "
        + ("micro-batches in flight" if p.pp > 1 else "one micro-batch")
        + f" of {p.micro_batch_size}, checkpointing={p.activation_checkpointing}{sp_note}"
        + (f" / cp={p.cp}" if p.cp > 1 else "")
        + f", + loss (by mode: {by_mode})",
        f"    total         {gib(p.memory_bytes)}  of {p.gpu_memory_gib:g} "
        f"(plan limit {p.limit_gib:.0f} = {memory.FIT_FRACTION:.0%}): "
        + ("fits" if p.fits else "DOES NOT FIT"),
    ]
    if p.ep > 1:
        lines[1] += f" (each rank 1/{p.ep} of the routed experts)"
        lines.insert(
            -1,
            f"    ep buffers    {gib(p.ep_buffers_bytes)}  one sparse layer's all-to-all send + "
            f"receive rows; all-to-all {p.comm_bytes.get('ep_all_to_all', 0) / 1e9:.3g} GB sent per rank per step",
        )
    if not p.fits:
        lines.append(
            "  to fit: shard more (strategy=zero3|fsdp|tp_fsdp), raise strategy.tp, turn on "
            "strategy.activation_checkpointing=full, or lower trainer.micro_batch_size "
            "(plan.search=true ranks the layouts that fit)"
        )
    return "\n".join(lines)


def render_comm(p: Plan) -> list[str]:
    """The communication table: what one rank sends per step, over which link, how long."""
    if not p.collectives or p.net is None:
        return ["  communication none (one rank, or nothing to reduce)"]
    rows: dict[str, list] = {}
    for c in p.collectives:
        link = f"{c.n:>5} {'NVLink' if c.intra else 'network'}"
        row = rows.setdefault(c.name, [link, 0.0, 0.0])
        row[1] += c.bytes
        row[2] += c.seconds(p.net)
    bw = f"{p.net.intra_node_gbps:g} / {p.net.inter_node_gbps:g} Gb/s per GPU in / across nodes of {p.net.gpus_per_node}"
    lines = [
        f"  communication per step and rank ({bw})",
        "    collective             group       GB/step   seconds",
    ]
    for name, (link, b, sec) in rows.items():
        lines.append(f"    {name:22s} {link:13s} {b / 1e9:9.3f} {sec:9.3f}")
    return lines


def render_dry_run(d: dict, p: Plan) -> str:
    """The dry run's per-rank figures beside the analytic ones."""

    def row(name: str, real: float, planned: float) -> str:
        return f"    {name:13s} {real / GIB:9.2f}  plan {planned / GIB:.2f} ({real / planned - 1:+.2%})"

    where = "rank 0, the most loaded"
    if "pp_rank" in d:
        stages = ", ".join(f"{b / GIB:.2f}" for b in d["weight_bytes_per_pp_rank"])
        where = f"pipeline rank {d['pp_rank']}, the most loaded; weights by pipeline rank {stages} GiB"
    lines = [
        f"  dry run (meta build over a fake process group of {p.world_size} ranks; {where}): "
        f"{_count(d['params_per_rank'])} parameters per rank (GiB)",
        row("weights", d["weight_bytes_per_rank"], p.params_bytes),
        row("gradients", d["grad_bytes_per_rank"], p.grads_bytes),
        row("optimizer", d["optimizer_bytes_per_rank"], p.optimizer_bytes),
    ]
    counted = d.get("comm_bytes")
    if counted is not None:
        planned = p.comm_bytes
        lines.append("  dry run: one step on fake tensors, bytes rank 0 sends (GB)")
        for key in sorted(set(counted) | set(planned)):
            real, plan_b = counted.get(key, 0.0), planned.get(key, 0.0)
            diff = f"({plan_b / real - 1:+.2%})" if real else "(not counted: at the optimizer step)"
            lines.append(f"    {key:22s} {real / 1e9:9.3f}  plan {plan_b / 1e9:.3f} {diff}")
    return "\n".join(lines)


def render_search(plans: list[Plan], cfg: Config, world_size: int) -> str:
    net = cluster(cfg)
    t = cfg.trainer
    lines = [
        f"search: {cfg.model.name} on {world_size} x {cfg.plan.gpu} (nodes of {net.gpus_per_node}, "
        f"{net.intra_node_gbps:g} / {net.inter_node_gbps:g} Gb/s per GPU in / across nodes), "
        f"{t.global_batch_size} sequences x {t.seq_len} tokens per step, {cfg.plan.mfu:.0%} MFU "
        "assumed; the layouts that fit, fastest first",
        "   #   tp  pp   dp  cp  ep  strategy              schedule          mbs  checkpointing  "
        "step s  comm s  bubble  memory GiB  MFU",
    ]
    for i, p in enumerate(plans, 1):
        lines.append(
            f"  {i:2d} {p.tp:4d} {p.pp:3d} {p.dp:4d} {p.cp:3d} {p.ep:3d}  {p.label:20s}  "
            f"{p.schedule or '-':16s} {p.micro_batch_size:4d}  {p.activation_checkpointing:13s} "
            f"{p.step_time_s:7.3g} {p.comm_s:7.3g} {p.bubble:7.1%} {p.memory_bytes / GIB:11.1f} "
            f"{p.mfu_estimated:4.0%}"
        )
    if plans:
        lines.append(f"  launch #1 with: {' '.join(plans[0].overrides)}")
    return "\n".join(lines)


def dry_run(cfg: Config, world_size: int) -> dict:
    """Per-rank model state of the most loaded rank, from the sharded (meta) tensors the real
    build path produces over a fake process group of `world_size` ranks.

    This process is rank 0 of the fake group. DTensor and FSDP2 split a dimension as
    torch.chunk does (the first ranks get the rounded-up chunks), so rank 0 holds the largest
    shard on every mesh dimension: its figures are the most loaded rank's. Under a pipeline
    (strategy.pp > 1) rank 0 holds the first stage only: the build runs as the first rank of
    every pipeline stage in turn (ranks p x world / pp; pp is the outermost mesh axis) and
    reports the most loaded one, beside every pipeline rank's weight bytes."""
    if tdist.is_initialized():
        raise ConfigError("plan.dry_run needs a process without a process group (run framework.plan)")
    if cfg.precision.name in ("auto", "fp8"):
        # the plan targets GPUs (auto = bf16); fp8's casts are transient, its weights bf16/fp32
        cfg = replace(cfg, precision=replace(cfg.precision, name="bf16"))
    pp = max(cfg.strategy.pp, 1)
    held = []  # per pipeline rank: this rank's local parameter tensors
    for rank in range(0, world_size, world_size // pp):
        tdist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
        try:
            engine = build_engine(None, cfg, Dist(rank=rank, world_size=world_size), dry_run=True)
            parts = getattr(engine, "parts", [engine.plain_model()])  # a pipeline rank's stages
            held.append(
                [p.to_local() if isinstance(p, DTensor) else p for m in parts for p in m.parameters()]
            )
            del engine
        finally:
            tdist.destroy_process_group()
    sizes = [sum(t.numel() * t.element_size() for t in local) for local in held]
    most = max(range(pp), key=sizes.__getitem__)
    local, weight_bytes = held[most], sizes[most]
    out = {
        "params_per_rank": sum(t.numel() for t in local),
        "weight_bytes_per_rank": weight_bytes,
        # torch strategies: gradients take the parameters' dtype and sharding, and AdamW's
        # exp_avg / exp_avg_sq are zeros_like(param) (the fp32 weights are the master)
        "grad_bytes_per_rank": weight_bytes,
        "optimizer_bytes_per_rank": 2 * weight_bytes,
        "device": str(local[0].device) if local else "meta",
    }
    if pp > 1:
        out |= {"pp_rank": most, "weight_bytes_per_pp_rank": sizes}
    return out


# Where each collective a dry run issues goes in the plan's comm_bytes: op -> (key, kind, index
# of the argument holding the buffer). c10d ops are FSDP's and DDP's (the process-group API),
# functional collectives DTensor's (tensor parallel). Extension point: the pipeline dry run
# adds send/recv (pp_send_recv), the expert and context-parallel ones their all-to-alls
# (ep_all_to_all, cp_all_to_all, told apart by group size or by op); an op not listed here
# stops the count naming it rather than leave bytes out.
COUNTED_OPS = {
    "c10d._allgather_base_": ("fsdp_all_gather", "all_gather", 0),  # (output, input, group, ...)
    "c10d._reduce_scatter_base_": ("fsdp_reduce_scatter", "reduce_scatter", 1),  # (out, input, ..)
    "c10d.allreduce_": ("ddp_all_reduce", "all_reduce", 0),  # ([tensors], group, op, ...)
    "_c10d_functional.all_gather_into_tensor": ("tp_all_gather", "all_gather", 0),  # (input, n, g)
    "_c10d_functional.reduce_scatter_tensor": ("tp_reduce_scatter", "reduce_scatter", 0),
    "_c10d_functional.all_reduce": ("tp_all_reduce", "all_reduce", 0),  # (input, op, group)
}
NOT_COMMUNICATION = ("_c10d_functional.wait_tensor",)


def count_comm(cfg: Config, world_size: int) -> dict[str, float]:
    """Bytes rank 0 sends per optimizer step, by collective, counted on the real build path: the
    engine built as in `dry_run` over torch's fake process group, its weights made fake tensors
    (shapes without memory: FakeTensorMode), then the engine's own forward_backward over fake
    micro-batches while a dispatch mode records every collective with its buffer and group.
    FSDP2's and DDP's collectives go to the process group directly (c10d ops), DTensor's
    (tensor parallel) are functional collectives: torch's CommDebugMode counts calls, not
    bytes, hence the mode here. Bytes follow framework.comm's ring factors, so a test holds
    the plan's comm_bytes to these counts. Each micro-batch but the last is the same (gradient
    sync off), so two are run and the first counted accum - 1 times.

    DDP: its reducer cannot use the fake group (the group's futures carry no tensors), so a
    comm hook all-reduces each gradient bucket itself, the same buffers DDP would reduce. Not
    counted: the optimizer step (pure tp reduces the norm weights' partial gradients there:
    plan key tp_norm_grads), DeepSpeed's engines (no fake group)."""
    if tdist.is_initialized():
        raise ConfigError("plan.dry_run needs a process without a process group (run framework.plan)")
    if cfg.precision.name in ("auto", "fp8"):
        cfg = replace(cfg, precision=replace(cfg.precision, name="bf16"))
    t = cfg.trainer
    accum = grad_accum_steps(cfg, layout(cfg.strategy, world_size).dp)
    tdist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        engine = build_engine(None, cfg, Dist(rank=0, world_size=world_size), dry_run=True)
        with FakeTensorMode(allow_non_fake_inputs=True):
            allocate(engine.plain_model(), torch.device("cpu"))  # fake tensors: no memory
            if cfg.strategy.name == "ddp":
                engine.model = apply_ddp(engine.plain_model(), torch.device("cpu"), init_sync=False)
                engine.model.register_comm_hook(None, _all_reduce_bucket)
                engine.grad_sync = ddp_grad_sync(engine.model)
            ids = torch.zeros(t.micro_batch_size, t.seq_len, dtype=torch.long)
            runs = []
            for _ in range(min(accum, 2)):
                with _CommCounter(cfg.strategy.name) as counter:
                    engine.forward_backward(Batch(ids, ids), min(accum, 2))
                runs.append(counter.bytes)
    finally:
        tdist.destroy_process_group()
    total: dict[str, float] = {}
    for i, run in enumerate(runs):
        times = accum - 1 if i == 0 and len(runs) == 2 else 1
        for key, b in run.items():
            total[key] = total.get(key, 0.0) + times * b
    return total


def _all_reduce_bucket(state, bucket):
    """DDP comm hook for the fake group: the bucket's all-reduce, its result already there."""
    buffer = bucket.buffer()
    tdist.all_reduce(buffer)
    done = torch.futures.Future()
    done.set_result(buffer)
    return done


class _CommCounter(TorchDispatchMode):
    """Records the bytes each collective sends from this rank (framework.comm.ring_factor)."""

    def __init__(self, strategy: str):
        super().__init__()
        self.strategy = strategy
        self.bytes: dict[str, float] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = str(func.overloadpacket)
        if ("c10d" in op) and op not in NOT_COMMUNICATION:
            if op not in COUNTED_OPS:
                raise ConfigError(f"plan.dry_run: collective {op} has no comm_bytes key in COUNTED_OPS")
            key, kind, index = COUNTED_OPS[op]
            buffer = args[index]
            tensors = buffer if isinstance(buffer, (list, tuple)) else [buffer]
            nbytes = sum(x.numel() * x.element_size() for x in tensors)
            n = _group_size(args)
            if op == "_c10d_functional.all_gather_into_tensor":
                nbytes *= n  # its argument is this rank's part; the ring moves the whole
            if key == "tp_all_reduce" and tensors[0].dim() == 1:
                key = "tp_norm_grads"  # a norm weight's gradient, not an activation
            if key == "ddp_all_reduce" and self.strategy != "ddp":
                key = "hsdp_all_reduce"  # FSDP's only all-reduce: across HSDP replicas
            self.bytes[key] = self.bytes.get(key, 0.0) + nbytes * comm.ring_factor(kind, n)
        return func(*args, **(kwargs or {}))


def _group_size(args) -> int:
    """Ranks of the collective's group: a ProcessGroup argument (c10d ops), a group size
    (functional all-gather / reduce-scatter), or a group name (functional all-reduce)."""
    for a in args:
        if isinstance(a, torch.ScriptObject) and "ProcessGroup" in str(a._type()):
            return torch._C._distributed_c10d.ProcessGroup.unbox(a).size()
    for a in args[1:]:
        if isinstance(a, int) and not isinstance(a, bool):
            return a
    return _resolve_process_group(args[-1]).size()


@entry("config", Config)
def main(dcfg: DictConfig) -> None:
    """Console script `fw-plan`."""
    cfg = load(dcfg)
    world_size = resolve_world_size(cfg.plan.world_size)
    if cfg.plan.search:
        resolve(cfg)
        plans = search(cfg, world_size)
        print(render_search(plans, cfg, world_size))
        summary = plans[0].summary()
        summary["search"] = [search_row(p) for p in plans]
        print(json.dumps(summary))
        return
    plan = make_plan(cfg, world_size)
    summary = plan.summary()
    text = render(plan, cfg)
    if cfg.plan.dry_run:
        summary["dry_run"] = dry_run(cfg, plan.world_size)
        # counted where the dry run can run a step on fake tensors: the pipeline's schedule and
        # the experts' data-dependent all-to-all splits need real values
        if cfg.strategy.pp == 1 and cfg.strategy.ep == 1:
            summary["dry_run"]["comm_bytes"] = {
                k: round(v) for k, v in count_comm(cfg, plan.world_size).items()
            }
        text += "\n" + render_dry_run(summary["dry_run"], plan)
    print(text)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

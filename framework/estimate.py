"""The analytic plan of one layout and the search over layouts: per-rank memory (the most
loaded pipeline rank), each collective over the link it crosses, and the step time, from the
config alone (no process group, no tensors). framework.plan is the command around it
(validation, rendering, the dry run); the math is in framework.memory, framework.comm and
framework.stages.

Conventions: ranks are laid out row-major over framework.config.Layout (pp, dp_replicate,
dp_shard, cp, tp; tp innermost); a "pipeline rank" is one position along pp, all of whose tp x
dp x cp ranks hold the same blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from framework import comm, memory, stages
from framework.config import Config, ConfigError, Layout, grad_accum_steps, layout, validate
from framework.model.gpt import ModelConfig, num_params
from framework.perf import flops_per_token, peak_flops

GIB = memory.GIB

DDP_BUCKET_BYTES = 25 * 2**20
"""DDP's default bucket (bucket_cap_mb=25): the last one is reduced after backward ends."""


def cluster(cfg: Config) -> comm.Cluster:
    """plan.gpus_per_node and the link bandwidths (plan.*_gbps, else plan.gpu's)."""
    gpu, pl = memory.GPUS[cfg.plan.gpu], cfg.plan
    return comm.Cluster(
        pl.gpus_per_node,
        pl.intra_node_gbps or gpu.intra_node_gbps,
        pl.inter_node_gbps or gpu.inter_node_gbps,
    )


def groups(lay: Layout, gpus_per_node: int) -> dict[str, tuple[int, bool]]:
    """(size, inside one node) of each group a rank talks to, from the row-major layout (pp,
    dp_replicate, dp_shard, cp, tp; tp innermost). FSDP shards over dp_shard x cp (context
    parallel ranks hold the same parameters, so they share its shards, as torchtitan does);
    DDP and ZeRO reduce over all dp x cp ranks; expert-parallel groups are the innermost ep of
    the dp_shard ranks (issue 16: carved out of the data-parallel ranks)."""
    tp, cp = lay.tp, lay.cp
    shard = lay.dp_shard * cp
    spans = {
        "tp": (tp, 1),
        "cp": (cp, tp),
        "ep": (lay.ep, tp * cp),
        "fsdp": (shard, tp),
        "replicate": (lay.dp_replicate, tp * shard),
        "dp": (lay.dp * cp, tp),
        "pp": (lay.pp, tp * shard * lay.dp_replicate),
    }
    return {
        k: (n, comm.group_is_intra_node(stride, n, gpus_per_node)) for k, (n, stride) in spans.items()
    }


@dataclass(frozen=True)
class Moe:
    """The numbers of a mixture-of-experts model the plan needs (issue 16)."""

    num_experts: int
    top_k: int
    expert_hidden: int
    sparse_layers: int
    expert_params: float
    """Routed experts' weights of all sparse layers (split over ep)."""


def moe_of(m: ModelConfig) -> Moe | None:
    """Adapter to model.moe (num_experts, top_k, expert_hidden, every), which the MoE model adds
    (issue 16); None for a dense model or before it exists. The lead wires it at merge: it
    assumes num_params and flops_per_token count the experts (total and active)."""
    moe = getattr(m, "moe", None)
    if moe is None or not getattr(moe, "num_experts", 0):
        return None
    sparse = m.n_layer // max(getattr(moe, "every", 1) or 1, 1)
    per_expert = (3 if m.style == "llama" else 2) * m.n_embd * moe.expert_hidden
    return Moe(
        moe.num_experts, moe.top_k, moe.expert_hidden, sparse, moe.num_experts * per_expert * sparse
    )


@dataclass(frozen=True)
class PipelineRank:
    """What one pipeline rank holds: its blocks, the root parts, its cost in blocks."""

    rank: int
    blocks: int
    first: bool
    last: bool
    cost: float
    stages: tuple[int, ...]


def pipeline_ranks(cfg: Config) -> tuple[list[int], list[PipelineRank], float]:
    """(blocks per stage, each pipeline rank, the model's cost in blocks) for strategy.pp,
    pp_schedule, pp_stages_per_rank and pp_layers (framework.stages); one rank when pp=1."""
    m, s = cfg.model, cfg.strategy
    embed, head = stages.block_costs(m, cfg.trainer.seq_len)
    if s.pp <= 1:
        return (
            [m.n_layer],
            [PipelineRank(0, m.n_layer, True, True, m.n_layer + embed + head, (0,))],
            m.n_layer + embed + head,
        )
    v = stages.stages_per_rank(s.pp_schedule, s.pp_stages_per_rank)
    try:
        counts = stages.split(m, cfg.trainer.seq_len, s.pp * v, s.pp_layers)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    costs = stages.stage_cost(counts, head, embed)
    owner = stages.stage_ranks(s.pp, s.pp_schedule, s.pp_stages_per_rank)
    held: list[list[int]] = [[] for _ in range(s.pp)]
    for stage, rank in enumerate(owner):
        held[rank].append(stage)
    last = len(counts) - 1
    ranks = [
        PipelineRank(r, sum(counts[i] for i in mine), 0 in mine, last in mine,
                     sum(costs[i] for i in mine), tuple(mine))
        for r, mine in enumerate(held)
    ]  # fmt: skip
    return counts, ranks, sum(costs)


def representatives(ranks: list[PipelineRank]) -> list[PipelineRank]:
    """One rank of each kind (blocks, root parts, stages): the lowest, which holds the most
    micro-batches in flight and runs the longest warm-up, so the others never exceed it."""
    seen, out = set(), []
    for r in ranks:
        key = (r.blocks, r.first, r.last, len(r.stages), 0 in r.stages)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


@dataclass
class Plan:
    model: str
    gpu: str
    world_size: int
    strategy: str
    dp: int
    tp: int
    precision: str
    activation_checkpointing: str
    micro_batch_size: int
    grad_accum: int
    params: int
    """Whole model."""
    params_per_gpu: float
    """Parameters stored on the most loaded GPU (after pp, tp and dp sharding)."""
    flops_per_token: float
    tokens_per_step: int
    peak_flops: float
    mfu: float
    step_time_s: float
    params_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    weight_copies_bytes: float
    """16-bit weights held during a step: gathered ZeRO-3/FSDP blocks, or autocast's casts."""
    activations_bytes: float
    """Under strategy.activation_checkpointing."""
    activations_by_mode_bytes: dict[str, float]
    """Under each mode (none | selective | full), to show the trade-off."""
    gpu_memory_gib: float
    pp: int = 1
    cp: int = 1
    ep: int = 1
    schedule: str | None = None
    """strategy.pp_schedule when pp > 1."""
    stage_layers: list[int] = field(default_factory=list)
    unsharded_grads_bytes: float = 0.0
    """FSDP's whole fp32 gradients between micro-batches (memory.unsharded_grads_bytes)."""
    ep_buffers_bytes: float = 0.0
    """Expert parallel: one sparse layer's all-to-all send and receive buffers in flight."""
    compute_s: float = 0.0
    comm_s: float = 0.0
    """Communication the step waits for (not hidden behind compute)."""
    bubble_s: float = 0.0
    bubble: float = 0.0
    """Share of the step the pipeline idles."""
    collectives: list[comm.Collective] = field(default_factory=list)
    """Of the pipeline rank that sets the pace."""
    net: comm.Cluster | None = None
    cp_method: str = "ulysses"
    reshard_after_forward: bool = True
    hsdp_replicas: int = 1
    overrides: list[str] = field(default_factory=list)
    """The strategy / trainer keys that select this layout (search results)."""

    @property
    def label(self) -> str:
        """The strategy with its data-parallel variant: fsdp-keep (no reshard after forward),
        fsdp-hsdp8 (8 replicas of shard groups), and the context-parallel method."""
        out = self.strategy
        if self.strategy in ("fsdp", "tp_fsdp") and not self.reshard_after_forward:
            out += "-keep"
        if self.hsdp_replicas > 1:
            out += f"-hsdp{self.hsdp_replicas}"
        if self.cp > 1:
            out += f" {self.cp_method}"
        return out

    @property
    def memory_bytes(self) -> float:
        return (
            self.params_bytes
            + self.grads_bytes
            + self.optimizer_bytes
            + self.weight_copies_bytes
            + self.unsharded_grads_bytes
            + self.activations_bytes
            + self.ep_buffers_bytes
        )

    @property
    def limit_gib(self) -> float:
        return memory.FIT_FRACTION * self.gpu_memory_gib

    @property
    def fits(self) -> bool:
        return self.memory_bytes / GIB <= self.limit_gib

    @property
    def comm_bytes(self) -> dict[str, float]:
        """Bytes the pacing rank sends per step, by collective."""
        out: dict[str, float] = {}
        for c in self.collectives:
            out[c.name] = out.get(c.name, 0.0) + c.bytes
        return out

    def summary(self) -> dict:
        """The JSON line: per-GPU sizes in GiB."""

        def gib(x: float) -> float:
            return round(x / GIB, 4)

        return {
            "model": self.model,
            "gpu": self.gpu,
            "world_size": self.world_size,
            "strategy": self.strategy,
            "dp": self.dp,
            "tp": self.tp,
            "pp": self.pp,
            "cp": self.cp,
            "cp_method": self.cp_method if self.cp > 1 else None,
            "ep": self.ep,
            "schedule": self.schedule,
            "stage_layers": self.stage_layers,
            "precision": self.precision,
            "activation_checkpointing": self.activation_checkpointing,
            "micro_batch_size": self.micro_batch_size,
            "grad_accum": self.grad_accum,
            "params": self.params,
            "params_per_gpu": round(self.params_per_gpu),
            "flops_per_token": self.flops_per_token,
            "tokens_per_step": self.tokens_per_step,
            "step_time_s": round(self.step_time_s, 4),
            "compute_s": round(self.compute_s, 4),
            "comm_s": round(self.comm_s, 4),
            "bubble_s": round(self.bubble_s, 4),
            "bubble": round(self.bubble, 4),
            "tokens_per_s": round(self.tokens_per_step / self.step_time_s),
            "mfu": self.mfu,
            "mfu_estimated": round(self.mfu_estimated, 4),
            "comm_bytes": {k: round(v) for k, v in self.comm_bytes.items()},
            "params_gib": gib(self.params_bytes),
            "grads_gib": gib(self.grads_bytes),
            "optimizer_gib": gib(self.optimizer_bytes),
            "weight_copies_gib": gib(self.weight_copies_bytes),
            "unsharded_grads_gib": gib(self.unsharded_grads_bytes),
            "ep_buffers_gib": gib(self.ep_buffers_bytes),
            "activations_gib": gib(self.activations_bytes),
            "activations_by_mode_gib": {k: gib(v) for k, v in self.activations_by_mode_bytes.items()},
            "memory_gib": gib(self.memory_bytes),
            "gpu_memory_gib": self.gpu_memory_gib,
            "fits": self.fits,
        }

    @property
    def mfu_estimated(self) -> float:
        """Model FLOPs over the estimated step (what training would log as mfu)."""
        return (
            self.flops_per_token
            * self.tokens_per_step
            / (self.step_time_s * self.world_size * self.peak_flops)
        )


def estimate(cfg: Config, world_size: int) -> Plan:
    """The plan of a config already checked (validate, or the search's own constraints): the
    most loaded rank's memory, each collective over its link, and the step time."""
    m, s, t = cfg.model, cfg.strategy, cfg.trainer
    gpu = memory.GPUS[cfg.plan.gpu]
    net = cluster(cfg)
    # The plan targets GPUs, where precision=auto means bf16.
    precision = "bf16" if cfg.precision.name == "auto" else cfg.precision.name
    kind = dp_kind(s.name)
    lay = layout(s, world_size)
    dp, micro = lay.dp, grad_accum_steps(cfg, lay.dp)
    g = groups(lay, net.gpus_per_node)
    sb = memory.state_bytes(precision, kind)
    shards = memory.dp_shards(kind, dp * lay.cp, s.hsdp_replicas)
    stream = memory.stream_bytes(precision, kind)
    moe = moe_of(m)
    fpt = flops_per_token(m, t.seq_len)
    tokens_per_step = t.global_batch_size * t.seq_len
    peak = t.peak_flops or peak_flops(gpu.device_name)  # trainer.peak_flops overrides, as in training
    if peak is None:  # every GPUS entry has a peak; a test keeps the two tables in step
        raise ConfigError(f"plan.gpu={cfg.plan.gpu}: no peak FLOP/s known for {gpu.device_name!r}")
    counts, pranks, total_cost = pipeline_ranks(cfg)
    ratio = stages.bubble_ratio(s.pp, micro, s.pp_schedule, s.pp_stages_per_rank)
    seq = t.seq_len / lay.cp  # this rank's slice of each sequence
    # one micro-batch, forward + backward through the whole model on one tp x cp group
    mb_s = fpt * t.micro_batch_size * t.seq_len / (lay.tp * lay.cp * peak * cfg.plan.mfu)
    _, head_cost = stages.block_costs(m, t.seq_len)
    block_flops = 6 * num_params(m, non_embedding=True) / m.n_layer + 12 * m.n_embd * t.seq_len
    attention_share = 12 * m.n_embd * t.seq_len / block_flops

    rows, times = [], []
    for r in representatives(pranks):
        n_local = memory.stage_params_per_tp_rank(
            m, lay.tp, s.sequence_parallel, blocks=r.blocks, first=r.first, last=r.last
        )
        # routed experts of the rank's blocks: split over ep, then sharded over the ranks that
        # hold the same experts (memory.params_per_rank)
        experts = memory.routed_expert_params(m) * r.blocks / m.n_layer / lay.tp if moe else 0.0
        state = memory.model_state_bytes(n_local, sb, shards, experts, lay.ep)
        if s.zero_offload:  # DeepSpeed keeps the fp32 master and AdamW state in host memory
            state["optimizer"] = 0.0
        held = stages.in_flight(s.pp, micro, s.pp_schedule, s.pp_stages_per_rank, r.rank)
        act_args = (s.tp, s.sequence_parallel, sb.compute, stream)
        by_mode = {
            mode: memory.activation_bytes(
                m, seq, t.micro_batch_size, mode, *act_args, blocks=r.blocks, last=r.last, in_flight=held
            )
            for mode in memory.AC_MODES
        }
        copies = memory.weight_copies_bytes(
            m, lay.tp, kind, precision, s.reshard_after_forward, sequence_parallel=s.sequence_parallel,
            blocks=r.blocks, first=r.first, last=r.last, pp=s.pp, ep=lay.ep,
        )  # fmt: skip
        # what this rank gathers and reduces: the dense weights and its 1/ep of the experts
        mine = n_local - experts * (1 - 1 / lay.ep)
        unsharded = memory.unsharded_grads_bytes(mine, kind, micro, s.pp)
        rows.append((n_local, experts, state, copies, unsharded, by_mode))
        work = mb_s * r.cost / total_cost
        recompute = mb_s / 3 * r.blocks / total_cost if s.activation_checkpointing == "full" else 0.0
        colls, first_gather, tail = collectives(cfg, lay, g, r, mine, micro, precision, stream, moe)
        block_share = r.blocks / r.cost if r.cost else 0.0
        times.append(
            comm.RankTimes(work / 3, 2 * work / 3, recompute, attention_share * block_share, colls,
                      first_gather.seconds(net) if first_gather else 0.0, tail)
        )  # fmt: skip
    st = comm.step_time(times, micro, ratio, net)

    def held_bytes(row) -> float:
        _, _, state, copies, unsharded, by_mode = row
        return sum(state.values()) + copies + unsharded + by_mode[s.activation_checkpointing]

    n_local, experts, state, copies, unsharded, by_mode = max(rows, key=held_bytes)  # most loaded
    buffers = memory.ep_buffer_bytes(m, seq, t.micro_batch_size, sb.compute) if lay.ep > 1 else 0.0
    return Plan(
        model=m.name,
        gpu=cfg.plan.gpu,
        world_size=world_size,
        strategy=s.name,
        dp=dp,
        tp=lay.tp,
        precision=precision,
        activation_checkpointing=s.activation_checkpointing,
        micro_batch_size=t.micro_batch_size,
        grad_accum=micro,
        params=num_params(m),
        params_per_gpu=memory.params_per_rank(n_local, shards.params, experts, lay.ep),
        flops_per_token=fpt,
        tokens_per_step=tokens_per_step,
        peak_flops=peak,
        mfu=cfg.plan.mfu,
        step_time_s=st.step_s,
        params_bytes=state["params"],
        grads_bytes=state["grads"],
        optimizer_bytes=state["optimizer"],
        weight_copies_bytes=copies,
        activations_bytes=by_mode[s.activation_checkpointing],
        activations_by_mode_bytes=by_mode,
        gpu_memory_gib=gpu.memory_gib,
        pp=lay.pp,
        cp=lay.cp,
        ep=lay.ep,
        schedule=s.pp_schedule if lay.pp > 1 else None,
        stage_layers=counts if lay.pp > 1 else [],
        unsharded_grads_bytes=unsharded,
        ep_buffers_bytes=buffers,
        cp_method=s.cp_method,
        reshard_after_forward=s.reshard_after_forward,
        hsdp_replicas=lay.dp_replicate if kind == "fsdp" else 1,
        compute_s=st.compute_s,
        comm_s=st.comm_s,
        bubble_s=st.bubble_s,
        bubble=st.bubble,
        collectives=times[st.pacing_rank].collectives,
        net=net,
    )


def collectives(
    cfg: Config,
    lay: Layout,
    g: dict[str, tuple[int, bool]],
    r: PipelineRank,
    n_local: float,
    micro: int,
    precision: str,
    stream: int,
    moe: Moe | None,
) -> tuple[list[comm.Collective], comm.Collective | None, float]:
    """The collectives of one optimizer step on pipeline rank `r` (framework.comm counts each
    technique), the gather nothing overlaps, and the share of the gradient reduction left
    after backward."""
    m, s, t = cfg.model, cfg.strategy, cfg.trainer
    kind = dp_kind(s.name)
    a = 4 if precision == "fp32" else 2
    sb = memory.state_bytes(precision, kind)
    tokens = int(t.micro_batch_size * t.seq_len / lay.cp)
    recompute = s.activation_checkpointing != "none"
    out: list[comm.Collective] = []
    first: comm.Collective | None = None
    tail = 0.0
    # a block as this rank gathers it: under expert parallelism 1/ep of its experts
    block = memory.block_params_per_tp_rank(m, lay.tp) - memory.expert_copies_saved(m, lay.ep, lay.tp)
    root = n_local - r.blocks * block
    units = r.blocks + 1
    if kind in ("ddp",) and g["dp"][0] > 1:
        out += comm.ddp(n_local, *g["dp"], grad_bytes=sb.grad)
        tail = min(1.0, DDP_BUCKET_BYTES / (n_local * sb.grad))
    elif kind in ("zero1", "zero2", "zero3") and g["dp"][0] > 1:
        out += comm.zero(int(kind[-1]), n_local, *g["dp"], micro_batches=micro, bytes_16=sb.param)
        tail = 1 / units
        if kind == "zero3":
            first = comm.Collective(
                "first", "all_gather", g["dp"][0], block * sb.param, micro, g["dp"][1], "none"
            )
    elif kind in ("fsdp", "tp_fsdp") and g["fsdp"][0] * g["replicate"][0] > 1:
        if s.pp > 1:  # torch's pipelining keeps a stage unsharded from its first backward on
            warm = math.ceil(stages.in_flight(s.pp, micro, s.pp_schedule, s.pp_stages_per_rank, r.rank))
            fwd = root + r.blocks * block * (warm if s.reshard_after_forward else 1)
            bwd = r.blocks * block * micro if s.reshard_after_forward else 0.0
            calls = 1
        else:
            fwd = micro * n_local
            bwd = micro * r.blocks * block if s.reshard_after_forward else 0.0
            calls = micro
        out += comm.fsdp(fwd, bwd, n_local, *g["fsdp"], param_bytes=a, replicas=g["replicate"][0],
                         replicas_intra=g["replicate"][1])  # fmt: skip
        first = comm.Collective(
            "first", "all_gather", g["fsdp"][0], (root + block) * a, calls, g["fsdp"][1], "none"
        )
        tail = 1 / units
    if lay.tp > 1:
        norms = (
            m.n_embd * (2 * r.blocks + (1 if r.last else 0)) * (2 if m.style == "gpt2" and m.bias else 1)
        )
        shape = comm.TpShape(
            tokens=tokens,
            n_embd=m.n_embd,
            vocab=math.ceil((m.num_labels or m.vocab_size) / lay.tp) * lay.tp,
            colwise_inputs=3 + (2 if m.style == "llama" else 1),
            stream_bytes=stream,
            compute_bytes=a,
            norm_params=norms,
            position_table=int(t.seq_len / lay.cp) * m.n_embd if m.style == "gpt2" else 0,
        )
        out += comm.tp(shape, *g["tp"], layers=r.blocks, micro_batches=micro,
                       sequence_parallel=s.sequence_parallel, recompute=recompute,
                       first_stage=r.first, last_stage=r.last)  # fmt: skip
    if lay.pp > 1:
        n_stages = lay.pp * stages.stages_per_rank(s.pp_schedule, s.pp_stages_per_rank)
        sends = sum((i != n_stages - 1) + (i != 0) for i in r.stages)
        act = tokens * m.n_embd * stream / (lay.tp if s.sequence_parallel else 1)
        out += comm.pipeline_p2p(act, g["pp"][1], micro_batches=micro, sends_per_micro_batch=sends)
    if lay.cp > 1:
        out += comm.context_parallel(
            s.cp_method, tokens, m.n_embd // lay.tp, m.kv_heads * m.head_dim // lay.tp, lay.cp,
            r.blocks, g["cp"][1], micro_batches=micro, compute_bytes=a, recompute=recompute,
        )  # fmt: skip
    if moe is not None and lay.ep > 1:
        sparse = round(moe.sparse_layers * r.blocks / m.n_layer)
        out += comm.expert_all_to_all(tokens, moe.top_k, m.n_embd, lay.ep, sparse, g["ep"][1],
                                      micro_batches=micro, compute_bytes=a, recompute=recompute)  # fmt: skip
    return out, first, tail


def dp_kind(strategy: str) -> str:
    """The memory model's strategy: the pipeline alone replicates like DDP."""
    return "ddp" if strategy == "pp" else strategy


# -- search -------------------------------------------------------------------------------------

SEARCH_TOP = 10
SPLIT_BACKWARD = ("zero_bubble", "dualpipev")
"""Schedules that split each backward into input and weight gradients (framework/parallel/pp.py)."""
LONG_CONTEXT = 8192
"""trainer.seq_len from which the search also splits sequences over context-parallel ranks."""
MAX_MICRO_BATCH = 32
AC_ORDER = {"none": 0, "selective": 1, "full": 2}


def _divisors(n: int, limit: int | None = None) -> list[int]:
    return [d for d in range(1, (limit or n) + 1) if n % d == 0]


def _dp_flavours(tp: int, pp: int, cp: int, dp: int, gpus_per_node: int) -> list[dict]:
    """The data-parallel choices (strategy keys) for one tp x pp x cp x dp shape: DDP, ZeRO-1/2/3
    (only alone: DeepSpeed does not compose with the other axes here), FSDP resharding or
    keeping weights after forward, HSDP sharding inside a node; tp_fsdp / tp over tensor
    parallel (no DDP x TP strategy exists). Under pp only keep-after-forward FSDP: torch's
    pipelining keeps a stage's weights gathered from its first backward anyway, so resharding
    after forward would only add gathers."""
    ranks = dp * cp
    if tp > 1:
        if ranks == 1:
            return [{"name": "tp"}]
        keep = [False] if pp > 1 else [True, False]
        return [{"name": "tp_fsdp", "reshard_after_forward": r} for r in keep]
    if ranks == 1:
        return [{"name": "pp"}] if pp > 1 else [{"name": "single"}]
    out = [{"name": "ddp"}]
    if pp == 1 and cp == 1:
        out += [{"name": z} for z in ("zero1", "zero2", "zero3")]
    out += [{"name": "fsdp", "reshard_after_forward": r} for r in ([False] if pp > 1 else [True, False])]
    if cp == 1 and dp > gpus_per_node and dp % gpus_per_node == 0:
        out.append(
            {"name": "fsdp", "hsdp_replicas": dp // gpus_per_node, "reshard_after_forward": pp == 1}
        )
    return out


def _schedules(pp: int, n_layer: int) -> list[dict]:
    if pp == 1:
        return [{}]
    out = []
    for name in stages.SCHEDULES:
        if pp * stages.stages_per_rank(name) <= n_layer:
            out.append({"pp_schedule": name})
    return out


def _searchable(cfg: Config, world_size: int) -> None:
    """Validate what the search does not choose (model, data, precision, plan keys): the
    config as one `single` rank with the whole batch in one micro-batch. (framework.plan has
    resolved model.vocab_size=auto and the task's labels before.)"""
    t = cfg.trainer
    probe = replace(
        cfg,
        strategy=type(cfg.strategy)(),
        trainer=replace(t, micro_batch_size=t.global_batch_size),
        plan=replace(cfg.plan, world_size=1),
    )
    validate(probe, 1, device="cuda")
    if world_size < 1:
        raise ConfigError(f"plan.world_size={world_size} must be >= 1")


def search(cfg: Config, world_size: int, top: int = SEARCH_TOP) -> list[Plan]:
    """The `top` layouts of cfg.model on `world_size` GPUs of plan.gpu that fit, fastest first.

    Enumerated: tp (dividing the GPUs of a node, the heads, kv heads, FFN width and the
    sequence), cp (only from trainer.seq_len >= LONG_CONTEXT; ulysses where the heads divide,
    ring), pp (at most one stage per block; uneven splits balanced by stages.stage_layers), ep
    (MoE models: dividing dp and the experts), dp = world / (tp cp pp) dividing
    trainer.global_batch_size, the data-parallel flavour (_dp_flavours), the schedule (pp > 1),
    the micro-batch size (dividing the batch per dp rank, up to MAX_MICRO_BATCH, with at least
    stages.min_micro_batches micro-batches) and activation checkpointing. Pruned: a larger
    micro-batch never needs less memory (but for FSDP's accumulation buffer, gone once one
    micro-batch is the whole step), so once one does not fit, the larger ones are skipped.
    Ties (equal time) go to less checkpointing, then less memory."""
    _searchable(cfg, world_size)
    m, t = cfg.model, cfg.trainer
    gpn = cfg.plan.gpus_per_node
    moe = moe_of(m)
    gbs = t.global_batch_size
    base = replace(
        cfg.strategy, sequence_parallel=True, pp_layers=None, zero_offload=False, overlap_comm=None
    )
    found: list[Plan] = []
    for tp in _divisors(math.gcd(world_size, gpn)):
        if m.n_head % tp or m.kv_heads % tp or m.ffn_dim % tp or t.seq_len % tp:
            continue
        if tp > 1 and (m.moe.enabled or m.qk_norm):  # no tensor-parallel plan for them (validate)
            continue
        cps = [1]
        if t.seq_len >= LONG_CONTEXT:
            cps = [c for c in _divisors(world_size // tp) if t.seq_len % (c * tp) == 0]
        for cp in cps:
            methods = ["ulysses"] if cp == 1 else ["ring"]
            if cp > 1 and (m.n_head // tp) % cp == 0 and (m.kv_heads // tp) % cp == 0:
                methods.insert(0, "ulysses")
            for pp in _divisors(world_size // (tp * cp), m.n_layer):
                dp = world_size // (tp * cp * pp)
                if gbs % dp:
                    continue
                eps = [1]
                if moe is not None:
                    eps = [e for e in _divisors(dp) if moe.num_experts % e == 0]
                for ep, method, flavour, sched in (
                    (e, c, f, sc)
                    for e in eps
                    for c in methods
                    for f in _dp_flavours(tp, pp, cp, dp, gpn)
                    for sc in _schedules(pp, m.n_layer)
                ):
                    strategy = replace(
                        base, tp=tp, pp=pp, cp=cp, cp_method=method, ep=ep, **flavour, **sched
                    )
                    found += _fitting(cfg, strategy, world_size, gbs // dp)
    if not found:
        raise ConfigError(
            f"no layout of {cfg.model.name} on plan.world_size={world_size} x plan.gpu={cfg.plan.gpu} "
            f"fits with trainer.global_batch_size={gbs} at trainer.seq_len={t.seq_len}: the data-"
            "parallel degree must divide the batch; try more GPUs, a larger batch, or plan.gpu "
            "with more memory"
        )
    found.sort(key=lambda p: (p.step_time_s, AC_ORDER[p.activation_checkpointing], p.memory_bytes))
    return found[:top]


def _fitting(cfg: Config, strategy, world_size: int, per_dp: int) -> list[Plan]:
    """The plans of one layout over micro-batch sizes and checkpointing modes that fit."""
    out = []
    least = stages.min_micro_batches(strategy.pp, strategy.pp_schedule, strategy.pp_stages_per_rank)
    for mode in ("full", "selective", "none"):
        if mode == "selective" and strategy.pp > 1 and strategy.pp_schedule in SPLIT_BACKWARD:
            continue  # refused by validate: a split backward replays each block twice
        for mbs in _divisors(per_dp, MAX_MICRO_BATCH):
            if per_dp // mbs < least:
                break
            s = replace(strategy, activation_checkpointing=mode)
            cand = replace(cfg, strategy=s, trainer=replace(cfg.trainer, micro_batch_size=mbs))
            if s.ep > 1 or s.cp > 1:  # what a launch accepts of these axes' combinations
                try:  # (e.g. ep and cp are not combined with pp yet); the rest the loops respect
                    validate(cand, world_size, device="cuda", launched=True)
                except ConfigError:
                    continue
            p = estimate(cand, world_size)
            if not p.fits and p.unsharded_grads_bytes:
                continue  # a micro-batch of the whole per-rank batch drops FSDP's buffer
            if not p.fits:
                break  # larger micro-batches need more memory still
            p.overrides = _overrides(s, mbs)
            out.append(p)
    return out


def _overrides(s, micro_batch_size: int) -> list[str]:
    """The command-line keys that select this layout."""
    out = [f"strategy={s.name}"]
    if s.tp > 1:
        out.append(f"strategy.tp={s.tp}")
    if s.pp > 1:
        out += [f"strategy.pp={s.pp}", f"strategy.pp_schedule={s.pp_schedule}"]
    if s.cp > 1:
        out += [f"strategy.cp={s.cp}", f"strategy.cp_method={s.cp_method}"]
    if s.ep > 1:
        out.append(f"strategy.ep={s.ep}")
    if s.name in ("fsdp", "tp_fsdp") and not s.reshard_after_forward:
        out.append("strategy.reshard_after_forward=false")
    if s.hsdp_replicas > 1:
        out.append(f"strategy.hsdp_replicas={s.hsdp_replicas}")
    out += [
        f"trainer.micro_batch_size={micro_batch_size}",
        f"strategy.activation_checkpointing={s.activation_checkpointing}",
    ]
    return out


def search_row(p: Plan) -> dict:
    """One layout of the JSON line's "search" list."""
    return {
        "tp": p.tp,
        "pp": p.pp,
        "dp": p.dp,
        "cp": p.cp,
        "cp_method": p.cp_method if p.cp > 1 else None,
        "ep": p.ep,
        "strategy": p.strategy,
        "reshard_after_forward": p.reshard_after_forward,
        "hsdp_replicas": p.hsdp_replicas,
        "schedule": p.schedule,
        "micro_batch_size": p.micro_batch_size,
        "activation_checkpointing": p.activation_checkpointing,
        "step_time_s": round(p.step_time_s, 4),
        "memory_gib": round(p.memory_bytes / GIB, 2),
        "comm_s": round(p.comm_s, 4),
        "bubble": round(p.bubble, 4),
        "compute_s": round(p.compute_s, 4),
        "mfu_estimated": round(p.mfu_estimated, 4),
        "overrides": " ".join(p.overrides),
    }

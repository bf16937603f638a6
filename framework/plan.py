"""`python -m framework.plan`: validate a composed config for a target world size and print the
per-GPU memory, FLOPs, communication and step-time plan, without a process group and without
touching a GPU (nothing here calls into CUDA), so a 1024-GPU config is checked on a laptop in
a second or two.

    python -m framework.plan model=gpt3-175b strategy=zero3 plan.world_size=1024 plan.gpu=h100 \
        trainer.seq_len=2048 trainer.micro_batch_size=1 trainer.global_batch_size=2048 \
        strategy.activation_checkpointing=full

Same config tree as training (conf/config.yaml); plan.world_size (default: the launcher's
WORLD_SIZE, else 1), plan.gpu, plan.mfu, plan.gpus_per_node and plan.*_node_gbps pick the
target. The memory model is in framework/memory.py, the collectives in framework/comm.py, the
pipeline split and bubble in framework/stages.py; `step_time` here says what overlaps. A config
that cannot run exits 1 with a ConfigError naming the keys. The last stdout line is one JSON
object (memory_gib, flops_per_token, the breakdown, comm_bytes, step_time_s, fits).

plan.search=true ranks the layouts of the model on the world size (tp x pp x dp x cp x schedule
x micro-batch x checkpointing x data-parallel flavour) by estimated step time: `search`.

plan.dry_run=true (RELIABILITY D5) also runs the real build path: the model on `meta`, the
real parallel functions (TP, AC, compile, FSDP) over torch's fake process group of
plan.world_size ranks, this process playing rank 0, and counts the bytes of the local shards
themselves; then one optimizer step on fake tensors, counting the bytes each collective moves
(`count_comm`). The JSON line gains "dry_run". Still no GPU, no memory for weights, no real peers.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace

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
from framework.config import (
    Config,
    ConfigError,
    Layout,
    grad_accum_steps,
    layout,
    load,
    validate,
)
from framework.data.loader import Batch
from framework.data.vocab import resolve_vocab_size
from framework.model.gpt import ModelConfig, num_params
from framework.parallel import build_engine
from framework.parallel.ddp import apply_ddp, ddp_grad_sync
from framework.parallel.dist import Dist
from framework.parallel.materialize import allocate
from framework.perf import flops_per_token, peak_flops
from framework.task import resolve_task

GIB = memory.GIB

DDP_BUCKET_BYTES = 25 * 2**20
"""DDP's default bucket (bucket_cap_mb=25): the last one is reduced after backward ends."""


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
        counts = stages.stage_layers(
            m.n_layer, s.pp * v, head_cost=head, embed_cost=embed, pp_layers=s.pp_layers
        )
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


@dataclass(frozen=True)
class RankTimes:
    """One rank's compute per micro-batch (seconds) and the collectives of its step."""

    forward_s: float
    backward_s: float
    recompute_s: float
    attention_share: float
    """Share of this rank's compute in attention kernels (what ring attention hides behind)."""
    collectives: list[comm.Collective]
    first_gather_s: float = 0.0
    """FSDP / ZeRO-3: the gathers nothing overlaps (the root and first block of each forward)."""
    reduction_tail: float = 0.0
    """Share of the gradient reduction left after backward ends (DDP's last bucket, FSDP's
    last unit)."""


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    comm_s: float
    bubble_s: float
    bubble: float
    pacing_rank: int

    @property
    def step_s(self) -> float:
        return self.compute_s + self.comm_s + self.bubble_s


def step_time(
    ranks: list[RankTimes], micro_batches: int, bubble_ratio: float, net: comm.Cluster
) -> StepTime:
    """Seconds per optimizer step: compute at plan.mfu, plus the communication the strategy
    cannot hide, plus the pipeline bubble. Overlap assumptions, per rank:

    - on the critical path (overlap "none"): tensor-parallel collectives (our TP issues them
      between the matmuls that need them; no async TP), context-parallel all-to-alls and the
      expert all-to-alls: all exposed;
    - FSDP / ZeRO-3 all-gathers are prefetched one unit ahead: the forward's hide behind the
      forward compute, the backward's (and ZeRO-2/3's per-micro-batch reduce-scatters) behind
      the backward compute (and recompute); only the excess over that compute is exposed, plus
      the gathers nothing precedes (`first_gather_s`);
    - gradient reductions once per step (DDP all-reduce, FSDP reduce-scatter, HSDP all-reduce,
      ZeRO-1's reduce-scatter) run during the last micro-batch's backward, behind whatever
      compute its backward gathers leave; the excess and the last bucket / unit
      (`reduction_tail`) are exposed;
    - after the optimizer step (ZeRO-1/2's weight all-gather): exposed;
    - pipeline send/recv: exposed, once per transfer (each micro-batch boundary in each
      direction; a rank's sends wait for the neighbour);
    - ring attention's K/V exchange hides behind the attention kernels; the excess is exposed.
    Per-micro-batch terms repeat on every micro-batch and stretch with the pipeline: the slowest
    pipeline rank (compute + its exposed per-micro-batch communication) sets the pace, and the
    bubble is `bubble_ratio` (framework.stages) of that busy time. Compute-communication
    contention for memory bandwidth and SMs is left out (plan.mfu absorbs it)."""
    m = micro_batches
    paced, per_step, compute = [], [], []
    for r in ranks:
        t = {k: 0.0 for k in comm.OVERLAPS}
        for c in r.collectives:
            t[c.overlap] += c.seconds(net)
        work = r.forward_s + r.backward_s + r.recompute_s
        first = r.first_gather_s
        exposed = t["none"] + first + max(0.0, t["forward"] - first - m * r.forward_s)
        exposed += max(0.0, t["backward"] - m * (r.backward_s + r.recompute_s))
        exposed += max(0.0, t["attention"] - m * work * r.attention_share)
        window = max(0.0, r.backward_s + r.recompute_s - t["backward"] / m)
        reduction = max(0.0, t["reduction"] * (1 - r.reduction_tail) - window)
        reduction += t["reduction"] * r.reduction_tail
        paced.append(m * work + exposed)
        per_step.append(reduction + t["after_step"] + t["p2p"])
        compute.append(m * work)
    busy = max(paced)
    pace = paced.index(busy)
    bubble_s = bubble_ratio * busy
    total = busy + bubble_s + max(per_step)
    comp = max(compute)
    return StepTime(comp, total - bubble_s - comp, bubble_s, bubble_s / total if total else 0.0, pace)


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
    compute_s: float = 0.0
    comm_s: float = 0.0
    """Communication the step waits for (not hidden behind compute)."""
    bubble_s: float = 0.0
    bubble: float = 0.0
    """Share of the step the pipeline idles."""
    collectives: list[comm.Collective] = field(default_factory=list)
    """Of the pipeline rank that sets the pace."""
    net: comm.Cluster | None = None
    reshard_after_forward: bool = True
    hsdp_replicas: int = 1
    overrides: list[str] = field(default_factory=list)
    """The strategy / trainer keys that select this layout (search results)."""

    @property
    def label(self) -> str:
        """The strategy with its data-parallel variant: fsdp-keep (no reshard after forward),
        fsdp-hsdp8 (8 replicas of shard groups)."""
        out = self.strategy
        if self.strategy in ("fsdp", "tp_fsdp") and not self.reshard_after_forward:
            out += "-keep"
        if self.hsdp_replicas > 1:
            out += f"-hsdp{self.hsdp_replicas}"
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


def make_plan(cfg: Config, world_size: int) -> Plan:
    """Validate `cfg` for `world_size` GPUs (ConfigError naming the keys) and size one GPU."""
    resolve_vocab_size(cfg)  # model.vocab_size=auto: from the data's manifests or tokenizer
    resolve_task(cfg)  # task=classify: model.num_labels (the head's rows) from the manifests
    validate(cfg, world_size, device="cuda")  # the plan sizes GPUs, whatever this machine has
    return estimate(cfg, world_size)


def estimate(cfg: Config, world_size: int) -> Plan:
    """The plan of a config already checked (validate, or the search's own constraints): the
    most loaded rank's memory, each collective over its link, and the step time."""
    m, s, t = cfg.model, cfg.strategy, cfg.trainer
    gpu = memory.GPUS[cfg.plan.gpu]
    net = cluster(cfg)
    # The plan targets GPUs, where precision=auto means bf16.
    precision = "bf16" if cfg.precision.name == "auto" else cfg.precision.name
    kind = _dp_kind(s.name)
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
        if moe is not None and lay.ep > 1:  # the rank's experts: 1/ep of its blocks' experts
            n_local -= moe.expert_params * r.blocks / m.n_layer * (1 - 1 / lay.ep)
        state = memory.model_state_bytes(n_local, sb, shards)
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
            blocks=r.blocks, first=r.first, last=r.last, pp=s.pp,
        )  # fmt: skip
        unsharded = memory.unsharded_grads_bytes(n_local, kind, micro, s.pp)
        rows.append((n_local, state, copies, unsharded, by_mode))
        work = mb_s * r.cost / total_cost
        recompute = mb_s / 3 * r.blocks / total_cost if s.activation_checkpointing == "full" else 0.0
        colls, first_gather, tail = collectives(cfg, lay, g, r, n_local, micro, precision, stream, moe)
        block_share = r.blocks / r.cost if r.cost else 0.0
        times.append(
            RankTimes(work / 3, 2 * work / 3, recompute, attention_share * block_share, colls,
                      first_gather.seconds(net) if first_gather else 0.0, tail)
        )  # fmt: skip
    st = step_time(times, micro, ratio, net)

    def held_bytes(row) -> float:
        _, state, copies, unsharded, by_mode = row
        return sum(state.values()) + copies + unsharded + by_mode[s.activation_checkpointing]

    n_local, state, copies, unsharded, by_mode = max(rows, key=held_bytes)  # the most loaded rank
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
        params_per_gpu=n_local / shards.params,
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
    kind = _dp_kind(s.name)
    a = 4 if precision == "fp32" else 2
    sb = memory.state_bytes(precision, kind)
    tokens = int(t.micro_batch_size * t.seq_len / lay.cp)
    recompute = s.activation_checkpointing != "none"
    out: list[comm.Collective] = []
    first: comm.Collective | None = None
    tail = 0.0
    block = memory.block_params_per_tp_rank(m, lay.tp)
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


def _dp_kind(strategy: str) -> str:
    """The memory model's strategy: the pipeline alone replicates like DDP."""
    return "ddp" if strategy == "pp" else strategy


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
    kind = _dp_kind(p.strategy)
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

    lines = [
        f"  dry run (meta build over a fake process group of {p.world_size} ranks; rank 0, "
        f"the most loaded): {_count(d['params_per_rank'])} parameters per rank (GiB)",
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


def dry_run(cfg: Config, world_size: int) -> dict:
    """Per-rank model state of the most loaded rank, from the sharded (meta) tensors the real
    build path produces over a fake process group of `world_size` ranks.

    This process is rank 0 of the fake group. DTensor and FSDP2 split a dimension as
    torch.chunk does (the first ranks get the rounded-up chunks), so rank 0 holds the largest
    shard on every mesh dimension: its figures are the most loaded rank's."""
    if tdist.is_initialized():
        raise ConfigError("plan.dry_run needs a process without a process group (run framework.plan)")
    if cfg.precision.name in ("auto", "fp8"):
        # the plan targets GPUs (auto = bf16); fp8's casts are transient, its weights bf16/fp32
        cfg = replace(cfg, precision=replace(cfg.precision, name="bf16"))
    tdist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        engine = build_engine(None, cfg, Dist(rank=0, world_size=world_size), dry_run=True)
        local = [
            p.to_local() if isinstance(p, DTensor) else p for p in engine.plain_model().parameters()
        ]
        weight_bytes = sum(t.numel() * t.element_size() for t in local)
        return {
            "params_per_rank": sum(t.numel() for t in local),
            "weight_bytes_per_rank": weight_bytes,
            # torch strategies: gradients take the parameters' dtype and sharding, and AdamW's
            # exp_avg / exp_avg_sq are zeros_like(param) (the fp32 weights are the master)
            "grad_bytes_per_rank": weight_bytes,
            "optimizer_bytes_per_rank": 2 * weight_bytes,
            "device": str(local[0].device) if local else "meta",
        }
    finally:
        tdist.destroy_process_group()


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


# -- search -------------------------------------------------------------------------------------

SEARCH_TOP = 10
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
    config as one `single` rank with the whole batch in one micro-batch."""
    resolve_vocab_size(cfg)
    resolve_task(cfg)
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
    micro-batch or less checkpointing never needs less memory, so once one does not fit, the
    larger ones are skipped. Ties (equal time) go to less checkpointing, then less memory."""
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
        for mbs in _divisors(per_dp, MAX_MICRO_BATCH):
            if per_dp // mbs < least:
                break
            s = replace(strategy, activation_checkpointing=mode)
            cand = replace(cfg, strategy=s, trainer=replace(cfg.trainer, micro_batch_size=mbs))
            p = estimate(cand, world_size)
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


def render_search(plans: list[Plan], cfg: Config, world_size: int) -> str:
    net = cluster(cfg)
    t = cfg.trainer
    lines = [
        f"search: {cfg.model.name} on {world_size} x {cfg.plan.gpu} (nodes of {net.gpus_per_node}, "
        f"{net.intra_node_gbps:g} / {net.inter_node_gbps:g} Gb/s per GPU in / across nodes), "
        f"{t.global_batch_size} sequences x {t.seq_len} tokens per step, {cfg.plan.mfu:.0%} MFU "
        "assumed; the layouts that fit, fastest first",
        "   #   tp  pp   dp  cp  ep  strategy          schedule          mbs  checkpointing  "
        "step s  comm s  bubble  memory GiB  MFU",
    ]
    for i, p in enumerate(plans, 1):
        lines.append(
            f"  {i:2d} {p.tp:4d} {p.pp:3d} {p.dp:4d} {p.cp:3d} {p.ep:3d}  {p.label:16s}  "
            f"{p.schedule or '-':16s} {p.micro_batch_size:4d}  {p.activation_checkpointing:13s} "
            f"{p.step_time_s:7.3g} {p.comm_s:7.3g} {p.bubble:7.1%} {p.memory_bytes / GIB:11.1f} "
            f"{p.mfu_estimated:4.0%}"
        )
    if plans:
        lines.append(f"  launch #1 with: {' '.join(plans[0].overrides)}")
    return "\n".join(lines)


@entry("config", Config)
def main(dcfg: DictConfig) -> None:
    """Console script `fw-plan`."""
    cfg = load(dcfg)
    world_size = resolve_world_size(cfg.plan.world_size)
    if cfg.plan.search:
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
        summary["dry_run"]["comm_bytes"] = {
            k: round(v) for k, v in count_comm(cfg, plan.world_size).items()
        }
        text += "\n" + render_dry_run(summary["dry_run"], plan)
    print(text)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

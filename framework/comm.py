"""Communication per training step as small pure functions (bytes, seconds), used by
framework.estimate (the plan). No process groups, no tensors: every collective is counted
from numbers.

Cost of one collective on one rank, ring algorithms (what NCCL's bandwidth-bound ring and
tree algorithms approach for large messages; Patarasuk & Yuan 2009; NCCL's "bus bandwidth"):

    all-reduce                  2 (n-1)/n x bytes
    all-gather, reduce-scatter    (n-1)/n x bytes      (bytes: the whole, unsharded buffer)
    all-to-all                    (n-1)/n x bytes      (bytes: what this rank holds)
    send/recv                           1 x bytes

over the slowest link the group crosses: a group whose ranks all sit in one node of
`gpus_per_node` GPUs moves data over NVLink (intra-node bandwidth per GPU), any other over the
network (inter-node bandwidth per GPU: one NIC per GPU, as in DGX / HGX nodes, so groups of
different GPUs do not share a NIC). Ranks are laid out row-major over framework.config.Layout's
axes (pp, dp_replicate, dp_shard, cp, tp), tensor parallel innermost, so an axis' groups are
ranks `stride` apart, `stride` the product of the inner axes' sizes. Latency is left out (the
messages of a training step are MBs to GBs); nominal link rates are used (NCCL reaches about
80% of them: lower `plan.*_gbps` to calibrate against a measured bus bandwidth).

What each parallel technique moves is written here from what our code does (the functions say
which file); framework.estimate adds them up per rank and step, and `step_time` below decides
what overlaps compute (its docstring states the overlap assumptions).
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")

OVERLAPS = ("none", "forward", "backward", "reduction", "after_step", "p2p", "attention")
"""What a collective can hide behind (step_time): none (on the critical path),
forward / backward (prefetched behind the compute of that pass), reduction (gradient
reduction behind the last micro-batch's backward), after_step (after the optimizer step,
before the next forward), p2p (pipeline transfers), attention (ring attention's K/V exchange
behind the attention kernels)."""


def ring_factor(kind: str, n: int) -> float:
    """Bytes one rank sends per byte of the collective's buffer, on a group of n ranks."""
    if kind == "send_recv":
        return 1.0
    if n <= 1:
        return 0.0
    if kind == "all_reduce":
        return 2 * (n - 1) / n
    if kind in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) / n
    raise ValueError(f"unknown collective {kind!r}: one of {', '.join(KINDS)}")


def group_is_intra_node(stride: int, size: int, gpus_per_node: int) -> bool:
    """Whether every group of `size` ranks spaced `stride` apart (row-major layout) lies inside
    one node of `gpus_per_node` GPUs: each group spans a block of stride x size consecutive
    ranks, aligned at multiples of that block, so it stays in one node exactly when the block
    divides the node. A group of one rank crosses nothing."""
    if size <= 1:
        return True
    span = stride * size
    return span <= gpus_per_node and gpus_per_node % span == 0


@dataclass(frozen=True)
class Cluster:
    """Per-GPU link bandwidths, one direction, in gigabits per second (plan.*_gbps)."""

    gpus_per_node: int
    intra_node_gbps: float
    inter_node_gbps: float

    def bytes_per_s(self, intra: bool) -> float:
        return (self.intra_node_gbps if intra else self.inter_node_gbps) * 1e9 / 8


@dataclass(frozen=True)
class Collective:
    """One kind of collective in a step: `calls` calls of `buffer_bytes` each on groups of `n`."""

    name: str
    """The plan's key (comm_bytes): e.g. fsdp_all_gather, tp_reduce_scatter, pp_send_recv."""
    kind: str
    n: int
    buffer_bytes: float
    calls: float
    """Per optimizer step (per rank)."""
    intra: bool
    """Inside one node (NVLink) or across nodes (network)."""
    overlap: str
    """One of OVERLAPS."""

    @property
    def bytes(self) -> float:
        """Bytes this rank sends per step."""
        return self.calls * self.buffer_bytes * ring_factor(self.kind, self.n)

    def seconds(self, cluster: Cluster) -> float:
        return self.bytes / cluster.bytes_per_s(self.intra)


# -- data parallel ------------------------------------------------------------------------------


def fsdp(
    forward_gathered: float,
    backward_gathered: float,
    params: float,
    n: int,
    intra: bool,
    *,
    param_bytes: int,
    reduce_bytes: int = 4,
    replicas: int = 1,
    replicas_intra: bool = False,
) -> list[Collective]:
    """FSDP2 (framework/parallel/fsdp.py) on a shard group of `n` ranks, for `params`
    parameters (this tp rank's, before sharding): `forward_gathered` / `backward_gathered`
    parameters all-gathered per step before forward / backward (framework.estimate counts them per
    unit: the root keeps its weights from forward to backward, blocks gather again before
    backward when they resharded after forward), in the compute dtype (`param_bytes`:
    MixedPrecisionPolicy.param_dtype). Gradients are reduce-scattered in fp32 (reduce_dtype)
    once per step: the engine turns gradient sync off on all but the last micro-batch
    (set_requires_gradient_sync), the unsharded fp32 gradients accumulating in between
    (framework.memory.unsharded_grads_bytes). HSDP (`replicas` > 1) then all-reduces each
    rank's fp32 shard across the replicas."""
    out = []
    if n > 1:
        out += [
            Collective("fsdp_all_gather", "all_gather", n, forward_gathered * param_bytes, 1, intra, "forward"),
            Collective("fsdp_all_gather", "all_gather", n, backward_gathered * param_bytes, 1, intra, "backward"),
            Collective("fsdp_reduce_scatter", "reduce_scatter", n, params * reduce_bytes, 1, intra, "reduction"),
        ]  # fmt: skip
    if replicas > 1:
        shard = params * reduce_bytes / n
        out.append(
            Collective("hsdp_all_reduce", "all_reduce", replicas, shard, 1, replicas_intra, "reduction")
        )
    return [c for c in out if c.buffer_bytes > 0]


def ddp(params: float, n: int, intra: bool, grad_bytes: int = 4) -> list[Collective]:
    """DDP (framework/parallel/ddp.py): one all-reduce of every gradient per step (no_sync on
    the other micro-batches), in the parameters' dtype (fp32: autocast keeps fp32 weights),
    in 25 MB buckets during the last backward."""
    return [Collective("ddp_all_reduce", "all_reduce", n, params * grad_bytes, 1, intra, "reduction")]


def zero(
    stage: int, params: float, n: int, intra: bool, *, micro_batches: int, bytes_16: int = 2
) -> list[Collective]:
    """DeepSpeed ZeRO (framework/parallel/zero.py; deepspeed/runtime/zero): 16-bit gradients
    and weights.
      stage 1: gradients reduce-scattered to their optimizer shard once per step (DeepSpeed
               reduces only at the accumulation boundary when gradients are not partitioned),
               updated 16-bit weights all-gathered after the step;
      stage 2: the same, but the reduce-scatter runs in every micro-batch's backward
               (partitioned gradients are reduced as they are produced);
      stage 3: weights all-gathered before each module's forward and again before its
               backward, every micro-batch; gradients reduce-scattered every micro-batch."""
    b = params * bytes_16
    if stage == 1:
        out = [
            Collective("zero_reduce_scatter", "reduce_scatter", n, b, 1, intra, "reduction"),
            Collective("zero_all_gather", "all_gather", n, b, 1, intra, "after_step"),
        ]
    elif stage == 2:
        out = [
            Collective("zero_reduce_scatter", "reduce_scatter", n, b, micro_batches, intra, "backward"),
            Collective("zero_all_gather", "all_gather", n, b, 1, intra, "after_step"),
        ]
    elif stage == 3:
        out = [
            Collective("zero_all_gather", "all_gather", n, b, micro_batches, intra, "forward"),
            Collective("zero_all_gather", "all_gather", n, b, micro_batches, intra, "backward"),
            Collective("zero_reduce_scatter", "reduce_scatter", n, b, micro_batches, intra, "backward"),
        ]
    else:
        raise ValueError(f"ZeRO stage {stage} is not 1, 2 or 3")
    return out


# -- tensor parallel ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TpShape:
    """What framework/parallel/tp.py's collectives carry, per micro-batch on one rank."""

    tokens: int
    """Tokens of one micro-batch on this rank's tp group (B x T, or B x T / cp)."""
    n_embd: int
    vocab: int
    colwise_inputs: int
    """Column-parallel linears reading the same normed input, per block: q, k, v + the MLP's
    fc (gpt2) or gate and up (llama)."""
    stream_bytes: int
    """The residual stream's dtype (4 under autocast over fp32 weights, else 2)."""
    compute_bytes: int
    norm_params: int
    """Elements of the norm weights (and biases) replicated over tp, all blocks and the final
    norm (their gradients are all-reduced once per step under sequence parallel)."""
    position_table: int = 0
    """Elements of a learned position table split along the sequence (gpt2, sequence parallel)."""


def tp(
    shape: TpShape,
    n: int,
    intra: bool,
    *,
    layers: int,
    micro_batches: int,
    sequence_parallel: bool,
    recompute: bool,
    first_stage: bool = True,
    last_stage: bool = True,
) -> list[Collective]:
    """Tensor parallel as framework/parallel/tp.py applies it, counted per block and micro-batch
    (x = tokens x n_embd elements; r = stream bytes, a = compute bytes):

      sequence parallel: forward  all-gather x (r) before attention and MLP,
                                  reduce-scatter x (a) after wo and w2;
                         backward all-gather x (a) for the gradients of wo and w2 outputs,
                                  all-reduce x (r) per column-parallel linear: each of q, k, v,
                                  fc (gate, up) wraps the same replicated input separately, so
                                  their partial input gradients are all-reduced one by one
                                  (Megatron sums them first and reduce-scatters once);
      without:           forward  all-reduce x (a) after wo and w2;
                         backward the same per-linear all-reduces (r).
      activation checkpointing (full or selective: our selective policy saves matmul outputs,
      not collective outputs) replays the forward up to the last tensor backward needs:
      sequence parallel 2 all-gathers + 1 reduce-scatter (not w2's), otherwise 1 all-reduce.

    Outside the blocks, per micro-batch: the token embedding (rows split along the vocabulary)
    reduce-scatters (all-reduces) its output, all-gathered back in backward under sequence
    parallel; GPT-2's position table likewise (T x C); the output head gathers its input (and
    reduce-scatters or all-reduces its input gradient) and all-gathers the logits (tokens x
    vocab, compute dtype). Under sequence parallel the norm weights' gradients (partial sums
    over each rank's slice of the sequence) are all-reduced in fp32 once per step.
    """
    x = shape.tokens * shape.n_embd
    r, a, k, m = shape.stream_bytes, shape.compute_bytes, shape.colwise_inputs, micro_batches
    ag = rs = ar = 0.0  # bytes of buffers per micro-batch
    if sequence_parallel:
        ag += layers * x * (2 * r + 2 * a + (2 * r if recompute else 0))
        rs += layers * x * a * (2 + (1 if recompute else 0))
        ar += layers * x * r * k
    else:
        ar += layers * x * (2 * a + k * r + (a if recompute else 0))
    if first_stage:
        if sequence_parallel:
            rs += x * r + shape.position_table * r
            ag += x * r + shape.position_table * r
        else:
            ar += x * r
    if last_stage:
        if sequence_parallel:
            ag += x * r
            rs += x * r
        else:
            ar += x * r
        ag += shape.tokens * shape.vocab * a  # the logits, gathered over the vocabulary
    out = [
        Collective("tp_all_gather", "all_gather", n, ag, m, intra, "none"),
        Collective("tp_reduce_scatter", "reduce_scatter", n, rs, m, intra, "none"),
        Collective("tp_all_reduce", "all_reduce", n, ar, m, intra, "none"),
    ]
    if sequence_parallel:
        out.append(
            Collective("tp_norm_grads", "all_reduce", n, shape.norm_params * 4, 1, intra, "reduction")
        )
    return [c for c in out if c.buffer_bytes > 0]


# -- pipeline, experts, context -----------------------------------------------------------------


def pipeline_p2p(
    activation_bytes: float, intra: bool, *, micro_batches: int, sends_per_micro_batch: float
) -> list[Collective]:
    """Pipeline parallel: each micro-batch's activations (B x T x C in the stream dtype, this
    rank's slice) go to the next stage in forward and their gradients come back in backward:
    per rank and micro-batch, one send per direction for each of its stage boundaries
    (`sends_per_micro_batch`: 2 x stages on the rank, minus the pipeline's two ends)."""
    calls = micro_batches * sends_per_micro_batch
    return [Collective("pp_send_recv", "send_recv", 2, activation_bytes, calls, intra, "p2p")]


def expert_all_to_all(
    tokens: int,
    top_k: int,
    hidden: int,
    ep: int,
    sparse_layers: int,
    intra: bool,
    *,
    micro_batches: int,
    compute_bytes: int = 2,
    recompute: bool = False,
) -> list[Collective]:
    """Expert parallel (issue 16): per sparse layer, each token's hidden state goes to its
    top_k experts' ranks and comes back (dispatch + combine), in forward and again in backward
    (4 all-to-alls of tokens x top_k x hidden), plus the forward's 2 when recomputed; the share
    (ep-1)/ep leaves the rank."""
    per_layer = 4 + (2 if recompute else 0)
    buffer = tokens * top_k * hidden * compute_bytes
    calls = micro_batches * sparse_layers * per_layer
    return [Collective("ep_all_to_all", "all_to_all", ep, buffer, calls, intra, "none")]


def context_parallel(
    method: str,
    tokens: int,
    q_width: int,
    kv_width: int,
    cp: int,
    layers: int,
    intra: bool,
    *,
    micro_batches: int,
    compute_bytes: int = 2,
    recompute: bool = False,
) -> list[Collective]:
    """Context parallel over cp ranks, `tokens` = this rank's B x T / cp, `q_width` /
    `kv_width` = this tp rank's query / key-value widths (heads x head size).
    ulysses (DeepSpeed-Ulysses): per layer forward, all-to-alls of q, k, v (sequence-sharded to
    head-sharded) and of the attention output back: 4, again in backward, plus the forward's
    when recomputed; each moves (cp-1)/cp of the rank's tensor.
    ring: K and V travel around the ring, cp-1 send/recv steps per layer in forward; backward
    sends K, V and their gradients (twice the forward)."""
    if method == "ulysses":
        per_layer = (2 * q_width + 2 * kv_width) * tokens * compute_bytes
        calls = micro_batches * layers * (2 + (1 if recompute else 0))
        return [Collective("cp_all_to_all", "all_to_all", cp, per_layer, calls, intra, "none")]
    if method == "ring":
        kv = 2 * kv_width * tokens * compute_bytes
        calls = micro_batches * layers * (cp - 1) * (3 + (1 if recompute else 0))
        return [Collective("cp_send_recv", "send_recv", 2, kv, calls, intra, "attention")]
    raise ValueError(f"context-parallel method {method!r} is not ulysses or ring")


# -- what the step waits for -------------------------------------------------------------------


@dataclass(frozen=True)
class RankTimes:
    """One rank's compute per micro-batch (seconds) and the collectives of its step."""

    forward_s: float
    backward_s: float
    recompute_s: float
    attention_share: float
    """Share of this rank's compute in attention kernels (what ring attention hides behind)."""
    collectives: list[Collective]
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


def step_time(ranks: list[RankTimes], micro_batches: int, bubble_ratio: float, net: Cluster) -> StepTime:
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
        t = {k: 0.0 for k in OVERLAPS}
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

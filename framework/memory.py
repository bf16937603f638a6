"""Per-GPU training memory as small pure functions (all sizes in bytes), used by framework.estimate.

No tensors, no devices: everything is counted from the model config. The accounting, per GPU:

- model state (Rajbhandari et al. 2020, "ZeRO", section 3.1): weights, gradients and AdamW
  state (fp32 m and v, plus an fp32 master copy where the weights themselves are 16-bit),
  divided by the tensor-parallel degree for the block matrices and by the data-parallel degree
  for whatever the strategy shards;
- weight copies in the compute dtype: ZeRO-3 / FSDP's gathered blocks, or autocast's cached
  16-bit casts of fp32 weights;
- activations of one micro-batch: Korthikanti et al. 2022 ("Reducing Activation Recomputation
  in Large Transformer Models", section 4) per-layer bytes, generalised to our blocks (GQA,
  SwiGLU, any FFN width, fp32 residual stream under autocast), divided by tp under sequence
  parallel; plus the loss. A CPU test checks the per-layer count against the tensors autograd
  really saves.

Left out (covered by the head-room in `FIT_FRACTION`): the CUDA context, NCCL buffers, DDP
gradient buckets, allocator fragmentation and the transient activation gradients inside a
block during backward.
"""

from __future__ import annotations

from dataclasses import dataclass

from framework.model.gpt import ModelConfig, num_params

GIB = 2**30

FIT_FRACTION = 0.9
"""Share of a GPU's memory a plan may use; the rest is context, NCCL buffers, fragmentation."""


@dataclass(frozen=True)
class Gpu:
    device_name: str
    """As CUDA reports it; framework.perf.peak_flops matches it (one peak table)."""
    memory_gib: float
    """Nominal size (the marketed GB; CUDA reports about 1% less, inside FIT_FRACTION)."""
    fp8: bool
    """Our fp8 path needs sm_90 or newer (precision.py checks the real device at train time)."""
    intra_node_gbps: float
    """GPU-to-GPU bandwidth inside a node, per GPU and direction, gigabits/s (plan.intra_node_gbps)."""
    inter_node_gbps: float = 400.0
    """Network bandwidth per GPU and direction, gigabits/s (plan.inter_node_gbps): one 400 Gb/s
    InfiniBand / RoCE NIC per GPU, as in DGX / HGX H100 and B200 nodes."""


# Intra-node: NVLink per GPU and direction from NVIDIA's data sheets (H100/H200 SXM NVLink 4,
# 900 GB/s bidirectional = 450 GB/s = 3600 Gb/s each way; B200 NVLink 5 1.8 TB/s; A100 NVLink
# 3 600 GB/s; V100 NVLink 2 300 GB/s); PCIe cards talk over PCIe (Gen5 x16 64 GB/s, Gen4 32
# GB/s each way; H100 NVL's bridge joins pairs only). Inter-node: DGX A100 has one 200 Gb/s
# HDR NIC per GPU; PCIe servers typically one 100 Gb/s NIC per GPU or fewer.
GPUS: dict[str, Gpu] = {
    "h100": Gpu("NVIDIA H100 80GB HBM3", 80, True, 3600),
    "h100-pcie": Gpu("NVIDIA H100 PCIe", 80, True, 512),
    "h100-nvl": Gpu("NVIDIA H100 NVL", 94, True, 512),
    "h200": Gpu("NVIDIA H200", 141, True, 3600),
    "gh200": Gpu("NVIDIA GH200 480GB", 96, True, 3600),
    "b200": Gpu("NVIDIA B200", 180, True, 7200),
    "a100": Gpu("NVIDIA A100-SXM4-80GB", 80, False, 2400, 200),
    "a100-40gb": Gpu("NVIDIA A100-SXM4-40GB", 40, False, 2400, 200),
    "l40s": Gpu(
        "NVIDIA L40S", 48, False, 256, 100
    ),  # sm_89: has fp8 units, but our fp8 path needs sm_90
    "a10g": Gpu("NVIDIA A10G", 24, False, 256, 100),
    "l4": Gpu("NVIDIA L4", 24, False, 256, 100),
    "v100": Gpu("Tesla V100-SXM2-32GB", 32, False, 1200, 100),
}

DEEPSPEED_STRATEGIES = ("zero1", "zero2", "zero3")
AC_MODES = ("none", "selective", "full")


# -- model state ---------------------------------------------------------------------------------


def block_matrix_params(m: ModelConfig) -> int:
    """Weights of the block linear layers (q, k, v, o and the MLP): what tensor parallel splits.
    Embeddings, the output head, norms and biases stay whole on every tp rank. A sparse block's
    MLP is its router, all its stacked experts and its shared experts (not split by tensor
    parallel, which config.validate refuses for a mixture of experts)."""
    C, F, moe = m.n_embd, m.ffn_dim, m.moe
    kv = m.kv_heads * m.head_dim
    attn = 2 * C * C + 2 * C * kv  # wq, wo (C x C); wk, wv (C x kv)
    per_width = (3 if m.style == "llama" else 2) * C  # MLP matrices per unit of hidden width
    sparse = len(moe.sparse_layers(m.n_layer))
    experts = moe.num_experts * C + per_width * m.expert_dim * (moe.num_experts + moe.shared_experts)
    return m.n_layer * attn + (m.n_layer - sparse) * per_width * F + sparse * experts


def params_per_tp_rank(m: ModelConfig, tp: int, sequence_parallel: bool = True) -> float:
    """Parameters one tensor-parallel rank holds before any data-parallel sharding, split as
    framework/parallel/tp.py splits them: the block matrices, the colwise layers' biases (q, k,
    v, fc / gate, up), the token embedding and an untied output head (along the vocabulary)
    and, under sequence parallel, GPT-2's position table. Norms and the rowwise layers' biases
    (o, down) stay whole on every tp rank. (The dry run counts the real shards: a test holds
    the two within 2%.)"""
    if tp <= 1:
        return float(num_params(m))
    C, F, V = m.n_embd, m.ffn_dim, m.vocab_size
    kv = m.kv_heads * m.head_dim
    split = block_matrix_params(m) + V * C * (1 if m.tie_embeddings else 2)
    if m.bias:
        split += m.n_layer * (C + 2 * kv + F * (2 if m.style == "llama" else 1))
    if m.style == "gpt2" and sequence_parallel:
        split += m.block_size * C
    return split / tp + (num_params(m) - split)


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter of each kind of model state."""

    param: int
    grad: int
    optimizer: int
    """AdamW m and v (fp32, 4 + 4) plus an fp32 master copy (4) when `param` is 16-bit."""
    compute: int
    """Bytes of a weight or activation in the compute dtype (what autocast/gathers produce)."""


def state_bytes(precision: str, strategy: str) -> StateBytes:
    """fp32: 4 + 4 + 8 = 16 bytes/param. Mixed precision (bf16 / fp16 / fp8, whose fp8 casts
    are transient): DeepSpeed ZeRO keeps 16-bit weights and grads and an fp32 master in the
    optimizer (2 + 2 + 12); torch-native strategies keep fp32 weights that autocast (or FSDP2's
    MixedPrecisionPolicy) casts per use, so the weights are the master (4 + 4 + 8). Both total
    16 bytes/param; they differ in what each ZeRO stage shards."""
    if precision == "fp32":
        return StateBytes(param=4, grad=4, optimizer=8, compute=4)
    if strategy in DEEPSPEED_STRATEGIES:
        return StateBytes(param=2, grad=2, optimizer=12, compute=2)
    return StateBytes(param=4, grad=4, optimizer=8, compute=2)


@dataclass(frozen=True)
class Shards:
    """How many data-parallel ranks share (split) each kind of state; 1 = replicated."""

    params: int
    grads: int
    optimizer: int


def dp_shards(strategy: str, dp: int, hsdp_replicas: int = 1) -> Shards:
    """ZeRO-1 shards the optimizer over dp, ZeRO-2 also the gradients, ZeRO-3 / FSDP also the
    weights. HSDP shards within groups of dp / hsdp_replicas and replicates across them."""
    if strategy in ("single", "ddp", "tp", "pp"):  # pp: whole replicas of each pipeline stage
        return Shards(1, 1, 1)
    if strategy == "zero1":
        return Shards(1, 1, dp)
    if strategy == "zero2":
        return Shards(1, dp, dp)
    if strategy == "zero3":
        return Shards(dp, dp, dp)
    if strategy in ("fsdp", "tp_fsdp"):
        group = max(dp // max(hsdp_replicas, 1), 1)
        return Shards(group, group, group)
    raise ValueError(f"unknown strategy {strategy!r}")


def model_state_bytes(
    n_local: float, sb: StateBytes, shards: Shards, experts: float = 0.0, ep: int = 1
) -> dict[str, float]:
    """Per-GPU weights, gradients and optimizer state for n_local parameters per tp rank, of
    which `experts` are routed experts split over ep ranks (expert parallelism: params_per_rank)."""
    return {
        "params": params_per_rank(n_local, shards.params, experts, ep) * sb.param,
        "grads": params_per_rank(n_local, shards.grads, experts, ep) * sb.grad,
        "optimizer": params_per_rank(n_local, shards.optimizer, experts, ep) * sb.optimizer,
    }


def block_params_per_tp_rank(m: ModelConfig, tp: int) -> float:
    """Parameters of one transformer block on one tensor-parallel rank, split as
    framework/parallel/tp.py splits them: the matrices and the colwise layers' biases (q, k, v,
    fc / gate, up) over tp; norms and the rowwise layers' biases whole."""
    C, F, L = m.n_embd, m.ffn_dim, m.n_layer
    split = block_matrix_params(m) / L
    if m.bias:
        split += C + 2 * m.kv_heads * m.head_dim + F * (2 if m.style == "llama" else 1)
    whole = (num_params(m, non_embedding=True) - final_norm_params(m)) / L - split
    return split / max(tp, 1) + whole


def final_norm_params(m: ModelConfig) -> int:
    return 2 * m.n_embd if m.style == "gpt2" and m.bias else m.n_embd


def root_params_per_tp_rank(
    m: ModelConfig, tp: int, sequence_parallel: bool = True, *, first: bool = True, last: bool = True
) -> float:
    """Parameters outside the blocks that a rank holds, per tensor-parallel rank: the first
    pipeline stage's token embedding (rows split over tp) and GPT-2's position table (split
    under sequence parallel); the last stage's final norm and output head (rows split over
    tp). A tied head is the embedding's own weight; when the first and last stages are on
    different ranks, the last holds a copy (Megatron's tied embeddings under pipelining, its
    gradient summed with the first stage's)."""
    tp = max(tp, 1)
    C, V = m.n_embd, m.vocab_size
    n = 0.0
    if first:
        n += V * C / tp
        if m.style == "gpt2":
            n += m.block_size * C / (tp if sequence_parallel else 1)
    if last:
        n += final_norm_params(m)
        if not m.tie_embeddings:
            n += (m.num_labels or V) * C / tp
        elif not first:
            n += V * C / tp
    return n


def stage_params_per_tp_rank(
    m: ModelConfig,
    tp: int,
    sequence_parallel: bool = True,
    *,
    blocks: int | None = None,
    first: bool = True,
    last: bool = True,
) -> float:
    """Parameters one rank holds before data-parallel sharding: `blocks` blocks (default all)
    plus its part of the root (root_params_per_tp_rank). The whole model (pp=1) gives
    params_per_tp_rank."""
    blocks = m.n_layer if blocks is None else blocks
    root = root_params_per_tp_rank(m, tp, sequence_parallel, first=first, last=last)
    return blocks * block_params_per_tp_rank(m, tp) + root


def unsharded_grads_bytes(
    stage_params: float, strategy: str, grad_accum: int, pp: int = 1, grad_bytes: int = 4
) -> float:
    """FSDP's unsharded gradient buffer: with gradient sync off on all but the last
    micro-batch (framework/parallel/fsdp.py; torch.distributed.pipelining does the same per
    stage), FSDP2 keeps each parameter's whole gradient, upcast to the fp32 reduce dtype
    (FSDPParam.unsharded_accumulated_grad), from the first micro-batch's backward to the
    step's reduce-scatter."""
    if strategy in ("fsdp", "tp_fsdp") and (grad_accum > 1 or pp > 1):
        return stage_params * grad_bytes
    return 0.0


def stream_bytes(precision: str, strategy: str) -> int:
    """Bytes of the residual stream between blocks. Strategies that keep fp32 weights on every
    rank (single, ddp, tp) run autocast over them: embeddings and residual adds stay fp32, and
    each linear casts its input to 16-bit. The sharded strategies compute with 16-bit weights
    (DeepSpeed's bf16 model, FSDP2's MixedPrecisionPolicy), so the stream is 16-bit too."""
    if precision == "fp32" or strategy in ("single", "ddp", "tp"):
        return 4
    return 2


def weight_copies_bytes(
    m: ModelConfig,
    tp: int,
    strategy: str,
    precision: str,
    reshard_after_forward: bool = True,
    *,
    sequence_parallel: bool = True,
    blocks: int | None = None,
    first: bool = True,
    last: bool = True,
    pp: int = 1,
    ep: int = 1,
) -> float:
    """Weights in the compute dtype held during a step, beside the model state, on a rank that
    holds `blocks` blocks (default all) and the root parts of the first / last stage.

    ZeRO-3 / FSDP: unsharded weights of two blocks (the one computing and the prefetched next),
    one block's gradients before reduce-scatter, and the root unit (embeddings, final norm,
    head), gathered for the whole step; FSDP with reshard_after_forward=False keeps every
    gathered weight from forward to backward, and so does every pipeline stage (torch's
    pipelining sets reshard_after_backward=False until the step's last backward). Autocast
    over fp32 weights (single, ddp, tp): its cached 16-bit cast of every matrix (blocks and
    output head) lives until backward. Under expert parallelism a block's routed experts count
    1/ep (a rank gathers or casts only its own).
    """
    a = 4 if precision == "fp32" else 2
    blocks = m.n_layer if blocks is None else blocks
    saved = expert_copies_saved(m, ep, tp)  # per block
    if strategy in ("zero3", "fsdp", "tp_fsdp"):
        block = block_params_per_tp_rank(m, tp) - saved
        root = root_params_per_tp_rank(m, tp, sequence_parallel, first=first, last=last)
        if strategy != "zero3" and (not reshard_after_forward or pp > 1):
            return (blocks * block + root + (block if pp == 1 else 0)) * a
        return (min(blocks, 3) * block + root) * a
    if precision != "fp32" and strategy in ("single", "ddp", "tp"):
        head = (m.num_labels or m.vocab_size) * m.n_embd / max(tp, 1) if last else 0.0
        return (blocks * (block_matrix_params(m) / m.n_layer / max(tp, 1) - saved) + head) * a
    return 0.0


# -- activations ---------------------------------------------------------------------------------


def layer_activation_bytes(
    m: ModelConfig,
    seq_len: int,
    micro_batch: int,
    mode: str,
    tp: int = 1,
    sequence_parallel: bool = True,
    compute_bytes: int = 2,
    stream: int | None = None,
) -> float:
    """Bytes one transformer block keeps for backward for one micro-batch (B sequences of T).

    Korthikanti et al. 2022 count sbh(34 + 5as/h) per layer with 16-bit activations. Our
    attention is SDPA (flash / memory-efficient kernels), which never stores the (T x T) scores:
    it recomputes them in backward, so the 5as/h term becomes the softmax log-sum-exp (fp32,
    per head and token). Per token, with a = compute_bytes and r = stream bytes (default a):
      replicated over tp unless sequence parallel:
        norm inputs: LayerNorm keeps its input (r); our RMSNorm computes in fp32 and keeps
          its fp32 input and normalised output (8 bytes per element)
        norm outputs as the linears read them: one a-byte tensor when r == a; autocast over an
          fp32 stream casts once per linear (q, k, v: 3; fc: 1, or gate and up: 2)
        dropout masks (1 byte): 2h if dropout > 0
      split over tp: q, k, v, SDPA output (4h a), MLP hidden (GeLU: fc out and GeLU
        out, 2f a; SwiGLU: gate, up, silu(gate), product, 4f a)
    which is Korthikanti's 34h for GPT-2 shapes with dropout and r = a = 2 (f = 4h).
    LayerNorm's mean and rstd (8 bytes per token) are left out.

    mode: none keeps all of it; selective (op-level, as torchtitan's 'op' policy) keeps the
    block input, the residual, and the matmul and SDPA outputs, and recomputes norms, casts and
    the GeLU / SiLU outputs; full keeps only the block input (backward then rebuilds one block
    at a time: `recompute_bytes`).
    """
    if mode not in AC_MODES:
        raise ValueError(f"activation checkpointing mode {mode!r} is not one of {AC_MODES}")
    tokens = seq_len * micro_batch
    C, F, a = m.n_embd, m.ffn_dim, compute_bytes
    r = stream or a
    llama = m.style == "llama"
    sp = tp if sequence_parallel else 1  # divisor of the tensors sequence parallel splits
    if mode == "full":
        return tokens * C * r / sp

    masks = 2 * C * 1 if m.dropout > 0 else 0  # bytes per token
    lse = m.n_head * 4 / tp  # fp32 log-sum-exp per head, bytes per token
    # q, k, v and the SDPA output; GPT's Attention repeats the kv heads before SDPA, so SDPA
    # keeps full-width k and v even under grouped-query attention.
    qkv_out = 4 * C * a / tp
    if mode == "none":
        norm_inputs = 2 * C * (8 if llama else r)
        casts = 2 if r == a else 3 + (2 if llama else 1)  # attention + MLP input tensors
        replicated = norm_inputs + casts * C * a + masks
        hidden = (4 if llama else 2) * F * a / tp
    else:  # selective
        replicated = 2 * C * r + masks  # block input and residual
        hidden = (2 if llama else 1) * F * a / tp  # fc out (GeLU); gate and up (SwiGLU)
    if m.moe.enabled:  # the sparse blocks' MLPs instead of dense ones, averaged over the blocks
        sparse = len(m.moe.sparse_layers(m.n_layer)) / m.n_layer
        hidden = (1 - sparse) * hidden + sparse * sparse_mlp_bytes(m, mode, a, r)
    return tokens * (replicated / sp + qkv_out + lse + hidden)


def sparse_mlp_bytes(m: ModelConfig, mode: str, compute_bytes: int, stream: int) -> float:
    """Bytes per token a sparse MLP (framework/model/moe.py) keeps for backward, in place of the
    dense MLP's hidden tensors (expert parallelism moves rows between ranks but keeps their
    number when routing is balanced). With k = top_k, E experts, H = expert width, S = shared
    experts, a = compute bytes, r = stream bytes:
      router (fp32): its input as fp32, 4C, unless the run is fp32 throughout (then it is the
        norm output the dense count has already); logits and probabilities 8E; the chosen ids
        (int64) and weights 12k; the renormalising sum and the z-loss's log-sum-exp 8
      per routed row (k per token): the gathered input Ca, the gather and un-sort indices
        (int64) 16 (+ 8 for the per-row expert index of biased experts), the expert MLP's
        hidden tensors (as a dense MLP of width H), the fp32 copy of its output 4C and its
        combine weight 4
      shared experts: a dense MLP of width S H; without them the dense MLP's input casts that
        layer_activation_bytes counts (one Ca, or gate and up from an fp32 stream) do not exist
    Mode none matches what autograd saves (tests/unit/test_plan.py); selective keeps the
    matmul outputs of the experts and the shared MLP and the router's tensors (an estimate)."""
    C, E, H, k = m.n_embd, m.moe.num_experts, m.expert_dim, m.moe.top_k
    a, r, S, llama = compute_bytes, stream, m.moe.shared_experts, m.style == "llama"
    full = mode == "none"
    per_hidden = (4 if llama else 2) if full else (2 if llama else 1)
    router = (0 if a == 4 else 4 * C) + 8 * E + 12 * k + 8
    rows = k * (C * a + (24 if m.bias else 16) + per_hidden * H * a + 4 * C + 4)
    if S:
        return router + rows + per_hidden * S * H * a
    casts = 0 if a == 4 or not full else C * a * ((2 if llama else 1) if r != a else 1)
    return router + rows - casts


def recompute_bytes(
    m: ModelConfig,
    seq_len: int,
    micro_batch: int,
    tp: int,
    sequence_parallel: bool,
    compute_bytes: int,
    stream: int | None = None,
) -> float:
    """Full checkpointing rebuilds one block's activations at a time in backward."""
    return layer_activation_bytes(
        m, seq_len, micro_batch, "none", tp, sequence_parallel, compute_bytes, stream
    )


LOSS_SAVED_BYTES = 4
"""Per logit: the fp32 log-softmax that cross-entropy keeps for backward."""
LOSS_BACKWARD_BYTES = 8
"""Per logit, at the start of backward: the fp32 gradients of the log-softmax and of the logits."""


def logits_bytes(m: ModelConfig, seq_len: int, micro_batch: int) -> float:
    """Peak of the loss, which sits at the start of backward: the saved log-softmax plus the two
    gradients, 12 bytes per logit ((B, T, V) each; the 16-bit logits and their fp32 copy for
    the loss, GPT.forward's .float(), are freed when forward returns). The output head is not
    split by tensor parallel in this plan."""
    return seq_len * micro_batch * m.vocab_size * (LOSS_SAVED_BYTES + LOSS_BACKWARD_BYTES)


def activation_bytes(
    m: ModelConfig,
    seq_len: int,
    micro_batch: int,
    mode: str,
    tp: int = 1,
    sequence_parallel: bool = True,
    compute_bytes: int = 2,
    stream: int | None = None,
    *,
    blocks: int | None = None,
    last: bool = True,
    in_flight: float = 1.0,
) -> float:
    """Peak activation bytes on one GPU: the saved tensors of `blocks` blocks (default all) for
    `in_flight` micro-batches (a pipeline rank holds several: framework.stages.in_flight), one
    block's recompute under full checkpointing, and on the last stage the final norm and the
    loss of the micro-batch in backward. Context parallel passes seq_len / cp: every term is
    per token of this rank's slice of the sequence."""
    args = (tp, sequence_parallel, compute_bytes, stream)
    blocks = m.n_layer if blocks is None else blocks
    per_block = layer_activation_bytes(m, seq_len, micro_batch, mode, *args)
    layers = blocks * per_block * in_flight
    if mode == "full" and blocks:
        layers += recompute_bytes(m, seq_len, micro_batch, *args)
    if not last:
        return layers
    # The final norm keeps its input (stream) and hands the head its output (compute dtype).
    final_norm = seq_len * micro_batch * m.n_embd * ((stream or compute_bytes) + compute_bytes)
    return layers + final_norm + logits_bytes(m, seq_len, micro_batch)


# -- time ----------------------------------------------------------------------------------------


def step_time_s(
    flops_per_token: float, tokens_per_step: int, world_size: int, peak: float, mfu: float
) -> float:
    """Seconds per optimizer step when every GPU runs at `mfu` of its dense peak (FLOP/s)."""
    return flops_per_token * tokens_per_step / (world_size * peak * mfu)


# -- expert parallelism --------------------------------------------------------------------------


def routed_expert_params(m: ModelConfig) -> int:
    """Weights of the routed experts of every sparse block (stacked w1, w3, w2 and their biases):
    what expert parallelism splits over ep ranks. The routers and shared experts stay whole."""
    C, H, b = m.n_embd, m.expert_dim, 1 if m.bias else 0
    if m.style == "gpt2":
        per_expert = 2 * C * H + b * (H + C)
    else:
        per_expert = 3 * C * H + b * (2 * H + C)
    return len(m.moe.sparse_layers(m.n_layer)) * m.moe.num_experts * per_expert


def params_per_rank(n_local: float, shards: int, experts: float = 0.0, ep: int = 1) -> float:
    """Parameters of one kind of state (weights, gradients or optimizer) on one rank when the
    dense n_local - experts are split over `shards` data-parallel ranks (1: replicated) and the
    routed `experts` over ep ranks (framework/parallel/ep.py): each rank holds 1/ep of them,
    sharded again over the shards / ep ranks that hold the same experts when the kind is
    sharded (FSDP: dense / dp + experts / dp, the same total as without ep), whole otherwise
    (DDP: dense + experts / ep)."""
    dense = n_local - experts
    return dense / shards + experts / ep / max(shards // ep, 1)


def expert_copies_saved(m: ModelConfig, ep: int, tp: int = 1) -> float:
    """Expert weights a rank does not gather or cast under ep (it holds 1/ep of each block's
    experts): subtract from weight_copies_bytes' count of whole blocks, per block."""
    if ep <= 1 or not m.moe.enabled:
        return 0.0
    return routed_expert_params(m) / m.n_layer * (1 - 1 / ep) / tp


def ep_buffer_bytes(m: ModelConfig, seq_len: int, micro_batch: int, compute_bytes: int) -> float:
    """The all-to-all buffers of one sparse layer in flight (transient: each layer's exchange is
    done before the next layer's starts): the rows a rank sends and the rows it receives, each
    tokens x top_k x n_embd in the compute dtype when routing is balanced (dropless routing
    can receive more on a rank whose experts are popular; plan.mfu's head-room covers it)."""
    if not m.moe.enabled:
        return 0.0
    return 2 * seq_len * micro_batch * m.moe.top_k * m.n_embd * compute_bytes


def ep_all_to_all_bytes(
    m: ModelConfig,
    seq_len: int,
    micro_batch: int,
    micro_batches: int,
    ep: int,
    compute_bytes: int,
    recompute: bool = False,
) -> float:
    """Bytes one rank sends by all-to-all per optimizer step under expert parallelism: per
    sparse layer and micro-batch, the tokens x top_k rows of n_embd go out to their experts'
    ranks and come back (dispatch + combine), in forward and again in backward (the gradients),
    plus the forward's two again when full activation checkpointing recomputes the block
    (selective saves the all-to-all outputs: parallel/ac.py); the share
    (ep - 1) / ep of them leaves the rank (a balanced router). framework/parallel/ep.py also
    exchanges the E per-expert counts (int64) per layer, negligible beside the rows."""
    if ep <= 1 or not m.moe.enabled:
        return 0.0
    rows = seq_len * micro_batch * m.moe.top_k * m.n_embd * compute_bytes
    per_layer = 4 + (2 if recompute else 0)
    sparse = len(m.moe.sparse_layers(m.n_layer))
    return micro_batches * sparse * per_layer * rows * (ep - 1) / ep

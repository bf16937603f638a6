"""Per-GPU training memory as small pure functions (all sizes in bytes), used by framework.plan.

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


GPUS: dict[str, Gpu] = {
    "h100": Gpu("NVIDIA H100 80GB HBM3", 80, True),
    "h100-pcie": Gpu("NVIDIA H100 PCIe", 80, True),
    "h100-nvl": Gpu("NVIDIA H100 NVL", 94, True),
    "h200": Gpu("NVIDIA H200", 141, True),
    "gh200": Gpu("NVIDIA GH200 480GB", 96, True),
    "b200": Gpu("NVIDIA B200", 180, True),
    "a100": Gpu("NVIDIA A100-SXM4-80GB", 80, False),
    "a100-40gb": Gpu("NVIDIA A100-SXM4-40GB", 40, False),
    "l40s": Gpu("NVIDIA L40S", 48, False),  # sm_89: has fp8 units, but our fp8 path needs sm_90
    "a10g": Gpu("NVIDIA A10G", 24, False),
    "l4": Gpu("NVIDIA L4", 24, False),
    "v100": Gpu("Tesla V100-SXM2-32GB", 32, False),
}

DEEPSPEED_STRATEGIES = ("zero1", "zero2", "zero3")
AC_MODES = ("none", "selective", "full")


# -- model state ---------------------------------------------------------------------------------


def block_matrix_params(m: ModelConfig) -> int:
    """Weights of the block linear layers (q, k, v, o and the MLP): what tensor parallel splits.
    Embeddings, the output head, norms and biases stay whole on every tp rank."""
    C, F = m.n_embd, m.ffn_dim
    kv = m.kv_heads * m.head_dim
    attn = 2 * C * C + 2 * C * kv  # wq, wo (C x C); wk, wv (C x kv)
    mlp = (3 if m.style == "llama" else 2) * C * F
    return m.n_layer * (attn + mlp)


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


def model_state_bytes(n_local: float, sb: StateBytes, shards: Shards) -> dict[str, float]:
    """Per-GPU weights, gradients and optimizer state for n_local parameters per tp rank."""
    return {
        "params": n_local * sb.param / shards.params,
        "grads": n_local * sb.grad / shards.grads,
        "optimizer": n_local * sb.optimizer / shards.optimizer,
    }


def block_params_per_tp_rank(m: ModelConfig, tp: int) -> float:
    """Parameters of one transformer block on one tensor-parallel rank (norms and biases whole)."""
    matrices = block_matrix_params(m)
    return (matrices / tp + num_params(m, non_embedding=True) - matrices) / m.n_layer


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
) -> float:
    """Weights in the compute dtype held during a step, beside the model state.

    ZeRO-3 / FSDP: unsharded weights of two blocks (the one computing and the prefetched next),
    one block's gradients before reduce-scatter, and the embeddings / head in the root unit,
    gathered for the whole step; FSDP with reshard_after_forward=False keeps every gathered
    weight from forward to backward. Autocast over fp32 weights (single, ddp, tp): its cached
    16-bit cast of every matrix (blocks and output head) lives until backward.
    """
    a = 4 if precision == "fp32" else 2
    if strategy in ("zero3", "fsdp", "tp_fsdp"):
        block = block_params_per_tp_rank(m, tp)
        if strategy != "zero3" and not reshard_after_forward:
            return (params_per_tp_rank(m, tp) + block) * a
        embeddings = num_params(m) - num_params(m, non_embedding=True)
        return (3 * block + embeddings) * a
    if precision != "fp32" and strategy in ("single", "ddp", "tp"):
        return (block_matrix_params(m) / tp + m.vocab_size * m.n_embd) * a
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
    return tokens * (replicated / sp + qkv_out + lse + hidden)


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
) -> float:
    """Peak activation bytes of one micro-batch on one GPU: every block's saved tensors, one
    block's recompute under full checkpointing, the final norm, and the loss."""
    args = (tp, sequence_parallel, compute_bytes, stream)
    layers = m.n_layer * layer_activation_bytes(m, seq_len, micro_batch, mode, *args)
    if mode == "full":
        layers += recompute_bytes(m, seq_len, micro_batch, *args)
    # The final norm keeps its input (stream) and hands the head its output (compute dtype).
    final_norm = seq_len * micro_batch * m.n_embd * ((stream or compute_bytes) + compute_bytes)
    return layers + final_norm + logits_bytes(m, seq_len, micro_batch)


# -- time ----------------------------------------------------------------------------------------


def step_time_s(
    flops_per_token: float, tokens_per_step: int, world_size: int, peak: float, mfu: float
) -> float:
    """Seconds per optimizer step when every GPU runs at `mfu` of its dense peak (FLOP/s)."""
    return flops_per_token * tokens_per_step / (world_size * peak * mfu)

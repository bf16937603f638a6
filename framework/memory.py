"""Per-GPU training memory as small pure functions (all sizes in bytes), used by framework.plan.

No tensors, no devices: everything is counted from the model config. The accounting, per GPU:

- model state (Rajbhandari et al. 2020, "ZeRO", section 3.1): weights, gradients and AdamW
  state (fp32 m and v, plus an fp32 master copy where the weights themselves are 16-bit),
  divided by the tensor-parallel degree for the block matrices and by the data-parallel degree
  for whatever the strategy shards;
- gathered buffers of ZeRO-3 / FSDP: the unsharded weights of the block being computed plus
  the prefetched next one, and the unsharded gradients of one block before reduce-scatter;
- activations of one micro-batch: Korthikanti et al. 2022 ("Reducing Activation Recomputation
  in Large Transformer Models", section 4) per-layer bytes, generalised to our blocks (GQA,
  SwiGLU, any FFN width), divided by tp under sequence parallel; plus the logits.

Left out (covered by the head-room in `FIT_FRACTION`): the CUDA context, NCCL buffers, DDP
gradient buckets, allocator fragmentation and the transient gradients of activations.
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
AC_MODES = ("none", "full", "selective")


# -- model state ---------------------------------------------------------------------------------


def block_matrix_params(m: ModelConfig) -> int:
    """Weights of the block linear layers (q, k, v, o and the MLP): what tensor parallel splits.
    Embeddings, the output head, norms and biases stay whole on every tp rank."""
    C, F = m.n_embd, m.ffn_dim
    kv = m.kv_heads * m.head_dim
    attn = 2 * C * C + 2 * C * kv  # wq, wo (C x C); wk, wv (C x kv)
    mlp = (3 if m.style == "llama" else 2) * C * F
    return m.n_layer * (attn + mlp)


def params_per_tp_rank(m: ModelConfig, tp: int) -> float:
    """Parameters one tensor-parallel rank holds before any data-parallel sharding."""
    matrices = block_matrix_params(m)
    return matrices / tp + (num_params(m) - matrices)


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
    if strategy in ("single", "ddp", "tp"):
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


def gathered_bytes(
    m: ModelConfig, tp: int, strategy: str, compute_bytes: int, reshard_after_forward: bool = True
) -> float:
    """Unsharded buffers of ZeRO-3 / FSDP in the compute dtype: the weights of two blocks (the
    one computing and the prefetched next), one block's gradients before reduce-scatter, and the
    embeddings / head, which sit in the root unit and stay gathered for the whole step. FSDP with
    reshard_after_forward=False keeps every gathered weight from forward to backward."""
    if strategy not in ("zero3", "fsdp", "tp_fsdp"):
        return 0.0
    block = block_params_per_tp_rank(m, tp)
    if strategy != "zero3" and not reshard_after_forward:
        return (params_per_tp_rank(m, tp) + block) * compute_bytes
    embeddings = num_params(m) - num_params(m, non_embedding=True)
    return (3 * block + embeddings) * compute_bytes


# -- activations ---------------------------------------------------------------------------------


def layer_activation_bytes(
    m: ModelConfig,
    seq_len: int,
    micro_batch: int,
    mode: str,
    tp: int = 1,
    sequence_parallel: bool = True,
    compute_bytes: int = 2,
) -> float:
    """Bytes one transformer block keeps for backward for one micro-batch (B sequences of T).

    Korthikanti et al. 2022 count sbh(34 + 5as/h) per layer with 16-bit activations. Our
    attention is SDPA (flash / memory-efficient kernels), which never stores the (T x T) scores:
    it recomputes them in backward, so the 5as/h term becomes the softmax log-sum-exp (fp32,
    per head and token). Counted in elements of s*b (tokens):
      replicated over tp unless sequence parallel: block input, attention-norm output,
        MLP-norm input (the residual) and output: 4h; dropout masks (1 byte): 2h if dropout
      split over tp: q, k, v (h + 2 kv), SDPA output (h), MLP hidden (GeLU: fc out and GeLU
        out, 2f; SwiGLU: gate, up, silu(gate), product, 4f)
    which is Korthikanti's 34h for GPT-2 shapes with dropout (h=C, kv=h, f=4h).

    mode: none keeps all of it; selective (op-level, as torchtitan's 'op' policy) keeps the
    matmul and SDPA outputs and recomputes norms and the GeLU / SiLU outputs; full keeps only
    the block input (the recompute of one block at a time is `recompute_bytes`).
    """
    if mode not in AC_MODES:
        raise ValueError(f"activation checkpointing mode {mode!r} is not one of {AC_MODES}")
    tokens = seq_len * micro_batch
    C, F, a = m.n_embd, m.ffn_dim, compute_bytes
    kv = m.kv_heads * m.head_dim
    llama = m.style == "llama"
    sp = tp if sequence_parallel else 1  # divisor of the tensors sequence parallel splits
    if mode == "full":
        return tokens * C * a / sp

    masks = 2 * C * 1 if m.dropout > 0 else 0  # bytes per token
    lse = m.n_head * 4 / tp  # fp32 log-sum-exp per head, bytes per token
    qkv_out = (C + 2 * kv + C) * a / tp  # q, k, v and the SDPA output
    block_input, attn_norm_out, mlp_norm_in, mlp_norm_out = C, C, C, C
    if mode == "none":
        replicated = (block_input + attn_norm_out + mlp_norm_in + mlp_norm_out) * a + masks
        hidden = (4 if llama else 2) * F * a / tp
    else:  # selective: norm outputs and the activation function's outputs are recomputed
        replicated = (block_input + mlp_norm_in) * a + masks
        hidden = (2 if llama else 1) * F * a / tp  # fc out (GeLU); gate and up (SwiGLU)
    return tokens * (replicated / sp + qkv_out + lse + hidden)


def recompute_bytes(
    m: ModelConfig, seq_len: int, micro_batch: int, tp: int, sequence_parallel: bool, compute_bytes: int
) -> float:
    """Full checkpointing rebuilds one block's activations at a time in backward."""
    return layer_activation_bytes(m, seq_len, micro_batch, "none", tp, sequence_parallel, compute_bytes)


def logits_bytes(m: ModelConfig, seq_len: int, micro_batch: int, compute_bytes: int = 2) -> float:
    """The output head's logits (compute dtype), their fp32 copy for the loss (GPT.forward calls
    .float(); a no-op in fp32) and the fp32 log-softmax cross-entropy keeps: (B, T, V) each.
    The head is not split by tensor parallel in this plan."""
    per_logit = compute_bytes + (4 if compute_bytes != 4 else 0) + 4
    return seq_len * micro_batch * m.vocab_size * per_logit


def activation_bytes(
    m: ModelConfig,
    seq_len: int,
    micro_batch: int,
    mode: str,
    tp: int = 1,
    sequence_parallel: bool = True,
    compute_bytes: int = 2,
) -> float:
    """Peak activation bytes of one micro-batch on one GPU: every block's saved tensors, one
    block's recompute under full checkpointing, and the logits."""
    layers = m.n_layer * layer_activation_bytes(
        m, seq_len, micro_batch, mode, tp, sequence_parallel, compute_bytes
    )
    if mode == "full":
        layers += recompute_bytes(m, seq_len, micro_batch, tp, sequence_parallel, compute_bytes)
    final_norm = 2 * seq_len * micro_batch * m.n_embd * compute_bytes  # its input and output
    return layers + final_norm + logits_bytes(m, seq_len, micro_batch, compute_bytes)


# -- time ----------------------------------------------------------------------------------------


def step_time_s(
    flops_per_token: float, tokens_per_step: int, world_size: int, peak: float, mfu: float
) -> float:
    """Seconds per optimizer step when every GPU runs at `mfu` of its dense peak (FLOP/s)."""
    return flops_per_token * tokens_per_step / (world_size * peak * mfu)

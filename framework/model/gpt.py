"""A decoder-only GPT on one device: GPT-2 style (learned positions, LayerNorm, GELU, tied
embeddings) or Llama style (RoPE, RMSNorm, SwiGLU, untied), chosen by `ModelConfig.style`.

Nothing here knows about process groups: parallelism is applied to this module from outside
(framework/parallel). Build big flavors on the `meta` device, then `to_empty` + `init_weights`.
Shapes: B batch, T time, C = n_embd, nh heads, nkv kv-heads, hs head size, V vocab.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from framework.errors import ConfigError
from framework.model.attention import KERNELS, doc_positions, sdpa_attention
from framework.model.moe import MoE, MoEConfig
from framework.model.rope import inv_freq_and_scale, scaling_errors


class ModelShapeError(ConfigError):
    """A model config that cannot be built; the message names the keys."""


@dataclass
class ModelConfig:
    name: str = "debug"
    """Flavor name (the file under conf/model/)."""
    style: str = "gpt2"
    """'gpt2' (learned positions, LayerNorm, GELU, tied) or 'llama' (RoPE, RMSNorm, SwiGLU)."""
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int | None = None
    """Key/value heads for grouped-query attention; None means n_head (plain multi-head)."""
    n_embd: int = 64
    # Any, not int | str: OmegaConf rejects that union in some supported versions. An int or
    # "auto" (the data's vocabulary rounded up to 64, resolved at start-up by
    # framework.data.vocab before any model is built); validate() refuses anything else.
    vocab_size: Any = 257
    """Embedding rows; may exceed the tokenizer's vocabulary (padding), never fall short of it;
    'auto': from the data's manifests, rounded up to a multiple of 64."""
    block_size: int = 256
    """Longest sequence the model accepts (size of the position table / RoPE cache)."""
    ffn_hidden: int | None = None
    """MLP hidden width; None: 4*n_embd (gpt2) or 2/3*4*n_embd rounded up to multiple_of (llama)."""
    multiple_of: int = 256
    dropout: float = 0.0
    bias: bool = True
    """Biases in linear layers and LayerNorm (GPT-2: true; Llama: false)."""
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: str = "none"
    """none | linear | llama3 | yarn: RoPE scaling for a longer context (style=llama only)."""
    rope_factor: float = 1.0
    """linear / llama3 / yarn: the context extension factor (e.g. 4 for 2k -> 8k)."""
    rope_original_max_position: int | None = None
    """llama3 / yarn: the context length the model was pretrained at."""
    rope_low_freq_factor: float = 1.0
    """llama3: wavelengths above original/low_freq_factor are fully scaled."""
    rope_high_freq_factor: float = 4.0
    """llama3: wavelengths below original/high_freq_factor are kept."""
    rope_beta_fast: float = 32.0
    """yarn: dimensions turning more often than this over the original context are kept."""
    rope_beta_slow: float = 1.0
    """yarn: dimensions turning less often than this are fully interpolated."""
    rope_attention_factor: float | None = None
    """yarn: factor on cos/sin (attention temperature); None: 0.1 ln(rope_factor) + 1."""
    init_std: float = 0.02
    init_from: str | None = None
    """A local Hugging Face GPT-2/Llama directory whose weights initialise the model."""
    num_labels: int = 0
    """0: a language model (output head of vocab_size rows). >0: a sequence classifier, the
    output head `lm_head` has num_labels rows (HF's `score`, no bias); task=classify sets it."""
    qk_norm: bool = False
    """RMSNorm over the whole query and key projections before RoPE (OLMoE, OLMo-2)."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture of experts (framework/model/moe.py); num_experts=0: dense."""

    def __post_init__(self):
        if isinstance(self.moe, dict):  # ModelConfig(**saved_config["model"]) of a checkpoint
            self.moe = MoEConfig(**self.moe)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        if self.style == "gpt2":
            return 4 * self.n_embd
        hidden = int(2 * 4 * self.n_embd / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def expert_dim(self) -> int:
        """Each routed expert's MLP width (model.moe.expert_hidden, default the dense width)."""
        return self.moe.expert_hidden or self.ffn_dim

    @property
    def moe_shape(self) -> dict | None:
        """The keys that shape the sparse blocks' parameters (None: dense), for checkpoints."""
        if not self.moe.enabled:
            return None
        m = self.moe
        return {
            "num_experts": m.num_experts,
            "every": m.every,
            "expert_hidden": self.expert_dim,
            "shared_experts": m.shared_experts,
        }

    def validate(self) -> None:
        """Raise ModelShapeError naming every impossible key (never a bare assert)."""
        errors = []
        if self.style not in ("gpt2", "llama"):
            errors.append(f"model.style={self.style!r} must be 'gpt2' or 'llama'")
        sizes = ["n_layer", "n_head", "n_embd", "block_size"]
        if not isinstance(self.vocab_size, int) or isinstance(self.vocab_size, bool):
            errors.append(
                f"model.vocab_size={self.vocab_size!r} must be an int (or 'auto', resolved from the "
                "data at start-up by train and plan)"
            )
        else:
            sizes.append("vocab_size")
        for key in sizes:
            if getattr(self, key) <= 0:
                errors.append(f"model.{key}={getattr(self, key)} must be > 0")
        if self.n_head > 0 and self.n_embd % self.n_head:
            errors.append(f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}")
        if self.n_head > 0 and self.kv_heads > 0 and self.n_head % self.kv_heads:
            errors.append(
                f"model.n_head={self.n_head} is not divisible by model.n_kv_head={self.kv_heads}"
            )
        if self.style == "llama" and self.n_head > 0 and (self.n_embd // self.n_head) % 2:
            errors.append(f"RoPE needs an even head size; n_embd/n_head={self.n_embd // self.n_head}")
        if self.num_labels < 0:
            errors.append(f"model.num_labels={self.num_labels} must be >= 0")
        if self.num_labels and self.tie_embeddings:
            errors.append(
                f"model.num_labels={self.num_labels} (a classifier head) needs model.tie_embeddings=false: "
                "its head cannot share the token embedding"
            )
        if not 0.0 <= self.dropout < 1.0:
            errors.append(f"model.dropout={self.dropout} must be in [0, 1)")
        errors += self.moe.errors(self.n_layer)
        errors += scaling_errors(self)
        if errors:
            raise ModelShapeError("; ".join(errors))


def num_params(cfg: ModelConfig, non_embedding: bool = False, active: bool = False) -> int:
    """Parameter count from the config alone (no tensors), as the model builds it.

    non_embedding=True leaves out token and position embeddings (and an untied output head),
    which is the N of the 6N FLOPs-per-token formula. active=True counts what one token goes
    through: in a sparse block the router, top_k routed experts and the shared experts, not
    the other num_experts - top_k (equal to the total for a dense model).
    """
    C, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    kv = cfg.kv_heads * cfg.head_dim
    b = 1 if cfg.bias else 0
    attn = C * C + 2 * C * kv + C * C + b * (C + 2 * kv + C)  # q, k, v, o
    if cfg.qk_norm:
        attn += C + kv

    def mlp(width: int) -> int:
        if cfg.style == "gpt2":
            return 2 * C * width + b * (width + C)
        return 3 * C * width + b * (2 * width + C)

    norm = 2 * C if cfg.style == "gpt2" and cfg.bias else C
    m = cfg.moe
    shared = mlp(cfg.expert_dim * m.shared_experts) if m.shared_experts else 0
    routed = (m.top_k if active else m.num_experts) * mlp(cfg.expert_dim)
    sparse = m.num_experts * C + routed + shared  # router, experts, shared experts
    n_sparse = len(m.sparse_layers(L))
    blocks = L * (attn + 2 * norm) + (L - n_sparse) * mlp(cfg.ffn_dim) + n_sparse * sparse
    blocks += norm  # the final norm
    embed = V * C + (cfg.block_size * C if cfg.style == "gpt2" else 0)
    head = 0 if cfg.tie_embeddings else (cfg.num_labels or V) * C
    return blocks if non_embedding else blocks + embed + head


class RMSNorm(nn.Module):
    # nn.RMSNorm would do, but computing in fp32 and casting back matches Llama's reference
    # numerics under bf16 autocast, which the HF parity test relies on.
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")
"""Name parts added by the activation checkpointing, torch.compile and FSDP1 wrappers."""


def holds_tied_pair(model: nn.Module) -> bool:
    """True when `model` ties its output head to its token embedding and holds both (a pipeline
    stage may hold one of them: framework/parallel/pp.py)."""
    return model.cfg.tie_embeddings and model.tok_emb is not None and model.lm_head is not None


def canonical_name(name: str) -> str:
    """A parameter's name in the plain model, whatever wrappers the parallel code added."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def param_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from (trainer seed, parameter name): stable across processes and
    Python runs (not `hash()`, which is salted per process)."""
    digest = hashlib.blake2b(f"{seed}/{canonical_name(name)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def initial_value(
    cfg: ModelConfig,
    name: str,
    shape: torch.Size | tuple[int, ...],
    seed: int | None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The whole initial tensor of parameter `name` (wrapper prefixes such as activation
    checkpointing's are ignored): Normal(0, init_std) weights, zero biases, unit norms; the
    residual output projections scaled by 1/sqrt(2 * n_layer) as in GPT-2.

    With an int seed the values come from a CPU generator seeded by (seed, name) alone:
    the same on any device count, rank or strategy, and on CPU because CUDA's generator
    draws different numbers for the same seed. A sharding caller builds one parameter at a
    time and keeps its slice (host peak: the largest parameter)."""
    name = canonical_name(name)
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype, device=device)
    if len(shape) == 1:  # norm weights (the stacked expert biases end in "bias": zeros)
        return torch.ones(shape, dtype=dtype, device=device)
    std = cfg.init_std
    # residual output projections: attention's, the dense MLP's, a shared expert's and the
    # routed experts' (the whole (E, C, H) tensor, drawn at once: every expert's slice is the
    # same however expert parallelism later splits dim 0)
    if name.endswith(("attn.wo.weight", "w2.weight", "experts.w2")):
        std = std / math.sqrt(2 * cfg.n_layer)
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed(param_seed(seed, name))
        dtype, device = torch.float32, "cpu"
    return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=generator)


def rope_cache(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (block_size, head_dim) in the rotate-half layout, scaled as
    model.rope_scaling says (framework/model/rope.py)."""
    inv_freq, scale = inv_freq_and_scale(cfg)
    t = torch.arange(cfg.block_size, device=device).float()
    freqs = torch.outer(t, inv_freq.to(device))  # (T, hs/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, hs)
    if scale == 1.0:
        return emb.cos(), emb.sin()
    return emb.cos() * scale, emb.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, nh, T, hs); cos/sin: (T, hs), or (B, 1, T, hs) for per-token positions
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        kv_dim = self.n_kv_head * self.head_dim
        self.wq = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.wk = nn.Linear(cfg.n_embd, kv_dim, bias=cfg.bias)
        self.wv = nn.Linear(cfg.n_embd, kv_dim, bias=cfg.bias)
        self.wo = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.rope = cfg.style == "llama"
        # OLMoE's QK-norm: over the whole projection (all heads at once), not per head
        self.q_norm = RMSNorm(cfg.n_embd, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(kv_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        # (q, k, v, mask, dropout_p) -> y: the kernel GPT.use_attention chose; context
        # parallelism wraps it from outside (framework/parallel/cp.py)
        self.core = sdpa_attention

    def forward(self, x, rope=None, attn_mask=None):
        """x (B, T, C); rope: (cos, sin), either tables (>= T, hs) of positions 0.. (their first
        T rows apply) or (B, 1, T, hs) for these T positions; attn_mask: what the core takes
        (None: plain causal attention)."""
        B, T, _ = x.shape
        # -1 instead of n_head: under tensor parallel each rank holds a slice of the heads.
        q = self.q_norm(self.wq(x)).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_norm(self.wk(x)).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.wv(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if self.rope:
            cos, sin = rope
            if cos.dim() == 2:  # positions 0..T-1
                cos, sin = cos[:T], sin[:T]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = self.core(q, k, v, attn_mask, self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.resid_dropout(self.wo(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, hidden: int | None = None):
        super().__init__()
        self.llama = cfg.style == "llama"
        hidden = hidden or cfg.ffn_dim
        self.w1 = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)  # gpt2: fc; llama: gate
        self.w2 = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)  # down projection
        self.w3 = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias) if self.llama else None  # up
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        if self.llama:
            h = F.silu(self.w1(x)) * self.w3(x)
        else:
            h = F.gelu(self.w1(x), approximate="tanh")  # GPT-2's "gelu_new"
        return self.dropout(self.w2(h))


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.style == "llama":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def make_moe(cfg: ModelConfig) -> MoE:
    """A sparse MLP in the model's MLP style; its shared experts are one dense MLP."""
    m = cfg.moe
    shared = MLP(cfg, cfg.expert_dim * m.shared_experts) if m.shared_experts else None
    swiglu = cfg.style == "llama"
    return MoE(m, cfg.n_embd, cfg.expert_dim, swiglu, cfg.bias, cfg.dropout, shared)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, sparse: bool = False):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = make_moe(cfg) if sparse else MLP(cfg)

    def forward(self, x, rope=None, attn_mask=None):
        x = x + self.attn(self.attn_norm(x), rope, attn_mask)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, init: bool = True):
        """init=False leaves the weights to the caller (ZeRO-3's partitioned construction; a
        meta-device build is never initialised here)."""
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.style == "gpt2" else None
        self.drop = nn.Dropout(cfg.dropout)
        # A ModuleDict keyed by index keeps FQNs stable when parallel code wraps blocks.
        self.blocks = nn.ModuleDict(
            {str(i): Block(cfg, cfg.moe.is_sparse(i)) for i in range(cfg.n_layer)}
        )
        # the sparse layers, whose aux terms forward adds (a tuple: not registered twice)
        self.moe_layers = tuple(b.mlp for b in self.blocks.values() if isinstance(b.mlp, MoE))
        self.norm = make_norm(cfg)
        # a classifier (num_labels > 0) scores every position like an LM head does; the task
        # trains and reads only the last text token's row
        self.lm_head = nn.Linear(cfg.n_embd, cfg.num_labels or cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.style == "llama":
            cos, sin = rope_cache(cfg)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.doc_mask = KERNELS["sdpa"][0]  # doc_ids -> the mask self.blocks' cores take
        if init and self.tok_emb.weight.device.type != "meta":
            self.init_weights()

    def use_attention(self, kernel: str) -> None:
        """Choose the document-mask kernel (framework.model.attention.KERNELS: sdpa | flex) of
        every block; chosen once at build time (attention.kernel_for picks one per device)."""
        self.doc_mask, core = KERNELS[kernel]
        for block in self.blocks.values():
            block.attn.core = core

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Write initial values into this (plain, materialised) model in place.

        seed=None draws from the global RNG in parameter order (the classic `manual_seed(s);
        GPT(cfg)`). seed=int: every parameter from its own generator (`initial_value`), so the
        values do not depend on how a parallel strategy later splits the model. Also (re)builds
        the RoPE cache, which `to_empty` leaves uninitialised after a meta-device build."""
        for name, p in self.named_parameters():
            if seed is None:
                p.copy_(initial_value(self.cfg, name, p.shape, None, dtype=p.dtype, device=p.device))
            else:
                p.copy_(initial_value(self.cfg, name, p.shape, seed))
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Non-persistent buffers (the RoPE tables) computed on their device."""
        if self.cfg.style == "llama":
            cos, sin = rope_cache(self.cfg, device=self.rope_cos.device)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, V) (V: num_labels for a classifier), or the mean
        cross-entropy if targets (B, T) are given (ignore_index -100).

        doc_ids (B, S) optional: each token's document within its window (0, 1, ...); attention
        stays inside a document, and positions restart at each document start. S is T, except
        under context parallelism: idx is then one chunk of an S-token sequence, doc_ids cover
        the whole sequence (attention sees all S positions after an all-to-all) and the
        chunk's `positions` are given.
        positions (B, T) optional: each token's position (default: from doc_ids, else 0..T-1).

        A pipeline stage (framework/parallel/pp.py) is this model with the modules it does not
        own set to None: without `tok_emb` (every stage but the first) `idx` is the previous
        stage's hidden states (B, T, C), embedding and its dropout already applied; without
        `lm_head` (every stage but the last) the hidden states (B, T, C) are returned and
        `targets` is ignored. Under sequence parallel T is this rank's slice of the sequence.

        With sparse blocks the returned loss has the VALUE of the mean cross-entropy (what
        metrics.jsonl's `loss` and `val_loss` show, comparable with a dense model's) and the
        GRADIENT of the training objective
            cross-entropy + mean over sparse blocks of (aux_loss_coef * aux + z_loss_coef * z)
        by adding each layer's term as `t - t.detach()` (exactly 0 in value). The aux and z
        values go to metrics.jsonl separately (moe/aux_loss, moe/z_loss). A NaN/Inf term still
        makes the loss NaN, so the non-finite guard sees it."""
        if positions is None and doc_ids is not None:
            positions = doc_positions(doc_ids)
        if self.tok_emb is not None:
            T = idx.size(1)
            if T > self.cfg.block_size:
                raise ValueError(f"sequence length {T} exceeds model.block_size={self.cfg.block_size}")
            x = self.tok_emb(idx)  # (B, T, C)
            if self.pos_emb is not None:
                where = torch.arange(T, device=idx.device)[None] if positions is None else positions
                x = x + self.pos_emb(where)  # (1 or B, T, C)
            x = self.drop(x)
        else:
            x = idx  # (B, T, C) from the previous pipeline stage
        rope = None
        if self.cfg.style == "llama":
            if positions is None:  # the whole table: each attention takes its first T rows
                rope = (self.rope_cos, self.rope_sin)  # (block_size, hs)
            else:
                rope = (self.rope_cos[positions][:, None], self.rope_sin[positions][:, None])
        mask = None if doc_ids is None else self.doc_mask(doc_ids)
        for block in self.blocks.values():
            x = block(x, rope, mask)
        if self.lm_head is None:
            return x
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        if targets is None:
            return logits
        loss = F.cross_entropy(
            logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100
        )
        for layer in self.moe_layers:
            term = layer.aux_term / len(self.moe_layers)
            loss = loss + (term - term.detach())
            layer.aux_term = None  # consumed: do not keep its graph alive until the next step
        return loss

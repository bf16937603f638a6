"""A decoder-only GPT on one device: GPT-2 style (learned positions, LayerNorm, GELU, tied
embeddings) or Llama style (RoPE, RMSNorm, SwiGLU, untied), chosen by `ModelConfig.style`.

Nothing here knows about process groups: parallelism is applied to this module from outside
(framework/parallel). Build big flavors on the `meta` device, then `to_empty` + `init_weights`.
Shapes: B batch, T time, C = n_embd, nh heads, nkv kv-heads, hs head size, V vocab.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from framework.errors import ConfigErrorBase


class ModelShapeError(ConfigErrorBase, ValueError):
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
    init_std: float = 0.02
    init_from: str | None = None
    """A local Hugging Face GPT-2/Llama directory whose weights initialise the model."""
    num_labels: int = 0
    """0: a language model (output head of vocab_size rows). >0: a sequence classifier, the
    output head `lm_head` has num_labels rows (HF's `score`, no bias); task=classify sets it."""

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
        if errors:
            raise ModelShapeError("; ".join(errors))


def num_params(cfg: ModelConfig, non_embedding: bool = False) -> int:
    """Parameter count from the config alone (no tensors), as the model builds it.

    non_embedding=True leaves out token and position embeddings (and an untied output head),
    which is the N of the 6N FLOPs-per-token formula.
    """
    C, L, V, F_ = cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.ffn_dim
    kv = cfg.kv_heads * cfg.head_dim
    b = 1 if cfg.bias else 0
    attn = C * C + 2 * C * kv + C * C + b * (C + 2 * kv + C)  # q, k, v, o
    if cfg.style == "gpt2":
        mlp = 2 * C * F_ + b * (F_ + C)
        norm = 2 * C if cfg.bias else C
    else:
        mlp = 3 * C * F_ + b * (2 * F_ + C)
        norm = C
    blocks = L * (attn + mlp + 2 * norm) + norm  # + final norm
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
    if len(shape) == 1:  # norm weights
        return torch.ones(shape, dtype=dtype, device=device)
    std = cfg.init_std
    if name.endswith(("attn.wo.weight", "mlp.w2.weight")):
        std = std / math.sqrt(2 * cfg.n_layer)
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed(param_seed(seed, name))
        dtype, device = torch.float32, "cpu"
    return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=generator)


def rope_cache(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (block_size, head_dim) in the rotate-half layout."""
    hs = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hs, 2, device=device).float() / hs))
    t = torch.arange(cfg.block_size, device=device).float()
    freqs = torch.outer(t, inv_freq)  # (T, hs/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, hs)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, nh, T, hs); cos/sin: (T, hs)
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

    def forward(self, x, rope=None, attn_mask=None):
        B, T, _ = x.shape
        # -1 instead of n_head: under tensor parallel each rank holds a slice of the heads.
        q = self.wq(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.wk(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.wv(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if self.rope:
            cos, sin = rope
            q, k = apply_rope(q, cos[:T], sin[:T]), apply_rope(k, cos[:T], sin[:T])
        if k.size(1) != q.size(1):  # grouped-query attention: share each kv head
            k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
            v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=attn_mask is None,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.resid_dropout(self.wo(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.llama = cfg.style == "llama"
        hidden = cfg.ffn_dim
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


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)

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
        self.blocks = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layer)})
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
        if init and self.tok_emb.weight.device.type != "meta":
            self.init_weights()

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
    ) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, V) (V: num_labels for a classifier), or the mean
        cross-entropy if targets (B, T) are given (ignore_index -100). doc_ids (B, T) optional:
        attention stays inside a document.

        A pipeline stage (framework/parallel/pp.py) is this model with the modules it does not
        own set to None: without `tok_emb` (every stage but the first) `idx` is the previous
        stage's hidden states (B, T, C), embedding and its dropout already applied; without
        `lm_head` (every stage but the last) the hidden states (B, T, C) are returned and
        `targets` is ignored. Under sequence parallel T is this rank's slice of the sequence;
        the document mask is built from doc_ids, which always covers the whole sequence."""
        if self.tok_emb is not None:
            T = idx.size(1)
            if T > self.cfg.block_size:
                raise ValueError(f"sequence length {T} exceeds model.block_size={self.cfg.block_size}")
            x = self.tok_emb(idx)  # (B, T, C)
            if self.pos_emb is not None:
                x = x + self.pos_emb(torch.arange(T, device=idx.device))
            x = self.drop(x)
        else:
            x = idx  # (B, T, C) from the previous pipeline stage
        rope = (self.rope_cos, self.rope_sin) if self.cfg.style == "llama" else None
        mask = None
        if doc_ids is not None:
            T = doc_ids.size(1)
            causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
            same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
            mask = (causal & same_doc)[:, None]  # (B, 1, T, T)
        for block in self.blocks.values():
            x = block(x, rope, mask)
        if self.lm_head is None:
            return x
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        if targets is None:
            return logits
        return F.cross_entropy(
            logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100
        )

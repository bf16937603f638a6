"""Causal self-attention over packed windows, with or without document masking.

A packed window holds the end of one document and the starts of the next ones. With
`data.attend_across_documents=false` (the default) the loader gives each micro-batch `doc_ids`
(B, S): the index of every token's document within its window (0, 1, ...; non-decreasing);
attention then stays inside a document and positions restart at each document start
(`doc_positions`). A micro-batch whose windows each hold one document gets no doc_ids at all:
plain causal attention (`is_causal`, no mask), so long documents cost nothing extra.

Two pieces, both chosen once when the model is built (`GPT.use_attention`):
- a mask builder, called once per forward: doc_ids (B, S) -> whatever the kernel takes;
- a core-attention callable, called by every Attention module: (q, k, v, mask, dropout_p) -> y
  with q (B, nh, S, hs), k/v (B, nkv, S, hs) (grouped-query heads are repeated here), y like q.
  Context parallelism (framework/parallel/cp.py) wraps this callable from outside.

Kernels (`kernel_for` picks one; bench/doc_mask.py, figures in bench/RESULTS.md):
- "sdpa": SDPA with a dense boolean (B, 1, S, S) mask; works on every device. On CPU as fast as
  unmasked causal attention up to S = 512, but the mask costs S^2 and the kernel cannot skip
  the causal upper triangle: 1.24x at 1024, 1.67x at 2048, 2.2x at 4096 (debug model).
- "varlen": one causal SDPA call per document piece of every window (what varlen flash kernels
  do in one call; torch 2.13's nested-tensor SDPA has no causal kernel). Python overhead per
  piece (1.25x at 512), but only sum(len^2) work: the fastest on CPU from S = 1024 on (0.87x,
  0.74x, 0.56x of unmasked attention at 1024, 2048, 4096).
- "flex": FlexAttention with a block mask (blocks outside every document are skipped; no
  (S, S) tensor), compiled. For CUDA: torch 2.13 refuses FlexAttention's backward on CPU. It
  has no attention dropout, so a model with dropout > 0 keeps "sdpa".
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask
from torch.nn.attention.flex_attention import flex_attention as flex

MaskBuilder = Callable[[torch.Tensor], object]
CoreAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, object, float], torch.Tensor]


def doc_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, S) position of each token inside its document: 0 at each document start. A window's
    first token is position 0 even when its document began in the window before (the window
    is all the model sees of it)."""
    S = doc_ids.size(-1)
    index = torch.arange(S, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    # the index of the latest document start at or before each token
    first = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=-1).values
    return index - first


def dense_doc_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S) bool: query i may see key j iff j <= i and both are in one document."""
    S = doc_ids.size(-1)
    causal = torch.ones(S, S, dtype=torch.bool, device=doc_ids.device).tril()
    return (causal & (doc_ids[:, :, None] == doc_ids[:, None, :]))[:, None]


def repeat_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped-query attention: each of the nkv heads serves nh/nkv consecutive query heads."""
    if k.size(1) == q.size(1):
        return k, v
    n = q.size(1) // k.size(1)
    return k.repeat_interleave(n, dim=1), v.repeat_interleave(n, dim=1)


def sdpa_attention(q, k, v, mask, dropout_p: float) -> torch.Tensor:
    """SDPA, causal: mask None -> is_causal (flash kernels); else the dense (B, 1, S, S) mask."""
    k, v = repeat_kv(q, k, v)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None
    )


def doc_pieces(doc_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per window, the [start, end) of each document piece (one host read of the starts)."""
    S = doc_ids.size(-1)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    out = []
    for row in starts.tolist():
        cuts = [i for i, start in enumerate(row) if start] + [S]
        out.append(list(zip(cuts[:-1], cuts[1:])))
    return out


def varlen_attention(q, k, v, pieces, dropout_p: float) -> torch.Tensor:
    """Causal SDPA over each document piece of each window; pieces None: the whole window."""
    k, v = repeat_kv(q, k, v)
    if pieces is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    rows = []
    for b, row in enumerate(pieces):
        qb, kb, vb = q[b : b + 1], k[b : b + 1], v[b : b + 1]
        parts = [
            F.scaled_dot_product_attention(
                qb[:, :, s:e], kb[:, :, s:e], vb[:, :, s:e], dropout_p=dropout_p, is_causal=True
            )
            for s, e in row
        ]
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows)


def flex_block_mask(doc_ids: torch.Tensor):
    """A FlexAttention BlockMask of causal attention inside documents (CUDA)."""
    B, S = doc_ids.shape

    def same_doc_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    return create_block_mask(same_doc_causal, B, None, S, S, device=doc_ids.device)


_flex = None  # torch.compile(flex_attention), made on first use (compiling is what makes it fast)


def flex_attention(q, k, v, mask, dropout_p: float) -> torch.Tensor:
    """FlexAttention with a BlockMask; mask None: plain causal SDPA (flash)."""
    global _flex
    if mask is None:
        return sdpa_attention(q, k, v, None, dropout_p)
    if _flex is None:
        _flex = torch.compile(flex, dynamic=False)
    k, v = repeat_kv(q, k, v)
    return _flex(q, k, v, block_mask=mask)


KERNELS: dict[str, tuple[MaskBuilder, CoreAttention]] = {
    "sdpa": (dense_doc_mask, sdpa_attention),
    "varlen": (doc_pieces, varlen_attention),
    "flex": (flex_block_mask, flex_attention),
}
VARLEN_FROM_SEQ_LEN = 1024
"""On CPU, from this sequence length on the per-document loop beats the dense mask."""


def kernel_for(device_type: str, dropout: float, seq_len: int) -> str:
    """The document-mask kernel for a device and sequence length (bench/doc_mask.py): on CUDA
    flex (block-sparse, no (S, S) mask; not measured here: no GPU) unless attention dropout is
    on (FlexAttention has none); on CPU, where FlexAttention cannot train in torch 2.13, sdpa up
    to 512 tokens and varlen from 1024 on."""
    if device_type == "cuda":
        return "flex" if dropout == 0 else "sdpa"
    return "varlen" if seq_len >= VARLEN_FROM_SEQ_LEN else "sdpa"

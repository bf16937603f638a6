"""Context parallelism: the sequence of every micro-batch split over the cp ranks of one
data-parallel rank (strategy.cp), so that activations, the largest memory of long sequences,
are divided by cp.

`ulysses` (every backend; DeepSpeed-Ulysses' scheme): rank r holds the contiguous chunk r of
every sequence, (B, T/cp), through embeddings, norms, MLPs and the loss. Attention needs all
positions, so around it two all-to-alls exchange sequence for heads:
    q, k, v (B, nh, T/cp, hs)  --all-to-all-->  (B, nh/cp, T, hs)   all positions, nh/cp heads
    core attention over the whole sequence (causal; document mask built for all T positions)
    y (B, nh/cp, T, hs)        --all-to-all-->  (B, nh, T/cp, hs)   back to the sequence chunk
Every rank computes whole rows of attention for its heads, so contiguous chunks carry no causal
load imbalance. Grouped-query kv heads travel unrepeated (less traffic) when cp divides their
number; otherwise each is repeated just enough (lcm(nkv, cp) heads) to split evenly. This wraps
the model's core-attention callable from outside (`apply_ulysses`): the model stays a
single-device module. DeepSpeed ships the same exchange (`deepspeed.sequence.layer.
DistributedAttention`), but for [s, b, h, d] / [b, s, h, d] layouts (ours is (B, h, T, d) at that
point: transposes and copies) and on DeepSpeed's accelerator runtime, which every FSDP/DDP run
would then import; torch's autograd all-to-all (`torch.distributed.nn.functional`, works on
gloo and nccl) does it in a few lines.

`ring` (CUDA only): torch's experimental `context_parallel` (ring attention over DTensor) with
its load-balanced chunks; causal attention only (no document mask); not verified on a GPU here.

What the split keeps exact (`ContextSplit.split`): each chunk gets its tokens' absolute or
per-document positions from the whole sequence, the document ids of the whole sequence (the
mask is built after the all-to-all, for all positions), and, for masked losses (sft, classify),
a loss weight from its own trained-target count, so the step's loss is still the mean over the
global batch's trained targets. Gradients are averaged over dp x cp (FSDP shards over
dp_shard x cp; DDP reduces over that group): the mean of the cp ranks' gradients of their
chunk means is the gradient of the whole sequence's mean, since the all-to-all's backward
returns each rank's share of the other ranks' losses.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import replace

import torch
import torch.distributed as tdist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.nn.functional import all_to_all_single
from torch.distributed.tensor.experimental import context_parallel

from framework.data.loader import Batch
from framework.model.attention import CoreAttention, doc_positions


def _to_heads(x: torch.Tensor, group, cp: int) -> torch.Tensor:
    """(B, h, t, hs) all heads of this rank's chunk -> (B, h/cp, cp*t, hs) this rank's heads at
    every position: head block j goes to rank j, chunk j comes from it."""
    B, h, t, hs = x.shape
    send = x.reshape(B, cp, h // cp, t, hs).transpose(0, 1).contiguous()  # (cp, B, h/cp, t, hs)
    recv = all_to_all_single(torch.empty_like(send), send, group=group)  # [j]: rank j's chunk
    return recv.permute(1, 2, 0, 3, 4).reshape(B, h // cp, cp * t, hs)


def _to_sequence(y: torch.Tensor, group, cp: int) -> torch.Tensor:
    """The inverse: (B, h/cp, T, hs) -> (B, h, T/cp, hs)."""
    B, hc, T, hs = y.shape
    send = y.reshape(B, hc, cp, T // cp, hs).permute(2, 0, 1, 3, 4).contiguous()  # [j]: chunk j
    recv = all_to_all_single(torch.empty_like(send), send, group=group)  # [j]: rank j's heads
    return recv.transpose(0, 1).reshape(B, cp * hc, T // cp, hs)


def ulysses(core: CoreAttention, group, cp: int) -> CoreAttention:
    """`core` run over the whole sequence for nh/cp heads, between two all-to-alls."""

    def attention(q, k, v, mask, dropout_p: float) -> torch.Tensor:
        if k.size(1) % cp:  # repeat kv heads to lcm(nkv, cp): query groups stay aligned
            n = math.lcm(k.size(1), cp) // k.size(1)
            k, v = k.repeat_interleave(n, dim=1), v.repeat_interleave(n, dim=1)
        q, k, v = (_to_heads(x, group, cp) for x in (q, k, v))
        return _to_sequence(core(q, k, v, mask, dropout_p), group, cp)

    return attention


def apply_ulysses(model: nn.Module, mesh: DeviceMesh) -> None:
    """Wrap every block's core attention (in place, before activation checkpointing and
    compile wrap the blocks)."""
    group, cp = mesh.get_group(), mesh.size()
    for block in model.blocks.values():
        block.attn.core = ulysses(block.attn.core, group, cp)


def chunk_weight(batch: Batch, targets: torch.Tensor, cp: int) -> tuple[float | None, torch.Tensor]:
    """(loss weight, targets) of one chunk. The micro-batch weight w = n x accum x dp /
    trained_global (Batch.loss_weight) makes its mean over n trained targets count as their sum;
    a chunk's mean over its own n_c must count the same way after the cp-fold averaging of the
    gradients and of the reported loss: w_c = w x cp x n_c / n. A chunk without trained targets
    keeps weight 0 over valid dummy targets (its loss would be the NaN of a mean over nothing)."""
    if batch.loss_weight is None:  # pretraining: every target counts, chunks are equal
        return None, targets
    n = int((batch.targets != -100).sum())
    n_c = int((targets != -100).sum())
    if n == 0 or n_c == 0:
        return 0.0, targets if n == 0 else torch.zeros_like(targets)
    return batch.loss_weight * cp * n_c / n, targets


class ContextSplit:
    """This rank's chunk of every micro-batch (cp_method=ulysses): contiguous chunk `rank` of
    `size`, with positions and (whole-sequence) document ids; and sampling logits."""

    def __init__(self, mesh: DeviceMesh, multiple: int = 1):
        """multiple: the chunk length must also divide by this (tensor-parallel sequence
        parallel splits each chunk again)."""
        self.group, self.size, self.rank = mesh.get_group(), mesh.size(), mesh.get_local_rank()
        self.multiple = multiple

    def split(self, batch: Batch) -> Batch:
        B, T = batch.inputs.shape
        t = T // self.size
        if t * self.size != T:
            raise ValueError(f"sequence length {T} is not divisible by strategy.cp={self.size}")
        part = slice(self.rank * t, (self.rank + 1) * t)
        if batch.doc_ids is not None:
            positions = doc_positions(batch.doc_ids)[:, part]
        else:
            positions = torch.arange(T)[None, part].expand(B, t)
        weight, targets = chunk_weight(batch, batch.targets[:, part], self.size)
        return replace(
            batch, inputs=batch.inputs[:, part], targets=targets, positions=positions, loss_weight=weight
        )

    def context(self, *tensors: torch.Tensor):
        """Around one forward + backward of the micro-batch's device tensors."""
        return contextlib.nullcontext()

    @torch.no_grad()
    def logits(self, forward, idx: torch.Tensor) -> torch.Tensor:
        """Full (B, T, V) logits on every rank: the prompt right-padded to a multiple of
        cp x multiple (causal: earlier positions are unaffected), split, run, gathered."""
        B, T = idx.shape
        pad = -T % (self.size * self.multiple)
        if pad:
            idx = torch.nn.functional.pad(idx, (0, pad))
        t = idx.size(1) // self.size
        part = slice(self.rank * t, (self.rank + 1) * t)
        positions = torch.arange(idx.size(1), device=idx.device)[None, part].expand(B, t)
        local = forward(idx[:, part], positions).contiguous()  # (B, t, V)
        chunks = [torch.empty_like(local) for _ in range(self.size)]
        tdist.all_gather(chunks, local, group=self.group)
        return torch.cat(chunks, dim=1)[:, :T]


class RingContext:
    """cp_method=ring (CUDA): torch's `context_parallel` shards inputs, targets and positions
    in place along the sequence (load-balanced: rank r holds chunks r and 2cp-1-r) and runs SDPA
    as ring attention inside it. Unverified here (no GPU): tests/gpu/test_context_parallel.py."""

    def __init__(self, mesh: DeviceMesh):
        self.mesh, self.size = mesh, mesh.size()

    def split(self, batch: Batch) -> Batch:
        B, T = batch.inputs.shape
        if batch.doc_ids is not None:
            raise ValueError(
                "strategy.cp_method=ring runs causal attention only: set "
                "data.attend_across_documents=true or strategy.cp_method=ulysses"
            )
        if batch.loss_weight is not None:
            raise ValueError("strategy.cp_method=ring does not weight masked losses (sft, classify)")
        positions = torch.arange(T)[None].expand(B, T).contiguous()
        return replace(batch, positions=positions)

    def context(self, *tensors: torch.Tensor):
        """Shards the micro-batch's (B, T) device tensors in place along T."""
        tensors = list(tensors)
        return context_parallel(
            self.mesh,
            buffers=tensors,
            buffer_seq_dims=[1] * len(tensors),
            no_restore_buffers=set(tensors),
        )

    @torch.no_grad()
    def logits(self, forward, idx: torch.Tensor) -> torch.Tensor:
        """Sampling runs the whole sequence on every rank (plain SDPA outside the context)."""
        positions = torch.arange(idx.size(1), device=idx.device)[None].expand(idx.size(0), -1)
        return forward(idx, positions)


class WholeSequence:
    """No context parallelism: batches pass unchanged."""

    def __init__(self, multiple: int = 1):
        self.multiple = multiple

    def split(self, batch: Batch) -> Batch:
        return batch

    def context(self, *tensors: torch.Tensor):
        return contextlib.nullcontext()

    @torch.no_grad()
    def logits(self, forward, idx: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        pad = -T % self.multiple  # sequence parallel splits T over the TP ranks
        if pad:
            idx = torch.nn.functional.pad(idx, (0, pad))
        return forward(idx, None)[:, :T]

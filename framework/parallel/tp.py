"""Tensor parallel (Megatron-style) with sequence parallel, applied to the plain GPT through
DTensor's `parallelize_module`. Which module is split how is DATA: a plan per model style,
FQN pattern -> parallel style, read by one generic function.

Layout of the residual stream under sequence parallel (tp ranks, T divisible by tp):
  tok_emb (rows split)          -> x local (B, T/tp, C)   (reduce-scatter along T)
  attn_norm / mlp_norm / norm   -> run on the local sequence slice (no communication)
  attn / mlp input              -> all-gather along T to (B, T, C)
  wq wk wv / w1 w3 (colwise)    -> local heads / hidden slice
  wo / w2 (rowwise)             -> reduce-scatter back to (B, T/tp, C)
  lm_head (colwise, vocab rows) -> logits gathered to (B, T, V) on every rank
Without sequence parallel the residual stream is replicated and norms are plain modules.

Tensor parallel of our own model is done with torch.distributed APIs directly: Accelerate's
TP support targets Hugging Face models with a `tp_plan`; ours is not one.
"""

from __future__ import annotations

import fnmatch

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from framework.config import ConfigError
from framework.model.gpt import holds_tied_pair


def _block_plan(style: str, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """Plan for one transformer block, FQNs relative to the block."""
    seq = Shard(1) if sequence_parallel else Replicate()  # layout of the residual stream
    # rowwise outputs go back to the residual layout: reduce-scatter (SP) or all-reduce
    row = RowwiseParallel(output_layouts=seq)
    plan: dict[str, ParallelStyle] = {
        # (x, rope, attn_mask): only x is split; attention sees the whole sequence, and
        # GPT.forward made rope and the mask for the whole (replicated) sequence
        "attn": PrepareModuleInput(
            input_layouts=(seq, None, None),
            desired_input_layouts=(Replicate(), None, None),
            use_local_output=True,
        ),
        "attn.wq": ColwiseParallel(),
        "attn.wk": ColwiseParallel(),
        "attn.wv": ColwiseParallel(),
        "attn.wo": row,
        "mlp": PrepareModuleInput(
            input_layouts=(seq,), desired_input_layouts=(Replicate(),), use_local_output=True
        ),
        "mlp.w1": ColwiseParallel(),
        "mlp.w2": RowwiseParallel(output_layouts=seq),
    }
    if style == "llama":
        plan["mlp.w3"] = ColwiseParallel()
    if sequence_parallel:
        plan["attn_norm"] = SequenceParallel()
        plan["mlp_norm"] = SequenceParallel()
    return plan


def _root_plan(style: str, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """Plan for the modules outside the blocks."""
    seq = Shard(1) if sequence_parallel else Replicate()
    plan: dict[str, ParallelStyle] = {
        # vocabulary rows split; the lookup's partial sums are reduced into the residual layout
        "tok_emb": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq),
        # logits gathered over the vocabulary so the unchanged loss code sees (B, T, V)
        "lm_head": ColwiseParallel(input_layouts=seq, output_layouts=Replicate()),
    }
    if sequence_parallel:
        plan["norm"] = SequenceParallel()
        if style == "gpt2":
            # positions (1 or B, T) -> (1 or B, T, C) split along T, to add to the local
            # (B, T/tp, C) slice (positions restart per document: one row per sequence)
            plan["pos_emb"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    return plan


def tp_plan(style: str, n_layer: int, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """The whole plan as FQN (glob) -> style; `blocks.*` patterns apply to every block."""
    if style not in ("gpt2", "llama"):
        raise ConfigError(f"no tensor-parallel plan for model.style={style!r}")
    plan = _root_plan(style, sequence_parallel)
    for fqn, s in _block_plan(style, sequence_parallel).items():
        plan[f"blocks.*.{fqn}"] = s
    return plan


def apply_tp(model: nn.Module, mesh: DeviceMesh, sequence_parallel: bool) -> nn.Module:
    """Parallelize `model` in place over the 1-D `mesh` following its style's plan. Root modules
    the model sets to None (llama's pos_emb; the embedding or the norm and head of a pipeline
    stage, framework/parallel/pp.py) are skipped; any other entry that matches nothing is an
    error (a plan out of step with the model)."""
    cfg = model.cfg
    plan = tp_plan(cfg.style, cfg.n_layer, sequence_parallel)
    names = [n for n, _ in model.named_modules()]
    resolved: dict[str, ParallelStyle] = {}
    for pattern, style in plan.items():
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits and getattr(model, pattern.split(".")[0]) is not None:
            raise ConfigError(f"tensor-parallel plan entry {pattern!r} matches no module of the model")
        resolved.update({n: style for n in hits})
    # parents before children: PrepareModuleInput on `attn` and the colwise split of `attn.wq`
    # are independent hooks, so the order only has to be deterministic
    parallelize_module(model, mesh, dict(sorted(resolved.items())))
    if holds_tied_pair(model):
        # parallelize_module gave tok_emb and lm_head separate DTensor parameters; both are
        # split along the vocabulary (Shard(0)), so the tied weight stays one parameter.
        model.lm_head.weight = model.tok_emb.weight
    return model

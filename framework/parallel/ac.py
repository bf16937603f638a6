"""Activation checkpointing per transformer block (applied after TP, before compile/FSDP).

full:      keep only each block's input; recompute the whole block in backward.
selective: keep the outputs of the expensive ops (matmuls, attention) and recompute the cheap
           ones (norms, activations, dropout masks are replayed from saved RNG state):
           most of the memory saving for a fraction of the recompute.

The wrapper keeps parameter names readable by DCP (torch's state-dict helpers strip the
`_checkpoint_wrapped_module.` prefix), so checkpoints are interchangeable with and without AC.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from framework.config import ConfigError

_aten = torch.ops.aten
# ops whose outputs are saved under selective AC (everything else is recomputed)
SAVE_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten._grouped_mm.default,  # the experts of a mixture-of-experts layer
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    # expert parallelism's exchanges (framework/parallel/ep.py): keeping the received rows saves
    # repeating the all-to-all (communication, not compute) in backward
    torch.ops._c10d_functional.all_to_all_single.default,
}


def _selective_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_ac(model: nn.Module, mode: str) -> nn.Module:
    if mode == "none":
        return model
    if mode == "full":
        wrap = partial(checkpoint_wrapper, preserve_rng_state=True)
    elif mode == "selective":
        wrap = partial(
            checkpoint_wrapper,
            preserve_rng_state=True,
            context_fn=partial(create_selective_checkpoint_contexts, _selective_policy),
        )
    else:
        raise ConfigError(f"strategy.activation_checkpointing={mode!r} must be none|full|selective")
    for name, block in list(model.blocks.items()):
        model.blocks[name] = wrap(block)
    return model

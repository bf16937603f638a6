"""torch.compile per transformer block (after TP and AC, before FSDP/DDP).

Per block rather than the whole model: all blocks share one compiled graph (compile time does
not grow with depth), and FSDP's per-block hooks stay outside the graphs. `Module.compile()`
compiles in place, so parameter names (and checkpoints) do not change.
"""

from __future__ import annotations

from torch import nn


def apply_compile(model: nn.Module) -> nn.Module:
    for block in model.blocks.values():
        # not fullgraph: TP and AC hooks around the block may break the graph, which is fine
        block.compile()
    return model

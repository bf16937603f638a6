"""A minimal training loop over build_engine (no data pipeline, no checkpoint code): launched
under torchrun by the engine-level tests. Usage:

    torchrun --nproc_per_node 2 tests/distributed/engine_harness.py OUT.json key=value ...

Batches are random token ids drawn from a fixed seed per step (the same global batch for any
world size); each data-parallel rank takes its slice, as the real loader does. Writes the
dp-mean loss and grad norm per step (rank 0) to OUT.json.

FW_TEST_INJECT_INF=RANK:STEP puts an inf into that rank's local gradient shard before that
optimizer step (fp16 overflow on one rank only).

FW_TEST_LR_SCHEDULE=1 passes the scheduled LR (framework.optim.lr_at) to engine.step instead of
optim.lr, and records per step the LRs of the torch optimizer that applies the update (the
innermost one under DeepSpeed's wrappers) as "lr_applied".
"""

from __future__ import annotations

import json
import os
import sys

import torch
from hydra import compose, initialize_config_dir

from framework.config import CONF_DIR, grad_accum_steps, load, validate
from framework.data.loader import Batch
from framework.dist import init_distributed, teardown
from framework.model.gpt import GPT
from framework.optim import lr_at
from framework.parallel import build_engine


def global_batch(step: int, cfg) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    t = cfg.trainer
    return torch.randint(0, cfg.model.vocab_size, (t.global_batch_size, t.seq_len + 1), generator=g)


def main() -> None:
    out, overrides = sys.argv[1], sys.argv[2:]
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = load(compose("config", overrides=overrides))
    dist = init_distributed(cfg.trainer.device)
    try:
        validate(cfg, dist.world_size)
        torch.manual_seed(cfg.trainer.seed)
        model = GPT(cfg.model).to(dist.device)
        engine = build_engine(model, cfg, dist)
        accum = grad_accum_steps(cfg, engine.dp_size)
        per_rank = cfg.trainer.global_batch_size // engine.dp_size
        mb = cfg.trainer.micro_batch_size
        rows = []
        spec = os.environ.get("FW_TEST_INJECT_INF")
        inject = tuple(int(x) for x in spec.split(":")) if spec else None
        scheduled = os.environ.get("FW_TEST_LR_SCHEDULE") == "1"
        inner = getattr(engine, "optimizer", None) or engine.ds.optimizer
        while hasattr(inner, "optimizer"):  # DeepSpeed's ZeRO optimizer wraps torch's AdamW
            inner = inner.optimizer
        for step in range(1, cfg.trainer.max_steps + 1):
            data = global_batch(step, cfg)[engine.dp_rank * per_rank : (engine.dp_rank + 1) * per_rank]
            losses = []
            for i in range(accum):
                chunk = data[i * mb : (i + 1) * mb]
                losses.append(engine.forward_backward(Batch(chunk[:, :-1], chunk[:, 1:]), accum))
            if inject == (dist.rank, step):
                grad = next(iter(engine.plain_model().parameters())).grad
                (grad.to_local() if hasattr(grad, "to_local") else grad).fill_(float("inf"))
            loss = torch.stack(losses).mean()
            if dist.world_size > 1:
                # ranks of one TP group hold equal losses: the world mean is the dp mean
                torch.distributed.all_reduce(loss)
                loss /= dist.world_size
            lr = lr_at(step, cfg.optim, cfg.trainer.max_steps) if scheduled else cfg.optim.lr
            res = engine.step(lr)
            row = {"step": step, "loss": float(loss), "grad_norm": res.grad_norm, "skipped": res.skipped}
            if scheduled:
                row |= {"lr": lr, "lr_applied": [g["lr"] for g in inner.param_groups]}
            if engine.loss_scale() is not None:
                row["scale"] = engine.loss_scale()
            rows.append(row)
        logits = engine.logits(global_batch(0, cfg)[:2, :7])
        rows.append({"logits_shape": list(logits.shape), "logits_sum": float(logits.double().sum())})
        if dist.is_main:
            with open(out, "w") as f:
                json.dump(rows, f)
    finally:
        teardown()


if __name__ == "__main__":
    main()

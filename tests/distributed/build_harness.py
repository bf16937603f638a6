"""Build an engine the way training does (meta build, per-rank materialisation) and report on it;
launched under torchrun by tests/distributed/test_meta_build.py. Usage:

    torchrun --nproc_per_node N tests/distributed/build_harness.py MODE OUT key=value ...

MODE weights: gather the whole initial weights (one parameter at a time) and save them from
    rank 0 to OUT (torch.save of name -> tensor).
MODE memory: build only; OUT.json gets each rank's peak host RSS (ru_maxrss) after the build
    and the bytes of the parameters it holds locally. Under zero3 "the build" is the model's
    partitioned construction and initialisation (deepspeed.zero.Init), without
    deepspeed.initialize, whose engine allocates its communication buckets (reduce_bucket_size
    elements, 5e8 by default: 2 GB in fp32) whatever the model.
MODE states: build, run one optimizer step on random tokens, and write each rank's local bytes
    of weights, gradients and optimizer state (the plan's three model-state figures).
"""

from __future__ import annotations

import json
import resource
import sys

import torch
import torch.distributed as tdist
from hydra import compose, initialize_config_dir
from torch.distributed.tensor import DTensor

from framework.config import CONF_DIR, grad_accum_steps, load, validate
from framework.data.loader import Batch
from framework.dist import init_distributed, teardown
from framework.model.gpt import canonical_name
from framework.parallel import build_engine


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def local_bytes(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    ds = getattr(t, "ds_tensor", None)  # a ZeRO-3 parameter: its partition
    t = ds if ds is not None else local(t)
    return t.numel() * t.element_size()


def gathered_weights(engine, zero3: bool) -> dict[str, torch.Tensor]:
    model = engine.plain_model()
    out = {}
    for name, p in model.named_parameters():
        if zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                full = p.detach().clone()
        elif isinstance(p, DTensor):
            full = p.full_tensor()
        else:
            full = p.detach().clone()
        out[canonical_name(name)] = full.cpu()
    return out


def one_step(engine, cfg) -> int:
    """Forward/backward and one optimizer step; returns this rank's gradient bytes measured
    before the step (the engine frees gradients after it)."""
    t = cfg.trainer
    accum = grad_accum_steps(cfg, engine.dp_size)
    g = torch.Generator().manual_seed(engine.dp_rank)
    for _ in range(accum):
        ids = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, t.seq_len + 1), generator=g)
        engine.forward_backward(Batch(ids[:, :-1], ids[:, 1:]), accum)
    grads = sum(local_bytes(p.grad) for p in engine.plain_model().parameters())
    engine.step(cfg.optim.lr)
    return grads


def state_bytes(engine, zero: bool) -> dict[str, int]:
    """This rank's local bytes of weights and optimizer state."""
    if zero:  # DeepSpeed keeps gradients and optimizer state in its own flat partitions
        opt = engine.ds.optimizer
        weights = sum(local_bytes(p) for p in engine.plain_model().parameters())
        inner = opt.optimizer  # the torch AdamW over DeepSpeed's fp32 partitions
        master = sum(p.numel() * p.element_size() for g in inner.param_groups for p in g["params"])
        moments = sum(local_bytes(v) for s in inner.state.values() for v in s.values() if v.dim())
        return {"weights": weights, "optimizer": master + moments}
    model = engine.plain_model()
    params = list(model.parameters())
    optim = engine.optimizer.state
    return {
        "weights": sum(local_bytes(p) for p in params),
        # AdamW's exp_avg and exp_avg_sq (its 0-dim step counters are not model state)
        "optimizer": sum(local_bytes(v) for s in optim.values() for v in s.values() if v.dim()),
    }


def zero3_only(cfg, dist):
    from framework.parallel.materialize import initial_values, zero3_model
    from framework.parallel.zero import deepspeed_config, ensure_process_group
    from framework.precision import resolve

    ensure_process_group(dist)
    ds_config = deepspeed_config(cfg, dist.world_size, resolve(cfg.precision, dist.device.type))
    return zero3_model(cfg.model, ds_config, initial_values(cfg))


def main() -> None:
    mode, out, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = load(compose("config", overrides=overrides))
    dist = init_distributed(cfg.trainer.device)
    try:
        validate(cfg, dist.world_size)
        zero = cfg.strategy.name.startswith("zero")
        if mode == "memory" and cfg.strategy.name == "zero3":
            model = zero3_only(cfg, dist)
            row = {"weights": sum(local_bytes(p) for p in model.parameters())}
            row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            rows = dist.all_gather_object(row)
            if dist.is_main:
                with open(out, "w") as f:
                    json.dump(rows, f)
            return
        engine = build_engine(None, cfg, dist)
        if mode == "weights":
            weights = gathered_weights(engine, cfg.strategy.name == "zero3")
            if dist.is_main:
                torch.save(weights, out)
        elif mode in ("memory", "states"):
            if mode == "states":
                grads = one_step(engine, cfg)
                row = state_bytes(engine, zero)
                row["grads"] = grads
            else:
                row = {"weights": sum(local_bytes(p) for p in engine.plain_model().parameters())}
            # ru_maxrss is in KiB on Linux
            row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            rows = dist.all_gather_object(row) if tdist.is_initialized() else [row]
            if dist.is_main:
                with open(out, "w") as f:
                    json.dump(rows, f)
        else:
            raise SystemExit(f"unknown mode {mode!r}: weights | memory | states")
    finally:
        teardown()


if __name__ == "__main__":
    main()

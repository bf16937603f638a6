"""The NaN/Inf policy (trainer.on_nan, framework.faults.Guard) under several strategies in ONE
process group: for each strategy an engine is built, trained one clean step, then given a NaN
in rank FAULT_RANK's reduced gradient (faults.nan_grad_at_step / faults.rank, through the
Guard's injector and engine.poison_grad) and judged twice: by an on_nan=abort Guard (must raise
on every rank, nothing changed) and by an on_nan=skip Guard on the same gradients (engine.skip():
every local weight and optimizer tensor bitwise unchanged). Step 3's finite gradients are
skipped too (a loss spike); a fourth, clean step must apply again. Usage:

    torchrun --nproc_per_node N tests/distributed/nan_harness.py OUT_DIR STRATEGY[,STRATEGY...] key=value ...

Each rank writes OUT_DIR/rank_<r>.json: per strategy what it saw (the test judges it).
"""

from __future__ import annotations

import gc
import json
import math
import re
import sys
import traceback
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch.distributed.tensor import DTensor

from framework.config import CONF_DIR, grad_accum_steps, load, validate
from framework.data.loader import Batch
from framework.dist import init_distributed, teardown
from framework.faults import Guard, StopSignal
from framework.parallel import NonFiniteError, build_engine

FAULT_RANK = 1
NAN_STEP = 2


def global_batch(step: int, cfg) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    t = cfg.trainer
    return torch.randint(0, cfg.model.vocab_size, (t.global_batch_size, t.seq_len + 1), generator=g)


def _local(t: torch.Tensor) -> torch.Tensor:
    t = t.to_local() if isinstance(t, DTensor) else t
    return t.detach().clone()


def local_state(engine) -> dict[str, torch.Tensor]:
    """Every tensor this rank holds of the weights and the optimizer state (its shard, where
    the strategy shards): what a dropped update must leave bitwise alone."""
    out: dict[str, torch.Tensor] = {}
    if hasattr(engine, "ds"):  # DeepSpeed: module copy, fp32 master partitions, AdamW state
        for name, p in engine.ds.module.named_parameters():
            out[f"module.{name}"] = _local(p.ds_tensor if hasattr(p, "ds_tensor") else p)
        inner = engine._inner_optimizer()
        for i, flat in enumerate(engine._flat_partitions()):
            out[f"master.{i}"] = _local(flat)
            for k, v in inner.state.get(flat, {}).items():
                out[f"optim.{i}.{k}"] = _local(v)
        return out
    names = {id(p): n for n, p in engine.plain_model().named_parameters()}
    for p in engine.params:
        out[f"param.{names[id(p)]}"] = _local(p)
        for k, v in engine.optimizer.state.get(p, {}).items():
            out[f"optim.{names[id(p)]}.{k}"] = _local(v)
    return out


def unchanged(a: dict, b: dict) -> list[str]:
    """Keys whose tensors differ (or are missing): [] when bitwise equal."""
    return sorted(
        k for k in a.keys() | b.keys() if k not in a or k not in b or not torch.equal(a[k], b[k])
    )


def what(reason: str) -> str:
    """The rank-independent part of a verdict's reason (it also names the local rank and norm)."""
    return "; ".join(re.findall(r"(?:loss|gradient norm) is non-finite on \d+ of \d+ rank\(s\)", reason))


def run_strategy(strategy: str, overrides: list[str], dist, out_dir: Path) -> dict:
    def cfg_for(on_nan: str):
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            cfg = load(compose("config", overrides=[*overrides, f"strategy={strategy}",
                        f"trainer.on_nan={on_nan}", f"faults.nan_grad_at_step={NAN_STEP}",
                        f"faults.rank={FAULT_RANK}"]))  # fmt: skip
        validate(cfg, dist.world_size)
        return cfg

    cfg = cfg_for("skip")
    engine = build_engine(None, cfg, dist)
    res: dict = {"strategy": strategy}
    guards = {p: Guard(cfg_for(p), StopSignal()) for p in ("abort", "skip")}
    for i, g in enumerate(guards.values()):
        g.start(out_dir / f"{strategy}_{i}", dist, engine)
    accum = grad_accum_steps(cfg, engine.dp_size)
    per_rank, mb = cfg.trainer.global_batch_size // engine.dp_size, cfg.trainer.micro_batch_size

    def forward_backward(step: int) -> torch.Tensor:
        data = global_batch(step, cfg)[engine.dp_rank * per_rank : (engine.dp_rank + 1) * per_rank]
        losses = []
        for i in range(accum):
            chunk = data[i * mb : (i + 1) * mb]
            losses.append(engine.forward_backward(Batch(chunk[:, :-1], chunk[:, 1:]), accum))
        return torch.stack(losses).mean()

    try:
        lr = cfg.optim.lr
        # step 1, clean: the optimizer state exists afterwards (a skip must leave it alone too)
        v1 = guards["skip"].decide(1, forward_backward(1), engine, None)
        res["step1"] = {"action": v1.action, "norm": engine.apply(lr).grad_norm}
        before = local_state(engine)
        # step 2: NaN in FAULT_RANK's gradient. abort first: it must raise on every rank
        loss = forward_backward(NAN_STEP)
        try:
            guards["abort"].decide(NAN_STEP, loss, engine, None)
            res["abort"] = {"raised": False}
        except NonFiniteError as e:
            res["abort"] = {"raised": True, "what": what(str(e))}
        res["abort"]["changed"] = unchanged(before, local_state(engine))
        # the same gradients (poisoned again by this Guard's injector) judged by on_nan=skip
        v2 = guards["skip"].decide(NAN_STEP, loss, engine, None)
        r2 = engine.skip() if v2.action == "skip" else engine.apply(lr)
        res["skip"] = {
            "action": v2.action,
            "loss": v2.loss,
            "what": what(v2.reason),
            "skipped": r2.skipped,
            "counters": guards["skip"].counters(),
            "changed": unchanged(before, local_state(engine)),
        }
        if hasattr(engine, "ds"):
            res["skip"]["ds_skipped_steps"] = engine.ds.skipped_steps
        # step 3: finite gradients dropped by engine.skip() (as the loss-spike detector does):
        # DeepSpeed (bf16/fp32) also refuses a NaN step by itself, so only this case shows that
        # skip() drops an update that would otherwise apply
        forward_backward(3)
        res["skip_finite"] = {
            "skipped": engine.skip().skipped,
            "changed": unchanged(before, local_state(engine)),
        }
        # step 4, clean again: the dropped gradients are gone and the update applies
        v3 = guards["skip"].decide(4, forward_backward(4), engine, None)
        r3 = engine.apply(lr)
        res["step4"] = {
            "action": v3.action,
            "norm": r3.grad_norm,
            "finite": math.isfinite(r3.grad_norm) and math.isfinite(v3.loss),
            "changed": len(unchanged(before, local_state(engine))),
            "of": len(before),
            "counters": guards["skip"].counters(),
        }
    except Exception:  # report it per strategy; the next strategy still runs
        res["error"] = traceback.format_exc()
    finally:
        for g in guards.values():
            g.close()
        if hasattr(engine, "ds"):
            engine.ds.destroy()  # DeepSpeed keeps hooks and buffers until told
        dist.barrier()
    return res


def main() -> None:
    out_dir, strategies, overrides = Path(sys.argv[1]), sys.argv[2].split(","), sys.argv[3:]
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        device = load(compose("config", overrides=overrides)).trainer.device
    dist = init_distributed(device)
    try:
        results = []
        for s in strategies:
            results.append(run_strategy(s, overrides, dist, out_dir))
            gc.collect()  # the engine is gone: free it before the next one is built
        (out_dir / f"rank_{dist.rank}.json").write_text(json.dumps(results, indent=1))
    finally:
        teardown()


if __name__ == "__main__":
    main()

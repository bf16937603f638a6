"""Several engines through the engine API in one launch (torchrun's start-up dominates these
tests). For each case an engine is built as framework.train builds it (meta build, seeded
init), trained a few optimizer steps on fixed random global batches (each data-parallel rank
takes its slice, as the loader does) and evaluated. Recorded per step: the loss as the loop
logs it (the engines' micro-batch losses summed, / accum, averaged over the world as
Guard.decide does) and grad_norm; then eval_loss of one batch and the logits of one prompt.
Usage:

    torchrun --nproc_per_node N tests/distributed/pp_harness.py OUT_DIR CASES_JSON

CASES_JSON: a list of {"name", "overrides": [...], "steps", "masked": bool, "load": DIR|null,
"start", "save": bool, "save_legacy": bool}. masked: sft-style, a random part of every window's
targets untrained, the loss weights from the loader's own function
(framework.data.loader.to_batches). load: the engine state (engine.load) of DIR before
training, the steps then numbered from "start" + 1 (their batches: those of a run that went on);
save: engine.save to OUT_DIR/<name>/state after the steps; save_legacy (non-pipeline engines):
the same state in torch's per-group optimizer layout, as checkpoints were written before the
layout became flat by name, to OUT_DIR/<name>/legacy. Rank 0 writes OUT_DIR/<name>.json.
`run_case` also runs in one plain process (strategy=single references).
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from hydra import compose, initialize_config_dir
from torch.distributed.checkpoint.state_dict import get_state_dict

from framework.config import CONF_DIR, grad_accum_steps, load, validate
from framework.data.loader import to_batches
from framework.dist import Dist, init_distributed, teardown
from framework.parallel import build_engine


def global_batch(step: int, cfg, masked: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(global_batch_size, T+1) token windows of `step`, and sft masks (1: trained target) or,
    for a classifier (model.num_labels), the loader's label masks (label id + 1 at the last
    position, the target of the last text token)."""
    g = np.random.default_rng(1000 + step)
    t = cfg.trainer
    windows = g.integers(0, cfg.model.vocab_size, (t.global_batch_size, t.seq_len + 1))
    if cfg.model.num_labels:
        mask = np.zeros_like(windows, dtype=np.uint8)
        mask[:, -1] = g.integers(0, cfg.model.num_labels, t.global_batch_size) + 1
        return windows, mask
    if not masked:
        return windows, None
    # untrained prefixes of random length: micro-batches hold unequal trained-token counts
    starts = g.integers(1, t.seq_len, t.global_batch_size)
    mask = (np.arange(t.seq_len + 1)[None, :] >= starts[:, None]).astype(np.uint8)
    return windows, mask


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return load(compose("config", overrides=overrides))


def run_case(case: dict, dist: Dist, out_dir: Path) -> dict:
    cfg = compose_cfg(case["overrides"])
    validate(cfg, dist.world_size)
    engine = build_engine(None, cfg, dist)
    start = 0
    if case.get("load"):
        engine.load(Path(case["load"]))
        start = case["start"]
    accum = grad_accum_steps(cfg, engine.dp_size)
    per_rank = cfg.trainer.global_batch_size // engine.dp_size
    lo, hi = engine.dp_rank * per_rank, (engine.dp_rank + 1) * per_rank
    rows = []
    for step in range(start + 1, start + case.get("steps", 4) + 1):
        windows, mask = global_batch(step, cfg, case.get("masked", False))
        trained = int(np.count_nonzero(mask[:, 1:])) if mask is not None else 0
        batches = to_batches(
            windows[lo:hi], None, cfg.trainer.micro_batch_size, False,
            None if mask is None else mask[lo:hi], trained, engine.dp_size, bool(cfg.model.num_labels),
        )  # fmt: skip
        loss = torch.zeros(())
        for b in batches:
            loss += engine.forward_backward(b, accum)
        loss /= accum
        if dist.initialized:  # Guard.decide's mean over the world
            torch.distributed.all_reduce(loss)
            loss /= dist.world_size
        res = engine.step(cfg.optim.lr)
        rows.append({"step": step, "loss": float(loss), "grad_norm": res.grad_norm})
    engine.train(False)
    windows, mask = global_batch(0, cfg, case.get("masked", False))
    (b,) = to_batches(windows[:2], None, 2, False, None if mask is None else mask[:2],
                      0 if mask is None else int(np.count_nonzero(mask[:2, 1:])), 1,
                      bool(cfg.model.num_labels))  # fmt: skip
    result = {
        "rows": rows,
        "eval_loss": float(engine.eval_loss(b)),
        "logits": engine.logits(torch.as_tensor(windows[:2, :7])).double().tolist(),
    }
    if case.get("save"):
        engine.save(out_dir / case["name"] / "state")
    if case.get("save_legacy"):
        msd, osd = get_state_dict(engine.plain_model(), engine.optimizer)  # the former layout
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(out_dir / case["name"] / "legacy"))
    return result


def main() -> None:
    out_dir, cases = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    dist = init_distributed("cpu")
    try:
        for case in cases:
            result = run_case(case, dist, out_dir)
            if dist.is_main:
                (out_dir / f"{case['name']}.json").write_text(json.dumps(result))
            gc.collect()  # the engine is gone: free it before the next one is built
            dist.barrier()
    finally:
        teardown()


if __name__ == "__main__":
    main()

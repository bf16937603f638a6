"""Checkpoint save time: plain `dcp.save` of the engine's state vs our synchronous save (DCP +
rng + trainer.json + manifest hashes + commit) vs the time an async save (checkpoint.async_save)
blocks the loop. One process, gpt2-124m fp32 with AdamW state (about 1.5 GB), the engine built as
the train loop builds it, one optimizer step taken first so the Adam moments exist.

    python bench/save.py                       # gpt2-124m, 3 rounds, files under /tmp
    python bench/save.py --model debug --rounds 1

Each round runs the three in turn (fresh folders, removed after) and the medians over rounds are
reported. "async_blocking_s" is what the loop waits for: save() (state dict + copy into the
reused CPU staging buffers) plus finish() once the background write and hashing are done, as at
the next save of a real run; its median leaves out the first round, which also allocates the
staging buffers (once per run: "async_first_blocking_s"). "manifest_hash_*_s" time the
manifest's second pass alone over the written files (xxh3_128, now; sha256, before). The last
line printed is one JSON object: {"plain_dcp_save_s", "sync_save_s", "async_blocking_s",
"sync_over_plain", "async_blocking_over_plain", ...}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def build(model: str):
    from hydra import compose, initialize_config_dir

    from framework import config as C
    from framework.data.loader import Batch
    from framework.dist import Dist
    from framework.parallel import build_engine

    overrides = [f"model={model}", "trainer.device=cpu", "trainer.seq_len=64"]
    overrides += ["trainer.micro_batch_size=1", "trainer.global_batch_size=1", "model.dropout=0.0"]
    with initialize_config_dir(config_dir=C.CONF_DIR, version_base=None):
        cfg = C.load(compose(config_name="config", overrides=overrides))
    dist = Dist()
    engine = build_engine(None, cfg, dist)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.model.vocab_size, (1, 65), generator=g)
    engine.forward_backward(Batch(ids[:, :-1], ids[:, 1:]), 1)
    engine.step(1e-4)  # Adam moments now exist: the state is weights + exp_avg + exp_avg_sq
    return engine, dist


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2-124m")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default="/tmp/fw-bench-save")
    args = ap.parse_args()
    import torch.distributed.checkpoint as dcp

    from framework.checkpoint import Checkpointer, xxh3_file
    from framework.config import CheckpointConfig
    from framework.data.shards import sha256_file

    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    engine, dist = build(args.model)
    state = {"step": 1, "model": {}, "tokenizer": "bench"}
    names = ("plain", "sync", "async_blocking", "async_total", "hash_xxh3", "hash_sha256")
    times: dict[str, list[float]] = {k: [] for k in names}
    size_bytes = 0
    for r in range(args.rounds):
        # Each timed save starts with no dirty pages of the previous one still being written
        # back: otherwise the save measured second pays the writeback of the first.
        d = root / f"plain_{r}"
        os.sync()
        t0 = time.perf_counter()
        dcp.save(engine._state(), checkpoint_id=str(d))
        times["plain"].append(time.perf_counter() - t0)
        size_bytes = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
        shutil.rmtree(d)

        sync = Checkpointer(root / f"sync_{r}", CheckpointConfig(keep=0), dist)
        os.sync()
        t0 = time.perf_counter()
        saved = sync.save(1, engine, state)
        times["sync"].append(time.perf_counter() - t0)
        # the manifest's second pass alone, both hashes over the same (cached) files
        files = [p for p in saved.rglob("*") if p.is_file()]
        for name, fn in (("hash_xxh3", xxh3_file), ("hash_sha256", sha256_file)):
            t0 = time.perf_counter()
            for f in files:
                fn(f)
            times[name].append(time.perf_counter() - t0)
        shutil.rmtree(root / f"sync_{r}")

        if r == 0:
            asyn = Checkpointer(root / "async", CheckpointConfig(keep=0, async_save=True), dist)
        os.sync()
        t0 = time.perf_counter()
        asyn.save(r + 1, engine, state)
        blocked = time.perf_counter() - t0
        asyn._pending.hashed.result()  # the loop trains meanwhile; here we wait without blocking it
        t1 = time.perf_counter()
        asyn.finish()
        times["async_blocking"].append(blocked + time.perf_counter() - t1)
        times["async_total"].append(time.perf_counter() - t0)
        shutil.rmtree(root / "async" / f"step_{r + 1:08d}")
    med = {k: statistics.median(v) for k, v in times.items()}
    if args.rounds > 1:  # the first async save also allocates the staging buffers (once per run)
        med["async_blocking"] = statistics.median(times["async_blocking"][1:])
    print(
        json.dumps(
            {
                "model": args.model,
                "state_bytes": size_bytes,
                "plain_dcp_save_s": round(med["plain"], 3),
                "sync_save_s": round(med["sync"], 3),
                "async_blocking_s": round(med["async_blocking"], 3),
                "async_dispatch_to_commit_s": round(med["async_total"], 3),
                "async_first_blocking_s": round(times["async_blocking"][0], 3),
                "manifest_hash_xxh3_s": round(med["hash_xxh3"], 3),
                "manifest_hash_sha256_s": round(med["hash_sha256"], 3),
                "sync_over_plain": round(med["sync"] / med["plain"], 3),
                "async_blocking_over_plain": round(med["async_blocking"] / med["plain"], 3),
                # the fastest round of each: the write's own cost, least disturbed by the disk's
                # writeback state, which moves a 1.6 GB write here by 1.3-4 s between rounds
                "sync_over_plain_min": round(min(times["sync"]) / min(times["plain"]), 3),
                "rounds": {k: [round(x, 3) for x in v] for k, v in times.items()},
                "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                "torch": torch.__version__,
            }
        )
    )
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

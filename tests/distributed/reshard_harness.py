"""Load a checkpoint's engine state into the engine of another strategy / world size and save
it again (no training): the round trip shows what that engine holds after the load. Usage:

    torchrun --nproc_per_node N tests/distributed/reshard_harness.py SRC_STATE OUT_DIR strategy=A[,B...] key=value ...

Each strategy's engine is built in turn in the one process group (one launch for several
engines: process start-up dominates these tests) and saves to OUT_DIR/<strategy>.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from framework.config import CONF_DIR, load, validate
from framework.dist import init_distributed, teardown
from framework.model.gpt import GPT
from framework.parallel import build_engine


def round_trip(src: Path, out: Path, overrides: list[str], dist) -> None:
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = load(compose("config", overrides=overrides))
    validate(cfg, dist.world_size)
    torch.manual_seed(cfg.trainer.seed + 1)  # other initial weights: the load must replace them
    engine = build_engine(GPT(cfg.model).to(dist.device), cfg, dist)
    engine.load(src)
    engine.save(out)
    if hasattr(engine, "ds"):
        engine.ds.destroy()  # DeepSpeed keeps hooks and buffers until told


def main() -> None:
    src, out, args = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    (strategies,) = [a.split("=", 1)[1].split(",") for a in args if a.startswith("strategy=")]
    overrides = [a for a in args if not a.startswith("strategy=")]
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        device = load(compose("config", overrides=overrides)).trainer.device
    dist = init_distributed(device)
    try:
        for strategy in strategies:
            round_trip(src, out / strategy, [*overrides, f"strategy={strategy}"], dist)
            gc.collect()
            dist.barrier()
    finally:
        teardown()


if __name__ == "__main__":
    main()

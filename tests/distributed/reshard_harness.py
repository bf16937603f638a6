"""Load a checkpoint's engine state into the engine of another strategy / world size and save
it again (no training): the round trip shows what that engine holds after the load. Usage:

    torchrun --nproc_per_node N tests/distributed/reshard_harness.py SRC_STATE OUT_STATE key=value ...
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from framework.config import CONF_DIR, load, validate
from framework.model.gpt import GPT
from framework.parallel import build_engine
from framework.parallel.dist import init_distributed, teardown


def main() -> None:
    src, out, overrides = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = load(compose("config", overrides=overrides))
    dist = init_distributed(cfg.trainer.device)
    try:
        validate(cfg, dist.world_size)
        torch.manual_seed(cfg.trainer.seed + 1)  # other initial weights: the load must replace them
        engine = build_engine(GPT(cfg.model).to(dist.device), cfg, dist)
        engine.load(src)
        engine.save(out)
    finally:
        teardown()


if __name__ == "__main__":
    main()

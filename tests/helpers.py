"""Test helpers: Hydra composition of the real config tree, metrics readers."""

from __future__ import annotations

import json
from pathlib import Path

# A tiny GPT (RELIABILITY: 2 layers, d=64, vocab 257, seq 32) with dropout, so RNG matters.
TINY = [
    "model.n_layer=2",
    "model.n_embd=64",
    "model.n_head=4",
    "model.dropout=0.1",
    "trainer.seq_len=32",
    "trainer.micro_batch_size=4",
    "trainer.global_batch_size=8",
    "trainer.eval_every=0",
    "trainer.sample_tokens=0",
    "trainer.log_every=1",
    "trainer.max_steps=10",
    "optim.warmup_steps=2",
    "checkpoint.every=0",
]


def compose(overrides: list[str] | None = None, name: str = "config", **kw):
    """Compose conf/<name>.yaml with overrides (a DictConfig)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from framework.config import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return hydra_compose(config_name=name, overrides=overrides or [], **kw)


def make_cfg(overrides: list[str] | None = None):
    """A typed Config from conf/config.yaml plus overrides."""
    from framework.config import load

    return load(compose(overrides))


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, str]:
    """step -> repr of the loss (bitwise comparison)."""
    return {r["step"]: repr(r["loss"]) for r in read_metrics(run_dir) if "loss" in r}

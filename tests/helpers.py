"""Test helpers: Hydra composition of the real config tree, metrics readers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# The checkout under test. Subprocesses must import `framework` from here, not whichever copy
# is installed in the environment (an editable install of another checkout would be tested
# instead, and a broken CLI here would pass).
ROOT = Path(__file__).resolve().parents[1]

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


def checkout_env(**extra: str) -> dict[str, str]:
    """os.environ with this checkout first on PYTHONPATH (for any subprocess that imports
    framework), plus `extra`."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def run_module(
    module: str, *args: str, cwd: Path | str = ROOT, flags: tuple[str, ...] = (), env: dict | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess:  # fmt: skip
    """`python [flags] -m module args` of this checkout (PYTHONPATH = repo root; cwd the repo
    root unless a test needs its own, e.g. to see what a CLI writes into its working dir)."""
    return subprocess.run(
        [sys.executable, *flags, "-m", module, *args],
        cwd=cwd,
        env=checkout_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tiny_model_configs():
    """(GPT-2 style, Llama style) tiny ModelConfigs for export / import tests (vocab 257)."""
    from framework.model import ModelConfig

    gpt2 = ModelConfig(style="gpt2", n_layer=2, n_head=4, n_embd=64, vocab_size=257, block_size=64)
    llama = ModelConfig(
        style="llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=64, vocab_size=257, block_size=64,
        multiple_of=32, bias=False, tie_embeddings=False,
    )  # fmt: skip
    return gpt2, llama


def randomized(cfg):
    """A GPT with random weights everywhere (biases, norms and routers too, so a name-mapping
    mistake in an export or import cannot hide behind ones and zeros)."""
    import torch

    from framework.model import GPT

    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def loss_and_grads_per_kernel(model, kernels, idx, targets, doc_ids) -> dict:
    """{kernel: (loss, gradients)} of one forward/backward of `model` with each attention kernel."""
    out = {}
    for kernel in kernels:
        model.use_attention(kernel)
        model.zero_grad()
        loss = model(idx, targets, doc_ids)
        loss.backward()
        out[kernel] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    return out

"""AdamW with decoupled weight decay on matrices only, and the LR schedule as a pure function."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from framework.model.gpt import canonical_name

# "_bias": a mixture of experts' stacked biases (experts.w1_bias, (E, H)) are 2-D but biases
NO_DECAY_NAMES = ("tok_emb", "pos_emb", "_bias")


@dataclasses.dataclass
class OptimConfig:
    lr: float = 6e-4
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of lr."""
    warmup_steps: int = 10
    schedule: str = "cosine"
    """cosine | wsd (warmup-stable-decay) | constant."""
    decay_fraction: float = 0.2
    """wsd: share of max_steps spent decaying."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    """Applied to matrices only; norms, biases and embeddings get none."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: off)."""
    fused: bool | None = None
    """Fused AdamW kernel; None picks it where the device supports it."""


SCHEDULE_KEYS = (
    "trainer.max_steps",
    "optim.lr",
    "optim.min_lr_ratio",
    "optim.warmup_steps",
    "optim.schedule",
    "optim.decay_fraction",
)
"""The keys the LR schedule depends on (a resume that changes them is warned about by
framework.optim.schedule_change_warning, with the LR before and after)."""


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on 2-D weights of linear layers; none on norms, biases and embeddings. A tied
    output head is the embedding: a pipeline's last stage holds it as `lm_head.weight` (a copy
    of tok_emb.weight, framework/parallel/pp.py), which gets none either."""
    tied = getattr(getattr(model, "cfg", None), "tie_embeddings", False)
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # shared (tied) parameters appear once
        if not p.requires_grad:
            continue
        # a ZeRO-3 parameter built under deepspeed.zero.Init is an empty 1-D placeholder: its
        # real shape is ds_shape (without this every matrix lost its weight decay under zero3)
        ndim = len(getattr(p, "ds_shape", p.shape))
        embedding = any(n in name for n in NO_DECAY_NAMES) or (
            tied and canonical_name(name) == "lm_head.weight"
        )
        if ndim < 2 or embedding:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    """Build after parallelization: FSDP2/TP replace parameters with DTensors in place."""
    fused = cfg.fused if cfg.fused is not None else device_type == "cuda"
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused,
    )


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """LR for optimizer step `step` (counted from 1): linear warmup to cfg.lr, then cosine to
    min_lr (or WSD: flat, then a linear decay over the last decay_fraction of the run)."""
    lr, min_lr = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return lr * step / cfg.warmup_steps
    if cfg.schedule == "constant":
        return lr
    if cfg.schedule == "wsd":
        decay_steps = max(1, int(round(max_steps * cfg.decay_fraction)))
        decay_start = max_steps - decay_steps
        if step <= decay_start:
            return lr
        return lr - (lr - min_lr) * min(1.0, (step - decay_start) / decay_steps)
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def schedule_change_warning(saved: dict | None, cfg, step: int) -> str | None:
    """A warning naming each LR-schedule key whose value differs from the checkpoint's saved
    config (trainer.json "config"), with the LR of the next step under the old and new values;
    None when nothing changed (or the checkpoint predates saved configs)."""
    if not saved:
        return None
    old_values, new_values = {}, {}
    for key in SCHEDULE_KEYS:
        section, name = key.split(".")
        old = saved.get(section, {}).get(name)
        new = getattr(getattr(cfg, section), name)
        if old is not None and old != new:
            old_values[key], new_values[key] = old, new
    if not old_values:
        return None
    old_optim = dataclasses.replace(
        cfg.optim, **{k.split(".")[1]: v for k, v in old_values.items() if k.startswith("optim.")}
    )
    old_max = old_values.get("trainer.max_steps", cfg.trainer.max_steps)
    nxt = step + 1
    before, after = lr_at(nxt, old_optim, old_max), lr_at(nxt, cfg.optim, cfg.trainer.max_steps)
    changes = ", ".join(f"{k} {old_values[k]!r} -> {new_values[k]!r}" for k in old_values)
    return (
        f"resuming from step {step} with a changed LR schedule: {changes}; the LR of step {nxt} "
        f"moves from {before:.3g} to {after:.3g} (keep the checkpoint's values to continue the old schedule)"
    )

"""DeepSpeed ZeRO stages 1/2/3 behind the Engine interface.

DeepSpeed runs its own engine (partitioned optimizer state / gradients / parameters, its own
bf16 and fp16 modes with dynamic loss scaling); everything it needs is GENERATED from our
Config by `deepspeed_config()` (no hand-kept JSON that drifts). Our AdamW param groups are
handed to it, and the LR is set by us every step (no DeepSpeed scheduler).

On CPU DeepSpeed picks its CPU accelerator by itself and uses the gloo group we created.
Not through Accelerate: `accelerate launch` with a DeepSpeed config on CPU silently runs plain
MULTI_CPU (no ZeRO), and its DeepSpeed plugin would only re-wrap the config we generate here.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.distributed as tdist
from torch import nn

from framework.config import Config, ConfigError, grad_accum_steps
from framework.data.loader import Batch
from framework.parallel.dist import Dist
from framework.parallel.engine import Engine, NonFiniteError, StepResult
from framework.precision import OverflowGuard, Precision

ZERO_STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}
CHECKPOINT_TAG = "zero"
"""Fixed tag: the checkpoint directory is chosen by our checkpoint code, so DeepSpeed's own
`latest` file (never written: save_latest=False) plays no part in which state is loaded."""


def deepspeed_config(cfg: Config, dp_size: int, precision: Precision) -> dict:
    """The DeepSpeed JSON config for this run, derived from our Config."""
    t, p = cfg.trainer, cfg.precision
    zero: dict = {
        "stage": ZERO_STAGES[cfg.strategy.name],
        "contiguous_gradients": True,
        "overlap_comm": False,  # on: faster on GPUs, but reorders reductions (not bitwise)
    }
    if cfg.strategy.zero_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    ds = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps(cfg, dp_size),
        "gradient_clipping": cfg.optim.grad_clip,  # 0 disables, as ours
        "zero_optimization": zero,
        # our torch AdamW (param groups with/without weight decay), also under offload
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": precision.name == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if precision.name == "fp16":
        ds["fp16"] = {
            "enabled": True,
            "loss_scale": 0,  # 0 = dynamic
            "initial_scale_power": int(round(math.log2(p.initial_loss_scale))),
            "loss_scale_window": p.loss_scale_window,
            "hysteresis": 1,  # halve on every overflow, like torch's GradScaler
            "consecutive_hysteresis": False,
            "min_loss_scale": p.min_loss_scale,
        }
    return ds


class DeepSpeedEngine(Engine):
    """forward_backward -> engine.backward (DeepSpeed divides by the accumulation steps);
    engine.step() after every micro-batch, which only applies the optimizer at the
    accumulation boundary (the accum-th micro-batch): that is DeepSpeed's managed mode."""

    def __init__(self, ds_engine, precision: Precision, device: torch.device, dist: Dist, guard):
        self.ds, self.model, self.precision, self.device = ds_engine, ds_engine, precision, device
        self.dp_rank, self.dp_size = dist.rank, dist.world_size
        self.rng_rank = dist.rank
        self.overflow_guard: OverflowGuard | None = guard
        self.skipped_steps = 0
        self._micro = 0

    def plain_model(self) -> nn.Module:
        return self.ds.module

    def _to_device(self, batch: Batch):
        doc = batch.doc_ids.to(self.device) if batch.doc_ids is not None else None
        return batch.inputs.to(self.device), batch.targets.to(self.device), doc

    def forward_backward(self, batch, accum):
        if accum != self.ds.gradient_accumulation_steps():
            raise ConfigError(
                f"DeepSpeed was configured for {self.ds.gradient_accumulation_steps()} accumulation "
                f"steps but the loop runs {accum} (trainer.global_batch_size / micro_batch_size / dp)"
            )
        loss = self.ds(*self._to_device(batch))
        if batch.loss_weight is not None:  # sft: the global batch's trained-token mean
            loss = loss * batch.loss_weight
        self.ds.backward(loss)
        self._micro += 1
        if self._micro < accum:
            self.ds.step()  # not a boundary: only advances DeepSpeed's micro-step counter
        return loss.detach().float()

    def step(self, lr: float) -> StepResult:
        if not self.ds.is_gradient_accumulation_boundary():
            raise RuntimeError(
                f"step() after {self._micro} micro-batches: DeepSpeed expects "
                f"{self.ds.gradient_accumulation_steps()} before an optimizer step"
            )
        self._micro = 0
        for g in self.ds.optimizer.param_groups:
            g["lr"] = lr
        skipped_before = self.ds.skipped_steps
        scale = self.loss_scale()
        self.ds.step()
        skipped = self.ds.skipped_steps > skipped_before
        norm = self.ds.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        if skipped:
            self.skipped_steps += 1
        elif not math.isfinite(norm):
            # DeepSpeed has already applied this step (no fp16 overflow check without fp16)
            raise NonFiniteError(f"gradient norm is {norm} (DeepSpeed ZeRO, bf16/fp32)")
        if self.overflow_guard is not None and scale is not None:
            self.overflow_guard.update(skipped, scale)
        return StepResult(norm, skipped=skipped)

    def loss_scale(self) -> float | None:
        scale = getattr(self.ds.optimizer, "cur_scale", None)
        return float(scale) if scale is not None else None

    @torch.no_grad()
    def eval_loss(self, batch):
        loss = self.ds(*self._to_device(batch)).detach().float()
        return loss if batch.loss_weight is None else loss * batch.loss_weight

    @torch.no_grad()
    def logits(self, idx):
        return self.ds(idx.to(self.device)).float()

    def save(self, path: Path) -> None:
        self.ds.save_checkpoint(str(path), tag=CHECKPOINT_TAG, save_latest=False)
        self._save_full_weights(path)

    def _save_full_weights(self, path: Path) -> None:
        """The fp32 master weights, whole, in DCP layout beside DeepSpeed's files (DeepSpeed
        writes under <path>/zero/): framework.checkpoint.load_model, and so generate and
        export, read a ZeRO checkpoint like any other. Every rank gathers (a collective under
        ZeRO-3); DCP writes each replicated tensor once."""
        import torch.distributed.checkpoint as dcp
        from deepspeed.utils import safe_get_full_fp32_param

        sd = {}
        for name, p in self.ds.module.state_dict(keep_vars=True).items():
            full = safe_get_full_fp32_param(p) if isinstance(p, nn.Parameter) else None
            sd[name] = (full if full is not None else p.detach()).float().cpu()
        dcp.save({"model": sd}, checkpoint_id=str(path))

    def load(self, path: Path) -> None:
        loaded, _ = self.ds.load_checkpoint(
            str(path), tag=CHECKPOINT_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if loaded is None:
            raise FileNotFoundError(
                f"no DeepSpeed checkpoint (tag {CHECKPOINT_TAG!r}) under {path} on rank {self.dp_rank}"
            )

    def extra_state(self) -> dict:
        return {"loss_scale": self.loss_scale()} if self.precision.name == "fp16" else {}


def build_zero(model: nn.Module, cfg: Config, dist: Dist, precision: Precision, optimizer) -> Engine:
    import deepspeed

    if precision.name == "fp8":
        raise ConfigError("precision=fp8 is not supported with DeepSpeed ZeRO: use strategy=fsdp")
    if not tdist.is_initialized():
        # one process (e.g. `python -m framework.train strategy=zero2` on one GPU): DeepSpeed
        # needs a process group, and init_distributed only creates one for world size > 1
        backend = "nccl" if dist.device.type == "cuda" else "gloo"
        tdist.init_process_group(backend, store=tdist.HashStore(), rank=0, world_size=1)
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)  # DeepSpeed reads them, a launcher would set them
    ds_engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config=deepspeed_config(cfg, dist.world_size, precision),
        dist_init_required=False,
    )
    guard = OverflowGuard(cfg.precision) if precision.name == "fp16" else None
    scaler = getattr(ds_engine.optimizer, "loss_scaler", None)
    if guard is not None and hasattr(scaler, "raise_error_at_min_scale"):
        # DeepSpeed would raise a bare Exception at the FIRST overflow at its minimum scale (not
        # settable from its JSON); our guard aborts after precision.max_overflows_at_min of
        # them, with the same message as the torch engines
        scaler.raise_error_at_min_scale = False
    return DeepSpeedEngine(ds_engine, precision, dist.device, dist, guard)

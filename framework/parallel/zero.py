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
import torch.distributed.checkpoint as dcp
from torch import nn

from framework.config import Config, ConfigError, grad_accum_steps
from framework.data.loader import Batch
from framework.dist import Dist
from framework.parallel.engine import Engine, NonFiniteError, StepResult
from framework.precision import OverflowGuard, Precision
from framework.safeload import dcp_load

ZERO_STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}


def deepspeed_config(cfg: Config, dp_size: int, precision: Precision) -> dict:
    """The DeepSpeed JSON config for this run, derived from our Config."""
    t, p = cfg.trainer, cfg.precision
    zero: dict = {
        "stage": ZERO_STAGES[cfg.strategy.name],
        "contiguous_gradients": True,
        # on: faster on GPUs, but it reorders the reductions (not bitwise with the torch engines)
        "overlap_comm": (
            precision.device_type == "cuda"
            if cfg.strategy.overlap_comm is None
            else cfg.strategy.overlap_comm
        ),
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

    def _check_boundary(self) -> None:
        if not self.ds.is_gradient_accumulation_boundary():
            raise RuntimeError(
                f"step() after {self._micro} micro-batches: DeepSpeed expects "
                f"{self.ds.gradient_accumulation_steps()} before an optimizer step"
            )

    def grad_norm(self) -> float:
        """The norm DeepSpeed's own step() computes, taken before it: the partitioned gradients'
        norms, all-reduced inside DeepSpeed (stage 1/2: scaled_global_norm; stage 3: the norm
        groups). Costs one extra norm per step; DeepSpeed applies bf16/fp32 steps without a
        finiteness check of its own, so this is the only place to stop a NaN step."""
        # deepspeed: seconds to import; only ZeRO runs need it
        from deepspeed.runtime.utils import combine_grad_norm_groups

        self._check_boundary()
        opt = self.ds.optimizer
        if hasattr(opt, "scaled_global_norm"):  # DeepSpeedZeroOptimizer (stages 1 and 2)
            norm = opt.scaled_global_norm()
        else:  # DeepSpeedZeroOptimizer_Stage3
            norm = combine_grad_norm_groups(opt._get_norm_groups())
        self._norm = float(norm) / (self.loss_scale() or 1.0)
        return self._norm

    def _partition_grads(self) -> list[torch.Tensor]:
        grads = getattr(self.ds.optimizer, "averaged_gradients", None) or {}
        return [g for group in grads.values() for g in (group or []) if g is not None]

    def poison_grad(self) -> None:
        grads = self._partition_grads()
        if not grads:
            raise NotImplementedError(
                "faults.nan_grad_at_step: this DeepSpeed optimizer keeps no averaged_gradients "
                "(optimizer offload: the gradients go to the CPU copy): use faults.nan_loss_at_step"
            )
        grads[0].view(-1)[0] = float("nan")

    def apply(self, lr: float) -> StepResult:
        self._check_boundary()
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

    def skip(self) -> StepResult:
        """DeepSpeed's own overflow path drops the gradients and keeps its counters consistent
        (micro-step ids, skipped_steps): force it for this one step. Under fp16 that path also
        halves the loss scale, as an overflow would."""
        self._check_boundary()
        self._micro = 0
        opt = self.ds.optimizer
        inf = torch.tensor(float("inf"), device=self.device)
        saved = {k: opt.__dict__[k] for k in ("check_grad_overflow",) if k in opt.__dict__}
        if hasattr(opt, "scaled_global_norm"):  # stages 1/2: their overflow check
            opt.check_grad_overflow = True
            opt.has_overflow = lambda partition_gradients=True: True
        else:  # stage 3: an invalid norm is its overflow
            opt._get_norm_groups = lambda: [inf]
        try:
            self.ds.step()
        finally:
            for k in ("has_overflow", "_get_norm_groups"):
                opt.__dict__.pop(k, None)
            opt.__dict__.update(saved)
        return StepResult(self._norm, skipped=True)

    def loss_scale(self) -> float | None:
        if self.precision.name != "fp16":  # DeepSpeed keeps a static scale of 1 otherwise
            return None
        scale = getattr(self.ds.optimizer, "cur_scale", None)
        return float(scale) if scale is not None else None

    @torch.no_grad()
    def eval_loss(self, batch):
        loss = self.ds(*self._to_device(batch)).detach().float()
        return loss if batch.loss_weight is None else loss * batch.loss_weight

    @torch.no_grad()
    def logits(self, idx):
        return self.ds(idx.to(self.device)).float()

    # -- checkpoint: our DCP layout, never DeepSpeed's pickles -----------------------------
    # The keys are those the torch engines save (TorchEngine._state: parameter FQNs;
    # optim.state.<fqn>.exp_avg / exp_avg_sq / step; optim.param_groups.<fqn>.lr / betas / ...),
    # with whole (unsharded) fp32 tensors, so a ZeRO checkpoint loads into any strategy and world
    # size and any checkpoint loads here. DeepSpeed's save_checkpoint /
    # load_checkpoint are not used: they write pickles and read them with weights_only=False.
    # Cost: each rank gathers one whole parameter at a time (a collective under ZeRO-3) and the
    # state dict holds the whole model + Adam state in host memory on every rank while DCP writes
    # it (each replicated tensor once, spread over the ranks).
    def _params(self) -> list[tuple[str, nn.Parameter]]:
        return list(self.ds.module.named_parameters())  # tied weights once, as get_state_dict

    def _inner_optimizer(self) -> torch.optim.Optimizer:
        """Our torch AdamW, stepping DeepSpeed's flat fp32 partitions."""
        return self.ds.optimizer.optimizer

    def _flat_partitions(self) -> list[torch.Tensor]:
        """This rank's fp32 partitions that our AdamW steps (ZeRO-3: one per sub-group)."""
        zopt = self.ds.optimizer
        flats = getattr(zopt, "fp32_partitioned_groups_flat", None)
        return list(flats if flats is not None else zopt.single_partition_of_fp32_groups)

    def _materialise_optimizer_state(self) -> None:
        """AdamW creates its state at its first step, and DeepSpeed links each parameter to its
        slice of it then. A fresh engine about to load has none: create it as AdamW would (zero
        moments, step 0), to be overwritten by the checkpoint's values."""
        inner = self._inner_optimizer()
        for flat in self._flat_partitions():
            if "exp_avg" not in inner.state.get(flat, {}):
                inner.state[flat] = {
                    "step": torch.tensor(0.0, dtype=torch.float32),
                    "exp_avg": torch.zeros_like(flat, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(flat, memory_format=torch.preserve_format),
                }
        if hasattr(self.ds.optimizer, "_lazy_init_hp_params_optimizer_state"):
            # ZeRO-1/2 link each parameter to its slice of the Adam state once, after the first
            # param group's first step, when later groups have no state yet (DeepSpeed 0.19: the
            # second group's parameters then report "exp_avg not found"): link again now
            self.ds.optimizer._hp_optimizer_states_linked = False
            self.ds.optimizer._lazy_init_hp_params_optimizer_state()

    def _step_tensor(self) -> torch.Tensor:
        """AdamW's step count (all DeepSpeed partitions step together), as torch keeps it."""
        inner = self._inner_optimizer()
        steps = {float(st["step"]) for st in inner.state.values() if "step" in st}
        if len(steps) > 1:
            raise RuntimeError(f"DeepSpeed's optimizer partitions disagree on the step count: {steps}")
        return torch.tensor(steps.pop() if steps else 0.0, dtype=torch.float32)

    def _state(self) -> dict:
        # deepspeed: seconds to import; only ZeRO runs need it
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        self._materialise_optimizer_state()
        params = dict(self._params())
        model: dict[str, torch.Tensor] = {}
        for name, t in self.ds.module.state_dict(keep_vars=True).items():
            full = safe_get_full_fp32_param(t) if isinstance(t, nn.Parameter) else None
            model[name] = (full if full is not None else t.detach()).float().cpu()
        step = self._step_tensor()
        optim: dict = {}  # flattened by name, as torch's get_state_dict(flatten_optimizer_state_dict)
        for name, p in params.items():
            optim[f"state.{name}.step"] = step.clone()
            for key in ("exp_avg", "exp_avg_sq"):
                optim[f"state.{name}.{key}"] = safe_get_full_optimizer_state(p, key).float().cpu()
        lr = self._inner_optimizer().param_groups[0]["lr"]
        for hyper, fqns in self.param_groups:
            for name in fqns:
                optim.update({f"param_groups.{name}.{k}": v for k, v in {**hyper, "lr": lr}.items()})
        return {"model": model, "optim": optim}

    def save(self, path: Path) -> None:
        dcp.save(self._state(), checkpoint_id=str(path))

    def load(self, path: Path) -> None:
        """Any strategy's checkpoint (DCP, our layout), at any world size."""
        # deepspeed: seconds to import; only ZeRO runs need it
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        state = self._state()  # the keys and shapes to read, filled in place
        # hyperparameters (betas, eps, weight decay) come from the config, the lr from the loop:
        # only the state is read (its keys are the same in torch's per-group optimizer layout)
        state["optim"] = {k: v for k, v in state["optim"].items() if k.startswith("state.")}
        dcp_load(state, path)
        model, optim = state["model"], state["optim"]
        params = dict(self._params())
        with torch.no_grad():
            for name, p in params.items():
                full = model[name].to(self.device)
                safe_set_full_fp32_param(p, full)
                for key in ("exp_avg", "exp_avg_sq"):
                    safe_set_full_optimizer_state(p, optim[f"state.{name}.{key}"].to(self.device), key)
                # the module's (bf16 or fp32) copy: under ZeRO-3 gathered, set on every rank
                # alike and re-partitioned on exit; under ZeRO-1/2 it is whole on every rank
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    p.data.copy_(full.view_as(p.data))
        steps = {float(optim[f"state.{name}.step"]) for name in params}
        if len(steps) != 1:
            raise RuntimeError(f"{path}: parameters have different Adam step counts {sorted(steps)}")
        step = steps.pop()
        for flat in self._flat_partitions():
            self._inner_optimizer().state[flat]["step"].fill_(step)

    def extra_state(self) -> dict:
        scaler = getattr(self.ds.optimizer, "loss_scaler", None)
        if self.precision.name != "fp16" or scaler is None:
            return {}
        return {
            "loss_scale": self.loss_scale(),
            "zero_loss_scaler": {k: getattr(scaler, k) for k in _SCALER_KEYS},
        }

    def load_extra_state(self, state: dict) -> None:
        # DeepSpeed's dynamic loss scaler, restored from trainer.json (not from its pickles)
        scaler = getattr(self.ds.optimizer, "loss_scaler", None)
        for key, value in state.get("zero_loss_scaler", {}).items():
            if scaler is not None and key in _SCALER_KEYS:
                setattr(scaler, key, value)


_SCALER_KEYS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
"""The state of DeepSpeed's DynamicLossScaler (plain numbers)."""


def ensure_process_group(dist: Dist) -> None:
    """One plain process (e.g. `python -m framework.train strategy=zero2` on one GPU): DeepSpeed
    needs a process group (also for zero.Init), and init_distributed only creates one under a
    launcher."""
    if tdist.is_initialized():
        return
    backend = "nccl" if dist.device.type == "cuda" else "gloo"
    tdist.init_process_group(backend, store=tdist.HashStore(), rank=0, world_size=1)
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)  # DeepSpeed reads them, a launcher would set them


def build_zero(model: nn.Module, cfg: Config, dist: Dist, precision: Precision, optimizer) -> Engine:
    import deepspeed  # deepspeed: seconds to import; only ZeRO runs need it

    if precision.name == "fp8":
        raise ConfigError("precision=fp8 is not supported with DeepSpeed ZeRO: use strategy=fsdp")
    ensure_process_group(dist)
    # (hyperparameters, FQNs) of each of our param groups, for the optimizer state's layout in
    # a checkpoint: DeepSpeed replaces the groups' params with its flat partitions
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [
        ({k: v for k, v in g.items() if k != "params"}, [names[id(p)] for p in g["params"]])
        for g in optimizer.param_groups
    ]
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
    engine = DeepSpeedEngine(ds_engine, precision, dist.device, dist, guard)
    engine.param_groups = groups
    return engine

"""The narrow interface the training loop talks to, whatever the strategy.

`TorchEngine` drives every torch-native strategy (single, DDP, FSDP2, TP, 2-D): the strategy
only changes how the plain model is wrapped before the engine gets it. DeepSpeed ZeRO has
its own engine behind the same methods.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from framework.data.loader import Batch
from framework.precision import Precision


class NonFiniteError(RuntimeError):
    """Loss or gradient norm is NaN/Inf; raised before optimizer.step() so weights stay intact."""


@dataclass
class StepResult:
    grad_norm: float
    skipped: bool = False
    """True when the step was skipped (fp16 overflow): parameters unchanged."""


class Engine:
    model: nn.Module
    """The module to call for forward (possibly wrapped)."""

    def forward_backward(self, batch: Batch, accum: int) -> torch.Tensor:
        """Loss of one micro-batch (detached), gradients accumulated scaled by 1/accum."""
        raise NotImplementedError

    def step(self, lr: float) -> StepResult:
        raise NotImplementedError

    @torch.no_grad()
    def eval_loss(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """Full (B, T, V) logits of the last position(s) on every rank (for sampling at eval).
        Every rank must call it: sharded strategies gather inside forward."""
        raise NotImplementedError

    def save(self, path: Path) -> None:
        """Write model + optimizer (+ scaler) state under `path` (all ranks call it)."""
        raise NotImplementedError

    def load(self, path: Path) -> None:
        raise NotImplementedError

    def extra_state(self) -> dict:
        """Small JSON-able state (e.g. fp16 loss scale) stored in the trainer state."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def plain_model(self) -> nn.Module:
        """The unwrapped GPT (for export/generate in-process)."""
        return self.model


class TorchEngine(Engine):
    def __init__(
        self,
        model: nn.Module,
        plain: nn.Module,
        optimizer: torch.optim.Optimizer,
        precision: Precision,
        grad_clip: float,
        device: torch.device,
        scaler=None,
    ):
        self.model, self._plain, self.optimizer = model, plain, optimizer
        self.precision, self.grad_clip, self.device = precision, grad_clip, device
        self.scaler = scaler  # torch.amp.GradScaler (or sharded) for fp16; None otherwise
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    def plain_model(self) -> nn.Module:
        return self._plain

    def _to_device(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        dev = self.device
        doc = batch.doc_ids.to(dev, non_blocking=True) if batch.doc_ids is not None else None
        return batch.inputs.to(dev, non_blocking=True), batch.targets.to(dev, non_blocking=True), doc

    def forward_backward(self, batch, accum):
        inputs, targets, doc_ids = self._to_device(batch)
        with self.precision.autocast():
            loss = self.model(inputs, targets, doc_ids)
        scaled = loss / accum
        if self.scaler is not None:
            scaled = self.scaler.scale(scaled)
        scaled.backward()
        return loss.detach()

    def _grad_norm(self) -> torch.Tensor:
        clip = self.grad_clip if self.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip, foreach=True)
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP2 / TP
            norm = norm.full_tensor()
        return norm

    def step(self, lr: float) -> StepResult:
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = float(self._grad_norm())
        if self.scaler is not None:
            # GradScaler skips the step on inf/nan grads and lowers the scale.
            scale_before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(norm, skipped=self.scaler.get_scale() < scale_before)
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(f"gradient norm is {norm}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(norm)

    @torch.no_grad()
    def eval_loss(self, batch):
        inputs, targets, doc_ids = self._to_device(batch)
        with self.precision.autocast():
            return self.model(inputs, targets, doc_ids).detach()

    @torch.no_grad()
    def logits(self, idx):
        with self.precision.autocast():
            return self.model(idx.to(self.device)).float()

    # -- checkpoint: torch.distributed.checkpoint, so any strategy's shards load into any other
    def _init_optimizer_state(self) -> None:
        """AdamW creates its state lazily; DCP loads in place, so materialise it with a zero
        step at lr 0 (parameters unchanged: p -= 0 and p *= 1 - 0*wd)."""
        if self.optimizer.state:
            return
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        for g in self.optimizer.param_groups:
            g["lr"] = 0.0
        for p in self.params:
            p.grad = torch.zeros_like(p)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for g, lr in zip(self.optimizer.param_groups, lrs):
            g["lr"] = lr

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self._plain, self.optimizer)
        return {"model": msd, "optim": osd}

    def save(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():  # DCP warns that a single process saves without a group
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(self._state(), checkpoint_id=str(path))

    def load(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        self._init_optimizer_state()
        state = self._state()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(path))
        set_state_dict(
            self._plain, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )

    def extra_state(self) -> dict:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_extra_state(self, state: dict) -> None:
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

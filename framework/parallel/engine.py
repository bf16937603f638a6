"""The narrow interface the training loop talks to, whatever the strategy.

`TorchEngine` drives every torch-native strategy (single, DDP, FSDP2, TP, 2-D): the strategy
only changes how the plain model is wrapped before the engine gets it. DeepSpeed ZeRO has
its own engine behind the same methods.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from framework.data.loader import Batch
from framework.errors import NonFiniteError
from framework.parallel.cp import WholeSequence
from framework.precision import OverflowGuard, Precision
from framework.safeload import SafeFileSystemReader, dcp_load


@dataclass
class StepResult:
    grad_norm: float
    skipped: bool = False
    """True when the step was skipped (fp16 overflow): parameters unchanged."""


class Engine:
    model: nn.Module
    """The module to call for forward (possibly wrapped)."""
    dp_rank: int = 0
    dp_size: int = 1
    """Data-parallel coordinates for the loader: ranks of one tensor-parallel group share
    dp_rank (they read the same micro-batches)."""
    rng_rank: int = 0
    """Index of this rank's dropout stream. Ranks whose dropout acts on the same replicated
    activations must share it (TP without sequence parallel: dp_rank); under sequence parallel
    every dropout acts on this rank's own slice (of the sequence or the heads), so each rank
    draws its own masks (the global rank), as Megatron does."""

    def forward_backward(self, batch: Batch, accum: int) -> torch.Tensor:
        """Loss of one micro-batch (detached), gradients accumulated scaled by 1/accum.
        Called exactly `accum` times between two step() calls."""
        raise NotImplementedError

    def grad_norm(self) -> float:
        """Global L2 norm of the accumulated gradients (unscaled, unclipped), computed after the
        last micro-batch and before anything is applied, so the loop can decide on every rank
        whether to apply. Under DDP the gradients are replicated and this is this rank's copy."""
        raise NotImplementedError

    def apply(self, lr: float) -> StepResult:
        """Clip (to the norm of grad_norm()) and apply the update; clears the gradients."""
        raise NotImplementedError

    def skip(self) -> StepResult:
        """Drop this step's gradients: parameters and optimizer state stay bitwise unchanged."""
        raise NotImplementedError

    def poison_grad(self) -> None:
        """Test fault injection: make one element of this rank's (reduced) gradient NaN."""
        raise NotImplementedError

    def step(self, lr: float) -> StepResult:
        """grad_norm() then apply(): the whole optimizer step when nobody needs to decide."""
        self.grad_norm()
        return self.apply(lr)

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

    def save_async(self, path: Path, group, stager) -> Future:
        """Copy this rank's state into `stager`'s CPU buffers, then write it under `path` in a
        background thread (checkpoint.async_save). The Future resolves when every rank's files
        are written; `group` carries DCP's own collectives (None without a process group)."""
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

    def loss_scale(self) -> float | None:
        """Current fp16 dynamic loss scale (None when not scaling)."""
        return None

    def peak_memory_bytes(self) -> int | None:
        """Peak device memory allocated by this process (None where torch does not track it)."""
        dev = getattr(self, "device", None)
        if dev is not None and dev.type == "cuda":
            return torch.cuda.max_memory_allocated(dev)
        return None

    def device_memory(self) -> dict:
        """Device memory of this process in GiB (peak allocated, allocated and reserved now);
        empty where torch does not track it (CPU)."""
        peak = self.peak_memory_bytes()
        if peak is None:
            return {}
        dev = self.device
        return {
            "peak_memory_gib": peak / 2**30,
            "memory_allocated_gib": torch.cuda.memory_allocated(dev) / 2**30,
            "memory_reserved_gib": torch.cuda.memory_reserved(dev) / 2**30,
        }


def _no_sync_needed(last: bool):
    return contextlib.nullcontext()


class TorchEngine(Engine):
    """Single, DDP, FSDP2, TP and TP x FSDP2: the same loop over a differently wrapped model.

    grad_sync(last) is the strategy's context for one micro-batch: DDP/FSDP skip their
    gradient reduction on all but the last micro-batch of an optimizer step.
    sequence: what each rank computes of a micro-batch's sequences (framework/parallel/cp.py):
    the whole of them, or its context-parallel chunk; it also builds sampling logits (sequence
    parallel splits T over the TP ranks, so prompts are padded to a multiple of it, on the
    right: causal attention keeps earlier positions unaffected).
    """

    def __init__(
        self,
        model: nn.Module,
        plain: nn.Module,
        optimizer: torch.optim.Optimizer,
        precision: Precision,
        grad_clip: float,
        device: torch.device,
        scaler=None,
        *,
        grad_sync: Callable[[bool], contextlib.AbstractContextManager] = _no_sync_needed,
        dp_rank: int = 0,
        dp_size: int = 1,
        rng_rank: int | None = None,
        sequence=None,
        overflow_guard: OverflowGuard | None = None,
        min_loss_scale: float = 1.0,
    ):
        self.model, self._plain, self.optimizer = model, plain, optimizer
        self.precision, self.grad_clip, self.device = precision, grad_clip, device
        self.scaler = scaler  # torch.amp.GradScaler for fp16; None otherwise
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.grad_sync, self.dp_rank, self.dp_size = grad_sync, dp_rank, dp_size
        self.rng_rank = dp_rank if rng_rank is None else rng_rank
        self.sequence = sequence or WholeSequence()
        self.overflow_guard, self.min_loss_scale = overflow_guard, min_loss_scale
        self.skipped_steps = 0
        self._micro = 0  # micro-batches since the last step()

    partial_model = False
    """True when this rank holds a part of the model's modules (pipeline stages): loads then
    take only their own keys of a checkpoint."""

    def plain_model(self) -> nn.Module:
        return self._plain

    def _to_device(self, batch: Batch) -> list[torch.Tensor | None]:
        """inputs, targets, doc_ids, positions on the device (None stays None)."""
        parts = (batch.inputs, batch.targets, batch.doc_ids, batch.positions)
        return [None if t is None else t.to(self.device, non_blocking=True) for t in parts]

    def forward_backward(self, batch, accum):
        batch = self.sequence.split(batch)  # context parallel: this rank's chunk
        inputs, targets, doc_ids, positions = self._to_device(batch)
        self._micro += 1
        sharded = [t for t in (inputs, targets, positions) if t is not None]
        with self.grad_sync(self._micro >= accum), self.sequence.context(*sharded):
            with self.precision.autocast():
                loss = self.model(inputs, targets, doc_ids, positions)
            if batch.loss_weight is not None:  # sft: the global batch's trained-token mean
                loss = loss * batch.loss_weight
            scaled = loss / accum
            if self.scaler is not None:
                scaled = self.scaler.scale(scaled)
            scaled.backward()
        return loss.detach()

    def _grad_groups(self) -> dict[object, list[nn.Parameter]]:
        """Parameters with gradients, grouped by (mesh, placements): gradients may be plain
        tensors and DTensors on different meshes (TP without sequence parallel leaves norms
        plain; under TP x FSDP those become 1-D DTensors beside 2-D ones), which one foreach
        kernel cannot mix."""
        groups: dict[object, list[nn.Parameter]] = {}
        for p in self.params:
            if p.grad is not None:
                g = p.grad
                key = (g.device_mesh, g.placements) if isinstance(g, DTensor) else None
                groups.setdefault(key, []).append(p)
        return groups

    def _grad_norm(self, groups) -> torch.Tensor:
        """Global L2 norm of all gradients: each group's norm reduced to a full value, combined."""
        norms = []
        for params in groups.values():
            n = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
            norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
        if not norms:
            return torch.zeros(())
        return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))

    def _sync_found_inf(self) -> bool:
        """Make every rank agree on an fp16 overflow: the inf check of GradScaler.unscale_ only
        sees this rank's gradient shards (a TP or FSDP shard may overflow on one rank only).
        GradScaler keeps the flags in its per-optimizer state; reduce them in place."""
        state = self.scaler._per_optimizer_states[id(self.optimizer)]
        found = list(state["found_inf_per_device"].values())
        for found_inf in found:
            if tdist.is_initialized():
                tdist.all_reduce(found_inf, op=tdist.ReduceOp.MAX)
        return any(bool(f.item()) for f in found)

    def grad_norm(self) -> float:
        self._overflow = False
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
            self._overflow = self._sync_found_inf()
        self._groups = self._grad_groups()
        self._norm = self._grad_norm(self._groups)
        return float(self._norm)

    def poison_grad(self) -> None:
        p = next(p for p in self.params if p.grad is not None)
        g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        g.view(-1)[0] = float("nan")

    def skip(self) -> StepResult:
        self._micro = 0
        if self.scaler is not None:
            # forget this step's unscale_ without touching the scale or its growth counter
            self.scaler.update(new_scale=self.scaler.get_scale())
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(float(self._norm), skipped=True)

    def apply(self, lr: float) -> StepResult:
        self._micro = 0
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        norm = float(self._norm)
        if self.grad_clip > 0:
            for params in self._groups.values():  # takes parameters, scales their .grad
                torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, self._norm, foreach=True)
        if self.scaler is not None:
            # GradScaler skips the step on inf/nan grads and halves the scale
            scale_before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            skipped = self._overflow
            if self.scaler.get_scale() < self.min_loss_scale:
                self.scaler.update(new_scale=self.min_loss_scale)
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += skipped
            if self.overflow_guard is not None:
                self.overflow_guard.update(skipped, scale_before)
            return StepResult(norm, skipped=skipped)
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(f"gradient norm is {norm}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(norm)

    @torch.no_grad()
    def eval_loss(self, batch):
        batch = self.sequence.split(batch)
        inputs, targets, doc_ids, positions = self._to_device(batch)
        sharded = [t for t in (inputs, targets, positions) if t is not None]
        with self.sequence.context(*sharded), self.precision.autocast():
            loss = self.model(inputs, targets, doc_ids, positions).detach()
        return loss if batch.loss_weight is None else loss * batch.loss_weight

    @torch.no_grad()
    def logits(self, idx):
        def forward(ids, positions):
            with self.precision.autocast():
                return self.model(ids, positions=positions).float()

        return self.sequence.logits(forward, idx.to(self.device))

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

    def _parts(self) -> list[tuple[nn.Module, torch.optim.Optimizer, dict[str, str]]]:
        """(module, its optimizer, {name held: name saved}) for each part of the model this rank
        holds: the plain model here; one per pipeline stage under pp (framework/parallel/pp.py,
        whose last stage saves its copy of a tied embedding's optimizer state under the
        embedding's name)."""
        return [(self._plain, self.optimizer, {})]

    def _state(self) -> dict:
        """The DCP state: parameter FQNs, and the optimizer state flattened by name
        (optim.state.<fqn>.exp_avg | exp_avg_sq | step, optim.param_groups.<fqn>.lr | ...), the
        merge of every part's. Not torch's default layout: its param_groups are a list by group
        index, which pipeline stages (several optimizers, one per stage) would overwrite in each
        other's saves; by name, any rank's parts load from any layout's checkpoint."""
        model, optim = {}, {}
        for module, opt, alias in self._parts():
            msd, osd = get_state_dict(
                module, opt, options=StateDictOptions(flatten_optimizer_state_dict=True)
            )
            model.update(msd)
            optim.update(_renamed(osd, alias))
        return {"model": model, "optim": optim}

    def save(self, path: Path) -> None:
        with warnings.catch_warnings():  # DCP warns that a single process saves without a group
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(self._state(), checkpoint_id=str(path))

    def save_async(self, path: Path, group, stager) -> Future:
        # DCP's writer thread warns when there is no group; a catch_warnings here would be gone
        # by then, so the filter is process-wide (this one message only)
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        # the stager stages synchronously (a CPU copy the loop may then overwrite), so DCP
        # returns the upload's Future, not an AsyncSaveResponse
        return dcp.async_save(
            self._state(), checkpoint_id=str(path), process_group=group, async_stager=stager
        )

    def load(self, path: Path) -> None:
        """Any strategy's checkpoint, at any world size. Each part takes its own keys of the
        merged state (strict=False when the rank holds a part of the model)."""
        self._init_optimizer_state()
        parts = self._parts()
        options = StateDictOptions(strict=not self.partial_model)
        if _per_group_optimizer_layout(path):
            for module, opt, alias in parts:
                _load_per_group_layout(module, opt, alias, path, options)
            return
        state = self._state()
        dcp_load(state, path)
        flat = replace(options, flatten_optimizer_state_dict=True)
        for module, opt, alias in parts:
            set_state_dict(
                module,
                opt,
                model_state_dict=state["model"],
                optim_state_dict=_renamed(state["optim"], {v: k for k, v in alias.items()}),
                options=flat,
            )

    def loss_scale(self) -> float | None:
        return self.scaler.get_scale() if self.scaler is not None else None

    def extra_state(self) -> dict:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_extra_state(self, state: dict) -> None:
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


def _renamed(flat_osd: dict, alias: dict[str, str]) -> dict:
    """A flattened optimizer state dict with parameter `a`'s keys (state.a.*, param_groups.a.*)
    under name alias[a]."""
    if not alias:
        return flat_osd
    out = {}
    for key, value in flat_osd.items():
        section, _, rest = key.partition(".")
        for held, saved in alias.items():
            if rest.startswith(held + "."):
                key = f"{section}.{saved}{rest[len(held) :]}"
                break
        out[key] = value
    return out


_GROUP_INDEX_KEY = re.compile(r"optim\.param_groups\.\d+\.")


def _per_group_optimizer_layout(path: Path) -> bool:
    """True for checkpoints in torch's default optimizer layout (written before the state was
    flattened by name, or by older DeepSpeed saves): param_groups as a list by group index
    (optim.param_groups.<index>.lr, ...params). The state keys (optim.state.<fqn>.*) are the
    same in both layouts."""
    keys = SafeFileSystemReader(path).read_metadata().state_dict_metadata
    return any(_GROUP_INDEX_KEY.match(k) for k in keys)


def _load_per_group_layout(module, opt, alias: dict[str, str], path: Path, options) -> None:
    """Load one part from a checkpoint in torch's default layout: the state by name, the groups'
    hyperparameters by group index (every part has the same two groups, decay and no decay),
    the groups' parameter lists kept as this part's own."""
    msd, osd = get_state_dict(module, opt)
    own = [g["params"] for g in osd["param_groups"]]
    osd["state"] = {alias.get(k, k): v for k, v in osd["state"].items()}
    state = {"model": msd, "optim": osd}
    dcp_load(state, path)
    back = {v: k for k, v in alias.items()}
    osd = state["optim"]
    osd["state"] = {back.get(k, k): v for k, v in osd["state"].items()}
    for group, params in zip(osd["param_groups"], own, strict=True):
        group["params"] = params
    set_state_dict(module, opt, model_state_dict=state["model"], optim_state_dict=osd, options=options)

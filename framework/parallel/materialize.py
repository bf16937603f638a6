"""Meta-device build and per-strategy materialisation of the initial weights.

The plain GPT is built on `meta` (shapes only, no memory), the parallel functions are applied
to it in the documented order, and only then does each rank allocate its part (`to_empty`) and
write its initial values:

    single / ddp / tp       the whole (tp: the rank's tp slice of the) model, before DDP wraps it
    fsdp / tp_fsdp          after `fully_shard`: only the rank's shard of every parameter
    zero1 / zero2           the whole model (DeepSpeed replicates the weights under stage 1-2)
    zero3                   `deepspeed.zero.Init`: every submodule is partitioned as it is built

Initial values are strategy- and world-size-independent by construction: each parameter comes
whole from its own CPU generator seeded by (trainer.seed, parameter name)
(`framework.model.gpt.initial_value`); a rank generates one parameter at a time and keeps its
slice (`distribute_tensor(..., src_data_rank=None)` slices locally, no communication). Chosen
over a seed checkpoint (build once, save, reshard through DCP) because it needs no storage and
no extra pass, and every rank of a 1024-GPU run gets the values of a 1-GPU run. Its cost: each
rank draws every full parameter (about 5e8 numbers/s per CPU core), and the host peak is the
largest parameter, not the rank's shard of it.

model.init_from (a Hugging Face directory or one of our checkpoints) goes through the same
writer, streamed: each parameter's full tensor is read when its turn comes (safetensors'
safe_open, or a DCP read of that one key), its local part written, and the tensor dropped, so
a rank holds its shards plus one full tensor, never the whole model.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import platform
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as tdist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from framework.checkpoint import checkpoint_readers, resolve, verify
from framework.config import Config
from framework.dist import Dist
from framework.errors import CheckpointError
from framework.hf.load import Readers, hf_import_readers
from framework.model.gpt import GPT, ModelConfig, canonical_name, holds_tied_pair, initial_value

log = logging.getLogger("framework")

Values = Callable[[str, torch.Size], torch.Tensor]
"""(parameter name, whole shape) -> the whole initial tensor on CPU."""


def meta_model(mcfg: ModelConfig) -> GPT:
    """The plain model with every parameter and buffer on `meta` (no memory, no values)."""
    with torch.device("meta"):
        return GPT(mcfg)


def initial_values(cfg: Config) -> Values:
    """Seeded per-parameter values, or model.init_from's weights read one tensor per call."""
    mcfg = cfg.model
    if not mcfg.init_from:
        seed = cfg.trainer.seed
        return lambda name, shape: initial_value(mcfg, name, shape, seed)
    # checked (config fields; missing / extra / misshaped tensors named) before any is read
    readers = init_readers(mcfg, mcfg.init_from)
    seed = cfg.trainer.seed

    def value(name: str, shape) -> torch.Tensor:
        read = readers[canonical_name(name)]
        if read is None:  # a classifier head over a language model: seeded like a fresh run's
            return initial_value(mcfg, name, shape, seed)
        return read()

    return value


def init_readers(model_cfg: ModelConfig, path: str | Path, dist: Dist | None = None) -> Readers:
    """model.init_from: our state-dict name -> a reader of that full tensor (fp32, CPU), from a
    local Hugging Face directory (it holds config.json: framework.hf.load checks it and maps the
    names) or from one of our checkpoints (a checkpoint, checkpoints/ or run dir, any strategy:
    framework.checkpoint.checkpoint_readers). Everything that can be refused is checked here,
    before any tensor is read. Nothing is held but what the caller keeps of each tensor (the
    meta build keeps only its shard). A classifier (model.num_labels) from a language model gets
    None for its head: the caller initialises it. `dist`: the ranks that share the checksum work
    of the checkpoint's verification (default: the current process group, if any)."""
    if (Path(path) / "config.json").is_file():
        return hf_import_readers(model_cfg, path)
    if dist is None and tdist.is_available() and tdist.is_initialized():
        # every rank calls this: each hashes its share of the files (verify gathers them)
        dist = Dist(rank=tdist.get_rank(), world_size=tdist.get_world_size())
    try:
        ckpt = resolve(path)
        state = verify(ckpt, dist)
    except CheckpointError as e:
        raise CheckpointError(
            f"model.init_from={path}: neither a Hugging Face directory (no config.json) nor one of "
            f"our checkpoints ({e})"
        ) from e
    return checkpoint_readers(model_cfg, ckpt, state, path)


def init_weights_from(model: GPT, path: str | Path) -> set[str]:
    """model.init_from into a materialised plain `model` (one process, whole tensors), one
    tensor at a time through init_readers. Returns the names not copied (a classifier's head
    over a language model), for the caller to initialise."""
    sd = model.state_dict()
    fresh = set()
    with torch.no_grad():
        for name, read in init_readers(model.cfg, path).items():
            if read is None:
                fresh.add(name)
            else:
                sd[name].copy_(read())
    log.info("initialised %s from %s", model.cfg.name, path)
    return fresh


@torch.no_grad()
def write_param(p: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of the whole tensor `full` into parameter `p` (plain or DTensor)."""
    if isinstance(p, DTensor):
        # src_data_rank=None: every rank holds the same `full`, so each slices its own part
        # locally (torch.chunk layout, FSDP2's _StridedShard under tp_fsdp included)
        full = full.to(device=p.device, dtype=p.dtype)
        local = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
        p.to_local().copy_(local.to_local())
    else:
        p.copy_(full)


def allocate(model: nn.Module, device: torch.device) -> None:
    """Give `model`'s parameters (only this rank's shards) storage on `device`, values unset."""
    model.to_empty(device=device)
    if holds_tied_pair(model) and model.lm_head.weight is not model.tok_emb.weight:
        # to_empty replaces each module's tensors one module at a time, which unties the
        # shared embedding / output head (FSDP2's sharded parameters keep it)
        model.lm_head.weight = model.tok_emb.weight


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, values: Values) -> None:
    """Allocate `model`'s parameters (only this rank's shards) on `device` and initialise them."""
    allocate(model, device)
    for name, p in model.named_parameters():
        write_param(p, values(name, p.shape))
    model.init_buffers()


def zero3_model(mcfg: ModelConfig, ds_config: dict, values: Values) -> GPT:
    """ZeRO-3: DeepSpeed partitions each submodule's parameters as its constructor returns
    (`zero.Init`), so no rank ever holds the whole model; then each rank writes its partition
    of every parameter's initial value (host peak: one whole parameter, as generated)."""
    import deepspeed  # seconds to import (CUDA/op probing): only the ZeRO strategies need it

    # adopt our process group first: zero.Init checks the batch sizes in ds_config against
    # DeepSpeed's own world size, which is 1 until its comm layer is initialised
    deepspeed.init_distributed(dist_backend=tdist.get_backend())
    with large_allocations_returned(), torch.no_grad():
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = GPT(mcfg, init=False)
        for name, p in model.named_parameters():
            write_zero3_partition(p, values(name, p.ds_shape))
    model.init_buffers()
    return model


# glibc's mallopt parameter (malloc.h); the threshold 1 MiB is above any small-object churn
_M_MMAP_THRESHOLD, _BUILD_MMAP_THRESHOLD, _GLIBC_MAX_THRESHOLD = -3, 1 << 20, 32 << 20


@contextlib.contextmanager
def large_allocations_returned():
    """Every allocation of 1 MiB or more gets its own mmap while the ZeRO-3 model is built, so
    a freed whole tensor goes back to the OS at once.

    Why: zero.Init allocates each module's whole parameters, then keeps a 1/W partition and frees
    the rest. glibc raises its mmap threshold to the size of each freed mapping (up to 32 MiB),
    so from the first freed 16 MiB weight on, whole tensors come from the heap, between the
    partitions that stay: the freed space is fragmented and never returned. Measured on
    gpt2-1.3b, 4 ranks: the build's peak RSS went from 2.7-2.9 GiB (0.55-0.59 of the full
    model) to 2.04 GiB (0.42) on every rank, the rest being one whole embedding (0.4 GiB) plus
    the runtime. Afterwards the threshold is set to glibc's own dynamic maximum (32 MiB) rather
    than left at 1 MiB, so the training step's allocations do not each become an mmap. No-op
    where mallopt is not glibc's."""
    mallopt = _glibc_mallopt()
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, _BUILD_MMAP_THRESHOLD)
    try:
        yield
    finally:
        if mallopt is not None:
            mallopt(_M_MMAP_THRESHOLD, _GLIBC_MAX_THRESHOLD)


def _glibc_mallopt():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None


def write_zero3_partition(p: nn.Parameter, full: torch.Tensor) -> None:
    """DeepSpeed's ZeRO-3 layout (partition_parameters.py, `_partition_param`): the flattened
    parameter, padded to a multiple of the group size, split into equal contiguous partitions;
    rank r holds elements [r * n, (r + 1) * n) in `p.ds_tensor` (n = its length). Written in
    place rather than through `GatheredParameters(modifier_rank=...)`, which would all-gather
    and broadcast every parameter: 2-3 whole copies per rank at once instead of one."""
    part = p.ds_tensor
    n = part.numel()
    start = n * tdist.get_rank(group=getattr(p, "ds_process_group", None))
    end = min(start + n, full.numel())
    part.zero_()  # the padding of the last partition
    if end <= start:
        return
    # Only the rows that hold [start, end) are flattened: reshape(-1) of the whole of a
    # non-contiguous tensor (an HF Conv1D weight, transposed) would copy all of it.
    if full.dim() > 1:
        row = full[0].numel()
        first, last = start // row, -(-end // row)
        flat, lo = full[first:last].reshape(-1), start - first * row
    else:
        flat, lo = full, start
    part[: end - start].copy_(flat[lo : lo + end - start].to(dtype=part.dtype, device=part.device))

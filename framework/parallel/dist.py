"""Process-group setup from the launcher's environment (torchrun, deepspeed --no_local_rank,
accelerate launch and srun all set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return tdist.is_available() and tdist.is_initialized()

    def barrier(self) -> None:
        if self.initialized:
            tdist.barrier()

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.initialized:
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
            t /= self.world_size
        return t

    def broadcast_object(self, obj):
        if not self.initialized:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj) -> list:
        if not self.initialized:
            return [obj]
        out = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda but no CUDA device is visible")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device: str, timeout_s: float = 1800.0) -> Dist:
    """Create the default process group when the launcher started several processes."""
    world = env_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world > 1 and not tdist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        tdist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if dev.type == "cuda" else None,
        )
    return Dist(rank, world, local_rank, dev)


def teardown(clean: bool = True) -> None:
    """Destroy the group explicitly: a process that exits with a live gloo group dies with
    'terminate called without an active exception' (SIGABRT). After an error (clean=False) no
    barrier: the other ranks may never reach it."""
    if tdist.is_available() and tdist.is_initialized():
        if clean:
            tdist.barrier()
        tdist.destroy_process_group()

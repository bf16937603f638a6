"""Process-group setup from the launcher's environment.

torchrun, deepspeed --no_local_rank and accelerate launch set RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT. `srun --ntasks-per-node=G python -m framework.train` (one Slurm task
per rank, as gpt-neox and NeMo users launch) sets only SLURM_PROCID / SLURM_NTASKS /
SLURM_LOCALID: when the torchrun variables are absent those are read instead, the rendezvous
host is the job's first node and the port is derived from the job id (two jobs sharing a node
do not collide; MASTER_ADDR / MASTER_PORT in the environment win).
"""

from __future__ import annotations

import datetime
import gc
import os
import subprocess
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


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str
    """torchrun (or any launcher setting RANK/WORLD_SIZE) | slurm (one srun task per rank) | none."""


def launch_env(env: dict | None = None) -> LaunchEnv:
    """Where this process sits in the job, from the launcher's variables (torchrun's first)."""
    env = os.environ if env is None else env
    if "RANK" in env or "WORLD_SIZE" in env:
        world = int(env.get("WORLD_SIZE", "1"))
        # A world of 1 is a launch only with the launcher's rendezvous address (torchrun,
        # deepspeed and accelerate always set MASTER_ADDR): RANK/WORLD_SIZE alone are what
        # DeepSpeed's one-process set-up (parallel/zero.py) or a stale shell export leave behind.
        launched = world > 1 or "MASTER_ADDR" in env
        return LaunchEnv(
            int(env.get("RANK", "0")), world, int(env.get("LOCAL_RANK", "0")),
            "torchrun" if launched else "none",
        )  # fmt: skip
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return LaunchEnv(
            int(env["SLURM_PROCID"]),
            int(env["SLURM_NTASKS"]),
            int(env.get("SLURM_LOCALID", "0")),
            "slurm",
        )
    return LaunchEnv(0, 1, 0, "none")


def slurm_rendezvous(env: dict) -> tuple[str, str]:
    """(MASTER_ADDR, MASTER_PORT) for a job launched as one Slurm task per rank."""
    addr = env.get("MASTER_ADDR")
    if not addr:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
        addr = first_host(nodes) if int(env.get("SLURM_NNODES", "1")) > 1 else "127.0.0.1"
    port = env.get("MASTER_PORT") or str(slurm_port(env.get("SLURM_JOB_ID", "0")))
    return addr, port


def slurm_port(job_id: str) -> int:
    """A port in [20000, 40000) derived from the job id: the same on every task of the job,
    different for two jobs on one node (launchers/slurm/train.sbatch uses the same rule)."""
    return 20000 + int(job_id or 0) % 20000


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list (`scontrol show hostnames` expands `n[01-04]`)."""
    out = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
    )
    return out.stdout.split()[0]


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda but no CUDA device is visible")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device: str, timeout_s: float = 1800.0) -> Dist:
    """Create the default process group whenever a launcher started this process, also for a
    world of 1 (a job scaled down to one GPU): ddp/fsdp/tp need a group, and a launched run
    then behaves the same at every size. One plain process gets none."""
    le = launch_env()
    world, rank, local_rank = le.world_size, le.rank, le.local_rank
    dev = pick_device(device, local_rank)
    if le.launcher == "slurm":
        addr, port = slurm_rendezvous(dict(os.environ))
        # DeepSpeed and DCP read these as a launcher would have set them
        os.environ.update(
            MASTER_ADDR=addr, MASTER_PORT=port, RANK=str(rank), WORLD_SIZE=str(world),
            LOCAL_RANK=str(local_rank),
        )  # fmt: skip
    if le.launcher != "none" and not tdist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        tdist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            timeout=timeout,
            device_id=dev if dev.type == "cuda" else None,
            store=restart_store(rank, world, timeout),
        )
    return Dist(rank, world, local_rank, dev)


def restart_store(rank: int, world: int, timeout: datetime.timedelta):
    """None (env:// as usual) on a first start. After a torchrun restart (--max-restarts), the
    launcher's store under a per-attempt prefix: torchrun's static rendezvous hands every attempt
    the same agent store, which still holds the addresses the killed attempt's ranks published;
    a rank that reads a stale one connects to a dead peer ("Gloo connectFullMesh failed ...
    Connection refused") until the timeout, so the restart fails or hangs."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if attempt == "0":
        return None
    store, _, _ = next(tdist.rendezvous("env://", rank=rank, world_size=world, timeout=timeout))
    return tdist.PrefixStore(f"framework/attempt_{attempt}", store)


def teardown(clean: bool = True) -> None:
    """Destroy the group explicitly: a process that exits with a live gloo group dies with
    'terminate called without an active exception' (SIGABRT). After an error (clean=False) no
    barrier: the other ranks may never reach it."""
    if tdist.is_available() and tdist.is_initialized():
        if clean:
            tdist.barrier()
        # Free the engine first (modules, DTensors and DeviceMeshes sit in reference cycles
        # and hold the mesh's process groups): otherwise those groups, and gloo work that
        # still references tensors, outlive destroy_process_group and are destructed during
        # interpreter shutdown, which aborts the same way (seen once in ~50 TP runs).
        gc.collect()
        tdist.destroy_process_group()

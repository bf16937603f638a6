"""Process-group setup from the launcher's environment.

torchrun, deepspeed --no_local_rank and accelerate launch set RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT. `srun --ntasks-per-node=G python -m framework.train` (one Slurm task
per rank, as gpt-neox and NeMo users launch) sets only SLURM_PROCID / SLURM_NTASKS /
SLURM_LOCALID: when the torchrun variables are absent those are read instead, the rendezvous
host is the job's first node and the port is derived from the job id (two jobs sharing a node
do not collide; MASTER_ADDR / MASTER_PORT in the environment win).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import os
import subprocess
import time
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist
from torch._C import _distributed_c10d as c10d

FLIGHT_RECORDER_ENTRIES = "2000"
"""Collectives torch's flight recorder keeps per process (a ring; set before the group exists).
A few hundred bytes each; recording one costs about 1.4 us on CPU (bench/observe.py)."""


class CollectiveLog:
    """The last collectives that Dist itself issued, for the hang record where torch's flight
    recorder has nothing (a backend without one, or TORCH_FR_BUFFER_SIZE=0). Torch's recorder
    is preferred: it also sees DDP's, FSDP's and DeepSpeed's collectives, which this does not."""

    def __init__(self, size: int = 64):
        self.seq = 0
        self.entries: deque[dict] = deque(maxlen=size)

    @contextlib.contextmanager
    def track(self, op: str, sizes: list[list[int]]):
        self.seq += 1
        entry = {"seq": self.seq, "op": op, "group": "0", "group_desc": "default_pg",
                 "sizes": sizes, "completed": False, "entered_ns": time.time_ns()}  # fmt: skip
        self.entries.append(entry)
        yield
        entry["completed"] = True


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    collectives: CollectiveLog = field(default_factory=CollectiveLog, repr=False, compare=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return tdist.is_available() and tdist.is_initialized()

    def barrier(self) -> None:
        if self.initialized:
            with self.collectives.track("barrier", []):
                tdist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.initialized:
            with self.collectives.track("all_reduce", [list(t.shape)]):
                tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.initialized:
            self.all_reduce_sum(t)
            t /= self.world_size
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """(world_size, *t.shape): every rank's `t`, stacked in rank order."""
        if not self.initialized:
            return t.unsqueeze(0)
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        with self.collectives.track("all_gather", [list(t.shape)]):
            tdist.all_gather(out, t)
        return torch.stack(out)

    def broadcast_object(self, obj):
        if not self.initialized:
            return obj
        box = [obj]
        with self.collectives.track("broadcast_object", []):
            tdist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj) -> list:
        if not self.initialized:
            return [obj]
        out = [None] * self.world_size
        with self.collectives.track("all_gather_object", []):
            tdist.all_gather_object(out, obj)
        return out

    def flight_record(self) -> dict:
        """The collectives this process last entered and completed, per process group: torch's
        flight recorder where the backend keeps one (NCCL; gloo since torch 2.8), else the
        collectives Dist issued itself. Safe to call from another thread while the main thread
        is blocked in a collective (the recorder has its own lock)."""
        entries = self.initialized and torch_flight_entries(tdist.get_backend())
        if entries:
            return {"source": "torch", "entries": entries}
        return {"source": "framework", "entries": [dict(e) for e in self.collectives.entries]}


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


def torch_flight_entries(backend: str) -> list[dict]:
    """torch's flight recorder ring (its JSON dump), one dict per collective in the same form as
    CollectiveLog's: seq (per process group, the same on every member rank), op, group, sizes,
    completed. [] where this torch or backend has no recorder."""
    # private names, but the dumps that torch's own flight-recorder tooling reads
    dump = getattr(c10d, "_dump_nccl_trace_json" if backend == "nccl" else "_dump_fr_trace_json", None)
    if dump is None:
        return []
    try:
        trace = json.loads(dump())
    except RuntimeError:  # the recorder is off (buffer size 0) in some builds
        return []
    status = trace.get("pg_status") or {}
    out = []
    for e in trace.get("entries") or []:
        group, desc = (e.get("process_group") or ["?", "?"])[:2]
        seq = e["p2p_seq_id"] if e.get("is_p2p") else e["collective_seq_id"]
        done = status.get(str(e.get("pg_id")), {}).get("last_completed_collective")
        completed = bool(e.get("retired")) or e.get("state") == "completed"
        if done is not None and not e.get("is_p2p"):
            completed = seq <= int(done)
        out.append({"seq": seq, "op": e.get("profiling_name", "?"), "group": group, "group_desc": desc,
                    "sizes": e.get("input_sizes", []), "completed": completed,
                    "entered_ns": e.get("time_created_ns", 0)})  # fmt: skip
    return out


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
        # torch's flight recorder (read by Dist.flight_record when a step hangs); a user's own
        # setting wins, 0 turns it off
        os.environ.setdefault("TORCH_FR_BUFFER_SIZE", FLIGHT_RECORDER_ENTRIES)
        os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", FLIGHT_RECORDER_ENTRIES)
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

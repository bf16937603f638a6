"""Launch framework.train on several gloo processes (CPU) through torchrun, the deepspeed
launcher or accelerate launch, and read back its losses."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.helpers import read_metrics

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]

# The parity model: RELIABILITY's tiny GPT without dropout (strategy parity compares
# arithmetic, not RNG streams), 8 steps of global batch 8 in micro-batches of 2: single
# accumulates 4 micro-batches, dp=2 accumulates 2 per rank.
PARITY = [
    "model.n_layer=2",
    "model.n_embd=64",
    "model.n_head=4",
    "model.dropout=0",
    "trainer.seq_len=32",
    "trainer.micro_batch_size=2",
    "trainer.global_batch_size=8",
    "trainer.max_steps=8",
    "trainer.eval_every=0",
    "trainer.sample_tokens=0",
    "trainer.log_every=1",
    "trainer.device=cpu",
    "optim.warmup_steps=2",
    "checkpoint.every=0",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(launcher: str, nproc: int, port: int) -> list[str]:
    """The command up to the Hydra overrides."""
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(port),
                "-m", "framework.train"]  # fmt: skip
    if launcher == "deepspeed":
        # --no_local_rank: otherwise it appends --local_rank=N, which Hydra rejects
        return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--no_local_rank",
                "--master_port", str(port), "--module", "framework.train"]  # fmt: skip
    if launcher == "accelerate":  # the shipped wrapper (MASTER_PORT from the environment)
        return ["bash", str(ROOT / "launchers/accelerate/launch.sh"), "multi_cpu", str(nproc)]
    raise ValueError(launcher)


def run_train(run_dir: Path, *overrides: str, launcher: str = "torchrun", nproc: int = 2,
              timeout_s: float = 300) -> subprocess.CompletedProcess:  # fmt: skip
    """Run framework.train to completion under `launcher`; fail with its output otherwise."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MASTER_PORT=str(port),
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")  # fmt: skip
    cmd = [*launch_cmd(launcher, nproc, port), *PARITY, f"run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-6000:]}")
    # explicit teardown: no rank may die with SIGABRT at exit
    assert "terminate called" not in out, out[-3000:]
    return proc


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def grad_norms(run_dir: Path) -> list[float]:
    """Pre-clip global gradient norm per step: unlike the loss, it sees a constant gradient
    scale (e.g. accumulation that sums instead of averaging), which AdamW's update ignores."""
    return [r["grad_norm"] for r in read_metrics(run_dir) if "loss" in r]


def max_rel_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b), (len(a), len(b))
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))

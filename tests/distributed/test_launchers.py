"""Launches a cluster user meets: two torchrun agents meeting over c10d (two "nodes" on this
host) through launchers/torchrun.sh, the deepspeed launcher over a two-entry hostfile with one
launch per node (--no_ssh --node_rank) through launchers/deepspeed.sh, and one Slurm-style task
per rank (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, no torchrun variables) as
`srun --ntasks-per-node=2 python -m framework.train` starts them. Each must train the same
losses as the 2-process torchrun run of the same strategy (bitwise: same arithmetic)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from framework.train import train
from tests.distributed.launch import BIN, PARITY, ROOT, free_port, losses, max_rel_diff, run_train
from tests.helpers import make_cfg

pytestmark = pytest.mark.slow


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}  # fmt: skip
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    env.update(extra)
    return env


def _run_all(cmds: list[tuple[list[str], dict]], timeout_s: float = 600) -> None:
    """Start every command at once (they rendezvous with each other) and require success."""
    procs = [subprocess.Popen(c, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for c, e in cmds]  # fmt: skip
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout_s)[0])
    finally:
        for p in procs:
            p.kill()
    for (c, _), p, out in zip(cmds, procs, outs):
        assert p.returncode == 0, f"{' '.join(c)} exited {p.returncode}:\n{out[-5000:]}"
        assert "terminate called" not in out, out[-3000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, sample_data):
    """strategy -> losses of the plain 2-process torchrun run."""
    root, cache = tmp_path_factory.mktemp("launch-ref"), {}

    def get(strategy: str) -> list[float]:
        if strategy not in cache:
            run_train(root / strategy, f"strategy={strategy}")
            cache[strategy] = losses(root / strategy)
        return cache[strategy]

    return get


def test_two_torchrun_agents_over_c10d(tmp_path, reference):
    port, run_dir = str(free_port()), tmp_path / "run"
    cmds = [
        (["bash", str(ROOT / "launchers/torchrun.sh"), "1", *PARITY, "strategy=ddp", f"run.dir={run_dir}"],
         _env(NNODES="2", NODE_RANK=str(node), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RDZV_ID="t2"))
        for node in (0, 1)
    ]  # fmt: skip
    _run_all(cmds)
    assert losses(run_dir) == reference("ddp")


def test_deepspeed_hostfile_one_launch_per_node(tmp_path, reference):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")  # two "nodes" on this host
    port, run_dir = str(free_port()), tmp_path / "run"
    cmds = [
        (["bash", str(ROOT / "launchers/deepspeed.sh"), "1", *PARITY, "strategy=ddp", f"run.dir={run_dir}"],
         _env(HOSTFILE=str(hostfile), NODE_RANK=str(node), MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
        for node in (0, 1)
    ]  # fmt: skip
    _run_all(cmds)
    assert losses(run_dir) == reference("ddp")


def test_one_slurm_task_per_rank(tmp_path, reference):
    """What `srun --ntasks-per-node=2 python -m framework.train strategy=ddp` gives each task
    (the port comes from the job id: no MASTER_PORT in the environment)."""
    run_dir, job = tmp_path / "run", str(free_port() - 20000 if free_port() > 20000 else 1)
    from framework.dist import slurm_port

    job = next(str(j) for j in range(int(job), int(job) + 20000) if _port_free(slurm_port(str(j))))
    cmds = [
        ([sys.executable, "-m", "framework.train", *PARITY, "strategy=ddp", f"run.dir={run_dir}"],
         _env(SLURM_PROCID=str(r), SLURM_NTASKS="2", SLURM_LOCALID=str(r), SLURM_NNODES="1",
              SLURM_JOB_ID=job, SLURM_JOB_NODELIST="localhost"))
        for r in (0, 1)
    ]  # fmt: skip
    _run_all(cmds)
    assert losses(run_dir) == reference("ddp")


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_multi_process_strategy_in_one_plain_process_is_a_config_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "framework.train", *PARITY, "strategy=ddp", f"run.dir={tmp_path}"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    err = proc.stderr
    assert "strategy=ddp needs several processes" in err and "torchrun" in err and "srun" in err
    assert "Default process group has not been initialized" not in err
    assert not (tmp_path / "checkpoints").exists()


def test_torchrun_world_of_one_runs_every_strategy(tmp_path, sample_data):
    """A job scaled down to one GPU: `torchrun --standalone --nproc_per_node 1 -m
    framework.train strategy=X` runs ddp, fsdp, tp and tp_fsdp (strategy.tp=1) and trains
    bitwise the losses of strategy=single in one plain process (one rank: the same arithmetic,
    every collective over a group of one). All five runs start at once (one wall-clock wait)."""
    steps = [*(o for o in PARITY if not o.startswith("trainer.max_steps=")), "trainer.max_steps=3"]
    torchrun = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "1", "-m", "framework.train"]
    strategies = {"ddp": [], "fsdp": [], "tp": ["strategy.tp=1"], "tp_fsdp": ["strategy.tp=1"]}
    cmds = [
        ([sys.executable, "-m", "framework.train", *steps, f"run.dir={tmp_path / 'single'}"], _env())
    ]
    cmds += [
        ([*torchrun, *steps, f"strategy={s}", *extra, f"run.dir={tmp_path / s}"], _env())
        for s, extra in strategies.items()
    ]
    _run_all(cmds)
    single = losses(tmp_path / "single")
    assert len(single) == 3
    assert {s: losses(tmp_path / s) for s in strategies} == {s: single for s in strategies}


def test_single_matches_reference_sanity(tmp_path, reference, sample_data):
    """The launch references are real training: ddp equals single within the parity tolerance."""
    train(make_cfg([*PARITY, f"run.dir={tmp_path}"]))
    assert max_rel_diff(reference("ddp"), losses(tmp_path)) <= 1e-5

"""Where a process sits in the job, from its launcher's environment (no process group)."""

from __future__ import annotations

import pytest

from framework.dist import LaunchEnv, launch_env, slurm_port, slurm_rendezvous


def test_torchrun_variables_win_over_slurm():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    assert launch_env(env) == LaunchEnv(3, 8, 1, "torchrun")


def test_torchrun_with_one_process_is_a_launch():
    """`torchrun --nproc_per_node 1`: a world of 1 that still counts as launched (every strategy
    runs, a process group is created), unlike one plain process."""
    le = launch_env({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "localhost"})
    assert (le.world_size, le.launcher) == (1, "torchrun")
    # without a rendezvous address: what DeepSpeed's one-process set-up leaves in os.environ
    assert launch_env({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}).launcher == "none"


def test_one_slurm_task_per_rank():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "1234"}
    le = launch_env(env)
    assert (le.rank, le.world_size, le.local_rank, le.launcher) == (5, 8, 1, "slurm")


def test_a_single_slurm_task_is_a_plain_process():
    """sbatch running `python -m framework.train` directly: one task, no process group."""
    assert launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).world_size == 1
    assert launch_env({}).launcher == "none"


@pytest.mark.parametrize("job, port", [("0", 20000), ("1234", 21234), ("45678", 25678)])
def test_port_from_job_id(job, port):
    assert slurm_port(job) == port


def test_rendezvous_single_node_and_overrides():
    assert slurm_rendezvous({"SLURM_JOB_ID": "7", "SLURM_NNODES": "1"}) == ("127.0.0.1", "20007")
    env = {"SLURM_JOB_ID": "7", "MASTER_ADDR": "node01", "MASTER_PORT": "1111"}
    assert slurm_rendezvous(env) == ("node01", "1111")

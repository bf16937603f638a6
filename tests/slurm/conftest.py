"""A real single-node Slurm on this machine for the `slurm` tier: Debian's slurm-wlm and munge
are installed when missing (root and apt-get needed; otherwise the tier is skipped with the
reason printed), then munged, slurmctld and slurmd are started on localhost with a config made
here (no cgroups: proctrack/linuxproc, task/none; no GPU gres). Started once per test session
and left running (a later session reuses it)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

CONF = Path("/etc/slurm/slurm.conf")
MARK = "# written by framework tests/slurm"


def _run(*cmd: str, timeout: float = 600) -> subprocess.CompletedProcess:
    # system tools only (never `framework`): any directory, this environment
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ), cwd="/"
    )


def _install() -> str | None:
    """None when Slurm is there (installing it if missing), else why it cannot be."""
    if shutil.which("sbatch") and shutil.which("slurmctld") and shutil.which("munged"):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "Slurm is not installed and cannot be (needs root and apt-get)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd="/")
        if p.returncode:
            return f"`{' '.join(cmd)}` failed: {(p.stderr or p.stdout)[-500:]}"
    return None


def _configure() -> None:
    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    if CONF.exists() and MARK not in CONF.read_text():
        return  # a real site config: leave it alone
    CONF.parent.mkdir(parents=True, exist_ok=True)
    CONF.write_text(f"""{MARK}
ClusterName=fwtest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
    for d in ("/var/spool/slurmctld", "/var/spool/slurmd", "/var/log/slurm", "/run/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)


def _start() -> str | None:
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
    if _run("pgrep", "-x", "munged").returncode:
        subprocess.run(["chown", "munge:munge", "/run/munge"], capture_output=True)
        p = _run("runuser", "-u", "munge", "--", "munged", "--force")
        if p.returncode:
            p = _run("munged", "--force")
        if p.returncode:
            return f"munged did not start: {p.stderr[-300:]}"
    for daemon in ("slurmctld", "slurmd"):
        if _run("pgrep", "-x", daemon).returncode:
            p = _run(daemon)
            if p.returncode:
                return f"{daemon} did not start: {p.stderr[-300:]}"
    deadline = time.time() + 60
    while time.time() < deadline:
        state = _run("sinfo", "-h", "-o", "%T").stdout.strip()
        if state.startswith(("idle", "mixed", "allocated")):
            return None
        if state.startswith(("down", "drain")):
            _run("scontrol", "update", f"nodename={socket.gethostname().split('.')[0]}", "state=resume")
        time.sleep(1)
    return f"the Slurm node never became idle (sinfo: {state!r})"


@pytest.fixture(scope="session")
def slurm() -> None:
    why = _install()
    if why is None:
        _configure()
        why = _start()
    if why is not None:
        print(f"\nSKIP slurm tier: {why}")
        pytest.skip(why)

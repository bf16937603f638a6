"""Issue 7 failure 10: the launch scripts find the project's environment without an activated
venv: FW_ENV (a script to source), else the repository's .venv when no virtualenv is active,
else PATH; a missing launcher command is one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.launch import ROOT, free_port
from tests.helpers import TINY, read_metrics

VENV_BIN = Path(sys.executable).parent
BARE_PATH = "/usr/bin:/bin"  # has bash and coreutils, not the venv's torchrun


def bare_env(**extra: str) -> dict[str, str]:
    """The environment of a fresh login shell: no virtualenv active, the venv not on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "FW_ENV")}
    env.update(PATH=BARE_PATH, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))
    env.update(extra)
    return env


def write_env_script(tmp_path: Path, bin_dir: Path) -> Path:
    script = tmp_path / "fw_env.sh"
    script.write_text(f'export PATH="{bin_dir}:$PATH"\n')
    return script


def bare_path_has(cmd: str) -> bool:
    return (
        subprocess.run(
            ["bash", "-c", f"command -v {cmd}"], env=bare_env(), cwd=ROOT, capture_output=True
        ).returncode
        == 0
    )


@pytest.mark.slow
def test_torchrun_sh_trains_with_fw_env(tmp_path):
    env = bare_env(FW_ENV=str(write_env_script(tmp_path, VENV_BIN)))
    run_dir = tmp_path / "run"
    cmd = ["bash", str(ROOT / "launchers/torchrun.sh"), "1", *TINY, "trainer.max_steps=2",
           "trainer.device=cpu", f"run.dir={run_dir}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]


def _stub_bin(tmp_path: Path) -> Path:
    """torchrun/deepspeed/accelerate stand-ins that record how they were called."""
    bin_dir = tmp_path / "stubs"
    bin_dir.mkdir()
    for name in ("torchrun", "deepspeed", "accelerate"):
        stub = bin_dir / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" > "{tmp_path}/called"\n')
        stub.chmod(0o755)
    return bin_dir


LAUNCHERS = {
    "torchrun": ["launchers/torchrun.sh", "2"],
    "deepspeed": ["launchers/deepspeed.sh", "2"],
    "accelerate": ["launchers/accelerate/launch.sh", "multi_cpu", "2"],
}


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_every_launcher_sources_fw_env(tmp_path, name):
    env = bare_env(FW_ENV=str(write_env_script(tmp_path, _stub_bin(tmp_path))))
    script, *args = LAUNCHERS[name]
    proc = subprocess.run(["bash", str(ROOT / script), *args, "trainer.max_steps=2"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    called = (tmp_path / "called").read_text()
    assert called.startswith(f"{name} ") and "framework.train trainer.max_steps=2" in called


@pytest.mark.skipif(bare_path_has("torchrun"), reason=f"this machine has a torchrun in {BARE_PATH}")
def test_missing_launcher_command_is_one_clear_line(tmp_path):
    # an active (empty) virtualenv: the repository's .venv is not used, and PATH lacks torchrun
    env = bare_env(VIRTUAL_ENV=str(tmp_path))
    proc = subprocess.run(["bash", str(ROOT / "launchers/torchrun.sh"), "1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 127
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "torchrun: not found on PATH" in proc.stderr and "FW_ENV" in proc.stderr
    assert "make install" in proc.stderr


def test_fw_env_naming_a_missing_file_is_refused(tmp_path):
    env = bare_env(FW_ENV=str(tmp_path / "nope.sh"))
    proc = subprocess.run(["bash", str(ROOT / "launchers/torchrun.sh"), "1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and f"FW_ENV={tmp_path / 'nope.sh'} is not a file" in proc.stderr


@pytest.mark.skipif(
    not (ROOT / ".venv/bin/torchrun").exists(),
    reason="no .venv in the repository root (make install/make test creates it)",
)
def test_repo_venv_is_used_when_no_virtualenv_is_active(tmp_path):
    """`make test` on a fresh clone made <repo>/.venv: the launcher finds it with nothing on PATH."""
    proc = subprocess.run(["bash", "-c", f'source "{ROOT}/launchers/env.sh"; fw_require torchrun; command -v torchrun'],
                          env=bare_env(), cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(ROOT / ".venv/bin/torchrun")

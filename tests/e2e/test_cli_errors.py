"""Each CLI reports the framework's own errors as one clean message (no traceback) with the
documented exit code (framework.errors); FW_DEBUG=1 adds the traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from framework.errors import EXIT_CHECKPOINT, EXIT_CONFIG, EXIT_DATA

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def cli(module: str, *args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"framework.{module}", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})},
    )


CASES = [
    # (module, overrides (tmp = the test's tmp dir), exit code, text the message must hold)
    ("train", ["data.sources=[{name: web, path: {tmp}/nope}]", "run.dir={tmp}/run", "trainer.device=cpu"],
     EXIT_DATA, "no manifest.json in {tmp}/nope"),
    ("train", ["+trainer.max_step=10", "run.dir={tmp}/run"], EXIT_CONFIG,
     "unknown key trainer.max_step (did you mean trainer.max_steps?)"),
    ("generate", ["checkpoint={tmp}/none", "prompt=hi"], EXIT_CHECKPOINT, "{tmp}/none: no committed checkpoint"),
    ("generate", ["prompt=hi"], EXIT_CONFIG, "missing mandatory value: checkpoint"),
    ("export", ["checkpoint={tmp}/none", "out={tmp}/hf"], EXIT_CHECKPOINT, "{tmp}/none: no committed checkpoint"),
    ("plan", ["strategy=ddp", "plan.world_size=3"], EXIT_CONFIG, "trainer.global_batch_size=32 is not divisible"),
    ("prepare", ["input={tmp}/none.jsonl", "output={tmp}/out"], EXIT_DATA, "input='{tmp}/none.jsonl': no such file"),
]  # fmt: skip


@pytest.mark.parametrize("module, args, code, needle", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_user_error_is_one_clean_message_with_its_exit_code(tmp_path, module, args, code, needle):
    r = cli(module, *(a.replace("{tmp}", str(tmp_path)) for a in args), cwd=tmp_path)
    assert r.returncode == code, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "Error executing job" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    errors = [i for i, ln in enumerate(lines) if ln.startswith("error: ")]
    assert len(errors) == 1, r.stderr  # one message, printed once
    assert needle.replace("{tmp}", str(tmp_path)) in r.stderr
    assert lines[-2].startswith("hint: ") and "FW_DEBUG=1" in lines[-1]
    assert r.stdout == ""  # no result line for a failed command


def test_debug_switch_adds_the_traceback_and_keeps_the_code(tmp_path):
    r = cli("generate", f"checkpoint={tmp_path}/none", "prompt=hi", cwd=tmp_path, env={"FW_DEBUG": "1"})
    assert r.returncode == EXIT_CHECKPOINT
    assert "Traceback (most recent call last)" in r.stderr and "CheckpointError" in r.stderr
    assert f"error: {tmp_path}/none: no committed checkpoint" in r.stderr


@pytest.mark.slow
def test_torchrun_config_error_prints_once_and_every_rank_exits_nonzero(tmp_path):
    # Both ranks refuse the same config before any process group: rank 0 alone prints it, both
    # exit EXIT_CONFIG, and torchrun reports the failure with a non-zero status.
    r = subprocess.run(
        [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "0", "-m", "framework.train",
         f"run.dir={tmp_path}/run", "strategy=ddp", "trainer.global_batch_size=30"],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert r.returncode != 0
    assert r.stderr.count("error: ") == 1 and "trainer.global_batch_size=30" in r.stderr, r.stderr
    assert f"exitcode  : {EXIT_CONFIG}" in r.stderr or f"exitcode: {EXIT_CONFIG}" in r.stderr, r.stderr

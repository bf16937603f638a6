"""Shared test fixtures: one generated sample corpus per session, wandb kept offline."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# The embedded sample corpus is generated once per test session into a fresh temp dir (never
# reused across sessions, so a changed generator or shard format is always exercised); the
# subprocess tests inherit it through the environment.
_ROOT = Path(tempfile.mkdtemp(prefix="fw-test-data-"))
os.environ["FW_DATA_ROOT"] = str(_ROOT)
os.environ.setdefault("WANDB_MODE", "disabled")
# DeepSpeed JIT-builds a C++ op (its CPU shared-memory all-reduce) at the first ZeRO start, behind
# a lock file in TORCH_EXTENSIONS_DIR. A build killed half-way (a timed-out test) leaves that
# lock behind and every later DeepSpeed start on the machine waits on it forever: keep the build
# inside this checkout's git-ignored .venv, so a fresh clone never waits on another run's lock.
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".venv" / "torch_extensions")
)


@pytest.fixture(scope="session")
def sample_data() -> Path:
    """The generated sample corpus (made once; generation is atomic and idempotent)."""
    from framework.data.sample import GENERATORS, generate

    for g in GENERATORS:
        generate(g, _ROOT / "sample" / g)
    return _ROOT / "sample"


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_ROOT, ignore_errors=True)

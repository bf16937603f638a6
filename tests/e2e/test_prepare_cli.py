"""`python -m framework.prepare` end to end: a Hydra app whose output the loader trains from."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from framework.config import DataConfig, SourceConfig, TrainerConfig
from framework.data.loader import MixtureLoader
from framework.data.shards import read_manifest
from framework.data.tokenizer import ByteTokenizer
from framework.errors import EXIT_DATA
from tests.helpers import run_module

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The checkout's prepare (PYTHONPATH = repo root), run in `cwd`: the test checks that
    relative outputs land there and that Hydra writes nothing into it."""
    return run_module("framework.prepare", *args, cwd=cwd, timeout=120)


def test_prepare_cli_then_train_loader_then_noop(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(3):
        lines = [json.dumps({"text": f"file {i} doc {j} " + "abc " * j}) for j in range(50)]
        (raw / f"part{i}.jsonl").write_text("\n".join(lines) + "\n")
    args = [
        f"input={raw}/*.jsonl",
        "output=prepared/web",
        "workers=2",
        "val_fraction=0.1",
        "shard_tokens=2000",
    ]
    first = cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    out = tmp_path / "prepared" / "web"
    m = read_manifest(out)
    # documents with j >= 32 back-to-back copies of "abc " are degenerate (repeat_min_copies=32)
    assert m.meta["filters"]["repetitive_documents"] == 3 * 18
    assert m.meta["documents"]["train"] + m.meta["documents"]["val"] == 150 - 3 * 18
    assert len(m.split("train")) > 1
    assert "filters: dropped 0 blank and 54 repetitive documents" in first.stderr
    assert (
        not (tmp_path / "outputs").exists() and not (tmp_path / ".hydra").exists()
    )  # Hydra writes nothing

    cfg = DataConfig(
        sources=[SourceConfig(name="web", path=str(out))], cache_dir=str(tmp_path / "cache")
    )
    batch = next(
        MixtureLoader(
            cfg,
            TrainerConfig(seq_len=32, global_batch_size=4, micro_batch_size=2, seed=0),
            ByteTokenizer(),
            257,
        )
    )
    assert batch.inputs.shape == (2, 32) and batch.inputs.max() <= 256

    again = cli(*args, cwd=tmp_path)
    assert again.returncode == 0 and "nothing to do" in again.stderr

    empty = cli(f"input={raw}/*.parquet", "output=prepared/none", cwd=tmp_path)
    assert empty.returncode == EXIT_DATA and "Traceback" not in empty.stderr
    assert f"input='{raw}/*.parquet': the pattern matched no file" in empty.stderr
    assert not (tmp_path / "prepared" / "none").exists()

"""Bad data through the real entry point: `train` refuses before the first optimizer step,
names the source and shard, and leaves no checkpoint behind (RELIABILITY C1-C4, A9)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import xxhash

from framework.config import ConfigError
from framework.data.shards import MANIFEST, DataError, SourceWriter, open_shard, read_manifest
from framework.data.tokenizer import ByteTokenizer
from framework.train import train
from tests.helpers import TINY, make_cfg
from tests.unit.test_data_shards import (
    first_train_shard,
    rewrite_manifest_entry,
    rot_one_byte,
    write_bad_ids_source,
)

REPO = Path(__file__).resolve().parents[2]


def source(path, n_docs=200, seed=0):
    rng = np.random.default_rng(seed)
    w = SourceWriter(path, ByteTokenizer(), shard_tokens=2000)
    for i in range(n_docs):
        w.add(
            "val" if i % 10 == 0 else "train", np.append(rng.integers(0, 256, rng.integers(10, 80)), 256)
        )
    w.close()
    return path


def run(tmp_path, srcs: dict, *extra):
    spec = ",".join(f"{{name:{n},path:'{p}',weight:{w}}}" for n, (p, w) in srcs.items())
    cfg = make_cfg(
        [
            *TINY,
            f"data.sources=[{spec}]",
            f"run.dir={tmp_path}/run",
            f"data.cache_dir={tmp_path}/cache",
            *extra,
        ]
    )
    train(cfg)


def assert_no_checkpoint(tmp_path):
    assert not list((tmp_path / "run").glob("checkpoints/step_*"))
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or "loss" not in metrics.read_text()


def test_good_sources_train(tmp_path):
    a, b = source(tmp_path / "a"), source(tmp_path / "b", seed=1)
    run(tmp_path, {"a": (a, 0.7), "b": (b, 0.3)}, "trainer.max_steps=2")
    assert (tmp_path / "run/checkpoints/step_00000002/COMMITTED").is_file()


def test_checksum_mismatch_refused(tmp_path):
    a = source(tmp_path / "a")
    shard = sorted(a.glob("train-*.arrow"))[1]
    rot_one_byte(shard)  # parseable, ids in range, wrong bytes
    with pytest.raises(DataError, match=rf"{shard.name}: xxh3_128 [0-9a-f]{{32}} but the manifest says"):
        run(tmp_path, {"a": (a, 1.0)})
    assert_no_checkpoint(tmp_path)


def test_truncated_shard_refused(tmp_path):
    a = source(tmp_path / "a")
    shard = sorted(a.glob("train-*.arrow"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DataError, match=rf"{shard.name}"):
        run(tmp_path, {"a": (a, 1.0)})
    assert_no_checkpoint(tmp_path)


def test_missing_source_dir_names_source(tmp_path):
    with pytest.raises(DataError, match=r"source 'ghost'.*nowhere"):
        run(tmp_path, {"ghost": (tmp_path / "nowhere", 1.0)})
    assert_no_checkpoint(tmp_path)


def test_vocabulary_larger_than_model_refused(tmp_path):
    a = source(tmp_path / "a")
    with pytest.raises(DataError, match=r"'a'.*vocab"):
        run(tmp_path, {"a": (a, 1.0)}, "model.vocab_size=200")
    assert_no_checkpoint(tmp_path)


def test_max_epochs_cap_refused_before_training(tmp_path):
    a = source(tmp_path / "a", n_docs=40)
    spec = f"data.sources=[{{name:a,path:'{a}',weight:1.0,max_epochs:1}}]"
    with pytest.raises(DataError, match=r"'a'.*max_epochs"):
        train(make_cfg([*TINY, spec, f"run.dir={tmp_path}/run", "trainer.max_steps=200"]))
    assert_no_checkpoint(tmp_path)


def test_negative_weight_refused_at_config_time(tmp_path):
    a = source(tmp_path / "a")
    with pytest.raises(ConfigError, match=r"data.sources\[0\] \(a\).weight=-0.5"):
        run(tmp_path, {"a": (a, -0.5)})
    assert not (tmp_path / "run").exists()  # refused before the run dir is even made


# The remaining bad inputs of the data issue, through `train` as well (the shard surgery is the
# unit tests' own; here the point is: refused by the entry point, nothing saved).
def test_schema_drift_refused(tmp_path):
    a = source(tmp_path / "a")
    shard = first_train_shard(a)
    toks, offsets = open_shard(shard, "uint16")
    schema = pa.schema([("input_ids", pa.list_(pa.uint16())), ("text", pa.string())])
    lists = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(toks))
    with pa.OSFile(str(shard), "wb") as f, pa.ipc.new_file(f, schema) as w:
        w.write_batch(pa.record_batch([lists, pa.array(["x"] * (len(offsets) - 1))], schema=schema))
    rewrite_manifest_entry(a, shard.name)
    with pytest.raises(DataError, match=rf"shard {shard}: schema differs.*extra column 'text'"):
        run(tmp_path, {"a": (a, 1.0)})
    assert_no_checkpoint(tmp_path)


@pytest.mark.parametrize(("dtype", "bad_id"), [("uint16", 300), ("int32", -7)])
def test_token_id_out_of_range_refused_naming_row(tmp_path, dtype, bad_id):
    shard = write_bad_ids_source(tmp_path / "a", dtype, bad_row=3, bad_id=bad_id)
    with pytest.raises(
        DataError, match=rf"shard {shard} row 3: token id {bad_id} outside the vocabulary"
    ):
        run(tmp_path, {"a": (tmp_path / "a", 1.0)}, "model.vocab_size=512")
    assert_no_checkpoint(tmp_path)


def test_dtype_too_narrow_refused(tmp_path):
    a = source(tmp_path / "a")
    m = json.loads((a / MANIFEST).read_text())
    m["vocab_size"] = 70000
    (a / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"dtype uint16 holds ids < 65536 but vocab_size is 70000"):
        run(tmp_path, {"a": (a, 1.0)}, "model.vocab_size=70000")
    assert_no_checkpoint(tmp_path)


def test_empty_source_refused(tmp_path):
    a = source(tmp_path / "a")
    empty = tmp_path / "empty"
    SourceWriter(empty, ByteTokenizer()).close()  # a manifest with no shards: 0 rows
    with pytest.raises(DataError, match=r"source 'e'.*has no train tokens"):
        run(tmp_path, {"a": (a, 0.5), "e": (empty, 0.5)})
    assert_no_checkpoint(tmp_path)


@pytest.mark.parametrize("weights", [("nan", "1.0"), ("inf", "1.0"), ("0", "0")])
def test_nan_inf_all_zero_weights_refused(tmp_path, weights):
    a, b = source(tmp_path / "a"), source(tmp_path / "b", seed=1)
    with pytest.raises(ConfigError, match=r"data.sources"):
        run(tmp_path, {"a": (a, weights[0]), "b": (b, weights[1])})
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # two trainings, one a subprocess (~15-30 s here)
def test_rotted_byte_with_mtime_restored_stops_train_cli(tmp_path):
    """Issue 8 failure 2 through `python -m framework.train`: run, flip one byte in the middle of
    a shard and restore its mtime (`touch -r`), resume: exit non-zero naming the shard and both
    hashes, and no checkpoint after the first run's."""
    a = source(tmp_path / "a")
    spec = f"data.sources=[{{name:a,path:'{a}',weight:1.0}}]"
    args = [*TINY, spec, f"run.dir={tmp_path}/run", f"data.cache_dir={tmp_path}/cache"]
    train(make_cfg([*args, "trainer.max_steps=2"]))
    shard = sorted(a.glob("train-*.arrow"))[1]
    expected = read_manifest(a).shards[[s.file for s in read_manifest(a).shards].index(shard.name)]
    rot_one_byte(shard)
    proc = subprocess.run(
        [sys.executable, "-m", "framework.train", *args, "trainer.max_steps=4"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    actual = xxhash.xxh3_128_hexdigest(shard.read_bytes())
    assert f"shard {shard}: xxh3_128 {actual} but the manifest says {expected.xxh3_128}" in out, out[
        -3000:
    ]
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000002"]

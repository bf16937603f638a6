"""Shard verification and bad input (RELIABILITY C1-C6): every error is raised while the loader
is constructed, as train.py builds it, and names the source/shard (and row)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import xxhash

from framework.config import Config, ConfigError, DataConfig, SourceConfig, TrainerConfig, validate
from framework.data import packing, shards
from framework.data.loader import MixtureLoader
from framework.data.shards import (
    MANIFEST,
    DataError,
    SourceWriter,
    open_shard,
    read_manifest,
    sha256_file,
)
from framework.data.tokenizer import ByteTokenizer, Tokenizer


def make_source(
    path: Path, n_docs: int = 60, seed: int = 0, tok: Tokenizer | None = None, shard_tokens: int = 1000
) -> Path:
    """A small byte-tokenizer source: random documents of 5..60 tokens, each ending with EOT."""
    tok = tok or ByteTokenizer()
    rng = np.random.default_rng(seed)
    w = SourceWriter(path, tok, shard_tokens=shard_tokens)
    for i in range(n_docs):
        doc = np.append(rng.integers(0, 256, rng.integers(5, 60)), tok.eot_id)
        w.add("val" if i % 10 == 0 else "train", doc)
    w.close()
    return path


def data_cfg(tmp_path: Path, **paths_weights) -> DataConfig:
    srcs = [SourceConfig(name=n, path=str(p), weight=w) for n, (p, w) in paths_weights.items()]
    return DataConfig(sources=srcs, cache_dir=str(tmp_path / "cache"))


def build(cfg: DataConfig, vocab_size: int = 257) -> MixtureLoader:
    """As train.py builds it."""
    trainer = TrainerConfig(seq_len=16, global_batch_size=4, micro_batch_size=2, seed=1337)
    return MixtureLoader(cfg, trainer, ByteTokenizer(), vocab_size)


def rewrite_manifest_entry(src: Path, file: str, **changes) -> None:
    """Make the manifest agree with a shard replaced on disk (so later checks are reached)."""
    m = json.loads((src / MANIFEST).read_text())
    for s in m["shards"]:
        if s["file"] == file:
            p = src / file
            s.update(bytes=p.stat().st_size, sha256=sha256_file(p))
            s.update(changes)
    (src / MANIFEST).write_text(json.dumps(m))


def first_train_shard(src: Path) -> Path:
    return src / read_manifest(src).split("train")[0].file


def test_roundtrip_is_zero_copy_and_exact(tmp_path):
    docs = [np.array([1, 2, 256]), np.array([7, 256]), np.array([9, 9, 9, 256])]
    rows, tokens = shards.write_shard(tmp_path / "s.arrow", docs, "uint16")
    toks, offsets = open_shard(tmp_path / "s.arrow", "uint16")
    assert (rows, tokens) == (3, 9)
    assert offsets.tolist() == [0, 3, 5, 9]
    assert toks.tolist() == [1, 2, 256, 7, 256, 9, 9, 9, 256]
    assert toks.dtype == np.uint16 and not toks.flags.owndata  # a view of the memory map


def test_good_source_builds_and_warm_start_skips_the_id_scan(tmp_path, monkeypatch):
    src = make_source(tmp_path / "a")
    cfg = data_cfg(tmp_path, a=(src, 1.0))
    calls = []
    real = shards.check_token_range
    monkeypatch.setattr(shards, "check_token_range", lambda p, *a: calls.append(p) or real(p, *a))
    build(cfg)
    assert len(calls) == len(read_manifest(src).shards)
    calls.clear()
    shards.VERIFY_CACHE.mem.clear()  # a new process: only the cache file remains
    build(cfg)
    assert calls == []  # verified.json under data.cache_dir answered
    assert (tmp_path / "cache" / "verified.json").is_file()


def test_truncated_shard_named_at_startup(tmp_path):
    src = make_source(tmp_path / "a")
    shard = first_train_shard(src)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DataError, match=rf"shard {shard}: size \d+ bytes but the manifest says \d+"):
        build(data_cfg(tmp_path, a=(src, 1.0)))


def test_truncated_ipc_footer_named_even_if_manifest_agrees(tmp_path):
    src = make_source(tmp_path / "a")
    shard = first_train_shard(src)
    shard.write_bytes(shard.read_bytes()[:-40])
    rewrite_manifest_entry(src, shard.name)
    with pytest.raises(DataError, match=rf"shard {shard} is unreadable or truncated"):
        build(data_cfg(tmp_path, a=(src, 1.0)))


def rot_one_byte(shard: Path) -> None:
    """Flip one bit of a token in the middle of a shard's data and restore its mtime (`touch -r`):
    size and mtime unchanged, still parseable, every id still in the vocabulary."""
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    toks, _ = open_shard(shard, "uint16")
    mid = len(toks) // 2 + int(np.argmax(toks[len(toks) // 2 :] < 255))  # not EOT: stays < 256
    pos = bytes(data).find(toks[mid : mid + 4].tobytes())  # a token value inside the data buffer
    data[pos] ^= 0x01  # its low byte (little-endian)
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert shard.stat().st_size == st.st_size and shard.stat().st_mtime_ns == st.st_mtime_ns
    assert open_shard(shard, "uint16")[0].shape == toks.shape


def test_manifest_records_xxh3_beside_sha256(tmp_path):
    src = make_source(tmp_path / "a")
    for info in read_manifest(src).shards:
        assert info.sha256 == sha256_file(src / info.file)
        assert info.xxh3_128 == xxhash.xxh3_128_hexdigest((src / info.file).read_bytes())


def test_rotted_byte_with_mtime_restored_stops_the_loader(tmp_path):
    """Issue 8 failure 2 at the loader level: the start-up checks and their cache pass (size and
    mtime unchanged), the first batch that reads the shard raises, naming it and both hashes."""
    src = make_source(tmp_path / "a")
    cfg = data_cfg(tmp_path, a=(src, 1.0))
    next(build(cfg))  # verified and cached once, as a first run would
    shard = first_train_shard(src)
    expected = read_manifest(src).split("train")[0].xxh3_128
    rot_one_byte(shard)
    shards.VERIFY_CACHE.mem.clear()  # a new process: only the cache file remains
    loader = build(cfg)  # the cheap checks still pass: the bytes are hashed when first read
    with pytest.raises(DataError) as e:
        for _ in range(20):
            next(loader)
    msg = str(e.value)
    actual = xxhash.xxh3_128_hexdigest(shard.read_bytes())
    assert actual != expected
    assert str(shard) in msg and expected in msg and actual in msg and "'a'" in msg


def test_rotted_byte_stops_background_workers_too(tmp_path):
    src = make_source(tmp_path / "a")
    rot_one_byte(first_train_shard(src))
    cfg = data_cfg(tmp_path, a=(src, 1.0))
    cfg.num_workers = 2
    loader = build(cfg)
    with pytest.raises(DataError, match=rf"shard {first_train_shard(src)}: xxh3_128 [0-9a-f]{{32}} but"):
        for _ in range(20):
            next(loader)
    loader.close()


def test_start_up_hashes_nothing_and_each_shard_is_hashed_once_per_process(tmp_path, monkeypatch):
    src = make_source(tmp_path / "a")
    calls = []
    real = packing.check_shard_bytes
    monkeypatch.setattr(packing, "check_shard_bytes", lambda p, *a: calls.append(p) or real(p, *a))
    loader = build(data_cfg(tmp_path, a=(src, 1.0)))
    assert calls == []  # no start-up pass over the corpus
    for _ in range(30):  # 30 steps x 4 windows of 16 tokens: more than an epoch of ~1400 tokens
        next(loader)
    train = sorted(src / s.file for s in read_manifest(src).split("train"))
    assert len(train) > 1 and sorted(calls) == train


def strip_xxh3(src: Path) -> None:
    """A manifest as written before xxh3_128 existed."""
    m = json.loads((src / MANIFEST).read_text())
    for s in m["shards"]:
        del s["xxh3_128"]
    (src / MANIFEST).write_text(json.dumps(m))


def test_old_manifest_falls_back_to_sha256_once_then_catches_rot(tmp_path, monkeypatch):
    src = make_source(tmp_path / "a")
    strip_xxh3(src)
    cfg = data_cfg(tmp_path, a=(src, 1.0))
    sha_calls = []
    real_sha = shards.hashlib.sha256
    monkeypatch.setattr(shards.hashlib, "sha256", lambda *a: sha_calls.append(1) or real_sha(*a))
    next(build(cfg))
    n_train = len(read_manifest(src).split("train"))
    assert len(sha_calls) == n_train  # the first batch touches every shard of the shuffled epoch
    shards.VERIFY_CACHE.mem.clear()  # a new process: only the cache file remains
    sha_calls.clear()
    next(build(cfg))
    assert sha_calls == []  # the remembered xxh3 of sha256-checked bytes answered
    shard = first_train_shard(src)
    rot_one_byte(shard)
    shards.VERIFY_CACHE.mem.clear()
    with pytest.raises(DataError) as e:
        next(build(cfg))
    msg = str(e.value)
    assert str(shard) in msg and xxhash.xxh3_128_hexdigest(shard.read_bytes()) in msg


def test_old_manifest_rotted_before_first_check_names_both_sha256(tmp_path):
    src = make_source(tmp_path / "a")
    strip_xxh3(src)
    shard = first_train_shard(src)
    expected = read_manifest(src).split("train")[0].sha256
    rot_one_byte(shard)
    with pytest.raises(DataError) as e:
        next(build(data_cfg(tmp_path, a=(src, 1.0))))
    assert str(shard) in str(e.value) and expected in str(e.value) and sha256_file(shard) in str(e.value)


def test_missing_shard_file_named(tmp_path):
    src = make_source(tmp_path / "a")
    shard = first_train_shard(src)
    shard.unlink()
    with pytest.raises(DataError, match=rf"shard {shard} listed in .*manifest.json is missing"):
        build(data_cfg(tmp_path, a=(src, 1.0)))


def test_missing_manifest_names_source_and_path(tmp_path):
    with pytest.raises(
        DataError, match=r"source 'web' \(data.sources path .*nowhere\).*no manifest.json"
    ):
        build(data_cfg(tmp_path, web=(tmp_path / "nowhere", 1.0)))


def test_empty_source_error_or_warning_with_renormalised_weights(tmp_path, caplog):
    a = make_source(tmp_path / "a")
    empty = tmp_path / "empty"
    SourceWriter(empty, ByteTokenizer()).close()
    cfg = data_cfg(tmp_path, a=(a, 0.5), empty=(empty, 0.5))
    with pytest.raises(DataError, match=r"source 'empty' .* has no train tokens"):
        build(cfg)
    cfg.allow_empty_source = True
    loader = build(cfg)
    assert "data source 'empty'" in caplog.text and "dropped" in caplog.text
    assert [s.name for s in loader.sources] == ["a"]
    assert loader.mixture.segments[0].weights.tolist() == [1.0]
    assert [(r.source, r.weight) for r in loader.plan(10)] == [("a", 1.0)]


@pytest.mark.parametrize(
    "schema, values, what",
    [
        (pa.schema([("tokens", pa.list_(pa.uint16()))]), np.uint16, "missing column 'input_ids'"),
        (
            pa.schema([("input_ids", pa.list_(pa.int64()))]),
            np.int64,
            "column 'input_ids' is list<item: int64>",
        ),
        (
            pa.schema([("input_ids", pa.list_(pa.uint16())), ("text", pa.string())]),
            np.uint16,
            "extra column 'text'",
        ),
    ],
)
def test_schema_drift_names_shard_and_diff(tmp_path, schema, values, what):
    src = make_source(tmp_path / "a")
    shard = first_train_shard(src)
    toks, offsets = open_shard(shard, "uint16")
    lists = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(toks.astype(values)))
    cols = [lists] + [pa.array(["x"] * (len(offsets) - 1))] * (len(schema) - 1)
    with pa.OSFile(str(shard), "wb") as f, pa.ipc.new_file(f, schema) as w:
        w.write_batch(pa.record_batch(cols, schema=schema))
    rewrite_manifest_entry(src, shard.name)
    with pytest.raises(DataError, match=rf"shard {shard}: schema differs from the manifest: .*{what}"):
        build(data_cfg(tmp_path, a=(src, 1.0)))


def write_bad_ids_source(path: Path, dtype: str, bad_row: int, bad_id: int) -> Path:
    src = make_source(path)
    shard = first_train_shard(src)
    toks, offsets = open_shard(shard, "uint16")
    vals = toks.astype(dtype)
    vals[offsets[bad_row] + 1] = bad_id
    shards.write_shard(shard, [vals[a:b] for a, b in zip(offsets[:-1], offsets[1:])], dtype)
    m = json.loads((src / MANIFEST).read_text())
    m["dtype"] = dtype
    (src / MANIFEST).write_text(json.dumps(m))
    rewrite_manifest_entry(src, shard.name)
    return shard


def test_token_id_beyond_vocab_names_shard_and_row(tmp_path):
    shard = write_bad_ids_source(tmp_path / "a", "uint16", bad_row=3, bad_id=300)
    with pytest.raises(
        DataError, match=rf"shard {shard} row 3: token id 300 outside the vocabulary \[0, 257\)"
    ):
        build(data_cfg(tmp_path, a=(tmp_path / "a", 1.0)), vocab_size=512)


def test_negative_token_id_names_shard_and_row(tmp_path):
    shard = write_bad_ids_source(tmp_path / "a", "int32", bad_row=5, bad_id=-7)
    with pytest.raises(DataError, match=rf"shard {shard} row 5: token id -7 outside the vocabulary"):
        build(data_cfg(tmp_path, a=(tmp_path / "a", 1.0)))


def test_dtype_too_narrow_for_vocab(tmp_path):
    src = make_source(tmp_path / "a")
    m = json.loads((src / MANIFEST).read_text())
    m["vocab_size"] = 70000  # uint16 holds ids < 65536
    (src / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(
        DataError, match=r"source 'a'.*dtype uint16 holds ids < 65536 but vocab_size is 70000"
    ):
        build(data_cfg(tmp_path, a=(src, 1.0)), vocab_size=70000)


def test_tokenizer_fingerprint_and_model_vocab_checked(tmp_path):
    src = make_source(tmp_path / "a")
    m = json.loads((src / MANIFEST).read_text())
    m["tokenizer_fingerprint"] = "hf-0123"
    (src / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(
        DataError, match=r"source 'a' .*\(fingerprint hf-0123\) but data.tokenizer is byte"
    ):
        build(data_cfg(tmp_path, a=(src, 1.0)))
    src2 = make_source(tmp_path / "b")
    with pytest.raises(DataError, match=r"source 'b' .* vocabulary 257 but model.vocab_size=200"):
        build(data_cfg(tmp_path, b=(src2, 1.0)), vocab_size=200)


@pytest.mark.parametrize("weights", [(-1.0, 1.0), (math.nan, 1.0), (math.inf, 1.0), (0.0, 0.0)])
def test_bad_weights_are_config_errors(tmp_path, weights):
    cfg = Config(data=data_cfg(tmp_path, a=("x", weights[0]), b=("y", weights[1])))
    with pytest.raises(ConfigError, match=r"data.sources"):
        validate(cfg)


def test_fsspec_url_cached_locally_and_verified(tmp_path):
    import fsspec

    src = make_source(tmp_path / "a")
    fs = fsspec.filesystem("memory")
    for f in src.iterdir():
        fs.pipe_file(f"/remote/a/{f.name}", f.read_bytes())
    remote = build(data_cfg(tmp_path, a=("memory://remote/a", 1.0)))
    local = build(data_cfg(tmp_path, a=(src, 1.0)))
    for _ in range(3):
        assert next(remote).inputs.tolist() == next(local).inputs.tolist()
    cached = list((tmp_path / "cache" / "sources").glob("*/train-00000.arrow"))
    assert len(cached) == 1
    # a corrupted remote copy is caught against the manifest's sha256 on download
    name = read_manifest(src).split("train")[1].file
    blob = bytearray(fs.cat_file(f"/remote/a/{name}"))
    blob[-200] ^= 0xFF
    fs.pipe_file(f"/remote/a/{name}", bytes(blob))
    for p in (tmp_path / "cache" / "sources").glob(f"*/{name}"):
        p.unlink()
    with pytest.raises(
        DataError, match=rf"memory://remote/a/{name}: downloaded sha256 [0-9a-f]+ but the manifest says"
    ):
        build(data_cfg(tmp_path, a=("memory://remote/a", 1.0)))
    assert not list((tmp_path / "cache" / "sources").glob(f"*/{name}"))  # the bad copy is not cached

"""Arrow IPC token shards and their manifest.

A prepared source directory holds `<split>-<NNNNN>.arrow` files (Arrow IPC *file* format, one
record batch, one row per document, column `input_ids: list<uint16|uint32>`, every document
ending with the tokenizer's end-of-text id) and `manifest.json`, written last.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from framework.data.tokenizer import Tokenizer

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class DataError(ValueError):
    """Bad data on disk or a bad data config; the message names the source/shard/row."""


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def shard_schema(dtype: str) -> pa.Schema:
    return pa.schema([("input_ids", pa.list_(pa.from_numpy_dtype(np.dtype(dtype))))])


@dataclass
class ShardInfo:
    file: str
    split: str
    rows: int
    tokens: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    schema_version: int
    dtype: str
    vocab_size: int
    eot_id: int
    tokenizer: str
    tokenizer_fingerprint: str
    shards: list[ShardInfo] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def split(self, split: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.split == split]

    def tokens(self, split: str = "train") -> int:
        return sum(s.tokens for s in self.split(split))


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def write_shard(path: Path, docs: list[np.ndarray], dtype: str) -> tuple[int, int]:
    """Write one shard from token arrays; returns (rows, tokens)."""
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    offsets = np.zeros(len(docs) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(docs).astype(dtype, copy=False) if docs else np.zeros(0, dtype)
    arr = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
    batch = pa.record_batch([arr], schema=shard_schema(dtype))
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return len(docs), int(lengths.sum())


class SourceWriter:
    """Accumulates documents into shards of about `shard_tokens` tokens per split, then writes
    the manifest last (`close`). Documents must already end with end-of-text."""

    def __init__(self, out_dir: str | Path, tokenizer: Tokenizer, shard_tokens: int = 1 << 24):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.tok = tokenizer
        self.dtype = dtype_for_vocab(tokenizer.vocab_size)
        self.shard_tokens = shard_tokens
        self.pending: dict[str, list[np.ndarray]] = {}
        self.pending_tokens: dict[str, int] = {}
        self.shards: list[ShardInfo] = []

    def add(self, split: str, doc: np.ndarray) -> None:
        self.pending.setdefault(split, []).append(doc)
        self.pending_tokens[split] = self.pending_tokens.get(split, 0) + len(doc)
        if self.pending_tokens[split] >= self.shard_tokens:
            self.flush(split)

    def flush(self, split: str) -> None:
        docs = self.pending.pop(split, [])
        self.pending_tokens[split] = 0
        if not docs:
            return
        n = sum(1 for s in self.shards if s.split == split)
        name = f"{split}-{n:05d}.arrow"
        rows, tokens = write_shard(self.out / name, docs, self.dtype)
        path = self.out / name
        self.shards.append(ShardInfo(name, split, rows, tokens, path.stat().st_size, sha256_file(path)))

    def close(self, meta: dict | None = None) -> Manifest:
        for split in list(self.pending):
            self.flush(split)
        m = Manifest(
            schema_version=SCHEMA_VERSION,
            dtype=self.dtype,
            vocab_size=self.tok.vocab_size,
            eot_id=self.tok.eot_id,
            tokenizer=self.tok.name,
            tokenizer_fingerprint=self.tok.fingerprint,
            shards=self.shards,
            meta=meta or {},
        )
        write_manifest(self.out, m)
        return m


def write_manifest(out_dir: Path, m: Manifest) -> None:
    tmp = out_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(asdict(m), indent=1))
    os.replace(tmp, out_dir / MANIFEST)


def read_manifest(source_dir: str | Path) -> Manifest:
    p = Path(source_dir) / MANIFEST
    if not p.is_file():
        raise DataError(f"no {MANIFEST} in {source_dir}: prepare it with `python -m framework.prepare`")
    try:
        raw = json.loads(p.read_text())
        shards = [ShardInfo(**s) for s in raw.pop("shards")]
        return Manifest(shards=shards, **raw)
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise DataError(f"{p}: unreadable manifest ({e})") from e


def open_shard(path: str | Path, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Memory-map a shard: (tokens, offsets) numpy views, zero-copy. Document i is
    tokens[offsets[i]:offsets[i+1]]. Errors name the file (pyarrow's own do not)."""
    try:
        table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"shard {path} is unreadable or truncated: {e}") from e
    expected = shard_schema(dtype)
    if not table.schema.equals(expected):
        raise DataError(f"shard {path} has schema {table.schema} but the manifest declares {expected}")
    col = table.column("input_ids")
    if col.num_chunks != 1:
        col = pa.chunked_array([pa.concat_arrays(col.chunks)])
    arr = col.chunk(0)
    offsets = arr.offsets.to_numpy()
    tokens = arr.values.to_numpy(zero_copy_only=True)
    return tokens, offsets

"""Arrow IPC token shards, their manifest, and start-up verification.

A prepared source directory holds `<split>-<NNNNN>.arrow` files (Arrow IPC *file* format, one
row per document, a single column `input_ids: list<dtype>` where dtype is the manifest's
declared unsigned type, every document ending with the tokenizer's end-of-text id) and
`manifest.json`, written last: a directory without a manifest is not a source.

Reading is zero-copy: a shard is memory-mapped and its token values and row offsets are numpy
views of the mapping. Verification is in two parts:
- at start-up (`verify_source`), the cheap checks: every shard present with the manifest's size,
  schema exactly as declared (the IPC footer parses), row and token counts as declared, and every
  id inside the vocabulary (that scan is cached by path, size and mtime);
- the bytes (`ShardHasher`): each process hashes a shard's memory map, the very bytes batches
  are copied from, when the loader first reads from it (in the prefetch path, so no start-up
  pause proportional to the corpus) and compares it with the manifest's `xxh3_128` (a fast hash
  written by prepare beside `sha256`). Nothing about the file is trusted from a cache: a rotted
  byte under an unchanged size and mtime still fails, naming the shard and both hashes.
  Manifests written before `xxh3_128` existed are checked against their sha256 instead; the
  xxh3 of bytes that matched it is then remembered under data.cache_dir (keyed by the shard's
  path, size, mtime and manifest sha256), so the slow sha256 is paid once per shard.
pyarrow alone does not name the file in its errors and silently casts or nulls mismatched
schemas; every check here names the shard (and row) and what differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import xxhash

from framework.data.tokenizer import Tokenizer
from framework.errors import DataError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
COLUMN = "input_ids"
MASK_DTYPE = "uint8"
KINDS = ("pretrain", "sft", "classify")
# dtypes a manifest may declare, with the largest vocabulary each can hold
DTYPE_MAX_VOCAB = {"uint8": 2**8, "uint16": 2**16, "uint32": 2**32, "int32": 2**31, "int64": 2**63}


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def shard_schema(dtype: str) -> pa.Schema:
    return pa.schema([(COLUMN, pa.list_(pa.from_numpy_dtype(np.dtype(dtype))))])


def is_url(path: str) -> bool:
    """An fsspec URL (s3://, gs://, memory://, file://, ...) rather than a local path."""
    return "://" in str(path)


@dataclass
class ShardInfo:
    file: str
    split: str
    rows: int
    tokens: int
    bytes: int
    sha256: str
    xxh3_128: str | None = None
    """Fast hash the loader checks on every open (None in manifests older than it: sha256 is used)."""


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
    """How the source was made: input description, prepare parameters."""
    kind: str = "pretrain"
    """pretrain (every token is a target) | sft (instruction data: `mask_shards` say which tokens
    are trained) | classify (labelled examples: `mask_shards` hold label id + 1 where a label is
    the target, see framework/data/classify.py). Manifests older than this field are pretraining
    sources."""
    mask_shards: list[ShardInfo] = field(default_factory=list)
    """sft / classify: per-token loss mask (uint8, 0 = not trained; sft 1, classify label id + 1),
    one shard per token shard with the same rows and lengths (`<split>-<NNNNN>.mask.arrow`)."""
    trained_tokens: dict[str, int] = field(default_factory=dict)
    """sft / classify: tokens with a nonzero mask per split (classify: examples)."""
    labels: list = field(default_factory=list)
    """classify only: the label of each class id, in id order (sorted, see data/classify.py)."""

    def split(self, split: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.split == split]

    def tokens(self, split: str = "train") -> int:
        return sum(s.tokens for s in self.split(split))

    def mask_manifest(self) -> Manifest | None:
        """The loss-mask shards seen as a source of their own (dtype uint8, ids 0/1): read,
        verified and packed with the same code as the tokens, in the same document order."""
        if self.kind not in ("sft", "classify"):
            return None
        values = len(self.labels) + 1 if self.kind == "classify" else 2  # the id-range check's bound
        return replace(
            self,
            kind="mask",
            dtype=MASK_DTYPE,
            vocab_size=values,
            shards=self.mask_shards,
            mask_shards=[],
        )


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def hash_file(path: str | Path, chunk: int = 1 << 22) -> tuple[str, str]:
    """(sha256, xxh3_128) hex digests of a file in one read."""
    h, x = hashlib.sha256(), xxhash.xxh3_128()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
            x.update(b)
    return h.hexdigest(), x.hexdigest()


def write_shard(path: Path, docs: list[np.ndarray], dtype: str) -> tuple[int, int]:
    """Write one shard from token arrays; returns (rows, tokens). Ids outside the dtype's range
    are refused here (numpy would wrap them silently)."""
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(docs) if docs else np.zeros(0, dtype)
    info = np.iinfo(np.dtype(dtype))
    if len(values) and (values.min() < info.min or values.max() > info.max):
        raise DataError(f"{path}: token ids [{values.min()}, {values.max()}] do not fit {dtype}")
    if offsets[-1] >= 2**31:  # list<> offsets are int32
        raise DataError(f"{path}: {offsets[-1]} tokens in one shard; use a smaller shard_tokens")
    arr = pa.ListArray.from_arrays(
        pa.array(offsets.astype(np.int32)), pa.array(values.astype(dtype, copy=False))
    )
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
        self.pending_masks: dict[str, list[np.ndarray]] = {}
        self.pending_tokens: dict[str, int] = {}
        self.shards: list[ShardInfo] = []
        self.mask_shards: list[ShardInfo] = []
        self.trained_tokens: dict[str, int] = {}

    def add(self, split: str, doc: np.ndarray, mask: np.ndarray | None = None) -> None:
        """mask (same length as doc, 1 = trained): an sft source; give it for every document
        or for none."""
        if len(doc) == 0:
            return
        if mask is not None:
            if len(mask) != len(doc):
                raise DataError(f"loss mask of {len(mask)} tokens for a document of {len(doc)}")
            self.pending_masks.setdefault(split, []).append(mask.astype(MASK_DTYPE))
            self.trained_tokens[split] = self.trained_tokens.get(split, 0) + int(np.count_nonzero(mask))
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
        path = self.out / name
        rows, tokens = write_shard(path, docs, self.dtype)
        sha, xxh = hash_file(path)
        self.shards.append(ShardInfo(name, split, rows, tokens, path.stat().st_size, sha, xxh))
        masks = self.pending_masks.pop(split, [])
        if masks:
            if len(masks) != len(docs):
                raise DataError(f"{path}: {len(masks)} loss masks for {len(docs)} documents")
            mpath = self.out / f"{split}-{n:05d}.mask.arrow"
            rows, tokens = write_shard(mpath, masks, MASK_DTYPE)
            sha, xxh = hash_file(mpath)
            self.mask_shards.append(
                ShardInfo(mpath.name, split, rows, tokens, mpath.stat().st_size, sha, xxh)
            )

    def close(
        self, meta: dict | None = None, labels: list | None = None, kind: str | None = None
    ) -> Manifest:
        """Flush and write the manifest (last). labels: a classify source's label set (id order).
        kind: the kind the caller's format writes (None: whatever the masks and labels make it),
        checked against what was added."""
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
        if self.mask_shards:
            m.kind, m.mask_shards = ("classify" if labels else "sft"), self.mask_shards
            m.labels = list(labels or [])
            m.trained_tokens = {s: self.trained_tokens.get(s, 0) for s in ("train", "val")}
        if kind is not None and kind != m.kind:
            raise DataError(
                f"{self.out}: a {kind} source, but its documents make it {m.kind} "
                f"(loss masks: {bool(self.mask_shards)}, labels: {bool(labels)})"
            )
        write_manifest(self.out, m)
        return m


def write_manifest(out_dir: Path, m: Manifest) -> None:
    raw = asdict(m)
    if m.kind == "pretrain":  # a pretraining manifest stays as it was before sft sources existed
        for key in ("kind", "mask_shards", "trained_tokens"):
            raw.pop(key)
    if m.kind != "classify":  # nor does an sft one
        raw.pop("labels")
    tmp = out_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(raw, indent=1))
    os.replace(tmp, out_dir / MANIFEST)


def read_manifest(source_dir: str | Path) -> Manifest:
    """Parse and sanity-check a manifest (declared schema version, dtype, shard fields)."""
    p = Path(source_dir) / MANIFEST
    if not p.is_file():
        raise DataError(f"no {MANIFEST} in {source_dir}: prepare it with `python -m framework.prepare`")
    try:
        raw = json.loads(p.read_text())
        shards = [ShardInfo(**s) for s in raw.pop("shards")]
        masks = [ShardInfo(**s) for s in raw.pop("mask_shards", [])]
        m = Manifest(shards=shards, mask_shards=masks, **raw)
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise DataError(f"{p}: unreadable manifest ({e})") from e
    if m.schema_version != SCHEMA_VERSION:
        raise DataError(
            f"{p}: schema_version {m.schema_version}, this framework reads {SCHEMA_VERSION}: re-run prepare"
        )
    if m.kind not in KINDS:
        raise DataError(f"{p}: kind {m.kind!r} is not one of {KINDS}: a newer prepare wrote it?")
    if m.kind == "classify" and not m.labels:
        raise DataError(f"{p}: kind classify but no labels")
    if m.kind in ("sft", "classify") and [(s.split, s.rows, s.tokens) for s in m.mask_shards] != [
        (s.split, s.rows, s.tokens) for s in m.shards
    ]:
        raise DataError(f"{p}: kind {m.kind} but its mask_shards do not match its shards row for row")
    if m.dtype not in DTYPE_MAX_VOCAB:
        raise DataError(f"{p}: dtype {m.dtype!r} is not one of {sorted(DTYPE_MAX_VOCAB)}")
    if m.vocab_size > DTYPE_MAX_VOCAB[m.dtype]:
        raise DataError(
            f"{p}: dtype {m.dtype} holds ids < {DTYPE_MAX_VOCAB[m.dtype]} but vocab_size is "
            f"{m.vocab_size}: ids would wrap; re-run prepare (it picks uint32)"
        )
    return m


def open_shard(path: str | Path, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Memory-map a shard: (tokens, offsets) numpy views, zero-copy. Document i is
    tokens[offsets[i]:offsets[i+1]]. Errors name the file (pyarrow's own do not)."""
    tokens, offsets, _ = map_shard(path, dtype)
    return tokens, offsets


def map_shard(path: str | Path, dtype: str) -> tuple[np.ndarray, np.ndarray, pa.Buffer]:
    """`open_shard` plus the whole file's mapped buffer: the tokens and offsets are views into
    that buffer, so hashing it (`check_shard_bytes`) checks exactly the bytes batches are cut from."""
    try:
        whole = pa.memory_map(str(path), "r").read_buffer()  # zero-copy: the mapping itself
        table = pa.ipc.open_file(whole).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"shard {path} is unreadable or truncated: {e}") from e
    expected = shard_schema(dtype)
    if not table.schema.remove_metadata().equals(expected):
        raise DataError(
            f"shard {path}: schema differs from the manifest: {schema_diff(table.schema, expected)}"
        )
    col = table.column(COLUMN)
    if col.num_chunks == 0:
        return np.zeros(0, dtype), np.zeros(1, np.int64), whole
    if col.num_chunks != 1:  # our writer emits one batch; a foreign writer may not (this copies)
        col = pa.chunked_array([pa.concat_arrays(col.chunks)])
    arr = col.chunk(0)
    if arr.null_count:
        raise DataError(f"shard {path}: {arr.null_count} null rows in {COLUMN}")
    offsets = arr.offsets.to_numpy()
    tokens = arr.values.to_numpy(zero_copy_only=True)
    return tokens, offsets, whole


def schema_diff(actual: pa.Schema, expected: pa.Schema) -> str:
    """Human diff of two schemas: missing, extra and retyped columns."""
    a = {f.name: f.type for f in actual}
    e = {f.name: f.type for f in expected}
    parts = [f"missing column {k!r} ({t})" for k, t in e.items() if k not in a]
    parts += [f"extra column {k!r} ({t})" for k, t in a.items() if k not in e]
    parts += [f"column {k!r} is {a[k]}, declared {e[k]}" for k in e if k in a and a[k] != e[k]]
    return "; ".join(parts) or f"{actual} vs {expected}"


# -- verification -------------------------------------------------------------------------


class _VerifyCache:
    """Start-up results keyed by (absolute path, size, mtime_ns): the id-range scan, and for
    manifests without `xxh3_128` the xxh3 of bytes that once matched the manifest's sha256. Kept
    in process and in a JSON file under the cache dir. Never used to skip hashing the bytes: only
    to skip the id scan, and to spare an old manifest's sha256 by a reference hash it vouched for."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.mem: dict[str, dict] = {}

    @staticmethod
    def key(path: Path) -> str:
        st = path.stat()
        return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"

    def _file(self, cache_dir: str | None) -> Path | None:
        return Path(cache_dir) / "verified.json" if cache_dir else None

    def get(self, key: str, cache_dir: str | None) -> dict | None:
        with self.lock:
            if key in self.mem:
                return self.mem[key]
            f = self._file(cache_dir)
            if f and f.is_file():
                try:
                    self.mem.update(json.loads(f.read_text()))
                except (json.JSONDecodeError, OSError):
                    pass  # a damaged cache only costs a re-hash
            return self.mem.get(key)

    def put(self, key: str, value: dict, cache_dir: str | None) -> None:
        with self.lock:
            self.mem[key] = value
            f = self._file(cache_dir)
            if not f:
                return
            try:
                f.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=f.parent, prefix=".verified-")
                with os.fdopen(fd, "w") as out:
                    json.dump(self.mem, out)
                os.replace(tmp, f)
            except OSError as e:  # read-only cache dir: in-process cache still works
                log.debug("cannot write %s: %s", f, e)


VERIFY_CACHE = _VerifyCache()


def verify_shard(
    path: Path, info: ShardInfo, m: Manifest, vocab_size: int, cache_dir: str | None
) -> None:
    """The start-up checks of one shard against its manifest entry: presence, size, schema,
    rows, tokens, id range (the bytes are hashed later, by `check_shard_bytes`, as the loader
    first reads them). Raises DataError naming the shard and what differs."""
    if not path.is_file():
        raise DataError(f"shard {path} listed in {path.parent / MANIFEST} is missing")
    size = path.stat().st_size
    if size != info.bytes:
        raise DataError(
            f"shard {path}: size {size} bytes but the manifest says {info.bytes} (truncated or replaced)"
        )
    tokens, offsets = open_shard(path, m.dtype)  # footer and schema: cheap, never cached
    if len(offsets) - 1 != info.rows or len(tokens) != info.tokens:
        raise DataError(
            f"shard {path}: {len(offsets) - 1} rows / {len(tokens)} tokens but the manifest says "
            f"{info.rows} rows / {info.tokens} tokens"
        )
    key = _VerifyCache.key(path)
    cached = VERIFY_CACHE.get(key, cache_dir)
    if cached and cached.get("sha256") == info.sha256 and cached.get("vocab_size", -1) <= vocab_size:
        return  # the id scan reads every token: done once per (path, size, mtime)
    check_token_range(path, tokens, offsets, vocab_size)
    VERIFY_CACHE.put(key, {**(cached or {}), "sha256": info.sha256, "vocab_size": vocab_size}, cache_dir)


def check_shard_bytes(path: Path, whole: pa.Buffer, info: ShardInfo, cache_dir: str | None) -> None:
    """Hash a shard's mapped bytes and compare with its manifest entry (xxh3_128, or for an old
    manifest sha256 once, see the module docstring). Raises DataError naming the shard and the
    expected and actual hashes."""
    actual = xxhash.xxh3_128_hexdigest(memoryview(whole))
    if info.xxh3_128 is not None:
        if actual != info.xxh3_128:
            raise DataError(
                f"shard {path}: xxh3_128 {actual} but the manifest says {info.xxh3_128} (bytes altered "
                "since prepare: restore the shard or re-run prepare)"
            )
        return
    key = _VerifyCache.key(path)
    cached = VERIFY_CACHE.get(key, cache_dir) or {}
    if cached.get("xxh3_of_sha256") == info.sha256 and cached.get("xxh3_128"):
        if actual != cached["xxh3_128"]:
            raise DataError(
                f"shard {path}: xxh3_128 {actual} but {cached['xxh3_128']} when its sha256 {info.sha256} "
                "matched the manifest (bytes altered since: restore the shard or re-run prepare)"
            )
        return
    digest = hashlib.sha256(memoryview(whole)).hexdigest()
    if digest != info.sha256:
        raise DataError(
            f"shard {path}: sha256 {digest} but the manifest says {info.sha256} (bytes altered)"
        )
    log.info("shard %s: manifest has no xxh3_128 (older prepare); sha256 checked once", path)
    VERIFY_CACHE.put(key, {**cached, "xxh3_of_sha256": info.sha256, "xxh3_128": actual}, cache_dir)


def check_token_range(path: Path, tokens: np.ndarray, offsets: np.ndarray, vocab_size: int) -> None:
    """Every id in [0, vocab_size); the first offender is reported with its row (document)."""
    if len(tokens) == 0:
        return
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo >= 0 and hi < vocab_size:
        return
    bad = int(np.flatnonzero((tokens < 0) | (tokens >= vocab_size))[0])
    row = int(np.searchsorted(offsets, bad, side="right")) - 1
    raise DataError(
        f"shard {path} row {row}: token id {int(tokens[bad])} outside the vocabulary [0, {vocab_size}) "
        f"(ids in this shard span [{lo}, {hi}])"
    )


def check_tokenizer(name: str, path: str, m: Manifest, tok: Tokenizer, vocab_size: int) -> None:
    """The shards were written by the configured tokenizer and fit the model's embedding."""
    if m.tokenizer_fingerprint != tok.fingerprint:
        raise DataError(
            f"source {name!r} ({path}) was written with tokenizer {m.tokenizer} "
            f"(fingerprint {m.tokenizer_fingerprint}) but data.tokenizer is {tok.name} ({tok.fingerprint})"
        )
    if m.vocab_size != tok.vocab_size:
        raise DataError(
            f"source {name!r} ({path}) has vocab_size {m.vocab_size} but tokenizer {tok.name} has {tok.vocab_size}"
        )
    if m.vocab_size > vocab_size:
        raise DataError(
            f"source {name!r} ({path}) has vocabulary {m.vocab_size} but model.vocab_size={vocab_size}"
        )


def verify_source(
    name: str, path: str | Path, m: Manifest, vocab_size: int, cache_dir: str | None
) -> None:
    """The start-up checks of every shard of a source (all splits) against its manifest."""
    for info in m.shards:
        try:
            verify_shard(Path(path) / info.file, info, m, vocab_size, cache_dir)
        except DataError as e:
            raise DataError(f"source {name!r}: {e}") from e
    if (mm := m.mask_manifest()) is not None:
        verify_source(name, path, mm, mm.vocab_size, cache_dir)


def localize(path: str, cache_dir: str) -> Path:
    """A local directory for a source: the path itself, or, for an fsspec URL, a copy under
    cache_dir (manifest first, then any shard missing or of the wrong size). The copy is
    verified against the manifest by `verify_source` like a local source."""
    if not is_url(path):
        return Path(path)
    fs, root = fsspec.core.url_to_fs(path)
    local = Path(cache_dir) / "sources" / hashlib.sha256(path.encode()).hexdigest()[:16]
    local.mkdir(parents=True, exist_ok=True)
    try:
        manifest_text = fs.cat_file(f"{root.rstrip('/')}/{MANIFEST}")
    except FileNotFoundError as e:
        raise DataError(f"no {MANIFEST} at {path}: prepare it with `python -m framework.prepare`") from e
    (local / (MANIFEST + ".remote")).write_bytes(manifest_text)
    m = read_manifest_text(manifest_text, path)
    for info in m.shards + m.mask_shards:
        dst = local / info.file
        if dst.is_file() and dst.stat().st_size == info.bytes:
            continue
        fd, tmp = tempfile.mkstemp(dir=local, prefix=f".{info.file}-")
        os.close(fd)
        try:
            fs.get_file(f"{root.rstrip('/')}/{info.file}", tmp)
        except FileNotFoundError as e:
            os.unlink(tmp)
            raise DataError(f"shard {path}/{info.file} listed in the manifest is missing") from e
        digest = sha256_file(tmp)
        if digest != info.sha256:  # never keep a bad copy in the cache
            os.unlink(tmp)
            raise DataError(
                f"shard {path}/{info.file}: downloaded sha256 {digest} but the manifest says {info.sha256}"
            )
        os.replace(tmp, dst)
    shutil.copyfile(local / (MANIFEST + ".remote"), local / MANIFEST)  # manifest last
    return local


def read_manifest_text(text: bytes, where: str) -> Manifest:
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / MANIFEST).write_bytes(text)
        try:
            return read_manifest(d)
        except DataError as e:
            raise DataError(str(e).replace(d, where)) from e

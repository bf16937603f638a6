"""Packing: a prepared source split as an endless token stream cut into training windows.

Epoch e of a source is its documents in a fresh seeded permutation (or in file order for
validation); epochs follow each other back to back. Window k is stream[k*T : k*T + T + 1]: its
first T tokens are inputs and its last T targets, and consecutive windows share exactly one
token (the last target of one is the first input of the next), so every token of the stream
after the first is a target exactly once: nothing lost or duplicated at document, shard or epoch boundaries.

The hot path (`gather`) is vectorised per batch: the document pieces every window covers are
found with one searchsorted over the epoch's cumulative document lengths, and each piece is
one contiguous numpy copy out of the memory-mapped shard (no Python loop over tokens).

Before the first copy out of a shard, this process hashes the shard's mapping and compares it
with the manifest (`shards.check_shard_bytes`): a gather runs in the loader's prefetch path, so
corrupt bytes stop training before they reach the model without a start-up pass over the corpus.
"""

from __future__ import annotations

import threading
import zlib
from pathlib import Path

import numpy as np

from framework.data.shards import DataError, Manifest, check_shard_bytes, map_shard


def stable_hash(name: str) -> int:
    """A process-independent hash of a source name (Python's hash() is salted per process)."""
    return zlib.crc32(name.encode())


class PackedSource:
    """One prepared source split, memory-mapped, as an endless packed token stream."""

    def __init__(
        self,
        name: str,
        path: str | Path,
        manifest: Manifest,
        split: str,
        seq_len: int,
        seed: int,
        shuffle: bool,
        cache_dir: str | None = None,
    ):
        """cache_dir: where the xxh3 of an old manifest's sha256-checked shards is remembered."""
        self.name, self.seq_len, self.seed, self.shuffle = name, seq_len, seed, shuffle
        self.manifest = manifest
        shards = manifest.split(split)
        self.tokens: list[np.ndarray] = []
        self._shards = [(Path(path) / info.file, info) for info in shards]
        self._mapped = []  # each shard's whole mapping, hashed on first use
        self._cache_dir = cache_dir
        doc_shard, doc_start, doc_len = [], [], []
        for i, info in enumerate(shards):
            toks, offsets, whole = map_shard(Path(path) / info.file, manifest.dtype)
            self._mapped.append(whole)
            if len(toks) != info.tokens or len(offsets) - 1 != info.rows:
                raise DataError(
                    f"shard {Path(path) / info.file}: {len(offsets) - 1} rows / {len(toks)} tokens "
                    f"but the manifest says {info.rows} / {info.tokens}"
                )
            self.tokens.append(toks)
            doc_shard.append(np.full(info.rows, i, dtype=np.int32))
            doc_start.append(offsets[:-1].astype(np.int64))
            doc_len.append(np.diff(offsets).astype(np.int64))
        self.doc_shard = np.concatenate(doc_shard) if shards else np.zeros(0, np.int32)
        self.doc_start = np.concatenate(doc_start) if shards else np.zeros(0, np.int64)
        self.doc_len = np.concatenate(doc_len) if shards else np.zeros(0, np.int64)
        self.epoch_tokens = int(self.doc_len.sum())
        self.dtype = np.dtype(manifest.dtype)
        self.itemsize = self.dtype.itemsize
        self._bytes = [memoryview(np.ascontiguousarray(t)).cast("B") for t in self.tokens]  # raw views
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()  # background workers share the epoch cache
        self._verified = np.zeros(len(shards), dtype=bool)
        self._all_verified = not shards
        self._verify_lock = threading.Lock()

    def _check_bytes(self, used: np.ndarray) -> None:
        """Hash the shards in `used` (indices) not yet checked by this process. Workers that need
        a shard being hashed wait for it: no byte of it is copied before it is checked."""
        todo = np.unique(used[~self._verified[used]])
        if not len(todo):
            return
        with self._verify_lock:
            for i in todo.tolist():
                if not self._verified[i]:
                    path, info = self._shards[i]
                    try:
                        check_shard_bytes(path, self._mapped[i], info, self._cache_dir)
                    except DataError as e:
                        raise DataError(f"source {self.name!r}: {e}") from e
                    self._verified[i] = True
            self._all_verified = bool(self._verified.all())

    def windows_per_epoch(self) -> float:
        return self.epoch_tokens / self.seq_len

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(cum, start, shard) of the epoch's document order: (n_docs + 1,) cumulative lengths,
        and each ordered document's first token and shard (precomputed so `gather` indexes once)."""
        with self._lock:
            if epoch in self._epochs:
                return self._epochs[epoch]
        n = len(self.doc_len)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, stable_hash(self.name)]).permutation(n)
        else:
            order = np.arange(n)
        cum = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(self.doc_len[order], out=cum[1:])
        entry = (cum, self.doc_start[order], self.doc_shard[order])
        with self._lock:
            if len(self._epochs) >= 4:  # windows only ever straddle two epochs
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = entry
        return entry

    def gather(
        self, ks: np.ndarray, out: np.ndarray, rows: np.ndarray, doc_ids: np.ndarray | None = None
    ) -> None:
        """Write window ks[i] into out[rows[i], :] (out is (B, T+1)); with doc_ids (B, T+1),
        also the index of each token's document within its window (0, 1, ...)."""
        if len(ks) == 0:
            return
        if self.epoch_tokens == 0:
            raise DataError(f"source {self.name!r} has no tokens to read")
        width, E, isz = self.seq_len + 1, self.epoch_tokens, self.itemsize
        n_win = len(ks)
        starts = np.asarray(ks, dtype=np.int64) * self.seq_len  # (n,) stream positions
        dst0 = np.arange(n_win, dtype=np.int64) * width - starts  # scratch index = dst0 + position
        # pieces are copied as raw bytes into a scratch buffer of the shard dtype (a memoryview
        # slice assignment is a bare memcpy, ~4x cheaper per piece than a casting numpy
        # assignment), then cast to the output dtype in one vectorised step
        scratch = np.empty(n_win * width, dtype=self.dtype)
        smv = memoryview(scratch).cast("B")
        marks = (
            np.zeros((n_win, width), np.int32) if doc_ids is not None else None
        )  # 1: a document starts
        first_epoch, last_epoch = int(starts.min() // E), int((starts.max() + width - 1) // E)
        for epoch in range(first_epoch, last_epoch + 1):
            base = epoch * E
            a, b, off = starts - base, starts + width - base, dst0 + base
            if first_epoch != last_epoch:  # rare: some window crosses an epoch end
                a, b = np.maximum(a, 0), np.minimum(b, E)
                sel = np.flatnonzero(a < b)
                a, b, off = a[sel], b[sel], off[sel]
            cum, start, shard = self._epoch(epoch)
            d0 = np.searchsorted(cum, a, side="right") - 1  # first document of each window
            n_pieces = np.searchsorted(cum, b - 1, side="right") - d0  # documents it touches
            if n_pieces.max() == 1:  # every window inside one document (long documents)
                d, lo, hi, off_p = d0, a, b, off
            else:
                win = np.repeat(np.arange(len(a)), n_pieces)  # (pieces,) window of each piece
                d = np.arange(len(win)) + np.repeat(d0 - (np.cumsum(n_pieces) - n_pieces), n_pieces)
                lo = np.maximum(cum[d], a[win])
                hi = np.minimum(cum[d + 1], b[win])
                off_p = off[win]
            if not self._all_verified:
                self._check_bytes(shard[d])
            src = (start[d] + (lo - cum[d])) * isz
            dst = (off_p + lo) * isz
            for sh, i, j, n in zip(
                shard[d].tolist(), src.tolist(), dst.tolist(), ((hi - lo) * isz).tolist()
            ):
                smv[j : j + n] = self._bytes[sh][i : i + n]
            if marks is not None:
                marks.reshape(-1)[dst // isz] = 1
        out[rows] = scratch.reshape(n_win, width)
        if marks is not None:
            marks[:, 0] = 0  # a window's first token is document 0 even mid-document
            doc_ids[rows] = np.cumsum(marks, axis=1)

    def window(self, k: int, out: np.ndarray) -> None:
        """One window k into out (T+1,): the slow, obvious path for tests and tools."""
        self.gather(np.array([k]), out[None, :], np.array([0]))

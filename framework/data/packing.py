"""Packing: a prepared source split as an endless token stream cut into training windows.

Epoch e of a source is its documents in a fresh seeded permutation (or in file order for
validation); epochs follow each other back to back. Window k is stream[k*T : k*T + T + 1]: its
first T tokens are inputs and its last T targets, and consecutive windows share exactly one
token (the last target of one is the first input of the next), so every token of the stream
after the first is a target exactly once: nothing lost or duplicated at document, shard or epoch boundaries.

The hot path (`gather`) is vectorised per batch: the document pieces every window covers are
found with one searchsorted over the epoch's cumulative document lengths, and each piece is
one contiguous numpy copy out of the memory-mapped shard (no Python loop over tokens).
"""

from __future__ import annotations

import threading
import zlib
from pathlib import Path

import numpy as np

from framework.data.shards import DataError, Manifest, open_shard


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
    ):
        self.name, self.seq_len, self.seed, self.shuffle = name, seq_len, seed, shuffle
        self.manifest = manifest
        shards = manifest.split(split)
        self.tokens: list[np.ndarray] = []
        doc_shard, doc_start, doc_len = [], [], []
        for i, info in enumerate(shards):
            toks, offsets = open_shard(Path(path) / info.file, manifest.dtype)
            if len(toks) != info.tokens or len(offsets) - 1 != info.rows:
                raise DataError(
                    f"shard {Path(path) / info.file}: {len(offsets) - 1} rows / {len(toks)} tokens "
                    f"but the manifest says {info.rows} / {info.tokens}"
                )
            self.tokens.append(toks)
            doc_shard.append(np.full(info.rows, i, dtype=np.int32))
            doc_start.append(offsets[:-1].astype(np.int64))
            doc_len.append(np.diff(offsets).astype(np.int64))
        cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt)  # noqa: E731
        self.doc_shard = cat(doc_shard, np.int32)
        self.doc_start = cat(doc_start, np.int64)
        self.doc_len = cat(doc_len, np.int64)
        self.epoch_tokens = int(self.doc_len.sum())
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()  # background workers share the epoch cache

    def windows_per_epoch(self) -> float:
        return self.epoch_tokens / self.seq_len

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(order, cum): document order of the epoch and its (n_docs + 1,) cumulative lengths."""
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
        with self._lock:
            if len(self._epochs) >= 4:  # windows only ever straddle two epochs
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = (order, cum)
        return order, cum

    def gather(
        self, ks: np.ndarray, out: np.ndarray, rows: np.ndarray, doc_ids: np.ndarray | None = None
    ) -> None:
        """Write window ks[i] into out[rows[i], :] (out is (B, T+1)); with doc_ids (B, T+1),
        also the index of each token's document within its window (0, 1, ...)."""
        if len(ks) == 0:
            return
        if self.epoch_tokens == 0:
            raise DataError(f"source {self.name!r} has no tokens to read")
        width = self.seq_len + 1
        starts = ks.astype(np.int64) * self.seq_len  # (n,) stream positions
        ends = starts + width
        flat = out.reshape(-1)
        marks = np.zeros_like(doc_ids) if doc_ids is not None else None  # 1 where a document starts
        first_epoch, last_epoch = (
            int(starts.min() // self.epoch_tokens),
            int((ends.max() - 1) // self.epoch_tokens),
        )
        for epoch in range(first_epoch, last_epoch + 1):
            base = epoch * self.epoch_tokens
            a = np.maximum(starts, base)
            b = np.minimum(ends, base + self.epoch_tokens)
            sel = np.flatnonzero(a < b)  # windows with tokens in this epoch
            if len(sel) == 0:
                continue
            order, cum = self._epoch(epoch)
            a, b = a[sel] - base, b[sel] - base  # epoch-relative [a, b)
            d0 = np.searchsorted(cum, a, side="right") - 1
            d1 = np.searchsorted(cum, b - 1, side="right") - 1
            n_pieces = d1 - d0 + 1  # (n,) documents each window touches
            piece_win = np.repeat(np.arange(len(sel)), n_pieces)
            first_piece = np.cumsum(n_pieces) - n_pieces
            d = d0[piece_win] + np.arange(len(piece_win)) - first_piece[piece_win]
            lo = np.maximum(cum[d], a[piece_win])
            hi = np.minimum(cum[d + 1], b[piece_win])
            doc = order[d]
            src = self.doc_start[doc] + (lo - cum[d])
            dst = rows[sel][piece_win] * width + (lo + base - starts[sel][piece_win])
            shard = self.doc_shard[doc]
            for s, i, j, n in zip(shard.tolist(), src.tolist(), dst.tolist(), (hi - lo).tolist()):
                flat[j : j + n] = self.tokens[s][i : i + n]
            if marks is not None:
                marks.reshape(-1)[dst] = 1
        if marks is not None:
            marks[:, 0] = 0  # a window's first token is document 0 even mid-document
            doc_ids[rows] = np.cumsum(marks[rows], axis=1)

    def window(self, k: int, out: np.ndarray) -> None:
        """One window k into out (T+1,): the slow, obvious path for tests and tools."""
        self.gather(np.array([k]), out[None, :], np.array([0]))

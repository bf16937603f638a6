"""Packing, weighted mixing and per-rank batching.

Global sample order (a pure function of seed, mixture, manifests and seq_len; independent of
world size and worker count):
- each source is an endless token stream: epoch e is its documents in a fresh seeded
  permutation, epochs back to back; window k of a source is stream[k*T : k*T + T + 1], so
  every token is a target exactly once (windows overlap by the one token that is both the last
  input of one and the first of the next: no token lost or duplicated at boundaries);
- global sample n goes to the source whose cumulative-weight interval holds
  frac(n * phi + offset(seed)) (a low-discrepancy sequence: realized shares stay within a few
  samples of the weights at every prefix, and since every sample has T+1 tokens, sample
  shares are token shares); its window index is the count of earlier samples of that source.
- optimizer step s (from 1) uses global samples [(s-1)*G, s*G); data-parallel rank r takes a
  contiguous slice of G/dp, cut into micro-batches.

The loader state is the global sample position plus the per-source window counters (derivable
from the position; stored so a resume needs no recount and can cross-check).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from framework.config import DataConfig
from framework.data.shards import DataError, Manifest, open_shard, read_manifest
from framework.data.tokenizer import Tokenizer

PHI = (math.sqrt(5.0) - 1.0) / 2.0


class PackedSource:
    """One prepared source split as an endless packed token stream."""

    def __init__(self, name: str, path: str, split: str, seq_len: int, seed: int, shuffle: bool):
        self.name, self.seq_len = name, seq_len
        self.manifest: Manifest = read_manifest(path)
        shards = self.manifest.split(split)
        if not shards or sum(s.tokens for s in shards) == 0:
            raise DataError(f"source {name!r} ({path}) has no {split} tokens")
        self.tokens, doc_shard, doc_start, doc_len = [], [], [], []
        for i, info in enumerate(shards):
            toks, offsets = open_shard(Path(path) / info.file, self.manifest.dtype)
            if len(toks) != info.tokens or len(offsets) - 1 != info.rows:
                raise DataError(
                    f"shard {Path(path) / info.file}: {len(offsets) - 1} rows / {len(toks)} tokens "
                    f"but the manifest says {info.rows} / {info.tokens}"
                )
            self.tokens.append(toks)
            doc_shard.append(np.full(info.rows, i, dtype=np.int32))
            doc_start.append(offsets[:-1].astype(np.int64))
            doc_len.append(np.diff(offsets).astype(np.int64))
        self.doc_shard = np.concatenate(doc_shard)
        self.doc_start = np.concatenate(doc_start)
        self.doc_len = np.concatenate(doc_len)
        self.epoch_tokens = int(self.doc_len.sum())
        self.seed, self.shuffle = seed, shuffle
        self._epoch, self._order, self._cum = -1, None, None

    def windows_per_epoch(self) -> float:
        return self.epoch_tokens / self.seq_len

    def _set_epoch(self, epoch: int) -> None:
        if epoch == self._epoch:
            return
        n = len(self.doc_len)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch, _stable_hash(self.name)])
            self._order = rng.permutation(n)
        else:
            self._order = np.arange(n)
        self._cum = np.concatenate([[0], np.cumsum(self.doc_len[self._order])])
        self._epoch = epoch

    def _read(self, pos: int, length: int, out: np.ndarray) -> None:
        """Copy stream[pos : pos+length] into out (crossing documents and epochs)."""
        filled = 0
        while filled < length:
            epoch, off = divmod(pos + filled, self.epoch_tokens)
            self._set_epoch(epoch)
            d = int(np.searchsorted(self._cum, off, side="right")) - 1
            while filled < length and d < len(self._order):
                doc = self._order[d]
                within = off - int(self._cum[d])
                take = min(int(self.doc_len[doc]) - within, length - filled)
                start = int(self.doc_start[doc]) + within
                out[filled : filled + take] = self.tokens[self.doc_shard[doc]][start : start + take]
                filled += take
                off += take
                d += 1

    def window(self, k: int, out: np.ndarray) -> None:
        self._read(k * self.seq_len, self.seq_len + 1, out)


def _stable_hash(name: str) -> int:
    return int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "little")


@dataclass
class Batch:
    """One micro-batch on the host: (B, T) int64 token ids and next-token targets."""

    inputs: torch.Tensor
    targets: torch.Tensor
    doc_ids: torch.Tensor | None = None
    """(B, T) document index within the window, when data.doc_mask keeps attention per document."""


@dataclass
class LoaderState:
    position: int = 0
    """Global samples consumed (all ranks)."""
    counts: dict[str, int] | None = None
    """Windows consumed per source."""


class MixtureLoader:
    """Yields this rank's micro-batches (inputs, targets) of shape (micro_batch_size, seq_len)."""

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: Tokenizer,
        seq_len: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        vocab_size: int,
    ):
        self.sources = [s for s in cfg.sources if s.weight > 0]
        self.packed = [
            PackedSource(s.name, s.path, "train", seq_len, seed, shuffle=True) for s in self.sources
        ]
        for s, p in zip(self.sources, self.packed):
            check_manifest(s.name, s.path, p.manifest, tokenizer, vocab_size)
        w = np.array([s.weight for s in self.sources], dtype=np.float64)
        self.weights = w / w.sum()
        self.bounds = np.cumsum(self.weights)
        self.bounds[-1] = 1.0 + 1e-12
        self.offset = (seed * PHI) % 1.0
        self.seq_len, self.G, self.mb = seq_len, global_batch_size, micro_batch_size
        self.rank, self.dp = dp_rank, dp_size
        self.per_rank = global_batch_size // dp_size
        self.state = LoaderState(0, {s.name: 0 for s in self.sources})
        self._queue: list[Batch] = []

    def source_of(self, n: np.ndarray) -> np.ndarray:
        x = (n * PHI + self.offset) % 1.0
        return np.searchsorted(self.bounds, x, side="right")

    def counts_at(self, position: int) -> dict[str, int]:
        """Windows per source consumed by the first `position` global samples (vectorised)."""
        counts = np.zeros(len(self.sources), dtype=np.int64)
        for lo in range(0, position, 1 << 22):
            src = self.source_of(np.arange(lo, min(position, lo + (1 << 22)), dtype=np.float64))
            counts += np.bincount(src, minlength=len(self.sources))
        return {s.name: int(c) for s, c in zip(self.sources, counts)}

    def next_global_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """Advance one optimizer step; return this rank's (samples, source index) slice."""
        n = np.arange(self.state.position, self.state.position + self.G, dtype=np.float64)
        src = self.source_of(n)
        buf = np.empty((self.per_rank, self.seq_len + 1), dtype=np.int64)
        lo = self.rank * self.per_rank
        counts = self.state.counts
        for i, s in enumerate(src):
            name = self.sources[s].name
            if lo <= i < lo + self.per_rank:
                self.packed[s].window(counts[name], buf[i - lo])
            counts[name] += 1
        self.state.position += self.G
        return buf, src[lo : lo + self.per_rank]

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if not self._queue:
            buf, _ = self.next_global_batch()
            t = torch.from_numpy(buf)
            self._queue = [
                Batch(t[i : i + self.mb, :-1], t[i : i + self.mb, 1:])
                for i in range(0, self.per_rank, self.mb)
            ]
        return self._queue.pop(0)

    def tokens_per_source(self) -> dict[str, int]:
        return {k: v * self.seq_len for k, v in self.state.counts.items()}

    def state_dict(self) -> dict:
        if self._queue:
            raise RuntimeError("loader state taken mid optimizer step")
        return {"position": self.state.position, "counts": dict(self.state.counts)}

    def load_state_dict(self, sd: dict) -> None:
        expected = self.counts_at(sd["position"])
        if sd.get("counts") and sd["counts"] != expected:
            raise DataError(
                f"checkpointed data counters {sd['counts']} do not match the mixture's order at "
                f"position {sd['position']} ({expected}): the data config or manifests changed"
            )
        self.state = LoaderState(int(sd["position"]), expected)
        self._queue = []


def check_manifest(name: str, path: str, m: Manifest, tok: Tokenizer, vocab_size: int) -> None:
    if m.tokenizer_fingerprint != tok.fingerprint:
        raise DataError(
            f"source {name!r} ({path}) was written with tokenizer {m.tokenizer} "
            f"(fingerprint {m.tokenizer_fingerprint}) but data.tokenizer is {tok.name} ({tok.fingerprint})"
        )
    if m.vocab_size > vocab_size:
        raise DataError(
            f"source {name!r} ({path}) has vocabulary {m.vocab_size} but model.vocab_size={vocab_size}"
        )


def val_batches(
    cfg: DataConfig, seq_len: int, micro_batch_size: int, n_batches: int, dp_rank: int, dp_size: int
) -> dict[str, list[Batch]]:
    """Fixed validation batches per source (first windows of the val split, no shuffle), this
    rank's share of them."""
    out = {}
    for s in cfg.sources:
        if s.weight <= 0:
            continue
        p = PackedSource(s.name, s.path, "val", seq_len, 0, shuffle=False)
        total = min(n_batches * micro_batch_size * dp_size, int(p.windows_per_epoch()))
        total -= total % dp_size
        mine = range(dp_rank, total, dp_size)
        buf = np.empty((len(mine), seq_len + 1), dtype=np.int64)
        for j, k in enumerate(mine):
            p.window(k, buf[j])
        t = torch.from_numpy(buf)
        out[s.name] = [
            Batch(t[i : i + micro_batch_size, :-1], t[i : i + micro_batch_size, 1:])
            for i in range(0, len(mine), micro_batch_size)
        ]
    return out

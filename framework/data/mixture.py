"""Weighted mixing: which source each global sample comes from, as a pure function.

Global sample n (counted over all ranks from the start of training) goes to the source whose
cumulative-weight interval holds frac(n * phi + frac(seed * phi)), phi the golden ratio
conjugate. That is a low-discrepancy sequence: at every prefix the realized count of each
source stays within a few samples of weight * n (far tighter than random draws, whose error
grows as sqrt(n)), and since every sample is one window of seq_len target tokens, sample shares
are token shares. The assignment depends only on n, so it is the same for any world size or
worker count, and `counts_at(position)` recomputes the per-source window counters of a resumed
run exactly.

`data.schedule` changes the weights at given optimizer steps: segment s covers global samples
[(step_s - 1) * global_batch_size, next segment's start). Each source's window counter simply
continues across segments, so a weight change neither skips nor repeats any window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from framework.data.shards import DataError

PHI = (math.sqrt(5.0) - 1.0) / 2.0
_CHUNK = 1 << 22  # samples per vectorised counting pass (bounds memory at ~100 MB)


@dataclass
class Segment:
    start: int
    """First global sample position of this segment."""
    weights: np.ndarray
    """(S,) normalised token shares of the sources."""
    bounds: np.ndarray
    """(S,) right ends of the cumulative intervals; the last positive one is +inf."""


def _bounds(weights: np.ndarray) -> np.ndarray:
    bounds = np.cumsum(weights)
    bounds[bounds >= 1.0 - 1e-12] = np.inf  # float rounding never leaves an uncovered gap at 1
    return bounds


class Mixture:
    """Source assignment of global samples, with weight segments from data.schedule."""

    def __init__(
        self,
        names: list[str],
        weights: list[float],
        schedule: list[tuple[int, dict[str, float]]],
        global_batch_size: int,
        seed: int,
    ):
        """schedule: (optimizer step from 1, {source: weight}) in increasing step order; a source
        an entry does not name keeps its previous weight."""
        self.names = list(names)
        self.offset = (seed * PHI) % 1.0
        self.segments: list[Segment] = []
        current = dict(zip(names, (float(w) for w in weights)))
        for step, changes in [(1, {})] + list(schedule):
            unknown = set(changes) - set(names)
            if unknown:
                raise DataError(f"data.schedule at step {step} names unknown sources {sorted(unknown)}")
            current.update({k: float(v) for k, v in changes.items()})
            w = np.array([current[n] for n in names], dtype=np.float64)
            if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
                raise DataError(
                    f"data weights at step {step} must be finite, >= 0 and not all 0: {current}"
                )
            w = w / w.sum()
            start = (step - 1) * global_batch_size
            if self.segments and start <= self.segments[-1].start:
                if start < self.segments[-1].start:
                    raise DataError(f"data.schedule steps must increase (step {step})")
                self.segments.pop()
            self.segments.append(Segment(start, w, _bounds(w)))

    def assign(self, lo: int, hi: int) -> np.ndarray:
        """(hi - lo,) source index of global samples lo..hi-1."""
        out = np.empty(hi - lo, dtype=np.int64)
        for i, seg in enumerate(self.segments):
            end = self.segments[i + 1].start if i + 1 < len(self.segments) else hi
            a, b = max(lo, seg.start), min(hi, end)
            if a >= b:
                continue
            x = (np.arange(a, b, dtype=np.float64) * PHI + self.offset) % 1.0
            out[a - lo : b - lo] = np.searchsorted(seg.bounds, x, side="right")
        return out

    def counts(self, lo: int, hi: int) -> np.ndarray:
        """(S,) samples per source among global samples lo..hi-1, integrated over segments."""
        counts = np.zeros(len(self.names), dtype=np.int64)
        for a in range(lo, hi, _CHUNK):
            counts += np.bincount(self.assign(a, min(hi, a + _CHUNK)), minlength=len(self.names))
        return counts

    def counts_at(self, position: int) -> np.ndarray:
        """(S,) windows per source consumed by the first `position` global samples."""
        return self.counts(0, position)


@dataclass
class PlanRow:
    """One line of the GPT-3-style mixture table."""

    source: str
    weight: float
    """Normalised token share at step 1 (later schedule segments may change it)."""
    tokens_available: int
    """Training tokens of one epoch of the source."""
    tokens_drawn: int
    """Target tokens this run draws from the source (windows x seq_len)."""
    epochs: float
    """tokens_drawn / tokens_available."""
    max_epochs: float | None = None


def format_table(rows: list[PlanRow], max_steps: int, tokens_per_step: int) -> str:
    """Human table in the layout of GPT-3's table 2.2."""
    head = f"{'source':<16} {'weight':>7} {'tokens avail':>14} {'tokens drawn':>14} {'epochs':>8} {'cap':>6}"
    lines = [
        f"data mixture for {max_steps} steps x {tokens_per_step} tokens/step "
        f"= {max_steps * tokens_per_step:,} tokens",
        head,
        "-" * len(head),
    ]
    for r in rows:
        cap = "-" if r.max_epochs is None else f"{r.max_epochs:g}"
        lines.append(
            f"{r.source:<16} {r.weight:>7.1%} {r.tokens_available:>14,} {r.tokens_drawn:>14,} "
            f"{r.epochs:>8.3f} {cap:>6}"
        )
    return "\n".join(lines)

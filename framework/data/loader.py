"""The training data loader: verified sources -> weighted mixture -> packed windows -> this
rank's micro-batches.

Global sample order is a pure function of (seed, mixture incl. schedule, manifests, seq_len):
- `mixture.Mixture` says which source global sample n comes from;
- the sample is that source's next window (`packing.PackedSource`), i.e. window k where k is the
  number of earlier samples of the same source;
- optimizer step s (from 1) uses global samples [(s-1)*G, s*G); data-parallel rank r takes the
  contiguous slice [r*G/dp, (r+1)*G/dp), cut into micro-batches.
Nothing depends on the world size or on num_workers, so a resume on another data-parallel size
continues the same global sequence.

The loader state is the global sample position plus the per-source window counters (derivable
from the position; stored so a resume cross-checks that the mixture did not change).
Every check of the data (manifests, sizes, schema, id range, emptiness, max_epochs) runs in
the constructor, so a bad source fails before the model, optimizer or a checkpoint exist; the
one exception is each shard's hash, checked in every process as the first batch that reads the
shard is built (packing.PackedSource), so it costs no start-up pass over the corpus.
"""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from framework.config import DataConfig, SourceConfig, TrainerConfig
from framework.data.mixture import Mixture, PlanRow, format_table
from framework.data.packing import PackedSource
from framework.data.sample import generate
from framework.data.shards import (
    MANIFEST,
    DataError,
    Manifest,
    check_tokenizer,
    is_url,
    localize,
    read_manifest,
    verify_source,
)
from framework.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)
EXACT_PLAN_SAMPLES = 50_000_000  # above this, the plan uses weight x samples (error < 1 window/segment)


@dataclass
class Batch:
    """One micro-batch on the host: (B, T) int64 token ids and next-token targets."""

    inputs: torch.Tensor
    targets: torch.Tensor
    doc_ids: torch.Tensor | None = None
    """(B, T) document index of each token within its window (0, 1, ...) when attention stays
    inside documents (data.attend_across_documents=false); None when every window of the
    micro-batch holds one document (plain causal attention: nothing to mask)."""
    loss_weight: float | None = None
    """sft: factor on this micro-batch's mean loss (over its trained tokens, targets != -100) that
    makes the step's loss the mean over the trained tokens of the whole global batch, whatever
    the accumulation and data-parallel size: trained_here x accum x dp / trained_global. The
    engine multiplies by it (so does the loss it reports). None: pretraining, a plain mean."""
    positions: torch.Tensor | None = None
    """(B, T) position of each token; set by context parallelism, whose chunks of a sequence
    take their positions from the whole sequence (None: the model derives them)."""


@dataclass
class Step:
    """One optimizer step's micro-batches for this rank, and the loader state after it."""

    batches: list[Batch]
    position: int
    counts: np.ndarray
    trained_tokens: int = 0
    """Target tokens of the whole global batch that carry loss (all of them when pretraining)."""
    error: str | None = None
    """Set when the step would exceed a source's max_epochs (raised when it is reached)."""


@dataclass
class LoaderState:
    position: int = 0
    """Global samples consumed (all ranks)."""
    counts: dict[str, int] | None = None
    """Windows consumed per source."""
    trained_tokens: int = 0
    """Target tokens with loss so far (all ranks); below `position x seq_len` for sft data."""


def to_batches(
    windows: np.ndarray,
    doc: np.ndarray | None,
    micro_batch_size: int,
    pin: bool,
    mask: np.ndarray | None = None,
    trained_global: int = 0,
    dp_size: int = 1,
    label_targets: bool = False,
) -> list[Batch]:
    """Micro-batches of (n, T+1) windows: inputs are the first T tokens, targets the last T.
    On CPU they are zero-copy views; with CUDA, contiguous page-locked copies, since a strided
    view would first be copied to pageable memory and the host-to-device copy could not overlap.
    mask (n, T+1) uint8, sft: targets of untrained tokens become -100 (ignored by the loss) and
    each micro-batch gets its loss_weight from trained_global, the trained targets of the global
    batch these windows belong to (see Batch.loss_weight). label_targets (classify sources): the
    mask holds label id + 1 where a label is the target, and that id becomes the target."""
    t = torch.from_numpy(windows)
    d = torch.from_numpy(doc)[:, :-1] if doc is not None else None
    parts = [
        (t[i : i + micro_batch_size], _several_docs(d, i, micro_batch_size))
        for i in range(0, len(t), micro_batch_size)
    ]
    if mask is not None:
        return [
            masked_batch(
                x, dx, mask[i * micro_batch_size : (i + 1) * micro_batch_size], w, pin, label_targets
            )
            for i, ((x, dx), w) in enumerate(
                zip(parts, loss_weights(mask, micro_batch_size, trained_global, dp_size))
            )
        ]
    if not pin:
        return [Batch(x[:, :-1], x[:, 1:], dx) for x, dx in parts]
    return [
        Batch(x[:, :-1].pin_memory(), x[:, 1:].pin_memory(), None if dx is None else dx.pin_memory())
        for x, dx in parts
    ]


def _several_docs(d: torch.Tensor | None, i: int, n: int) -> torch.Tensor | None:
    """doc_ids of micro-batch rows [i, i+n), or None when each of its windows holds one document
    (ids are non-decreasing from 0 per window: the last input's id is 0)."""
    if d is None or not d[i : i + n, -1].any():
        return None
    return d[i : i + n]


def loss_weights(
    mask: np.ndarray, micro_batch_size: int, trained_global: int, dp_size: int
) -> list[float]:
    """Batch.loss_weight of each micro-batch of this rank's (n, T+1) masks: the engine's mean over
    a micro-batch's n_m trained targets, divided by accum and averaged over dp ranks, becomes
    sum / trained_global when weighted by n_m x accum x dp / trained_global."""
    per_micro = np.array(
        [
            int(np.count_nonzero(mask[i : i + micro_batch_size, 1:]))
            for i in range(0, len(mask), micro_batch_size)
        ]
    )
    if trained_global == 0:
        return [0.0] * len(per_micro)
    scale = len(per_micro) * dp_size / trained_global
    return [float(n) * scale for n in per_micro.tolist()]


def masked_batch(
    x: torch.Tensor, dx, mask: np.ndarray, weight: float, pin: bool, label_targets: bool = False
) -> Batch:
    """One sft micro-batch: untrained targets are -100. A micro-batch without any trained target
    keeps its real targets under weight 0, so its loss and gradients are exactly zero rather than
    the NaN of a mean over nothing (every rank still runs backward: DDP/FSDP need it).
    label_targets (classify): the targets are the mask's label ids (mask - 1), -100 elsewhere."""
    targets = x[:, 1:]
    if label_targets:
        ids = torch.from_numpy(mask[:, 1:].astype(np.int64)) - 1
        targets = ids.masked_fill(ids < 0, -100)
    elif weight:
        targets = targets.masked_fill(torch.from_numpy(mask[:, 1:] == 0), -100)
    b = Batch(x[:, :-1], targets.contiguous(), dx, loss_weight=weight)
    if pin:
        b.inputs, b.targets = b.inputs.pin_memory(), b.targets.pin_memory()
        b.doc_ids = None if dx is None else dx.pin_memory()
    return b


def resolve_cache_dir(cfg: DataConfig) -> str:
    """data.cache_dir, resolving its ${oc.env:...} default when the DataConfig was built in
    Python rather than composed by Hydra."""
    if "${" not in cfg.cache_dir:
        return cfg.cache_dir
    return str(OmegaConf.create({"d": cfg.cache_dir}).d)


def ever_enabled(cfg: DataConfig) -> list[SourceConfig]:
    """Sources with a weight > 0 at step 1 or in any schedule entry; the others are disabled."""
    later = {k for e in cfg.schedule for k, w in e.weights.items() if w > 0}
    return [s for s in cfg.sources if s.weight > 0 or s.name in later]


def open_source(
    s: SourceConfig, cache_dir: str, tokenizer: Tokenizer | None = None, vocab_size: int | None = None
) -> tuple[Path, Manifest]:
    """A verified local copy of a source: generated (sample corpus) or fetched (fsspec URL) if
    needed, the manifest checked against the tokenizer and model (cheap, first), then every
    shard against the manifest. Errors name the source and path."""
    if s.generator and not is_url(s.path) and not (Path(s.path) / MANIFEST).is_file():
        generate(s.generator, s.path)
    try:
        local = localize(s.path, cache_dir)
        m = read_manifest(local)
    except DataError as e:
        raise DataError(f"source {s.name!r} (data.sources path {s.path}): {e}") from e
    if tokenizer is not None and vocab_size is not None:
        check_tokenizer(s.name, s.path, m, tokenizer, vocab_size)
    verify_source(s.name, local, m, m.vocab_size, cache_dir)
    return local, m


@dataclass(frozen=True)
class DataRank:
    """A process's coordinate among the data-parallel ranks: ranks that differ only in tensor
    (or pipeline, context) parallel share one and read the same micro-batches."""

    rank: int = 0
    size: int = 1


class MixtureLoader:
    """Yields this rank's micro-batches of shape (trainer.micro_batch_size, trainer.seq_len)."""

    def __init__(
        self,
        data: DataConfig,
        trainer: TrainerConfig,
        tokenizer: Tokenizer,
        vocab_size: int,
        rank: DataRank = DataRank(),
    ):
        """The sources of `data`, checked against `tokenizer` and the model's `vocab_size`; the
        batch shape and sample order from trainer.seq_len, global_batch_size, micro_batch_size
        and seed. A source drawn past its max_epochs is refused when a batch would exceed it;
        check_plan(max_steps) refuses the whole run's plan up front."""
        cfg, seed, seq_len = data, trainer.seed, trainer.seq_len
        global_batch_size, micro_batch_size = trainer.global_batch_size, trainer.micro_batch_size
        dp_rank, dp_size = rank.rank, rank.size
        if global_batch_size % dp_size or (global_batch_size // dp_size) % micro_batch_size:
            raise DataError(
                f"global_batch_size={global_batch_size} is not divisible by micro_batch_size="
                f"{micro_batch_size} x dp_size={dp_size}"
            )
        self.cfg, self.seq_len, self.G, self.mb = cfg, seq_len, global_batch_size, micro_batch_size
        self.rank, self.dp = dp_rank, dp_size
        self.per_rank = global_batch_size // dp_size
        cache_dir = resolve_cache_dir(cfg)

        enabled = ever_enabled(cfg)
        for s in cfg.sources:
            if s not in enabled:
                log.info("data source %r has weight 0: disabled", s.name)
        self.sources: list[SourceConfig] = []
        self.packed: list[PackedSource] = []
        self.masks: list[PackedSource | None] = []  # sft sources' loss masks, in the same order
        for s in enabled:
            local, m = open_source(s, cache_dir, tokenizer, vocab_size)
            if m.tokens("train") == 0:
                if not cfg.allow_empty_source:
                    raise DataError(
                        f"source {s.name!r} ({s.path}) has no train tokens; remove it, set its weight "
                        "to 0, or set data.allow_empty_source=true to drop it with a warning"
                    )
                log.warning(
                    "data source %r (%s) is empty: dropped, the other weights renormalised "
                    "(data.allow_empty_source=true)",
                    s.name,
                    s.path,
                )
                continue
            self.sources.append(s)
            self.packed.append(
                PackedSource(s.name, local, m, "train", seq_len, seed, shuffle=True, cache_dir=cache_dir)
            )
            mm = m.mask_manifest()  # same name, seed and lengths: the same windows, of masks
            self.masks.append(
                None
                if mm is None
                else PackedSource(
                    s.name, local, mm, "train", seq_len, seed, shuffle=True, cache_dir=cache_dir
                )
            )
        self.kinds = {s.name: p.manifest.kind for s, p in zip(self.sources, self.packed)}
        self.label_targets = "classify" in self.kinds.values()
        if not self.sources:
            raise DataError("no data source with weight > 0 has training tokens")
        names = [s.name for s in self.sources]
        schedule = [
            (e.step, {k: w for k, w in e.weights.items() if k in names})
            for e in sorted(cfg.schedule, key=lambda e: e.step)
        ]
        self.mixture = Mixture(
            names, [s.weight for s in self.sources], schedule, global_batch_size, seed
        )
        for seg in self.mixture.segments:
            for name, w in zip(names, seg.weights):
                if 0 < w * global_batch_size < 0.5:
                    log.warning(
                        "data source %r: weight %.2g is %.2f samples per global batch of %d from sample "
                        "%d: it is drawn only every few steps",
                        name,
                        w,
                        w * global_batch_size,
                        global_batch_size,
                        seg.start,
                    )
        self.cap_windows = np.array(
            [
                np.inf if s.max_epochs is None else s.max_epochs * p.windows_per_epoch()
                for s, p in zip(self.sources, self.packed)
            ]
        )
        self.masked = any(mk is not None for mk in self.masks)
        self.state = LoaderState(0, {n: 0 for n in names})
        # per-source windows beyond the mixture's count at a position: zero unless a resume on
        # changed data (data.allow_change_on_resume) kept the sources' old positions
        self._offset = np.zeros(len(names), dtype=np.int64)
        self._ready: deque[Batch] = deque()
        self._pool = (
            ThreadPoolExecutor(cfg.num_workers, thread_name_prefix="data")
            if cfg.num_workers > 0
            else None
        )
        self._pending: deque[Future] = deque()  # chunks being built by workers, in order
        self._steps: deque[Step] = deque()  # built steps not yet handed out
        self._next = (0, np.zeros(len(names), dtype=np.int64))  # where the next chunk starts
        # steps built per chunk: about 1M tokens of this rank, at most 64 steps
        self.steps_per_chunk = max(1, min(64, (1 << 20) // (self.per_rank * seq_len)))
        self._pin = torch.cuda.is_available()

    # -- the plan ---------------------------------------------------------------------------

    def plan(self, max_steps: int) -> list[PlanRow]:
        """The GPT-3-style table rows for a run of max_steps optimizer steps."""
        total = max_steps * self.G
        if total <= EXACT_PLAN_SAMPLES:
            counts = self.mixture.counts_at(total).astype(np.float64)
        else:
            counts = np.zeros(len(self.sources))
            segs = self.mixture.segments
            for i, seg in enumerate(segs):
                end = min(total, segs[i + 1].start if i + 1 < len(segs) else total)
                counts += seg.weights * max(0, end - seg.start)
        rows = []
        first = self.mixture.segments[0].weights  # normalised, after dropping empty sources
        for s, p, c, w in zip(self.sources, self.packed, counts, first):
            drawn = int(round(c)) * self.seq_len
            rows.append(
                PlanRow(
                    s.name,
                    float(w),
                    p.epoch_tokens,
                    drawn,
                    drawn / p.epoch_tokens,
                    s.max_epochs,
                )
            )
        return rows

    def check_plan(self, max_steps: int) -> None:
        """Refuse a run that would draw a source more than its max_epochs."""
        over = [r for r in self.plan(max_steps) if r.max_epochs is not None and r.epochs > r.max_epochs]
        if over:
            raise DataError(
                "the data plan exceeds max_epochs: "
                + "; ".join(
                    f"source {r.source!r} would be drawn {r.epochs:.3f} epochs ({r.tokens_drawn:,} of "
                    f"{r.tokens_available:,} tokens) > max_epochs={r.max_epochs:g}"
                    for r in over
                )
                + f" in trainer.max_steps={max_steps}: lower max_steps or the weight, or add data"
            )

    def mixture_table(self, max_steps: int) -> str:
        """The table train.py prints at start-up (source, weight, tokens available/drawn, epochs)."""
        return format_table(self.plan(max_steps), max_steps, self.G * self.seq_len)

    # -- batches ----------------------------------------------------------------------------

    def counts_at(self, position: int) -> dict[str, int]:
        """Windows per source consumed by the first `position` global samples (plus the offsets
        left by a resume on changed data, see load_state_dict)."""
        counts = self.mixture.counts_at(position) + self._offset
        return {s.name: int(c) for s, c in zip(self.sources, counts)}

    def _build_chunk(self, position: int, counts: np.ndarray, n_steps: int) -> list[Step]:
        """This rank's micro-batches of n_steps consecutive optimizer steps from global sample
        `position`, given the per-source window counters before it. Building many steps in one
        vectorised pass amortises the fixed numpy cost per gather. A pure function of its
        arguments: safe in worker threads, and its output does not depend on who calls it."""
        G, R, S = self.G, self.per_rank, len(self.packed)
        src = self.mixture.assign(position, position + n_steps * G)  # (n*G,) source of each sample
        # window index of each sample = counter before the chunk + rank among earlier samples of its source
        order = np.argsort(src, kind="stable")
        per_source = np.bincount(src, minlength=S)
        rank = np.empty_like(src)
        rank[order] = np.arange(len(src)) - np.repeat(np.cumsum(per_source) - per_source, per_source)
        ks = counts[src] + rank
        mine = (np.arange(n_steps)[:, None] * G + self.rank * R + np.arange(R)[None, :]).reshape(
            -1
        )  # (n*R,)
        src_m, ks_m = src[mine], ks[mine]
        buf = np.empty((n_steps * R, self.seq_len + 1), dtype=np.int64)
        doc = (
            np.empty((n_steps * R, self.seq_len + 1), dtype=np.int32)
            if not self.cfg.attend_across_documents
            else None
        )
        for j, packed in enumerate(self.packed):
            rows = np.flatnonzero(src_m == j)
            packed.gather(ks_m[rows], buf, rows, doc)
        mask, trained = None, np.full(n_steps, G * self.seq_len, dtype=np.int64)
        if self.masked:  # the masks of every rank's samples: the global trained-token count
            mask = np.ones((n_steps * G, self.seq_len + 1), dtype=np.uint8)
            for j, mk in enumerate(self.masks):
                if mk is not None:
                    rows = np.flatnonzero(src == j)
                    mk.gather(ks[rows], mask, rows)
            trained = np.count_nonzero(mask[:, 1:].reshape(n_steps, -1), axis=1).astype(np.int64)
            mask = mask[mine]
        step_counts = np.bincount(np.arange(len(src)) // G * S + src, minlength=n_steps * S)
        after = counts + np.cumsum(
            step_counts.reshape(n_steps, S), axis=0
        )  # (n, S) counters after each step
        steps = []
        for i in range(n_steps):
            over = np.flatnonzero(after[i] > self.cap_windows)
            error = None
            if len(over):
                s = self.sources[int(over[0])]
                error = f"source {s.name!r} would be drawn past max_epochs={s.max_epochs:g} at step {(position // G) + i + 1}"
            batches = to_batches(
                buf[i * R : (i + 1) * R],
                None if doc is None else doc[i * R : (i + 1) * R],
                self.mb,
                self._pin,
                None if mask is None else mask[i * R : (i + 1) * R],
                int(trained[i]),
                self.dp,
                self.label_targets,
            )
            steps.append(Step(batches, position + (i + 1) * G, after[i], int(trained[i]), error))
        return steps

    def _plan_next_chunk(self) -> tuple[int, np.ndarray, int]:
        """(position, counters, steps) of the next chunk to build; advances the plan cursor."""
        position, counts = self._next
        n = self.steps_per_chunk
        self._next = (
            position + n * self.G,
            counts + self.mixture.counts(position, position + n * self.G),
        )
        return position, counts, n

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if not self._ready:
            if not self._steps:
                if self._pool is None:
                    self._steps.extend(self._build_chunk(*self._plan_next_chunk()))
                else:
                    while len(self._pending) < self.cfg.num_workers:  # keep every worker a chunk ahead
                        self._pending.append(
                            self._pool.submit(self._build_chunk, *self._plan_next_chunk())
                        )
                    self._steps.extend(self._pending.popleft().result())
            step = self._steps.popleft()
            if step.error:
                raise DataError(step.error)
            # the state moves only when a step's batches are handed out (consumed), never when
            # they are built ahead
            self.state = LoaderState(
                step.position,
                {s.name: int(c) for s, c in zip(self.sources, step.counts)},
                self.state.trained_tokens + step.trained_tokens,
            )
            self._ready.extend(step.batches)
        return self._ready.popleft()

    def tokens_per_source(self) -> dict[str, int]:
        """Target tokens drawn so far per source (the data/tokens/<source> counters)."""
        out = {s.name: 0 for s in self.cfg.sources}
        out.update({k: v * self.seq_len for k, v in self.state.counts.items()})
        return out

    def trained_tokens(self) -> int:
        """Target tokens that carried loss so far, all ranks (metrics.jsonl `trained_tokens`, beside
        `tokens`, which counts every token seen)."""
        return self.state.trained_tokens

    def state_dict(self) -> dict:
        if self._ready:
            raise RuntimeError(
                "loader state taken mid optimizer step (micro-batches of the step remain)"
            )
        sd = {
            "position": self.state.position,
            "counts": dict(self.state.counts),
            "seq_len": self.seq_len,
            "trained_tokens": self.state.trained_tokens,
        }
        if self._offset.any():
            sd["offset"] = {s.name: int(o) for s, o in zip(self.sources, self._offset)}
        return sd

    def load_state_dict(self, sd: dict) -> None:
        """Resume at a global sample position (from any data-parallel size). The stored counters
        must equal the mixture's, else the data config or the manifests changed: refused, unless
        data.allow_change_on_resume, which keeps each source's window counter by name (scaled to
        the same token position if seq_len changed; a new source starts at 0)."""
        position = int(sd["position"])
        saved_seq_len = int(sd.get("seq_len", self.seq_len))
        offset = sd.get("offset", {})
        self._offset = np.array([offset.get(s.name, 0) for s in self.sources], dtype=np.int64)
        expected = self.counts_at(position)
        changed = saved_seq_len != self.seq_len or bool(sd.get("counts") and sd["counts"] != expected)
        if changed and self.cfg.allow_change_on_resume:
            expected = self._remap(sd.get("counts") or expected, saved_seq_len, position)
        elif saved_seq_len != self.seq_len:
            raise DataError(
                f"checkpointed data position is for seq_len={sd['seq_len']}, this run has {self.seq_len}"
            )
        elif changed:
            raise DataError(
                f"checkpointed data counters {sd['counts']} do not match the mixture's order at "
                f"position {position} ({expected}): the data config or manifests changed"
            )
        self._drop_prefetch()
        # checkpoints older than the counter were pretraining runs: every seen target trained
        self.state = LoaderState(
            position, expected, int(sd.get("trained_tokens", position * self.seq_len))
        )
        self._next = (position, np.array([expected[s.name] for s in self.sources], dtype=np.int64))
        self._ready.clear()

    def _remap(self, saved: dict[str, int], saved_seq_len: int, position: int) -> dict[str, int]:
        """Per-source window counters after a resume on changed data, matched by source name."""
        names = [s.name for s in self.sources]
        for name in sorted(set(saved) - set(names)):
            log.warning(
                "data source %r is gone: its position (%d windows) is dropped", name, saved[name]
            )
        for name in sorted(set(names) - set(saved)):
            log.warning("data source %r is new: it starts at its first window", name)
        # the same token position in each source's stream (exact when seq_len did not change)
        counts = np.array(
            [saved.get(n, 0) * saved_seq_len // self.seq_len for n in names], dtype=np.int64
        )
        self._offset = counts - self.mixture.counts_at(position)
        return dict(zip(names, counts.tolist()))

    def _drop_prefetch(self) -> None:
        for fut in self._pending:
            fut.cancel()
        self._pending.clear()
        self._steps.clear()

    def close(self) -> None:
        """Stop background workers (idempotent)."""
        self._drop_prefetch()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def val_batches(
    data: DataConfig, trainer: TrainerConfig, rank: DataRank = DataRank()
) -> dict[str, list[Batch]]:
    """Fixed validation batches per source: trainer.eval_batches micro-batches on every rank
    from the first windows of the val split in file order, this rank's share of them (window k
    goes to rank k % size). A source without a val split is skipped with a warning."""
    cfg, seq_len, micro_batch_size = data, trainer.seq_len, trainer.micro_batch_size
    n_batches, dp_rank, dp_size = trainer.eval_batches, rank.rank, rank.size
    cache_dir = resolve_cache_dir(cfg)
    out = {}
    for s in ever_enabled(cfg):
        local, m = open_source(s, cache_dir)
        if m.tokens("val") == 0:
            log.warning("data source %r has no val split: no validation loss for it", s.name)
            continue
        p = PackedSource(s.name, local, m, "val", seq_len, 0, shuffle=False, cache_dir=cache_dir)
        total = min(n_batches * micro_batch_size * dp_size, (p.epoch_tokens - 1) // seq_len)
        total -= total % dp_size
        mine = np.arange(dp_rank, total, dp_size)
        buf = np.empty((len(mine), seq_len + 1), dtype=np.int64)
        doc = (
            np.empty((len(mine), seq_len + 1), dtype=np.int32)
            if not cfg.attend_across_documents
            else None
        )
        p.gather(mine, buf, np.arange(len(mine)), doc)
        mask, trained = None, 0
        if (mm := m.mask_manifest()) is not None:  # every rank's val masks: the global count
            every = np.ones((total, seq_len + 1), dtype=np.uint8)
            pm = PackedSource(s.name, local, mm, "val", seq_len, 0, shuffle=False, cache_dir=cache_dir)
            pm.gather(np.arange(total), every, np.arange(total))
            mask, trained = every[mine], int(np.count_nonzero(every[:, 1:]))
        out[s.name] = to_batches(
            buf, doc, micro_batch_size, torch.cuda.is_available(), mask, trained, dp_size,
            m.kind == "classify",
        )  # fmt: skip
    return out

"""Document policies of `prepare` (RELIABILITY C7, C8): blank and degenerate documents are dropped,
over-long ones split, truncated or dropped, and every decision is counted (manifest meta.filters).

- blank: an empty or all-whitespace text would be a row of one end-of-text token (an "all-pad row").
- repetitive (the OLMo 2 lesson: loss spikes traced to documents holding long runs of one repeated
  n-gram): a document is dropped when some n-gram of 1..repeat_max_ngram tokens follows itself
  back to back repeat_min_copies times or more (defaults 13 and 32, OLMo 2's). On the byte
  tokenizer an n-gram is bytes, so a 32-character rule line "-----..." already counts: raise
  repeat_min_copies there if such lines matter.
- long: a document whose row (text tokens + end-of-text) exceeds max_doc_tokens is split into
  rows of at most max_doc_tokens, each ending with end-of-text (pieces are shuffled as documents
  in training), truncated to its first max_doc_tokens - 1 tokens, or dropped.

All of it is a pure function of each document, so the output does not depend on `workers` or
`docs_per_task`. The repetition test runs vectorised over a whole chunk (one numpy pass per
n-gram length), not per document, so it costs little next to tokenizing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LONG_DOCS = ("split", "truncate", "drop")
COUNTERS = (
    "blank_documents",
    "repetitive_documents",
    "repetitive_tokens",
    "long_split_documents",
    "long_split_pieces",
    "long_truncated_documents",
    "long_truncated_tokens",
    "long_dropped_documents",
    "long_dropped_tokens",
)
"""meta.filters keys. *_tokens count the tokens (end-of-text included) that did not reach a shard;
long_split_pieces counts the rows the split documents became."""


@dataclass(frozen=True)
class DocPolicy:
    drop_blank: bool = True
    repeat_min_copies: int | None = 32
    repeat_max_ngram: int = 13
    long_docs: str = "split"
    max_doc_tokens: int | None = None


def new_counts() -> dict[str, int]:
    return dict.fromkeys(COUNTERS, 0)


def repetitive_docs(
    flat: np.ndarray, ends: np.ndarray, eot: int, min_copies: int, max_ngram: int
) -> np.ndarray:
    """Bool per document: does it hold >= min_copies back-to-back copies of one n-gram of
    1..max_ngram tokens? flat: the chunk's documents concatenated, each ending with eot;
    ends: cumulative document lengths (exclusive end offsets).

    For period p, let eq[i] = flat[i] == flat[i + p] and flat[i + p] is not end-of-text (so no run
    crosses a document boundary). A run of r true positions means flat[i : i + r + p] repeats with
    period p, i.e. (r + p) / p copies: the test is a run of need = (min_copies - 1) * p. Such a run
    holds two consecutive multiples of s = need // 2, so eq is first evaluated only there (2/need
    of the chunk: this keeps the filter cheap next to tokenizing); each such pair is then settled
    exactly from the 2 * need - 1 positions around it, the only ones a run through it can touch."""
    bad = np.zeros(len(ends), dtype=bool)
    n = len(flat)
    if min_copies < 2 or n < 2:
        return bad
    # eot padding: out-of-range window positions compare as "not a repeat" without masks
    pad = (min_copies - 1) * max_ngram
    fp = np.concatenate([np.full(pad, eot, flat.dtype), flat, np.full(pad + max_ngram, eot, flat.dtype)])
    for p in range(1, max_ngram + 1):
        need = (min_copies - 1) * p
        if need > n - p:
            break
        s = max(1, need // 2)
        a, b = flat[0 : n - p : s], flat[p:n:s]
        h = (a == b) & (b != eot)
        cand = np.flatnonzero(h[:-1] & h[1:]) * s
        if not len(cand):
            continue
        offs = np.arange(pad - (need - 1), pad + need)  # (W,) window around a hit, W = 2 * need - 1
        rows = max(1, (1 << 20) // len(offs))  # bounds the (rows, W) index array to ~8 MiB
        for k in range(0, len(cand), rows):
            c = cand[k : k + rows]
            c = c[~bad[np.searchsorted(ends, c, side="right")]]  # one hit per document is enough
            if not len(c):
                continue
            pos = c[:, None] + offs  # (C, W) indices into fp
            after = fp[pos + p]
            eq = (fp[pos] == after) & (after != eot)
            # length of the run through the centre: trues left of it (centre included) + right
            left, right = eq[:, need - 1 :: -1], eq[:, need - 1 :]
            run = np.where(left.all(1), need, left.argmin(1)) + np.where(
                right.all(1), need, right.argmin(1)
            )
            hit = c[run - 1 >= need]
            bad[np.searchsorted(ends, hit, side="right")] = True
    return bad


def apply_policy(
    ids: list[np.ndarray], keep: list[bool], eot: int, dtype, policy: DocPolicy, counts: dict[str, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, lengths, source) of a chunk after the policies: the kept rows concatenated, each
    ending with eot; source[k] is the index in `ids` that row k came from (a split document gives
    several rows). ids: text tokens per document (no eot); keep: False for blank documents."""
    docs = [np.append(x.astype(dtype), dtype(eot)) for x in ids]
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    flat = np.concatenate(docs) if docs else np.zeros(0, dtype)
    drop = ~np.asarray(keep, dtype=bool)
    if policy.repeat_min_copies:
        rep = repetitive_docs(
            flat, np.cumsum(lengths), eot, policy.repeat_min_copies, policy.repeat_max_ngram
        )
        rep &= ~drop
        counts["repetitive_documents"] += int(rep.sum())
        counts["repetitive_tokens"] += int(lengths[rep].sum())
        drop |= rep
    cap = policy.max_doc_tokens
    too_long = (lengths > cap) & ~drop if cap else np.zeros(len(docs), dtype=bool)
    if not drop.any() and not too_long.any():  # the common chunk: nothing to rebuild
        return flat, lengths, np.arange(len(docs))
    rows, source = [], []
    for i, d in enumerate(docs):
        if drop[i]:
            continue
        if too_long[i]:
            text = d[:-1]
            if policy.long_docs == "drop":
                counts["long_dropped_documents"] += 1
                counts["long_dropped_tokens"] += len(d)
                continue
            if policy.long_docs == "truncate":
                counts["long_truncated_documents"] += 1
                counts["long_truncated_tokens"] += len(text) - (cap - 1)
                pieces = [text[: cap - 1]]
            else:  # split: every piece a document of its own
                pieces = [text[a : a + cap - 1] for a in range(0, len(text), cap - 1)]
                counts["long_split_documents"] += 1
                counts["long_split_pieces"] += len(pieces)
            for piece in pieces:
                rows.append(np.append(piece, dtype(eot)))
                source.append(i)
            continue
        rows.append(d)
        source.append(i)
    out_lengths = np.array([len(r) for r in rows], dtype=np.int64)
    out = np.concatenate(rows) if rows else np.zeros(0, dtype)
    return out, out_lengths, np.array(source, dtype=np.int64)


def summary(counts: dict[str, int], policy: DocPolicy) -> str:
    """The one log line of prepare's filter counters."""
    c = counts
    return (
        f"filters: dropped {c['blank_documents']} blank and {c['repetitive_documents']} repetitive "
        f"documents ({c['repetitive_tokens']} tokens; repeat_min_copies={policy.repeat_min_copies}, "
        f"repeat_max_ngram={policy.repeat_max_ngram}); documents over max_doc_tokens="
        f"{policy.max_doc_tokens}: {c['long_split_documents']} split into {c['long_split_pieces']} "
        f"rows, {c['long_truncated_documents']} truncated ({c['long_truncated_tokens']} tokens cut), "
        f"{c['long_dropped_documents']} dropped ({c['long_dropped_tokens']} tokens)"
    )

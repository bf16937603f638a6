"""The embedded sample corpus: three seeded generators with different statistics, written as
ordinary prepared sources (byte tokenizer), so `make train` needs no download.

- markov: an order-1 Markov chain over 16 letters whose end-of-text is a state of the chain,
  so the byte stream the loader packs is itself Markov and its entropy rate is exact
  (`markov_entropy_rate`): a trained model's validation loss should approach it.
- zipf:   words from a 2000-word invented vocabulary with Zipfian frequencies.
- arith:  lines `a+b=c` with uniform 3-digit operands (the sums are learnable structure).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from framework.data.shards import MANIFEST, SourceWriter
from framework.data.tokenizer import ByteTokenizer

GENERATORS = ("markov", "zipf", "arith")
VAL_FRACTION = 0.02
SEED = 20240601
MARKOV_ALPHABET = np.frombuffer(b"etaoinshrdlucmfw", dtype=np.uint8)
MARKOV_END_PROB = 1 / 400  # per letter: mean document length 400 letters


def markov_chain() -> np.ndarray:
    """Transition matrix (K+1, K+1) over K letters + end-of-text (last state)."""
    rng = np.random.default_rng(SEED)
    k = len(MARKOV_ALPHABET)
    p = np.zeros((k + 1, k + 1))
    letters = rng.dirichlet(np.full(k, 0.5), size=k)  # peaked rows: entropy well under log(16)
    p[:k, :k] = letters * (1 - MARKOV_END_PROB)
    p[:k, k] = MARKOV_END_PROB
    p[k, :k] = 1.0 / k  # a document starts with a uniform letter
    return p


def markov_entropy_rate() -> float:
    """Entropy rate in nats per token of the packed stream (documents joined by end-of-text)."""
    p = markov_chain()
    w, v = np.linalg.eig(p.T)
    mu = np.real(v[:, np.argmin(np.abs(w - 1))])
    mu = mu / mu.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=1)
    return float(mu @ h)


def _markov_docs(n_tokens: int, rng: np.random.Generator) -> list[np.ndarray]:
    p = markov_chain()
    cum = np.cumsum(p, axis=1)
    k = len(MARKOV_ALPHABET)
    chains, steps = 512, n_tokens // 512 + 1
    state = np.full(chains, k)  # every chain starts at end-of-text: whole documents only
    out = np.empty((steps, chains), dtype=np.int64)
    for t in range(steps):  # vectorised over chains; sequential only in time
        u = rng.random(chains)
        state = np.minimum((cum[state] < u[:, None]).sum(axis=1), k)
        out[t] = state
    lut = np.append(MARKOV_ALPHABET.astype(np.int64), ByteTokenizer.eot_id)
    docs = []
    for c in range(chains):
        ids = lut[out[:, c]]
        ends = np.flatnonzero(ids == ByteTokenizer.eot_id)
        start = 0
        for e in ends:  # a trailing document without its end-of-text is dropped
            docs.append(ids[start : e + 1])
            start = e + 1
    return docs


def _zipf_docs(n_tokens: int, rng: np.random.Generator) -> list[np.ndarray]:
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
    words = [bytes(rng.choice(letters, size=rng.integers(2, 9))).decode() for _ in range(2000)]
    freq = 1.0 / np.arange(1, len(words) + 1) ** 1.1
    freq /= freq.sum()
    docs, total = [], 0
    while total < n_tokens:
        sentences = []
        for _ in range(rng.integers(3, 10)):
            ws = rng.choice(len(words), size=rng.integers(5, 16), p=freq)
            sentences.append(" ".join(words[i] for i in ws).capitalize() + ".")
        doc = np.append(np.frombuffer(" ".join(sentences).encode(), np.uint8), 256)
        docs.append(doc.astype(np.int64))
        total += len(doc)
    return docs


def _arith_docs(n_tokens: int, rng: np.random.Generator) -> list[np.ndarray]:
    docs, total = [], 0
    while total < n_tokens:
        a, b = rng.integers(0, 1000, size=(2, rng.integers(5, 21)))
        text = "".join(f"{x}+{y}={x + y}\n" for x, y in zip(a, b))
        doc = np.append(np.frombuffer(text.encode(), np.uint8), 256).astype(np.int64)
        docs.append(doc)
        total += len(doc)
    return docs


SIZES = {"markov": 1_500_000, "zipf": 1_000_000, "arith": 500_000}  # tokens per source
_MAKERS = {"markov": _markov_docs, "zipf": _zipf_docs, "arith": _arith_docs}


def generate(generator: str, out_dir: str | Path, n_tokens: int | None = None) -> Path:
    """Write one sample source (train + validation split) to out_dir, atomically: the
    directory appears complete, or not at all, also when several ranks race to make it."""
    if generator not in _MAKERS:
        raise ValueError(f"unknown sample generator {generator!r}; choose one of {GENERATORS}")
    out = Path(out_dir)
    if (out / MANIFEST).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([SEED, GENERATORS.index(generator)])
    docs = _MAKERS[generator](n_tokens or SIZES[generator], rng)
    is_val = rng.random(len(docs)) < VAL_FRACTION
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        w = SourceWriter(tmp, ByteTokenizer(), shard_tokens=1 << 19)
        for doc, val in zip(docs, is_val):
            w.add("val" if val else "train", doc)
        w.close(meta={"generator": generator, "seed": SEED})
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished first; its copy is identical
            if not (out / MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out

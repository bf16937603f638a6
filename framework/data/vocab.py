"""`model.vocab_size=auto`: the model's vocabulary from the prepared data, resolved once at
start-up (train, plan) before any model is built, so a source prepared with a trained BPE needs
no hand-set vocabulary."""

from __future__ import annotations

import logging
from pathlib import Path

import fsspec

from framework.config import ConfigError
from framework.data.shards import MANIFEST, DataError, is_url, read_manifest, read_manifest_text
from framework.data.tokenizer import load_tokenizer

log = logging.getLogger("framework")
AUTO = "auto"
VOCAB_MULTIPLE = 64
"""Embedding/output rows are padded to a multiple of 64: matmuls on tensor cores run on
aligned shapes (GPT-2's 50257 -> 50304 is the known example); the extra rows are never targets."""


def round_vocab(n: int) -> int:
    return -(-n // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def _manifest_vocab(path: str) -> int | None:
    """The source's vocabulary, or None where it is not prepared yet (a sample source that
    start-up generates)."""
    m = manifest_of(path)
    return None if m is None else m.vocab_size


def manifest_of(path: str):
    """The source's manifest (local or fsspec URL), or None where it is not prepared yet."""
    try:
        if is_url(path):
            with fsspec.open(f"{path.rstrip('/')}/{MANIFEST}", "rb") as fh:
                return read_manifest_text(fh.read(), path)
        return read_manifest(path)
    except FileNotFoundError:
        return None
    except DataError:
        if is_url(path) or not (Path(path) / MANIFEST).exists():
            return None
        raise


def resolve_vocab_size(cfg) -> None:
    """Replace cfg.model.vocab_size='auto' by the largest vocabulary of data.sources'
    manifests (the tokenizer's where no source is prepared yet), rounded up to VOCAB_MULTIPLE.
    An int is left as it is; anything else is refused."""
    m = cfg.model
    if isinstance(m.vocab_size, int) and not isinstance(m.vocab_size, bool):
        return
    if m.vocab_size != AUTO:
        raise ConfigError(f"model.vocab_size={m.vocab_size!r} must be a positive int or 'auto'")
    sizes = {s.name: v for s in cfg.data.sources if (v := _manifest_vocab(s.path)) is not None}
    if sizes:
        vocab, origin = max(sizes.values()), f"the manifests of {', '.join(sorted(sizes))}"
    else:
        try:
            vocab, origin = (
                load_tokenizer(cfg.data.tokenizer).vocab_size,
                f"data.tokenizer={cfg.data.tokenizer}",
            )
        except Exception as e:  # a missing file, tiktoken absent: the user must choose
            raise ConfigError(
                f"model.vocab_size=auto: no data.sources manifest and data.tokenizer={cfg.data.tokenizer} "
                f"cannot be loaded ({e}); prepare the data first or set model.vocab_size"
            ) from e
    m.vocab_size = round_vocab(vocab)
    log.info(
        "model.vocab_size=auto -> %d (vocabulary %d of %s, rounded up to a multiple of %d)",
        m.vocab_size,
        vocab,
        origin,
        VOCAB_MULTIPLE,
    )

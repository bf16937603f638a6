"""Labelled text for sequence classification: jsonl `{"text": ..., "label": ...}` -> a classify
source (one example per window, the label id as the target at the end of its text).

Layout: each example is one row of exactly `max_tokens` (= trainer.seq_len) tokens, its text
then end-of-text padding: `text[:max_tokens - 1] + [EOT] * (max_tokens - len)`. Since every row
is one window long, the packed loader's window k is exactly one example (inputs = the row, from
position 0, so learned positions match a Hugging Face run on the bare text). The per-token target
shard (the sft mask shard's place) holds 0 everywhere except `label_id + 1` at the first padding
token, i.e. the target of the LAST TEXT token: the classifier reads that token's hidden state,
which is the token Hugging Face's *ForSequenceClassification picks (the last token that is not
pad_token_id = EOT); right padding never changes it under causal attention.

Labels: a string or an int per record (one file may not mix the two); the label set is every
label seen, SORTED (ints numerically, strings by code point), so ids do not depend on record
order and ints 0..K-1 keep their own value as id. The manifest lists it (`labels`, id order).
At most MAX_LABELS labels (the target shard is uint8: 0 = no target).

Overlong (more than max_tokens - 1 text tokens) follows `overlong`: drop (default; counted and
logged with file and line), truncate (keep the first max_tokens - 1 tokens; counted) or error.
Bad records (not JSON, no text, non-string or empty text, no label, a label neither string nor
int) are refused with the file and line; prepare then writes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from framework.data.records import is_val, jsonl_records
from framework.data.tokenizer import Tokenizer
from framework.errors import DataError

log = logging.getLogger(__name__)

MAX_LABELS = 255
OVERLONG = ("drop", "truncate", "error")


class ClassifyError(DataError):
    """A malformed labelled record; the message names the file and line."""


def parse_record(raw: object, where: str, text_key: str = "text") -> tuple[str, str | int]:
    """(text, label) of one record, checked; raises ClassifyError naming `where`."""
    if not isinstance(raw, dict):
        raise ClassifyError(f"{where}: a record must be a JSON object, got {type(raw).__name__}")
    if text_key not in raw:
        raise ClassifyError(f"{where}: no {text_key!r} field (has {sorted(raw)})")
    text = raw[text_key]
    if not isinstance(text, str):
        raise ClassifyError(f"{where}: {text_key!r} is {type(text).__name__}, not a string")
    if not text:
        raise ClassifyError(f"{where}: {text_key!r} is empty (nothing to classify)")
    if "label" not in raw:
        raise ClassifyError(f"{where}: no 'label' field (has {sorted(raw)})")
    label = raw["label"]
    # bool is an int subclass in Python: true/false are refused, not read as 1/0
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise ClassifyError(
            f"{where}: 'label' is {type(label).__name__} ({label!r}); a label is a string or an int"
        )
    return text, label


def records(
    lines: Iterable[tuple[str, int, str]], text_key: str
) -> Iterator[tuple[str, str, str | int]]:
    """(where, text, label) of every non-blank line of (file, line number, line text)."""
    for where, raw in jsonl_records(lines, ClassifyError):
        text, label = parse_record(raw, where, text_key)
        yield where, text, label


def label_set(lines: Iterable[tuple[str, int, str]], text_key: str) -> list[str | int]:
    """Every label of the records, sorted (the id order); checks every record on the way."""
    seen: dict[str | int, str] = {}  # label -> where first seen
    kinds: dict[type, str] = {}
    for where, _, label in records(lines, text_key):
        kinds.setdefault(type(label), where)
        if len(kinds) > 1:
            other = str if isinstance(label, int) else int
            raise ClassifyError(
                f"{where}: label {label!r} ({type(label).__name__}), but {kinds[other]} has a "
                f"{other.__name__} label; use only strings or only ints"
            )
        seen.setdefault(label, where)
    if len(seen) > MAX_LABELS:
        raise ClassifyError(f"{len(seen)} distinct labels; at most {MAX_LABELS} are supported")
    return sorted(seen)


def encode(
    text: str, label_id: int, tok: Tokenizer, max_tokens: int
) -> tuple[np.ndarray, np.ndarray, bool]:
    """(row ids, targets, truncated) of one example: see the module docstring for the layout."""
    ids = tok.encode(text)
    truncated = len(ids) > max_tokens - 1
    ids = ids[: max_tokens - 1]
    row = np.full(max_tokens, tok.eot_id, dtype=np.int64)
    row[: len(ids)] = ids
    targets = np.zeros(max_tokens, dtype=np.uint8)
    targets[len(ids)] = label_id + 1  # the target of the last text token (position len-1)
    return row, targets, truncated


def write_classify_source(
    lines: Callable[[], Iterable[tuple[str, int, str]]],
    tok: Tokenizer,
    writer,
    max_tokens: int | None,
    overlong: str,
    seed: int,
    val_fraction: float,
    text_key: str = "text",
) -> dict:
    """Two passes over `lines()` (a fresh iterator each call): every record checked and the
    label set fixed, then each example written into `writer` (a shards.SourceWriter). The split
    is a seeded hash of the text. Returns the counts for the manifest's meta (the caller closes
    the writer: manifest last)."""
    if overlong not in OVERLONG:
        raise ClassifyError(f"overlong={overlong!r} must be one of {OVERLONG}")
    if max_tokens is None or max_tokens < 2:
        raise ClassifyError(
            f"format=classify needs max_tokens >= 2 (got {max_tokens}): set it to trainer.seq_len "
            "(every example is padded to exactly one training window)"
        )
    labels = label_set(lines(), text_key)
    ids = {label: i for i, label in enumerate(labels)}
    docs, tokens = {"train": 0, "val": 0}, {"train": 0, "val": 0}
    per_label = {"train": [0] * len(labels), "val": [0] * len(labels)}
    n_records, n_over, dropped, truncated, first = 0, 0, 0, 0, []
    for where, text, label in records(lines(), text_key):
        n_records += 1
        row, targets, over = encode(text, ids[label], tok, max_tokens)
        if over:
            n_over += 1
            if overlong == "error":
                raise ClassifyError(
                    f"{where}: the text has more than max_tokens - 1 = {max_tokens - 1} tokens; raise "
                    "max_tokens (and trainer.seq_len) or pass overlong=drop|truncate"
                )
            if len(first) < 10:
                first.append(where)
            if overlong == "drop":
                dropped += 1
                continue
            truncated += 1
        split = "val" if is_val(text, seed, val_fraction) else "train"
        writer.add(split, row, targets)
        docs[split] += 1
        tokens[split] += len(row)
        per_label[split][ids[label]] += 1
    if n_over:
        log.warning(
            "%d of %d examples longer than max_tokens - 1 = %d tokens: %s (overlong=%s), first at %s",
            n_over,
            n_records,
            max_tokens - 1,
            "dropped" if overlong == "drop" else "truncated",
            overlong,
            ", ".join(first[:3]),
        )
    return {
        "labels": labels,
        "documents": docs,
        "tokens": tokens,
        "examples_per_label": per_label,
        "records": n_records,
        "overlong": {
            "policy": overlong,
            "max_tokens": max_tokens,
            "count": n_over,
            "dropped": dropped,
            "truncated": truncated,
            "first": first,
        },
    }

"""The record formats of prepare, as one registry: `FORMATS[cfg.format]`.

    text       pretraining documents: jsonl / parquet / txt / `datasets` Arrow, one text per
               line, row or file -> token rows, each ending with end-of-text (document policies:
               framework/data/doc_filter.py); manifest kind `pretrain`
    chat       jsonl instruction records -> the rendered conversation and a per-token loss mask
               (framework/data/chat.py); manifest kind `sft`
    classify   jsonl {text, label} records -> one padded window per example with its label as
               the target of the last text token (framework/data/classify.py); kind `classify`

Each `Format` says how it reads its records from the input files (framework/data/records.py:
the line and row readers, and the split rule `is_val`), how it tokenises (and masks) and writes
them, what it adds to the input fingerprint, and which manifest kind it writes. framework.prepare
lists the inputs, picks the tokenizer, fingerprints and places the output; the rest is here.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import MISSING
from tqdm import tqdm

from framework.data import doc_filter
from framework.data.chat import template_name, write_chat_source
from framework.data.classify import write_classify_source
from framework.data.doc_filter import DocPolicy
from framework.data.records import InputFile, is_val, iter_texts, jsonl_lines
from framework.data.shards import SourceWriter
from framework.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer
from framework.errors import PrepareError

log = logging.getLogger("framework.prepare")
PREPARE_VERSION = 1


@dataclass
class PrepareConfig:
    input: str = MISSING
    """A file, glob, directory or fsspec URL of raw documents."""
    output: str = MISSING
    """Local directory of the prepared source (manifest.json + shards)."""
    tokenizer: str = "byte"
    """byte | path/to/tokenizer.json | tiktoken:NAME (ignored with train_tokenizer)."""
    train_tokenizer: int | None = None
    """Train a byte-level BPE of this vocabulary size on the input; saved as <output>/tokenizer.json."""
    text_key: str = "text"
    """Field (jsonl) or column (parquet, datasets) holding the document text."""
    workers: int | None = None
    """Tokenizer processes; None: one per CPU core; 1: in this process."""
    val_fraction: float = 0.01
    """Share of documents in the validation split (by a seeded hash of the text)."""
    seed: int = 0
    """Seed of the validation split hash."""
    shard_tokens: int = 1 << 26
    """Tokens per shard (about 128 MiB at uint16)."""
    docs_per_task: int = 512
    """Documents per worker task (the unit of parallel work)."""
    overwrite: bool = False
    """Replace an existing output made from other input or parameters, or redo the same one."""
    format: str = "text"
    """text (pretraining documents) | chat (jsonl instruction records -> an sft source with a
    per-token loss mask; see framework/data/chat.py for the template) | classify (jsonl
    {text, label} -> a classify source, one example per window; see framework/data/classify.py)."""
    max_tokens: int | None = None
    """chat: longest conversation in tokens (set it to trainer.seq_len); None: no limit.
    classify: required, = trainer.seq_len (each example is padded to it; text up to max_tokens-1)."""
    overlong: str = "drop"
    """chat / classify: an example over max_tokens is dropped | truncated (both counted) | an error."""
    long_docs: str = "split"
    """text: a document over max_doc_tokens is split (into rows of max_doc_tokens, each ending
    with end-of-text) | truncated | dropped; counted in the manifest's meta.filters."""
    max_doc_tokens: int | None = 1 << 20
    """text: longest row in tokens, end-of-text included (1M: longer than nearly any real document,
    so only dumps and concatenation accidents are cut); None: no limit."""
    drop_blank: bool = True
    """text: drop empty and all-whitespace documents (counted)."""
    repeat_min_copies: int | None = 32
    """text: drop a document holding this many back-to-back copies of one n-gram of
    1..repeat_max_ngram tokens (OLMo 2's repetition filter; counted); None or 0: off."""
    repeat_max_ngram: int = 13
    """text: longest repeated n-gram (tokens) the repetition filter looks for."""


@dataclass(frozen=True)
class Format:
    """One record format of prepare (format=NAME)."""

    name: str
    kind: str
    """The manifest kind it writes (data.shards.KINDS): the task that trains on it."""
    read: Callable[[list[InputFile], PrepareConfig], Iterable]
    """Its records from the input files, in order, each naming its file (and line)."""
    write: Callable[[Job], dict]
    """Tokenise (and mask) the records, write the shards and the manifest (last); returns the
    manifest's meta."""
    fingerprint: Callable[[PrepareConfig], dict]
    """Its parameters in the input fingerprint (a bad one is refused here, naming the key)."""
    trains_tokenizer: bool = False
    """train_tokenizer may fit a BPE on its records before they are written."""
    older: Callable[[dict], str] = lambda meta: ""
    """What the refusal to replace an output prepared from other parameters adds, given that
    output's manifest meta (e.g. that an older prepare wrote it)."""


@dataclass(frozen=True)
class Job:
    """One prepare run, as a format's writer sees it."""

    format: Format
    cfg: PrepareConfig
    files: list[InputFile]
    tok: Tokenizer
    tokenizer_spec: str
    """What worker processes load (a trained BPE: its file in `out`)."""
    out: Path
    """The temporary directory the source is written into (renamed into place afterwards)."""
    fingerprint: str
    """The input fingerprint, recorded in the manifest's meta."""


# -- text --------------------------------------------------------------------------------------

_WORKER_TOK: Tokenizer | None = None
_WORKER_POLICY: DocPolicy | None = None


def _init_worker(tokenizer_spec: str, policy: DocPolicy) -> None:
    global _WORKER_TOK, _WORKER_POLICY
    _WORKER_POLICY = policy
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallel across processes, not inside
    _WORKER_TOK = load_tokenizer(tokenizer_spec)


def encode_texts(
    texts: list[str],
    seed: int,
    val_fraction: float,
    tok: Tokenizer | None = None,
    policy: DocPolicy | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    """(tokens, lengths, is_val, filter counters) of a chunk: the rows the document policies keep,
    concatenated, each ending with EOT (one flat array pickles far faster than a list of small
    ones). policy None: every document as it is."""
    tok = tok or _WORKER_TOK
    policy = policy or DocPolicy(drop_blank=False, repeat_min_copies=None)
    counts = doc_filter.new_counts()
    keep = [not policy.drop_blank or not (t.isspace() or not t) for t in texts]
    if not all(keep):
        counts["blank_documents"] += keep.count(False)
        texts_in = [t if k else "" for t, k in zip(texts, keep)]  # not worth tokenizing
    else:
        texts_in = texts
    if isinstance(tok, ByteTokenizer):
        ids = [np.frombuffer(t.encode("utf-8", errors="replace"), dtype=np.uint8) for t in texts_in]
    elif isinstance(tok, HFTokenizer):
        ids = [np.asarray(x, dtype=np.int64) for x in tok.encode_batch(texts_in)]
    else:
        ids = [np.asarray(tok.encode(t), dtype=np.int64) for t in texts_in]
    dtype = np.uint32 if tok.vocab_size > 2**16 else np.uint16
    flat, lengths, source = doc_filter.apply_policy(ids, keep, tok.eot_id, dtype, policy, counts)
    flags = np.array([is_val(t, seed, val_fraction) for t in texts], dtype=bool)
    return flat, lengths, flags[source], counts


def _encode_chunk(args: tuple[list[str], int, float]):
    return encode_texts(*args, policy=_WORKER_POLICY)


def _chunks(texts: Iterator[str], n: int) -> Iterator[list[str]]:
    chunk = []
    for t in texts:
        chunk.append(t)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def doc_policy(cfg: PrepareConfig) -> DocPolicy:
    """The text document policies of cfg (RELIABILITY C7, C8); errors name the key."""
    if cfg.long_docs not in doc_filter.LONG_DOCS:
        raise PrepareError(
            f"long_docs={cfg.long_docs!r} must be one of {', '.join(doc_filter.LONG_DOCS)}"
        )
    if cfg.max_doc_tokens is not None and cfg.max_doc_tokens < 2:
        raise PrepareError(
            f"max_doc_tokens={cfg.max_doc_tokens} must be at least 2 (a token and the end-of-text), "
            "or null for no limit"
        )
    if cfg.repeat_min_copies and cfg.repeat_min_copies < 2:  # 1 copy: every document "repeats"
        raise PrepareError(f"repeat_min_copies={cfg.repeat_min_copies} must be >= 2, or 0/null (off)")
    if cfg.repeat_max_ngram < 1:
        raise PrepareError(f"repeat_max_ngram={cfg.repeat_max_ngram} must be >= 1")
    return DocPolicy(
        drop_blank=cfg.drop_blank,
        repeat_min_copies=cfg.repeat_min_copies or None,
        repeat_max_ngram=cfg.repeat_max_ngram,
        long_docs=cfg.long_docs,
        max_doc_tokens=cfg.max_doc_tokens,
    )


def _text_fingerprint(cfg: PrepareConfig) -> dict:
    # text sources keep the fingerprint they had before chat existed: no format key
    return {"policy": vars(doc_policy(cfg))}


def _text_older(meta: dict) -> str:
    if "filters" in meta:
        return ""
    return " (or by a prepare without the document filters: long_docs, repeat_*, drop_blank)"


def _write_text(job: Job) -> dict:
    """format=text: documents tokenised in `workers` spawned processes, in order."""
    cfg, files, tok = job.cfg, job.files, job.tok
    writer = SourceWriter(job.out, tok, shard_tokens=cfg.shard_tokens)
    docs = {"train": 0, "val": 0}
    tokens = {"train": 0, "val": 0}
    policy = doc_policy(cfg)
    filters = doc_filter.new_counts()
    workers = cfg.workers or os.cpu_count() or 1
    chunks = (
        (c, cfg.seed, cfg.val_fraction) for c in _chunks(job.format.read(files, cfg), cfg.docs_per_task)
    )
    t0 = time.perf_counter()
    bar = tqdm(desc=f"prepare {Path(cfg.output).name}", unit=" docs", file=sys.stderr, disable=None)

    def consume(result) -> None:
        flat, lengths, flags, counts = result
        for k, v in counts.items():
            filters[k] += v
        start = 0
        for n, val in zip(lengths.tolist(), flags.tolist()):
            split = "val" if val else "train"
            writer.add(split, flat[start : start + n])
            docs[split] += 1
            tokens[split] += n
            start += n
        bar.update(len(lengths))
        bar.set_postfix(tokens=tokens["train"] + tokens["val"], refresh=False)

    if workers <= 1:
        for args in chunks:
            consume(encode_texts(*args, tok=tok, policy=policy))
    else:
        # spawn: a forked child would inherit the tokenizers thread pool (deadlock-prone)
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            workers, ctx, initializer=_init_worker, initargs=(job.tokenizer_spec, policy)
        ) as pool:
            inflight: deque = deque()
            for args in chunks:  # bounded window: memory stays flat on any input size
                inflight.append(pool.submit(_encode_chunk, args))
                if len(inflight) >= 2 * workers:
                    consume(inflight.popleft().result())
            while inflight:
                consume(inflight.popleft().result())
    bar.close()
    log.info("%s", doc_filter.summary(filters, policy))
    if docs["train"] + docs["val"] == 0:
        raise PrepareError(
            f"input={cfg.input!r}: no documents"
            + (f" left after the filters ({filters})" if any(filters.values()) else "")
            + f" (files: {[f.url for f in files]})"
        )
    warn_small_splits(docs, cfg.val_fraction)
    counts = {"documents": docs, "tokens": tokens, "policy": vars(policy), "filters": filters}
    meta = _meta(job, {"text_key": cfg.text_key}, counts, t0)
    writer.close(meta=meta, kind=job.format.kind)  # manifest last
    return meta


# -- jsonl records: chat, classify -------------------------------------------------------------


def _jsonl(files: list[InputFile], cfg: PrepareConfig) -> Iterator[tuple[str, int, str]]:
    """(file, line number, line text) of the jsonl inputs; other inputs are refused."""
    bad = [f.url for f in files if f.kind != "jsonl"]
    if bad:
        raise PrepareError(f"format={cfg.format} reads jsonl records; not jsonl: {bad}")
    return jsonl_lines(files)


def _record_fingerprint(cfg: PrepareConfig) -> dict:
    return {"format": cfg.format, "max_tokens": cfg.max_tokens, "overlong": cfg.overlong}


def _write_chat(job: Job) -> dict:
    """format=chat: jsonl instruction records -> an sft source (one process: rendering is cheap
    next to training on it)."""
    cfg = job.cfg

    def write(lines, writer):
        return write_chat_source(
            lines(), job.tok, writer, cfg.max_tokens, cfg.overlong, cfg.seed, cfg.val_fraction
        )

    return _write_records(job, "conversations", write, {"template": template_name(job.tok)})


def _write_classify(job: Job) -> dict:
    """format=classify: jsonl {text, label} records -> a classify source (one process, two passes:
    the label set is fixed before the first example is written)."""
    cfg = job.cfg

    def write(lines, writer):
        return write_classify_source(lines, job.tok, writer, cfg.max_tokens, cfg.overlong, cfg.seed,
                                     cfg.val_fraction, cfg.text_key)  # fmt: skip

    return _write_records(job, "examples", write, {"text_key": cfg.text_key})


def _write_records(job: Job, noun: str, write, extra_meta: dict) -> dict:
    """The jsonl formats (chat, classify): `write(lines, writer)` renders the records (`lines()`
    a fresh iterator of (file, line number, text) per call) and returns the manifest's counts."""
    cfg, files, fmt = job.cfg, job.files, job.format

    def lines():
        return fmt.read(files, cfg)

    writer = SourceWriter(job.out, job.tok, shard_tokens=cfg.shard_tokens)
    t0 = time.perf_counter()
    counts = write(lines, writer)
    if sum(counts["documents"].values()) == 0:
        raise PrepareError(f"input={cfg.input!r}: no {noun} kept (records: {counts['records']})")
    warn_small_splits(counts["documents"], cfg.val_fraction)
    meta = _meta(job, {"format": cfg.format, **extra_meta}, counts, t0)
    writer.close(meta=meta, labels=counts.get("labels"), kind=fmt.kind)  # manifest last
    return meta


def _meta(job: Job, fields: dict, counts: dict, t0: float) -> dict:
    """The manifest's meta: the inputs, the format's `fields`, the split, what was written
    (`counts`), the fingerprint; in the key order manifests always had."""
    cfg = job.cfg
    return {
        "input": cfg.input,
        "files": [{"url": f.url, "bytes": f.size, "mtime": f.mtime} for f in job.files],
        **fields,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        **counts,
        "input_fingerprint": job.fingerprint,
        "prepare_version": PREPARE_VERSION,
        "seconds": round(time.perf_counter() - t0, 3),
    }


MIN_SPLIT_DOCUMENTS = 5


def warn_small_splits(docs: dict[str, int], val_fraction: float) -> None:
    """A split of a handful of documents measures one or two texts, not the source."""
    for split, n in docs.items():
        if n < MIN_SPLIT_DOCUMENTS and (split == "train" or val_fraction > 0):
            log.warning(
                "the %s split has only %d documents (train %d, val %d, val_fraction=%s): its loss "
                "will be noisy; use more documents%s",
                split,
                n,
                docs["train"],
                docs["val"],
                val_fraction,
                " or a larger val_fraction" if split == "val" else "",
            )


FORMATS = {
    "text": Format(
        "text", "pretrain", read=lambda files, cfg: iter_texts(files, cfg.text_key),
        write=_write_text, fingerprint=_text_fingerprint, trains_tokenizer=True, older=_text_older,
    ),
    "chat": Format(
        "chat", "sft", read=_jsonl, write=_write_chat, fingerprint=_record_fingerprint
    ),
    "classify": Format(
        "classify", "classify", read=_jsonl, write=_write_classify, fingerprint=_record_fingerprint
    ),
}  # fmt: skip

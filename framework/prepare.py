"""Raw text -> Arrow token shards + manifest (a prepared source for `data.sources`).

    python -m framework.prepare input=<file|glob|dir|fsspec URL> output=<dir> tokenizer=byte
    fw-prepare input='raw/*.jsonl.zst' output=data/web tokenizer=path/to/tokenizer.json workers=8
    fw-prepare input=raw/books output=data/books train_tokenizer=32000

Inputs: jsonl (optionally .gz / .zst), parquet, plain .txt (one document per file), and
Hugging Face `datasets` save_to_disk directories (their Arrow stream files are read with pyarrow;
`datasets` itself is not needed). Documents are tokenized in worker processes in order, each
followed by the end-of-text id. A document goes to the validation split when a seeded hash of
its text falls under val_fraction, so the split depends neither on `workers` nor on document
order, and duplicates land on the same side.

The source is written into a temporary sibling directory, manifest.json last, then renamed into
place: a crash leaves no half source. Re-running with the same input, tokenizer and parameters
is a no-op; `overwrite=true` redoes it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from framework.cli import entry, to_object
from framework.data import doc_filter
from framework.data.doc_filter import DocPolicy
from framework.data.shards import MANIFEST, DataError, SourceWriter, is_url, read_manifest
from framework.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

log = logging.getLogger("framework.prepare")
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
PREPARE_VERSION = 1
FORMATS = ("text", "chat", "classify")
HF_MARKERS = ("state.json", "dataset_info.json", "dataset_dict.json")
SUFFIXES = (
    ".jsonl",
    ".json",
    ".jsonl.gz",
    ".json.gz",
    ".jsonl.zst",
    ".json.zst",
    ".parquet",
    ".txt",
    ".arrow",
)


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


ConfigStore.instance().store(name="prepare_schema", node=PrepareConfig)


class PrepareError(DataError):
    """Bad input or output for prepare; the message names the pattern, file or line."""


# -- inputs --------------------------------------------------------------------------------


@dataclass
class InputFile:
    url: str
    """Full fsspec URL or local path."""
    kind: str
    """jsonl | parquet | txt | arrow_stream."""
    size: int
    mtime: str


def _kind(path: str) -> str | None:
    name = path.lower()
    for suffix, kind in (
        (".parquet", "parquet"),
        (".txt", "txt"),
        (".arrow", "arrow_stream"),
        (".jsonl", "jsonl"),
        (".json", "jsonl"),
    ):
        if name.endswith(suffix) or name.endswith(suffix + ".gz") or name.endswith(suffix + ".zst"):
            return kind
    return None


def _hf_files(fs, root: str) -> list[str]:
    """The Arrow files of a `datasets` save_to_disk directory (its train split for a DatasetDict)."""
    if fs.exists(f"{root}/dataset_dict.json"):
        splits = json.loads(fs.cat_file(f"{root}/dataset_dict.json"))["splits"]
        if "train" not in splits:
            raise PrepareError(
                f"{root} is a DatasetDict with splits {splits}; pass input={root}/<split>"
            )
        root = f"{root}/train"
    state = json.loads(fs.cat_file(f"{root}/state.json"))
    return [f"{root}/{f['filename']}" for f in state["_data_files"]]


def list_inputs(spec: str) -> list[InputFile]:
    """Expand input= into files in a stable (sorted) order; errors name the pattern."""
    fs, root = fsspec.core.url_to_fs(spec)
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if any(c in root for c in "*?["):
        paths = sorted(p for p in fs.glob(root) if fs.isfile(p))
        if not paths:
            raise PrepareError(f"input={spec!r}: the pattern matched no file")
    elif fs.isdir(root):
        if any(fs.exists(f"{root}/{m}") for m in HF_MARKERS):
            paths = _hf_files(fs, root.rstrip("/"))
        else:
            paths = sorted(p for p in fs.find(root) if _kind(p) and not Path(p).name.startswith("."))
        if not paths:
            raise PrepareError(f"input={spec!r}: the directory holds no {', '.join(SUFFIXES)} file")
    elif fs.isfile(root):
        paths = [root]
    else:
        raise PrepareError(f"input={spec!r}: no such file or directory")
    files = []
    for p in paths:
        kind = _kind(p)
        if kind is None:
            raise PrepareError(f"input file {p}: unknown format (expected one of {', '.join(SUFFIXES)})")
        info = fs.info(p)
        mtime = str(info.get("mtime") or info.get("LastModified") or info.get("created") or "")
        url = p if protocol in ("file", "local") else fs.unstrip_protocol(p)
        files.append(InputFile(url, kind, int(info.get("size") or 0), mtime))
    return files


def iter_texts(files: list[InputFile], text_key: str) -> Iterator[str]:
    """Document texts of every file, in order. Errors name the file (and line for jsonl):
    pyarrow, gzip and zstd errors on a truncated or corrupt file do not."""
    for f in files:
        try:
            yield from _file_texts(f, text_key)
        except PrepareError:
            raise
        except (pa.ArrowException, OSError, EOFError, ValueError, zstandard.ZstdError) as e:
            raise PrepareError(f"input file {f.url} is unreadable (truncated or corrupt?): {e}") from e


def _lines(url: str) -> Iterator[str]:
    """Text lines of a (possibly compressed) file. zstd is decoded here rather than by fsspec,
    whose reader ends a truncated frame silently (documents would be lost without an error)."""
    if not url.lower().endswith(".zst"):
        with fsspec.open(url, "rt", compression="infer", encoding="utf-8") as fh:
            yield from fh
        return
    dec, pending = zstandard.ZstdDecompressor().decompressobj(), b""
    with fsspec.open(url, "rb") as fh:
        while chunk := fh.read(1 << 20):
            out = dec.decompress(chunk)
            while dec.eof and dec.unused_data:  # the next frame of a multi-frame file
                rest, dec = dec.unused_data, zstandard.ZstdDecompressor().decompressobj()
                out += dec.decompress(rest)
            *lines, pending = (pending + out).split(b"\n")
            yield from (line.decode("utf-8") for line in lines)
    if not dec.eof:
        raise PrepareError(
            f"input file {url} is unreadable (truncated or corrupt?): zstd frame ends early"
        )
    if pending:
        yield pending.decode("utf-8")


# The record shapes of the fine-tuning formats: a jsonl record read as plain text (format=text,
# the default) is named by the shape it has, so the message says which format= was forgotten.
RECORD_SHAPES = (
    ("chat", ("messages",), "chat data (a 'messages' list)"),
    ("chat", ("prompt", "completion"), "chat data ('prompt' and 'completion')"),
    ("classify", ("text", "label"), "classification data ('text' and 'label')"),
)


def guess_format(record: object) -> tuple[str, str] | None:
    """(format, what the record looks like) of the first RECORD_SHAPES entry whose keys the
    record has, else None."""
    if isinstance(record, dict):
        for fmt, keys, looks in RECORD_SHAPES:
            if all(k in record for k in keys):
                return fmt, looks
    return None


def _format_hint(record: object) -> str:
    """'; these records look like chat data (...): add format=chat', or '' for no known shape."""
    guess = guess_format(record)
    return f"; these records look like {guess[1]}: add format={guess[0]}" if guess else ""


def _file_texts(f: InputFile, text_key: str) -> Iterator[str]:
    if f.kind == "txt":
        with fsspec.open(f.url, "rb", compression="infer") as fh:
            yield decode_text_file(fh.read(), f.url)
    elif f.kind == "jsonl":
        first = True
        for line_no, line in enumerate(_lines(f.url), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise PrepareError(f"{f.url} line {line_no}: not JSON ({e})") from e
            try:
                text = record[text_key]
            except (KeyError, TypeError) as e:
                raise PrepareError(
                    f"{f.url} line {line_no}: no {text_key!r} field (text_key){_format_hint(record)}"
                ) from e
            if first and (guess := guess_format(record)):  # e.g. {text, label}: the labels are lost
                fmt, looks = guess
                log.warning("%s: these records look like %s; they are read as plain text "
                            "(format=text): add format=%s if that was meant", f.url, looks, fmt)  # fmt: skip
            first = False
            yield text
    elif f.kind == "parquet":
        with fsspec.open(f.url, "rb") as fh:
            pf = pq.ParquetFile(fh)
            if text_key not in pf.schema_arrow.names:
                raise PrepareError(f"{f.url}: no column {text_key!r} (has {pf.schema_arrow.names})")
            for batch in pf.iter_batches(columns=[text_key], batch_size=4096):
                yield from (t for t in batch.column(0).to_pylist() if t is not None)
    else:  # a `datasets` Arrow stream file
        with fsspec.open(f.url, "rb") as fh:
            try:
                reader = pa.ipc.open_stream(io.BytesIO(fh.read()))
            except pa.ArrowInvalid as e:
                raise PrepareError(f"{f.url}: not an Arrow stream file ({e})") from e
            if text_key not in reader.schema.names:
                raise PrepareError(f"{f.url}: no column {text_key!r} (has {reader.schema.names})")
            for batch in reader:
                yield from (t for t in batch.column(text_key).to_pylist() if t is not None)


# A .txt input is refused as binary when its first BINARY_PROBE_BYTES hold a NUL byte (text never
# does; executables, images and archives almost always do), or when more than
# MAX_INVALID_UTF8_FRACTION of its bytes are not valid UTF-8 (a Latin-1 or UTF-16 file, or binary
# without NULs). Below that, the few invalid bytes become U+FFFD and the file is used.
BINARY_PROBE_BYTES = 64 * 1024
MAX_INVALID_UTF8_FRACTION = 0.01


def decode_text_file(data: bytes, url: str) -> str:
    if b"\0" in data[:BINARY_PROBE_BYTES]:
        at = data.index(b"\0")
        raise PrepareError(
            f"input file {url} looks binary (a NUL byte at offset {at}): only UTF-8 text files "
            "are tokenized; remove it from input="
        )
    # surrogateescape turns each undecodable byte into one lone surrogate: an exact count
    escaped = data.decode("utf-8", errors="surrogateescape")
    invalid = sum(1 for ch in escaped if "\udc80" <= ch <= "\udcff")
    if invalid > MAX_INVALID_UTF8_FRACTION * len(data):
        raise PrepareError(
            f"input file {url}: {invalid} of {len(data)} bytes ({invalid / len(data):.1%}) are not "
            f"valid UTF-8 (the limit is {MAX_INVALID_UTF8_FRACTION:.0%}): convert it to UTF-8 "
            "(e.g. iconv -f latin1 -t utf-8) or remove it from input="
        )
    return data.decode("utf-8", errors="replace")


# -- tokenizing ------------------------------------------------------------------------------

_WORKER_TOK: Tokenizer | None = None
_WORKER_POLICY: DocPolicy | None = None


def _init_worker(tokenizer_spec: str, policy: DocPolicy) -> None:
    global _WORKER_TOK, _WORKER_POLICY
    _WORKER_POLICY = policy
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallel across processes, not inside
    _WORKER_TOK = load_tokenizer(tokenizer_spec)


def is_val(text: str, seed: int, val_fraction: float) -> bool:
    """Seeded content hash -> uniform in [0, 1): the split of a text is a pure function of it."""
    h = hashlib.blake2b(
        text.encode("utf-8", errors="replace"), digest_size=8, key=seed.to_bytes(8, "little")
    )
    return int.from_bytes(h.digest(), "little") / 2**64 < val_fraction


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


def train_bpe(texts: Iterator[str], vocab_size: int, out_file: Path) -> None:
    """A byte-level BPE (GPT-2 style) with <|endoftext|>, trained with HF `tokenizers`."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[HFTokenizer.EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.save(str(out_file))


# -- the pipeline ----------------------------------------------------------------------------


def input_fingerprint(files: list[InputFile], cfg: PrepareConfig, tok_fingerprint: str) -> str:
    desc = {
        "files": [(f.url, f.size, f.mtime) for f in files],
        "tokenizer": tok_fingerprint if cfg.train_tokenizer is None else f"train:{cfg.train_tokenizer}",
        "text_key": cfg.text_key,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "version": PREPARE_VERSION,
    }
    if cfg.format != "text":  # text sources keep the fingerprint they had before chat existed
        desc.update(format=cfg.format, max_tokens=cfg.max_tokens, overlong=cfg.overlong)
    else:
        desc.update(policy=vars(doc_policy(cfg)))
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


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


def prepare(cfg: PrepareConfig) -> Path:
    """Run prepare; returns the output directory. Raises PrepareError/DataError on bad input."""
    if cfg.format not in FORMATS:
        raise PrepareError(f"format={cfg.format!r} must be one of {', '.join(FORMATS)}")
    if cfg.format != "text" and cfg.train_tokenizer:
        raise PrepareError(
            f"format={cfg.format} with train_tokenizer: train the tokenizer on text first"
        )
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise PrepareError(f"val_fraction={cfg.val_fraction} must be in [0, 1)")
    if is_url(cfg.output):
        raise PrepareError(
            f"output={cfg.output!r} must be a local directory (copy it to remote storage after)"
        )
    out = Path(cfg.output)
    files = list_inputs(cfg.input)
    tok = None if cfg.train_tokenizer else load_tokenizer(cfg.tokenizer)
    fingerprint = input_fingerprint(files, cfg, tok.fingerprint if tok else "")
    if (out / MANIFEST).is_file() and not cfg.overwrite:
        old_meta = read_manifest(out).meta
        if old_meta.get("input_fingerprint") == fingerprint:
            log.info(
                "%s is already prepared from this input: nothing to do (overwrite=true redoes it)", out
            )
            return out
        older = cfg.format == "text" and "filters" not in old_meta
        raise PrepareError(
            f"output={out} holds a source prepared from other input or parameters"
            + (
                " (or by a prepare without the document filters: long_docs, repeat_*, drop_blank)"
                if older
                else ""
            )
            + "; choose another output or pass overwrite=true"
        )
    if out.exists() and not (out / MANIFEST).is_file() and any(out.iterdir()) and not cfg.overwrite:
        raise PrepareError(
            f"output={out} exists and is not a prepared source; pass overwrite=true to replace it"
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tokenizer_spec = cfg.tokenizer
        if cfg.train_tokenizer:
            log.info(
                "training a byte-level BPE of vocabulary %d on %d files", cfg.train_tokenizer, len(files)
            )
            train_bpe(iter_texts(files, cfg.text_key), cfg.train_tokenizer, tmp / "tokenizer.json")
            tokenizer_spec = str(tmp / "tokenizer.json")
            tok = load_tokenizer(tokenizer_spec)
            tok.name = str(out / "tokenizer.json")
        write = {"chat": _write_chat, "classify": _write_classify}.get(cfg.format, _tokenize_and_write)
        stats = write(files, cfg, tok, tokenizer_spec, tmp, fingerprint)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "wrote %s: %d train / %d val documents, %d / %d tokens",
        out,
        stats["documents"]["train"],
        stats["documents"]["val"],
        stats["tokens"]["train"],
        stats["tokens"]["val"],
    )
    return out


def _tokenize_and_write(
    files: list[InputFile],
    cfg: PrepareConfig,
    tok: Tokenizer,
    tokenizer_spec: str,
    tmp: Path,
    fingerprint: str,
) -> dict:
    from tqdm import tqdm

    writer = SourceWriter(tmp, tok, shard_tokens=cfg.shard_tokens)
    docs = {"train": 0, "val": 0}
    tokens = {"train": 0, "val": 0}
    policy = doc_policy(cfg)
    filters = doc_filter.new_counts()
    workers = cfg.workers or os.cpu_count() or 1
    chunks = (
        (c, cfg.seed, cfg.val_fraction)
        for c in _chunks(iter_texts(files, cfg.text_key), cfg.docs_per_task)
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
            workers, ctx, initializer=_init_worker, initargs=(tokenizer_spec, policy)
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
    meta = {
        "input": cfg.input,
        "files": [{"url": f.url, "bytes": f.size, "mtime": f.mtime} for f in files],
        "text_key": cfg.text_key,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "documents": docs,
        "tokens": tokens,
        "policy": vars(policy),
        "filters": filters,
        "input_fingerprint": fingerprint,
        "prepare_version": PREPARE_VERSION,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    writer.close(meta=meta)  # manifest last
    return meta


def _write_chat(
    files: list[InputFile],
    cfg: PrepareConfig,
    tok: Tokenizer,
    tokenizer_spec: str,
    tmp: Path,
    fingerprint: str,
) -> dict:
    """format=chat: jsonl instruction records -> an sft source (one process: rendering is cheap
    next to training on it)."""
    from framework.data.chat import template_name, write_chat_source

    def write(lines, writer):
        return write_chat_source(
            lines(), tok, writer, cfg.max_tokens, cfg.overlong, cfg.seed, cfg.val_fraction
        )

    return _write_records(files, cfg, tok, tmp, fingerprint, "conversations", write,
                          {"template": template_name(tok)})  # fmt: skip


def _write_classify(
    files: list[InputFile],
    cfg: PrepareConfig,
    tok: Tokenizer,
    tokenizer_spec: str,
    tmp: Path,
    fingerprint: str,
) -> dict:
    """format=classify: jsonl {text, label} records -> a classify source (one process, two passes:
    the label set is fixed before the first example is written)."""
    from framework.data.classify import write_classify_source

    def write(lines, writer):
        return write_classify_source(lines, tok, writer, cfg.max_tokens, cfg.overlong, cfg.seed,
                                     cfg.val_fraction, cfg.text_key)  # fmt: skip

    return _write_records(files, cfg, tok, tmp, fingerprint, "examples", write,
                          {"text_key": cfg.text_key})  # fmt: skip


def _write_records(files, cfg, tok, tmp, fingerprint, noun: str, write, extra_meta: dict) -> dict:
    """The jsonl formats (chat, classify): `write(lines, writer)` renders the records (`lines()`
    a fresh iterator of (file, line number, text) per call) and returns the manifest's counts."""
    bad = [f.url for f in files if f.kind != "jsonl"]
    if bad:
        raise PrepareError(f"format={cfg.format} reads jsonl records; not jsonl: {bad}")

    def lines():
        return ((f.url, n, line) for f in files for n, line in enumerate(_lines(f.url), 1))

    writer = SourceWriter(tmp, tok, shard_tokens=cfg.shard_tokens)
    t0 = time.perf_counter()
    counts = write(lines, writer)
    if sum(counts["documents"].values()) == 0:
        raise PrepareError(f"input={cfg.input!r}: no {noun} kept (records: {counts['records']})")
    warn_small_splits(counts["documents"], cfg.val_fraction)
    meta = {
        "input": cfg.input,
        "files": [{"url": f.url, "bytes": f.size, "mtime": f.mtime} for f in files],
        "format": cfg.format,
        **extra_meta,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        **counts,
        "input_fingerprint": fingerprint,
        "prepare_version": PREPARE_VERSION,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    writer.close(meta=meta, labels=counts.get("labels"))  # manifest last
    return meta


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


@entry("prepare", PrepareConfig)
def main(dcfg: DictConfig) -> None:
    """Console script `fw-prepare`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prepare(to_object(dcfg, PrepareConfig))


if __name__ == "__main__":
    main()

"""Records of prepare's inputs, read the same way by every format (framework/data/formats.py).

Inputs: jsonl (optionally .gz / .zst), parquet, plain .txt (one document per file), and Hugging
Face `datasets` save_to_disk directories (their Arrow stream files are read with pyarrow;
`datasets` itself is not needed), listed in a stable order. Every error names the file (and the
line for jsonl): pyarrow, gzip and zstd errors on a truncated or corrupt file do not.

The split rule lives here too: a record goes to the validation split when a seeded hash of its
text falls under val_fraction (`is_val`), so the split depends neither on the number of workers
nor on record order, and duplicates land on the same side.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from framework.errors import DataError, PrepareError

log = logging.getLogger(__name__)

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


def read_lines(url: str) -> Iterator[str]:
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
        for line_no, line in enumerate(read_lines(f.url), 1):
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


def is_val(text: str, seed: int, val_fraction: float) -> bool:
    """Seeded content hash -> uniform in [0, 1): the split of a text is a pure function of it."""
    h = hashlib.blake2b(
        text.encode("utf-8", errors="replace"), digest_size=8, key=seed.to_bytes(8, "little")
    )
    return int.from_bytes(h.digest(), "little") / 2**64 < val_fraction


def jsonl_lines(files: list[InputFile]) -> Iterator[tuple[str, int, str]]:
    """(file, line number, line text) of every line of the jsonl files, in order."""
    return ((f.url, n, line) for f in files for n, line in enumerate(read_lines(f.url), 1))


def jsonl_records(
    lines: Iterable[tuple[str, int, str]], error: type[DataError]
) -> Iterator[tuple[str, object]]:
    """(where, parsed JSON) of every non-blank line of (file, line number, line text); a line
    that is not JSON raises `error` naming its file and line."""
    for url, line_no, line in lines:
        if not line.strip():
            continue
        where = f"{url} line {line_no}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{where}: not JSON ({e})") from e

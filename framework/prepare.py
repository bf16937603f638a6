"""Raw text -> Arrow token shards + manifest (a prepared source for `data.sources`).

    python -m framework.prepare input=<file|glob|dir|fsspec URL> output=<dir> tokenizer=byte
    fw-prepare input='raw/*.jsonl.zst' output=data/web tokenizer=path/to/tokenizer.json workers=8
    fw-prepare input=raw/books output=data/books train_tokenizer=32000

Inputs: jsonl (optionally .gz / .zst), parquet, plain .txt (one document per file), and
Hugging Face `datasets` save_to_disk directories (framework/data/records.py reads them). The
record format (format=text|chat|classify: framework/data/formats.py) says how records are read,
tokenized (text: in worker processes, in order, each followed by the end-of-text id), masked
and written. A record goes to the validation split when a seeded hash of its text falls under
val_fraction, so the split depends neither on `workers` nor on record order, and duplicates
land on the same side.

The source is written into a temporary sibling directory, manifest.json last, then renamed into
place: a crash leaves no half source. Re-running with the same input, tokenizer and parameters
is a no-op; `overwrite=true` redoes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig
from tokenizers import Tokenizer as HFTok
from tokenizers import decoders, models, pre_tokenizers, trainers

from framework.cli import entry, to_object
from framework.data.formats import FORMATS, PREPARE_VERSION, Job, PrepareConfig
from framework.data.records import InputFile, list_inputs
from framework.data.shards import MANIFEST, is_url, read_manifest
from framework.data.tokenizer import HFTokenizer, load_tokenizer
from framework.errors import PrepareError

log = logging.getLogger("framework.prepare")
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

ConfigStore.instance().store(name="prepare_schema", node=PrepareConfig)


def train_bpe(texts: Iterator[str], vocab_size: int, out_file: Path) -> None:
    """A byte-level BPE (GPT-2 style) with <|endoftext|>, trained with HF `tokenizers`."""
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


def input_fingerprint(files: list[InputFile], cfg: PrepareConfig, tok_fingerprint: str) -> str:
    """What the output was made from (a re-run with the same is a no-op): the input files, the
    tokenizer, the split and the format's own parameters."""
    desc = {
        "files": [(f.url, f.size, f.mtime) for f in files],
        "tokenizer": tok_fingerprint if cfg.train_tokenizer is None else f"train:{cfg.train_tokenizer}",
        "text_key": cfg.text_key,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "version": PREPARE_VERSION,
    }
    desc.update(FORMATS[cfg.format].fingerprint(cfg))
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


def prepare(cfg: PrepareConfig) -> Path:
    """Run prepare; returns the output directory. Raises PrepareError/DataError on bad input."""
    if cfg.format not in FORMATS:
        raise PrepareError(f"format={cfg.format!r} must be one of {', '.join(FORMATS)}")
    fmt = FORMATS[cfg.format]
    if cfg.train_tokenizer and not fmt.trains_tokenizer:
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
        raise PrepareError(
            f"output={out} holds a source prepared from other input or parameters"
            + fmt.older(old_meta)
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
            train_bpe(fmt.read(files, cfg), cfg.train_tokenizer, tmp / "tokenizer.json")
            tokenizer_spec = str(tmp / "tokenizer.json")
            tok = load_tokenizer(tokenizer_spec)
            tok.name = str(out / "tokenizer.json")
        stats = fmt.write(Job(fmt, cfg, files, tok, tokenizer_spec, tmp, fingerprint))
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


@entry("prepare", PrepareConfig)
def main(dcfg: DictConfig) -> None:
    """Console script `fw-prepare`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prepare(to_object(dcfg, PrepareConfig))


if __name__ == "__main__":
    main()

"""Prepare throughput on the sample corpus as raw text (RELIABILITY C7/C8: the long-document
policy and the blank/repetition filters must not slow prepare notably).

    .venv/bin/python bench/prepare_filters.py [--repeat 3] [--tokenizer byte|bpe|path/to/tokenizer.json]

The three embedded sample sources (framework.data.sample) are decoded back to text and written
as one jsonl (3e6 bytes), then prepared with workers=1 (one process: CPU time is the measure on a
shared box). Prints one JSON line: documents, tokens, the best CPU seconds over --repeat runs,
tokens per CPU-second, and the manifest's filter counters. Runs against whichever `framework`
is on PYTHONPATH, so the same script measures a checkout before and after a change.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from framework.data.sample import GENERATORS, generate
from framework.data.shards import open_shard, read_manifest
from framework.prepare import PrepareConfig, prepare, train_bpe


def sample_jsonl(root: Path) -> Path:
    out = root / "sample.jsonl"
    with open(out, "w") as f:
        for g in GENERATORS:
            src = generate(g, root / g)
            m = read_manifest(src)
            for info in m.shards:
                toks, offsets = open_shard(src / info.file, m.dtype)
                for a, b in zip(offsets[:-1], offsets[1:]):
                    text = bytes(toks[a : b - 1].astype(np.uint8)).decode()
                    f.write(json.dumps({"text": text}) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--tokenizer",
        default="byte",
        help="byte | bpe (a 4096-token BPE trained first, untimed) | a file",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="fw-bench-prepare-"))
    try:
        raw = sample_jsonl(root)
        tokenizer = args.tokenizer
        if tokenizer == "bpe":
            texts = (json.loads(line)["text"] for line in open(raw))
            train_bpe(texts, 4096, root / "tokenizer.json")
            tokenizer = str(root / "tokenizer.json")
        best, meta = float("inf"), {}
        for i in range(args.repeat):
            out = root / f"out{i}"
            t0 = time.process_time()
            prepare(PrepareConfig(input=str(raw), output=str(out), tokenizer=tokenizer, workers=1))
            best = min(best, time.process_time() - t0)
            meta = read_manifest(out).meta
        tokens = meta["tokens"]["train"] + meta["tokens"]["val"]
        print(
            json.dumps(
                {
                    "documents": meta["documents"]["train"] + meta["documents"]["val"],
                    "tokens": tokens,
                    "cpu_s": round(best, 3),
                    "tokens_per_cpu_s": round(tokens / best),
                    "filters": meta.get("filters"),
                }
            )
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

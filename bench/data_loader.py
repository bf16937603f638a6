"""Data-loader throughput: tokens/s per core through the full path (mixture + packing + batch
building, num_workers=0, one process), warm time to first batch, the raw zero-copy read of the
same shards as the ceiling, and the peers on the same data. Throughput is tokens per CPU-second
of the (single-threaded) measuring process, i.e. per core, which stays meaningful on a shared
machine; wall-clock figures are printed beside it.

    python bench/data_loader.py                 # ~1e8 tokens over three sources (cached under /tmp)
    python bench/data_loader.py --tokens 2e6    # a quick run

Peers run in their own virtual environments (never in the project's .venv):
- Hugging Face `datasets`: interleave_datasets(probabilities=...) over the same tokens, packed into
  the same windows beforehand (the usual offline `.map(group_texts)`, not timed), iterated as numpy
  batches. Its venv (/tmp/peer-venv, or $FW_PEER_PYTHON) is created with `pip install datasets`
  when absent.
- litdata 0.2.76 and mosaicml-streaming 0.13.0 require torchvision, which has no CPU build here
  (installing it pulls a CUDA torch); they are tried in /tmp/peer-venv-<name> built with
  `--no-deps` and reported as null with the reason when they cannot run.

The last line printed is one JSON object:
{"tokens_per_s_per_core", "first_batch_s", "vs": {"litdata", "mosaicml-streaming", "datasets"},
 "raw_read_fraction", ...}. "vs" values are our tokens/s divided by the peer's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SOURCES = {  # name: (share of the tokens on disk, mixture weight, mean document length in tokens)
    "web": (0.5, 0.6, 700),
    "books": (0.3, 0.3, 30_000),
    "wiki": (0.2, 0.1, 1_500),
}
VOCAB = 50257  # GPT-2's; ids are uniform random (content does not matter to the loader)


def peer_datasets(data_dir: Path, tokens: int, batch: int) -> dict:
    """Runs inside the peer venv: HF datasets interleave over pre-packed windows."""
    import datasets

    files = [str(data_dir / "peer" / f"{n}.arrow") for n in SOURCES]
    t0 = time.perf_counter()
    parts = [datasets.Dataset.from_file(f) for f in files]  # memory-mapped
    mix = datasets.interleave_datasets(
        parts, probabilities=[SOURCES[n][1] for n in SOURCES], seed=0, stopping_strategy="all_exhausted"
    ).with_format("numpy")
    it = mix.iter(batch_size=batch)
    first = np.asarray(next(it)["input_ids"], dtype=np.int64)
    first_s = time.perf_counter() - t0
    seq_len = first.shape[1] - 1
    done, t0, c0 = 0, time.perf_counter(), time.process_time()
    for b in it:
        x = np.asarray(b["input_ids"], dtype=np.int64)  # (B, T+1), as a training step needs it
        done += x.shape[0] * seq_len
        if done >= tokens:
            break
    return {
        "tokens_per_s": done / (time.process_time() - c0),
        "tokens_per_s_wall": done / (time.perf_counter() - t0),
        "first_batch_s": first_s,
        "version": datasets.__version__,
    }


def build_data(root: Path, total_tokens: int, seq_len: int) -> None:
    """Three sources of random tokens with different document lengths, and the same tokens packed
    into (seq_len + 1)-token windows as Arrow stream files for the `datasets` peer."""
    import pyarrow as pa

    from framework.data.shards import MANIFEST, SourceWriter
    from framework.data.tokenizer import Tokenizer

    class BenchTokenizer(Tokenizer):
        name, vocab_size, eot_id, fingerprint = "bench", VOCAB, VOCAB - 1, "bench-v1"

    (root / "peer").mkdir(parents=True, exist_ok=True)
    for i, (name, (share, _, mean_len)) in enumerate(SOURCES.items()):
        if (root / name / MANIFEST).is_file() and (root / "peer" / f"{name}.arrow").is_file():
            continue
        rng = np.random.default_rng(i)
        n = int(total_tokens * share)
        toks = rng.integers(0, VOCAB - 1, n, dtype=np.uint16)
        lengths = np.maximum(
            1, rng.lognormal(np.log(mean_len) - 0.5, 1.0, n // mean_len * 3).astype(np.int64)
        )
        ends = np.cumsum(lengths)
        ends = ends[ends < n]
        docs = np.split(toks, ends)
        w = SourceWriter(root / name, BenchTokenizer(), shard_tokens=1 << 24)
        stream = []
        for d in docs:
            doc = np.append(d, np.uint16(VOCAB - 1))
            w.add("train", doc)
            stream.append(doc)
        w.close(meta={"bench": True})
        flat = np.concatenate(stream)
        windows = len(flat) // (seq_len + 1)
        offsets = np.arange(windows + 1, dtype=np.int32) * (seq_len + 1)
        arr = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat[: windows * (seq_len + 1)]))
        table = pa.table({"input_ids": arr})
        with (
            pa.OSFile(str(root / "peer" / f"{name}.arrow"), "wb") as f,
            pa.ipc.new_stream(f, table.schema) as wr,
        ):
            wr.write_table(table, max_chunksize=1024)


def make_loader(root: Path, seq_len: int, batch: int, cache_dir: Path):
    from framework.config import DataConfig, SourceConfig
    from framework.data.loader import MixtureLoader
    from framework.data.tokenizer import Tokenizer

    class BenchTokenizer(Tokenizer):
        name, vocab_size, eot_id, fingerprint = "bench", VOCAB, VOCAB - 1, "bench-v1"

    cfg = DataConfig(
        sources=[SourceConfig(name=n, path=str(root / n), weight=w) for n, (_, w, _) in SOURCES.items()],
        cache_dir=str(cache_dir),
    )
    return MixtureLoader(cfg, BenchTokenizer(), seq_len, batch, batch, 0, 1, 1234, VOCAB)


def bench_ours(root: Path, tokens: int, seq_len: int, batch: int, cache_dir: Path) -> dict:
    make_loader(root, seq_len, batch, cache_dir)  # cold: verifies (sha256) and caches
    t0 = time.perf_counter()
    loader = make_loader(root, seq_len, batch, cache_dir)  # warm, as a restarted run sees it
    next(loader)
    first_s = time.perf_counter() - t0
    steps = max(1, tokens // (batch * seq_len))
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        b = next(loader)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if b.inputs.shape != (batch, seq_len):
        raise RuntimeError(f"unexpected batch shape {tuple(b.inputs.shape)}")
    done = steps * batch * seq_len
    return {"tokens_per_s": done / cpu, "tokens_per_s_wall": done / wall, "first_batch_s": first_s}


def bench_raw(root: Path, tokens: int, seq_len: int, batch: int) -> float:
    """The ceiling: consecutive (B, T+1) windows copied from one memory-mapped shard into the same
    int64 batch buffer, no mixing or document bookkeeping."""
    from framework.data.shards import open_shard, read_manifest

    m = read_manifest(root / "web")
    toks, _ = open_shard(root / "web" / m.split("train")[0].file, m.dtype)
    buf = np.empty((batch, seq_len + 1), dtype=np.int64)
    step = batch * (seq_len + 1)
    n_steps = max(1, min(tokens, len(toks)) // step)
    c0 = time.process_time()
    done = 0
    while done < tokens:
        for i in range(n_steps):
            buf[:] = toks[i * step : (i + 1) * step].reshape(batch, seq_len + 1)
        done += n_steps * batch * seq_len
    return done / (time.process_time() - c0)


def peer_python(name: str) -> tuple[str | None, str]:
    """(python of the peer's venv, why not) creating the datasets venv when absent."""
    if name == "datasets":
        py = os.environ.get("FW_PEER_PYTHON", "/tmp/peer-venv/bin/python")
        if not Path(py).is_file():
            venv = Path(py).parent.parent
            r = subprocess.run(
                f"{sys.executable} -m venv {venv} && {venv}/bin/pip install -q datasets",
                shell=True,
                capture_output=True,
                text=True,
            )
            if r.returncode:
                return None, f"could not create the peer venv {venv}: {r.stderr[-300:]}"
        return py, ""
    py = f"/tmp/peer-venv-{name}/bin/python"
    if not Path(py).is_file():
        return None, (
            f"{name} requires torchvision, which has no CPU build on this machine (installing it pulls a "
            f"CUDA torch); no usable venv at {py}"
        )
    return py, ""


def run_peer(name: str, root: Path, tokens: int, batch: int) -> tuple[dict | None, str]:
    py, why = peer_python(name)
    if py is None:
        return None, why
    r = subprocess.run(
        [
            py,
            __file__,
            "--peer",
            name,
            "--data",
            str(root),
            "--tokens",
            str(tokens),
            "--batch",
            str(batch),
        ],
        capture_output=True,
        text=True,
    )
    if r.returncode:
        return (
            None,
            f"{name} failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}",
        )
    return json.loads(r.stdout.strip().splitlines()[-1]), ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=float, default=1e8, help="tokens on disk over the three sources")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=16, help="sequences per batch")
    ap.add_argument(
        "--data", type=Path, default=None, help="data directory (default /tmp/fw-bench-data-<tokens>)"
    )
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--peer", default=None, help=argparse.SUPPRESS)  # internal: run inside a peer venv
    args = ap.parse_args()
    tokens = int(args.tokens)
    if args.peer:
        print(json.dumps(peer_datasets(args.data, tokens, args.batch)))
        return
    sys.path.insert(0, str(REPO))
    root = args.data or Path(f"/tmp/fw-bench-data-{tokens}-{args.seq_len}")
    t0 = time.perf_counter()
    build_data(root, tokens, args.seq_len)
    print(f"data at {root} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    measured = min(tokens, int(5e7))  # tokens streamed per measurement
    ours = bench_ours(root, measured, args.seq_len, args.batch, root / "cache")
    raw = bench_raw(root, measured, args.seq_len, args.batch)
    vs: dict[str, float | None] = {}
    peers: dict[str, dict | str] = {}
    for name in ("litdata", "mosaicml-streaming", "datasets"):
        res, why = (
            (None, "skipped (--no-peers)")
            if args.no_peers
            else run_peer(name, root, measured, args.batch)
        )
        vs[name] = None if res is None else ours["tokens_per_s"] / res["tokens_per_s"]
        peers[name] = res if res is not None else why
    result = {
        "tokens_per_s_per_core": ours["tokens_per_s"],
        "first_batch_s": ours["first_batch_s"],
        "vs": vs,
        "raw_read_fraction": ours["tokens_per_s"] / raw,
        "raw_read_tokens_per_s": raw,
        "peers": peers,
        "tokens_on_disk": tokens,
        "tokens_measured": measured,
        "seq_len": args.seq_len,
        "batch": args.batch,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

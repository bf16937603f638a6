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
- litdata 0.2.76 and mosaicml-streaming 0.13.0 declare torchvision, which has no CPU build here
  (installing it pulls a CUDA torch). Each gets /tmp/peer-venv-<name>: the CPU torch, the peer
  with `--no-deps`, and the few packages its token path imports (PEER_INSTALL). litdata then runs
  as is; streaming imports torchvision at import time (vision datasets only), so its venv gets an
  import-only stub. A peer that still cannot run is reported as null with the reason.

The last line printed is one JSON object:
{"tokens_per_s_per_core", "first_batch_s", "vs": {"litdata", "mosaicml-streaming", "datasets"},
 "raw_read_fraction", "verify_overhead", ...}. "verify_overhead" is the CPU time of a fresh loader
streaming the measured tokens with shard hashing on over off, minus 1. "vs" values are our tokens/s divided by the peer's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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


def drain(it, to_int64, seq_len: int, tokens: int) -> dict:
    """Time a peer's iterator over `tokens` tokens after its first batch: each batch is turned
    into the (B, T+1) int64 array a training step needs. Per-core rate from CPU time."""
    done, t0, c0 = 0, time.perf_counter(), time.process_time()
    for b in it:
        done += to_int64(b).shape[0] * seq_len
        if done >= tokens:
            break
    return {
        "tokens_per_s": done / (time.process_time() - c0),
        "tokens_per_s_wall": done / (time.perf_counter() - t0),
    }


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
    return {
        **drain(it, lambda b: np.asarray(b["input_ids"], dtype=np.int64), seq_len, tokens),
        "first_batch_s": first_s,
        "version": datasets.__version__,
    }


def _litdata_items(path: str, piece: int):
    """litdata optimize() input: the token stream in pieces of 1M tokens (int32 tensors)."""
    import torch

    flat = np.load(path, mmap_mode="r")
    return torch.from_numpy(np.array(flat[piece : piece + (1 << 20)], dtype=np.int32))


def peer_litdata(data_dir: Path, tokens: int, batch: int, seq_len: int) -> dict:
    """Runs inside the litdata venv: the same token streams converted with optimize() (not timed),
    mixed with CombinedStreamingDataset(weights=...) and read through StreamingDataLoader with
    TokensLoader windows of seq_len + 1 tokens (num_workers=0, as ours)."""
    import functools

    import litdata
    from litdata import CombinedStreamingDataset, StreamingDataLoader, StreamingDataset, TokensLoader

    dirs = []
    for name in SOURCES:
        out = data_dir / "litdata" / name
        if not (out / "index.json").is_file():
            n = len(np.load(data_dir / "peer" / f"{name}.npy", mmap_mode="r"))
            litdata.optimize(
                fn=functools.partial(_litdata_items, str(data_dir / "peer" / f"{name}.npy")),
                inputs=list(range(0, n, 1 << 20)),
                output_dir=str(out),
                chunk_bytes="64MB",
                item_loader=TokensLoader(),
                num_workers=1,
            )
        dirs.append(str(out))
    t0 = time.perf_counter()
    parts = [
        StreamingDataset(d, item_loader=TokensLoader(block_size=seq_len + 1), shuffle=True, seed=0)
        for d in dirs
    ]
    mix = CombinedStreamingDataset(
        parts, weights=[SOURCES[n][1] for n in SOURCES], seed=0, iterate_over_all=False
    )
    it = iter(StreamingDataLoader(mix, batch_size=batch, num_workers=0))
    next(it)
    first_s = time.perf_counter() - t0
    return {
        **drain(it, lambda b: b.long(), seq_len, tokens),
        "first_batch_s": first_s,
        "version": litdata.__version__,
        "note": "stored as int32 (litdata's TokensLoader has no uint16 path here)",
    }


def peer_streaming(data_dir: Path, tokens: int, batch: int, seq_len: int) -> dict:
    """Runs inside the mosaicml-streaming venv: the same token streams cut into (T+1)-token windows
    and written with MDSWriter (llm-foundry's concat-tokens layout; not timed), mixed with
    Stream(proportion=...) in one StreamingDataset and read through a torch DataLoader
    (num_workers=0, as ours)."""
    import streaming
    import torch
    from streaming import MDSWriter, Stream, StreamingDataset

    streams = []
    for name in SOURCES:
        out = data_dir / "mds" / name
        if not (out / "index.json").is_file():
            flat = np.load(data_dir / "peer" / f"{name}.npy", mmap_mode="r")
            n = len(flat) // (seq_len + 1)
            windows = np.asarray(flat[: n * (seq_len + 1)]).reshape(n, seq_len + 1)
            with MDSWriter(out=str(out), columns={"tokens": "ndarray:uint16"}, size_limit="64mb") as w:
                for row in windows:
                    w.write({"tokens": row})
        streams.append(Stream(local=str(out), proportion=SOURCES[name][1]))
    t0 = time.perf_counter()
    epoch = 2 * (tokens // seq_len + batch)  # samples: enough for the measurement, a small index
    ds = StreamingDataset(
        streams=streams, shuffle=True, shuffle_seed=0, batch_size=batch, epoch_size=epoch
    )
    it = iter(torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=0))
    next(it)
    first_s = time.perf_counter() - t0
    result = {
        **drain(it, lambda b: b["tokens"].long(), seq_len, tokens),
        "first_batch_s": first_s,
        "version": streaming.__version__,
        "note": "torchvision replaced by an import-only stub (streaming imports it at import time; the text path never calls it)",
    }
    return result


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
        if (root / name / MANIFEST).is_file() and (root / "peer" / f"{name}.npy").is_file():
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
        np.save(root / "peer" / f"{name}.npy", flat)  # the same token stream, for peers that convert
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
    from framework.config import DataConfig, SourceConfig, TrainerConfig
    from framework.data.loader import MixtureLoader
    from framework.data.tokenizer import Tokenizer

    class BenchTokenizer(Tokenizer):
        name, vocab_size, eot_id, fingerprint = "bench", VOCAB, VOCAB - 1, "bench-v1"

    cfg = DataConfig(
        sources=[SourceConfig(name=n, path=str(root / n), weight=w) for n, (_, w, _) in SOURCES.items()],
        cache_dir=str(cache_dir),
    )
    return MixtureLoader(
        cfg,
        TrainerConfig(seq_len=seq_len, global_batch_size=batch, micro_batch_size=batch, seed=1234),
        BenchTokenizer(),
        VOCAB,
    )


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


def bench_verify(
    root: Path, tokens: int, seq_len: int, batch: int, cache_dir: Path, rounds: int = 3
) -> dict:
    """The cost of hashing the shards (every shard's xxh3_128, once per process, as the loader
    first reads it): CPU time from building a loader to `tokens` tokens streamed, with the hash
    on and, by patching it out, off; rounds alternate and the medians are compared. This counts
    the one-time hashing that bench_ours leaves in its first batch."""
    import framework.data.packing as packing

    real = packing.check_shard_bytes

    def once(check) -> float:
        packing.check_shard_bytes = check
        try:
            c0 = time.process_time()
            loader = make_loader(root, seq_len, batch, cache_dir)
            for _ in range(max(1, tokens // (batch * seq_len))):
                next(loader)
            return time.process_time() - c0
        finally:
            packing.check_shard_bytes = real

    on, off = [], []
    for _ in range(rounds):
        off.append(once(lambda *a: None))
        on.append(once(real))
    on_s, off_s = float(np.median(on)), float(np.median(off))
    import pyarrow as pa
    import xxhash

    shards = sorted(root.glob("*/train-*.arrow"))
    c0 = time.process_time()
    for p in shards:
        xxhash.xxh3_128_hexdigest(memoryview(pa.memory_map(str(p)).read_buffer()))
    hash_s = time.process_time() - c0
    return {
        "verify_on_s": on_s,
        "verify_off_s": off_s,
        "verify_overhead": on_s / off_s - 1,
        "hash_bytes": sum(p.stat().st_size for p in shards),
        "hash_s": hash_s,  # all train shards once: the whole one-time cost, per process
    }


def bench_raw(root: Path, tokens: int, seq_len: int, batch: int) -> float:
    """The ceiling: one pass over the shards of all sources, each memory-mapped (zero-copy), cut
    into consecutive (B, T+1) windows copied into the same int64 batch buffer; no mixing or
    document bookkeeping."""
    from framework.data.shards import open_shard, read_manifest

    buf = np.empty((batch, seq_len + 1), dtype=np.int64)
    step = batch * (seq_len + 1)
    done, c0 = 0, time.process_time()
    while done < tokens:
        for name in SOURCES:
            m = read_manifest(root / name)
            for info in m.split("train"):
                toks, _ = open_shard(root / name / info.file, m.dtype)
                for i in range(len(toks) // step):
                    buf[:] = toks[i * step : (i + 1) * step].reshape(batch, seq_len + 1)
                    done += batch * seq_len
                    if done >= tokens:
                        return done / (time.process_time() - c0)
    return done / (time.process_time() - c0)


TORCHVISION_STUB = {  # streaming imports these names at import time; its text path never calls them
    "__init__.py": "",
    "datasets.py": "class VisionDataset:\n    pass\n\n\nclass CIFAR10(VisionDataset):\n    pass\n",
    "transforms/__init__.py": "",
    "transforms/functional.py": "def to_tensor(*a, **k):\n    raise NotImplementedError('torchvision stub')\n",
}
PEER_INSTALL = {  # pip arguments per peer venv (--no-deps where the full set would pull a CUDA torch)
    "datasets": [["datasets"]],
    "litdata": [
        ["torch==2.13.0", "numpy"],
        ["--no-deps", "litdata==0.2.76"],
        ["filelock", "lightning-utilities", "requests", "urllib3", "boto3", "obstore"],
    ],
    "mosaicml-streaming": [
        ["torch==2.13.0", "numpy<2.2"],
        ["--no-deps", "mosaicml-streaming==0.13.0"],
        ["transformers<5", "xxhash<4", "zstd", "tqdm", "catalogue", "brotli", "python-snappy", "pillow"],
    ],
}


def peer_python(name: str) -> tuple[str | None, str]:
    """(python of the peer's own venv, why not), creating the venv when absent. Never the
    project's .venv: litdata and streaming declare torchvision, which pulls a CUDA torch here."""
    default = "/tmp/peer-venv" if name == "datasets" else f"/tmp/peer-venv-{name}"
    venv = Path(os.environ.get(f"FW_PEER_VENV_{name.upper().replace('-', '_')}", default))
    py = venv / "bin" / "python"
    if not py.is_file():
        steps = [[sys.executable, "-m", "venv", str(venv)]]
        steps += [[str(venv / "bin" / "pip"), "install", "-q", *args] for args in PEER_INSTALL[name]]
        for cmd in steps:
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                shutil.rmtree(venv, ignore_errors=True)
                return (
                    None,
                    f"could not build the peer venv {venv}: {' '.join(cmd)}: {r.stderr.strip()[-300:]}",
                )
        if name == "mosaicml-streaming":
            site = next((venv / "lib").glob("python*/site-packages"))
            for rel, text in TORCHVISION_STUB.items():
                (site / "torchvision" / rel).parent.mkdir(parents=True, exist_ok=True)
                (site / "torchvision" / rel).write_text(text)
    return str(py), ""


def run_peer(name: str, root: Path, tokens: int, batch: int, seq_len: int) -> tuple[dict | None, str]:
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
    if args.peer == "datasets":
        print(json.dumps(peer_datasets(args.data, tokens, args.batch)))
        return
    if args.peer == "mosaicml-streaming":
        print(json.dumps(peer_streaming(args.data, tokens, args.batch, args.seq_len)))
        return
    if args.peer == "litdata":
        print(json.dumps(peer_litdata(args.data, tokens, args.batch, args.seq_len)))
        return
    sys.path.insert(0, str(REPO))
    root = args.data or Path(f"/tmp/fw-bench-data-{tokens}-{args.seq_len}")
    t0 = time.perf_counter()
    build_data(root, tokens, args.seq_len)
    print(f"data at {root} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    measured = min(tokens, int(5e7))  # tokens streamed per measurement
    ours = bench_ours(root, measured, args.seq_len, args.batch, root / "cache")
    raw = bench_raw(root, measured, args.seq_len, args.batch)
    verify = bench_verify(root, measured, args.seq_len, args.batch, root / "cache")
    vs: dict[str, float | None] = {}
    peers: dict[str, dict | str] = {}
    for name in ("litdata", "mosaicml-streaming", "datasets"):
        res, why = (
            (None, "skipped (--no-peers)")
            if args.no_peers
            else run_peer(name, root, measured, args.batch, args.seq_len)
        )
        vs[name] = None if res is None else ours["tokens_per_s"] / res["tokens_per_s"]
        peers[name] = res if res is not None else why
    result = {
        "tokens_per_s_per_core": ours["tokens_per_s"],
        "first_batch_s": ours["first_batch_s"],
        "vs": vs,
        "raw_read_fraction": ours["tokens_per_s"] / raw,
        "raw_read_tokens_per_s": raw,
        **verify,
        "peers": peers,
        "tokens_on_disk": tokens,
        "tokens_measured": measured,
        "seq_len": args.seq_len,
        "batch": args.batch,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

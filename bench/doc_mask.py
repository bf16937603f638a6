"""Document-masked attention: forward + backward time of the whole model with each way of keeping
attention inside the documents of packed windows (data.attend_across_documents=false).

    python bench/doc_mask.py                                  # debug model, seq 512 and 2048
    python bench/doc_mask.py --model debug-llama --seq 512 --mean-doc 200 --reps 5

Kernels compared (framework.model.attention.KERNELS, plus two that were not kept):
- causal:     no mask at all (attention across documents): the floor;
- sdpa:       SDPA with a dense boolean (B, 1, S, S) mask built once per forward;
- sdpa_float: SDPA with an additive float mask (0 / -inf) instead of the boolean one;
- varlen:     per-document attention: one causal SDPA call per document piece of every window
              (nested-tensor SDPA would do this in one call, but torch 2.13 has no causal
              nested-tensor kernel: "Nested tensors for query / key are not supported when
              is_causal=True");
- flex:       FlexAttention with a block mask. Timed where it can train: on CPU torch 2.13
              refuses its backward ("FlexAttention does not support backward on CPU"), so only
              the refusal is recorded there.
Document lengths are drawn from a geometric distribution (--mean-doc tokens, seeded), packed
back to back as the loader packs them. Each figure is the median over --reps timed steps after
one warm-up, in one thread: "fwd_bwd_s" is the process's CPU time (the work done, stable on a
shared box), "wall_s" the wall clock. The last line printed is one JSON object {"device",
"model", "results": [{"seq", "kernel", "fwd_bwd_s", "wall_s", "over_causal", ...}]}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from framework.model.attention import KERNELS, dense_doc_mask  # noqa: E402


def float_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    m = dense_doc_mask(doc_ids)
    return torch.zeros(m.shape, dtype=torch.float32).masked_fill(~m, float("-inf"))


VARIANTS = {
    "causal": None,
    "sdpa": KERNELS["sdpa"],
    "sdpa_float": (float_mask, KERNELS["sdpa"][1]),
    "varlen": KERNELS["varlen"],
    "flex": KERNELS["flex"],
}


def packed_doc_ids(batch: int, seq: int, mean_doc: float, seed: int) -> torch.Tensor:
    """(batch, seq) doc ids of windows cut from one stream of geometric-length documents."""
    g = torch.Generator().manual_seed(seed)
    p = 1.0 / mean_doc
    rows = []
    for _ in range(batch):
        # the first document started in the window before: it continues here
        ids, left, d = [], int(torch.empty(()).geometric_(p, generator=g)), 0
        while len(ids) < seq:
            ids += [d] * min(left, seq - len(ids))
            d, left = d + 1, int(torch.empty(()).geometric_(p, generator=g))
        rows.append(ids)
    return torch.tensor(rows)


def time_step(model, idx, doc_ids, reps: int) -> tuple[float, float]:
    """Median (CPU seconds, wall seconds) of one forward + backward. In one thread the process's
    CPU time is the work done, whatever else the shared box runs; wall time is reported too."""
    cpu, wall = [], []
    for i in range(reps + 1):
        model.zero_grad(set_to_none=True)
        c, t = time.process_time(), time.perf_counter()
        loss = model(idx, idx, doc_ids)
        loss.backward()
        if i:  # the first is a warm-up
            cpu.append(time.process_time() - c)
            wall.append(time.perf_counter() - t)
    return statistics.median(cpu), statistics.median(wall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="debug")
    ap.add_argument("--seq", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per step (batch = tokens/seq)")
    ap.add_argument("--mean-doc", type=float, default=300.0)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--kernels", nargs="+", default=list(VARIANTS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    from hydra import compose, initialize_config_dir

    from framework import config as C
    from framework.model.gpt import GPT

    results = []
    for seq in args.seq:
        with initialize_config_dir(config_dir=C.CONF_DIR, version_base=None):
            overrides = [f"model={args.model}", f"model.block_size={max(seq, 256)}"]
            cfg = C.load(compose(config_name="config", overrides=overrides))
        torch.manual_seed(0)
        model = GPT(cfg.model).to(args.device)
        batch = max(1, args.tokens // seq)
        idx = torch.randint(0, cfg.model.vocab_size, (batch, seq), device=args.device)
        doc_ids = packed_doc_ids(batch, seq, args.mean_doc, seed=seq).to(args.device)
        docs = float((doc_ids[:, -1] + 1).float().mean())
        for name in args.kernels:
            row = {"seq": seq, "batch": batch, "docs_per_window": docs, "kernel": name}
            if VARIANTS[name] is None:
                row["fwd_bwd_s"], row["wall_s"] = time_step(model, idx, None, args.reps)
            else:
                model.doc_mask, core = VARIANTS[name]
                for block in model.blocks.values():
                    block.attn.core = core
                try:
                    row["fwd_bwd_s"], row["wall_s"] = time_step(model, idx, doc_ids, args.reps)
                except (NotImplementedError, RuntimeError) as e:
                    row["error"] = str(e).splitlines()[0][:160]
            print(json.dumps(row), flush=True)
            results.append(row)
        model.use_attention("sdpa")
    base = {r["seq"]: r["fwd_bwd_s"] for r in results if r["kernel"] == "causal"}
    for r in results:
        if "fwd_bwd_s" in r and r["seq"] in base:
            r["over_causal"] = round(r["fwd_bwd_s"] / base[r["seq"]], 3)
    print(
        json.dumps(
            {
                "device": args.device,
                "machine": platform.processor() or platform.machine(),
                "torch": torch.__version__,
                "model": args.model,
                "mean_doc": args.mean_doc,
                "tokens_per_step": args.tokens,
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()

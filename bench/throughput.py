"""GPU training throughput: our framework's loop vs a minimal plain-PyTorch loop on the same model.

    python bench/throughput.py                                  # gpt2-124m and gpt2-1.3b, bf16, 1 GPU
    python bench/throughput.py --models gpt2-124m --steps 50 --micro-batch 32 --compile

Both loops train framework.model.gpt.GPT (the conf/model flavor) in bf16 autocast with fused
AdamW (weight decay on matrices, as framework.optim) and SDPA attention, on one GPU:
  minimal  host batch -> device, forward, backward, grad clip, AdamW step, loss.item() (nanoGPT)
  ours     --ours train: framework.train.train(cfg) itself (data loader, engine, metrics; the
           per-step tokens/s it writes to metrics.jsonl, each step ends in a device sync);
           --ours engine: framework.parallel.build_engine + forward_backward/step on the same
           synthetic batches as minimal (the engine without the data loader).
tokens/s is measured after --warmup steps over --steps steps, bracketed by
torch.cuda.synchronize(). MFU uses framework.perf (6N + 12 L H Q T FLOPs/token over the
device's dense bf16 peak). overhead_ratio = ours / minimal tokens/s (goal >= 0.98).
Prints one JSON line per model, then a summary line. Without CUDA it prints
{"skipped": "no CUDA device"} and exits 0 (--device cpu runs a tiny smoke of both loops).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, uninstalled

from framework import memory  # noqa: E402
from framework.config import CONF_DIR, Config, load  # noqa: E402
from framework.model.gpt import GPT, ModelConfig, num_params  # noqa: E402
from framework.optim import param_groups  # noqa: E402
from framework.perf import flops_per_token, mfu, peak_flops  # noqa: E402

GOAL_MFU = {"gpt2-124m": 0.45, "gpt2-1.3b": 0.50}  # ANCHORS.md "Performance figures"
GOAL_OVERHEAD = 0.98
SEQ_LEN = {"gpt2-124m": 1024}  # others: the model's block_size (2048 for 1.3B)


def compose(overrides: list[str]) -> Config:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return load(hydra_compose(config_name="config", overrides=overrides))


def bench_config(model: str, args, micro_batch: int, run_dir: str) -> Config:
    seq_len = args.seq_len or SEQ_LEN.get(model) or compose([f"model={model}"]).model.block_size
    return compose(
        [
            f"model={model}",
            "strategy=single",
            f"strategy.compile={str(args.compile).lower()}",
            f"precision={args.precision}",
            f"trainer.device={args.device}",
            f"trainer.seq_len={seq_len}",
            f"trainer.micro_batch_size={micro_batch}",
            f"trainer.global_batch_size={micro_batch * args.accum}",
            f"trainer.max_steps={args.warmup + args.steps}",
            "trainer.eval_every=0",
            "trainer.sample_tokens=0",
            "trainer.log_every=10",
            "checkpoint.every=0",
            "checkpoint.resume=never",
            "optim.warmup_steps=0",
            f"run.dir={run_dir}",
        ]
    )


def pick_micro_batch(m: ModelConfig, seq_len: int, device_bytes: int) -> int:
    """Largest power of two whose planned memory (framework.memory, as framework.plan counts
    strategy=single in bf16) stays within 60% of the device: the plan leaves out backward's
    transient buffers inside a block, so keep a wide margin."""
    fixed = 16 * num_params(m) + memory.weight_copies_bytes(m, 1, "single", "bf16")
    stream = memory.stream_bytes("bf16", "single")

    def planned(b: int) -> float:
        return fixed + memory.activation_bytes(m, seq_len, b, "none", compute_bytes=2, stream=stream)

    b = 1
    while planned(2 * b) <= 0.6 * device_bytes and b < 256:
        b *= 2
    return b


def host_batches(n: int, micro_batch: int, seq_len: int, vocab: int, pin: bool) -> list:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (micro_batch, seq_len + 1), generator=g)
        x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
        out.append((x.pin_memory(), y.pin_memory()) if pin else (x, y))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step_fn, warmup: int, steps: int, device: torch.device) -> float:
    """Seconds for `steps` optimizer steps after `warmup` untimed ones."""
    for i in range(warmup):
        step_fn(i)
    sync(device)
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step_fn(i)
    sync(device)
    return time.perf_counter() - start


def minimal_loop(cfg: Config, args, device: torch.device) -> float:
    """Tokens/s of the plain loop (same model, autocast dtype, fused AdamW, grad clip)."""
    t, o = cfg.trainer, cfg.optim
    torch.manual_seed(t.seed)
    model = GPT(cfg.model).to(device)
    if args.compile:  # per block, as strategy.compile does
        for name, block in model.blocks.items():
            model.blocks[name] = torch.compile(block)
    opt = torch.optim.AdamW(
        param_groups(model, o.weight_decay),
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        fused=device.type == "cuda",
    )
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    batches = host_batches(
        args.accum, t.micro_batch_size, t.seq_len, cfg.model.vocab_size, device.type == "cuda"
    )

    def step(_):
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = model(x, y)
            (loss / args.accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()

    seconds = timed_steps(step, args.warmup, args.steps, device)
    return args.steps * args.accum * t.micro_batch_size * t.seq_len / seconds


def ours_engine(cfg: Config, args, device: torch.device) -> float:
    """Tokens/s of our engine (build_engine + forward_backward/step), synthetic batches."""
    from framework.data.loader import Batch
    from framework.dist import Dist
    from framework.optim import lr_at
    from framework.parallel import build_engine

    t = cfg.trainer
    torch.manual_seed(t.seed)
    dist = Dist(device=device)
    engine = build_engine(GPT(cfg.model).to(device), cfg, dist)
    batches = [Batch(x, y) for x, y in host_batches(args.accum, t.micro_batch_size, t.seq_len, cfg.model.vocab_size, device.type == "cuda")]  # fmt: skip
    engine.train(True)

    def step(i):
        loss = torch.zeros((), device=device)
        for batch in batches:
            loss += engine.forward_backward(batch, args.accum)
        engine.step(lr_at(i + 1, cfg.optim, t.max_steps))
        dist.all_reduce_mean(loss / args.accum).item()

    seconds = timed_steps(step, args.warmup, args.steps, device)
    return args.steps * args.accum * t.micro_batch_size * t.seq_len / seconds


def ours_train(cfg: Config, args, device: torch.device) -> float:
    """Tokens/s of framework.train.train: from its metrics.jsonl, steps after the warm-up
    (each step's time runs from data to the synced loss; eval and the final save are outside)."""
    from framework.train import train

    train(cfg)
    records = [
        json.loads(line) for line in (Path(cfg.run.dir) / "metrics.jsonl").read_text().splitlines()
    ]
    timed = [r for r in records if "tokens_per_s" in r and r["step"] > args.warmup]
    tokens_per_step = cfg.trainer.global_batch_size * cfg.trainer.seq_len
    seconds = sum(tokens_per_step / r["tokens_per_s"] for r in timed)
    return len(timed) * tokens_per_step / seconds


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_model(model: str, args, device: torch.device, work: Path) -> dict:
    probe = compose([f"model={model}"])
    seq_len = args.seq_len or SEQ_LEN.get(model) or probe.model.block_size
    if args.micro_batch:
        micro = args.micro_batch
    elif device.type == "cuda":
        micro = pick_micro_batch(
            probe.model, seq_len, torch.cuda.get_device_properties(device).total_memory
        )
    else:
        micro = 2
    while True:
        cfg = bench_config(model, args, micro, str(work / f"{model}-b{micro}"))
        try:
            minimal = minimal_loop(cfg, args, device)
            break
        except torch.OutOfMemoryError:
            free(device)
            if micro == 1:
                return {"model": model, "error": "minimal loop: out of memory at micro-batch 1"}
            micro //= 2  # the plan's estimate was optimistic: halve and retry
    free(device)
    fpt = flops_per_token(cfg.model, cfg.trainer.seq_len)
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    result = {
        "model": model,
        "seq_len": cfg.trainer.seq_len,
        "micro_batch": micro,
        "accum": args.accum,
        "steps": args.steps,
        "warmup": args.warmup,
        "compile": args.compile,
        "ours_loop": args.ours,
        "flops_per_token": fpt,
        "goal_mfu": GOAL_MFU.get(model),
        "minimal": {"tokens_per_s": round(minimal), "mfu": mfu(minimal, fpt, peak)},
    }
    try:
        ours = (ours_train if args.ours == "train" else ours_engine)(cfg, args, device)
    except Exception as e:  # keep the minimal figure and go on: one GPU call is precious
        result["error"] = f"ours ({args.ours}): {type(e).__name__}: {e}"
        return result
    finally:
        free(device)
    ours_mfu = mfu(ours, fpt, peak)
    result["ours"] = {"tokens_per_s": round(ours), "mfu": ours_mfu}
    result["overhead_ratio"] = round(ours / minimal, 4)
    result["meets_mfu_goal"] = (
        None if ours_mfu is None or model not in GOAL_MFU else ours_mfu >= GOAL_MFU[model]
    )
    result["meets_overhead_goal"] = ours / minimal >= GOAL_OVERHEAD
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="gpt2-124m,gpt2-1.3b", help="comma-separated conf/model flavors")
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compile, allocator)")
    ap.add_argument("--micro-batch", type=int, default=None, help="default: largest that the plan fits")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--seq-len", type=int, default=None, help="default: 1024 (124M), else block_size")
    ap.add_argument("--compile", action="store_true", help="torch.compile each block in both loops")
    ap.add_argument("--ours", choices=("train", "engine"), default="train")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a smoke test only")
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if not (Path(CONF_DIR) / "model" / f"{m}.yaml").is_file()]
    if unknown:
        ap.error(f"--models: no conf/model/<name>.yaml for {unknown}")

    if args.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device"}))
        return 0
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers (loss, norms) on tensor cores
    with tempfile.TemporaryDirectory(prefix="fw-bench-") as tmp:
        # The embedded sample corpus (data=sample) for --ours train, generated once per run.
        os.environ.setdefault("FW_DATA_ROOT", str(Path(tmp) / "data"))
        results = []
        for model in models:
            result = run_model(model, args, device, Path(tmp))
            print(json.dumps(result), flush=True)
            results.append(result)
    ok = [r for r in results if "ours" in r]
    summary = {
        "summary": True,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "tokens_per_s": {r["model"]: r["ours"]["tokens_per_s"] for r in ok},
        "mfu": {r["model"]: r["ours"]["mfu"] for r in ok},
        "minimal_mfu": {r["model"]: r["minimal"]["mfu"] for r in results if "minimal" in r},
        "overhead_ratio": {r["model"]: r["overhead_ratio"] for r in ok},
        "errors": {r["model"]: r["error"] for r in results if "error" in r},
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }
    print(json.dumps(summary), flush=True)
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""Where training numbers go: metrics.jsonl, train.log, a progress bar, loss.png, and the
optional wandb / TensorBoard sinks. Rank 0 writes; the other ranks only log warnings.

Sinks are small objects with `log(record)` and `close()`, chosen once at start-up; the loop
calls `Metrics.log(...)` and never asks which sinks exist.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from framework.config import Config, LoggerConfig, to_dict

log = logging.getLogger("framework")


def setup_logging(rank: int, log_file: Path | None = None) -> None:
    """Rank 0 logs INFO to stderr and train.log; other ranks only WARNING, tagged with the rank."""
    log.handlers.clear()
    log.propagate = False
    level = logging.INFO if rank == 0 else logging.WARNING
    log.setLevel(level)
    fmt = logging.Formatter(
        "%(asctime)s %(levelname)s " + (f"[rank {rank}] " if rank else "") + "%(message)s",
        "%H:%M:%S",
    )
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    log.addHandler(stream)
    if log_file is not None:
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        log.addHandler(fh)


class JsonlSink:
    """metrics.jsonl: one object per line; floats keep full precision (json uses repr)."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        # On resume, drop records past the checkpoint: those steps are about to be redone.
        if resume_step > 0 and path.exists():
            keep = [
                ln
                for ln in path.read_text().splitlines()
                if json.loads(ln).get("step", 0) <= resume_step
            ]
            path.write_text("".join(ln + "\n" for ln in keep))
        elif resume_step == 0 and path.exists():
            path.unlink()
        self.f = open(path, "a", buffering=1)

    def log(self, record: dict) -> None:
        self.f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.f.close()


def new_wandb_id() -> str:
    """A fresh wandb run id (8 lowercase hex characters, within wandb's allowed [a-z0-9_-]).
    Ours, not wandb.util.generate_id: that helper is gone in wandb 0.31 (issue 7)."""
    return secrets.token_hex(4)


class WandbSink:
    def __init__(self, cfg: Config, run_dir: Path):
        import wandb  # seconds to import, and only logger=wandb needs it

        lc: LoggerConfig = cfg.logger
        # A stable id stored in the run dir makes a resumed run continue the same wandb run.
        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else new_wandb_id()
        id_file.write_text(run_id)
        self.run = wandb.init(
            project=lc.project,
            entity=lc.entity,
            mode=lc.mode,
            dir=str(run_dir),
            name=cfg.run.name,
            id=run_id,
            resume="allow",
            tags=list(lc.tags),
            config=to_dict(cfg),  # the schema has no secret fields; the key comes from the env
        )

    def log(self, record: dict) -> None:
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        self.run.finish()


class TensorBoardSink:
    def __init__(self, run_dir: Path, start_step: int):
        # imports tensorboard (seconds): only logger=tensorboard needs it
        from torch.utils.tensorboard import SummaryWriter

        # On resume, events past the checkpoint (steps about to be redone) are purged: without
        # it a run resumed at 5 after reaching 10 shows steps 1..10, 6..10.
        purge = start_step + 1 if start_step > 0 else None
        self.w = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)

    def log(self, record: dict) -> None:
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and v is not None:
                self.w.add_scalar(k, v, record["step"])

    def close(self) -> None:
        self.w.close()


class Progress:
    """A tqdm bar (tokens/s, loss, ETA) on a terminal; plain log lines every log_every otherwise.

    While the bar is up, the logger's console handler writes through tqdm (tqdm's own
    logging_redirect_tqdm), so each log line appears once above the bar; train.log is unchanged."""

    def __init__(self, start_step: int, max_steps: int, log_every: int):
        self.log_every = log_every
        self.bar = None
        self._redirect = None
        if sys.stderr.isatty():
            self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)
            self._redirect = logging_redirect_tqdm([log])
            self._redirect.__enter__()

    def update(self, record: dict) -> None:
        tps = record.get("tokens_per_s") or 0.0
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
        elif record["step"] % self.log_every == 0:
            mfu = record.get("mfu")
            log.info(
                "step %d  loss %.4f  lr %.2e  grad_norm %.3f  %s tok/s%s",
                record["step"],
                record["loss"],
                record["lr"],
                record["grad_norm"],
                f"{tps:,.0f}",
                f"  mfu {mfu:.1%}" if mfu is not None else "",
            )

    def write(self, msg: str) -> None:
        log.info(msg)

    def close(self) -> None:
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None
        if self.bar is not None:
            self.bar.close()


class Metrics:
    """Rank 0's sinks. On other ranks every method is a no-op."""

    def __init__(self, cfg: Config, run_dir: Path, rank: int, start_step: int):
        self.active = rank == 0
        self.run_dir = run_dir
        self.start_step = start_step
        self.max_steps = cfg.trainer.max_steps
        self.t0 = time.perf_counter()  # wall time of this invocation's loop (after the build)
        self.sinks: list = []
        if not self.active:
            return
        self.sinks.append(JsonlSink(run_dir / "metrics.jsonl", start_step))
        if cfg.logger.name == "wandb":
            self.sinks.append(WandbSink(cfg, run_dir))
        elif cfg.logger.name == "tensorboard":
            self.sinks.append(TensorBoardSink(run_dir, start_step))
        self.progress = Progress(start_step, cfg.trainer.max_steps, cfg.trainer.log_every)

    def log_train(self, record: dict) -> None:
        if not self.active:
            return
        for s in self.sinks:
            s.log(record)
        self.progress.update(record)

    def log_eval(self, record: dict, sample: str | None = None) -> None:
        if not self.active:
            return
        for s in self.sinks:
            s.log(record)
        per_source = "  ".join(
            f"{k.removeprefix('val_loss/')} {v:.4f}"
            for k, v in record.items()
            if k.startswith("val_loss/")
        )
        self.progress.write(
            f"eval step {record['step']}: val_loss {record['val_loss']:.4f} "
            f"(ppl {record['val_ppl']:.2f})  {per_source}"
        )
        if sample is not None:
            self.progress.write(f"sample: {sample!r}")
        self.plot()

    def log_data(self, record: dict) -> None:
        if self.active:
            for s in self.sinks:
                s.log(record)

    def plot(self) -> None:
        """loss.png, redrawn at each eval from metrics.jsonl (the sinks flush every line)."""
        plot_run(read_records(self.run_dir / "metrics.jsonl"), self.run_dir / "loss.png")

    def close(self) -> None:
        if not self.active:
            return
        self.progress.close()
        for s in self.sinks:
            s.close()

    def print_summary(self) -> None:
        """The end-of-run summary of this invocation (rank 0), from metrics.jsonl."""
        if not self.active:
            return
        records = read_records(self.run_dir / "metrics.jsonl")
        s = summarize(records, self.start_step, self.max_steps, time.perf_counter() - self.t0)
        show_summary(s, sys.stderr.isatty())


def read_records(path: Path) -> list[dict]:
    """metrics.jsonl's records; a last line still being written (a live run) is left out."""
    if not path.exists():
        return []
    out = []
    for ln in path.read_text().splitlines():
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError:
            break  # a torn last line of a run being written; nothing after it is complete
    return out


def plot_run(records: list[dict], out: Path) -> None:
    """loss.png: train and val loss (the weighted mixture and each source), and tokens/s, over
    steps. Written to a temp file and renamed, so a reader never sees half a PNG."""
    # matplotlib takes a second to import, for the one plot at the end of a run; the headless
    # backend is chosen before pyplot is imported
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    speed = [(r["step"], r["tokens_per_s"]) for r in records if r.get("tokens_per_s")]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(3, 1))
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val", lw=1.5)
        for key in sorted({k for r in evals for k in r if k.startswith("val_loss/")}):
            pts = [(r["step"], r[key]) for r in evals if key in r]
            ax.plot(*zip(*pts), ".--", label=key.removeprefix("val_loss/"), lw=0.8, alpha=0.8)
    ax.set_ylabel("loss (nats/token)")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    if speed:
        ax2.plot(*zip(*speed), lw=0.8, color="tab:gray")
    ax2.set_ylabel("tokens/s")
    ax2.set_xlabel("step")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def summarize(
    records: list[dict], start_step: int = 0, max_steps: int | None = None, wall_s: float | None = None
) -> dict:
    """The numbers that close a run, as a pure function of metrics.jsonl records.

    Counts the train records after `start_step` (this invocation; 0: the whole run). tokens_per_s
    is the tokens of those steps over their summed step times (the harmonic mean of the per-step
    figures; eval and checkpoint time excluded); mfu is the mean of the steps that report one.
    val_loss / val_loss_per_source come from the last eval record of the whole file. moe: a sparse
    model's routing figures of the last train record (`moe/<stat>`, means over sparse layers)."""
    train = [r for r in records if "loss" in r and r["step"] > start_step]
    evals = [r for r in records if "val_loss" in r]
    last_step = max((r["step"] for r in records if "loss" in r), default=start_step)
    out: dict = {
        "steps_run": len(train),
        "first_step": train[0]["step"] if train else None,
        "last_step": last_step,
        "max_steps": max_steps,
        "tokens": train[-1]["tokens"] if train else None,
        "tokens_run": None,
        "wall_s": wall_s,
        "last_loss": train[-1]["loss"] if train else None,
        "val_step": evals[-1]["step"] if evals else None,
        "val_loss": evals[-1]["val_loss"] if evals else None,
        "val_loss_per_source": {
            k.removeprefix("val_loss/"): v
            for k, v in (evals[-1] if evals else {}).items()
            if k.startswith("val_loss/")
        },
        "tokens_per_s": None,
        "mfu": None,
        "moe": {
            k.removeprefix("moe/"): v
            for k, v in (train[-1] if train else {}).items()
            if k.startswith("moe/") and k.count("/") == 1
        },
    }
    if train:
        prev_tokens = next(
            (r["tokens"] for r in reversed(records) if "loss" in r and r["step"] <= start_step), 0
        )
        per_step = [
            (r["tokens"] - prev, r.get("tokens_per_s"))
            for prev, r in zip([prev_tokens] + [r["tokens"] for r in train], train)
        ]
        out["tokens_run"] = train[-1]["tokens"] - prev_tokens
        timed = [(n, tps) for n, tps in per_step if tps]
        if timed:
            out["tokens_per_s"] = sum(n for n, _ in timed) / sum(n / tps for n, tps in timed)
        mfus = [r["mfu"] for r in train if r.get("mfu") is not None]
        if mfus:
            out["mfu"] = sum(mfus) / len(mfus)
    out["time_s"] = phase_times(train)
    out["stragglers"] = straggler_summary(train)
    return out


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 1]) of a non-empty list."""
    v = sorted(values)
    return v[max(math.ceil(q * len(v)), 1) - 1]


def phase_times(train: list[dict]) -> dict:
    """{phase: {mean, p50, p90, share, steps}} over the steps that measured it (time/<phase>_s:
    device-synchronised log_every steps, perf.StepTimer); share is of the mean step time."""
    phases = sorted({k[5:-2] for r in train for k in r if k.startswith("time/") and k.endswith("_s")})
    step_mean = None
    out = {}
    for ph in ["step"] + [p for p in phases if p != "step"]:
        vals = [r[f"time/{ph}_s"] for r in train if r.get(f"time/{ph}_s") is not None]
        if not vals:
            continue
        mean = sum(vals) / len(vals)
        step_mean = mean if ph == "step" else step_mean
        out[ph] = {
            "mean": mean,
            "p50": percentile(vals, 0.5),
            "p90": percentile(vals, 0.9),
            "share": mean / step_mean if step_mean and ph != "checkpoint" else None,
            "steps": len(vals),
        }
    return out


def straggler_summary(train: list[dict]) -> dict:
    """The straggler checks (framework.observe.StragglerCheck): how many ran, the slowest
    rank's largest lead over the median, and {rank: {checks, max_ratio}} of the ranks named."""
    checks = [r["straggler/max_ratio"] for r in train if "straggler/max_ratio" in r]
    named: dict[str, dict] = {}
    for r in train:
        if "straggler/rank" in r:
            n = named.setdefault(str(r["straggler/rank"]), {"checks": 0, "max_ratio": 0.0})
            n["checks"] += 1
            n["max_ratio"] = max(n["max_ratio"], r["straggler/ratio"])
    return {"checks": len(checks), "max_ratio": max(checks, default=None), "named": named}


def summary_rows(s: dict) -> list[tuple[str, str]]:
    """(label, value) rows of a summary, for a table or plain log lines."""
    total = f" of {s['max_steps']}" if s.get("max_steps") else ""
    run = f" ({s['first_step']}..{s['last_step']})" if s["steps_run"] else ""
    rows = [("steps", f"{s['steps_run']} this run{run}; at step {s['last_step']}{total}")]
    if s["tokens"] is not None:
        rows.append(("tokens", f"{s['tokens_run']:,} this run; {s['tokens']:,} in total"))
    if s["wall_s"] is not None:
        rows.append(("wall time", f"{s['wall_s']:.1f} s"))
    if s["last_loss"] is not None:
        rows.append(("last train loss", f"{s['last_loss']:.4f}"))
    if s["val_loss"] is not None:
        per = "  ".join(f"{k} {v:.4f}" for k, v in s["val_loss_per_source"].items())
        rows.append(
            (f"val loss (step {s['val_step']})", f"{s['val_loss']:.4f}" + (f"  ({per})" if per else ""))
        )
    if s["tokens_per_s"] is not None:
        rows.append(("mean tokens/s", f"{s['tokens_per_s']:,.0f}"))
    if s["mfu"] is not None:
        rows.append(("mean MFU", f"{s['mfu']:.1%}"))
    if moe := s.get("moe"):
        labels = {"max_mean": "max/mean tokens per expert", "aux_loss": "aux loss",
                  "z_loss": "z loss", "router_entropy": "router entropy"}  # fmt: skip
        text = ", ".join(f"{labels.get(k, k)} {v:.3f}" for k, v in moe.items())
        rows.append(("routing (last step)", text))
    for ph, t in (s.get("time_s") or {}).items():
        share = f", {t['share']:.0%} of the step" if t["share"] is not None and ph != "step" else ""
        label = {"step": "step time", "data": "  data wait"}.get(ph, f"  {ph.replace('_', ' ')}")
        rows.append(
            (
                label,
                f"mean {t['mean']:.4f} s, p50 {t['p50']:.4f}, p90 {t['p90']:.4f}{share} ({t['steps']} steps)",
            )
        )
    st = s.get("stragglers") or {}
    if st.get("named"):
        rows.append(
            ("stragglers", "; ".join(f"rank {r} named at {n['checks']} of {st['checks']} checks (up to "
                                      f"{n['max_ratio']:.2f}x the median lead)" for r, n in st["named"].items()))
        )  # fmt: skip
    elif st.get("checks"):
        rows.append(
            ("stragglers", f"none in {st['checks']} checks (slowest {st['max_ratio']:.2f}x the median)")
        )
    return rows


def show_summary(s: dict, terminal: bool, to_log: bool = True) -> None:
    """A small rich table on a terminal (the plain lines still go to train.log), log lines
    otherwise; to_log=False (framework.report): plain lines to stderr, nothing to a log."""
    rows = summary_rows(s)
    if not terminal:
        text = "run summary:\n" + "\n".join(f"  {k}: {v}" for k, v in rows)
        if to_log:
            log.info("%s", text)
        else:
            print(text, file=sys.stderr)
        return
    table = Table(title="run summary", show_header=False)
    for k, v in rows:
        table.add_row(k, v)
    Console(file=sys.stderr).print(table)
    if not to_log:
        return
    text = "run summary:\n" + "\n".join(f"  {k}: {v}" for k, v in rows)
    for h in log.handlers:
        if isinstance(h, logging.FileHandler):
            h.emit(log.makeRecord(log.name, logging.INFO, __file__, 0, text, None, None))

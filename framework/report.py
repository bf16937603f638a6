"""The summary of any run directory, also one still being written, and a redrawn loss.png.

    python -m framework.report run.dir=runs/debug

Prints the same summary as the end of a training run (steps, tokens, last val loss overall and
per source, mean tokens/s and MFU, the step time per phase, stragglers named) from
<run.dir>/metrics.jsonl and <run.dir>/config.yaml, redraws <run.dir>/loss.png (train/val,
per-source val, tokens/s), and ends with one JSON line. After a hang (<run.dir>/stacks/, written
by framework.faults.Watchdog) it first prints a diagnosis: which ranks are behind, on which
collective, with the top frames of their stacks; the JSON line then has a "hang" object.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from framework.cli import entry, to_object
from framework.config import ConfigError
from framework.faults import FLIGHT_FILE
from framework.metrics import plot_run, read_records, show_summary, summarize


@dataclass
class ReportRun:
    dir: str = MISSING
    """The run directory (holds metrics.jsonl)."""


@dataclass
class ReportConfig:
    run: ReportRun = field(default_factory=ReportRun)
    plot: bool = True
    """Redraw <run.dir>/loss.png."""


ConfigStore.instance().store(name="report_schema", node=ReportConfig)


def report(cfg: ReportConfig) -> dict:
    run_dir = Path(cfg.run.dir)
    metrics = run_dir / "metrics.jsonl"
    hang = hang_diagnosis(run_dir / "stacks")
    if not metrics.is_file() and hang is None:
        raise ConfigError(f"run.dir={run_dir}: no metrics.jsonl here (is it a run directory?)")
    records = read_records(metrics)
    max_steps = None
    if (run_dir / "config.yaml").is_file():
        max_steps = OmegaConf.select(OmegaConf.load(run_dir / "config.yaml"), "trainer.max_steps")
    summary = summarize(records, 0, max_steps)
    if cfg.plot and records:
        plot_run(records, run_dir / "loss.png")
    if hang is not None:
        summary["hang"] = hang
    return summary


# -- hang diagnosis ---------------------------------------------------------------------------
def hang_diagnosis(stacks: Path) -> dict | None:
    """Compare the ranks' flight records (stacks/flight_rank_<r>.json: the collectives each
    entered and completed, per process group; sequence numbers count a group's collectives and
    are the same on every member) and their faulthandler stacks (stacks/rank_<r>.txt).

    In every group, the ranks that entered fewer collectives than the furthest rank are behind:
    the others wait for them inside the collective they have not reached. A rank with neither
    file is stopped or killed (a SIGSTOPed process writes nothing) and is named as such.
    Returns {"lines": [...], "behind": [ranks], "missing": [ranks], "collective": {...}} or None
    without a stacks folder."""
    if not stacks.is_dir():
        return None
    records = {}
    for path in sorted(stacks.glob(FLIGHT_FILE.format(rank="*"))):
        try:
            rec = json.loads(path.read_text())
            records[int(rec["rank"])] = rec
        except (ValueError, KeyError) as e:  # written atomically; a foreign file is named
            raise ConfigError(f"{path}: not a flight record ({e})") from e
    dumped = {
        int(m.group(1))
        for p in stacks.glob("rank_*.txt")
        if (m := re.match(r"rank_(\d+)\.txt$", p.name))
    }
    world = max(
        [r.get("world_size", 1) for r in records.values()] + [max(dumped | set(records), default=-1) + 1]
    )
    missing = sorted(set(range(world)) - set(records) - dumped)
    lines = [f"hang diagnosis ({stacks}):"]
    for rank, rec in sorted(records.items()):
        last = _last_entered(rec["entries"])
        where = "in no collective yet"
        if last is not None:
            state = "waiting in" if not last["completed"] else "last entered (completed)"
            where = f"{state} {_describe(last)}"
        lines.append(f"  rank {rank} (host {rec.get('host')}, step {rec.get('step')}): {where}")
    for rank in sorted(dumped - set(records)):
        lines.append(f"  rank {rank}: stacks but no flight record (its watchdog thread could not run)")
    behind, front = _behind(records)
    for rank in missing:
        lines.append(
            f"  rank {rank}: no stacks and no flight record: stopped (SIGSTOP), killed, or its host is down"
        )
    if front is not None and behind:
        waiting = sorted(r for r in records if r not in behind)
        lines.append(
            f"=> rank(s) {', '.join(map(str, behind))} behind: never entered collective {_describe(front)}, "
            f"which rank(s) {', '.join(map(str, waiting))} wait in"
        )  # fmt: skip
    elif missing:
        lines.append(
            f"=> rank(s) {', '.join(map(str, missing))} wrote nothing: the others wait for them"
        )
    elif front is not None and not front["completed"]:
        lines.append(
            f"=> every rank is inside collective {_describe(front)}: the collective itself hangs "
            "(network, NCCL), not a rank behind"
        )
    for rank in sorted(set(behind) | (dumped - set(behind))):
        frames = top_frames((stacks / f"rank_{rank}.txt").read_text()) if rank in dumped else []
        if frames:
            lines.append(f"  rank {rank} stack (most recent call first): " + " <- ".join(frames))
    return {
        "lines": lines,
        "behind": behind,
        "missing": missing,
        "collective": None if front is None else {k: front[k] for k in ("seq", "op", "group", "sizes")},
    }


def _last_entered(entries: list[dict], group: str | None = None) -> dict | None:
    mine = [e for e in entries if group is None or e["group"] == group]
    return max(mine, key=lambda e: (e.get("entered_ns", 0), e["seq"])) if mine else None


def _describe(e: dict) -> str:
    return f"#{e['seq']} {e['op']} sizes {e['sizes']} (group {e['group']} {e.get('group_desc', '')})".rstrip()


def _behind(records: dict[int, dict]) -> tuple[list[int], dict | None]:
    """Ranks behind in the first group where the ranks disagree, and the furthest rank's
    collective there (or the collective every rank is in, when none is behind)."""
    groups = sorted({e["group"] for rec in records.values() for e in rec["entries"]})
    front = None
    for g in groups:
        last = {r: _last_entered(rec["entries"], g) for r, rec in records.items()}
        seqs = {r: e["seq"] for r, e in last.items() if e is not None}
        if not seqs:
            continue
        top = max(seqs.values())
        ahead = next(last[r] for r, s in seqs.items() if s == top)
        behind = sorted(r for r, s in seqs.items() if s < top)
        if behind:
            return behind, ahead
        front = front or ahead
    return [], front


def top_frames(dump: str, n: int = 5) -> list[str]:
    """The top frames of the training thread in a faulthandler dump (the thread whose stack
    reaches framework/train.py), through its first two frames in the framework itself."""
    for block in dump.split("\n\n"):
        frames = re.findall(r'File "([^"]+)", line (\d+) in (\S+)', block)
        if not any(f.endswith("framework/train.py") for f, _, _ in frames):
            continue
        out, ours = [], 0
        for f, line, fn in frames[:n]:
            inside = "site-packages/" not in f and "framework/" in f
            short = f[f.rfind("framework/") :] if inside else f.split("site-packages/")[-1]
            out.append(f"{fn} ({short}:{line})")
            ours += inside
            if ours == 2:
                break
        return out
    return []


@entry("report", ReportConfig)
def main(dcfg: DictConfig) -> None:
    """Console script `fw-report`."""
    summary = report(to_object(dcfg, ReportConfig))
    if summary.get("hang"):
        print("\n".join(summary["hang"]["lines"]), file=sys.stderr)
    show_summary(summary, sys.stderr.isatty(), to_log=False)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""The summary of any run directory, also one still being written, and a redrawn loss.png.

    python -m framework.report run.dir=runs/debug

Prints the same summary as the end of a training run (steps, tokens, last val loss overall and
per source, mean tokens/s and MFU) from <run.dir>/metrics.jsonl and <run.dir>/config.yaml, redraws
<run.dir>/loss.png (train/val, per-source val, tokens/s), and ends with one JSON line.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from framework.cli import entry, to_object
from framework.config import ConfigError
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
    if not metrics.is_file():
        raise ConfigError(f"run.dir={run_dir}: no metrics.jsonl here (is it a run directory?)")
    records = read_records(metrics)
    max_steps = None
    if (run_dir / "config.yaml").is_file():
        max_steps = OmegaConf.select(OmegaConf.load(run_dir / "config.yaml"), "trainer.max_steps")
    summary = summarize(records, 0, max_steps)
    if cfg.plot:
        plot_run(records, run_dir / "loss.png")
    return summary


@entry("report", ReportConfig)
def main(dcfg: DictConfig) -> None:
    """Console script `fw-report`."""
    summary = report(to_object(dcfg, ReportConfig))
    show_summary(summary, sys.stderr.isatty(), to_log=False)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

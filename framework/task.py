"""What is trained: `task=pretrain|sft`, chosen once at build time.

The training loop is the same for every task; a task only decides which data it accepts and
how the loss is formed, and both live in the data path:
- pretrain: every target token carries loss (plain mean per micro-batch);
- sft: sources written by `prepare format=chat` carry a per-token loss mask; the loader turns
  untrained targets into -100 and gives each micro-batch a loss weight so that a step's loss is
  the mean over the trained tokens of the whole global batch (framework.data.loader.Batch).
A later task (e.g. classification) adds an entry to ACCEPTS and its data/loss pieces.
"""

from __future__ import annotations

from framework.config import ConfigError, TaskConfig

# task -> the source kind (manifest `kind`) it trains on, and how to make such a source
ACCEPTS = {
    "pretrain": ("pretrain", "python -m framework.prepare input=... output=..."),
    "sft": ("sft", "python -m framework.prepare format=chat input=chat.jsonl output=..."),
}


def check_sources(task: TaskConfig, kinds: dict[str, str]) -> None:
    """Refuse sources of another kind than the task trains on (`kinds`: source name -> kind),
    naming each: pretraining text under task=sft would train on every token, and sft data under
    task=pretrain would silently train on assistant tokens only."""
    want, how = ACCEPTS[task.name]
    wrong = {name: kind for name, kind in kinds.items() if kind != want}
    if wrong:
        raise ConfigError(
            f"task={task.name} trains on {want} sources, but "
            + ", ".join(f"data source {n!r} is {k}" for n, k in wrong.items())
            + f": prepare them with `{how}`, or choose task={'sft' if want == 'pretrain' else 'pretrain'}"
        )

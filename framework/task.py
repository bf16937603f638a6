"""What is trained: `task=pretrain|sft|classify`, chosen once at build time.

The training loop is the same for every task; a task only decides which data it accepts and
how the loss is formed, and both live in the data path:
- pretrain: every target token carries loss (plain mean per micro-batch);
- sft: sources written by `prepare format=chat` carry a per-token loss mask; the loader turns
  untrained targets into -100 and gives each micro-batch a loss weight so that a step's loss is
  the mean over the trained tokens of the whole global batch (framework.data.loader.Batch).
- classify: sources written by `prepare format=classify` hold one example per window and the
  label id as the target of its last text token (framework/data/classify.py); the model's output
  head has model.num_labels rows (`resolve_task` sets it and task.labels from the manifests), so
  the same cross-entropy over targets != -100, weighted as for sft, is the mean over the examples
  of the global batch. Eval adds accuracy and per-class counts (`eval_metrics`).
"""

from __future__ import annotations

import logging

import torch

from framework.config import Config, ConfigError, TaskConfig
from framework.data.loader import ever_enabled
from framework.data.vocab import manifest_of

log = logging.getLogger("framework")

# task -> the source kind (manifest `kind`) it trains on, and how to make such a source
ACCEPTS = {
    "pretrain": ("pretrain", "python -m framework.prepare input=... output=..."),
    "sft": ("sft", "python -m framework.prepare format=chat input=chat.jsonl output=..."),
    "classify": (
        "classify",
        "python -m framework.prepare format=classify max_tokens=<trainer.seq_len> input=x.jsonl output=...",
    ),
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
            + f": prepare them with `{how}`, or choose task="
            + "|".join(t for t, (k, _) in ACCEPTS.items() if k in wrong.values())
        )


def resolve_task(cfg: Config) -> None:
    """task=classify: fill task.labels and model.num_labels (0: from the data) from the sources'
    manifests, before any model is built; refuse sources whose label sets differ, a num_labels
    that does not match, or examples not padded to trainer.seq_len (a window would then not be
    one example). Other tasks: nothing to do."""
    if cfg.task.name != "classify":
        return
    found = {}
    for s in ever_enabled(cfg.data):
        m = manifest_of(s.path)
        if m is None or m.kind != "classify":
            continue  # check_sources names it once the loader has opened it
        found[s.name] = m
        max_tokens = m.meta.get("overlong", {}).get("max_tokens")
        if max_tokens != cfg.trainer.seq_len:
            raise ConfigError(
                f"data source {s.name!r} ({s.path}) pads each example to max_tokens={max_tokens}, but "
                f"trainer.seq_len={cfg.trainer.seq_len}: set trainer.seq_len={max_tokens}, or prepare "
                f"it again with max_tokens={cfg.trainer.seq_len}"
            )
    if not found:
        return
    sets = {name: [str(label) for label in m.labels] for name, m in found.items()}
    labels = next(iter(sets.values()))
    if any(v != labels for v in sets.values()):
        raise ConfigError(
            "task=classify: the data sources have different label sets: "
            + "; ".join(f"{n}: {v}" for n, v in sets.items())
            + ": prepare them from files with the same labels"
        )
    if cfg.model.num_labels and cfg.model.num_labels != len(labels):
        raise ConfigError(
            f"model.num_labels={cfg.model.num_labels} but the data has {len(labels)} labels {labels}: "
            "leave model.num_labels=0 to take it from the data"
        )
    if cfg.task.labels and [str(x) for x in cfg.task.labels] != labels:
        raise ConfigError(f"task.labels={cfg.task.labels} but the data's labels are {labels}")
    cfg.model.num_labels, cfg.task.labels = len(labels), labels
    log.info("task=classify: %d labels %s (model.num_labels=%d)", len(labels), labels, len(labels))


@torch.no_grad()
def eval_metrics(task: TaskConfig, engine, val: dict, dist) -> dict:
    """Extra eval numbers of the task: classify gives accuracy over the fixed val examples of
    every source (all ranks) and per class: examples (`val_count/<label>`), correct ones
    (`val_correct/<label>`) and predictions (`val_predicted/<label>`). Other tasks: none.
    Every rank must call it (engine.logits gathers inside forward under sharded strategies)."""
    if task.name != "classify":
        return {}
    k = len(task.labels)
    counts = torch.zeros(3, k, dtype=torch.float64, device=dist.device)  # count, correct, predicted
    for batches in val.values():
        for b in batches:
            targets = b.targets.to(dist.device)
            logits = engine.logits(b.inputs)[..., :k]  # (B, T, num_labels)
            at = targets != -100  # one position per example: its last text token
            pred, true = logits[at].argmax(-1), targets[at]
            counts[0] += torch.bincount(true, minlength=k).double()
            counts[1] += torch.bincount(true[pred == true], minlength=k).double()
            counts[2] += torch.bincount(pred, minlength=k).double()
    # mean over all ranks x data-parallel size = the sum over data-parallel ranks (TP peers of
    # one group hold the same examples, so a plain sum over the world would count them twice)
    counts = (dist.all_reduce_mean(counts) * engine.dp_size).round().long().cpu()
    total = int(counts[0].sum())
    record: dict = {"val_examples": total, "val_accuracy": int(counts[1].sum()) / max(total, 1)}
    for i, label in enumerate(task.labels):
        record[f"val_count/{label}"] = int(counts[0, i])
        record[f"val_correct/{label}"] = int(counts[1, i])
        record[f"val_predicted/{label}"] = int(counts[2, i])
    return record

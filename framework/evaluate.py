"""lm-evaluation-harness on our checkpoints.

    python -m framework.evaluate checkpoint=runs/debug tasks=my_tasks/arith_mc.yaml
    python -m framework.evaluate checkpoint=runs/debug tasks=[arith_mc,copy_mc] include_path=my_tasks

`tasks` are lm-eval task names or paths to task YAML files; `include_path` is a folder of task
YAMLs (a task's `dataset_path: json` with `dataset_kwargs: {data_files: {test: FILE.jsonl}}`
reads a local file; relative data_files are relative to the working directory, as in lm-eval).
Built-in lm-eval tasks (hellaswag, ...) are indexed only when a name is not found locally: the
index of its ~15k YAMLs takes tens of seconds. Hugging Face hub access is off
(HF_DATASETS_OFFLINE=1, HF_HUB_OFFLINE=1) unless the environment sets those variables itself.

The model is ours, wrapped as an `lm_eval` LM (`FrameworkLM`), not the Hugging Face export run
through lm-eval's "hf" model: the wrapper scores with the very forward and tokenizer we train
with, for every flavor and tokenizer (the export refuses tiktoken tokenizers, and an HF
tokenizer's special-token handling would be one more thing that must agree with ours).

Prints one line per task (`<task>: acc=0.625 ... n=8`) and writes the results to
`<run.dir>/eval/step_<N:08d>.json` (N: the checkpoint's step; `out=FILE` to choose), merged per
task into what an earlier evaluation of that checkpoint wrote.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from framework.checkpoint import load_model, require_language_model, resolve
from framework.config import CONF_DIR, ConfigError
from framework.data.tokenizer import load_tokenizer
from framework.errors import CheckpointError

# Set before lm_eval (and with it `datasets`) is imported: both read these once, at import.
OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@dataclass
class EvaluateConfig:
    checkpoint: str = MISSING
    """A checkpoint dir, or a run dir / checkpoints dir (its `latest` is used)."""
    tasks: Any = MISSING
    """A task name or task YAML path, or a list of them: `tasks=[a,b]`."""
    include_path: str | None = None
    """A folder of lm-eval task YAMLs whose task names `tasks` may use."""
    num_fewshot: int | None = None
    """Few-shot examples per prompt (None: each task's own setting)."""
    limit: float | None = None
    """At most this many documents per task (a fraction if < 1); None: all."""
    batch_size: int = 8
    """Sequences per forward pass when scoring."""
    max_gen_tokens: int = 256
    """Default cap on generated tokens for generate_until tasks that set no max_gen_toks."""
    bootstrap_iters: int = 100000
    """Bootstrap resamples for the stderr of metrics without a closed form (0: none)."""
    seed: int = 0
    """Seed of lm-eval's few-shot sampling and of python/numpy/torch."""
    device: str = "cpu"
    out: str | None = None
    """Results JSON file (default `<run.dir>/eval/step_<N:08d>.json`)."""


ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)


def task_specs(tasks: Any) -> list[str]:
    """`tasks=a`, `tasks=[a,b]` -> ["a", "b"]."""
    if isinstance(tasks, str | int | float):
        tasks = [tasks]
    specs = [str(t).strip() for t in (tasks or [])]
    if not specs or not all(specs):
        raise ConfigError(f"tasks={tasks!r}: give a task name or task YAML path, or a list tasks=[a,b]")
    missing = [s for s in specs if s.endswith((".yaml", ".yml")) and not Path(s).is_file()]
    if missing:
        raise ConfigError(f"tasks: no such task YAML file: {', '.join(missing)}")
    return specs


def load_tasks(specs: list[str], include_path: str | None) -> tuple[Any, dict]:
    """The lm-eval TaskManager and {name: Task} for `specs`, with their datasets loaded (so a bad
    task fails here, in one line, before the model is loaded)."""
    from lm_eval.tasks import TaskManager  # lm_eval: an optional extra, seconds to import

    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"include_path={include_path}: not a directory of task YAML files")
    tm = TaskManager(include_defaults=False, include_path=include_path)
    local = [s for s in specs if s in tm.all_tasks or _is_yaml_file(s)]
    if len(local) < len(specs):  # a built-in task: index lm-eval's own YAMLs too (slow)
        tm = TaskManager(include_defaults=True, include_path=include_path)
    unknown = [s for s in specs if s not in tm.all_tasks and not _is_yaml_file(s)]
    if unknown:
        where = f"in include_path={include_path}, " if include_path else ""
        raise ConfigError(
            f"tasks: unknown task {', '.join(map(repr, unknown))}: not a task YAML file, not a task "
            f"{where}not an lm-eval task (list them with `lm-eval ls tasks`)"
        )
    try:
        return tm, tm.load(specs)["tasks"]
    except Exception as e:  # lm-eval and datasets raise many types; the message names the cause
        msg = " ".join(str(e).split()) or type(e).__name__
        raise ConfigError(f"tasks={specs}: cannot load: {msg}") from e


def _is_yaml_file(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) and Path(spec).is_file()


def results_path(ckpt: Path, step: int, out: str | None) -> Path:
    if out is not None:
        return Path(out)
    # <run.dir>/checkpoints/step_N -> <run.dir>; a checkpoint outside a run dir: beside it.
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return run_dir / "eval" / f"step_{step:08d}.json"


def summary_line(task: str, metrics: dict, n_docs: int | None) -> str:
    """`<task>: acc=0.625 (+-0.183) acc_norm=0.5 (+-0.189) n=8` from lm-eval's `acc,none` keys."""
    parts = []
    for key, value in metrics.items():
        name, _, filt = key.partition(",")
        if not filt or name.endswith("_stderr") or not isinstance(value, int | float):
            continue  # lm-eval's bookkeeping (name, sample_len) has no ",filter" part
        label = name if filt in ("", "none") else f"{name}[{filt}]"
        err = metrics.get(f"{name}_stderr,{filt}")
        parts.append(f"{label}={value:.4g}" + (f" (+-{err:.3g})" if isinstance(err, float) else ""))
    return f"{task}: {' '.join(parts)} n={n_docs}"


def run(cfg: EvaluateConfig) -> dict:
    """Evaluate; returns {"path": results file, "tasks": {task: {metric: value}}}."""
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    # The cheap checks first: a missing checkpoint or task file fails before lm-eval is imported.
    ckpt = resolve(cfg.checkpoint)
    specs = task_specs(cfg.tasks)
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size={cfg.batch_size} must be >= 1")
    # lm_eval (an optional extra) takes seconds to import and must follow OFFLINE_ENV;
    # framework.lm_eval_model subclasses its TemplateLM, so it comes with it
    import lm_eval
    from lm_eval import evaluator

    from framework.lm_eval_model import FrameworkLM

    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its INFO lines drown ours
    tm, tasks = load_tasks(specs, cfg.include_path)
    model, state = load_model(ckpt)
    require_language_model(model, ckpt, "evaluate (lm-eval)")
    tok = load_tokenizer(state["config"]["data"]["tokenizer"])
    lm = FrameworkLM(model, tok, cfg.batch_size, cfg.max_gen_tokens, cfg.device)
    res = evaluator.simple_evaluate(
        model=lm,
        tasks=list(tasks.values()),
        task_manager=tm,
        num_fewshot=cfg.num_fewshot,
        limit=cfg.limit,
        bootstrap_iters=cfg.bootstrap_iters,
        log_samples=False,
        random_seed=cfg.seed,
        numpy_random_seed=cfg.seed,
        torch_random_seed=cfg.seed,
        fewshot_random_seed=cfg.seed,
    )
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    step = int(state["step"])
    path = results_path(ckpt, step, cfg.out)
    record = json.loads(path.read_text()) if path.is_file() else {}
    record.update({"checkpoint": str(ckpt.resolve()), "step": step})
    record.setdefault("tasks", {})
    metrics_of = {}
    for name in tasks:
        metrics = {k: v for k, v in res["results"][name].items() if k != "alias"}
        metrics_of[name] = metrics
        record["tasks"][name] = {
            "metrics": metrics,
            "n_samples": res.get("n-samples", {}).get(name),
            "num_fewshot": res.get("n-shot", {}).get(name),
            "config": res.get("configs", {}).get(name),
            "evaluated_at": now,
            "lm_eval_version": lm_eval.__version__,
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp.replace(path)  # a reader never sees half a file
    n_docs = {t: (record["tasks"][t]["n_samples"] or {}).get("effective") for t in tasks}
    return {"path": path, "tasks": metrics_of, "n_docs": n_docs}


@hydra.main(config_path=CONF_DIR, config_name="evaluate", version_base=None)
def _main(dcfg: DictConfig) -> None:
    try:
        cfg: EvaluateConfig = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
        result = run(cfg)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # omegaconf's missing-key error names the key
        if type(e).__module__.startswith("omegaconf"):
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
            sys.exit(2)
        raise
    for task, metrics in result["tasks"].items():
        print(summary_line(task, metrics, result["n_docs"][task]))
    print(f"results: {result['path']}")


def main() -> None:
    _main()


if __name__ == "__main__":
    main()

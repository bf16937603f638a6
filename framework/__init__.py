"""GPT pretraining framework: Hydra configs, DDP/ZeRO/FSDP2/TP, Arrow token shards.

The modules form layers, top to bottom. A module imports only from layers below its own, and
modules of one layer separated by `|` do not import each other. setup.cfg's import-linter
contracts enforce it (`make lint`, tests/unit/test_layers.py); a new module joins a layer there.

    train | evaluate | generate | export | plan | prepare | report
        the entry points (console scripts), one per command; none imports another
    faults | task | metrics | cli | lm_eval_model | estimate | observe
        pieces of a run: fault policies and the watchdog, the task's data and metrics, logging
        sinks, the command-line front (errors, key suggestions), the lm-eval model wrapper, the
        plan's estimate of a layout (memory, communication, step time) and its search, what a run
        shows of itself (profiles, memory snapshots, stragglers)
    parallel
        strategies applied to the plain model (DDP, ZeRO, FSDP2, TP), the engines, the meta build
    checkpoint | hf
        our crash-safe checkpoints (save, verify, load, init_from readers); Hugging Face
        directories (the name maps, export, import)
    data
        token shards and manifests, the mixture loader, tokenizers, prepare's record formats
    config
        the typed config tree (dataclasses) and its cross-field validation
    precision | memory | perf | optim | safeload | dist | comm | stages
        precision policies, the memory and FLOP math, the optimizer and LR schedule, loading
        checkpoint bytes without running code, the process group from the launcher's environment,
        the bytes each collective moves over which link, the pipeline's stage split and bubble
    model
        the plain single-device GPT and its sampling (no torch.distributed, deepspeed, accelerate)
    errors
        the errors users can fix, with their exit codes; every layer raises them
"""

from __future__ import annotations

import re
from importlib import metadata

__version__ = "0.1.0"

# Older torch.load runs pickled code even with weights_only=True (CVE-2025-32434,
# CVE-2026-24747), and every checkpoint and RNG file here goes through torch.load.
TORCH_FLOOR = (2, 10)


def require_torch(version: str | None) -> None:
    """Refuse a torch older than TORCH_FLOOR, naming the version found and the fix. `version`
    is the installed distribution's (None: not installed as a package, nothing to check)."""
    if version is None:
        return
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None or (int(m[1]), int(m[2])) >= TORCH_FLOOR:
        return
    floor = ".".join(map(str, TORCH_FLOOR))
    raise ImportError(
        f"framework needs torch>={floor}, but this environment has torch {version}: older "
        f"torch.load releases run pickled code from checkpoints (CVE-2025-32434, CVE-2026-24747). "
        f"Upgrade it, e.g. `make install TORCH=torch==2.13.0` or `pip install 'torch>={floor}'`."
    )


def _installed_torch() -> str | None:
    # read from package metadata: importing torch here would slow down every entry point
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


require_torch(_installed_torch())

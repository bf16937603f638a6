"""GPT pretraining framework: Hydra configs, DDP/ZeRO/FSDP2/TP, Arrow token shards."""

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

"""Export a checkpoint as a Hugging Face directory.

    python -m framework.export checkpoint=runs/debug out=hf/debug format=hf

reads a checkpoint of any strategy one tensor at a time (framework.checkpoint's
ModelTensorReader: DCP reads of single keys from the shard files) and writes it with
framework.hf.export.write_hf: config.json, generation_config.json, model.safetensors (or HF's
shards above max_shard_size) and the tokenizer files, loadable by `transformers`. The reverse,
framework.hf.load, initialises our model from such a directory (`model.init_from=<dir>`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from framework.checkpoint import ModelTensorReader, resolve, verify
from framework.cli import entry, to_object
from framework.data.tokenizer import load_tokenizer
from framework.errors import ConfigError
from framework.hf.export import parse_max_shard_size, write_hf
from framework.model import ModelConfig

log = logging.getLogger("framework")


@dataclass
class ExportConfig:
    checkpoint: str = MISSING
    """A checkpoint dir, or a run dir / checkpoints dir (its `latest` is used)."""
    out: str = MISSING
    """Output directory (must not exist unless overwrite=true)."""
    format: str = "hf"
    dtype: str = "float32"
    """float32 | bfloat16 | float16."""
    overwrite: bool = False
    with_tokenizer: bool = True
    """Write tokenizer files (tiktoken encodings cannot be: export them with false)."""
    max_shard_size: str = "5GB"
    """Above this, shards + model.safetensors.index.json (HF's default; "500MB" or bytes)."""


ConfigStore.instance().store(name="export_schema", node=ExportConfig)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run(cfg: ExportConfig) -> Path:
    """Export a checkpoint of any strategy, one tensor at a time (DCP reads only that
    tensor's pieces from every rank's shard files): no full model is built."""
    if cfg.format != "hf":
        raise ConfigError(f"format={cfg.format!r}: only 'hf' is supported")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype={cfg.dtype!r} must be one of {', '.join(DTYPES)}")
    parse_max_shard_size(cfg.max_shard_size)  # refuse a bad value before hashing a checkpoint
    ckpt = resolve(cfg.checkpoint)
    state = verify(ckpt)
    m = ModelConfig(**state["config"]["model"])
    reader = ModelTensorReader(ckpt / "state", m)
    tok = state["config"]["data"]["tokenizer"] if cfg.with_tokenizer else None
    labels, pad_id = None, None
    if m.num_labels:  # a classifier: its labels, and end-of-text (the padding) as pad_token_id
        labels = state["config"].get("task", {}).get("labels")
        try:
            pad_id = load_tokenizer(state["config"]["data"]["tokenizer"]).eot_id
        except (OSError, ValueError, ImportError) as e:
            log.warning("cannot load the checkpoint's tokenizer for pad_token_id: %s", e)
    out = write_hf(
        m, reader.get, cfg.out, DTYPES[cfg.dtype], cfg.overwrite, tokenizer=tok,
        max_shard_size=cfg.max_shard_size, labels=labels, pad_id=pad_id,
    )  # fmt: skip
    log.info("wrote %s (step %d)", out, state["step"])
    return out


@entry("export", ExportConfig)
def main(dcfg: DictConfig) -> None:
    """Console script `fw-export`."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = run(to_object(dcfg, ExportConfig))
    print(json.dumps({"out": str(out)}))


if __name__ == "__main__":
    main()

"""Sampling from a trained model.

    python -m framework.generate checkpoint=runs/debug prompt="the " max_new_tokens=64
    python -m framework.generate checkpoint=... prompt_ids=[1,2,3] greedy=true

Prints one JSON line: {"ids": prompt + new ids, "text": decoded ids}.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from framework.cli import entry, to_object
from framework.config import ConfigError


@dataclass
class GenerateConfig:
    checkpoint: str = MISSING
    """A checkpoint dir, or a run dir / checkpoints dir (its `latest` is used)."""
    prompt: str | None = None
    """Text prompt (tokenized with the checkpoint's data.tokenizer)."""
    prompt_ids: list[int] | None = None
    """Token ids instead of a text prompt."""
    max_new_tokens: int = 64
    greedy: bool = False
    """Argmax decoding (temperature and top_k are ignored)."""
    temperature: float = 1.0
    top_k: int | None = None
    seed: int = 0
    device: str = "cpu"


ConfigStore.instance().store(name="generate_schema", node=GenerateConfig)


@torch.no_grad()
def sample(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    ids: list[int],
    max_new_tokens: int,
    block_size: int,
    *,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> list[int]:
    """Autoregressive decoding without a KV cache (the context is re-run each token; fine for
    the short samples of evals and tests). logits_fn: (1, T) ids -> (1, T, V) logits.
    A private generator keeps sampling from touching the training RNG stream."""
    out = list(ids)
    for _ in range(max_new_tokens):
        ctx = torch.tensor([out[-block_size:]], dtype=torch.long, device=device)
        logits = logits_fn(ctx)[0, -1].float()  # (V,)
        if greedy:
            nxt = int(torch.argmax(logits))
        else:
            logits = logits / max(temperature, 1e-6)
            if top_k is not None and top_k < logits.numel():
                kth = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1).cpu()
            nxt = int(torch.multinomial(probs, 1, generator=generator))
        out.append(nxt)
    return out


def run(cfg: GenerateConfig) -> dict:
    from framework.checkpoint import load_model
    from framework.data.tokenizer import load_tokenizer

    if (cfg.prompt is None) == (cfg.prompt_ids is None):
        raise ConfigError("give exactly one of prompt=... or prompt_ids=[...]")
    if cfg.max_new_tokens < 0 or cfg.temperature <= 0:
        raise ConfigError("max_new_tokens must be >= 0 and temperature > 0")
    model, state = load_model(cfg.checkpoint)
    model.to(cfg.device).eval()
    tok = load_tokenizer(state["config"]["data"]["tokenizer"])
    ids = list(cfg.prompt_ids) if cfg.prompt_ids is not None else tok.encode(cfg.prompt)
    if not ids:
        raise ConfigError("the prompt is empty: give at least one token")
    bad = [i for i in ids if not 0 <= i < model.cfg.vocab_size]
    if bad:
        raise ConfigError(f"prompt_ids {bad} are outside the vocabulary [0, {model.cfg.vocab_size})")
    g = torch.Generator().manual_seed(cfg.seed)
    out = sample(
        model,
        ids,
        cfg.max_new_tokens,
        model.cfg.block_size,
        greedy=cfg.greedy,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        generator=g,
        device=cfg.device,
    )
    return {"ids": out, "text": tok.decode(out)}


@entry("generate", GenerateConfig)
def main(dcfg: DictConfig) -> None:
    """Console script `fw-generate`."""
    print(json.dumps(run(to_object(dcfg, GenerateConfig))))


if __name__ == "__main__":
    main()

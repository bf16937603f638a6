"""Autoregressive sampling from a plain model on one device (framework.generate and the
training loop's eval samples)."""

from __future__ import annotations

from collections.abc import Callable

import torch


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
    stop_ids: tuple[int, ...] = (),
) -> list[int]:
    """Autoregressive decoding without a KV cache (the context is re-run each token; fine for
    the short samples of evals and tests). logits_fn: (1, T) ids -> (1, T, V) logits.
    A private generator keeps sampling from touching the training RNG stream. Decoding ends
    after a token of stop_ids (kept in the output)."""
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
        if nxt in stop_ids:
            break
    return out

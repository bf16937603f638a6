"""Sampling from a trained model.

    python -m framework.generate checkpoint=runs/debug 'prompt="the "' max_new_tokens=64
    python -m framework.generate checkpoint=... prompt_file=prompt.txt output=text
    python -m framework.generate checkpoint=... prompt_ids=[1,2,3] greedy=true

Prints one JSON line {"ids": prompt + new ids, "text": decoded ids} (output=json, the default),
or only the completion's text, exactly, with no newline added (output=text).

Quoting: Hydra strips the whitespace around an unquoted value, so `prompt="the "` (the shell
removes the double quotes) arrives as "the". Quote the value for Hydra inside shell quotes,
`'prompt="the "'`, to keep leading/trailing spaces; or put the prompt in a file and pass
`prompt_file=PATH` (read byte for byte as UTF-8; nothing is stripped).
`temperature=0` is greedy decoding, like `greedy=true`.

`chat=true` (a model fine-tuned with task=sft): the prompt becomes one user turn of the chat
template the data was prepared with (framework/data/chat.py), decoding stops at the end of the
assistant's turn (end-of-text), and the JSON line carries the reply as `reply`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from framework.checkpoint import load_model, require_language_model
from framework.cli import entry, to_object
from framework.config import ConfigError
from framework.data.chat import render_prompt, stop_ids
from framework.data.tokenizer import load_tokenizer
from framework.model.sampling import sample


@dataclass
class GenerateConfig:
    checkpoint: str = MISSING
    """A checkpoint dir, or a run dir / checkpoints dir (its `latest` is used)."""
    prompt: str | None = None
    """Text prompt (tokenized with the checkpoint's data.tokenizer)."""
    prompt_ids: list[int] | None = None
    """Token ids instead of a text prompt."""
    prompt_file: str | None = None
    """A UTF-8 file whose exact contents are the prompt (no whitespace stripped)."""
    max_new_tokens: int = 64
    greedy: bool = False
    """Argmax decoding (temperature and top_k are ignored)."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_k: int | None = None
    seed: int = 0
    device: str = "cpu"
    output: str = "json"
    """json: one line {"ids", "text"} | text: the completion's text only, exactly."""
    chat: bool = False
    """Render the prompt as one user turn of the sft chat template; stop at the end of the turn."""


OUTPUTS = ("json", "text")
ConfigStore.instance().store(name="generate_schema", node=GenerateConfig)


def run(cfg: GenerateConfig) -> dict:
    given = [k for k in ("prompt", "prompt_ids", "prompt_file") if getattr(cfg, k) is not None]
    if len(given) != 1:
        raise ConfigError(
            f"give exactly one of prompt=..., prompt_ids=[...] or prompt_file=PATH (got {given or 'none'})"
        )
    if cfg.max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens={cfg.max_new_tokens} must be >= 0")
    if not cfg.temperature >= 0:  # also refuses NaN
        raise ConfigError(f"temperature={cfg.temperature} must be >= 0 (0 is greedy)")
    if cfg.output not in OUTPUTS:
        raise ConfigError(f"output={cfg.output!r} must be one of {', '.join(OUTPUTS)}")
    prompt = read_prompt_file(cfg.prompt_file) if cfg.prompt_file is not None else cfg.prompt
    model, state = load_model(cfg.checkpoint)
    require_language_model(model, cfg.checkpoint, "generate")
    model.to(cfg.device).eval()
    tok = load_tokenizer(state["config"]["data"]["tokenizer"])
    if cfg.chat and prompt is None:
        raise ConfigError("chat=true renders a text prompt: give prompt=... or prompt_file=PATH")
    if cfg.prompt_ids is not None:
        ids = list(cfg.prompt_ids)
    elif cfg.chat:
        ids = render_prompt(prompt, tok)
    else:
        ids = tok.encode(prompt)
    if not ids:
        raise ConfigError("the prompt is empty: give at least one token")
    bad = [i for i in ids if not 0 <= i < model.cfg.vocab_size]
    if bad:
        raise ConfigError(f"prompt_ids {bad} are outside the vocabulary [0, {model.cfg.vocab_size})")
    stops = stop_ids(tok) if cfg.chat else ()  # the end of the assistant's turn
    g = torch.Generator().manual_seed(cfg.seed)
    out = sample(
        model,
        ids,
        cfg.max_new_tokens,
        model.cfg.block_size,
        greedy=cfg.greedy or cfg.temperature == 0,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        generator=g,
        device=cfg.device,
        stop_ids=stops,
    )
    result = {"ids": out, "text": tok.decode(out), "completion": tok.decode(out[len(ids) :])}
    if cfg.chat:  # the reply without the end-of-turn token
        new = out[len(ids) :]
        result["reply"] = tok.decode(new[:-1] if new and new[-1] in stops else new)
    return result


def read_prompt_file(path: str) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"prompt_file={path}: cannot be read ({e.strerror})") from e
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"prompt_file={path}: not UTF-8 text (byte {e.start}); save it as UTF-8"
        ) from e


@entry("generate", GenerateConfig)
def main(dcfg: DictConfig) -> None:
    """Console script `fw-generate`."""
    cfg = to_object(dcfg, GenerateConfig)
    result = run(cfg)
    if cfg.output == "text":
        sys.stdout.write(result["reply" if cfg.chat else "completion"])  # exactly: no newline added
        sys.stdout.flush()
    else:
        keys = ("ids", "text", "reply") if cfg.chat else ("ids", "text")
        print(json.dumps({k: result[k] for k in keys}))


if __name__ == "__main__":
    main()

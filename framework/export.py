"""Hugging Face export and import.

    python -m framework.export checkpoint=runs/debug out=hf/debug format=hf

writes `config.json` + `model.safetensors` that `transformers` loads as GPT2LMHeadModel
(gpt2-style flavors) or LlamaForCausalLM (llama-style flavors). The reverse,
`load_hf_weights`, initialises our model from such a directory (`model.init_from=<dir>`).

The name/layout mapping is written here by hand because it is ours: HF GPT-2 keeps fused
q|k|v in a transposed Conv1D (`c_attn`, shape (C, 3C)); Llama's names differ but its tensors
match ours one to one (both use the rotate-half RoPE layout).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from framework.cli import entry, to_object
from framework.config import ConfigError
from framework.model import GPT, ModelConfig

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


ConfigStore.instance().store(name="export_schema", node=ExportConfig)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -- ours -> HF --------------------------------------------------------------------------
def hf_config(m: ModelConfig) -> dict:
    if m.style == "gpt2":
        if m.kv_heads != m.n_head:
            raise ConfigError(
                f"{m.name}: HF GPT-2 has no grouped-query attention (n_kv_head={m.kv_heads})"
            )
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": m.vocab_size,
            "n_positions": m.block_size,
            "n_embd": m.n_embd,
            "n_layer": m.n_layer,
            "n_head": m.n_head,
            "n_inner": m.ffn_dim,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": m.norm_eps,
            "resid_pdrop": m.dropout,
            "embd_pdrop": m.dropout,
            "attn_pdrop": m.dropout,
            "tie_word_embeddings": m.tie_embeddings,
            "initializer_range": m.init_std,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": m.vocab_size,
        "hidden_size": m.n_embd,
        "intermediate_size": m.ffn_dim,
        "num_hidden_layers": m.n_layer,
        "num_attention_heads": m.n_head,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_dim,
        "max_position_embeddings": m.block_size,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "hidden_act": "silu",
        "attention_bias": m.bias,
        "mlp_bias": m.bias,
        "attention_dropout": m.dropout,
        "tie_word_embeddings": m.tie_embeddings,
        "initializer_range": m.init_std,
    }


def to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """Our state dict -> HF tensor names (contiguous, owned copies for safetensors)."""
    m, sd = model.cfg, model.state_dict()
    out: dict[str, torch.Tensor] = {}
    if m.style == "gpt2":
        p = "transformer."
        out[p + "wte.weight"] = sd["tok_emb.weight"]
        out[p + "wpe.weight"] = sd["pos_emb.weight"]
        for i in range(m.n_layer):
            b, h = f"blocks.{i}.", f"{p}h.{i}."
            qkv = [sd[f"{b}attn.{n}.weight"] for n in ("wq", "wk", "wv")]
            out[h + "attn.c_attn.weight"] = torch.cat(qkv, 0).t()  # Conv1D: (in, out)
            out[h + "attn.c_proj.weight"] = sd[b + "attn.wo.weight"].t()
            out[h + "mlp.c_fc.weight"] = sd[b + "mlp.w1.weight"].t()
            out[h + "mlp.c_proj.weight"] = sd[b + "mlp.w2.weight"].t()
            out[h + "ln_1.weight"], out[h + "ln_2.weight"] = (
                sd[b + "attn_norm.weight"],
                sd[b + "mlp_norm.weight"],
            )
            biases = {
                "attn.c_attn.bias": [b + f"attn.{n}.bias" for n in ("wq", "wk", "wv")],
                "attn.c_proj.bias": [b + "attn.wo.bias"],
                "mlp.c_fc.bias": [b + "mlp.w1.bias"],
                "mlp.c_proj.bias": [b + "mlp.w2.bias"],
                "ln_1.bias": [b + "attn_norm.bias"],
                "ln_2.bias": [b + "mlp_norm.bias"],
            }
            for hf_name, ours in biases.items():  # HF GPT-2 always has biases: zeros if we have none
                out[h + hf_name] = torch.cat(
                    [sd[k] if k in sd else torch.zeros(_bias_len(m, k)) for k in ours]
                )
        out[p + "ln_f.weight"] = sd["norm.weight"]
        out[p + "ln_f.bias"] = sd.get("norm.bias", torch.zeros(m.n_embd))
        if not m.tie_embeddings:
            out["lm_head.weight"] = sd["lm_head.weight"]
    else:
        for ours, hf in _llama_names(m):
            out[hf] = sd[ours]
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def _bias_len(m: ModelConfig, key: str) -> int:
    if ".wk." in key or ".wv." in key:
        return m.kv_heads * m.head_dim
    if ".w1." in key:
        return m.ffn_dim
    return m.n_embd


def _llama_names(m: ModelConfig) -> list[tuple[str, str]]:
    names = [("tok_emb.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight")]
    parts = {
        "attn.wq": "self_attn.q_proj",
        "attn.wk": "self_attn.k_proj",
        "attn.wv": "self_attn.v_proj",
        "attn.wo": "self_attn.o_proj",
        "mlp.w1": "mlp.gate_proj",
        "mlp.w3": "mlp.up_proj",
        "mlp.w2": "mlp.down_proj",
    }
    for i in range(m.n_layer):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        names += [
            (b + "attn_norm.weight", h + "input_layernorm.weight"),
            (b + "mlp_norm.weight", h + "post_attention_layernorm.weight"),
        ]
        for ours, hf in parts.items():
            names.append((f"{b}{ours}.weight", f"{h}{hf}.weight"))
            if m.bias:
                names.append((f"{b}{ours}.bias", f"{h}{hf}.bias"))
    if not m.tie_embeddings:
        names.append(("lm_head.weight", "lm_head.weight"))
    return names


def save_hf(
    model: GPT,
    out: str | Path,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    tokenizer_file: str | None = None,
) -> Path:
    """Write config.json + model.safetensors into `out`, atomically (temp dir, then rename)."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"out={out} exists; pass overwrite=true to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        cfg = hf_config(model.cfg) | {"torch_dtype": str(dtype).removeprefix("torch.")}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        tensors = {k: v.to(dtype) for k, v in to_hf(model).items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer_file and Path(tokenizer_file).is_file():
            shutil.copy(tokenizer_file, tmp / "tokenizer.json")
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# -- HF -> ours --------------------------------------------------------------------------
def read_hf_state(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and all tensors of a local HF directory (safetensors, or a .bin read with
    weights_only=True)."""
    from safetensors.torch import load_file

    d = Path(path)
    if not (d / "config.json").is_file():
        raise ConfigError(
            f"model.init_from={path}: no config.json (a local Hugging Face model directory)"
        )
    hf_cfg = json.loads((d / "config.json").read_text())
    files = sorted(d.glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    if files:
        for f in files:
            tensors.update(load_file(str(f)))
    elif (d / "pytorch_model.bin").is_file():
        tensors = torch.load(d / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ConfigError(f"model.init_from={path}: no model.safetensors or pytorch_model.bin")
    return hf_cfg, tensors


def load_hf_weights(model: GPT, path: str | Path) -> None:
    """Copy a local HF GPT-2 / Llama directory's weights into `model`; its shape must match
    model.* (each differing key is named)."""
    hf_cfg, tensors = read_hf_state(path)
    m = model.cfg
    want = hf_config(m)
    keys = (
        "model_type",
        "vocab_size",
        "n_embd",
        "n_layer",
        "n_head",
        "n_positions",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
    )
    diff = [
        f"{k}: HF {hf_cfg.get(k)!r} vs ours {want[k]!r}"
        for k in keys
        if k in want and hf_cfg.get(k, want[k]) != want[k]
    ]
    if m.style == "gpt2" and hf_cfg.get("n_inner") not in (None, m.ffn_dim):
        diff.append(f"n_inner: HF {hf_cfg['n_inner']} vs ours {m.ffn_dim}")
    if diff:
        raise ConfigError(
            f"model.init_from={path} does not match model={m.name}:\n  " + "\n  ".join(diff)
        )
    if m.style == "gpt2":  # original GPT-2 files have no "transformer." prefix
        tensors = {
            k if k.startswith(("transformer.", "lm_head")) else "transformer." + k: v
            for k, v in tensors.items()
        }
    ours = to_hf(model)  # names and shapes we expect, in HF layout
    missing = [k for k in ours if k not in tensors and not k.endswith(".bias")]
    if missing:
        raise ConfigError(
            f"model.init_from={path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    sd = model.state_dict()
    with torch.no_grad():
        if m.style == "gpt2":
            p = "transformer."
            sd["tok_emb.weight"].copy_(tensors[p + "wte.weight"])
            sd["pos_emb.weight"].copy_(tensors[p + "wpe.weight"])
            C, kv = m.n_embd, m.kv_heads * m.head_dim
            for i in range(m.n_layer):
                b, h = f"blocks.{i}.", f"{p}h.{i}."
                w = tensors[h + "attn.c_attn.weight"].t()  # (3C, C)
                for n, part in zip(("wq", "wk", "wv"), w.split([C, kv, kv], 0)):
                    sd[f"{b}attn.{n}.weight"].copy_(part)
                sd[b + "attn.wo.weight"].copy_(tensors[h + "attn.c_proj.weight"].t())
                sd[b + "mlp.w1.weight"].copy_(tensors[h + "mlp.c_fc.weight"].t())
                sd[b + "mlp.w2.weight"].copy_(tensors[h + "mlp.c_proj.weight"].t())
                sd[b + "attn_norm.weight"].copy_(tensors[h + "ln_1.weight"])
                sd[b + "mlp_norm.weight"].copy_(tensors[h + "ln_2.weight"])
                if m.bias:
                    qkv_b = tensors[h + "attn.c_attn.bias"].split([C, kv, kv])
                    for n, part in zip(("wq", "wk", "wv"), qkv_b):
                        sd[f"{b}attn.{n}.bias"].copy_(part)
                    for ours_k, hf_k in (
                        ("attn.wo.bias", "attn.c_proj.bias"),
                        ("mlp.w1.bias", "mlp.c_fc.bias"),
                        ("mlp.w2.bias", "mlp.c_proj.bias"),
                        ("attn_norm.bias", "ln_1.bias"),
                        ("mlp_norm.bias", "ln_2.bias"),
                    ):
                        sd[b + ours_k].copy_(tensors[h + hf_k])
            sd["norm.weight"].copy_(tensors[p + "ln_f.weight"])
            if m.bias:
                sd["norm.bias"].copy_(tensors[p + "ln_f.bias"])
            if not m.tie_embeddings:
                sd["lm_head.weight"].copy_(tensors.get("lm_head.weight", tensors[p + "wte.weight"]))
        else:
            for ours_k, hf_k in _llama_names(m):
                src = tensors.get(hf_k)
                if src is None and hf_k == "lm_head.weight":  # tied in the file, untied here
                    src = tensors["model.embed_tokens.weight"]
                sd[ours_k].copy_(src)
    log.info("initialised %s from %s", m.name, path)


def run(cfg: ExportConfig) -> Path:
    from framework.checkpoint import load_model

    if cfg.format != "hf":
        raise ConfigError(f"format={cfg.format!r}: only 'hf' is supported")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype={cfg.dtype!r} must be one of {', '.join(DTYPES)}")
    model, state = load_model(cfg.checkpoint)
    tok = state["config"]["data"]["tokenizer"]
    out = save_hf(
        model,
        cfg.out,
        DTYPES[cfg.dtype],
        cfg.overwrite,
        tokenizer_file=tok if tok.endswith(".json") else None,
    )
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

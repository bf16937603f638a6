"""Our model <-> Hugging Face GPT-2 / Llama: every name correspondence, in one place.

`links(m)` is the tensor map as data: each HF tensor and the tensors of ours it holds. Both
directions read it: the export builds each HF tensor from ours (`hf_recipes`: concatenated along
dim 0, transposed where HF keeps (in, out)), the import (framework/hf/load.py) reads each of ours
back out of its HF tensor (split, transposed). `hf_config` and `config_fields` are the same for
config.json fields.

The mapping is written by hand because it is ours: HF GPT-2 keeps fused q|k|v in a transposed
Conv1D (`c_attn`, shape (C, 3C)); Llama's names differ but its tensors match ours one to one
(both use the rotate-half RoPE layout).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from framework.errors import ConfigError
from framework.model import GPT, ModelConfig
from framework.model.rope import rope_scaling_to_hf

INDEX = "model.safetensors.index.json"
"""The index of HF's sharded layout (`model-0000i-of-0000n.safetensors`)."""


@dataclass(frozen=True)
class Link:
    """One HF tensor and the tensors of ours it holds."""

    hf: str
    ours: tuple[str, ...]
    """One name, or several concatenated along dim 0 (GPT-2's fused q|k|v)."""
    transpose: bool = False
    """HF GPT-2's Conv1D keeps (in, out): the HF tensor is ours transposed."""
    always: bool = False
    """A bias HF GPT-2 always has: exported as zeros where our model has none (model.bias=false),
    imported only where it has them."""


def links(m: ModelConfig) -> list[Link]:
    """Every HF tensor of model `m` (a classifier's head is HF's `score`), in HF's usual order."""
    if m.style == "gpt2":
        p = "transformer."
        out = [Link(p + "wte.weight", ("tok_emb.weight",)), Link(p + "wpe.weight", ("pos_emb.weight",))]
        for i in range(m.n_layer):
            b, h = f"blocks.{i}.", f"{p}h.{i}."
            qkv = [f"{b}attn.{n}" for n in ("wq", "wk", "wv")]
            out += [
                # Conv1D keeps (in, out): fused q|k|v transposed, shape (C, C + 2 kv)
                Link(h + "attn.c_attn.weight", tuple(k + ".weight" for k in qkv), transpose=True),
                Link(h + "attn.c_proj.weight", (b + "attn.wo.weight",), transpose=True),
                Link(h + "mlp.c_fc.weight", (b + "mlp.w1.weight",), transpose=True),
                Link(h + "mlp.c_proj.weight", (b + "mlp.w2.weight",), transpose=True),
                Link(h + "ln_1.weight", (b + "attn_norm.weight",)),
                Link(h + "ln_2.weight", (b + "mlp_norm.weight",)),
                Link(h + "attn.c_attn.bias", tuple(k + ".bias" for k in qkv), always=True),
            ]
            for hf, ours in (
                ("attn.c_proj.bias", "attn.wo.bias"),
                ("mlp.c_fc.bias", "mlp.w1.bias"),
                ("mlp.c_proj.bias", "mlp.w2.bias"),
                ("ln_1.bias", "attn_norm.bias"),
                ("ln_2.bias", "mlp_norm.bias"),
            ):
                out.append(Link(h + hf, (b + ours,), always=True))
        out += [
            Link(p + "ln_f.weight", ("norm.weight",)),
            Link(p + "ln_f.bias", ("norm.bias",), always=True),
        ]
    else:
        out = [
            Link("model.embed_tokens.weight", ("tok_emb.weight",)),
            Link("model.norm.weight", ("norm.weight",)),
        ]
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
            out += [
                Link(h + "input_layernorm.weight", (b + "attn_norm.weight",)),
                Link(h + "post_attention_layernorm.weight", (b + "mlp_norm.weight",)),
            ]
            for ours, hf in parts.items():
                out.append(Link(f"{h}{hf}.weight", (f"{b}{ours}.weight",)))
                if m.bias:
                    out.append(Link(f"{h}{hf}.bias", (f"{b}{ours}.bias",)))
    if not m.tie_embeddings:
        out.append(Link(head_name(m), ("lm_head.weight",)))
    return out


def head_name(m: ModelConfig) -> str:
    """HF's name of our output head: a classifier's is `score` (*ForSequenceClassification)."""
    return "score.weight" if m.num_labels else "lm_head.weight"


def embedding_name(m: ModelConfig) -> str:
    """HF's token embedding: the output head of a file with tied embeddings."""
    return "transformer.wte.weight" if m.style == "gpt2" else "model.embed_tokens.weight"


def out_features(m: ModelConfig, name: str) -> int:
    """Rows of our tensor `name` (a weight's output features, a bias's length)."""
    if ".wk." in name or ".wv." in name:
        return m.kv_heads * m.head_dim
    if ".w1." in name or ".w3." in name:
        return m.ffn_dim
    return m.n_embd


# An HF tensor is computed from a few of ours, read through a getter (name -> tensor, or None
# for a key the model does not have). The getter is a state dict's .get for an in-memory model,
# or a per-tensor DCP read for a checkpoint: the export then holds one HF tensor at a time.
Getter = Callable[[str], "torch.Tensor | None"]


def hf_recipes(m: ModelConfig) -> dict[str, Callable[[Getter], torch.Tensor]]:
    """HF tensor name -> how to build it from ours (`links`), in HF's usual order."""

    def recipe(link: Link) -> Callable[[Getter], torch.Tensor]:
        def build(get: Getter) -> torch.Tensor:
            parts = [get(k) for k in link.ours]
            if link.always:
                # HF GPT-2 always has biases: zeros where we have none (created on the ambient
                # device, so a plan under `with torch.device("meta")` allocates nothing)
                parts = [
                    torch.zeros(out_features(m, k)) if t is None else t for k, t in zip(link.ours, parts)
                ]
            w = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
            return w.t() if link.transpose else w

        return build

    return {link.hf: recipe(link) for link in links(m)}


def hf_meta_tensors(m: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The HF tensors' shapes and dtype, on `meta`: the plan of an export, and what an
    init_from directory must hold, without allocating a model."""
    with torch.device("meta"):
        sd = GPT(m).state_dict()
        return {k: f(sd.get).to(dtype) for k, f in hf_recipes(m).items()}


# -- config.json -------------------------------------------------------------------------
def hf_config(m: ModelConfig) -> dict:
    cfg = _hf_config(m)
    if m.num_labels:
        kind = "GPT2" if m.style == "gpt2" else "Llama"
        cfg["architectures"] = [f"{kind}ForSequenceClassification"]
    return cfg


def _hf_config(m: ModelConfig) -> dict:
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
        # transformers 5 reads rope_parameters (theta + scaling), 4.x rope_scaling
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta}
        | (rope_scaling_to_hf(m) or {}),
        "rope_scaling": rope_scaling_to_hf(m),
        "hidden_act": "silu",
        "attention_bias": m.bias,
        "mlp_bias": m.bias,
        "attention_dropout": m.dropout,
        "tie_word_embeddings": m.tie_embeddings,
        "initializer_range": m.init_std,
    }


def config_fields(m: ModelConfig) -> dict[str, tuple[object, str]]:
    """HF field -> (our value, our key): shapes and the numerics our ModelConfig sets."""
    if m.style == "gpt2":
        return {
            "vocab_size": (m.vocab_size, "model.vocab_size"),
            "n_positions": (m.block_size, "model.block_size"),
            "n_ctx": (m.block_size, "model.block_size"),
            "n_embd": (m.n_embd, "model.n_embd"),
            "n_layer": (m.n_layer, "model.n_layer"),
            "n_head": (m.n_head, "model.n_head"),
            "n_inner": (m.ffn_dim, "model.ffn_hidden"),
            "layer_norm_epsilon": (m.norm_eps, "model.norm_eps"),
        }
    return {
        "vocab_size": (m.vocab_size, "model.vocab_size"),
        "hidden_size": (m.n_embd, "model.n_embd"),
        "intermediate_size": (m.ffn_dim, "model.ffn_hidden"),
        "num_hidden_layers": (m.n_layer, "model.n_layer"),
        "num_attention_heads": (m.n_head, "model.n_head"),
        "num_key_value_heads": (m.kv_heads, "model.n_kv_head"),
        "head_dim": (m.head_dim, "model.n_embd/model.n_head"),
        "rms_norm_eps": (m.norm_eps, "model.norm_eps"),
        "attention_bias": (m.bias, "model.bias"),
        "mlp_bias": (m.bias, "model.bias"),
    }

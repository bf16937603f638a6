"""Our model <-> Hugging Face GPT-2 / Llama / Mixtral / OLMoE: every name correspondence, in
one place.

`links(m)` is the tensor map as data: each HF tensor and the tensors of ours it holds. Both
directions read it: the export builds each HF tensor from ours (`hf_recipes`: concatenated along
dim 0, transposed where HF keeps (in, out)), the import (framework/hf/load.py) reads each of ours
back out of its HF tensor (split, transposed). `hf_config` and `config_fields` are the same for
config.json fields.

The mapping is written by hand because it is ours: HF GPT-2 keeps fused q|k|v in a transposed
Conv1D (`c_attn`, shape (C, 3C)); Llama's names differ but its tensors match ours one to one
(both use the rotate-half RoPE layout).

A mixture of experts (model.moe) is written as the transformers class that computes it
(`hf_model_type`): Mixtral (softmax top-k renormalised, no QK-norm) or OLMoE (QK-norm over the
whole q / k projections, as ours; softmax top-k with or without renormalising). Their files keep
one tensor per expert (`block_sparse_moe.experts.{j}.w1` / `mlp.experts.{j}.gate_proj` ...;
transformers 5.x fuses them into (E, 2H, C) / (E, C, H) parameters when it loads, and writes
them per expert again when it saves), so each of our stacked (E, ...) expert tensors is split
into E links (`Link.expert`) and stacked back on import.
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
    expert: int | None = None
    """The HF tensor is one expert's slice ours[expert] of our stacked (E, ...) tensor."""


# model_type -> (the sparse block's module, its expert matrices named after ours w1, w3, w2)
MOE_NAMES = {
    "mixtral": ("block_sparse_moe", {"w1": "w1", "w3": "w3", "w2": "w2"}),
    "olmoe": ("mlp", {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}),
}


def hf_model_type(m: ModelConfig) -> str:
    """The transformers model_type that computes model `m`: gpt2, llama, mixtral or olmoe.
    ConfigError names every key that none of them can express."""
    moe = m.moe
    if not moe.enabled:
        if m.style == "llama" and m.qk_norm:
            raise ConfigError(
                "model.qk_norm=true: transformers' Llama has no QK-norm, and its OLMo-2 normalises "
                "after attention and the MLP, not before as our blocks do: no transformers class "
                "computes this dense model"
            )
        return m.style
    blocking = []
    if m.style != "llama":
        blocking.append(f"model.style={m.style} (GELU experts; theirs are SwiGLU)")
    if moe.router != "softmax":
        blocking.append(f"model.moe.router={moe.router} (theirs is softmax)")
    if moe.shared_experts:
        blocking.append(f"model.moe.shared_experts={moe.shared_experts} (they have none)")
    if moe.every != 1:
        blocking.append(f"model.moe.every={moe.every} (every block of theirs is sparse)")
    if m.bias:
        blocking.append("model.bias=true (their experts and routers have no biases)")
    if not m.qk_norm and not moe.norm_topk_prob:
        blocking.append(
            "model.moe.norm_topk_prob=false without model.qk_norm (Mixtral always renormalises "
            "the top-k weights; OLMoE, which may not, has QK-norm)"
        )
    if blocking:
        raise ConfigError(
            "a mixture of experts exports as transformers' Mixtral (softmax router, renormalised "
            "top-k, no QK-norm) or OLMoE (QK-norm over the whole q/k projections); neither "
            "computes this model: " + "; ".join(blocking)
        )
    return "olmoe" if m.qk_norm else "mixtral"


def links(m: ModelConfig) -> list[Link]:
    """Every HF tensor of model `m` (a classifier's head is HF's `score`), in HF's usual order."""
    kind = hf_model_type(m)  # refuses what no transformers class computes, naming the keys
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
            if m.qk_norm:  # OLMoE's, over the whole projections
                out += [
                    Link(h + "self_attn.q_norm.weight", (b + "attn.q_norm.weight",)),
                    Link(h + "self_attn.k_norm.weight", (b + "attn.k_norm.weight",)),
                ]
            for ours, hf in parts.items():
                if m.moe.enabled and ours.startswith("mlp."):
                    continue
                out.append(Link(f"{h}{hf}.weight", (f"{b}{ours}.weight",)))
                if m.bias:
                    out.append(Link(f"{h}{hf}.bias", (f"{b}{ours}.bias",)))
            if m.moe.enabled:
                out += _expert_links(kind, m.moe.num_experts, h, b)
    if not m.tie_embeddings:
        out.append(Link(head_name(m), ("lm_head.weight",)))
    return out


def _expert_links(kind: str, num_experts: int, h: str, b: str) -> list[Link]:
    """A sparse block's router and its experts, one HF tensor per expert, grouped by our stacked
    tensor (all experts' w1, then w3, then w2: an export reads each stacked tensor once)."""
    block, names = MOE_NAMES[kind]
    out = [Link(f"{h}{block}.gate.weight", (b + "mlp.router.weight",))]
    for ours, theirs in names.items():
        for j in range(num_experts):
            out.append(
                Link(f"{h}{block}.experts.{j}.{theirs}.weight", (f"{b}mlp.experts.{ours}",), expert=j)
            )
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
    held: dict[str, torch.Tensor] = {}  # the stacked expert tensor being split (one slot)

    def stacked(name: str, get: Getter) -> torch.Tensor:
        if name not in held:
            held.clear()
            held[name] = get(name)
        return held[name]

    def recipe(link: Link) -> Callable[[Getter], torch.Tensor]:
        def build(get: Getter) -> torch.Tensor:
            if link.expert is not None:
                # a copy: safetensors refuses tensors that share memory (the experts' views)
                return stacked(link.ours[0], get)[link.expert].clone()
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
        kind = {"gpt2": "GPT2", "llama": "Llama", "mixtral": "Mixtral"}.get(cfg["model_type"])
        if kind is None:
            raise ConfigError(
                f"model.num_labels={m.num_labels}: transformers has no {cfg['architectures'][0]} "
                "sequence classifier (a mixture of experts classifies as Mixtral only: "
                "model.qk_norm=false)"
            )
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
    kind = hf_model_type(m)
    if kind != "llama":
        return _hf_moe_config(m, kind)
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


def _hf_moe_config(m: ModelConfig, kind: str) -> dict:
    """Mixtral's or OLMoE's config.json (hf_model_type has refused what they cannot express)."""
    moe = m.moe
    cfg = {
        "architectures": ["MixtralForCausalLM" if kind == "mixtral" else "OlmoeForCausalLM"],
        "model_type": kind,
        "vocab_size": m.vocab_size,
        "hidden_size": m.n_embd,
        "intermediate_size": m.expert_dim,  # each expert's width
        "num_hidden_layers": m.n_layer,
        "num_attention_heads": m.n_head,
        "num_key_value_heads": m.kv_heads,
        "max_position_embeddings": m.block_size,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "hidden_act": "silu",
        "attention_dropout": m.dropout,
        "num_experts_per_tok": moe.top_k,
        # their load-balancing loss sums f over the k choices: k times ours (moe.py)
        "router_aux_loss_coef": moe.aux_loss_coef / moe.top_k,
        "output_router_logits": False,
        "tie_word_embeddings": m.tie_embeddings,
        "initializer_range": m.init_std,
        # not their defaults (OLMoE's eos 50279 lies outside a small vocabulary): the export
        # sets them from our tokenizer when it writes one
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }
    if kind == "mixtral":
        return cfg | {
            "num_local_experts": moe.num_experts,
            "head_dim": m.head_dim,
            "sliding_window": None,
            "router_jitter_noise": 0.0,
        }
    return cfg | {
        "num_experts": moe.num_experts,
        "norm_topk_prob": moe.norm_topk_prob,
        "attention_bias": m.bias,
        "clip_qkv": None,
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
    kind = hf_model_type(m)
    if kind in MOE_NAMES:
        out = {
            "vocab_size": (m.vocab_size, "model.vocab_size"),
            "hidden_size": (m.n_embd, "model.n_embd"),
            "intermediate_size": (m.expert_dim, "model.moe.expert_hidden"),
            "num_hidden_layers": (m.n_layer, "model.n_layer"),
            "num_attention_heads": (m.n_head, "model.n_head"),
            "num_key_value_heads": (m.kv_heads, "model.n_kv_head"),
            "rms_norm_eps": (m.norm_eps, "model.norm_eps"),
            "rope_theta": (m.rope_theta, "model.rope_theta"),
            "num_experts_per_tok": (m.moe.top_k, "model.moe.top_k"),
        }
        if kind == "mixtral":
            return out | {
                "num_local_experts": (m.moe.num_experts, "model.moe.num_experts"),
                "head_dim": (m.head_dim, "model.n_embd/model.n_head"),
            }
        return out | {
            "num_experts": (m.moe.num_experts, "model.moe.num_experts"),
            "norm_topk_prob": (m.moe.norm_topk_prob, "model.moe.norm_topk_prob"),
            "attention_bias": (m.bias, "model.bias"),
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

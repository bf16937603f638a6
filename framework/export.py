"""Hugging Face export and import.

    python -m framework.export checkpoint=runs/debug out=hf/debug format=hf

writes `config.json` (with our end-of-text id as bos/eos), `generation_config.json`,
`model.safetensors` and the tokenizer (`tokenizer.json` + `tokenizer_config.json`) that
`transformers` loads as GPT2LMHeadModel (gpt2-style flavors) or LlamaForCausalLM (llama-style)
plus AutoTokenizer: a tokenizers JSON file is copied; the built-in byte tokenizer is written as
an equivalent byte-level BPE without merges; tiktoken encodings are refused unless
`with_tokenizer=false`. Directory 0777 and files 0666, less the umask. The reverse,
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
    with_tokenizer: bool = True
    """Write tokenizer files (tiktoken encodings cannot be: export them with false)."""


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
    tokenizer: str | None = None,
) -> Path:
    """Write config.json, generation_config.json, model.safetensors and (given our tokenizer
    spec: 'byte' or a tokenizers JSON file) the tokenizer files into `out`, atomically (a temp
    dir, then a rename), with the modes of any normally created file (umask applies)."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"out={out} exists; pass overwrite=true to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        cfg = hf_config(model.cfg) | {"torch_dtype": str(dtype).removeprefix("torch.")}
        if tokenizer is not None:
            eot = write_tokenizer(tokenizer, tmp, model.cfg)
            # GPT-2's convention: one end-of-text token opens and ends documents; our shards
            # put it between documents and never prepend one, so a prompt starts bare.
            ids = {"bos_token_id": eot, "eos_token_id": eot}
            cfg |= ids
            # pad = eos keeps transformers' generate() from warning and guessing one.
            gen = ids | {"pad_token_id": eot}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        tensors = {k: v.to(dtype) for k, v in to_hf(model).items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _normal_modes(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _normal_modes(d: Path) -> None:
    """mkdtemp makes 0700 (and safetensors' files may be 0600); an export is meant to be shared
    like any directory the user creates: 0777/0666 less the process umask."""
    umask = os.umask(0)  # the only portable way to read it; restored at once
    os.umask(umask)
    d.chmod(0o777 & ~umask)
    for f in d.iterdir():
        f.chmod(0o666 & ~umask)


# -- tokenizer files ---------------------------------------------------------------------
def _byte_to_unicode() -> dict[int, str]:
    """The byte-level alphabet of `tokenizers`' ByteLevel pre-tokenizer (GPT-2's): printable
    Latin-1 bytes stand for themselves, the other 68 bytes map to code points 256.. in order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = (b for b in range(256) if b not in printable)
    chars = {b: chr(b) for b in printable}
    chars |= {b: chr(256 + n) for n, b in enumerate(shifted)}
    return chars


def byte_tokenizer_json(eot_token: str = "<|endoftext|>"):
    """Our ByteTokenizer as a `tokenizers` Tokenizer: a BPE whose vocabulary is the 256 bytes at
    their own ids, with no merges (so every byte stays one token), and end-of-text as a special
    token at id 256. Same ids as ours for every text, except that the literal string
    '<|endoftext|>' becomes id 256 there (special tokens are matched in text by `tokenizers`)."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTok

    from framework.data.tokenizer import ByteTokenizer

    vocab = {ch: b for b, ch in _byte_to_unicode().items()}
    tok = HFTok(models.BPE(vocab=vocab, merges=[]))
    # No regex split: with no merges the split cannot change the ids, and skipping it is faster.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(eot_token, special=True)])
    # Self-check before anything is written: every 1-, 2-, 3- and 4-byte UTF-8 form and
    # whitespace runs must give our ids (a tokenizers upgrade that changed ByteLevel would show).
    probe = "".join(map(chr, range(0x250))) + "  \t\n日本語 😀 é"
    ours = ByteTokenizer()
    if tok.encode(probe).ids != ours.encode(probe) or tok.token_to_id(eot_token) != ours.eot_id:
        raise RuntimeError(
            "byte tokenizer export: the tokenizers version in use gives other ids than ours"
        )
    return tok


def write_tokenizer(spec: str, out: Path, m: ModelConfig) -> int:
    """tokenizer.json + tokenizer_config.json that `AutoTokenizer.from_pretrained(out)` loads,
    for our tokenizer `spec` (data.tokenizer of the checkpoint); returns the end-of-text id."""
    from framework.data.tokenizer import HFTokenizer, load_tokenizer

    if spec.startswith("tiktoken:"):
        raise ConfigError(
            f"data.tokenizer={spec}: a tiktoken encoding cannot be exported as Hugging Face "
            "tokenizer files here; pass with_tokenizer=false to export the weights and config only "
            "(then load the matching tokenizer yourself)"
        )
    try:
        tok = load_tokenizer(spec)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"data.tokenizer={spec} of the checkpoint cannot be loaded ({e}); restore the file "
            "or pass with_tokenizer=false"
        ) from e
    if tok.vocab_size > m.vocab_size:
        raise ConfigError(
            f"data.tokenizer={spec} has {tok.vocab_size} tokens but model.vocab_size={m.vocab_size}"
        )
    eot_token = HFTokenizer.EOT
    if isinstance(tok, HFTokenizer):
        shutil.copyfile(spec, out / "tokenizer.json")
    else:
        byte_tokenizer_json(eot_token).save(str(out / "tokenizer.json"))
    tok_cfg = {
        # The generic fast class: it reads tokenizer.json as is (no slow-tokenizer files).
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eot_token,
        "eos_token": eot_token,
        "pad_token": eot_token,
        "model_max_length": m.block_size,
        "clean_up_tokenization_spaces": False,  # decode() must return the bytes we trained on
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    return tok.eot_id


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


# Every config.json field we know, per model_type. `model.init_from` refuses any other field
# (an unknown one may change the computation) and any known field whose value we do not
# implement; fields that only configure training, bookkeeping or generation defaults are ignored.
_IGNORED_ANY = {
    "architectures", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    "decoder_start_token_id", "tokenizer_class", "task_specific_params", "id2label", "label2id",
    "problem_type", "return_dict", "output_attentions", "output_hidden_states", "torchscript",
    "is_encoder_decoder", "is_decoder", "prefix", "finetuning_task", "chunk_size_feed_forward",
    "tie_encoder_decoder", "max_length", "min_length", "do_sample", "num_beams", "temperature",
    "top_k", "top_p", "repetition_penalty", "no_repeat_ngram_size", "early_stopping",
    "length_penalty", "num_return_sequences", "bad_words_ids",
}  # fmt: skip
_IGNORED = {
    # dropout rates and the summary head are training / classification choices (ours:
    # model.dropout); reorder_and_upcast_attn only changes fp16 rounding, not the function.
    "gpt2": {"attn_pdrop", "embd_pdrop", "resid_pdrop", "summary_type", "summary_use_proj",
             "summary_activation", "summary_proj_to_labels", "summary_first_dropout",
             "reorder_and_upcast_attn", "output_past"},
    # RoPE computes any position (our limit is model.block_size); pretraining_tp only splits
    # the same matmuls.
    "llama": {"attention_dropout", "max_position_embeddings", "pretraining_tp"},
}  # fmt: skip
# field -> values we implement (what the field must be, whatever our model config says)
_FIXED = {
    "gpt2": {
        "activation_function": ("gelu_new", "gelu_pytorch_tanh"),  # both GELU's tanh form
        "scale_attn_weights": (True,),
        "scale_attn_by_inverse_layer_idx": (False,),
        "add_cross_attention": (False,),
    },
    "llama": {"hidden_act": ("silu",), "rope_scaling": (None,)},
}


def _model_fields(m: ModelConfig) -> dict[str, tuple[object, str]]:
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
        "rope_theta": (m.rope_theta, "model.rope_theta"),
        "attention_bias": (m.bias, "model.bias"),
        "mlp_bias": (m.bias, "model.bias"),
    }


def check_hf_config(hf_cfg: dict, m: ModelConfig, path: str | Path) -> None:
    """Refuse a config.json that describes a computation our model (model.*) does not do,
    naming each field, its value, and what we support or which key to set."""
    where = f"model.init_from={path}"
    want_type = hf_config(m)["model_type"]
    if hf_cfg.get("model_type") != want_type:
        raise ConfigError(
            f"{where}: config.json model_type={hf_cfg.get('model_type')!r}, but model={m.name} "
            f"(style {m.style}) loads only {want_type!r} directories"
        )
    hf_cfg = dict(hf_cfg)
    rope = hf_cfg.pop("rope_parameters", None)
    if rope is not None:  # transformers 5 nests theta and the scaling type here
        rope = dict(rope)
        hf_cfg.setdefault("rope_theta", rope.pop("rope_theta", m.rope_theta))
        if rope.get("rope_type", "default") != "default" or set(rope) - {"rope_type"}:
            hf_cfg["rope_scaling"] = rope
    if hf_cfg.get("rope_scaling") == {"rope_type": "default"}:
        hf_cfg["rope_scaling"] = None
    if m.style == "gpt2" and hf_cfg.get("n_inner") is None:
        hf_cfg["n_inner"] = 4 * hf_cfg.get("n_embd", m.n_embd)  # HF's default
    if m.style == "llama":
        if hf_cfg.get("num_key_value_heads") is None:
            hf_cfg["num_key_value_heads"] = hf_cfg.get("num_attention_heads", m.n_head)
        if hf_cfg.get("head_dim") is None:
            hf_cfg.pop("head_dim", None)
    ours, fixed = _model_fields(m), _FIXED[want_type]
    ignored = _IGNORED_ANY | _IGNORED[want_type] | {"model_type"}
    errors = []
    # A tied file loads into an untied model (the head starts as a copy); the reverse would
    # drop the file's separate output layer.
    if hf_cfg.pop("tie_word_embeddings", True) is False and m.tie_embeddings:
        errors.append(
            "tie_word_embeddings=False (a separate output layer) but model.tie_embeddings=true: "
            "set model.tie_embeddings=false"
        )
    for k, v in sorted(hf_cfg.items()):
        if k in ignored or k.startswith("_"):
            continue
        if k in fixed:
            if v not in fixed[k]:
                allowed = " or ".join(repr(x) for x in fixed[k])
                errors.append(f"{k}={v!r} is not implemented (we support {allowed})")
        elif k in ours:
            value, key = ours[k]
            if v != value:
                errors.append(f"{k}: HF {v!r} vs ours {value!r} (set {key} to match)")
        else:
            errors.append(f"{k}={v!r} is a field we do not implement (it may change the computation)")
    if errors:
        raise ConfigError(
            f"{where} does not match model={m.name}; config.json:\n  " + "\n  ".join(errors)
        )


def _check_tensors(path, m: ModelConfig, tensors: dict, hf_cfg: dict, expected: dict) -> None:
    """Every tensor we need is present with our shape; nothing is left over (an extra tensor is
    a part of the computation we would drop)."""
    where = f"model.init_from={path}"
    # buffers (causal masks, RoPE frequencies) that old files saved beside the weights
    buffers = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
    need = dict(expected)
    if m.style == "gpt2" and not m.bias:
        need = {k: v for k, v in need.items() if not k.endswith(".bias")}
    if not m.tie_embeddings and hf_cfg.get("tie_word_embeddings", True):
        need.pop("lm_head.weight", None)  # tied in the file: the head is a copy of the embedding
    missing = [k for k in need if k not in tensors]
    shapes = [
        f"{k}: HF {tuple(tensors[k].shape)} vs ours {tuple(v.shape)}"
        for k, v in need.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    extra = [k for k in tensors if k not in expected and not k.endswith(buffers)]
    if m.tie_embeddings and "lm_head.weight" in extra:
        emb = tensors.get("transformer.wte.weight", tensors.get("model.embed_tokens.weight"))
        if emb is not None and torch.equal(tensors["lm_head.weight"], emb):
            extra.remove("lm_head.weight")  # a tied head saved as a copy
    errors = [f"missing tensor {k}" for k in missing] + [f"shape of {s}" for s in shapes]
    errors += [f"extra tensor {k} (not part of model={m.name})" for k in extra]
    if m.style == "gpt2" and not m.bias:
        nonzero = [k for k, v in tensors.items() if k.endswith(".bias") and k in expected and v.any()]
        if nonzero:
            errors.append(
                f"non-zero biases ({nonzero[0]} ...) but model.bias=false: set model.bias=true"
            )
    if errors:
        shown = errors[:8] + ([f"... {len(errors) - 8} more"] if len(errors) > 8 else [])
        raise ConfigError(f"{where}: the weights do not fit model={m.name}:\n  " + "\n  ".join(shown))


def load_hf_weights(model: GPT, path: str | Path) -> None:
    """Copy a local HF GPT-2 / Llama directory's weights into `model`. Its config.json must
    describe our computation (check_hf_config) and its tensors our shapes, all named."""
    hf_cfg, tensors = read_hf_state(path)
    m = model.cfg
    check_hf_config(hf_cfg, m, path)
    if m.style == "gpt2":  # original GPT-2 files have no "transformer." prefix
        tensors = {
            k if k.startswith(("transformer.", "lm_head")) else "transformer." + k: v
            for k, v in tensors.items()
        }
    _check_tensors(path, m, tensors, hf_cfg, to_hf(model))
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
    tok = state["config"]["data"]["tokenizer"] if cfg.with_tokenizer else None
    out = save_hf(model, cfg.out, DTYPES[cfg.dtype], cfg.overwrite, tokenizer=tok)
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

"""model.init_from refuses a Hugging Face directory whose config.json or tensors describe a
computation our model does not do (issue 7 failure 6), naming the field or tensor. The configs
are written by transformers' own config classes."""

from __future__ import annotations

import pytest
import torch

from framework.config import ConfigError
from framework.hf.export import save_hf
from framework.hf.load import load_hf_weights
from framework.model import GPT, ModelConfig
from tests.helpers import tiny_model_configs

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

GPT2, LLAMA = tiny_model_configs()
GPT2_FIELDS = dict(vocab_size=257, n_positions=64, n_embd=64, n_layer=2, n_head=4)
LLAMA_FIELDS = dict(
    vocab_size=257,
    hidden_size=64,
    intermediate_size=LLAMA.ffn_dim,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    rms_norm_eps=1e-5,
)


def hf_dir(tmp_path, cfg: ModelConfig, **fields):
    """Our weights, with a config.json written by transformers' GPT2Config / LlamaConfig."""
    torch.manual_seed(0)
    out = save_hf(GPT(cfg), tmp_path / "hf")
    if cfg.style == "gpt2":
        transformers.GPT2Config(**(GPT2_FIELDS | fields)).save_pretrained(out)
    else:
        transformers.LlamaConfig(**(LLAMA_FIELDS | fields)).save_pretrained(out)
    return out


def edit_tensors(d, fn) -> None:
    tensors = load_file(str(d / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(d / "model.safetensors"))


def test_transformers_written_configs_load(tmp_path):
    """The baseline the refusals below differ from by one field: GPT2Config's defaults (with its
    dropouts and summary fields) and LlamaConfig's load without complaint."""
    load_hf_weights(GPT(GPT2), hf_dir(tmp_path / "g", GPT2))
    load_hf_weights(GPT(LLAMA), hf_dir(tmp_path / "l", LLAMA))


@pytest.mark.parametrize(
    ("cfg", "fields", "message"),
    [
        (
            GPT2,
            {"activation_function": "gelu"},
            r"activation_function='gelu' is not implemented \(we support 'gelu_new' or 'gelu_pytorch_tanh'\)",
        ),
        (
            GPT2,
            {"tie_word_embeddings": False},
            r"tie_word_embeddings=False .*set model.tie_embeddings=false",
        ),
        (
            GPT2,
            {"layer_norm_epsilon": 1e-6},
            r"layer_norm_epsilon: HF 1e-06 vs ours 1e-05 \(set model.norm_eps",
        ),
        (
            GPT2,
            {"scale_attn_by_inverse_layer_idx": True},
            r"scale_attn_by_inverse_layer_idx=True is not",
        ),
        (GPT2, {"n_inner": 128}, r"n_inner: HF 128 vs ours 256 \(set model.ffn_hidden"),
        (GPT2, {"my_new_trick": 3}, r"my_new_trick=3 is a field we do not implement"),
        (
            LLAMA,
            {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
            r"rope_type 'dynamic' is not implemented \(we support default \| linear \| llama3 \| yarn\)",
        ),
        (
            LLAMA,
            {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
            r"rope_factor: HF 2.0 vs ours 1.0 \(set model.rope_factor",
        ),
        (
            LLAMA,
            {"rope_theta": 500000.0},
            r"rope_theta: HF 500000.0 vs ours 10000.0 \(set model.rope_theta",
        ),
        (LLAMA, {"attention_bias": True}, r"attention_bias: HF True vs ours False \(set model.bias"),
        (LLAMA, {"mlp_bias": True}, r"mlp_bias: HF True vs ours False \(set model.bias"),
        (LLAMA, {"rms_norm_eps": 1e-6}, r"rms_norm_eps: HF 1e-06 vs ours 1e-05 \(set model.norm_eps"),
        (LLAMA, {"hidden_act": "gelu"}, r"hidden_act='gelu' is not implemented \(we support 'silu'\)"),
    ],
)
def test_init_from_refuses_unimplemented_config_fields(tmp_path, cfg, fields, message):
    with pytest.raises(
        ConfigError, match=r"model.init_from=.*hf does not match model=debug(.|\n)*" + message
    ):
        load_hf_weights(GPT(cfg), hf_dir(tmp_path, cfg, **fields))


def test_init_from_refuses_wrong_model_type(tmp_path):
    with pytest.raises(
        ConfigError, match=r"model_type='llama', but model=debug \(style gpt2\) loads only 'gpt2'"
    ):
        load_hf_weights(GPT(GPT2), hf_dir(tmp_path, LLAMA))


def test_init_from_names_missing_extra_and_misshaped_tensors(tmp_path):
    d = hf_dir(tmp_path, GPT2)

    def damage(t):
        del t["transformer.h.1.mlp.c_fc.weight"]  # was a raw KeyError
        t["transformer.h.0.attn.c_attn.bias"] = t["transformer.h.0.attn.c_attn.bias"][:10].clone()
        t["transformer.h.0.attn.lora_A.weight"] = torch.zeros(2, 2)

    edit_tensors(d, damage)
    with pytest.raises(ConfigError) as e:
        load_hf_weights(GPT(GPT2), d)
    msg = str(e.value)
    assert "missing tensor transformer.h.1.mlp.c_fc.weight" in msg
    assert "shape of transformer.h.0.attn.c_attn.bias: HF (10,) vs ours (192,)" in msg
    assert "extra tensor transformer.h.0.attn.lora_A.weight" in msg


def test_init_from_gpt2_without_biases_names_them(tmp_path):
    d = hf_dir(tmp_path, GPT2)
    edit_tensors(d, lambda t: [t.pop(k) for k in [k for k in t if k.endswith(".bias")]])
    with pytest.raises(ConfigError, match=r"missing tensor transformer.h.0.attn.c_attn.bias"):
        load_hf_weights(GPT(GPT2), d)


def test_init_from_biased_gpt2_into_bias_free_model(tmp_path):
    """Zero biases are representable by model.bias=false; non-zero ones are refused."""
    no_bias = ModelConfig(**(vars(GPT2) | {"bias": False}))
    d = hf_dir(tmp_path, no_bias)  # our export writes zeros for the biases GPT-2 always has
    load_hf_weights(GPT(no_bias), d)
    edit_tensors(d, lambda t: t["transformer.h.1.mlp.c_proj.bias"].fill_(0.5))
    with pytest.raises(
        ConfigError, match=r"non-zero biases \(transformer.h.1.mlp.c_proj.bias .*set model.bias=true"
    ):
        load_hf_weights(GPT(no_bias), d)

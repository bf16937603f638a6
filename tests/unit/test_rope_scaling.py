"""RoPE scaling (model.rope_scaling): for each type, a tiny Llama exported to a Hugging Face
directory gives transformers' LlamaForCausalLM the same logits as ours at positions beyond the
original context, and model.init_from of that directory reads the scaling back (and refuses a
model configured with another). Both of transformers' config formats are read."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from framework.config import ConfigError
from framework.hf.export import save_hf
from framework.hf.load import load_hf_weights
from framework.model import GPT, ModelConfig, ModelShapeError
from framework.model.rope import rope_scaling_from_hf, rope_scaling_to_hf
from tests.helpers import make_cfg

transformers = pytest.importorskip("transformers")

BASE = ModelConfig(
    style="llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=64, vocab_size=97, block_size=64,
    multiple_of=32, bias=False, tie_embeddings=False, rope_theta=500.0,
)  # fmt: skip
# original context 16, the model run at 64: positions 16..63 are past it
SCALINGS = {
    "linear": dict(rope_factor=4.0),
    "llama3": dict(
        rope_factor=4.0, rope_original_max_position=16, rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0,
    ),
    "yarn": dict(rope_factor=4.0, rope_original_max_position=16, rope_beta_fast=8.0, rope_beta_slow=1.0),
    "yarn_attention_factor": dict(
        rope_factor=4.0, rope_original_max_position=16, rope_attention_factor=1.2
    ),
}  # fmt: skip


def scaled(name: str) -> ModelConfig:
    kind = name.split("_")[0]
    return dataclasses.replace(BASE, rope_scaling=kind, **SCALINGS[name])


@pytest.mark.parametrize("name", list(SCALINGS))
def test_transformers_gives_our_logits_beyond_the_original_context(tmp_path, name):
    cfg = scaled(name)
    torch.manual_seed(0)
    ours = GPT(cfg).eval()
    out = save_hf(ours, tmp_path / "hf")
    theirs = transformers.LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    assert theirs.config.rope_parameters["rope_type"] == cfg.rope_scaling
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.block_size))
    with torch.no_grad():
        a, b = ours(idx), theirs(idx).logits
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        # the scaling changed the computation past the original context
        plain = GPT(BASE).eval()
        plain.load_state_dict(ours.state_dict())
        assert (plain(idx)[:, 16:] - a[:, 16:]).abs().max() > 1e-3
    # model.init_from reads it back: the same keys, and a model configured otherwise is refused
    back = rope_scaling_from_hf(json.loads((out / "config.json").read_text()))
    assert back["rope_scaling"] == cfg.rope_scaling and back == {k: getattr(cfg, k) for k in back}
    load_hf_weights(GPT(cfg), out)
    with pytest.raises(ConfigError, match="rope_scaling: HF .* vs ours 'none' .*set model.rope_scaling"):
        load_hf_weights(GPT(BASE), out)


@pytest.mark.parametrize("name", ["linear", "llama3", "yarn"])
def test_configs_written_by_transformers_read_in_both_formats(name):
    """transformers 5 writes rope_parameters (theta inside); older files carry rope_scaling (and
    `type` for rope_type) beside a top-level rope_theta: both mean our keys."""
    cfg = scaled(name)
    hf = rope_scaling_to_hf(cfg)
    fields = dict(vocab_size=97, hidden_size=64, num_attention_heads=4, max_position_embeddings=64)
    written = transformers.LlamaConfig(**fields, rope_parameters={**hf, "rope_theta": 500.0}).to_dict()
    rest = {k: v for k, v in hf.items() if k != "rope_type"}
    old = {"rope_theta": 500.0, "rope_scaling": {"type": hf["rope_type"], **rest}}
    for config in (written, old):
        got = rope_scaling_from_hf(config)
        assert got == {k: getattr(cfg, k) for k in got}, (config, got)


def test_scaling_needs_a_llama_model_and_its_parameters():
    with pytest.raises(ModelShapeError, match=r"rope_scaling=linear .*model.style=gpt2 has learned"):
        make_cfg(["model.rope_scaling=linear", "model.rope_factor=4"]).model.validate()
    with pytest.raises(ModelShapeError, match="llama3 needs model.rope_original_max_position"):
        make_cfg(
            ["model=debug-llama", "model.rope_scaling=llama3", "model.rope_factor=4"]
        ).model.validate()
    with pytest.raises(ValueError, match=r"rope_type 'dynamic' is not implemented"):
        rope_scaling_from_hf({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    with pytest.raises(ValueError, match=r"field\(s\) \['mscale'\] of rope_type 'yarn'"):
        rope_scaling_from_hf({"rope_scaling": {**rope_scaling_to_hf(scaled("yarn")), "mscale": 0.7}})

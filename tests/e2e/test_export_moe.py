"""Hugging Face export and import of a mixture of experts (issue 16 item 6): debug-moe exported
as transformers' Mixtral (no QK-norm) or OLMoE (QK-norm over the whole q/k projections, with or
without renormalised top-k weights) loads with our logits; a directory transformers saved again
initialises ours with the same tensors; what no transformers class computes is refused by the
key that blocks it (a dense Llama with QK-norm included, which used to export as a Llama
silently without its norms).

Measured on CPU, transformers 5.24 (2026-12), largest logit difference (fp32, logits of
magnitude ~5): mixtral 7.7e-7, olmoe 8.3e-7, olmoe with norm_topk_prob=false 7.5e-7."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from framework.config import ConfigError
from framework.dist import Dist
from framework.hf.export import save_hf
from framework.hf.load import load_hf_weights
from framework.model import GPT
from framework.parallel import build_engine
from tests.distributed.build_harness import gathered_weights
from tests.helpers import make_cfg, randomized

transformers = pytest.importorskip("transformers")

TINY_MOE = ["model=debug-moe", "model.n_layer=2", "model.block_size=64"]
FLAVOURS = {
    "mixtral": (["model.qk_norm=false"], "MixtralForCausalLM"),
    "olmoe": (["model.moe.norm_topk_prob=false"], "OlmoeForCausalLM"),  # as published
    "olmoe-renormalised": ([], "OlmoeForCausalLM"),  # debug-moe as shipped
}


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_moe_export_loads_in_transformers_with_our_logits(tmp_path, flavour):
    overrides, hf_class = FLAVOURS[flavour]
    cfg = make_cfg([*TINY_MOE, *overrides]).model
    ours = randomized(cfg)
    out = save_hf(ours, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [hf_class]
    # one tensor per expert, as the published checkpoints and transformers' save_pretrained
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        experts = [k for k in f.keys() if ".experts." in k]
    assert len(experts) == 2 * 4 * 3  # layers x experts x (gate, up, down)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(hf).__name__ == hf_class
    x = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), rtol=0, atol=1e-5)

    # and back: the directory transformers writes itself initialises ours with the same tensors
    hf.save_pretrained(tmp_path / "resaved")
    again = GPT(cfg).eval()
    assert load_hf_weights(again, tmp_path / "resaved") == set()
    for name, p in ours.state_dict().items():
        assert torch.equal(again.state_dict()[name], p), name


def test_init_from_a_moe_directory_on_the_meta_path(tmp_path):
    """model.init_from=<Mixtral dir>: the meta build reads each (E, ...) expert tensor from its
    E per-expert file tensors and starts from exactly the source's weights."""
    over = [*TINY_MOE, "model.qk_norm=false", "trainer.device=cpu"]
    source = randomized(make_cfg(over).model)
    save_hf(source, tmp_path / "hf")
    cfg = make_cfg([*over, f"model.init_from={tmp_path / 'hf'}"])
    got = gathered_weights(build_engine(None, cfg, Dist()), zero3=False)
    for name, p in source.state_dict().items():
        assert torch.equal(got[name], p), name


@pytest.mark.parametrize(
    ("overrides", "blocking"),
    [
        (["model.moe.router=sigmoid"], "model.moe.router=sigmoid"),
        (["model.moe.shared_experts=1"], "model.moe.shared_experts=1"),
        (["model.moe.every=2"], "model.moe.every=2"),
        (["model.style=gpt2"], "model.style=gpt2"),
        (["model.bias=true"], "model.bias=true"),
        (["model.qk_norm=false", "model.moe.norm_topk_prob=false"], "model.moe.norm_topk_prob=false"),
        (["model.moe.num_experts=0"], "model.qk_norm=true"),  # a dense Llama with QK-norm
    ],
)
def test_export_refuses_what_transformers_cannot_compute(tmp_path, overrides, blocking):
    model = GPT(make_cfg([*TINY_MOE, *overrides]).model)
    with pytest.raises(ConfigError, match=blocking.replace(".", r"\.")):
        save_hf(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()

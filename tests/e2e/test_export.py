"""Hugging Face parity: our exports load in transformers with equal logits and identical greedy
generations; HF directories initialise our model; the CLIs print what they promise."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from framework.config import ConfigError
from framework.export import load_hf_weights, save_hf
from framework.generate import sample
from framework.model import GPT, ModelConfig
from framework.train import train
from tests.helpers import TINY, make_cfg, run_module

transformers = pytest.importorskip("transformers")

GPT2_STYLE = ModelConfig(style="gpt2", n_layer=2, n_head=4, n_embd=64, vocab_size=257, block_size=64)
LLAMA_STYLE = ModelConfig(
    style="llama",
    n_layer=2,
    n_head=4,
    n_kv_head=2,
    n_embd=64,
    vocab_size=257,
    block_size=64,
    multiple_of=32,
    bias=False,
    tie_embeddings=False,
)


def randomized(cfg: ModelConfig) -> GPT:
    """Random weights everywhere (biases and norms too, so a mapping mistake cannot hide)."""
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


@pytest.mark.parametrize(
    ("cfg", "hf_class"), [(GPT2_STYLE, "GPT2LMHeadModel"), (LLAMA_STYLE, "LlamaForCausalLM")]
)
def test_export_matches_transformers(tmp_path, cfg, hf_class):
    ours = randomized(cfg)
    save_hf(ours, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", attn_implementation="eager"
    ).eval()
    assert type(hf).__name__ == hf_class
    x = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), rtol=0, atol=1e-5)
        prompt = x[:1, :5]
        theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)[0].tolist()
    mine = sample(ours, prompt[0].tolist(), 20, cfg.block_size, greedy=True)
    assert mine == theirs


@pytest.mark.parametrize("cfg", [GPT2_STYLE, LLAMA_STYLE])
def test_init_from_hf_directory(tmp_path, cfg):
    """The reverse: a transformers model saved locally initialises ours with equal logits."""
    torch.manual_seed(3)
    source = randomized(cfg)
    save_hf(source, tmp_path / "src")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src").eval()
    hf.save_pretrained(tmp_path / "resaved")  # written by transformers itself
    target = GPT(cfg).eval()
    load_hf_weights(target, tmp_path / "resaved")
    x = torch.randint(0, 257, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(target(x), hf(x).logits, rtol=0, atol=1e-5)


def test_init_from_wrong_shape_names_keys(tmp_path):
    save_hf(randomized(GPT2_STYLE), tmp_path / "hf")
    wider = ModelConfig(style="gpt2", n_layer=2, n_head=4, n_embd=128, vocab_size=257, block_size=64)
    with pytest.raises(ConfigError, match=r"n_embd: HF 64 vs ours 128"):
        load_hf_weights(GPT(wider), tmp_path / "hf")


def test_export_refuses_existing_out(tmp_path):
    (tmp_path / "hf").mkdir()
    with pytest.raises(ConfigError, match="overwrite=true"):
        save_hf(randomized(GPT2_STYLE), tmp_path / "hf")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sample_data):
    d = tmp_path_factory.mktemp("trained") / "run"
    train(make_cfg([*TINY, f"run.dir={d}", "trainer.max_steps=4"]))
    return d


def _cli(module: str, *args: str, cwd) -> subprocess.CompletedProcess:
    return run_module(module, *args, cwd=cwd)


def test_generate_cli_prints_ids_and_text(trained, tmp_path):
    out = _cli(
        "framework.generate",
        f"checkpoint={trained}",
        "prompt_ids=[104,101]",
        "max_new_tokens=5",
        "greedy=true",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ids"][:2] == [104, 101] and len(result["ids"]) == 7
    assert isinstance(result["text"], str) and result["text"].startswith("he")
    again = _cli(
        "framework.generate",
        f"checkpoint={trained}",
        "prompt=he",
        "max_new_tokens=5",
        "greedy=true",
        cwd=tmp_path,
    )
    assert (
        json.loads(again.stdout.strip().splitlines()[-1])["ids"] == result["ids"]
    )  # text prompt, same ids


def test_export_cli_writes_loadable_directory(trained, tmp_path):
    out = _cli(
        "framework.export", f"checkpoint={trained}", f"out={tmp_path}/hf", "format=hf", cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert {p.name for p in (tmp_path / "hf").iterdir()} == {"config.json", "model.safetensors"}
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.n_layer == 2 and hf.config.vocab_size == 257


def test_flipped_byte_makes_generate_and_export_fail_naming_the_file(trained, tmp_path):
    """load_model (behind generate and export) checks the manifest before DCP reads a byte:
    DCP has no checksums, so a flipped byte in a shard would otherwise load silently."""
    import re
    import shutil

    from framework import export, generate
    from framework.checkpoint import CheckpointError

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    ckpt = run / "checkpoints" / (run / "checkpoints/latest").read_text().strip()
    shard = max((p for p in (ckpt / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash can tell
    shard.write_bytes(bytes(data))
    with pytest.raises(
        CheckpointError, match=re.escape(str(shard)) + r": sha256 [0-9a-f]{64}, expected"
    ):
        export.run(export.ExportConfig(checkpoint=str(run), out=str(tmp_path / "hf")))
    assert not (tmp_path / "hf").exists()
    with pytest.raises(CheckpointError, match=re.escape(f"{shard}: sha256")):
        generate.run(generate.GenerateConfig(checkpoint=str(run), prompt_ids=[104], max_new_tokens=2))
    out = _cli(
        "framework.generate", f"checkpoint={run}", "prompt_ids=[104]", "max_new_tokens=2", cwd=tmp_path
    )
    assert out.returncode != 0 and str(shard) in out.stderr + out.stdout

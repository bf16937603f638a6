"""Streamed Hugging Face export and import (issue 10 item 4): above `max_shard_size` the export
writes HF's sharded layout (model-0000i-of-0000n.safetensors + model.safetensors.index.json),
one file at a time; `model.init_from` reads any of these layouts one tensor at a time."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from framework.config import ConfigError
from framework.hf.export import parse_max_shard_size, save_hf, to_hf
from framework.hf.load import load_hf_weights
from framework.hf.names import INDEX
from framework.model import GPT, ModelConfig

GPT2 = ModelConfig(style="gpt2", n_layer=2, n_head=4, n_embd=64, vocab_size=257, block_size=64)
LLAMA = ModelConfig(
    style="llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=64, vocab_size=257, block_size=64,
    multiple_of=32, bias=False, tie_embeddings=False,
)  # fmt: skip


def randomized(cfg: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("5GB", 5_000_000_000),
        ("500MB", 500_000_000),
        ("40KB", 40_000),
        (123456, 123456),
        ("123456", 123456),
    ],
)
def test_max_shard_size_accepts_hf_strings_and_bytes(value, expected):
    assert parse_max_shard_size(value) == expected


@pytest.mark.parametrize("value", ["5XB", "lots", "0", 0, "-5MB", "5 GB extra"])
def test_max_shard_size_refuses_what_it_cannot_read(value):
    with pytest.raises(ConfigError, match=r"max_shard_size="):
        parse_max_shard_size(value)


@pytest.mark.parametrize("cfg", [GPT2, LLAMA])
def test_sharded_export_layout_and_round_trip(tmp_path, cfg):
    """Files stay within the limit (a larger tensor alone in its file), the index names every
    tensor's file and the total, the tensors equal the in-memory export, and init_from reads
    the sharded directory back bitwise."""
    limit = 40_000  # bytes: the (257, 64) fp32 embedding (65,792 B) is larger
    source = randomized(cfg)
    out = save_hf(source, tmp_path / "hf", max_shard_size=limit)
    index = json.loads((out / INDEX).read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(files)
    assert n > 3 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (out / "model.safetensors").exists()
    expected = to_hf(source)
    assert sorted(index["weight_map"]) == sorted(expected)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in expected.values()
    )
    for name in files:
        with safe_open(str(out / name), framework="pt") as f:
            keys = list(f.keys())
            tensors = {k: f.get_tensor(k) for k in keys}
        assert {index["weight_map"][k] for k in keys} == {name}
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        assert nbytes <= limit or len(keys) == 1, (name, nbytes, keys)
        for k, t in tensors.items():
            assert torch.equal(t, expected[k]), k
    target = GPT(cfg)
    load_hf_weights(target, out)
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k


def test_export_below_the_limit_is_one_file_without_index(tmp_path):
    out = save_hf(randomized(GPT2), tmp_path / "hf")  # default 5GB
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_init_from_reads_tensor_by_tensor(tmp_path, monkeypatch):
    """Before issue 10, init_from loaded every file whole (safetensors' load_file): a model
    larger than host memory could not start from a Hugging Face directory. Now only
    safe_open's per-tensor reads are used, each tensor read once."""
    src = save_hf(randomized(GPT2), tmp_path / "hf")

    def whole_file(*a, **k):
        raise AssertionError("init_from loaded a whole safetensors file")

    monkeypatch.setattr(safetensors.torch, "load_file", whole_file)
    reads: list[str] = []
    real_open = safe_open

    class CountingOpen:
        def __init__(self, *a, **k):
            self._f = real_open(*a, **k)

        def __enter__(self):
            self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self._f, name)

        def get_tensor(self, key):
            reads.append(key)
            return self._f.get_tensor(key)

    monkeypatch.setattr("safetensors.safe_open", CountingOpen)
    target = GPT(GPT2)
    load_hf_weights(target, src)
    assert sorted(reads) == sorted(to_hf(target))  # every tensor once, none twice
    assert torch.equal(target.tok_emb.weight, randomized(GPT2).tok_emb.weight)


def test_init_from_index_naming_a_missing_shard(tmp_path):
    out = save_hf(randomized(GPT2), tmp_path / "hf", max_shard_size=40_000)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ConfigError, match=rf"{INDEX} names {victim.name}, which is missing"):
        load_hf_weights(GPT(GPT2), out)

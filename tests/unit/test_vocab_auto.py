"""model.vocab_size=auto (issue 7 failure 8): the data's vocabulary rounded up to 64, resolved
before the model is built, so a BPE-prepared source trains without a hand-set vocabulary."""

from __future__ import annotations

from dataclasses import replace

import pytest
import yaml

from framework.config import ConfigError
from framework.data.shards import read_manifest
from framework.data.vocab import resolve_vocab_size, round_vocab
from framework.model import ModelConfig
from framework.model.gpt import ModelShapeError
from framework.prepare import PrepareConfig, prepare
from framework.train import train
from tests.helpers import TINY, compose, make_cfg, read_metrics

TEXTS = [
    f"story {i}: the cat sat on the mat and the dog ran far away. " * (i % 5 + 2) for i in range(120)
]


def test_round_vocab_to_multiple_of_64():
    assert [round_vocab(n) for n in (1, 64, 65, 257, 50257)] == [64, 64, 128, 320, 50304]


def test_user_data_defaults_to_auto_sample_keeps_257():
    assert compose(["data=gpt3_mix", "model=gpt2-124m"]).model.vocab_size == "auto"
    assert compose(["data=gpt3_mix", "model.vocab_size=50257"]).model.vocab_size == 50257
    assert compose([]).model.vocab_size == 257  # the embedded sample: parity figures unchanged


def test_bpe_prepared_source_trains_with_auto_vocab(tmp_path):
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(f'{{"text": "{t}"}}\n' for t in TEXTS))
    src = prepare(
        PrepareConfig(input=str(raw), output=str(tmp_path / "bpe"), train_tokenizer=300, workers=1)
    )
    vocab = read_manifest(src).vocab_size
    assert 257 < vocab <= 300
    run_dir = tmp_path / "run"
    cfg = make_cfg(
        [
            *TINY,
            "trainer.max_steps=2",
            f"run.dir={run_dir}",
            f"data.tokenizer={src}/tokenizer.json",
            f"data.sources=[{{name: bpe, path: '{src}', weight: 1.0}}]",
            "model.vocab_size=auto",
        ]
    )
    train(cfg)
    assert cfg.model.vocab_size == round_vocab(vocab) == 320
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["vocab_size"] == 320
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2]


def test_auto_refusals():
    cfg = make_cfg(
        ["data.sources=[{name: x, path: /nonexistent/src, weight: 1.0}]", "data.tokenizer=/no/tok.json"]
    )
    cfg.model.vocab_size = "auto"
    with pytest.raises(
        ConfigError, match=r"model.vocab_size=auto: no data.sources manifest .*set model.vocab_size"
    ):
        resolve_vocab_size(cfg)
    cfg.model.vocab_size = "big"
    with pytest.raises(ConfigError, match=r"model.vocab_size='big' must be a positive int or 'auto'"):
        resolve_vocab_size(cfg)
    with pytest.raises(ModelShapeError, match=r"model.vocab_size='auto' must be an int"):
        replace(ModelConfig(), vocab_size="auto").validate()

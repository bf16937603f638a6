"""Training learns what is learnable: on the Markov source, whose entropy rate is known
exactly, validation loss approaches that rate (not merely "goes down")."""

from __future__ import annotations

import pytest

from framework.data.sample import markov_entropy_rate
from framework.train import train
from tests.helpers import make_cfg, read_metrics

MARKOV_ONLY = ["data.sources.1.weight=0", "data.sources.2.weight=0"]


@pytest.mark.slow
def test_markov_val_loss_approaches_entropy_rate(tmp_path, sample_data):
    h = markov_entropy_rate()  # nats/token
    assert 1.5 < h < 2.5  # the chain is peaked well below log(17)
    cfg = make_cfg(
        [
            *MARKOV_ONLY,
            f"run.dir={tmp_path}/m",
            "trainer.max_steps=120",
            "trainer.seq_len=64",
            "trainer.micro_batch_size=32",
            "trainer.global_batch_size=32",
            "optim.lr=3e-3",
            "optim.warmup_steps=10",
            "trainer.eval_every=120",
            "trainer.eval_batches=16",
            "trainer.sample_tokens=0",
            "checkpoint.every=0",
        ]
    )
    train(cfg)
    evals = [r for r in read_metrics(tmp_path / "m") if "val_loss" in r]
    first, last = evals[0]["val_loss/markov"], evals[-1]["val_loss/markov"]
    assert first > 5.0  # untrained: about log(257)
    # A model cannot beat the entropy rate (beyond sampling noise of the val set) and should
    # come within 0.1 nats of it.
    assert h - 0.03 < last < h + 0.1, (last, h)

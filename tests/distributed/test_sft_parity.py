"""SFT under every strategy (issue 11 item 2): with a per-token loss mask the step loss is the mean
over the global batch's trained tokens, so ddp, fsdp, zero2 and tp on 2 gloo ranks (accumulation
2 instead of 4) give the single-process losses within 1e-5 (fp32), through `torchrun -m
framework.train task=sft`. The examples have unequal lengths, so micro-batches hold unequal
trained-token counts: a per-micro-batch mean would not match."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from framework.prepare import PrepareConfig, prepare
from framework.train import train
from tests.distributed.launch import PARITY, losses, max_rel_diff, run_train
from tests.helpers import make_cfg, read_metrics

FP32_RTOL = 1e-5


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_parity")
    rng = np.random.default_rng(0)
    with open(root / "chat.jsonl", "w") as f:
        for _ in range(200):
            a, b = rng.integers(0, 100, size=2)
            q = "add: " + f"{a}+{b}" + " please" * int(rng.integers(0, 3))
            f.write(json.dumps({"prompt": q, "completion": str(a + b) * int(rng.integers(1, 4))}) + "\n")
    prepare(PrepareConfig(input=str(root / "chat.jsonl"), output=str(root / "data"), format="chat",
                          val_fraction=0.0, workers=1))  # fmt: skip
    common = ["task=sft", f"data.sources=[{{name: chat, path: {root / 'data'}}}]", "optim.lr=1e-3",
              "optim.warmup_steps=2"]  # fmt: skip
    cache: dict = {}

    def get(strategy: str):
        if strategy not in cache:
            d = root / strategy
            if strategy == "single":
                train(make_cfg([*PARITY, f"run.dir={d}", *common]))
            else:
                run_train(d, f"strategy={strategy}", *common, nproc=2)
            cache[strategy] = d
        return cache[strategy]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2", "tp"])
def test_sft_losses_match_single(sft_runs, strategy):
    ref = losses(sft_runs("single"))
    got = losses(sft_runs(strategy))
    assert len(ref) == 8 and all(math.isfinite(x) for x in got)
    assert ref[-1] < ref[0]
    assert max_rel_diff(got, ref) <= FP32_RTOL, (strategy, got, ref)
    # trained tokens counted apart from seen ones, the same under every strategy
    rec = [r for r in read_metrics(sft_runs(strategy)) if "loss" in r][-1]
    ref_rec = [r for r in read_metrics(sft_runs("single")) if "loss" in r][-1]
    assert rec["trained_tokens"] == ref_rec["trained_tokens"] < rec["tokens"] == 8 * 8 * 32

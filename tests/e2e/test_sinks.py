"""The TensorBoard sink and loss.png through a real (TINY) training run: TensorBoard's event
files hold the numbers of metrics.jsonl, and loss.png is a valid image redrawn at each eval."""

from __future__ import annotations

import math

import pytest

from framework.metrics import Metrics
from framework.train import train
from tests.helpers import TINY, make_cfg, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_tensorboard_events_equal_metrics_jsonl_and_loss_png_redrawn(tmp_path, sample_data, monkeypatch):
    pytest.importorskip("tensorboard")
    from matplotlib.image import imread
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pngs: list[bytes] = []
    original = Metrics.plot

    def snapshot(self):
        original(self)
        pngs.append((self.run_dir / "loss.png").read_bytes())

    monkeypatch.setattr(Metrics, "plot", snapshot)
    run = tmp_path / "run"
    train(make_cfg([*TINY, f"run.dir={run}", "logger=tensorboard", "trainer.max_steps=4",
                    "trainer.eval_every=2", "trainer.eval_batches=1"]))  # fmt: skip

    # metrics.jsonl -> {tag: {step: value}} for every number TensorBoard is given
    want: dict[str, dict[int, float]] = {}
    for r in read_metrics(run):
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                want.setdefault(k, {})[r["step"]] = float(v)
    assert {"loss", "lr", "grad_norm", "val_loss"} <= set(want)
    assert sorted(want["val_loss"]) == [0, 2, 4]

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    assert set(acc.Tags()["scalars"]) == set(want)
    for tag, by_step in want.items():
        got = {e.step: e.value for e in acc.Scalars(tag)}
        assert set(got) == set(by_step), tag
        for step, v in by_step.items():  # TensorBoard stores float32
            assert math.isclose(got[step], v, rel_tol=1e-6, abs_tol=1e-30), (tag, step, got[step], v)

    # loss.png: one drawing per eval (steps 0, 2, 4), each a valid PNG, each different
    assert len(pngs) == 3 and all(p.startswith(PNG_SIGNATURE) for p in pngs)
    assert len(set(pngs)) == 3
    image = imread(run / "loss.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert not list(run.glob("*.tmp*"))  # written atomically: no temp file left behind

"""GPU tier (marker `gpu`) of framework.observe: the CUDA-only parts that the CPU tests fake.
trainer.memory_snapshot records the allocator's history and dumps rank_0.pickle after the first
steps; a real out-of-memory error dumps it and names the file; a CUDA profile holds kernels and
a device-time table; the step timer synchronises the device on logged steps only.

    pytest -m gpu tests/gpu/test_observe_gpu.py      # bench/run_gpu.sh runs the whole tier
"""

from __future__ import annotations

import json

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from framework import observe  # noqa: E402
from framework.train import train  # noqa: E402
from tests.helpers import make_cfg  # noqa: E402

pytestmark = pytest.mark.gpu

CUDA_RUN = [
    "model=debug",
    "precision=bf16",
    "trainer.device=cuda",
    "trainer.max_steps=4",
    "trainer.seq_len=128",
    "trainer.eval_every=0",
    "trainer.sample_tokens=0",
    "trainer.log_every=2",
    "checkpoint.every=0",
]


def test_memory_snapshot_after_the_first_steps_and_a_profile_with_kernels(tmp_path, monkeypatch):
    syncs = []
    real_sync = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: syncs.append(1) or real_sync(*a))
    train(make_cfg([*CUDA_RUN, "trainer.memory_snapshot=true", "trainer.profile.steps=[2,2]",
                    f"run.dir={tmp_path}"]))  # fmt: skip
    snap = tmp_path / "memory" / "rank_0.pickle"
    assert snap.stat().st_size > 1000 and snap.read_bytes()[:1] == b"\x80"  # a pickle (memory_viz)
    assert "memory snapshot of steps 1-3" in (tmp_path / "train.log").read_text()
    trace = json.loads((tmp_path / "profile/step_2/rank_0.json").read_text())["traceEvents"]
    assert any(e.get("cat") == "kernel" for e in trace)
    assert "Self CUDA" in (tmp_path / "profile/step_2/rank_0.txt").read_text()
    # logged steps 2 and 4 sync at their start and after each phase; steps 1 and 3 never do
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "time/step_s" in r] == [2, 4]
    assert syncs  # (other callers sync too: the count is not ours alone)


def test_out_of_memory_dumps_the_snapshot_and_names_it(tmp_path):
    snap = observe.CudaMemorySnapshot(tmp_path, rank=0)
    try:
        with pytest.raises(torch.OutOfMemoryError) as e:
            try:
                torch.empty(2**50, dtype=torch.uint8, device="cuda")  # 1 PiB
            except torch.OutOfMemoryError as oom:
                snap.out_of_memory(oom)
                raise
    finally:
        snap.close()
    path = tmp_path / "memory" / "rank_0.pickle"
    assert str(path) in str(e.value) and path.stat().st_size > 0

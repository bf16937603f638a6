"""Resume across strategies and world sizes (issue 8 Build 7 and failure 7, RELIABILITY A8).

Every engine saves the same DCP layout (parameter FQNs, the optimizer state by name: optim.state.
<fqn>.exp_avg / exp_avg_sq / step, optim.param_groups.<fqn>.*), ZeRO included, so any checkpoint
loads into any strategy at any world size (pipeline layouts: tests/distributed/test_pp.py). Checked two ways, from a 2-rank zero3 run into ddp, fsdp, zero1,
tp and tp_fsdp (tp=2) on 1-4 gloo ranks with vocab 257 (divisible by none of them): a load +
save round trip through another engine gives back equal tensors, and the first step after a
resume on another topology has the loss of a same-topology resume within 1e-6 (fp32)."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

from framework.safeload import SafeFileSystemReader, dcp_load
from tests.distributed.launch import BIN, PARITY, ROOT, free_port, losses, run_train

pytestmark = pytest.mark.slow  # 2-3 gloo ranks per launch, DeepSpeed start-up

# 12 sequences per step: whole micro-batches at dp 1, 2 and 3
BATCH = "trainer.global_batch_size=12"
CKPT = "checkpoints/step_00000004"


def read_tensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint, whole, read on one process."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = SafeFileSystemReader(path).read_metadata()
    state = {
        k: torch.empty(v.size, dtype=v.properties.dtype)
        for k, v in md.state_dict_metadata.items()
        if isinstance(v, TensorStorageMetadata)
    }
    dcp_load(state, path)
    return state


# 12 sequences over 4 data-parallel ranks: micro-batches of 1 (3 per rank)
FOUR_DP = ("trainer.micro_batch_size=1",)


def round_trip(src, out, strategies: str, nproc: int, *extra: str) -> None:
    """Load src into each of `strategies` (comma-separated) on nproc ranks; save to out/<strategy>."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MASTER_PORT=str(port))
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(port),
           str(ROOT / "tests/distributed/reshard_harness.py"), str(src), str(out),
           *PARITY, BATCH, f"strategy={strategies}", *extra]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]


@pytest.fixture(scope="module")
def zero3_run(sample_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("reshard") / "zero3"
    run_train(run, "strategy=zero3", BATCH, "trainer.stop_at_step=4")
    return run


@pytest.fixture(scope="module")
def zero3_next_loss(zero3_run, tmp_path_factory) -> float:
    """Step 5's loss after a same-topology resume (2-rank zero3) from zero3_run's step 4."""
    same = tmp_path_factory.mktemp("reshard") / "same"
    run_train(
        same, "strategy=zero3", BATCH, f"checkpoint.path={zero3_run / CKPT}", "trainer.max_steps=5"
    )
    (loss,) = losses(same)
    return loss


# (strategy, ranks, extra overrides): 2 -> 1, 2, 3, 4 ranks; tensor parallel (vocab 257 split
# unevenly over the TP ranks) and 2-D. The 4-rank cases start 4 processes on this machine's cores.
OTHER_TOPOLOGIES = [
    pytest.param("fsdp", 2, (), id="fsdp-2"),
    pytest.param("zero1", 1, (), id="zero1-1"),
    pytest.param("ddp", 3, (), id="ddp-3"),
    pytest.param("tp", 2, (), id="tp-2"),
    pytest.param("tp_fsdp", 4, FOUR_DP, id="tp_fsdp-4", marks=pytest.mark.slow),
    pytest.param("fsdp", 4, FOUR_DP, id="fsdp-4", marks=pytest.mark.slow),
]


def _launches() -> list:
    """OTHER_TOPOLOGIES grouped by world size: one round-trip launch builds each group's engines."""
    groups: dict = {}
    for p in OTHER_TOPOLOGIES:
        strategy, nproc, extra = p.values
        groups.setdefault((nproc, extra), ([], []))[0].append(strategy)
        groups[(nproc, extra)][1].extend(m for m in p.marks if m not in groups[(nproc, extra)][1])
    return [
        pytest.param(",".join(names), nproc, extra, id=f"{'+'.join(names)}-{nproc}", marks=marks)
        for (nproc, extra), (names, marks) in groups.items()
    ]


@pytest.mark.parametrize("strategies, nproc, extra", _launches())
def test_zero3_checkpoint_round_trips_through_other_engines(
    zero3_run, tmp_path, strategies, nproc, extra
):
    """zero3 -> fsdp failed with `Missing key ... optim.state...` (DeepSpeed's own files)."""
    src = zero3_run / CKPT / "state"
    round_trip(src, tmp_path, strategies, nproc, *extra)
    saved = read_tensors(src)
    assert any(k.startswith("optim.state.") and k.endswith(".exp_avg_sq") for k in saved)
    for strategy in strategies.split(","):
        again = read_tensors(tmp_path / strategy)
        assert sorted(saved) == sorted(again), strategy
        unequal = [k for k in saved if not torch.equal(saved[k], again[k])]
        assert unequal == [], strategy


@pytest.mark.parametrize(
    "strategy, nproc, extra", [p for p in OTHER_TOPOLOGIES if p.values[:2] != ("zero1", 1)]
)
def test_next_step_loss_after_zero3_checkpoint_on_other_topology(
    zero3_run, zero3_next_loss, tmp_path, strategy, nproc, extra
):
    other = tmp_path / "other"
    run_train(other, f"strategy={strategy}", BATCH, f"checkpoint.path={zero3_run / CKPT}",
              "trainer.max_steps=5", *extra, nproc=nproc)  # fmt: skip
    (b,) = losses(other)
    assert abs(zero3_next_loss - b) / abs(zero3_next_loss) <= 1e-6


def test_fsdp_checkpoint_resumes_under_zero2_on_one_rank(sample_data, tmp_path):
    """torch engine -> ZeRO, 2 -> 1 ranks."""
    src = tmp_path / "src"
    run_train(src, "strategy=fsdp", BATCH, "trainer.stop_at_step=4")
    same, other = tmp_path / "same", tmp_path / "other"
    run_train(same, "strategy=fsdp", BATCH, f"checkpoint.path={src / CKPT}", "trainer.max_steps=5")
    run_train(other, "strategy=zero2", BATCH, f"checkpoint.path={src / CKPT}", "trainer.max_steps=5",
              nproc=1)  # fmt: skip
    (a,), (b,) = losses(same), losses(other)
    assert abs(a - b) / abs(a) <= 1e-6

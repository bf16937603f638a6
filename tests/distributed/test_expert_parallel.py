"""Expert parallelism (issue 16 item 4; framework/parallel/ep.py) on gloo: debug-moe (4 experts,
top-2, aux 0.01 and z 0.001 in the gradient) under strategy.ep=2 has single's fp32 per-step
losses and gradient norms, resumes bitwise, and its checkpoint resumes under single and under
fsdp with ep=1.

Batch arithmetic: with ep the per-expert counts are summed over the data-parallel ranks, so the
aux loss is the one of the union of the ranks' micro-batches (model/moe.py's docstring). Single
therefore runs micro-batches of 8 = the union of every rank's micro-batch (4 x 2 ranks, or
2 x 4 ranks), one micro-batch per step of 8 sequences: the union of the ranks' k-th
micro-batches is single's k-th micro-batch only when a step has one (each rank reads a
contiguous slice of the global batch).

The gradient scale is what the grad norms prove: expert gradients arrive on their rank from
every rank's tokens through the all-to-all's backward and are summed over the ranks holding the
same experts, then divided by dp. Dividing by dp / ep instead (FSDP's default over those ranks)
puts step 1's grad norm 8.8e-3 off single's on 4 ranks, ddp and fsdp alike (measured by hand,
2026-12).

Measured on CPU, torch 2.13 (2026-12), worst of 8 steps against single (loss / grad norm):
fsdp ep=2 on 2 ranks 1.8e-7 / 1.4e-7, ddp ep=2 on 2 ranks 2.7e-7 / 1.4e-7, fsdp ep=2 on 4 ranks
9.1e-8 / 1.5e-7; next-step loss of the ep=2 checkpoint under single 8.9e-8, under fsdp ep=1 0.
"""

from __future__ import annotations

import pytest

from framework.train import train
from tests.distributed.launch import PARITY, grad_norms, losses, max_rel_diff, run_train
from tests.helpers import make_cfg

FP32_RTOL = 1e-5
MOE = ("model=debug-moe",)
EP2 = (*MOE, "strategy.ep=2")
CKPT = "checkpoints/step_00000004"


def _single(run_dir, *extra: str) -> None:
    """single in this process, micro-batches of 8 (the union of the ep ranks' micro-batches)."""
    train(make_cfg([*PARITY, *MOE, "trainer.micro_batch_size=8", f"run.dir={run_dir}", *extra]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sample_data):
    """The launches the tests share, made once: the single reference, the ep runs, and the
    ddp ep=2 run split at step 4 (then resumed to 8 in its own directory)."""
    root = tmp_path_factory.mktemp("ep")
    out = {name: root / name for name in ("single", "fsdp", "ddp", "fsdp4", "split")}
    _single(out["single"])
    run_train(out["fsdp"], "strategy=fsdp", *EP2, "trainer.micro_batch_size=4")
    run_train(out["ddp"], "strategy=ddp", *EP2, "trainer.micro_batch_size=4")
    run_train(out["fsdp4"], "strategy=fsdp", *EP2, "trainer.micro_batch_size=2", nproc=4)
    split = ("strategy=ddp", *EP2, "trainer.micro_batch_size=4")
    run_train(out["split"], *split, "trainer.stop_at_step=4")
    run_train(out["split"], *split)  # resume=auto picks step 4
    return out


@pytest.mark.parametrize("run", ["fsdp", "ddp", "fsdp4"])
def test_expert_parallel_matches_single(runs, run):
    """fsdp: dp=2 = ep (each rank's experts one FSDP unit of one rank); ddp: DDP for the dense
    weights, the experts reduced by ep.py; fsdp4: dp=4, ep=2, the experts sharded over the 2
    ranks that hold them."""
    ref = losses(runs["single"])
    assert len(ref) == 8 and ref[-1] < ref[0]
    for name, series in (("loss", losses), ("grad_norm", grad_norms)):
        got, want = series(runs[run]), series(runs["single"])
        assert max_rel_diff(got, want) <= FP32_RTOL, (name, got, want)


def test_expert_parallel_resume_is_bitwise(runs):
    """ddp ep=2 stopped at step 4 and resumed in a new launch: steps 5-8 as the uninterrupted run."""
    assert (losses(runs["split"]), grad_norms(runs["split"])) == (
        losses(runs["ddp"]),
        grad_norms(runs["ddp"]),
    )


def test_expert_parallel_checkpoint_resumes_under_single_and_fsdp_ep1(runs, tmp_path):
    """The ep=2 checkpoint (DTensor experts, each rank's half of every (E, ...) tensor) loads into
    single (whole tensors) and into fsdp without ep on 2 ranks; step 5's loss is the
    same-topology resume's (the resumed split run's) within 1e-6. (Step 5's loss depends on the
    weights, optimizer state and data position only, not on how its aux gradient is reduced.)"""
    src = f"checkpoint.path={runs['split'] / CKPT}"
    want = losses(runs["split"])[4]
    _single(tmp_path / "single", src, "trainer.max_steps=5")
    run_train(
        tmp_path / "fsdp",
        "strategy=fsdp",
        *MOE,
        "trainer.micro_batch_size=4",
        src,
        "trainer.max_steps=5",
    )
    for name in ("single", "fsdp"):
        (got,) = losses(tmp_path / name)
        assert abs(got - want) / abs(want) <= 1e-6, (name, got, want)


def test_expert_parallel_checkpoint_exports_to_transformers(runs, tmp_path):
    """framework.export of the ep=2 checkpoint (each expert tensor read whole through DCP) writes
    debug-moe as OLMoE (QK-norm) that transformers runs with the checkpoint's logits."""
    transformers = pytest.importorskip("transformers")
    import torch

    from framework.checkpoint import load_model
    from framework.export import ExportConfig
    from framework.export import run as export_run

    ckpt = runs["split"] / CKPT
    out = export_run(ExportConfig(checkpoint=str(ckpt), out=str(tmp_path / "hf")))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(hf).__name__ == "OlmoeForCausalLM"
    ours, _ = load_model(ckpt)
    x = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours.eval()(x), rtol=0, atol=1e-5)

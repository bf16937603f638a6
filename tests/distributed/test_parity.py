"""Parity: for the same seed and global batch, every strategy's per-step losses and gradient
norms equal the single-process run's (fp32: relative 1e-5) over 8 steps, on 2 gloo processes
(tp_fsdp on 4), through the real entry point `torchrun -m framework.train`. The deepspeed and accelerate
launchers run the same training and must give the torchrun run's losses. Gradient norms are
compared as well because losses cannot see a constant gradient scale (AdamW ignores it).
Eval (weighted val loss, text sampled through sharded logits) runs under tensor parallel too.

Measured on CPU, torch 2.13 / DeepSpeed 0.19 (2026-11-26): every fp32 strategy within 2e-7
relative of `single`; launchers bitwise equal to torchrun for the same strategy.

bf16 (each against `single` in bf16, worst step of 8): ddp 2.7e-5 and tp 3.3e-5 (autocast,
as single); fsdp 1.2e-4 (MixedPrecisionPolicy: parameters and norms in bf16); zero2 3.4e-4
(DeepSpeed bf16: the whole module in bf16). Recorded tolerance: BF16_RTOL = 1e-3.
(single bf16 vs single fp32: 1.9e-5 -- the tiny model is far from bf16's limits.)
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from framework import export, generate
from framework.train import train
from tests.distributed.launch import PARITY, grad_norms, losses, max_rel_diff, run_train
from tests.distributed.test_reshard import read_tensors
from tests.helpers import make_cfg, read_metrics

FP32_RTOL = 1e-5
BF16_RTOL = 1e-3
# bf16 gradient norms drift more than losses (measured 2026-11-30, worst of 8 steps against
# single in bf16: fsdp 1.6e-3, zero2 1.2e-3; fp32 zero2 2.4e-7). A summed instead of averaged
# accumulation is off by 2x, so this still catches it.
BF16_GRAD_NORM_RTOL = 3e-3

# strategy -> processes
STRATEGIES = {
    "ddp": 2,
    "zero1": 2,
    "zero2": 2,
    "zero3": 2,
    "fsdp": 2,
    "tp": 2,
    "tp_fsdp": 4,
}


def assert_matches(got_dir, ref_dir, rtol: float, grad_norm_rtol: float | None = None) -> None:
    """Per-step losses (within rtol) and gradient norms (within grad_norm_rtol, default rtol)
    of two runs, relative to ref."""
    for name, series, tol in (("loss", losses, rtol), ("grad_norm", grad_norms, grad_norm_rtol or rtol)):
        got, ref = series(got_dir), series(ref_dir)
        assert len(ref) == 8 and all(math.isfinite(x) for x in got), (name, got)
        assert max_rel_diff(got, ref) <= tol, (name, got, ref)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sample_data):
    """Lazily run and cache (launcher, strategy, extra overrides) -> run dir."""
    root = tmp_path_factory.mktemp("parity")
    cache: dict = {}

    def get(strategy: str, launcher: str = "torchrun", *extra: str):
        key = (launcher, strategy, extra)
        if key not in cache:
            d = root / f"{launcher}-{strategy}-{len(cache)}"
            if strategy == "single":
                train(make_cfg([*PARITY, f"run.dir={d}", *extra]))
            else:
                run_train(
                    d,
                    f"strategy={strategy}",
                    *extra,
                    launcher=launcher,
                    nproc=STRATEGIES.get(strategy, 2),
                )
            cache[key] = d
        return cache[key]

    return get


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_fp32_losses_match_single(runs, strategy):
    ref = losses(runs("single"))
    assert ref[-1] < ref[0]  # it trains
    assert_matches(runs(strategy), runs("single"), FP32_RTOL)


def test_tensor_parallel_without_sequence_parallel(runs):
    assert_matches(runs("tp", "torchrun", "strategy.sequence_parallel=false"), runs("single"), FP32_RTOL)


def test_llama_style_tensor_parallel_x_fsdp(runs):
    """The llama plan (RoPE, RMSNorm, SwiGLU w3, grouped-query kv heads split over TP)."""
    llama = ("model=debug-llama", "model.n_kv_head=2")
    assert_matches(runs("tp_fsdp", "torchrun", *llama), runs("single", "torchrun", *llama), FP32_RTOL)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero3"])
def test_mixture_of_experts_matches_single(runs, strategy):
    """debug-moe (4 experts, top-2, aux and z losses in the gradient): each rank's micro-batches
    are single's, so with per-micro-batch balancing statistics the losses and gradient norms
    match. DDP needs no find_unused_parameters: the experts are stacked into one parameter per
    weight, which every step uses. ZeRO-3 is here rather than zero2 (which updates like ddp):
    it re-gathers each module's weights for backward through hooks on the tensors the module
    returns, which a router returning a dataclass escaped. Measured 2026-12 (CPU, loss / grad
    norm): ddp 8.9e-8 / 7.0e-8, fsdp 8.9e-8 / 1.5e-7, zero3 9.1e-8 / 1.7e-7; by hand, zero1 and
    zero2 8.9e-8 / 1.5e-7, and in bf16 ddp 0 / 7.5e-8, fsdp 1.2e-4 / 1.7e-3."""
    moe = ("model=debug-moe",)
    assert_matches(runs(strategy, "torchrun", *moe), runs("single", "torchrun", *moe), FP32_RTOL)


def test_zero_optimizer_offload_matches_single(runs):
    assert_matches(runs("zero2", "torchrun", "strategy.zero_offload=true"), runs("single"), FP32_RTOL)


def test_hsdp_matches_single(runs):
    """HSDP on a 2-D mesh (2 replicas x 1 shard): all-reduce across replicas."""
    assert_matches(runs("fsdp", "torchrun", "strategy.hsdp_replicas=2"), runs("single"), FP32_RTOL)


@pytest.mark.parametrize("strategy", ["fsdp", "zero2"])
def test_bf16_losses_within_recorded_tolerance(runs, strategy):
    """The two bf16 mechanisms other than autocast: FSDP2's MixedPrecisionPolicy (fp32
    reduce) and DeepSpeed's bf16 mode (fp32 master weights)."""
    ref = runs("single", "torchrun", "precision=bf16")
    assert losses(runs("single")) != losses(ref)  # bf16 did change the arithmetic
    assert_matches(runs(strategy, "torchrun", "precision=bf16"), ref, BF16_RTOL, BF16_GRAD_NORM_RTOL)


@pytest.mark.parametrize(("launcher", "strategy"), [("deepspeed", "zero2"), ("accelerate", "fsdp")])
def test_launchers_give_the_torchrun_losses(runs, launcher, strategy):
    via_torchrun, got = runs(strategy), runs(strategy, launcher)
    assert all(math.isfinite(x) for x in losses(got))
    # same processes, same arithmetic: bitwise
    assert (losses(got), grad_norms(got)) == (losses(via_torchrun), grad_norms(via_torchrun))


def test_zero3_checkpoint_loads_as_a_plain_model(runs):
    """A ZeRO checkpoint is DCP in the torch engines' layout, without DeepSpeed's own (pickle)
    files: generate and export read it like any other, and its weights are the single run's."""
    from framework.checkpoint import load_model

    zero, _ = load_model(runs("zero3") / "checkpoints/step_00000008")
    single, _ = load_model(runs("single") / "checkpoints/step_00000008")
    state = runs("zero3") / "checkpoints/step_00000008/state"
    assert {p.name for p in state.iterdir() if p.suffix != ".distcp"} == {".metadata"}
    assert not list(state.rglob("*.pt"))
    for (name, a), (_, b) in zip(zero.state_dict().items(), single.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


EVAL = ("trainer.eval_every=4", "trainer.eval_batches=2", "trainer.sample_tokens=24")


def evals(run_dir) -> tuple[list[dict], list[str]]:
    """(eval records of metrics.jsonl, the sampled texts as train.log prints them)."""
    records = [r for r in read_metrics(run_dir) if "val_loss" in r]
    samples = [ln.split(" sample: ", 1)[1] for ln in (run_dir / "train.log").read_text().splitlines()
               if " sample: " in ln]  # fmt: skip
    return records, samples


@pytest.mark.parametrize("strategy", ["tp", "pp"])
def test_eval_under_tensor_parallel_matches_single(runs, strategy):
    """Eval on 2 TP ranks: per-source and mixture-weighted val loss (mean over ranks) equal
    single's, and the text sampled through TP's gathered (sequence-padded) logits is the same.
    pp: 2 pipeline stages, eval and sampling run forward-only through the stages and the last
    stage's loss and logits are broadcast to both ranks."""
    (ref, ref_text), (got, got_text) = (
        evals(runs("single", "torchrun", *EVAL)),
        evals(runs(strategy, "torchrun", *EVAL)),
    )
    assert [r["step"] for r in ref] == [r["step"] for r in got] == [0, 4, 8]
    for a, b in zip(got, ref):
        assert set(a) == set(b) and {k for k in a if k.startswith("val_loss/")}, a
        for k in b:
            assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(b[k])), (k, a[k], b[k])
    assert len(ref_text) == 3 and len(set(ref_text)) > 1  # a text per eval, and training changed it
    assert got_text == ref_text


def test_pipeline_through_train_matches_single(runs):
    """`torchrun -m framework.train strategy=pp` (2 stages, 1f1b): per-step losses and grad
    norms (the last stage's loss broadcast to every rank, the norm summed over the stages)."""
    assert_matches(runs("pp", "torchrun", *EVAL), runs("single", "torchrun", *EVAL), FP32_RTOL)


def test_pipeline_checkpoint_is_the_single_models(runs, tmp_path):
    """The pp=2 checkpoint's DCP tensors have the single run's keys and values (model.tok_emb
    .weight from the first stage, model.lm_head.weight from the last, equal; one optimizer state
    for the tied weight), and generate and export read it as they read single's (evaluate loads
    through the same framework.checkpoint.load_model as generate)."""
    got, ref = (runs(s, "torchrun", *EVAL) / "checkpoints/step_00000008" for s in ("pp", "single"))
    a, b = read_tensors(got / "state"), read_tensors(ref / "state")
    assert sorted(a) == sorted(b)
    assert torch.equal(a["model.tok_emb.weight"], a["model.lm_head.weight"])
    assert not any("lm_head" in k for k in a if k.startswith("optim."))
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    outs = [generate.run(generate.GenerateConfig(checkpoint=str(d), prompt_ids=[10, 20],
                                                 max_new_tokens=8, greedy=True))
            for d in (got, ref)]  # fmt: skip
    assert outs[0]["ids"] == outs[1]["ids"]
    hf = [load_file(export.run(export.ExportConfig(checkpoint=str(d), out=str(tmp_path / name),
                                                   with_tokenizer=False)) / "model.safetensors")
          for d, name in ((got, "pp"), (ref, "single"))]  # fmt: skip
    assert sorted(hf[0]) == sorted(hf[1])
    for k in hf[1]:
        torch.testing.assert_close(hf[0][k], hf[1][k], rtol=1e-4, atol=1e-6, msg=k)

"""framework.memory (the per-GPU memory math) and framework.plan (validate + size a config)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from framework import memory, stages
from framework.config import CONF_DIR, ConfigError
from framework.model.gpt import ModelConfig, num_params
from framework.model.moe import MoEConfig
from framework.perf import peak_flops
from framework.plan import make_plan, render, resolve_world_size
from tests.helpers import make_cfg

GIB = 2**30

GPT2 = ModelConfig(
    name="gpt2-124m", n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024
)

# The brief's GPT-3 175B run with a global batch that 1024 data-parallel ranks can split
# (2048 = 2 x 1 x 1024; GPT-3's own 1536 is refused, see test_gpt3_batch_1536_on_1024_gpus_refused).
GPT3_175B = [
    "model=gpt3-175b",
    "strategy=zero3",
    "plan.gpu=h100",
    "trainer.seq_len=2048",
    "trainer.micro_batch_size=1",
    "trainer.global_batch_size=2048",
    "strategy.activation_checkpointing=full",
]


# -- memory math -----------------------------------------------------------------------------------


def test_block_matrices_of_gpt2_124m():
    # 12 layers x (q, k, v, o: 4 C^2 + fc, proj: 8 C^2) = 12 x 12 x 768^2.
    assert memory.block_matrix_params(GPT2) == 12 * 12 * 768**2 == 84_934_656
    # tp=4 splits those, the (tied) token embedding along the vocabulary, the colwise biases
    # (q, k, v: 3 x 768, fc: 3072 per layer) and, under sequence parallel, the position table;
    # norms and the o / proj biases stay whole on every rank (as framework/parallel/tp.py does).
    split = 84_934_656 + 50257 * 768 + 12 * (3 * 768 + 3072) + 1024 * 768
    assert memory.params_per_tp_rank(GPT2, 4) == split / 4 + (124_439_808 - split)
    no_sp = split - 1024 * 768
    assert memory.params_per_tp_rank(GPT2, 4, False) == no_sp / 4 + (124_439_808 - no_sp)
    assert memory.params_per_tp_rank(GPT2, 1) == 124_439_808


def test_gqa_block_matrices_use_kv_width():
    llama = ModelConfig(
        style="llama", n_layer=2, n_head=8, n_kv_head=2, n_embd=256, ffn_hidden=512, bias=False
    )
    kv = 2 * 32
    assert memory.block_matrix_params(llama) == 2 * (2 * 256 * 256 + 2 * 256 * kv + 3 * 256 * 512)


def test_state_bytes_total_16_per_param_in_every_layout():
    for precision in ("fp32", "bf16", "fp16", "fp8"):
        for strategy in ("single", "ddp", "zero1", "zero2", "zero3", "fsdp", "tp", "tp_fsdp"):
            sb = memory.state_bytes(precision, strategy)
            assert sb.param + sb.grad + sb.optimizer == 16, (precision, strategy)
    # DeepSpeed mixed precision: bf16 weights and grads, fp32 master + m + v in the optimizer.
    assert memory.state_bytes("bf16", "zero3") == memory.StateBytes(2, 2, 12, 2)
    # torch-native autocast: the fp32 weights are the master; compute (activations) is bf16.
    assert memory.state_bytes("bf16", "fsdp") == memory.StateBytes(4, 4, 8, 2)
    assert memory.state_bytes("fp32", "zero1") == memory.StateBytes(4, 4, 8, 4)


@pytest.mark.parametrize(
    "strategy, expected",
    [
        ("single", (1, 1, 1)),
        ("ddp", (1, 1, 1)),
        ("tp", (1, 1, 1)),
        ("zero1", (1, 1, 8)),
        ("zero2", (1, 8, 8)),
        ("zero3", (8, 8, 8)),
        ("fsdp", (8, 8, 8)),
        ("tp_fsdp", (8, 8, 8)),
    ],
)
def test_dp_sharding_by_strategy(strategy, expected):
    assert tuple(vars(memory.dp_shards(strategy, dp=8)).values()) == expected


def test_hsdp_shards_within_groups():
    # 8 dp ranks as 2 replicas of 4-way shard groups: each rank holds a quarter.
    assert memory.dp_shards("fsdp", dp=8, hsdp_replicas=2) == memory.Shards(4, 4, 4)


def test_activations_match_korthikanti_for_gpt2_shapes():
    # Korthikanti et al. 2022: sbh(34 + 5as/h) bytes per layer with 16-bit activations and
    # dropout; SDPA stores no (T x T) scores, so 5as/h becomes the fp32 log-sum-exp (4 a s b).
    m = ModelConfig(n_layer=1, n_head=16, n_embd=1024, dropout=0.1, block_size=2048)
    s, b, h, a = 2048, 4, 1024, 16
    assert memory.layer_activation_bytes(m, s, b, "none") == s * b * h * 34 + 4 * a * s * b
    # Tensor parallel without sequence parallel: sbh(10 + 24/t) (their eq. 4), lse split too.
    t = 4
    assert memory.layer_activation_bytes(
        m, s, b, "none", tp=t, sequence_parallel=False
    ) == pytest.approx(s * b * h * (10 + 24 / t) + 4 * a * s * b / t)
    # With sequence parallel everything is split: sbh * 34 / t (their eq. 5).
    assert memory.layer_activation_bytes(m, s, b, "none", tp=t) == pytest.approx(
        (s * b * h * 34 + 4 * a * s * b) / t
    )
    # Full recomputation keeps only the block input: 2sbh (2sbh/t under sequence parallel).
    assert memory.layer_activation_bytes(m, s, b, "full") == 2 * s * b * h
    assert memory.layer_activation_bytes(m, s, b, "full", tp=t) == 2 * s * b * h / t


def test_activation_modes_are_ordered_and_linear_in_micro_batch():
    per_mode = {mode: memory.activation_bytes(GPT2, 1024, 8, mode) for mode in memory.AC_MODES}
    assert per_mode["full"] < per_mode["selective"] < per_mode["none"]
    # Everything stored scales with the tokens of the micro-batch.
    for mode in memory.AC_MODES:
        assert memory.activation_bytes(GPT2, 1024, 16, mode) == pytest.approx(2 * per_mode[mode])
    with pytest.raises(ValueError, match="bogus"):
        memory.layer_activation_bytes(GPT2, 1024, 1, "bogus")


def test_full_checkpointing_adds_one_block_recompute_and_loss():
    s, b = 1024, 2
    layers = GPT2.n_layer * 2 * s * b * 768
    recompute = memory.layer_activation_bytes(GPT2, s, b, "none")
    final_norm = s * b * 768 * (2 + 2)  # its input (stream) and output (compute dtype)
    loss = s * b * 50257 * (4 + 8)  # saved fp32 log-softmax + two fp32 gradients in backward
    assert memory.activation_bytes(GPT2, s, b, "full") == layers + recompute + final_norm + loss


def test_fp32_stream_under_autocast_costs_more():
    # single/ddp/tp: autocast over fp32 weights keeps an fp32 residual stream and casts the
    # norm output once per linear; sharded strategies compute with 16-bit weights.
    assert memory.stream_bytes("bf16", "single") == 4
    assert memory.stream_bytes("bf16", "zero2") == memory.stream_bytes("bf16", "fsdp") == 2
    assert memory.stream_bytes("fp32", "fsdp") == 4
    s, b, C, F = 1024, 1, 768, 3072
    lse = 12 * 4
    # gpt2, none: norm inputs 2 x 4C, casts (q, k, v, fc) 4 x 2C, q/k/v/out 4 x 2C, hidden 2 x 2F.
    expected = s * b * (8 * C + 8 * C + 8 * C + 4 * F + lse)
    assert memory.layer_activation_bytes(GPT2, s, b, "none", stream=4) == expected


def _saved_for_backward(m: ModelConfig, batch: int, seq_len: int, dtype: torch.dtype) -> int:
    """Bytes of the (non-parameter) tensors autograd saves in one forward on CPU."""
    from framework.model.gpt import GPT

    torch.manual_seed(0)
    model = GPT(m)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, m.vocab_size, (batch, seq_len + 1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            model(ids[:, :-1], ids[:, 1:])
    return sum(saved.values())


SPARSE = {
    "dense": MoEConfig(),
    "moe": MoEConfig(num_experts=8, top_k=2, expert_hidden=96),
    # a shared expert, every other block sparse (the plan averages over the blocks)
    "moe-shared-every2": MoEConfig(num_experts=8, top_k=3, expert_hidden=64, shared_experts=1, every=2),
}


@pytest.mark.parametrize("style", ["gpt2", "llama"])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("sparse", list(SPARSE))
def test_activation_model_matches_what_autograd_saves(style, precision, sparse):
    # GQA (4 heads, 2 kv heads) and SwiGLU included; batch x seq chosen so that no activation
    # has a weight's shape. The sparse MLPs were once planned at the dense width: 4% to 29% under
    # what autograd keeps for these shapes.
    m = ModelConfig(
        style=style, n_layer=3, n_head=4, n_kv_head=2, n_embd=128, vocab_size=256, block_size=128,
        multiple_of=32, bias=style == "gpt2", tie_embeddings=style == "gpt2", moe=SPARSE[sparse],
    )  # fmt: skip
    B, T = 4, 96
    a = 4 if precision == "fp32" else 2
    r = memory.stream_bytes(precision, "single")
    planned = (
        m.n_layer * memory.layer_activation_bytes(m, T, B, "none", compute_bytes=a, stream=r)
        + B * T * m.n_embd * (r + a)  # final norm
        + B * T * m.vocab_size * memory.LOSS_SAVED_BYTES
        + memory.weight_copies_bytes(m, 1, "single", precision)  # autocast's weight casts
    )
    real = _saved_for_backward(m, B, T, torch.bfloat16 if precision == "bf16" else torch.float32)
    # Left out of the plan: norm statistics, RoPE tables, token ids (about 2% for llama).
    assert real == pytest.approx(planned, rel=0.03)
    assert real >= planned


def test_weight_copies():
    assert memory.weight_copies_bytes(GPT2, 1, "zero2", "bf16") == 0  # DeepSpeed: bf16 weights
    assert memory.weight_copies_bytes(GPT2, 1, "single", "fp32") == 0  # nothing to cast
    # autocast caches a bf16 copy of every matrix: blocks and the (tied) head.
    assert memory.weight_copies_bytes(GPT2, 1, "ddp", "bf16") == (84_934_656 + 50257 * 768) * 2
    block = memory.block_params_per_tp_rank(GPT2, 1)
    # a block: q, k, v, o (4 C^2 + 4 C), fc and proj (8 C^2 + 5 C), two LayerNorms (4 C)
    assert block == 12 * 768**2 + 13 * 768
    root = 50257 * 768 + 1024 * 768 + 2 * 768  # the root unit: embeddings and the final norm
    assert memory.weight_copies_bytes(GPT2, 1, "fsdp", "bf16") == (3 * block + root) * 2
    # Not resharding after forward keeps the whole unsharded model from forward to backward.
    kept = memory.weight_copies_bytes(GPT2, 1, "fsdp", "bf16", reshard_after_forward=False)
    assert kept == (num_params(GPT2) + block) * 2


def test_step_time():
    # 1e18 FLOP on 100 GPUs of 1e15 FLOP/s at 50% MFU: 1e18 / 5e16 = 20 s.
    assert memory.step_time_s(1e12, 1_000_000, 100, 1e15, 0.5) == pytest.approx(20.0)


def test_every_gpu_has_a_peak_in_perf():
    for name, gpu in memory.GPUS.items():
        assert peak_flops(gpu.device_name), name
    assert peak_flops(memory.GPUS["h100"].device_name) == 989e12


# -- the plan --------------------------------------------------------------------------------------


def test_gpt3_175b_on_1024_h100_fits_with_zero_paper_numbers():
    p = make_plan(make_cfg(GPT3_175B), 1024)
    n = num_params(make_cfg(GPT3_175B).model)
    assert 174e9 < n < 176e9
    assert (p.dp, p.tp, p.grad_accum) == (1024, 1, 2)
    # ZeRO-3: bf16 weights and grads, fp32 master + m + v, all sharded over 1024 ranks.
    assert p.params_bytes == pytest.approx(n * 2 / 1024)
    assert p.params_bytes / GIB == pytest.approx(175e9 * 2 / 1024 / GIB, rel=0.01)
    assert p.grads_bytes == pytest.approx(n * 2 / 1024)
    assert p.optimizer_bytes == pytest.approx(n * 12 / 1024)
    # Full checkpointing keeps 96 block inputs (2 s h bytes each) + one block's recompute + logits.
    assert 4.5 * GIB < p.activations_bytes < 8 * GIB
    assert p.activations_by_mode_bytes["full"] == p.activations_bytes
    # Without checkpointing one micro-batch of 2048 tokens would not fit an 80 GiB H100.
    assert p.activations_by_mode_bytes["none"] > 72 * GIB
    assert p.memory_bytes / GIB < 80 * memory.FIT_FRACTION
    assert p.fits
    # 6N + 12 L H Q T FLOP/token; 2048 x 2048 tokens per step at 45% of 989 TFLOP/s on 1024 GPUs.
    assert p.flops_per_token == pytest.approx(1.0728e12, rel=1e-3)
    assert p.tokens_per_step == 2048 * 2048
    # Full checkpointing recomputes the blocks' forward: a third of their share of the work.
    base = p.flops_per_token * 2048 * 2048 / (1024 * 989e12 * 0.45)
    _, head = stages.block_costs(make_cfg(GPT3_175B).model, 2048)
    assert p.compute_s == pytest.approx(base * (1 + 96 / (3 * (96 + head))))
    # ZeRO-3 over 1024 ranks gathers every weight (bf16) before forward and again before
    # backward, for each of the 2 micro-batches, across nodes: ~1.4 TB per rank and step at
    # 50 GB/s dwarfs the compute.
    assert p.comm_bytes["zero_all_gather"] == pytest.approx(2 * 2 * n * 2 * 1023 / 1024)
    assert p.comm_bytes["zero_reduce_scatter"] == pytest.approx(2 * n * 2 * 1023 / 1024)
    assert p.comm_s > 2 * p.compute_s
    assert p.step_time_s == pytest.approx(p.compute_s + p.comm_s)  # no pipeline, no bubble
    summary = p.summary()
    assert summary["memory_gib"] == pytest.approx(p.memory_bytes / GIB, abs=1e-3)
    assert summary["fits"] is True
    assert "fits" in render(p, make_cfg(GPT3_175B))


def test_gpt3_175b_without_sharding_does_not_fit():
    cfg = make_cfg([*GPT3_175B, "strategy=ddp"])
    p = make_plan(cfg, 1024)
    assert p.memory_bytes / GIB > 16 * 174e9 / GIB  # 16 bytes/param replicated: ~2.6 TiB
    assert not p.fits
    assert "DOES NOT FIT" in render(p, cfg)


def test_zero_stages_shard_progressively():
    plans = {
        s: make_plan(
            make_cfg(
                [
                    "model=gpt2-1.3b",
                    f"strategy={s}",
                    "precision=bf16",
                    "trainer.seq_len=2048",
                    "trainer.micro_batch_size=4",
                    "trainer.global_batch_size=32",
                ]
            ),
            8,
        )  # fmt: skip
        for s in ("ddp", "zero1", "zero2", "zero3")
    }
    # Optimizer sharded from ZeRO-1, gradients from ZeRO-2, weights from ZeRO-3.
    assert plans["zero1"].optimizer_bytes == pytest.approx(plans["zero2"].optimizer_bytes)
    assert plans["zero1"].grads_bytes == pytest.approx(8 * plans["zero2"].grads_bytes)
    assert plans["zero2"].params_bytes == pytest.approx(8 * plans["zero3"].params_bytes)
    totals = [plans[s].memory_bytes for s in ("ddp", "zero1", "zero2", "zero3")]
    assert totals == sorted(totals, reverse=True)


def test_tp_fsdp_divides_tp_split_params_by_tp_and_everything_by_dp():
    cfg = make_cfg(["model=gpt3-13b", "strategy=tp_fsdp", "strategy.tp=8", "precision=bf16",
                    "trainer.seq_len=2048", "trainer.micro_batch_size=1",
                    "trainer.global_batch_size=16"])  # fmt: skip
    p = make_plan(cfg, 64)
    assert (p.dp, p.tp) == (8, 8)
    local = memory.params_per_tp_rank(cfg.model, 8)
    assert local < num_params(cfg.model) / 8 * 1.01  # only norms and row biases stay whole
    assert p.params_bytes == pytest.approx(local * 4 / 8)  # fp32 weights (autocast), over 8 dp ranks


def test_precision_auto_plans_as_bf16():
    p = make_plan(make_cfg(["model=gpt2-124m", "trainer.seq_len=1024"]), 1)
    assert p.precision == "bf16"


@pytest.mark.parametrize(
    "overrides, world, needles",
    [
        (["strategy=tp_fsdp", "strategy.tp=4"], 6, ["world size 6", "strategy.tp=4", "6/4"]),
        (["strategy=tp", "strategy.tp=2"], 1, ["world size 1", "strategy.tp=2", "whole number >= 1"]),
        (["model=gpt2-124m", "strategy=tp", "strategy.tp=8"], 8, ["model.n_head=12", "strategy.tp=8"]),
        (
            ["model=llama-1b", "strategy=tp_fsdp", "strategy.tp=8"],
            16,
            ["model.n_kv_head=4", "strategy.tp=8"],
        ),
        (
            ["strategy=ddp", "trainer.micro_batch_size=4", "trainer.global_batch_size=24"],
            4,
            [
                "trainer.global_batch_size=24",
                "trainer.micro_batch_size=4",
                "data-parallel degree 4",
                "16 or 32",
            ],
        ),
        (["precision=fp8", "plan.gpu=a100"], 1, ["precision=fp8", "plan.gpu=a100"]),
        (["strategy=zero2", "strategy.tp=2"], 4, ["strategy.tp=2", "strategy=zero2", "tp_fsdp"]),
        (["strategy=zero3", "strategy.hsdp_replicas=2"], 4, ["strategy.hsdp_replicas=2", "fsdp"]),
        (
            ["strategy=fsdp", "strategy.hsdp_replicas=3", "trainer.global_batch_size=48"],
            4,
            ["strategy.hsdp_replicas=3", "data-parallel degree 4"],
        ),  # fmt: skip
        (["strategy=ddp", "strategy.zero_offload=true"], 2, ["strategy.zero_offload"]),
        (["plan.gpu=tpu-v5"], 1, ["plan.gpu='tpu-v5'"]),
        (["plan.mfu=1.5"], 1, ["plan.mfu=1.5"]),
        (["strategy=single"], 2, ["strategy=single", "world size is 2"]),
        (
            ["plan.gpus_per_node=0", "plan.inter_node_gbps=-1"],
            1,
            ["plan.gpus_per_node=0", "plan.inter_node_gbps=-1"],
        ),
        (["plan.search=true", "plan.dry_run=true"], 1, ["plan.search=true", "plan.dry_run=true"]),
    ],
)
def test_impossible_configs_are_refused_naming_the_keys(overrides, world, needles):
    with pytest.raises(ConfigError) as e:
        make_plan(make_cfg(overrides), world)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_gpt3_batch_1536_on_1024_gpus_refused():
    # GPT-3 trained with 1536 sequences per step, but 1024 pure data-parallel ranks cannot split
    # them evenly (1.5 per rank): the plan says so and names the nearest batches that work.
    with pytest.raises(ConfigError) as e:
        make_plan(make_cfg([*GPT3_175B, "trainer.global_batch_size=1536"]), 1024)
    assert "trainer.global_batch_size=1536" in str(e.value)
    assert "1024 or 2048" in str(e.value)


def test_fp8_plan_on_hopper_is_accepted():
    p = make_plan(make_cfg(["precision=fp8", "plan.gpu=h200"]), 1)
    assert p.gpu_memory_gib == 141


def test_world_size_from_plan_then_env_then_one():
    assert resolve_world_size(16, {"WORLD_SIZE": "8"}) == 16
    assert resolve_world_size(None, {"WORLD_SIZE": "8"}) == 8
    assert resolve_world_size(None, {}) == 1
    with pytest.raises(ConfigError, match="WORLD_SIZE='x'"):
        resolve_world_size(None, {"WORLD_SIZE": "x"})


def test_plan_main_in_process_touches_no_cuda(monkeypatch, capsys):
    from framework import plan

    monkeypatch.setattr(sys, "argv", ["fw-plan", *GPT3_175B, "plan.world_size=1024"])
    plan.main()
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["fits"] is True and last["world_size"] == 1024
    assert last["memory_gib"] == pytest.approx(
        last["params_gib"] + last["grads_gib"] + last["optimizer_gib"] + last["weight_copies_gib"]
        + last["unsharded_grads_gib"] + last["activations_gib"],
        abs=1e-3,
    )  # fmt: skip
    assert torch.cuda.is_initialized() is False


@pytest.mark.parametrize("flavor", sorted(p.stem for p in (Path(CONF_DIR) / "model").glob("*.yaml")))
def test_counts_match_a_meta_device_build(flavor):
    # The plan counts from the config alone; every shipped flavor, built on the meta device
    # (no memory), must have exactly those parameters and block matrices (a mixture of experts'
    # stacked experts are 3-D; its stacked biases are not matrices).
    from framework.model.gpt import GPT

    m = make_cfg([f"model={flavor}"]).model
    with torch.device("meta"):
        model = GPT(m)
    assert sum(p.numel() for p in model.parameters()) == num_params(m)
    matrices = sum(
        p.numel()
        for name, p in model.named_parameters()
        if name.startswith("blocks.") and p.dim() >= 2 and not name.endswith("bias")
    )
    assert matrices == memory.block_matrix_params(m)


def test_zero_offload_moves_the_optimizer_off_the_gpu():
    base = ["model=gpt2-1.3b", "strategy=zero2", "trainer.global_batch_size=128"]
    on_gpu = make_plan(make_cfg(base), 8)
    offloaded = make_plan(make_cfg([*base, "strategy.zero_offload=true"]), 8)
    assert on_gpu.optimizer_bytes == pytest.approx(num_params(make_cfg(base).model) * 12 / 8)
    assert offloaded.optimizer_bytes == 0
    assert offloaded.memory_bytes == pytest.approx(on_gpu.memory_bytes - on_gpu.optimizer_bytes)


def test_trainer_peak_flops_overrides_the_gpu_table():
    p = make_plan(make_cfg(["trainer.peak_flops=5e14"]), 1)
    assert p.peak_flops == 5e14
    assert p.step_time_s == pytest.approx(p.flops_per_token * p.tokens_per_step / (5e14 * 0.45))

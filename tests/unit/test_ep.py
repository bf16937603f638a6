"""Expert parallelism without processes: the config checks of strategy.ep, the (edp, ep) mesh,
the dispatch arithmetic of ep.py on one process, and the plan's per-rank expert memory and
all-to-all bytes (framework/memory.py)."""

from __future__ import annotations

import pytest
import torch

from framework.config import ConfigError, Layout, validate
from tests.helpers import make_cfg

MOE = ["model=debug-moe", "trainer.micro_batch_size=1", "trainer.global_batch_size=8"]


def refused(overrides: list[str], world: int) -> str:
    with pytest.raises(ConfigError) as e:
        validate(make_cfg(overrides), world, launched=True)
    return str(e.value)


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_ep_is_valid_for_fsdp_and_ddp_when_it_divides_experts_and_dp(strategy):
    validate(make_cfg([*MOE, f"strategy={strategy}", "strategy.ep=2"]), 4, launched=True)
    validate(make_cfg([*MOE, f"strategy={strategy}", "strategy.ep=4"]), 4, launched=True)


@pytest.mark.parametrize(
    ("overrides", "world", "names"),
    [
        (["strategy=fsdp", "strategy.ep=3"], 6, ["model.moe.num_experts=4", "strategy.ep=3"]),
        (["strategy=fsdp", "strategy.ep=4"], 2, ["strategy.ep=4", "data-parallel degree 2"]),
        (["strategy=zero3", "strategy.ep=2"], 2, ["strategy=zero3", "use strategy=fsdp"]),
        (["strategy=single", "strategy.ep=2"], 1, ["strategy=fsdp or ddp"]),
        (["strategy=tp_fsdp", "strategy.tp=2", "strategy.ep=2"], 4, ["strategy=tp_fsdp"]),
        (["strategy=fsdp", "strategy.hsdp_replicas=2", "strategy.ep=2"], 4, ["hsdp_replicas=2"]),
        (
            ["strategy=fsdp", "strategy.ep=2", "strategy.activation_checkpointing=selective"],
            2,
            ["activation_checkpointing=full"],
        ),
    ],
)
def test_ep_refusals_name_the_keys(overrides, world, names):
    msg = refused([*MOE, *overrides], world)
    for name in names:
        assert name in msg, msg


def test_ep_on_a_dense_model_is_refused():
    msg = refused(["strategy=fsdp", "strategy.ep=2", "trainer.global_batch_size=32"], 2)
    assert "strategy.ep=2" in msg and "model.moe.num_experts=0" in msg


def test_expert_mesh_is_the_dp_dimension_with_ep_innermost():
    """Over a fake 8-rank group (this process is rank 5), fsdp with ep=2: the ep group is two
    neighbouring dp ranks, the edp group the four ranks holding the same experts."""
    import torch.distributed as tdist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from framework.parallel.mesh import build_mesh

    tdist.init_process_group("fake", store=FakeStore(), rank=5, world_size=8)
    try:
        mesh = build_mesh(Layout(dp_shard=8, ep=2), "cpu")
        edp, ep = mesh.experts()
        assert sorted(ep.mesh.flatten().tolist()) == [4, 5]
        assert sorted(edp.mesh.flatten().tolist()) == [1, 3, 5, 7]
        assert mesh.experts()[1] is ep  # made once
        ddp = build_mesh(Layout(dp_replicate=8, ep=8), "cpu")  # ep = dp: one rank per edp group
        edp, ep = ddp.experts()
        assert edp.size() == 1 and ep.size() == 8
    finally:
        tdist.destroy_process_group()


def test_expert_parallel_exchange_on_one_rank_is_the_local_run():
    """run_expert_parallel over a group of one rank (ep=1) must give run_local's rows: the
    count exchange, splits and regrouping are then identities."""
    import torch.distributed as tdist

    from framework.model.moe import Experts, dispatch
    from framework.parallel.ep import run_expert_parallel

    torch.manual_seed(0)
    experts = Experts(4, 16, 32, swiglu=True, bias=False)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, ids = torch.randn(10, 16), torch.randint(0, 4, (10, 2))
    xs, counts, _ = dispatch(x, ids, 4)
    tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    try:
        got = run_expert_parallel(experts, xs, counts, ep=1, group=tdist.group.WORLD)
    finally:
        tdist.destroy_process_group()
    torch.testing.assert_close(got, experts(xs, counts), rtol=0, atol=0)


# -- the plan (framework/memory.py, framework/plan.py) --------------------------------------------


def test_routed_expert_params_of_debug_moe_by_hand():
    """4 blocks x 4 SwiGLU experts of width 128 on n_embd 128, no biases."""
    from framework.memory import routed_expert_params
    from framework.model.gpt import num_params

    m = make_cfg(["model=debug-moe"]).model
    assert routed_expert_params(m) == 4 * 4 * 3 * 128 * 128
    # what the active count leaves out is the other num_experts - top_k experts
    assert num_params(m) - num_params(m, active=True) == routed_expert_params(m) // 2


def test_expert_state_per_rank_under_fsdp_and_ddp():
    """fsdp: dense / dp + experts / ep / (dp / ep) (the total of plain fsdp); ddp: dense whole,
    experts / ep."""
    from framework.memory import params_per_rank

    dense, experts = 100.0, 800.0
    assert params_per_rank(dense + experts, 8, experts, ep=4) == dense / 8 + experts / 8
    assert params_per_rank(dense + experts, 8, experts, ep=8) == dense / 8 + experts / 8
    assert params_per_rank(dense + experts, 1, experts, ep=4) == dense + experts / 4
    assert params_per_rank(dense + experts, 8) == (dense + experts) / 8


def test_all_to_all_bytes_per_step_by_hand():
    """mixtral-8x7b, 4096 tokens per micro-batch, 8 micro-batches, ep=8, bf16: per sparse layer
    (32) dispatch + combine in forward and backward, 7/8 of the 4096 x 2 x 4096 rows leaving."""
    from framework.memory import ep_all_to_all_bytes, ep_buffer_bytes

    m = make_cfg(["model=mixtral-8x7b"]).model
    rows = 4096 * 2 * 4096 * 2
    assert ep_all_to_all_bytes(m, 4096, 1, 8, 8, 2) == 8 * 32 * 4 * rows * 7 / 8
    assert ep_all_to_all_bytes(m, 4096, 1, 8, 8, 2, recompute=True) == 8 * 32 * 6 * rows * 7 / 8
    assert ep_all_to_all_bytes(m, 4096, 1, 8, 1, 2) == 0
    assert ep_buffer_bytes(m, 4096, 1, 2) == 2 * rows


@pytest.mark.parametrize(
    ("strategy", "world", "ep"), [("fsdp", 64, 8), ("ddp", 64, 8), ("fsdp", 16, 16)]
)
def test_dry_run_of_expert_parallel_agrees_with_the_plan(strategy, world, ep):
    """plan.dry_run builds the real layout on meta over a fake group of `world` ranks: each
    rank's local shards of mixtral-8x7b (fsdp ep=8 on 64: the one expert per rank sharded
    along its width over the 8 ranks holding it) weigh what the plan says within 2%."""
    from framework.plan import dry_run, make_plan

    model = "model=mixtral-8x7b" if ep == 8 else "model=olmoe-1b-7b"
    cfg = make_cfg([model, f"strategy={strategy}", f"strategy.ep={ep}", "trainer.seq_len=4096",
                    "trainer.micro_batch_size=1", "trainer.global_batch_size=512"])  # fmt: skip
    plan = make_plan(cfg, world)
    d = dry_run(cfg, world)
    assert d["device"] == "meta"
    assert d["weight_bytes_per_rank"] == pytest.approx(plan.params_bytes, rel=0.02)
    assert d["params_per_rank"] == pytest.approx(plan.params_per_gpu, rel=0.02)
    # and ep counted: without it a ddp rank would hold all 46.7 B parameters
    assert plan.params_per_gpu < 0.2 * plan.params

"""framework.comm (collectives per step, the link each crosses) and framework.stages (the
pipeline split, placement, bubble and in-flight micro-batches): pure math, hand counts."""

from __future__ import annotations

import itertools

import pytest

from framework import comm, stages
from framework.config import Layout
from framework.estimate import groups
from framework.model.gpt import ModelConfig

# -- ring factors and links ------------------------------------------------------------------------


def test_ring_factors():
    assert comm.ring_factor("all_reduce", 8) == 2 * 7 / 8
    assert comm.ring_factor("all_gather", 8) == comm.ring_factor("reduce_scatter", 8) == 7 / 8
    assert comm.ring_factor("all_to_all", 4) == 3 / 4
    assert comm.ring_factor("send_recv", 2) == 1.0
    assert comm.ring_factor("all_reduce", 1) == 0.0  # a group of one sends nothing
    with pytest.raises(ValueError, match="broadcast"):
        comm.ring_factor("broadcast", 8)
    # bytes = calls x buffer x factor; seconds over the link's bytes/s (gigabits / 8)
    c = comm.Collective("x", "all_gather", 8, 1e9, 3, intra=False, overlap="none")
    assert c.bytes == 3 * 1e9 * 7 / 8
    net = comm.Cluster(gpus_per_node=8, intra_node_gbps=3600, inter_node_gbps=400)
    assert c.seconds(net) == pytest.approx(c.bytes / 50e9)
    assert net.bytes_per_s(True) == 450e9


@pytest.mark.parametrize(
    "stride, size, intra",
    [
        (1, 8, True),  # tp=8 on a node of 8
        (1, 4, True),  # two tp=4 groups per node
        (2, 4, True),  # e.g. cp=4 over tp=2: ranks 0, 2, 4, 6
        (1, 16, False),  # 16 neighbours span two nodes
        (8, 16, False),  # a dp group over tp=8: one rank per node
        (4, 4, False),  # ranks 0, 4, 8, 12: two nodes
        (1, 3, False),  # groups of 3 straddle the node boundary (ranks 6, 7, 8)
        (8, 1, True),  # a group of one crosses nothing
    ],
)
def test_group_is_intra_node(stride, size, intra):
    assert comm.group_is_intra_node(stride, size, 8) is intra


def test_layout_groups_pick_their_links():
    # tp=8 x pp=8 x dp=16 on nodes of 8: tensor parallel inside each node, data parallel and
    # pipeline across nodes (ranks row-major, tp innermost: framework.config.Layout)
    g = groups(Layout(pp=8, dp_replicate=1, dp_shard=16, cp=1, tp=8), 8)
    assert g["tp"] == (8, True)
    assert g["fsdp"] == (16, False) and g["dp"] == (16, False)
    assert g["pp"] == (8, False)
    # HSDP with shard groups of 8 (tp=1): shards inside a node, replicas across nodes
    g = groups(Layout(pp=1, dp_replicate=8, dp_shard=8, cp=1, tp=1), 8)
    assert g["fsdp"] == (8, True) and g["replicate"] == (8, False)
    # cp=2 over tp=4: one node; the FSDP group spans dp_shard x cp
    g = groups(Layout(pp=1, dp_replicate=1, dp_shard=4, cp=2, tp=4), 8)
    assert g["cp"] == (2, True) and g["fsdp"] == (8, False)


# -- what each technique moves -------------------------------------------------------------------

B, T, C, V = 2, 512, 256, 1000
X = B * T * C  # elements of one (B, T, C) activation


def _tp_shape(**kw) -> comm.TpShape:
    args = dict(tokens=B * T, n_embd=C, vocab=V, colwise_inputs=4, stream_bytes=2, compute_bytes=2,
                norm_params=3 * C)  # fmt: skip
    return comm.TpShape(**{**args, **kw})


def _by_name(colls):
    out = {}
    for c in colls:
        out[c.name] = out.get(c.name, 0.0) + c.bytes
    return out


def test_tp_layer_bytes_against_a_hand_count():
    # One GPT-2 block (q, k, v, fc: 4 column-parallel inputs), one micro-batch, tp=4, bf16,
    # sequence parallel, no root modules: forward all-gathers x before attention and MLP and
    # reduce-scatters after wo and w2; backward all-gathers the two output gradients and
    # all-reduces the input gradient of each of the 4 column-parallel linears.
    colls = comm.tp(_tp_shape(), 4, True, layers=1, micro_batches=1, sequence_parallel=True,
                    recompute=False, first_stage=False, last_stage=False)  # fmt: skip
    got = _by_name(colls)
    assert got["tp_all_gather"] == (2 + 2) * X * 2 * 3 / 4
    assert got["tp_reduce_scatter"] == 2 * X * 2 * 3 / 4
    assert got["tp_all_reduce"] == 4 * X * 2 * (2 * 3 / 4)
    assert got["tp_norm_grads"] == 3 * C * 4 * (2 * 3 / 4)  # fp32, once per step
    # Megatron's count (2 all-gathers + 2 reduce-scatters each way) would be 8 x X x 2 x 3/4;
    # our per-linear all-reduces make the block's traffic 1.75 x that
    total = got["tp_all_gather"] + got["tp_reduce_scatter"] + got["tp_all_reduce"]
    assert total == pytest.approx(1.75 * 8 * X * 2 * 3 / 4)
    # Without sequence parallel: 2 all-reduces forward and the same 4 backward.
    no_sp = _by_name(comm.tp(_tp_shape(), 4, True, layers=1, micro_batches=1,
                             sequence_parallel=False, recompute=False, first_stage=False,
                             last_stage=False))  # fmt: skip
    assert no_sp == {"tp_all_reduce": 6 * X * 2 * (2 * 3 / 4)}
    # Checkpointing replays the forward up to wo: 2 all-gathers + 1 reduce-scatter more (SP).
    rc = _by_name(comm.tp(_tp_shape(), 4, True, layers=1, micro_batches=1, sequence_parallel=True,
                          recompute=True, first_stage=False, last_stage=False))  # fmt: skip
    assert rc["tp_all_gather"] - got["tp_all_gather"] == 2 * X * 2 * 3 / 4
    assert rc["tp_reduce_scatter"] - got["tp_reduce_scatter"] == X * 2 * 3 / 4
    # An fp32 stream (autocast over fp32 weights) doubles what carries the stream: the forward
    # all-gathers and the backward all-reduces of the input gradients.
    fp32 = _by_name(comm.tp(_tp_shape(stream_bytes=4), 4, True, layers=1, micro_batches=1,
                            sequence_parallel=True, recompute=False, first_stage=False,
                            last_stage=False))  # fmt: skip
    assert fp32["tp_all_gather"] == (2 * 4 + 2 * 2) * X * 3 / 4
    assert fp32["tp_all_reduce"] == 2 * got["tp_all_reduce"]


def test_tp_root_modules():
    # The embedding reduce-scatters its output (all-gathers its gradient); the head gathers
    # its input (reduce-scatters the gradient) and the logits (B, T, V); per micro-batch.
    both = _by_name(comm.tp(_tp_shape(), 2, True, layers=0, micro_batches=3, sequence_parallel=True,
                            recompute=False))  # fmt: skip
    assert both["tp_all_gather"] == 3 * (X * 2 + X * 2 + B * T * V * 2) * 1 / 2
    assert both["tp_reduce_scatter"] == 3 * (X * 2 + X * 2) * 1 / 2


def test_fsdp_ddp_zero_bytes():
    P, n = 1e9, 8
    # FSDP: gathers in bf16 as counted by the caller, fp32 reduce-scatter once, HSDP all-reduce
    colls = comm.fsdp(3 * P, 2 * P, P, n, False, param_bytes=2, replicas=4)
    got = _by_name(colls)
    assert got["fsdp_all_gather"] == 5 * P * 2 * 7 / 8
    assert got["fsdp_reduce_scatter"] == P * 4 * 7 / 8
    assert got["hsdp_all_reduce"] == P * 4 / 8 * 2 * 3 / 4  # this rank's fp32 shard
    # DDP: one fp32 all-reduce per step
    assert _by_name(comm.ddp(P, n, True)) == {"ddp_all_reduce": P * 4 * 2 * 7 / 8}
    # ZeRO: bf16 weights and gradients; stage 2 reduces per micro-batch, stage 3 also gathers
    # twice per micro-batch
    z1 = _by_name(comm.zero(1, P, n, False, micro_batches=4))
    z2 = _by_name(comm.zero(2, P, n, False, micro_batches=4))
    z3 = _by_name(comm.zero(3, P, n, False, micro_batches=4))
    assert z1 == {"zero_reduce_scatter": P * 2 * 7 / 8, "zero_all_gather": P * 2 * 7 / 8}
    assert z2["zero_reduce_scatter"] == 4 * z1["zero_reduce_scatter"]
    assert z3 == {"zero_all_gather": 2 * 4 * P * 2 * 7 / 8, "zero_reduce_scatter": 4 * P * 2 * 7 / 8}
    with pytest.raises(ValueError, match="stage 4"):
        comm.zero(4, P, n, False, micro_batches=1)


def test_pipeline_expert_context_bytes():
    act = B * T * C * 2
    (pp,) = comm.pipeline_p2p(act, False, micro_batches=8, sends_per_micro_batch=2)
    assert pp.bytes == 8 * 2 * act  # a middle stage: one send each way per micro-batch
    # experts: tokens x top_k x hidden, dispatch + combine in forward and backward, (ep-1)/ep
    (ep,) = comm.expert_all_to_all(B * T, 2, C, 8, sparse_layers=3, intra=True, micro_batches=5)
    assert ep.bytes == 5 * 3 * 4 * B * T * 2 * C * 2 * 7 / 8
    # Ulysses: q, k, v in and the output back, forward and backward (GQA: k, v narrower)
    (u,) = comm.context_parallel("ulysses", B * T, C, C // 4, 4, 2, True, micro_batches=1)
    assert u.bytes == 2 * 2 * (2 * C + 2 * C // 4) * B * T * 2 * 3 / 4
    # ring: K and V around cp-1 hops per layer forward, twice that backward
    (r,) = comm.context_parallel("ring", B * T, C, C // 4, 4, 2, True, micro_batches=1)
    assert r.bytes == 2 * 3 * 3 * 2 * (C // 4) * B * T * 2
    with pytest.raises(ValueError, match="striped"):
        comm.context_parallel("striped", 1, 1, 1, 2, 1, True, micro_batches=1)


# -- pipeline stages -----------------------------------------------------------------------------


def test_bubble_formulas():
    p, m = 4, 8
    assert stages.bubble_ratio(p, m, "1f1b") == stages.bubble_ratio(p, m, "gpipe") == 3 / 8
    assert stages.bubble_fraction(p, m, "1f1b") == pytest.approx(3 / 11)  # (p-1)/(m+p-1)
    assert stages.bubble_ratio(p, m, "interleaved_1f1b", 2) == 3 / 16  # divided by v
    assert stages.bubble_ratio(p, m, "interleaved_1f1b", 4) == 3 / 32
    assert stages.bubble_ratio(p, m, "zero_bubble", 2) == pytest.approx(3 / 48)  # a third
    assert stages.bubble_ratio(p, m, "dualpipev") == pytest.approx(3 / 24)
    assert stages.bubble_ratio(1, m, "1f1b") == 0.0
    with pytest.raises(ValueError, match="looped"):
        stages.bubble_ratio(p, m, "looped")


def test_in_flight_and_least_micro_batches():
    assert stages.in_flight(4, 16, "1f1b") == 4  # the first stage holds p
    assert stages.in_flight(4, 16, "1f1b", rank=3) == 1
    assert stages.in_flight(4, 16, "gpipe") == 16  # every forward before any backward
    assert stages.in_flight(4, 16, "interleaved_1f1b", 2) == 4 + 3 / 2  # p + (p-1)/v
    assert stages.in_flight(4, 16, "dualpipev") == 4.5
    assert stages.in_flight(8, 4, "interleaved_1f1b", 2) == 4  # never more than m
    assert stages.in_flight(1, 16, "1f1b") == 1
    assert stages.min_micro_batches(4, "1f1b") == 4
    assert stages.min_micro_batches(4, "gpipe") == 1
    assert stages.min_micro_batches(4, "dualpipev") == 8


def test_stage_ranks_looped_and_v():
    assert stages.stage_ranks(4, "1f1b") == [0, 1, 2, 3]
    assert stages.stage_ranks(4, "interleaved_1f1b", 2) == [0, 1, 2, 3, 0, 1, 2, 3]
    assert stages.stage_ranks(4, "dualpipev") == [0, 1, 2, 3, 3, 2, 1, 0]  # head back on rank 0


def _best_max_cost(n_layer: int, n: int, head: float) -> float:
    best = float("inf")
    for cuts in itertools.combinations(range(1, n_layer), n - 1):  # every stage >= 1 block
        counts = [b - a for a, b in zip((0, *cuts), (*cuts, n_layer))]
        best = min(best, max(stages.stage_cost(counts, head)))
    return best


@pytest.mark.parametrize("n_layer, n, head", [(10, 3, 1.5), (12, 4, 5.4), (9, 4, 0.3), (7, 2, 0.0)])
def test_stage_layers_minimise_the_costliest_stage(n_layer, n, head):
    counts = stages.stage_layers(n_layer, n, head_cost=head)
    assert sum(counts) == n_layer and len(counts) == n
    assert max(stages.stage_cost(counts, head)) == pytest.approx(_best_max_cost(n_layer, n, head))


def test_stage_layers_count_the_head_and_honour_pp_layers():
    gpt2 = ModelConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024)
    embed, head = stages.block_costs(gpt2, 1024)
    # 6 V C against 6 x 7.1M + 12 C T per token: GPT-2's head weighs about 4 blocks
    assert embed == 0 and 3.5 < head < 4.5
    assert stages.stage_layers(12, 4, head_cost=head) == [3, 4, 4, 1]  # a stage holds >= 1 block
    assert stages.stage_layers(4, 4, head_cost=head) == [1, 1, 1, 1]  # was [3, 3, 3, 0]: 9 blocks
    # a 50k head is a third of a gpt3-175b block: 96 blocks split evenly over 8 stages
    gpt3 = ModelConfig(n_layer=96, n_head=96, n_embd=12288, vocab_size=50257, block_size=2048)
    assert stages.stage_layers(96, 8, head_cost=stages.block_costs(gpt3, 2048)[1]) == [12] * 8
    # equal costs: the earlier stages (more micro-batches in flight under 1F1B) get fewer
    assert stages.stage_layers(22, 4) == [5, 5, 6, 6]
    assert stages.stage_layers(22, 4, pp_layers=[4, 6, 6, 6]) == [4, 6, 6, 6]
    with pytest.raises(ValueError, match="strategy.pp_layers"):
        stages.stage_layers(22, 4, pp_layers=[5, 5, 5])
    with pytest.raises(ValueError, match="model.n_layer=22"):
        stages.stage_layers(22, 4, pp_layers=[5, 5, 5, 5])

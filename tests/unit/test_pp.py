"""Pipeline parallel without a process group: the cost-balanced split (framework.stages), the stage
placement of each schedule, stage modules (names kept; chained in one process they compute the
whole model), the config checks that name the keys, and the checkpoint layouts."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

from framework.config import ConfigError, grad_accum_steps, pipeline_stages, validate
from framework.dist import Dist
from framework.model.gpt import GPT, ModelConfig
from framework.optim import param_groups
from framework.parallel import build_engine
from framework.parallel.pp import initial_name, plan_stages, stage_module
from framework.stages import block_costs, split, stage_rank
from tests.distributed.pp_harness import global_batch
from tests.helpers import make_cfg

GPT2_124M = ModelConfig(
    name="gpt2-124m", n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024
)
TINY = ["model.n_layer=2", "model.n_embd=64", "model.n_head=4", "model.dropout=0", "trainer.seq_len=32",
        "trainer.micro_batch_size=2", "trainer.global_batch_size=8", "trainer.device=cpu"]  # fmt: skip


# -- the split --------------------------------------------------------------------------------


def test_block_costs_gpt2_124m_by_hand():
    C, T, V = 768, 1024, 50257
    # a block: attention 4 C^2 + 4 C, MLP 8 C^2 + 5 C, two norms 4 C; the final norm (2 C) spread
    per_block = 12 * C * C + 13 * C + 2 * C / 12
    embed, head = block_costs(GPT2_124M, T)
    assert embed == 0
    assert head == pytest.approx(6 * V * C / (6 * per_block + 12 * C * T))
    assert 4 < head < 5  # the 50k head weighs about 4.5 blocks


@pytest.mark.parametrize(
    ("n_stages", "blocks"),
    [
        (1, [12]),
        (2, [8, 4]),  # 8 blocks vs 4 blocks + the head (8.5 blocks)
        (3, [5, 6, 1]),  # max 6 blocks; [6, 5, 1] is as good: the earlier stage gets fewer
        (4, [3, 4, 4, 1]),  # max: the last stage, 1 block + head; the rest as even as they go
        (12, [1] * 12),
    ],
)
def test_balanced_split_counts_the_head(n_stages, blocks):
    assert split(GPT2_124M, 1024, n_stages) == blocks


def test_split_minimises_the_most_loaded_stage_exhaustively():
    """Against brute force over every contiguous split of 9 blocks into 3 stages."""
    import itertools

    m = ModelConfig(n_layer=9, vocab_size=4096, n_embd=64, block_size=64)
    embed, head = block_costs(m, 64)

    def peak(blocks):
        loads = [float(n) for n in blocks]
        loads[0] += embed
        loads[-1] += head
        return max(loads)

    splits = [s for s in itertools.product(range(1, 8), repeat=3) if sum(s) == 9]
    got = split(m, 64, 3)
    assert peak(got) == pytest.approx(min(peak(s) for s in splits))
    assert head > 1 and got[-1] < got[0]  # the heavy head takes blocks off the last stage


def test_pp_layers_override_is_checked():
    assert split(GPT2_124M, 1024, 2, [6, 6]) == [6, 6]
    for bad in ([6, 5], [12, 0], [4, 4, 4]):
        with pytest.raises(ValueError, match=r"strategy.pp_layers=.* sum to model.n_layer=12"):
            split(GPT2_124M, 1024, 2, bad)
    with pytest.raises(ValueError, match=r"13 pipeline stages need at least as many blocks"):
        split(GPT2_124M, 1024, 13)


# -- placement ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "stages", "ranks"),
    [
        ("1f1b", 2, [0, 1]),
        ("gpipe", 2, [0, 1]),
        ("interleaved_1f1b", 4, [0, 1, 0, 1]),  # round-robin
        ("zero_bubble", 4, [0, 1, 0, 1]),
        ("dualpipev", 4, [0, 1, 1, 0]),  # a V: first and last stage on rank 0
    ],
)
def test_stage_placement(schedule, stages, ranks):
    s = make_cfg(["strategy=pp", f"strategy.pp_schedule={schedule}"]).strategy
    assert pipeline_stages(s) == stages
    assert [stage_rank(i, 2, schedule) for i in range(stages)] == ranks


# -- stage modules --------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["debug", "debug-llama"])
def test_stages_keep_names_and_chain_to_the_whole_model(style):
    cfg = make_cfg([*TINY, f"model={style}", "model.n_layer=4", "strategy=pp",
                    "strategy.pp_schedule=interleaved_1f1b"])  # fmt: skip
    torch.manual_seed(0)
    whole = GPT(cfg.model)
    ref = whole.state_dict()
    stages = plan_stages(cfg.model, cfg.strategy, cfg.trainer.seq_len)
    assert [list(s.blocks) for s in stages] == [[0], [1], [2], [3]]
    modules = []
    for st in stages:
        m = stage_module(cfg.model, st)
        m.to_empty(device="cpu")
        with torch.no_grad():
            for name, p in m.named_parameters():
                p.copy_(ref[initial_name(cfg.model, name)])
        m.init_buffers()
        modules.append(m)
    names = [set(m.state_dict()) for m in modules]
    assert set().union(*names) == set(ref) and sum(map(len, names)) == len(ref)  # disjoint
    assert "tok_emb.weight" in names[0] and "lm_head.weight" in names[-1]
    if cfg.model.tie_embeddings:  # the last stage's copy is its own parameter, equal in value
        assert modules[-1].lm_head.weight is not modules[0].tok_emb.weight
        assert torch.equal(modules[-1].lm_head.weight, modules[0].tok_emb.weight)
    windows, _ = global_batch(1, cfg, False)
    x = torch.as_tensor(windows[:2, :-1])
    targets = torch.as_tensor(windows[:2, 1:])
    h = x
    for m in modules[:-1]:
        h = m(h, targets)  # targets reach every stage; only the last one uses them
        assert h.shape == (2, 32, 64)
    torch.testing.assert_close(modules[-1](h), whole(x), rtol=0, atol=0)
    torch.testing.assert_close(modules[-1](h, targets), whole(x, targets), rtol=0, atol=0)


def test_tied_head_copy_gets_no_weight_decay():
    """The single-device model names the tied weight tok_emb.weight (no decay); the last stage's
    copy, lm_head.weight, must get none either, or the two copies would part. An untied head
    is a matrix like any other."""
    for style, decayed in (("debug", False), ("debug-llama", True)):
        cfg = make_cfg([*TINY, "strategy=pp", f"model={style}"])
        last = stage_module(cfg.model, plan_stages(cfg.model, cfg.strategy, cfg.trainer.seq_len)[-1])
        decay, no_decay = param_groups(last, 0.1)
        assert any(p is last.lm_head.weight for p in decay["params"]) == decayed, style
        assert any(p is last.lm_head.weight for p in no_decay["params"]) != decayed, style


# -- config checks --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "world", "expected"),
    [
        (["strategy=zero2", "strategy.pp=2"], 2, r"strategy=zero2 \(DeepSpeed ZeRO\) does not compose "
         r"with strategy.pp=2: use strategy=fsdp .*reshard_after_forward=false is the ZeRO-2 analogue"),
        (["strategy=pp", "trainer.global_batch_size=2"], 2,
         r"strategy.pp_schedule=1f1b needs at least 2 micro-batches per step \(strategy.pp=2\), but "
         r"trainer.global_batch_size=2 / \(trainer.micro_batch_size=2 x data-parallel degree 1\) = 1"),
        (["strategy=pp", "strategy.pp_schedule=dualpipev", "model.n_layer=4",
          "trainer.global_batch_size=6"], 2, r"dualpipev needs at least 4 micro-batches per step \(its 4 stages\)"),
        (["strategy=pp", "strategy.pp_schedule=interleaved_1f1b", "model.n_layer=4",
          "trainer.global_batch_size=6"], 2, r"runs the micro-batches in rounds of strategy.pp=2.* = 3 micro"),
        (["strategy=pp", "strategy.pp_schedule=interleaved_1f1b"], 2,
         r"strategy.pp_schedule=interleaved_1f1b \(2 ranks x 2 stages each\): 4 pipeline stages need at "
         r"least as many blocks: model.n_layer=2"),
        (["strategy=pp", "strategy.pp_layers=[2,1]"], 2, r"strategy.pp_layers=\[2, 1\] must give each"),
        (["strategy=fsdp", "strategy.pp=2"], 3, r"world size 3 is not divisible by strategy.pp=2"),
        (["strategy=tp", "strategy.tp=2", "strategy.pp=2"], 8,
         r"strategy.tp=2 must equal the world size 8 / strategy.pp=2 = 4"),
        (["strategy=pp", "precision=fp16"], 2, r"precision=fp16 .* is not built for strategy.pp=2"),
        (["strategy=pp", "strategy.pp_schedule=zero_bubble", "strategy.compile=true", "model.n_layer=4"],
         2, r"zero_bubble splits each backward .* set strategy.compile=false"),
        (["strategy=pp", "strategy.pp_schedule=dualpipev", "model.n_layer=4",
          "strategy.activation_checkpointing=selective"], 2,
         r"dualpipev runs two backward passes over each block .*strategy.activation_checkpointing=full"),
        (["strategy=pp", "strategy.pp_schedule=dualpipev", "strategy.pp_stages_per_rank=3",
          "model.n_layer=4"], 2, r"strategy.pp_stages_per_rank=3 must be 2"),
        (["strategy=ddp", "strategy.pp_layers=[1,1]"], 2, r"strategy.pp_layers=\[1, 1\] needs strategy.pp > 1"),
        (["strategy=fsdp", "strategy.pp=2", "trainer.global_batch_size=10"], 4,
         r"global_batch_size=10 is not divisible by .* \(world size 4 / strategy.pp=2 x strategy.tp=1\)"),
    ],
)  # fmt: skip
def test_pipeline_config_errors_name_keys(overrides, world, expected):
    with pytest.raises(ConfigError, match=expected):
        validate(make_cfg([*TINY, *overrides]), world)


@pytest.mark.parametrize(
    ("overrides", "world", "dp", "accum"),
    [
        (["strategy=pp"], 2, 1, 4),
        (["strategy=pp"], 4, 2, 2),  # two replicas of a 2-stage pipeline
        (["strategy=fsdp", "strategy.pp=2", "strategy.hsdp_replicas=2"], 4, 2, 2),
        (["strategy=tp", "strategy.tp=2", "strategy.pp=2"], 4, 1, 4),
        (["strategy=tp_fsdp", "strategy.tp=2", "strategy.pp=2"], 8, 2, 2),
        (["strategy=pp", "strategy.pp_schedule=dualpipev", "model.n_layer=4"], 2, 1, 4),
    ],
)
def test_pipeline_layouts_validate(overrides, world, dp, accum):
    cfg = make_cfg([*TINY, *overrides])
    validate(cfg, world)
    assert grad_accum_steps(cfg, world // (cfg.strategy.pp * cfg.strategy.tp)) == accum
    from framework.config import layout

    assert layout(cfg.strategy, world).dp == dp


# -- checkpoints: the optimizer state by name; the per-group layout still loads --------------------


def _trained_single(steps: int, seed: int = 0):
    cfg = make_cfg([*TINY, f"trainer.seed={seed}"])
    engine = build_engine(None, cfg, Dist())
    accum = grad_accum_steps(cfg, 1)
    for step in range(1, steps + 1):
        windows, _ = global_batch(step, cfg, False)
        from framework.data.loader import to_batches

        for b in to_batches(windows, None, cfg.trainer.micro_batch_size, False):
            engine.forward_backward(b, accum)
        engine.step(cfg.optim.lr)
    return engine


def test_checkpoint_optimizer_state_is_keyed_by_name(tmp_path):
    engine = _trained_single(1)
    engine.save(tmp_path / "state")
    from framework.safeload import SafeFileSystemReader

    keys = set(SafeFileSystemReader(tmp_path / "state").read_metadata().state_dict_metadata)
    assert (
        "optim.state.tok_emb.weight.exp_avg" in keys and "optim.param_groups.tok_emb.weight.lr" in keys
    )
    assert not any(k.startswith("optim.param_groups.0.") for k in keys)


def test_checkpoint_in_torchs_per_group_layout_still_loads(tmp_path):
    """A checkpoint as main's code wrote it before the layout changed (TorchEngine._state was
    get_state_dict(model, optimizer), param_groups a list by group index) loads bitwise."""
    old = _trained_single(2)
    msd, osd = get_state_dict(old.plain_model(), old.optimizer)  # the former code path
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path / "old"))
    from framework.safeload import SafeFileSystemReader

    keys = SafeFileSystemReader(tmp_path / "old").read_metadata().state_dict_metadata
    assert any(k.startswith("optim.param_groups.0.") for k in keys)
    new = _trained_single(0, seed=7)  # other weights: the load must replace all of them
    new.load(tmp_path / "old")
    for (name, a), b in zip(
        old.plain_model().state_dict().items(), new.plain_model().state_dict().values()
    ):
        assert torch.equal(a, b), name
    for p, q in zip(old.params, new.params):
        for k, v in old.optimizer.state[p].items():
            assert torch.equal(v, new.optimizer.state[q][k]), k
    assert [g["weight_decay"] for g in new.optimizer.param_groups] == [0.1, 0.0]


# -- the plan's dry run builds the stages -------------------------------------------------------


def test_dry_run_builds_every_pipeline_rank_and_reports_the_most_loaded():
    """pp=2 x fsdp=2 over a fake group of 4 ranks: each pipeline rank's bytes are those of its
    stage module's FSDP shard (rank 0 of its shard group: torch.chunk's rounded-up half), by hand
    from the stage modules; the most loaded (the first stage: embedding + position table against
    the final norm and the tied head's copy) is reported."""
    import math

    from framework.plan import dry_run

    cfg = make_cfg(["strategy=fsdp", "strategy.pp=2", "trainer.micro_batch_size=4"])
    d = dry_run(cfg, 4)
    by_hand = []
    for st in plan_stages(cfg.model, cfg.strategy, cfg.trainer.seq_len):
        params = stage_module(cfg.model, st).parameters()
        by_hand.append(sum(math.ceil(p.shape[0] / 2) * p[0].numel() * 4 for p in params))
    assert d["weight_bytes_per_pp_rank"] == by_hand
    assert d["pp_rank"] == 0 and d["weight_bytes_per_rank"] == max(by_hand) > min(by_hand)


@pytest.mark.parametrize(
    ("model", "schedule", "pp", "seq"),
    [("gpt2-124m", "1f1b", 4, 1024), ("gpt2-124m", "interleaved_1f1b", 2, 256),
     ("gpt2-1.3b", "dualpipev", 2, 2048), ("debug", "zero_bubble", 2, 64)],
)  # fmt: skip
def test_the_plan_sizes_the_split_the_builder_runs(model, schedule, pp, seq):
    """One split for framework.estimate (the plan) and the pipeline builder: a second
    implementation in the plan once gave 12 blocks over 4 stages as [4, 4, 4, 0], a stage the
    builder cannot make, and 4 blocks as [3, 3, 3, 0] (9 blocks)."""
    from framework.estimate import pipeline_ranks

    cfg = make_cfg([f"model={model}", "strategy=pp", f"strategy.pp={pp}",
                    f"strategy.pp_schedule={schedule}", f"trainer.seq_len={seq}"])  # fmt: skip
    counts, ranks, _ = pipeline_ranks(cfg)
    built = plan_stages(cfg.model, cfg.strategy, seq)
    assert counts == [len(st.blocks) for st in built]
    for r in ranks:
        mine = [st for st in built if stage_rank(st.index, pp, schedule) == r.rank]
        assert r.blocks == sum(len(st.blocks) for st in mine)
        assert r.stages == tuple(st.index for st in mine)

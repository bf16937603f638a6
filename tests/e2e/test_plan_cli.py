"""`python -m framework.plan` end to end in a subprocess: the plan, its JSON line, refusals that
name the keys (also under `python -O`, which strips asserts), the exit code."""

from __future__ import annotations

import json
import subprocess

import pytest

from framework.errors import EXIT_CONFIG
from tests.helpers import run_module

GPT3 = [
    "model=gpt3-175b",
    "strategy=zero3",
    "plan.world_size=1024",
    "plan.gpu=h100",
    "trainer.seq_len=2048",
    "trainer.micro_batch_size=1",
    "strategy.activation_checkpointing=full",
]


def fw_plan(
    *overrides: str, optimize: bool = False, env: dict | None = None
) -> subprocess.CompletedProcess:
    flags = ("-O",) if optimize else ()
    return run_module("framework.plan", *overrides, flags=flags, env=env, timeout=120)


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("optimize", [False, True])
def test_gpt3_175b_plan_fits_on_1024_h100(optimize):
    r = fw_plan(*GPT3, "trainer.global_batch_size=2048", optimize=optimize)
    assert r.returncode == 0, r.stderr
    plan = last_json(r.stdout)
    assert plan["fits"] is True
    assert plan["memory_gib"] < 80
    # bf16 weights sharded over 1024 GPUs: 175e9 x 2 B / 1024 = 0.32 GiB; optimizer 12 B/param.
    assert plan["params_gib"] == pytest.approx(175e9 * 2 / 1024 / 2**30, rel=0.01)
    assert plan["optimizer_gib"] == pytest.approx(175e9 * 12 / 1024 / 2**30, rel=0.01)
    assert plan["flops_per_token"] == pytest.approx(1.0728e12, rel=1e-3)
    assert "gpt3-175b on 1024 x h100" in r.stdout
    assert "fits" in r.stdout.splitlines()[-2]


@pytest.mark.parametrize(
    "overrides, needles",
    [
        # GPT-3's 1536 sequences do not split over 1024 data-parallel ranks.
        (
            [*GPT3, "trainer.global_batch_size=1536"],
            [
                "trainer.global_batch_size=1536",
                "trainer.micro_batch_size=1",
                "data-parallel degree 1024",
            ],
        ),
        (["strategy=tp_fsdp", "strategy.tp=4", "plan.world_size=6"], ["world size 6", "strategy.tp=4"]),
        (["model=gpt2-124m", "strategy=tp", "strategy.tp=8", "plan.world_size=8"], ["model.n_head=12"]),
        (["precision=fp8", "plan.gpu=a100"], ["precision=fp8", "plan.gpu=a100"]),
        (["strategy=zero3", "strategy.tp=2", "plan.world_size=4"], ["strategy.tp=2", "strategy=zero3"]),
    ],
)
def test_impossible_configs_exit_nonzero_naming_keys(overrides, needles):
    r = fw_plan(*overrides)
    assert r.returncode == EXIT_CONFIG
    assert r.stdout == ""  # no plan for a config that cannot run
    for needle in needles:
        assert needle in r.stderr, (needle, r.stderr)


def test_refusal_under_python_O():
    # ConfigError, never assert: the check survives -O.
    r = fw_plan("precision=fp8", "plan.gpu=a100", optimize=True)
    assert r.returncode == EXIT_CONFIG
    assert "precision=fp8" in r.stderr and "plan.gpu=a100" in r.stderr


def test_world_size_comes_from_the_launcher_env():
    r = fw_plan("strategy=ddp", "trainer.global_batch_size=64", env={"WORLD_SIZE": "4"})
    assert r.returncode == 0, r.stderr
    assert last_json(r.stdout)["world_size"] == 4
    assert last_json(r.stdout)["grad_accum"] == 1  # 64 / (16 x 4)


def test_unknown_key_fails_at_compose_time_naming_it():
    r = fw_plan("plan.bogus_key=1")
    assert r.returncode == EXIT_CONFIG
    assert (
        "unknown key plan.bogus_key (valid keys under plan: world_size, gpu, mfu, dry_run, "
        "gpus_per_node, intra_node_gbps, inter_node_gbps, search)" in r.stderr
    )


def test_search_ranks_the_layouts_of_gpt3_175b_on_1024_h100():
    # GPT-3's own batch (1536 x 2048 tokens): the ranking as a table, then the JSON line whose
    # "search" rows are the table's, fastest first, and whose other keys are the top layout's
    r = fw_plan("model=gpt3-175b", "plan.world_size=1024", "plan.search=true",
                "trainer.seq_len=2048", "trainer.global_batch_size=1536")  # fmt: skip
    assert r.returncode == 0, r.stderr
    last = last_json(r.stdout)
    rows = last["search"]
    assert len(rows) == 10
    assert [x["step_time_s"] for x in rows] == sorted(x["step_time_s"] for x in rows)
    top = rows[0]
    assert 1 < top["tp"] <= 8 and 8 % top["tp"] == 0 and top["pp"] > 1  # tp in a node, pp across
    assert top["tp"] * top["pp"] * top["dp"] == 1024
    assert all(x["memory_gib"] <= 0.9 * 80 for x in rows)
    assert (last["tp"], last["pp"], last["step_time_s"]) == (top["tp"], top["pp"], top["step_time_s"])
    assert f"launch #1 with: {top['overrides']}" in r.stdout
    assert "search: gpt3-175b on 1024 x h100" in r.stdout

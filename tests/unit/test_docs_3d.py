"""docs/3d-parallelism.md: every command on the page is a valid configuration for the world size
it launches (the checks framework.plan runs: batch arithmetic, pipeline stages and micro-batches,
divisibility by pp x tp), classified as tests/e2e/test_readme.py classifies the README's; the
CPU lines also train end to end in tests/distributed (strategy=pp, pp x fsdp with the
interleaved schedule)."""

from __future__ import annotations

from pathlib import Path

import pytest

from framework.plan import make_plan
from tests.e2e.test_readme import Command, classify, readme_commands
from tests.helpers import make_cfg

PAGE = Path(__file__).resolve().parents[2] / "docs" / "3d-parallelism.md"


def page_commands() -> list[Command]:
    return readme_commands(PAGE.read_text())


@pytest.mark.parametrize("cmd", page_commands(), ids=lambda c: f"line{c.line}")
def test_every_command_is_a_valid_layout(cmd):
    plan = classify(cmd)
    assert plan is not None and plan.kind in ("plan", "run"), cmd.text
    overrides = [a for a in plan.argv[3:] if "=" in a and not a.startswith("plan.world_size=")]
    world = plan.world
    if plan.kind == "run":  # python -m framework.plan ... plan.world_size=N, as written
        world = int(next(a for a in plan.argv if a.startswith("plan.world_size=")).split("=")[1])
    cfg = make_cfg(overrides)
    p = make_plan(cfg, world)  # raises ConfigError naming the keys of an impossible layout
    assert p.world_size == world
    assert cfg.strategy.pp > 1  # every command on the page runs a pipeline


def test_the_page_launches_the_175b_layout_on_128_nodes():
    plans = [classify(c) for c in page_commands()]
    assert [p.world for p in plans if p.kind == "plan"] == [2, 4, 1024]

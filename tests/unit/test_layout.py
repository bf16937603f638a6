"""Layout: the degrees of the parallel axes and each rank's coordinates (pure arithmetic)."""

from __future__ import annotations

import pytest

from framework.config import Layout, layout
from tests.helpers import make_cfg


def test_coords_are_row_major_with_tp_innermost():
    lay = Layout(pp=2, dp_replicate=1, dp_shard=2, cp=1, tp=2)
    assert lay.world == 8 and lay.dp == 2
    # tp peers are neighbours, pp stages the farthest apart
    assert lay.coords(1) == {"pp": 0, "dp_replicate": 0, "dp_shard": 0, "cp": 0, "tp": 1}
    assert lay.coords(2) == {"pp": 0, "dp_replicate": 0, "dp_shard": 1, "cp": 0, "tp": 0}
    assert lay.coords(4)["pp"] == 1 and lay.coords(7) == {
        "pp": 1, "dp_replicate": 0, "dp_shard": 1, "cp": 0, "tp": 1,
    }  # fmt: skip
    # every rank has distinct coordinates; pp/cp/tp peers share the loader's dp rank
    assert len({tuple(lay.coords(r).values()) for r in range(8)}) == 8
    assert [lay.dp_rank(r) for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]


@pytest.mark.parametrize(
    ("overrides", "world", "shape", "dp"),
    [
        (["strategy=single"], 1, (1, 1, 1, 1, 1), 1),
        (["strategy=ddp"], 4, (1, 4, 1, 1, 1), 4),
        (["strategy=fsdp"], 4, (1, 1, 4, 1, 1), 4),
        (["strategy=fsdp", "strategy.hsdp_replicas=2"], 4, (1, 2, 2, 1, 1), 4),
        (["strategy=tp", "strategy.tp=2"], 2, (1, 1, 1, 1, 2), 1),
        (["strategy=tp_fsdp", "strategy.tp=2"], 8, (1, 1, 4, 1, 2), 4),
        (["strategy=zero3"], 2, (1, 1, 2, 1, 1), 2),
        (
            ["strategy=tp_fsdp", "strategy.tp=2", "strategy.pp=2", "strategy.cp=2"],
            16,
            (2, 1, 2, 2, 2),
            2,
        ),
    ],
)
def test_layout_of_each_strategy(overrides, world, shape, dp):
    lay = layout(make_cfg(overrides).strategy, world)
    assert lay.shape == shape and lay.dp == dp and lay.world == world


def test_mesh_dims_are_the_axes_above_1_and_fsdp_spans_dp_shard_and_cp():
    """Over a fake 16-rank group (this process is rank 5): pp 2 x dp_replicate 2 x dp_shard 2 x
    cp 2. FSDP shards over dp_shard x cp (cp ranks hold the same weights) inside each replica."""
    import torch.distributed as tdist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from framework.parallel.mesh import build_mesh

    tdist.init_process_group("fake", store=FakeStore(), rank=5, world_size=16)
    try:
        lay = Layout(pp=2, dp_replicate=2, dp_shard=2, cp=2)
        mesh = build_mesh(lay, "cpu")
        assert mesh.axes == ("pp", "dp_replicate", "dp_shard", "cp")
        assert mesh.get("tp") is None and mesh.get("pp").size() == 2
        fsdp = mesh.fsdp()
        assert fsdp.ndim == 2 and fsdp.shape == (2, 4)
        assert mesh.get("dp_replicate", "dp_shard", "cp").size() == 8
        # rank 5 = (pp 0, replicate 1, shard 0, cp 1): its FSDP peers are ranks 4..7
        assert sorted(fsdp["dp_shard_cp"].mesh.flatten().tolist()) == [4, 5, 6, 7]
        assert build_mesh(Layout(), "cpu").root is None
    finally:
        tdist.destroy_process_group()

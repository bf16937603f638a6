"""The device mesh of a Layout, and the sub-meshes each parallel function works over.

One DeviceMesh spans all ranks; its dimensions are the axes of degree > 1, outermost first
(pp, dp_replicate, dp_shard, cp, tp: framework.config.Layout, DESIGN's mesh order). An axis of
degree 1 has no dimension, so a plain fsdp run still gets the 1-D mesh it always had, and
`Mesh.get` answers None for "no parallelism on these axes".

Which function works over which axes:
    tensor parallel       tp
    context parallel      cp                      (same weights, other positions of a sequence)
    pipeline stages       pp
    FSDP shards           dp_shard x cp           (cp ranks hold the same weights: they shard too)
    HSDP                  dp_replicate, dp_shard x cp  (2-D: replicate across, shard inside)
    DDP / loss averaging  dp_replicate x dp_shard x cp
Several axes are flattened into one dimension (DeviceMesh._flatten); the flattened meshes are
kept here, since slicing them back out of the root mesh is deprecated in torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from framework.config import Layout


@dataclass
class Mesh:
    layout: Layout
    root: DeviceMesh | None
    """None in one process, or when every axis has degree 1."""
    _flat: dict[tuple[str, ...], DeviceMesh] = field(default_factory=dict, repr=False)

    @property
    def axes(self) -> tuple[str, ...]:
        """The axes of degree > 1, outermost first."""
        return self.root.mesh_dim_names if self.root is not None else ()

    def get(self, *axes: str) -> DeviceMesh | None:
        """The 1-D mesh over `axes` (those of degree 1 dropped; several are flattened into one
        dimension), or None when all of them have degree 1."""
        present = tuple(a for a in axes if a in self.axes)
        if not present:
            return None
        if len(present) == 1:
            return self.root[present[0]]
        if present not in self._flat:
            self._flat[present] = self.root[present]._flatten("_".join(present))
        return self._flat[present]

    def fsdp(self) -> DeviceMesh | None:
        """FSDP's mesh: 1-D over dp_shard x cp, or 2-D (dp_replicate, dp_shard x cp) under HSDP."""
        shard = self.get("dp_shard", "cp")
        if "dp_replicate" not in self.axes or shard is None:
            return shard or self.get("dp_replicate")
        # slicing with a flattened dimension's name is how torch composes it with a root axis
        return self.root[("dp_replicate", shard.mesh_dim_names[0])]

    def experts(self) -> tuple[DeviceMesh, DeviceMesh]:
        """(edp, ep) of expert parallelism (framework/parallel/ep.py): the data-parallel dimension
        (dp_shard under fsdp, dp_replicate under ddp; validate() allows only one of them with ep)
        unflattened into (dp / ep, ep), ep innermost: an ep group is ep neighbouring dp ranks,
        an edp group the dp / ep ranks that hold the same experts (edp may have size 1)."""
        if ("ep",) not in self._flat:
            ep = self.layout.ep
            (dim,) = [a for a in ("dp_replicate", "dp_shard") if a in self.axes]
            both = self.root._unflatten(dim, (self.root[dim].size() // ep, ep), ("edp", "ep"))
            self._flat[("edp",)], self._flat[("ep",)] = both["edp"], both["ep"]
        return self._flat[("edp",)], self._flat[("ep",)]


def build_mesh(layout: Layout, device_type: str) -> Mesh:
    """The Mesh of `layout` over the current (default) process group."""
    dims = [(a, n) for a, n in zip(Layout.AXES, layout.shape) if n > 1]
    if not dims:
        return Mesh(layout, None)
    shape = tuple(n for _, n in dims)
    return Mesh(layout, init_device_mesh(device_type, shape, mesh_dim_names=tuple(a for a, _ in dims)))

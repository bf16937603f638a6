"""Expert parallelism: the experts of every sparse layer split evenly over `ep` data-parallel
ranks, tokens sent to their experts' ranks and back by all-to-all (dropless: variable splits).

Mesh (framework.parallel.mesh, `Mesh.experts`): the data-parallel dimension is unflattened into
(edp, ep), ep innermost, so an ep group is ep neighbouring data-parallel ranks (one node's
NVLink first) and an edp group is the dp / ep ranks that hold the same experts. ep adds no
rank: every rank still reads its own micro-batches.

Weights: each expert tensor (E, ...) becomes a DTensor Shard(0) over the ep mesh, so ep rank r
holds experts [r E/ep, (r+1) E/ep). DTensor rather than plain local (E/ep, ...) tensors with
our own bookkeeping: DCP then saves and loads the global (E, ...) tensors, so a checkpoint of
ep=2 loads into single, ddp or fsdp at any ep (and back) with no code of ours; the meta build
writes each rank's slice (materialize.write_param) and the gradient norm reduces over the right
ranks (TorchEngine groups DTensor gradients by mesh) for free. The Experts module computes on
plain tensors, so its forward is run with the local slices put in place of the DTensors
(`_forward_local`; to_local is differentiable: the gradients land in the DTensors' grads).

One sparse layer on rank r (model/moe.py's hooks; router, dispatch and combine untouched):
    counts (E,)       rows of xs per expert, xs (N*k, C) grouped by expert
    all-to-all        counts.view(ep, E/ep) -> recv (ep, E/ep): rows each source sends to each
                      of my experts (one host sync for the split sizes: all-to-all needs them)
    all-to-all        xs split at the per-destination sums -> rows (sum(recv), C), source-major
    regroup           stable sort by local expert -> experts(rows, recv.sum(0)) -> un-sort
    all-to-all        back with the splits swapped -> ys (N*k, C), the rows in xs's order
Backward is the same exchanges reversed (the all-to-alls are autograd functions).

Gradients (the loss is a mean over the global batch; DDP/FSDP average dense gradients over dp):
an expert's gradient on its rank already sums the contributions of the tokens of every rank in
its ep group (through the all-to-all's backward, each scaled by its source rank's 1/accum and
its own mean). The global gradient is (1/dp) sum over all dp ranks' losses, so the expert
gradients are summed over the edp group (ranks holding the same experts, which together cover
every source rank once) and divided by dp, not by the edp group's size dp/ep:
    fsdp   the experts are their own FSDP units over the edp mesh (reduce-scatter), gradient
           divide factor dp (FSDP's default would be dp/ep). dp == ep: an edp mesh of one rank
           (no communication; FSDP still casts to the compute dtype and divides).
    ddp    DDP ignores the expert parameters; after the last micro-batch's backward their
           gradients are all-reduced (sum) over edp and divided by dp (`expert_grad_sync`).
tests/distributed/test_parity.py checks the scale: per-step grad norms equal single's within 1e-5.

Load balancing: `reduce_counts` sums the per-expert counts over all data-parallel ranks, so the
aux loss is the one a single process computes over the union of the ranks' micro-batches (see
model/moe.py's docstring for why the counts alone suffice).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial
from types import MethodType

import torch
import torch.distributed as tdist
from torch import nn
from torch.distributed import _functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.nn.utils.stateless import _reparametrize_module

from framework.model.moe import Experts, moe_layers


def apply_ep(model: nn.Module, ep_mesh: DeviceMesh, dp_group: tdist.ProcessGroup) -> list[Experts]:
    """Split the experts of every sparse layer of `model` (plain, on meta or materialised
    identically on every rank) over `ep_mesh` and set both hooks of each layer; returns the
    Experts modules (for the data-parallel wrapping)."""
    ep, group = ep_mesh.size(), ep_mesh.get_group()
    out = []
    for _, layer in moe_layers(model):
        experts = layer.experts
        for name, p in list(experts.named_parameters(recurse=False)):
            # src_data_rank=None: every rank holds the same whole tensor (or meta): slice locally
            local = distribute_tensor(p.data, ep_mesh, [Shard(0)], src_data_rank=None)
            experts.register_parameter(name, nn.Parameter(local, requires_grad=p.requires_grad))
        experts.forward = MethodType(_forward_local, experts)
        layer.run_experts = partial(run_expert_parallel, ep=ep, group=group)
        layer.reduce_counts = partial(sum_counts, group=dp_group)
        out.append(experts)
    return out


def _forward_local(self: Experts, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Experts.forward on this rank's slices: FSDP's pre-forward hook has run by now (so the
    parameters are the unsharded DTensors over the ep mesh); their local (E/ep, ...) tensors
    stand in for them during the call. torch's _reparametrize_module (what
    torch.func.functional_call uses) rather than functional_call itself, which would call the
    module again and re-run FSDP's hooks, unsharding over the local tensors."""
    local = {n: p.to_local() for n, p in self.named_parameters(recurse=False) if isinstance(p, DTensor)}
    with _reparametrize_module(self, local):
        return type(self).forward(self, xs, counts)


def run_expert_parallel(
    experts: Experts, xs: torch.Tensor, counts: torch.Tensor, *, ep: int, group: tdist.ProcessGroup
) -> torch.Tensor:
    """`MoE.run_experts` under expert parallelism: xs (N*k, C) grouped by expert, counts (E,)
    -> ys (N*k, C) in the same order, each row computed on its expert's rank."""
    E = counts.numel()
    local_E = E // ep
    send = counts.view(ep, local_E)  # rows for expert e of rank j: send[j, e]
    recv = funcol.all_to_all_single(send.reshape(-1), None, None, group)
    recv = funcol.wait_tensor(recv).view(ep, local_E)  # recv[s, e]: from source s, my expert e
    splits = torch.cat([send.sum(1), recv.sum(1)]).tolist()  # the one host sync
    send_splits, recv_splits = splits[:ep], splits[ep:]
    rows = funcol.all_to_all_single_autograd(xs, recv_splits, send_splits, group)
    # received rows are source-major (then expert, then token): group them by local expert,
    # stable, so every expert sees source 0's rows first, then source 1's, ...
    expert_of_row = torch.repeat_interleave(
        torch.arange(local_E, device=xs.device).repeat(ep), recv.reshape(-1), output_size=rows.shape[0]
    )
    order = torch.argsort(expert_of_row, stable=True)
    ys = experts(rows[order], recv.sum(0))
    ys = ys[torch.argsort(order)]  # back to source-major
    return funcol.all_to_all_single_autograd(ys, send_splits, recv_splits, group)


@torch.no_grad()
def sum_counts(counts: torch.Tensor, *, group: tdist.ProcessGroup) -> torch.Tensor:
    """`MoE.reduce_counts`: the per-expert counts (E,) summed over the data-parallel ranks."""
    out = counts.clone()
    tdist.all_reduce(out, group=group)
    return out


# -- data parallel of the experts -------------------------------------------------------------


def shard_experts(
    experts: list[Experts],
    edp_mesh: DeviceMesh,
    dp: int,
    reshard_after_forward: bool,
    mp: MixedPrecisionPolicy,
) -> None:
    """FSDP2 units of the experts over the edp mesh (the ranks holding the same experts), before
    the blocks are sharded over the whole dp mesh (which then leaves the experts to these).

    Dim 0 of each rank's slice (E/ep experts) is sharded when edp divides it; otherwise (e.g.
    mixtral's 8 experts over ep=8 and 64 ranks: 1 expert over 8 edp ranks) dim 1 (hidden or
    model width), as dim 0 would leave all of it on the first rank and none on the others."""
    n = edp_mesh.size()
    for module in experts:
        local_E = module.w1.to_local().shape[0]
        dim = 0 if local_E % n == 0 else 1
        fully_shard(
            module,
            mesh=edp_mesh,
            reshard_after_forward=reshard_after_forward,
            mp_policy=mp,
            shard_placement_fn=lambda p, dim=dim: Shard(dim),
        )
        module.set_gradient_divide_factor(float(dp))
        if n > 1:
            # a sum, then a division by dp: the scaled-sum reduce op FSDP would otherwise use
            # (PREMUL_SUM) exists in NCCL only, not in gloo. (On one rank FSDP divides by the
            # factor itself; forcing the sum there would divide twice, torch 2.13.)
            module.set_force_sum_reduction_for_comms(True)


def expert_param_names(model: nn.Module, experts: list[Experts]) -> list[str]:
    """Names (as model.named_parameters gives them) of the expert parameters, for DDP to ignore."""
    ids = {id(p) for m in experts for p in m.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def expert_grad_sync(
    experts: list[Experts],
    edp_group: tdist.ProcessGroup | None,
    dp: int,
    inner: Callable[[bool], contextlib.AbstractContextManager],
) -> Callable[[bool], contextlib.AbstractContextManager]:
    """DDP's grad_sync (`inner`) plus the expert gradients' reduction after the last micro-batch
    of a step: sum over the edp group (None: one rank holds these experts), divided by dp."""
    params = [p for m in experts for p in m.parameters()]

    @contextlib.contextmanager
    def sync(last: bool):
        with inner(last):
            yield
        if last:
            for p in params:
                if p.grad is None:
                    continue
                g = p.grad.to_local()
                if edp_group is not None:
                    tdist.all_reduce(g, group=edp_group)
                g.div_(dp)

    return sync

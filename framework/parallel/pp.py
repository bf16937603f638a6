"""Pipeline parallel: the plain GPT split into stages, run by torch.distributed.pipelining.

Stages. A stage is the plain model (framework/model/gpt.py) with the modules it does not own
set to None: the blocks of other stages, the embedding everywhere but on the first stage, the
final norm and the head everywhere but on the last. Parameter names stay the single-device
model's (blocks are a ModuleDict keyed by index), so DCP checkpoints, the per-parameter seeded
init and HF export see the same names at any pipeline degree. The blocks are split by cost
(framework.stages.split, which the plan sizes too: the head of a 50k vocabulary weighs several
blocks), or as strategy.pp_layers says.

Placement (pp ranks, S stages in all, framework.config.pipeline_stages):
    gpipe, 1f1b                   S = pp; rank r holds stage r
    interleaved_1f1b, zero_bubble S = pp x pp_stages_per_rank, round-robin: r, r + pp, ...
    dualpipev                     S = 2 pp, a V: rank r holds r and 2 pp - 1 - r
Schedules, torch 2.13's classes: gpipe ScheduleGPipe, 1f1b Schedule1F1B, interleaved_1f1b
ScheduleInterleaved1F1B, dualpipev ScheduleDualPipeV, and zero_bubble
ScheduleInterleavedZeroBubble (ZB1P): it takes the round-robin placement and
pp_stages_per_rank of interleaved_1f1b (a switch between the two changes nothing else), while
ScheduleZBVZeroBubble is fixed to the V placement with 2 stages per rank that dualpipev
already covers. ScheduleLoopedBFS is not offered (correct, but not bitwise: <= 5e-7).

Each stage module is parallelised like a whole model (tensor parallel over the tp mesh, then
FSDP over dp_shard or, for strategy=pp|ddp, FSDP2's `replicate` over dp_replicate) and has its
own AdamW. Under the split-backward schedules (zero_bubble, dualpipev) the stage is one FSDP
unit, not one per block: with per-block units torch 2.13 loses weight gradients of the blocks
(the input-gradient pass runs each block's FSDP post-backward before the weight pass has written
its gradients; measured: a gradient norm 11% low, block 3's gradients None), while the root
unit's own parameters came out right; the cost is gathering the whole stage at once. Not DDP: torch's stages drive FSDP2-family modules explicitly (gradient sync off for
every micro-batch, one reduction after the schedule's last backward, zero-bubble schedules'
split input/weight backward included), while DDP's reducer follows autograd hooks; measured on
torch 2.13: default DDP asserts in reducer.cpp at the second step, static_graph=True gives
wrong last-stage gradients, and only find_unused_parameters=True (a graph walk every step) is
correct.

Loss. The last stage's model computes the mean cross-entropy of a micro-batch (targets reach
every stage as a keyword argument; only the last one uses them) and the schedule's loss
function turns it into the micro-batch's share of the step, `loss x loss_weight / accum`
(scale_grads=False): Batch.loss_weight (sft, classify) makes that the sum of the micro-batch's
trained-token losses over the trained tokens of the global batch (x dp, which the data-parallel
average divides out), 1/accum of the mean when pretraining: the same arithmetic as TorchEngine,
so pipeline and plain runs scale gradients identically whatever the masks (the trap of
torchtitan #2972, where the schedule's scale_grads divides by the micro-batch count instead).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)
from torch.distributed.tensor import DTensor

from framework.config import StrategyConfig, pipeline_stages
from framework.model.gpt import GPT, ModelConfig
from framework.parallel.engine import TorchEngine
from framework.stages import split as split_stages
from framework.stages import stage_rank

SCHEDULES = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "zero_bubble": ScheduleInterleavedZeroBubble,
    "dualpipev": ScheduleDualPipeV,
}
SPLIT_BACKWARD = ("zero_bubble", "dualpipev")
"""Schedules that run each backward in two passes, input gradients then weight gradients."""
SINGLE_STAGE = ("gpipe", "1f1b")
"""Schedules that take one stage per rank (the others take the rank's list of stages)."""

TIED_COPY = "lm_head.weight"
TIED_NAME = "tok_emb.weight"
"""A tied head's name on the last stage and the embedding's, whose values it carries."""


@dataclass(frozen=True)
class Stage:
    index: int
    blocks: range
    """The block indices this stage holds (the model's ModuleDict keys)."""
    first: bool
    last: bool


def plan_stages(m: ModelConfig, s: StrategyConfig, seq_len: int) -> list[Stage]:
    """Every stage of the pipeline, in order (all ranks compute the same list; the split is the
    plan's, framework.stages.split, at the trained sequence length)."""
    n = pipeline_stages(s)
    counts = split_stages(m, seq_len, n, s.pp_layers)
    out, start = [], 0
    for i, count in enumerate(counts):
        out.append(Stage(i, range(start, start + count), i == 0, i == n - 1))
        start += count
    return out


def stage_module(m: ModelConfig, stage: Stage) -> GPT:
    """The plain GPT on `meta` reduced to `stage`'s modules (names unchanged).

    Tied embeddings (GPT-2) across stages, as Megatron keeps them: the first stage holds
    tok_emb.weight, the last a separate parameter lm_head.weight initialised with the same
    values (TiedEmbedding keeps the two equal: summed gradients, the same update)."""
    with torch.device("meta"):
        model = GPT(m)
    for i in range(m.n_layer):
        if i not in stage.blocks:
            del model.blocks[str(i)]
    if not stage.first:
        model.tok_emb = model.pos_emb = None
    if not stage.last:
        model.norm = model.lm_head = None
    elif not stage.first and m.tie_embeddings:
        model.lm_head.weight = nn.Parameter(torch.empty_like(model.lm_head.weight))
    return model


def initial_name(m: ModelConfig, name: str) -> str:
    """The parameter whose initial (or loaded) value `name` takes: a tied head's copy is the
    embedding's."""
    return TIED_NAME if m.tie_embeddings and name.endswith(TIED_COPY) else name


class TiedEmbedding:
    """The gradient sync of a tied embedding/head across the first and last stage (Megatron's
    "embedding group"): after the schedule's backward (and the data-parallel reduction of each
    stage's gradients), the gradient of tok_emb.weight on the first stage and of its copy
    lm_head.weight on the last are all-reduced (summed) over the pair of ranks that holds them,
    before the norm, clipping and the update: both then hold the gradient the single-device
    model's one shared parameter gets, take the same update and stay bitwise equal. The pair
    is (pp rank 0, pp rank of the last stage) at the same data-parallel and tensor-parallel
    coordinates, so both hold the same shard (FSDP and TP split both along the vocabulary);
    under dualpipev the V puts both stages on pp rank 0 and the sum is local. The norm counts
    the copy once (PipelineEngine._grad_norm); checkpoints hold what the single-device model
    saves: model.tok_emb.weight (first stage) and model.lm_head.weight (last stage), equal, and
    one optimizer state under tok_emb.weight, written by both and deduplicated by DCP."""

    def __init__(self, params: list[nn.Parameter], group):
        self.params, self.group = params, group

    @staticmethod
    def pair_groups(world: int, pp: int, last_rank: int):
        """This rank's pair group, or None (every rank must call it: new_group is collective).
        pp is the outermost axis: rank = pp_rank x (world / pp) + the other coordinates."""
        if last_rank == 0:
            return None  # dualpipev: both stages on pp rank 0
        stride = world // pp
        pairs = [[j, last_rank * stride + j] for j in range(stride)]
        group, _ = tdist.new_subgroups_by_enumeration(pairs)
        return group

    def sync_grads(self) -> None:
        grads = []
        for p in self.params:
            if isinstance(p.grad, DTensor):
                if p.grad.placements != p.placements:
                    # TP's embedding backward leaves a Replicate gradient of the vocabulary-split
                    # weight: cut it to the weight's layout (local, no communication)
                    p.grad = p.grad.redistribute(p.device_mesh, p.placements)
                grads.append(p.grad.to_local())
            else:
                grads.append(p.grad)
        if len(grads) == 2:  # both stages on this rank
            grads[0].add_(grads[1])
            grads[1].copy_(grads[0])
        else:
            tdist.all_reduce(grads[0], group=self.group)


class Optimizers:
    """The AdamW of each of this rank's stages, seen as one optimizer by TorchEngine's step,
    skip and clipping. One per stage because torch's state-dict helpers (DCP) name an
    optimizer's parameters through one module."""

    def __init__(self, parts: list[torch.optim.Optimizer]):
        self.parts = parts

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.parts for g in o.param_groups]

    @property
    def state(self) -> dict:
        return {p: st for o in self.parts for p, st in o.state.items()}

    def step(self) -> None:
        for o in self.parts:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.parts:
            o.zero_grad(set_to_none=set_to_none)


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class PipelineEngine(TorchEngine):
    """TorchEngine over this rank's pipeline stages. forward_backward collects the step's
    micro-batches and runs the schedule on the last one: it returns 0 for the first accum - 1
    and, for the last, the sum of the step's micro-batch losses (x loss_weight), so the loop's
    sum / accum is the mean as without a pipeline; every rank returns the same number (broadcast
    from the last stage over the pipeline group), so the loop's one all-reduce, the NaN policy
    and the spike detector see the step's global mean. grad_norm sums squared norms
    over the stages (pipeline group) and shards (DTensor); clipping, apply and skip are
    TorchEngine's. eval_loss and logits run the stages forward-only, outside the schedule, and
    broadcast the last stage's result. plain_model() is this rank's last stage (on the last
    pipeline rank the one that computes the loss: the fault injector hooks it)."""

    partial_model = True

    def __init__(
        self,
        parts: list[nn.Module],
        stages: list[Stage],
        schedule_name: str,
        optimizers: list[torch.optim.Optimizer],
        pp_mesh: DeviceMesh,
        accum: int,
        n_out: int,
        tie: TiedEmbedding | None,
        **kw,
    ):
        super().__init__(parts[-1], parts[-1], Optimizers(optimizers), **kw)
        self.parts, self.all_stages = parts, stages
        self.group = pp_mesh.get_group()
        self.pp, self.pp_rank = pp_mesh.size(), pp_mesh.get_local_rank()
        self.schedule_name, self.accum, self.n_out, self.tie = schedule_name, accum, n_out, tie
        self.ranks = [stage_rank(s.index, self.pp, schedule_name) for s in stages]
        self.mine = {s.index: part for s, part in zip(self._local_stages(), parts)}
        self.last_rank = tdist.get_global_rank(self.group, self.ranks[-1])
        self.tied_copy = next(
            (p for n, p in parts[-1].named_parameters() if tie is not None and n == TIED_COPY), None
        )
        pipe = [
            PipelineStage(part, s.index, len(stages), self.device, group=self.group)
            for s, part in zip(self._local_stages(), parts)
        ]
        cls = SCHEDULES[schedule_name]
        self.schedule = cls(
            pipe[0] if schedule_name in SINGLE_STAGE else pipe,
            n_microbatches=accum,
            loss_fn=self._loss,
            scale_grads=False,
        )
        self._pending = []

    def _local_stages(self) -> list[Stage]:
        return [s for s, r in zip(self.all_stages, self.ranks) if r == self.pp_rank]

    def _parts(self):
        alias = {TIED_COPY: TIED_NAME}
        return [
            (
                part,
                opt,
                alias if self.tie is not None and TIED_COPY in dict(part.named_parameters()) else {},
            )
            for part, opt in zip(self.parts, self.optimizer.parts)
        ]

    def train(self, mode: bool = True) -> None:
        for part in self.parts:
            part.train(mode)

    def _loss(self, loss: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The schedule's loss function: the last stage's mean cross-entropy of one micro-batch
        -> its share of the step (see the module docstring); weight: (1,) its loss_weight."""
        return loss * weight[0] / self.accum

    def forward_backward(self, batch, accum):
        self._pending.append(batch)
        if len(self._pending) < accum:
            return torch.zeros((), device=self.device)
        batches, self._pending = self._pending, []
        dev = self.device
        inputs = torch.cat([b.inputs for b in batches]).to(dev)  # (accum x B, T)
        kwargs = {"targets": torch.cat([b.targets for b in batches]).to(dev)}
        # document ids (B, T): the loader leaves them out of a micro-batch whose windows each
        # hold one document; the step's micro-batches travel as one tensor, so those get zeros
        # (one document: the same attention and positions as without a mask)
        if any(b.doc_ids is not None for b in batches):
            docs = [torch.zeros_like(b.inputs) if b.doc_ids is None else b.doc_ids for b in batches]
            kwargs["doc_ids"] = torch.cat(docs).to(dev)
        weights = [1.0 if b.loss_weight is None else float(b.loss_weight) for b in batches]
        losses: list[torch.Tensor] = []
        args = (inputs,) if 0 in self.mine else ()
        with self.precision.autocast():
            self.schedule.step(
                *args,
                target=torch.tensor(weights, device=dev),  # split into (1,) per micro-batch
                losses=losses,
                return_outputs=False,
                **kwargs,
            )
        if self.tie is not None:
            self.tie.sync_grads()
        total = torch.zeros((), device=dev)
        for part in losses:  # the micro-batches' loss x loss_weight, summed as the loop does
            total += part.detach().float() * accum
        tdist.broadcast(total, src=self.last_rank, group=self.group)
        return total

    def _grad_norm(self, groups) -> torch.Tensor:
        """This rank's stages' norm (the tied copy left out: the first stage counts it), then
        the squares summed over the pipeline group."""
        if self.tied_copy is not None:
            groups = {k: [p for p in ps if p is not self.tied_copy] for k, ps in groups.items()}
        local = super()._grad_norm(groups).to(self.device)
        square = local.double() ** 2
        tdist.all_reduce(square, group=self.group)
        return square.sqrt().float()

    # -- forward only (eval, sampling): the stages in order, outside the schedule ------------
    def _send(self, x: torch.Tensor, pp_rank: int) -> None:
        dst = tdist.get_global_rank(self.group, pp_rank)
        # the shape (B, T or T/tp under sequence parallel, C) and dtype vary between calls
        header = torch.tensor([*x.shape, _DTYPES.index(x.dtype)], device=x.device)
        tdist.send(header, dst=dst, group=self.group)
        tdist.send(x.contiguous(), dst=dst, group=self.group)

    def _recv(self, pp_rank: int) -> torch.Tensor:
        src = tdist.get_global_rank(self.group, pp_rank)
        header = torch.zeros(4, dtype=torch.long, device=self.device)
        tdist.recv(header, src=src, group=self.group)
        *shape, dtype = header.tolist()
        x = torch.empty(shape, dtype=_DTYPES[dtype], device=self.device)
        tdist.recv(x, src=src, group=self.group)
        return x

    def _forward_only(self, idx: torch.Tensor, out: torch.Tensor, **kwargs) -> torch.Tensor:
        """The last stage's output for token ids idx, written into `out` on every rank."""
        x, me = idx, self.pp_rank
        with self.precision.autocast():
            for s, rank in zip(self.all_stages, self.ranks):
                if rank != me:
                    continue
                if not s.first and self.ranks[s.index - 1] != me:
                    x = self._recv(self.ranks[s.index - 1])
                x = self.mine[s.index](x, **kwargs)
                if not s.last and self.ranks[s.index + 1] != me:
                    self._send(x, self.ranks[s.index + 1])
        if self.ranks[-1] == me:
            out.copy_(x)
        tdist.broadcast(out, src=self.last_rank, group=self.group)
        return out

    @torch.no_grad()
    def eval_loss(self, batch):
        inputs, targets, doc_ids, positions = self._to_device(batch)
        kwargs = {"targets": targets} | ({"doc_ids": doc_ids} if doc_ids is not None else {})
        kwargs |= {"positions": positions} if positions is not None else {}
        loss = self._forward_only(inputs, torch.zeros((), device=self.device), **kwargs)
        return loss if batch.loss_weight is None else loss * batch.loss_weight

    @torch.no_grad()
    def logits(self, idx):
        idx = idx.to(self.device)
        T = idx.size(1)
        pad = -T % self.sequence.multiple  # sequence parallel splits T over the TP ranks
        if pad:
            idx = torch.nn.functional.pad(idx, (0, pad))
        out = torch.empty(idx.size(0), idx.size(1), self.n_out, device=self.device)
        return self._forward_only(idx, out)[:, :T]


def build_stages(
    m: ModelConfig,
    s: StrategyConfig,
    seq_len: int,
    pp_rank: int,
    parallelize: Callable[[GPT], nn.Module],
) -> tuple[list[Stage], list[nn.Module]]:
    """Every stage of the pipeline, and this rank's stage modules (ascending stage index), each
    built on meta and handed to `parallelize` (tensor parallel, AC, compile, FSDP/replicate and
    materialisation, framework.parallel)."""
    stages = plan_stages(m, s, seq_len)
    mine = [st for st in stages if stage_rank(st.index, s.pp, s.pp_schedule) == pp_rank]
    return stages, [parallelize(stage_module(m, st)) for st in mine]

"""Pipeline-stage math as small pure functions: which blocks each stage holds (balanced by
cost, the output head counted), which rank runs each stage, the bubble of each schedule and
the micro-batches whose activations a rank holds at once. Shared by framework.estimate and the
pipeline builder (framework.parallel), so the plan sizes exactly the split that runs.

Notation: p pipeline ranks (strategy.pp), v stages per rank (virtual stages: 1 for gpipe and
1f1b, strategy.pp_stages_per_rank for interleaved_1f1b and zero_bubble, 2 for dualpipev),
m micro-batches per optimizer step and pipeline (the gradient accumulation count).
"""

from __future__ import annotations

import functools

from framework.model.gpt import ModelConfig, num_params

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble", "dualpipev")
LOOPED = ("interleaved_1f1b", "zero_bubble")
"""Schedules with strategy.pp_stages_per_rank stages per rank, stage s on rank s mod p."""


def stages_per_rank(schedule: str, pp_stages_per_rank: int = 2) -> int:
    if schedule not in SCHEDULES:
        raise ValueError(f"pipeline schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
    if schedule in LOOPED:
        return pp_stages_per_rank
    return 2 if schedule == "dualpipev" else 1


def stage_ranks(pp: int, schedule: str, pp_stages_per_rank: int = 2) -> list[int]:
    """The rank of each stage, in model order. Looped placement (stage s on rank s mod p) for
    every schedule but dualpipev, whose V places stages 0..p-1 on ranks 0..p-1 and p..2p-1 back
    on ranks p-1..0: rank 0 then holds the embedding and the output head."""
    v = stages_per_rank(schedule, pp_stages_per_rank)
    if schedule == "dualpipev":
        return list(range(pp)) + list(reversed(range(pp)))
    return [s % pp for s in range(pp * v)]


def block_costs(m: ModelConfig, seq_len: int) -> tuple[float, float]:
    """(embedding, output head) compute, in units of one transformer block's, both per token and
    forward + backward: a block is 6 x its parameters + 12 x n_embd x seq_len (attention) FLOPs,
    the head 6 x vocab x n_embd (its matmul; the softmax is memory-bound and left out). The
    embedding is a lookup with no matmul: 0 (its weights weigh on memory, not time). GPT-2's
    head (50257 x 768) costs 4.4 blocks of gpt2-124m at 1024 tokens, a third of one of
    gpt3-175b's."""
    block = 6 * num_params(m, non_embedding=True) / m.n_layer + 12 * m.n_embd * seq_len
    head_rows = m.num_labels or m.vocab_size
    return 0.0, 6 * head_rows * m.n_embd / block


def stage_layers(
    n_layer: int,
    n_stages: int,
    *,
    head_cost: float = 0.0,
    embed_cost: float = 0.0,
    pp_layers: list[int] | None = None,
) -> list[int]:
    """Blocks per stage, in order, minimising the most expensive stage (the pipeline runs at
    its pace): stage cost = its blocks + `embed_cost` on the first stage + `head_cost` on the
    last (in blocks, `block_costs`). Where several splits reach that minimum, the earlier
    stages get the fewer blocks: under 1F1B they hold the most micro-batches in flight.
    `pp_layers` (strategy.pp_layers) is returned as given once checked."""
    if n_stages < 1:
        raise ValueError(f"{n_stages} pipeline stages: need at least 1")
    if pp_layers is not None:
        if len(pp_layers) != n_stages or sum(pp_layers) != n_layer or min(pp_layers) < 0:
            raise ValueError(
                f"strategy.pp_layers={list(pp_layers)} must list {n_stages} block counts >= 0 "
                f"(one per stage) summing to model.n_layer={n_layer}"
            )
        return list(pp_layers)
    return list(_balanced(n_layer, n_stages, head_cost, embed_cost))


@functools.lru_cache(maxsize=4096)
def _balanced(n_layer: int, n_stages: int, head_cost: float, embed_cost: float) -> tuple[int, ...]:
    extra = [0.0] * n_stages
    extra[0] += embed_cost
    extra[-1] += head_cost

    def capacity(limit: float) -> list[int]:
        return [max(int(limit - e + 1e-9), 0) for e in extra]

    # the smallest limit whose capacities hold every block is one of k + extra[i], and no
    # stage costs less than what it holds besides blocks; capacity grows with the limit
    floor = max(extra)
    candidates = sorted({k + e for e in set(extra) for k in range(n_layer + 1) if k + e >= floor})
    lo, hi = 0, len(candidates) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if sum(capacity(candidates[mid])) >= n_layer:
            hi = mid
        else:
            lo = mid + 1
    counts = capacity(candidates[lo])
    # Take the surplus (fewer than one block per stage) from the costliest stages, earliest
    # first: every stage at capacity costs within one block of the limit, so a stage that gave
    # one up is cheaper than all the others and is not picked twice.
    order = sorted(
        (j for j in range(n_stages) if counts[j] > 0), key=lambda j: (-(counts[j] + extra[j]), j)
    )
    for j in order[: sum(counts) - n_layer]:
        counts[j] -= 1
    return tuple(counts)


def stage_cost(counts: list[int], head_cost: float = 0.0, embed_cost: float = 0.0) -> list[float]:
    """Cost of each stage in blocks (see stage_layers)."""
    costs = [float(c) for c in counts]
    costs[0] += embed_cost
    costs[-1] += head_cost
    return costs


def bubble_ratio(pp: int, micro_batches: int, schedule: str, pp_stages_per_rank: int = 2) -> float:
    """Idle time of the pipeline over its busy time, per optimizer step.

    gpipe, 1f1b: (p-1)/m (the fill and drain of p-1 stages against m micro-batches;
      Huang et al. 2019, Narayanan et al. 2021), i.e. a share (p-1)/(m+p-1) of the step;
    interleaved_1f1b: (p-1)/(v m), the stages v times shorter (Narayanan et al. 2021, sec. 2.2);
    zero_bubble: a third of the interleaved figure: splitting backward into its input and
      weight halves lets the weight halves fill the bubble; Qi et al. 2023 ("Zero Bubble
      Pipeline Parallelism", ZB-H1) give (p-1)(F+B-2W) against 1F1B's (p-1)(F+B), which is a
      third with W = F = B/2 (B the whole backward);
    dualpipev: DeepSeek-V3's DualPipe table, (PP/2-1)(F&B+B-3W) with PP = 2p stages of half a
      rank's layers each: (p-1)(F&B + B - 3W) in stage units, a third of 1F1B's with W = F =
      B/2 and F&B = F + B (our stages do not overlap one micro-batch's forward with another's
      backward; DualPipe's gain beyond that is hiding the expert all-to-all, not modelled).
    Approximations: equal stage times, communication left out (framework.comm.step_time adds it)."""
    if pp <= 1:
        return 0.0
    if micro_batches < 1:
        raise ValueError(f"{micro_batches} micro-batches per step: need at least 1")
    v = stages_per_rank(schedule, pp_stages_per_rank)
    ratio = (pp - 1) / micro_batches
    if schedule in LOOPED:
        ratio /= v
    if schedule in ("zero_bubble", "dualpipev"):
        ratio /= 3
    return ratio


def bubble_fraction(pp: int, micro_batches: int, schedule: str, pp_stages_per_rank: int = 2) -> float:
    """Share of the step the pipeline idles: ratio / (1 + ratio); (p-1)/(m+p-1) for 1F1B."""
    r = bubble_ratio(pp, micro_batches, schedule, pp_stages_per_rank)
    return r / (1 + r)


def min_micro_batches(pp: int, schedule: str, pp_stages_per_rank: int = 2) -> int:
    """Fewest micro-batches per step a schedule runs with: 1F1B-style schedules need one per
    stage in flight (m >= p; interleaved schedules too, torch's checks), DualPipeV one per stage
    (2p); GPipe any."""
    if pp <= 1 or schedule == "gpipe":
        return 1
    return 2 * pp if schedule == "dualpipev" else pp


def in_flight(
    pp: int, micro_batches: int, schedule: str, pp_stages_per_rank: int = 2, rank: int = 0
) -> float:
    """Micro-batches of activations pipeline rank `rank` holds at once, in units of one
    micro-batch through all of its layers; rank 0, the first, holds the most.

    gpipe: all m (every forward runs before the first backward); 1f1b: p - rank (Narayanan et
    al. 2021); interleaved_1f1b: (2(p - rank - 1) + (v-1)p + 1) / v, Megatron's warm-up in
    chunks of 1/v of the rank's layers, which is p + (p-1)/v for rank 0 (Korthikanti et al.
    2022, sec. 4.2.3: p (1 + (p-1)/(p v))); zero_bubble: the interleaved figure (ZB-H1 keeps
    1F1B's peak, its interleaved form the interleaved one); dualpipev: DualPipe's PP + 1 chunks
    (PP = 2p chunks of half a rank's layers) on every rank, p + 1/2. Never more than the m
    micro-batches there are."""
    if pp <= 1:
        return 1.0
    v = stages_per_rank(schedule, pp_stages_per_rank)
    if schedule == "gpipe":
        held = float(micro_batches)
    elif schedule == "1f1b":
        held = float(pp - rank)
    elif schedule == "dualpipev":
        held = pp + 0.5
    else:
        held = (2 * (pp - rank - 1) + (v - 1) * pp + 1) / v
    return min(held, float(micro_batches))

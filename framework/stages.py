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


def stage_rank(stage: int, pp: int, schedule: str) -> int:
    """The pipeline rank that holds `stage`: looped placement (stage s on rank s mod p) for
    every schedule but dualpipev, whose V places stages 0..p-1 on ranks 0..p-1 and p..2p-1 back
    on ranks p-1..0 (rank 0 then holds the embedding and the output head)."""
    if schedule == "dualpipev":
        return stage if stage < pp else 2 * pp - 1 - stage
    return stage % pp


def stage_ranks(pp: int, schedule: str, pp_stages_per_rank: int = 2) -> list[int]:
    """The rank of each stage, in model order (stage_rank)."""
    v = stages_per_rank(schedule, pp_stages_per_rank)
    return [stage_rank(st, pp, schedule) for st in range(pp * v)]


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
    """Blocks per stage, in order: contiguous runs, every stage at least one block (a stage
    module holds one), the embedding on the first stage and the final norm + head on the last.
    Stage cost = its blocks + `embed_cost` on the first + `head_cost` on the last (in blocks,
    `block_costs`: GPT-2's 50k head weighs about 4.5 blocks of gpt2-124m, so the last stage
    gets fewer blocks).

    The split minimises the costliest stage (the pipeline runs at its pace), then, within that
    bound, the sum of squared stage costs (the other stages as even as they go); among equally
    good splits the earlier stages get fewer blocks (under 1F1B they hold the most micro-batches
    in flight). `pp_layers` (strategy.pp_layers) is returned as given once checked. The plan
    (framework.estimate), validate() and the pipeline builder all call this, so the plan sizes
    the split that runs."""
    if pp_layers is not None:
        if len(pp_layers) != n_stages or min(pp_layers, default=0) < 1 or sum(pp_layers) != n_layer:
            raise ValueError(
                f"strategy.pp_layers={list(pp_layers)} must give each of the {n_stages} pipeline "
                f"stages at least one block and sum to model.n_layer={n_layer}"
            )
        return list(pp_layers)
    if not 1 <= n_stages <= n_layer:
        raise ValueError(
            f"{n_stages} pipeline stages need at least as many blocks: model.n_layer={n_layer}"
        )
    return list(_balanced(n_layer, n_stages, head_cost, embed_cost))


def split(m: ModelConfig, seq_len: int, n_stages: int, pp_layers: list[int] | None = None) -> list[int]:
    """stage_layers for model `m` trained at `seq_len` tokens (its embedding and head costs)."""
    embed, head = block_costs(m, seq_len)
    return stage_layers(m.n_layer, n_stages, head_cost=head, embed_cost=embed, pp_layers=pp_layers)


@functools.lru_cache(maxsize=4096)
def _balanced(L: int, S: int, head_cost: float, embed_cost: float) -> tuple[int, ...]:
    """Two dynamic programmes over (stage s, blocks k left for stages s..): the smallest
    possible costliest stage, then the smallest sum of squares within it. O(S L^2), exact but
    for float rounding (costs compared within 1e-9)."""
    eps = 1e-9

    def cost(stage: int, n: int) -> float:
        return n + (embed_cost if stage == 0 else 0.0) + (head_cost if stage == S - 1 else 0.0)

    def choices(stage: int, k: int) -> range:
        """Blocks `stage` may take of the last k, leaving one for each later stage."""
        return range(k, k + 1) if stage == S - 1 else range(1, k - (S - 1 - stage) + 1)

    inf = float("inf")
    peak = [[inf] * (L + 1) for _ in range(S + 1)]
    peak[S][0] = 0.0
    for st in range(S - 1, -1, -1):
        for k in range(S - st, L + 1):
            peak[st][k] = min(max(cost(st, n), peak[st + 1][k - n]) for n in choices(st, k))
    bound = peak[0][L] + eps
    squares = [[inf] * (L + 1) for _ in range(S + 1)]
    take = [[0] * (L + 1) for _ in range(S + 1)]
    squares[S][0] = 0.0
    for st in range(S - 1, -1, -1):
        for k in range(S - st, L + 1):
            for n in choices(st, k):  # ascending: a tie keeps the smaller n
                c = cost(st, n)
                total = c * c + squares[st + 1][k - n]
                if c <= bound and total < squares[st][k] - eps:
                    squares[st][k], take[st][k] = total, n
    out, k = [], L
    for st in range(S):
        out.append(take[st][k])
        k -= out[-1]
    return tuple(out)


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

"""Mixture-of-experts MLP for the plain single-device GPT: a top-k router, dropless dispatch,
stacked expert weights, the load-balancing (aux) and router z losses.

One sparse layer on x (B, T, C), with N = B*T tokens, E experts, k experts per token:

    router     logits (N, E) in fp32; scores (softmax, or sigmoid as DeepSeek-V3); top-k ids (N, k)
               and weights (N, k), renormalised over the k when norm_topk_prob
    dispatch   the N*k (token, expert) assignments sorted by expert: rows xs (N*k, C), counts (E,)
    experts    run_experts(experts, xs, counts) -> ys (N*k, C), the rows in the same order
    combine    y[t] = sum_j weights[t, j] * ys[row of (t, j)]            -> (N, C)
    shared     y += shared(x): an always-on dense MLP (model.moe.shared_experts > 0)

Dropless: every assignment is computed, there is no capacity factor and nothing is dropped (an
expert's batch is as large as its count). The expert weights are stacked 3-D parameters,
`experts.w1` (E, H, C), `experts.w3` (E, H, C) (SwiGLU only), `experts.w2` (E, C, H), each
expert's slice in nn.Linear's (out, in) layout, so expert parallelism can shard dim 0 and a
Hugging Face export can split or fuse them per expert (transformers' OLMoE/Mixtral experts are
`gate_up_proj` (E, 2H, C) = cat(w1, w3) and `down_proj` (E, C, H)).

Hooks for the parallel code (framework/parallel, which imports torch.distributed; this file
does not). Both are plain function attributes of a `MoE` layer, replaced from outside:

    layer.run_experts(experts, xs, counts) -> ys
        Default `run_local`: this process holds every expert. xs (N*k, C) are the dispatched
        rows grouped by expert in ascending id order (stable: token order inside an expert),
        counts (E,) int64 their group sizes; ys must come back as the same rows in the same
        order. Expert parallelism (experts [r*E/ep, (r+1)*E/ep) on ep rank r) replaces it by:
        all-to-all of counts.view(ep, E/ep) (who sends how many rows to which expert), an
        all-to-all of xs split at the per-rank sums (contiguous, since rows are sorted by
        expert), a regroup of the received rows by local expert, `experts(rows, local_counts)`
        on the local (E/ep, ...) weights (Experts.forward reads E from its weights), and the
        inverse all-to-all. dispatch/combine and the router stay untouched.

    layer.reduce_counts(counts) -> counts
        Default identity. Given the per-expert assignment counts (E,) of this micro-batch (no
        gradient), returns the counts the load-balancing loss and the statistics use. A
        data/expert-parallel wrapper sets it to a sum all-reduce over the data-parallel group.
        Both hooks run in every forward of the layer: in eval too, and again in backward when
        activation checkpointing recomputes the block (every rank recomputes the same blocks
        in the same order, so collectives inside them stay matched).

Why reducing the counts alone makes the aux loss exact: aux = E * sum_i f_i P_i, with f_i the
fraction of assignments routed to expert i (a count, no gradient) and P_i the mean router
probability of expert i over the tokens. Over the union of R ranks' micro-batches of equal size
T, f_i^all = sum_r count_i^r / (R T k) (the reduced counts) and P_i^all = (1/R) sum_r P_i^r, so
aux^all = (1/R) sum_r (E sum_i f_i^all P_i^r). Rank r computes the bracket (global f, its own
P_i^r, whose gradient involves only its own tokens), and DDP/FSDP average the gradients over
the R ranks: the gradient is exactly that of aux^all, as one process over all R micro-batches
would compute. (The value logged on one rank is its own bracket; their mean is aux^all.) So
R ranks reducing their counts match one process whose micro-batch holds the R ranks' micro-
batches together (micro_batch_size x R), not one with the same micro_batch_size. With the
identity default each micro-batch balances on its own (f and P both local), which is why the
dense strategies (ddp, fsdp, zero) match `single` at the same micro_batch_size as they are.

Per-layer statistics of the last forward (detached) sit in `layer.stats` for the metrics
(moe_metrics); `layer.aux_term` holds this layer's aux_loss_coef * aux + z_loss_coef * z with
its graph, which the GPT adds to the gradient of its loss (see GPT.forward).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ROUTERS = ("softmax", "sigmoid")


@dataclass
class MoEConfig:
    num_experts: int = 0
    """Routed experts per sparse block; 0: a dense model (every block a plain MLP)."""
    top_k: int = 2
    """Experts each token is routed to."""
    every: int = 1
    """Which blocks are sparse: block i (from 0) when (i + 1) % every == 0, i.e. 1 = all,
    2 = blocks 1, 3, 5, ... (Qwen2-MoE's decoder_sparse_step convention); the others are dense."""
    expert_hidden: int | None = None
    """Each expert's MLP width; None: the dense width (model.ffn_hidden / its default)."""
    shared_experts: int = 0
    """Always-on experts: one dense MLP of width expert_hidden * shared_experts (0: none)."""
    router: str = "softmax"
    """softmax: softmax over all E logits, then top-k (Mixtral, OLMoE); sigmoid: independent
    sigmoid scores, top-k (DeepSeek-V3, without its bias-based balancing and group limit)."""
    norm_topk_prob: bool = True
    """Renormalise the k selected weights to sum to 1 (Mixtral, DeepSeek-V3: true; OLMoE: false,
    its weights are the raw softmax probabilities of the chosen experts)."""
    aux_loss_coef: float = 0.0
    """Weight of the Switch/GShard load-balancing loss E * sum_i f_i P_i (1.0 when balanced),
    averaged over the sparse blocks."""
    z_loss_coef: float = 0.0
    """Weight of the router z-loss mean_t logsumexp(logits_t)^2 (ST-MoE), averaged over the
    sparse blocks."""

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    def is_sparse(self, layer: int) -> bool:
        return self.enabled and (layer + 1) % self.every == 0

    def sparse_layers(self, n_layer: int) -> list[int]:
        return [i for i in range(n_layer) if self.is_sparse(i)]

    def errors(self, n_layer: int) -> list[str]:
        """Problems with the model.moe keys, each naming its key (empty for a dense model)."""
        if self.num_experts < 0:
            return [f"model.moe.num_experts={self.num_experts} must be >= 0 (0: dense)"]
        if not self.enabled:
            return []
        out = []
        if not 1 <= self.top_k <= self.num_experts:
            out.append(
                f"model.moe.top_k={self.top_k} must be in [1, model.moe.num_experts={self.num_experts}]"
            )
        if self.every < 1:
            out.append(f"model.moe.every={self.every} must be >= 1")
        elif self.every > n_layer:
            out.append(
                f"model.moe.every={self.every} exceeds model.n_layer={n_layer}: no block would be "
                "sparse (set model.moe.num_experts=0 for a dense model)"
            )
        if self.expert_hidden is not None and self.expert_hidden <= 0:
            out.append(f"model.moe.expert_hidden={self.expert_hidden} must be > 0 (or null)")
        if self.shared_experts < 0:
            out.append(f"model.moe.shared_experts={self.shared_experts} must be >= 0")
        if self.router not in ROUTERS:
            out.append(f"model.moe.router={self.router!r} must be one of {', '.join(ROUTERS)}")
        for key in ("aux_loss_coef", "z_loss_coef"):
            if not getattr(self, key) >= 0:
                out.append(f"model.moe.{key}={getattr(self, key)} must be >= 0")
        return out


class Router(nn.Module):
    """A linear map to E logits (no bias), computed in fp32 whatever the autocast or parameter
    dtype: top-k selection flips on rounding, and the z-loss squares the logits.

    forward(x (N, C)) -> (logits (N, E), probs (N, E), ids (N, k) int64, weights (N, k)), all
    fp32: probs is the distribution over experts (rows sum to 1) that P_i and the entropy use,
    ids the chosen experts, weights their combine weights. A plain tuple, not a dataclass:
    DeepSpeed ZeRO-3 re-gathers a module's weights for backward through hooks on the tensors
    it returns, and finds them only in tensors, tuples and lists."""

    def __init__(self, dim: int, num_experts: int, top_k: int, score: str, norm_topk_prob: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        self.top_k, self.score, self.norm_topk_prob = top_k, score, norm_topk_prob

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())  # (N, E)
        if self.score == "softmax":
            scores = probs = logits.softmax(-1)
        else:  # sigmoid: independent scores; their normalisation is the distribution
            scores = logits.sigmoid()
            probs = scores / scores.sum(-1, keepdim=True)
        weights, ids = scores.topk(self.top_k, dim=-1)  # (N, k)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, probs, ids, weights


def dispatch(x: torch.Tensor, ids: torch.Tensor, num_experts: int):
    """x (N, C), ids (N, k) -> (xs (N*k, C), counts (E,) int64, order (N*k,)).

    Row j of xs is token order[j] // k, for assignment order[j] of the flattened ids; the rows
    are grouped by expert, ascending, and stable (token order inside an expert), so every run
    with the same routing gives the same rows in the same order."""
    k = ids.shape[1]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return x[order // k], counts, order


def combine(ys: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """ys (N*k, C) in dispatch order -> (N, C) fp32: each token's k outputs weighted by its
    combine weights (N, k) and summed. Un-sorting is a gather (deterministic; its gradient hits
    each row once), the weighted sum is in fp32."""
    n, k = weights.shape
    y = ys[torch.argsort(order)].view(n, k, -1)
    return (y.float() * weights.unsqueeze(-1)).sum(1)


def grouped_mm_fits(dim: int, hidden: int) -> bool:
    """torch._grouped_mm needs every stride a multiple of 16 bytes: dim and hidden multiples of
    8 cover fp32, bf16 and fp16."""
    return hasattr(torch, "_grouped_mm") and dim % 8 == 0 and hidden % 8 == 0


class Experts(nn.Module):
    """E expert MLPs as stacked weights, run on rows grouped by expert.

    SwiGLU (llama style): w2 @ (silu(w1 @ x) * (w3 @ x)); GELU (gpt2 style): w2 @ gelu(w1 @ x),
    with stacked biases w1_bias (E, H), w3_bias (E, H), w2_bias (E, C) when model.bias.

    Two ways to run them:
      grouped  torch._grouped_mm over all experts at once (offsets on the device, no host sync):
               for bf16 compute (bf16 weights or bf16 autocast) when the shapes fit. On CUDA
               sm90/sm100 it is one CUTLASS kernel; elsewhere torch loops over the groups itself.
               torch supports it for bf16 only (its compile-time shape function refuses fp32,
               though the eager CPU kernel runs fp32: the tests use that to compare the two
               paths exactly). It is not covered by autocast, so under autocast the operands are
               cast to bf16 here, as autocast would cast a matmul.
      loop     a Python loop of F.linear over the experts' row ranges (one host sync for the
               counts; under torch.compile a graph break): fp32 and fp16 compute, or shapes that
               do not fit. An expert with no rows still runs a zero-row matmul.
    Which dtypes take the grouped path is fixed here from the shapes (`grouped_dtypes`); the
    compute dtype picks between the two per call, as a run's precision is not known at build.
    tests/unit/test_moe.py checks that both give the same numbers (CPU: fp32 to 1e-6, bf16).
    """

    def __init__(self, num_experts: int, dim: int, hidden: int, swiglu: bool, bias: bool):
        super().__init__()
        E = num_experts
        self.w1 = nn.Parameter(torch.empty(E, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(E, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(E, hidden, dim)) if swiglu else None
        self.w1_bias = nn.Parameter(torch.empty(E, hidden)) if bias else None
        self.w2_bias = nn.Parameter(torch.empty(E, dim)) if bias else None
        self.w3_bias = nn.Parameter(torch.empty(E, hidden)) if bias and swiglu else None
        self.swiglu = swiglu
        self.grouped_dtypes = (torch.bfloat16,) if grouped_mm_fits(dim, hidden) else ()

    def forward(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs (M, C) rows grouped by expert, counts (E_local,) -> (M, C). E is read from the
        weights, so expert parallelism can call it on a rank's slice of the experts."""
        dev = xs.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else xs.dtype
        if dtype in self.grouped_dtypes:
            return self._grouped(xs, counts, dtype)
        return self._loop(xs, counts)

    def _act(self, a: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.silu(a) * b if self.swiglu else F.gelu(a, approximate="tanh")

    def _grouped(self, xs: torch.Tensor, counts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = xs.to(dtype)
        offs = counts.cumsum(0).to(torch.int32)  # end row of each expert's group

        def mm(a, w):  # a (M, in), w (E, out, in) -> (M, out), each row through its expert
            return torch._grouped_mm(a, w.to(dtype).transpose(-2, -1), offs=offs)

        row_expert = None
        if self.w1_bias is not None:
            E = counts.shape[0]
            experts = torch.arange(E, device=xs.device)
            row_expert = torch.repeat_interleave(experts, counts, output_size=xs.shape[0])

        def linear(a, w, b):
            out = mm(a, w)
            return out if b is None else out + b.to(dtype)[row_expert]

        a = linear(x, self.w1, self.w1_bias)
        h = self._act(a, linear(x, self.w3, self.w3_bias) if self.swiglu else None)
        return linear(h, self.w2, self.w2_bias)

    def _loop(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        out, start = [], 0
        for e, n in enumerate(counts.tolist()):
            out.append(self._expert(e, xs[start : start + n]))
            start += n
        return torch.cat(out)

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on its rows x (n, C); n may be 0."""

        def linear(a, w, b):
            return F.linear(a, w[e], None if b is None else b[e])

        h = self._act(
            linear(x, self.w1, self.w1_bias),
            linear(x, self.w3, self.w3_bias) if self.swiglu else None,
        )
        return linear(h, self.w2, self.w2_bias)


def run_local(experts: Experts, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The default `MoE.run_experts`: every expert is in this process."""
    return experts(xs, counts)


def _identity(counts: torch.Tensor) -> torch.Tensor:
    return counts


def load_balancing_loss(probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Switch/GShard aux loss E * sum_i f_i P_i: f_i = counts_i / sum(counts) (the fraction of
    assignments routed to expert i, no gradient), P_i = mean router probability of expert i over
    these tokens (probs (N, E)). 1.0 when perfectly balanced, E when one expert takes all.
    (transformers' Mixtral/OLMoE sum f over the k choices, which makes theirs k times this.)"""
    E = probs.shape[1]
    f = counts.float() / counts.sum().clamp(min=1)
    return E * (f.detach() * probs.mean(0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2; keeps logits small."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


STAT_NAMES = ("max_mean", "aux_loss", "z_loss", "router_entropy")
"""What `MoE.stats` holds, in order: max/mean tokens per expert, aux, z, mean router entropy
(nats; log E when uniform)."""


class MoE(nn.Module):
    """A sparse MLP: router -> dispatch -> run_experts -> combine (+ shared expert), for x (B, T, C).

    `shared` is a dense MLP built by the caller (the GPT's own MLP class, width
    expert_hidden * shared_experts), so this file does not depend on gpt.py."""

    def __init__(
        self,
        cfg: MoEConfig,
        dim: int,
        hidden: int,
        swiglu: bool,
        bias: bool,
        dropout: float,
        shared: nn.Module | None = None,
    ):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.router = Router(dim, cfg.num_experts, cfg.top_k, cfg.router, cfg.norm_topk_prob)
        self.experts = Experts(cfg.num_experts, dim, hidden, swiglu, bias)
        self.shared = shared
        self.dropout = nn.Dropout(dropout)
        self.aux_loss_coef, self.z_loss_coef = cfg.aux_loss_coef, cfg.z_loss_coef
        # the parallel hooks (module docstring); plain functions, not modules, so replacing
        # them never changes the parameter names
        self.run_experts: Callable[[Experts, torch.Tensor, torch.Tensor], torch.Tensor] = run_local
        self.reduce_counts: Callable[[torch.Tensor], torch.Tensor] = _identity
        self.aux_term: torch.Tensor | None = None
        self.stats: torch.Tensor | None = None  # (len(STAT_NAMES),), detached
        self.counts: torch.Tensor | None = None  # (E,) reduced counts of the last forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        h = x.reshape(B * T, C)
        logits, probs, ids, weights = self.router(h)
        xs, counts, order = dispatch(h, ids, self.num_experts)
        ys = self.run_experts(self.experts, xs, counts)
        y = self.dropout(combine(ys, order, weights).to(x.dtype))
        if self.shared is not None:
            y = y + self.shared(h)
        with torch.no_grad():
            counts = self.reduce_counts(counts)
        aux, z = load_balancing_loss(probs, counts), z_loss(logits)
        self.aux_term = self.aux_loss_coef * aux + self.z_loss_coef * z
        with torch.no_grad():
            c = counts.float()
            entropy = -(probs * probs.clamp(min=1e-20).log()).sum(-1).mean()
            self.stats = torch.stack([c.max() / c.mean().clamp(min=1e-20), aux, z, entropy])
            self.counts = counts
        return y.view(B, T, C)


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """(name, layer) of every sparse layer, in model order (wrapper prefixes included)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoE)]


def moe_metrics(model: nn.Module) -> dict[str, float]:
    """metrics.jsonl entries from the last forward of every sparse layer (empty for a dense
    model): `moe/layer{i}/{stat}` per block index i and stat of STAT_NAMES, and `moe/{stat}`,
    the mean over the sparse layers. Under data parallel these are this rank's (rank 0's) last
    micro-batch, unless reduce_counts made the counts global. One host sync per call."""
    layers = [(n, m) for n, m in moe_layers(model) if m.stats is not None]
    if not layers:
        return {}
    stats = torch.stack([m.stats for _, m in layers]).cpu()  # (L_sparse, len(STAT_NAMES))
    out: dict[str, float] = {}
    for j, stat in enumerate(STAT_NAMES):
        out[f"moe/{stat}"] = stats[:, j].mean().item()
    for (name, _), row in zip(layers, stats.tolist()):
        block = _block_index(name)
        for stat, value in zip(STAT_NAMES, row):
            out[f"moe/layer{block}/{stat}"] = value
    return out


def _block_index(name: str) -> str:
    """'blocks.3._checkpoint_wrapped_module.mlp' -> '3'."""
    parts = name.split(".")
    return parts[parts.index("blocks") + 1] if "blocks" in parts else name

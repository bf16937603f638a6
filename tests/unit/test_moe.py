"""The mixture-of-experts layer (framework/model/moe.py) and its place in the GPT: router math,
dispatch/combine, the layer against a token-by-token reference, the aux and z losses against
their definitions, the loss the GPT returns, the parallel hooks, parameter counts against the
published ones."""

from __future__ import annotations

import math

import pytest
import torch

from framework.config import ConfigError, validate
from framework.metrics import summarize, summary_rows
from framework.model.gpt import GPT, ModelConfig, ModelShapeError, initial_value, num_params
from framework.model.moe import (
    MoE,
    MoEConfig,
    Router,
    combine,
    dispatch,
    load_balancing_loss,
    moe_metrics,
    run_local,
    z_loss,
)
from framework.parallel.ac import apply_ac
from tests.helpers import make_cfg

E, K, C, H = 4, 2, 16, 24


def tiny(style="llama", **moe) -> ModelConfig:
    """A 2-block model whose every block is sparse (unless `every` says otherwise)."""
    llama = style == "llama"
    opts = dict(num_experts=E, top_k=K, expert_hidden=H, aux_loss_coef=0.1, z_loss_coef=0.01) | moe
    return ModelConfig(
        style=style, n_layer=2, n_head=2, n_embd=C, vocab_size=37, block_size=16, bias=not llama,
        tie_embeddings=not llama, moe=MoEConfig(**opts),
    )  # fmt: skip


def layer(style="llama", seed=0, bias=None, **moe) -> MoE:
    cfg = tiny(style, **moe)
    if bias is not None:
        cfg.bias = bias
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():  # non-zero biases, so the reference sees them
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    return model.blocks["1"].mlp


# -- router ---------------------------------------------------------------------------------------


def test_softmax_router_takes_the_top_k_and_renormalises_only_when_asked():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0], [0.0, 3.0, 3.5, 0.5]])
    probs = logits.softmax(-1)
    for norm in (True, False):
        r = Router(E, E, K, "softmax", norm)
        with torch.no_grad():
            r.weight.copy_(torch.eye(E))  # logits = inputs
        _, got_probs, ids, weights = r(logits)
        assert ids.tolist() == [[0, 2], [2, 1]]
        chosen = probs.gather(1, ids)
        want = chosen / chosen.sum(-1, keepdim=True) if norm else chosen  # Mixtral / OLMoE
        torch.testing.assert_close(weights, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_probs, probs, rtol=1e-5, atol=1e-6)


def test_sigmoid_router_picks_the_highest_scores_and_normalises_them():
    r = Router(3, E, K, "sigmoid", True)
    with torch.no_grad():
        r.weight.copy_(torch.randn(E, 3, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))
    _, probs, ids, weights = r(x)
    scores = (x @ r.weight.T).sigmoid()
    top, want_ids = scores.topk(K, -1)
    assert ids.tolist() == want_ids.tolist()
    torch.testing.assert_close(weights, top / top.sum(-1, keepdim=True))
    torch.testing.assert_close(probs, scores / scores.sum(-1, keepdim=True))


def test_router_math_is_fp32_under_bf16_autocast_and_bf16_weights():
    r = Router(8, E, K, "softmax", True).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = r(torch.randn(3, 8, dtype=torch.bfloat16))
    assert [t.dtype for t in out] == [torch.float32, torch.float32, torch.int64, torch.float32]


# -- dispatch / combine ---------------------------------------------------------------------------


def test_dispatch_groups_rows_by_expert_and_combine_undoes_it():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, C, generator=g)
    ids = torch.tensor([[1, 3], [3, 0], [1, 2], [0, 1], [3, 1], [2, 3]])
    xs, counts, order = dispatch(x, ids, E)
    assert counts.tolist() == [2, 4, 2, 4] and counts.sum() == ids.numel()  # dropless: N * k rows
    # grouped by expert, ascending; inside an expert, in token order
    tokens = (order // K).tolist()
    assert [ids.reshape(-1)[j].item() for j in order] == [0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 3, 3]
    assert tokens == [1, 3, 0, 2, 3, 4, 2, 5, 0, 1, 4, 5]
    torch.testing.assert_close(xs, x[tokens])
    w = torch.rand(6, K, generator=g)
    # identity experts: every token gets back itself times the sum of its weights
    torch.testing.assert_close(combine(xs, order, w), x * w.sum(-1, keepdim=True))
    # each row is its (token, choice)'s: doubling expert 3's rows doubles only those terms
    ys = xs * torch.where(ids.reshape(-1)[order] == 3, 2.0, 1.0)[:, None]
    want = x * (w * torch.where(ids == 3, 2.0, 1.0)).sum(-1, keepdim=True)
    torch.testing.assert_close(combine(ys, order, w), want)


def test_every_routed_token_is_computed_even_when_experts_get_none():
    moe = layer()
    with torch.no_grad():  # expert 2 wins every token: the other experts share the second pick
        moe.router.weight[2] = 0.0
        moe.router.weight[2, 0] = 1e4
    x = torch.randn(1, 10, C).abs()
    moe(x)
    assert moe.counts.sum().item() == 10 * K and moe.counts[2].item() == 10
    assert 0 in moe.counts.tolist()  # some expert got nothing, and the step still runs
    moe(x).sum().backward()  # every stacked weight gets a gradient (zero rows for idle experts)
    assert all(p.grad is not None for p in moe.parameters())


# -- the layer against a token-by-token reference --------------------------------------------------


def one_expert(ex, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e of the stacked weights on one token x (C,)."""

    def bias(name):
        return getattr(ex, name)[e] if getattr(ex, name) is not None else 0.0

    a = ex.w1[e] @ x + bias("w1_bias")
    if ex.swiglu:
        h = torch.nn.functional.silu(a) * (ex.w3[e] @ x + bias("w3_bias"))
    else:
        h = torch.nn.functional.gelu(a, approximate="tanh")
    return ex.w2[e] @ h + bias("w2_bias")


def reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Each token through its k experts, weighted, written without dispatch/combine."""
    ex, out = moe.experts, torch.zeros_like(x)
    logits = x @ moe.router.weight.T
    for t in range(x.shape[0]):
        one_logits, _, ids, weights = moe.router(x[t : t + 1])
        assert torch.allclose(one_logits[0], logits[t], atol=1e-6)
        for j in range(ids.shape[1]):
            out[t] += weights[0, j] * one_expert(ex, ids[0, j].item(), x[t])
    if moe.shared is not None:
        out += moe.shared(x)
    return out


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_mm", "loop"])
@pytest.mark.parametrize(
    ("style", "moe"),
    [("llama", {}), ("gpt2", {}), ("llama", {"shared_experts": 2}), ("gpt2", {"norm_topk_prob": False}),
     ("llama", {"router": "sigmoid"})],
    ids=["swiglu", "gelu-bias", "shared", "no-renorm", "sigmoid"],
)  # fmt: skip
def test_layer_equals_the_token_by_token_reference(style, moe, grouped):
    m = layer(style, **moe)
    m.experts.grouped_dtypes = (torch.float32,) if grouped else ()  # grouped: eager fp32 kernel
    x = torch.randn(2, 7, C, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = m(x)
        want = reference(m, x.reshape(-1, C)).view_as(x)
    assert (got - want).abs().max().item() <= 1e-6


@pytest.mark.parametrize(
    ("style", "dtype", "tol"),
    [("gpt2", torch.float32, 1e-6), ("llama", torch.float32, 1e-6), ("llama", torch.bfloat16, 2e-2)],
)
def test_grouped_mm_and_the_loop_give_the_same_numbers_and_gradients(style, dtype, tol):
    """Where both run: here CPU, torch's own _grouped_mm kernel, fp32 (which only eager mode
    allows) and bf16 (the dtype the model sends to it; on CUDA sm90 the bf16 CUTLASS kernel is
    another code path, not run here). bf16: the two sum in different orders, so to bf16's 2e-2."""
    results = []
    for grouped in (True, False):
        m = layer(style, bias=True).to(dtype)  # biases too, and SwiGLU's w3
        m.experts.grouped_dtypes = (dtype,) if grouped else ()
        x = torch.randn(3, 5, C, generator=torch.Generator().manual_seed(4)).to(dtype).requires_grad_()
        m(x).float().square().sum().backward()
        results.append([x.grad, *(p.grad for p in m.parameters())])
    for a, b in zip(*results):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


def test_the_expert_path_is_chosen_from_the_shapes_and_the_compute_dtype():
    m = layer()
    assert m.experts.grouped_dtypes == (torch.bfloat16,)  # C=16, H=24: 16-byte strides
    assert layer(expert_hidden=20).experts.grouped_dtypes == ()  # 20 * 2 bytes: refused by torch
    calls = []
    m.experts._loop = lambda xs, counts: calls.append("loop") or xs
    m.experts._grouped = lambda xs, counts, dtype: calls.append(str(dtype)) or xs
    x = torch.randn(1, 4, C)
    m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(x)
    m.to(torch.bfloat16)(x.bfloat16())
    assert calls == ["loop", "torch.bfloat16", "torch.bfloat16"]


# -- aux and z losses -----------------------------------------------------------------------------


def test_load_balancing_loss_by_its_definition():
    # 4 tokens, 2 experts, hand-made: f = counts / total, P = mean probability
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    counts = torch.tensor([3, 1])  # e.g. top-1 choices 0, 0, 0, 1
    f, P = [0.75, 0.25], [0.65, 0.35]
    want = 2 * (f[0] * P[0] + f[1] * P[1])  # E * sum_i f_i P_i = 1.15
    assert load_balancing_loss(probs, counts).item() == pytest.approx(want, rel=1e-6)
    uniform = torch.full((8, E), 1 / E)
    assert load_balancing_loss(uniform, torch.tensor([4, 4, 4, 4])).item() == pytest.approx(1.0)
    collapsed = torch.zeros(8, E)
    collapsed[:, 1] = 1.0
    assert load_balancing_loss(collapsed, torch.tensor([0, 8, 0, 0])).item() == pytest.approx(E)


def test_z_loss_by_its_definition():
    assert z_loss(torch.zeros(5, E)).item() == pytest.approx(math.log(E) ** 2)
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    want = math.log(sum(math.exp(v) for v in (1, 2, 3, 4))) ** 2
    assert z_loss(logits).item() == pytest.approx(want, rel=1e-6)


def test_the_gpt_loss_is_the_cross_entropy_with_the_gradient_of_the_whole_objective():
    cfg = tiny()
    torch.manual_seed(0)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    tgt = idx.roll(-1, 1)
    loss = model(idx, tgt)
    ce = torch.nn.functional.cross_entropy(model(idx).view(-1, cfg.vocab_size), tgt.reshape(-1))
    assert loss.item() == ce.item()  # the value: cross-entropy only, bitwise
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(idx)  # the objective written out: CE + mean over sparse layers of the terms
    moe = [b.mlp for b in model.blocks.values()]
    objective = torch.nn.functional.cross_entropy(logits.view(-1, cfg.vocab_size), tgt.reshape(-1))
    objective = objective + sum(m.aux_term for m in moe) / len(moe)
    objective.backward()
    router = "blocks.0.mlp.router.weight"
    assert got[router].abs().sum() > 0
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_aux_terms_reach_the_router_under_activation_checkpointing():
    """The layer hands its aux term to the GPT beside the block's output; full activation
    checkpointing recomputes the block in backward and must give the same gradients."""
    grads = []
    for mode in ("none", "full"):
        torch.manual_seed(0)
        model = apply_ac(GPT(tiny()), mode)
        idx = torch.randint(0, 37, (2, 12), generator=torch.Generator().manual_seed(1))
        model(idx, idx.roll(-1, 1)).backward()
        grads.append(
            {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()}
        )
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-6, atol=1e-8, msg=n)


# -- the hooks for data and expert parallelism -----------------------------------------------------


def test_reduced_counts_make_the_aux_gradient_that_of_the_union_of_micro_batches():
    """Two 'ranks' A and B: each with the global counts (reduce_counts) and its own P, the mean
    of their aux gradients (what DDP's averaging applies) equals one layer's over A and B."""
    g = torch.Generator().manual_seed(5)
    xa, xb = torch.randn(1, 6, C, generator=g), torch.randn(1, 6, C, generator=g)

    def aux_grad(m: MoE, x: torch.Tensor) -> torch.Tensor:
        m.zero_grad()
        m(x)
        (m.aux_term / m.aux_loss_coef).backward()  # aux_loss_coef * aux: the aux alone
        return m.router.weight.grad.clone()

    m = layer(z_loss_coef=0.0)
    union = aux_grad(m, torch.cat([xa, xb], 1))
    m(xa)
    counts_a = m.counts.clone()
    m(xb)
    counts_b = m.counts.clone()
    m.reduce_counts = lambda c: counts_a + counts_b  # the all-reduce a DDP hook would do
    mean = (aux_grad(m, xa) + aux_grad(m, xb)) / 2
    torch.testing.assert_close(mean, union, rtol=1e-5, atol=1e-8)
    m.reduce_counts = lambda c: c  # local counts: a different (per micro-batch) loss
    assert not torch.allclose((aux_grad(m, xa) + aux_grad(m, xb)) / 2, union, rtol=1e-3)


def test_run_experts_can_be_replaced_by_two_halves_of_the_experts():
    """What expert parallelism will do: rows sorted by expert split at the expert ranges of two
    'ranks', each run by an Experts module holding only its half of the stacked weights."""
    m = layer("gpt2")
    x = torch.randn(2, 6, C, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = m(x)
    halves = []
    for lo, hi in ((0, E // 2), (E // 2, E)):
        half = layer("gpt2").experts  # same shapes; then keep experts lo..hi
        for name in ("w1", "w2", "w1_bias", "w2_bias"):
            setattr(half, name, torch.nn.Parameter(getattr(m.experts, name)[lo:hi].clone()))
        halves.append(half)

    def two_ranks(experts, xs, counts):
        split = counts[: E // 2].sum().item()
        return torch.cat(
            [halves[0](xs[:split], counts[: E // 2]), halves[1](xs[split:], counts[E // 2 :])]
        )

    m.run_experts = two_ranks
    with torch.no_grad():
        torch.testing.assert_close(m(x), want)
    m.run_experts = run_local
    assert {n for n, _ in m.named_parameters()} == {n for n, _ in layer("gpt2").named_parameters()}


# -- statistics, metrics, summary ------------------------------------------------------------------


def test_metrics_of_the_last_forward_per_sparse_layer():
    model = GPT(tiny(every=2))
    assert moe_metrics(model) == {}  # nothing routed yet
    model(torch.randint(0, 37, (2, 12)))
    got = moe_metrics(model)
    layer1 = model.blocks["1"].mlp
    assert isinstance(layer1, MoE) and not isinstance(model.blocks["0"].mlp, MoE)  # (i+1) % 2 == 0
    counts = layer1.counts.float()
    assert got["moe/layer1/max_mean"] == pytest.approx((counts.max() / counts.mean()).item())
    assert set(got) == {f"moe/{s}" for s in ("max_mean", "aux_loss", "z_loss", "router_entropy")} | {
        f"moe/layer1/{s}" for s in ("max_mean", "aux_loss", "z_loss", "router_entropy")
    }
    assert got["moe/aux_loss"] == got["moe/layer1/aux_loss"] >= 1.0 - 1e-6  # >= 1, = 1 if balanced
    assert 0 < got["moe/router_entropy"] <= math.log(E) + 1e-6


def test_the_summary_shows_the_last_routing_figures():
    records = [
        {"step": 1, "loss": 3.0, "tokens": 64, "moe/max_mean": 1.9, "moe/layer0/max_mean": 1.9},
        {"step": 2, "loss": 2.0, "tokens": 128, "moe/max_mean": 1.25, "moe/aux_loss": 1.01},
    ]
    s = summarize(records)
    assert s["moe"] == {"max_mean": 1.25, "aux_loss": 1.01}
    rows = dict(summary_rows(s))
    assert rows["routing (last step)"] == "max/mean tokens per expert 1.250, aux loss 1.010"
    dense = summarize([{"step": 1, "loss": 3.0, "tokens": 64}])
    assert dense["moe"] == {} and "routing (last step)" not in dict(summary_rows(dense))


# -- config, counts, initialisation ----------------------------------------------------------------


def test_config_errors_name_the_moe_keys():
    with pytest.raises(ModelShapeError) as e:
        tiny(top_k=5, every=3, router="argmax", aux_loss_coef=-1.0).validate()
    for key in (
        "model.moe.top_k=5",
        "model.moe.every=3",
        "model.moe.router='argmax'",
        "model.moe.aux_loss_coef",
    ):
        assert key in str(e.value)
    with pytest.raises(
        ConfigError, match=r"model.moe.num_experts=4: strategy=tp has no tensor-parallel"
    ):
        validate(make_cfg(["model=debug-moe", "strategy=tp", "strategy.tp=2"]), 2)
    with pytest.raises(ConfigError, match=r"model.qk_norm=true normalises the whole query/key"):
        validate(
            make_cfg(["model=debug-llama", "model.qk_norm=true", "strategy=tp", "strategy.tp=2"]), 2
        )


def test_a_saved_config_dict_rebuilds_the_moe_config():
    from framework.config import to_dict

    saved = to_dict(make_cfg(["model=debug-moe"]))["model"]
    cfg = ModelConfig(**saved)  # how load_model / export rebuild a checkpoint's model
    assert isinstance(cfg.moe, MoEConfig) and cfg.moe.num_experts == 4
    assert cfg.moe_shape == {"num_experts": 4, "every": 1, "expert_hidden": 128, "shared_experts": 0}
    assert ModelConfig().moe_shape is None


# Published sizes (model cards): OLMoE-1B-7B-0924 "7B total, 1B active" in its name, 6.9B and 1.3B
# in the paper's Table 1; Mixtral-8x7B 46.7B total, 12.9B active (Mistral's announcement).
# They are rounded to 0.1B, so ours must lie within half of that: 0.05e9.
PUBLISHED = {"olmoe-1b-7b": (6.9e9, 1.3e9), "mixtral-8x7b": (46.7e9, 12.9e9)}


@pytest.mark.parametrize("flavor", sorted(PUBLISHED))
def test_parameter_counts_match_the_published_ones(flavor):
    m = make_cfg([f"model={flavor}"]).model
    total, active = PUBLISHED[flavor]
    assert abs(num_params(m) - total) <= 0.05e9
    assert abs(num_params(m, active=True) - active) <= 0.05e9


def test_debug_moe_counts_by_hand():
    m = make_cfg(["model=debug-moe"]).model
    C_, L, V, kv = 128, 4, 257, 64
    attn = 2 * C_ * C_ + 2 * C_ * kv + C_ + kv  # q, o, k, v, q_norm, k_norm
    expert = 3 * C_ * 128
    block = attn + 2 * C_ + 4 * C_ + 4 * expert  # norms, router, experts
    total = L * block + C_ + 2 * V * C_  # final norm, embedding, head
    assert num_params(m) == total
    assert num_params(m, active=True) == total - L * 2 * expert  # top-2 of 4


def test_expert_weights_are_drawn_whole_per_name_and_scaled_like_residual_outputs():
    cfg = make_cfg(["model=debug-moe"]).model
    w2 = initial_value(cfg, "blocks.0.mlp.experts.w2", (4, 128, 128), seed=3)
    w1 = initial_value(cfg, "blocks.0.mlp.experts.w1", (4, 128, 128), seed=3)
    assert torch.equal(w2, initial_value(cfg, "blocks.0._checkpoint_wrapped_module.mlp.experts.w2",
                                         (4, 128, 128), seed=3))  # fmt: skip
    assert w1.std().item() == pytest.approx(0.02, rel=0.05)
    assert w2.std().item() == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.05)
    assert not torch.equal(w2[0], w2[1])  # every expert its own values
    assert initial_value(cfg, "blocks.0.mlp.experts.w1_bias", (4, 8), seed=3).abs().sum() == 0

"""Mixture, packing and resume (RELIABILITY A3, C4, C9). Sources use a counting tokenizer: every
non-EOT token id is unique across all sources, so a window's bytes identify the sample and the
id range identifies its source."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from framework.config import DataConfig, ScheduleEntry, SourceConfig, TrainerConfig
from framework.data.loader import DataRank, MixtureLoader, val_batches
from framework.data.mixture import Mixture
from framework.data.packing import PackedSource
from framework.data.shards import DataError, SourceWriter, read_manifest
from framework.data.tokenizer import Tokenizer

SPAN = 20_000  # token ids per source: source i uses [i*SPAN, (i+1)*SPAN)
T, G, MB = 16, 8, 2


class CountingTokenizer(Tokenizer):
    name, vocab_size, eot_id, fingerprint = "count", 65536, 65535, "count-v1"


TOK = CountingTokenizer()


def make_source(path: Path, index: int, n_tokens: int, seed: int = 0, shard_tokens: int = 2000) -> Path:
    """Documents of 1..40 unique ids (+ EOT), several shards, a small val split."""
    rng = np.random.default_rng([seed, index])
    w = SourceWriter(path, TOK, shard_tokens=shard_tokens)
    pos = index * SPAN
    end = pos + n_tokens
    while pos < end:
        n = int(min(rng.integers(1, 41), end - pos))
        w.add("val" if rng.random() < 0.05 else "train", np.append(np.arange(pos, pos + n), TOK.eot_id))
        pos += n
    w.close()
    return path


@pytest.fixture(scope="module")
def three(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("src")
    return [make_source(root / name, i, 12_000) for i, name in enumerate(("web", "books", "wiki"))]


def cfg_for(paths, weights=(0.6, 0.3, 0.1), cache=None, **kw) -> DataConfig:
    names = ("web", "books", "wiki")
    srcs = [SourceConfig(name=n, path=str(p), weight=w) for n, p, w in zip(names, paths, weights)]
    return DataConfig(sources=srcs, cache_dir=str(cache or Path(paths[0]).parent / "cache"), **kw)


def loader(cfg, rank=0, dp=1, g=G, mb=MB, seed=1337) -> MixtureLoader:
    trainer = TrainerConfig(seq_len=T, global_batch_size=g, micro_batch_size=mb, seed=seed)
    return MixtureLoader(cfg, trainer, TOK, 65536, DataRank(rank, dp))


def steps(ld: MixtureLoader, n: int) -> list[torch.Tensor]:
    """n optimizer steps of this rank's rows, (G/dp, T+1) each (inputs + last target)."""
    out = []
    for _ in range(n):
        parts = [next(ld) for _ in range(ld.per_rank // ld.mb)]
        out.append(torch.cat([torch.cat([b.inputs, b.targets[:, -1:]], 1) for b in parts]))
    return out


def sample_ids(rows: list[torch.Tensor]) -> list[bytes]:
    return [r.numpy().tobytes() for step in rows for r in step]


def source_of_row(row: torch.Tensor) -> int:
    ids = row[row != TOK.eot_id]
    return int(ids[0]) // SPAN


def test_packing_loses_and_duplicates_no_token_across_docs_shards_epochs(three):
    m = read_manifest(three[0])
    p = PackedSource("web", three[0], m, "train", T, 0, shuffle=True)
    n = int(p.windows_per_epoch() * 2.5)  # crosses two epoch boundaries
    out = np.zeros((n, T + 1), dtype=np.int64)
    p.gather(np.arange(n), out, np.arange(n))
    assert (out[:-1, -1] == out[1:, 0]).all()  # consecutive windows share exactly one token
    stream = np.concatenate([out[0, :1], out[:, 1:].reshape(-1)])  # every target once
    E = p.epoch_tokens
    all_tokens = sorted(np.concatenate(p.tokens).tolist())
    for e in range(2):
        epoch = stream[e * E : (e + 1) * E]
        assert sorted(epoch.tolist()) == all_tokens  # each token of the source exactly once
        assert (epoch == TOK.eot_id).sum() == len(p.doc_len)
    assert not np.array_equal(stream[:E], stream[E : 2 * E])  # a fresh permutation per epoch
    assert sorted(stream[:E].tolist()) == sorted(stream[E : 2 * E].tolist())
    one = np.zeros(T + 1, dtype=np.int64)
    p.window(n - 1, one)
    assert (one == out[-1]).all()


def test_doc_ids_follow_document_boundaries(three):
    """Masking is the default: doc ids follow the EOTs; a micro-batch whose windows each hold one
    document gets none (plain causal attention); attend_across_documents=true gets none at all."""
    ld, seen = loader(cfg_for(three)), {"masked": 0, "single": 0}
    for _ in range(16):
        b = next(ld)
        eot = (b.inputs == TOK.eot_id).long()
        expected = torch.cumsum(eot, 1) - eot  # a document ends with (and includes) its EOT
        if b.doc_ids is None:
            assert not expected.any()
            seen["single"] += 1
        else:
            assert b.doc_ids.shape == b.inputs.shape and b.doc_ids.max() > 0
            assert torch.equal(b.doc_ids.long(), expected)
            seen["masked"] += 1
    assert seen["masked"] and seen["single"], seen
    across = loader(cfg_for(three, attend_across_documents=True))
    assert all(next(across).doc_ids is None for _ in range(16))


def test_dp2_slices_concatenate_to_dp1_and_resume_across_dp(three):
    cfg = cfg_for(three)
    ref = steps(loader(cfg), 6)
    r0, r1 = loader(cfg, 0, 2), loader(cfg, 1, 2)
    a, b = steps(r0, 3), steps(r1, 3)
    assert all(torch.equal(torch.cat([x, y]), z) for x, y, z in zip(a, b, ref[:3]))
    sd = r0.state_dict()
    assert sd["position"] == 3 * G and sd == r1.state_dict()
    resumed = loader(cfg, 0, 1)
    resumed.load_state_dict(sd)
    assert all(torch.equal(x, y) for x, y in zip(steps(resumed, 3), ref[3:]))


@pytest.mark.parametrize("workers", [0, 2])
def test_mid_shard_resume_no_gap_no_duplicate_same_order(three, workers):
    cfg = cfg_for(three, num_workers=workers)
    full = loader(cfg)
    ref = sample_ids(steps(full, 14))
    first = loader(cfg)
    before = sample_ids(steps(first, 5))  # step 5: not a shard or epoch boundary
    sd = first.state_dict()
    first.close()
    assert 0 < sd["counts"]["web"] * T % 2000  # mid-shard
    second = loader(cfg)
    second.load_state_dict(sd)
    after = sample_ids(steps(second, 9))
    assert before + after == ref
    assert len(set(ref)) == len(ref)
    assert second.state_dict()["counts"] == full.state_dict()["counts"]
    full.close()
    second.close()


def test_same_seed_any_worker_count_identical_batches(three):
    hashes = []
    for workers in (0, 1, 3):
        ld = loader(cfg_for(three, num_workers=workers))
        h = []
        for _ in range(8):
            bs = [next(ld) for _ in range(G // MB)]
            h.append(
                hashlib.sha256(
                    b"".join(
                        b.inputs.numpy().tobytes()
                        + (b"-" if b.doc_ids is None else b.doc_ids.numpy().tobytes())
                        for b in bs
                    )
                ).hexdigest()
            )
        ld.close()
        hashes.append(h)
    assert hashes[0] == hashes[1] == hashes[2]
    assert len(set(hashes[0])) == 8


@pytest.mark.parametrize("workers", [0, 2])
def test_state_counts_only_consumed_steps_with_prefetch(three, workers):
    ld = loader(cfg_for(three, num_workers=workers))
    steps(ld, 2)
    assert ld.state_dict()["position"] == 2 * G  # though later steps are built already
    assert len(ld._steps) + len(ld._pending) > 0
    assert ld.state_dict()["counts"] == ld.counts_at(2 * G)
    next(ld)
    with pytest.raises(RuntimeError, match="mid optimizer step"):
        ld.state_dict()
    ld.close()


def test_max_epochs_enforced_at_the_step_that_exceeds_it(three):
    cfg = cfg_for(three)
    cfg.sources[2].max_epochs = 0.05
    ld = loader(cfg)
    cap = 0.05 * ld.packed[2].windows_per_epoch()
    last_ok = next(s for s in range(1, 1000) if ld.mixture.counts_at((s + 1) * G)[2] > cap)
    steps(ld, last_ok)
    with pytest.raises(
        DataError, match=rf"source 'wiki' would be drawn past max_epochs=0.05 at step {last_ok + 1}"
    ):
        next(ld)


def test_realized_token_shares_match_weights(three):
    ld = loader(cfg_for(three), g=40, mb=40)
    rows = steps(ld, 10)  # 400 samples
    src = np.array([source_of_row(r) for s in rows for r in s])
    shares = np.bincount(src, minlength=3) / len(src)
    assert np.abs(shares - [0.6, 0.3, 0.1]).max() < 0.02
    assert ld.tokens_per_source() == {
        n: int(c) * T for n, c in zip(("web", "books", "wiki"), np.bincount(src))
    }


def test_mixture_shares_within_3_sigma_over_10k_samples():
    w = np.array([0.6, 0.3, 0.1])
    for seed in range(5):
        counts = Mixture(["a", "b", "c"], list(w), [], 64, seed).counts_at(10_000)
        sigma = np.sqrt(10_000 * w * (1 - w))
        assert (np.abs(counts - 10_000 * w) < 3 * sigma).all()
        assert np.abs(counts - 10_000 * w).max() <= 3  # low-discrepancy: a few samples, not sqrt(n)


def test_schedule_changes_weights_without_dropping_or_duplicating(three):
    sched = [ScheduleEntry(step=4, weights={"web": 0.0, "books": 0.5, "wiki": 0.5})]
    cfg = cfg_for(three, schedule=sched)
    ld = loader(cfg)
    rows = steps(ld, 8)
    src = [[source_of_row(r) for r in s] for s in rows]
    assert all(0 not in s for s in src[3:])  # web off from step 4
    assert sum(s.count(0) for s in src[:3]) > 0
    # per-source windows continue: each source's samples are its windows 0, 1, 2, ... in order
    by_source: dict[int, list[bytes]] = {0: [], 1: [], 2: []}
    for step in rows:
        for r in step:
            by_source[source_of_row(r)].append(r.numpy().tobytes())
    for j, path in enumerate(three):
        p = PackedSource(
            ("web", "books", "wiki")[j], path, read_manifest(path), "train", T, 1337, shuffle=True
        )
        n = len(by_source[j])
        out = np.zeros((n, T + 1), dtype=np.int64)
        p.gather(np.arange(n), out, np.arange(n))
        assert [r.tobytes() for r in out] == by_source[j]
    assert ld.counts_at(8 * G) == ld.state_dict()["counts"]
    # resume inside the second segment continues identically
    again = loader(cfg)
    steps(again, 5)
    sd = again.state_dict()
    resumed = loader(cfg)
    resumed.load_state_dict(sd)
    assert [torch.equal(x, y) for x, y in zip(steps(resumed, 3), rows[5:])] == [True] * 3


def test_max_epochs_plan_refused_and_table(three, tmp_path):
    cfg = cfg_for(three)
    cfg.sources[2].max_epochs = 1.0
    ld = loader(cfg)
    wiki_tokens = ld.packed[2].epoch_tokens
    table = ld.mixture_table(100)
    assert "wiki" in table and f"{wiki_tokens:,}" in table and "10.0%" in table
    rows = {r.source: r for r in ld.plan(100)}
    assert rows["wiki"].tokens_drawn == ld.mixture.counts_at(100 * G)[2] * T
    ok_steps = int(wiki_tokens / (0.1 * G * T)) // 2
    loader(cfg).check_plan(ok_steps)
    with pytest.raises(
        DataError, match=r"source 'wiki' would be drawn \d+\.\d+ epochs .* > max_epochs=1"
    ):
        loader(cfg).check_plan(4 * ok_steps)


def test_zero_weight_disabled_and_tiny_weight_warns(three, caplog):
    caplog.set_level(logging.INFO)
    ld = loader(cfg_for(three, weights=(1.0, 0.0, 0.01)))
    assert "'books' has weight 0: disabled" in caplog.text
    assert "'wiki': weight 0.0099 is 0.08 samples per global batch" in caplog.text
    assert [s.name for s in ld.sources] == ["web", "wiki"]
    assert ld.tokens_per_source()["books"] == 0


def test_val_batches_fixed_and_split_across_ranks(three):
    cfg = cfg_for(three)
    full = val_batches(cfg, TrainerConfig(seq_len=T, micro_batch_size=MB, eval_batches=2))
    assert set(full) == {"web", "books", "wiki"} and all(len(v) == 2 for v in full.values())
    r0, r1 = (
        val_batches(cfg, TrainerConfig(seq_len=T, micro_batch_size=MB, eval_batches=1), DataRank(r, 2))
        for r in (0, 1)
    )
    web = torch.cat([b.inputs for b in full["web"]])
    assert torch.equal(torch.cat([b.inputs for b in r0["web"]]), web[0::2])
    assert torch.equal(torch.cat([b.inputs for b in r1["web"]]), web[1::2])
    assert torch.equal(
        web,
        torch.cat(
            [
                b.inputs
                for b in val_batches(cfg, TrainerConfig(seq_len=T, micro_batch_size=MB, eval_batches=2))[
                    "web"
                ]
            ]
        ),
    )


def test_resume_refuses_changed_mixture_or_seq_len(three):
    ld = loader(cfg_for(three))
    steps(ld, 3)
    sd = ld.state_dict()
    changed = loader(cfg_for(three, weights=(0.2, 0.3, 0.5)))
    with pytest.raises(
        DataError, match=r"checkpointed data counters .* do not match the mixture's order at position 24"
    ):
        changed.load_state_dict(sd)
    other_len = MixtureLoader(
        cfg_for(three),
        TrainerConfig(seq_len=2 * T, global_batch_size=G, micro_batch_size=MB, seed=1337),
        TOK,
        65536,
    )
    with pytest.raises(DataError, match=r"seq_len=16, this run has 32"):
        other_len.load_state_dict(sd)


def test_default_sample_config_builds_as_train_py_does(tmp_path):
    """conf/config.yaml with data=sample, composed by Hydra: the sources are generated on first
    use, verified, and the mixture table names them (the embedded default of `make train`)."""
    from hydra import compose, initialize_config_dir

    from framework.config import CONF_DIR, load, validate
    from framework.data.tokenizer import load_tokenizer

    overrides = [
        f"data.root={tmp_path}/data",
        f"data.cache_dir={tmp_path}/cache",
        "trainer.max_steps=20",
    ]
    with initialize_config_dir(CONF_DIR, version_base=None):
        cfg = load(compose("config", overrides=overrides))
    validate(cfg)
    t = cfg.trainer
    ld = MixtureLoader(cfg.data, t, load_tokenizer(cfg.data.tokenizer), cfg.model.vocab_size)
    ld.check_plan(t.max_steps)
    table = ld.mixture_table(t.max_steps)
    assert all(name in table for name in ("markov", "zipf", "arith"))
    b = next(ld)
    assert b.inputs.shape == (t.micro_batch_size, t.seq_len) and int(b.inputs.max()) < 257
    assert set(val_batches(cfg.data, replace(t, eval_batches=1))) == {
        "markov",
        "zipf",
        "arith",
    }


def test_schedule_weights_are_normalised():
    """Weights that do not sum to 1 (here 3:1, then 1:3 from step 5 on) are shares after
    normalising: the realised proportions of each segment follow them (un-normalised
    cumulative bounds would send nearly every sample to the first source)."""
    g = 64
    mix = Mixture(["a", "b"], [3.0, 1.0], [(5, {"a": 2.0, "b": 6.0})], g, seed=0)
    assert [s.weights.tolist() for s in mix.segments] == [[0.75, 0.25], [0.25, 0.75]]
    first = mix.counts(0, 4 * g)  # steps 1..4
    second = mix.counts(4 * g, 4 * g + 1000)  # from step 5
    assert np.abs(first - np.array([0.75, 0.25]) * 4 * g).max() <= 2
    assert np.abs(second - np.array([0.25, 0.75]) * 1000).max() <= 2

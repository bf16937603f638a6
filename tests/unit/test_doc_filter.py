"""prepare's document policies (RELIABILITY C7 over-long documents, C8 degenerate content): what is
dropped, split or truncated, and that every decision is counted in the manifest and logged."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from framework.config import DataConfig, SourceConfig, TrainerConfig
from framework.data.doc_filter import repetitive_docs
from framework.data.identity import manifest_fingerprint
from framework.data.loader import MixtureLoader
from framework.data.shards import read_manifest
from framework.data.tokenizer import ByteTokenizer
from framework.prepare import PrepareError
from tests.unit.test_prepare import TEXTS, decoded_docs, run, write_jsonl

EOT = ByteTokenizer.eot_id
# 1000 bytes of text with no n-gram repeated back to back 32 times (numbers differ word to word)
LONG = " ".join(f"w{i}" for i in range(300))[:1000]


def brute_force(doc: list[int], min_copies: int, max_ngram: int) -> bool:
    """The definition, position by position: some n-gram (1..max_ngram) followed by itself until
    there are min_copies back-to-back copies."""
    for p in range(1, max_ngram + 1):
        for i in range(len(doc)):
            span = min_copies * p
            if i + span <= len(doc) and all(doc[i + j] == doc[i + j % p] for j in range(span)):
                return True
    return False


def test_repetition_detector_matches_its_definition():
    """The strided screen + window check equals the brute-force definition, and never counts a
    run across a document boundary (the eot between two repeats breaks it)."""
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(300):
        doc = list(rng.integers(0, 3, size=rng.integers(0, 60)))  # 3 symbols: many near-misses
        if rng.random() < 0.3:  # plant a run of 3..6 copies of a 1..5-gram
            gram = list(rng.integers(0, 3, size=rng.integers(1, 6)))
            at = rng.integers(0, len(doc) + 1)
            doc[at:at] = gram * int(rng.integers(3, 7))
        docs.append(doc)
    flat = np.concatenate([np.array(d + [EOT], np.uint16) for d in docs])
    ends = np.cumsum([len(d) + 1 for d in docs])
    got = repetitive_docs(flat, ends, EOT, min_copies=5, max_ngram=4)
    want = np.array([brute_force(d, 5, 4) for d in docs])
    assert 20 < want.sum() < 280  # both outcomes well represented
    np.testing.assert_array_equal(got, want)
    # 31 copies of "ab" end one document and 31 start the next: 62 in a row only across the eot
    two = np.array([*b"ab" * 31, EOT, *b"ab" * 31, EOT], np.uint16)
    assert not repetitive_docs(two, np.array([63, 126]), EOT, 32, 13).any()
    # 32 copies of a 13-gram count, of a 14-gram do not (repeat_max_ngram=13)
    for n, flagged in ((13, True), (14, False)):
        gram = list(range(n))
        doc = np.array([*gram * 32, EOT], np.uint16)
        assert repetitive_docs(doc, np.array([len(doc)]), EOT, 32, 13)[0] == flagged


def test_repetitive_and_blank_documents_dropped_counted_and_logged(tmp_path, caplog):
    """C8: 10k x "ab " (OLMo 2's degenerate document), an all-whitespace and an empty document are
    dropped; the others are kept in order; the manifest counts them; one log line says so."""
    texts = TEXTS[:50] + ["ab " * 10_000, " \n\t  \n", ""] + TEXTS[50:100]
    src = write_jsonl(tmp_path / "a.jsonl", texts)
    with caplog.at_level(logging.INFO, logger="framework.prepare"):
        out = run(tmp_path, src, val_fraction=0.0, docs_per_task=7)
    assert decoded_docs(out) == TEXTS[:100]
    meta = read_manifest(out).meta
    f = meta["filters"]
    assert (f["blank_documents"], f["repetitive_documents"], f["repetitive_tokens"]) == (2, 1, 30_001)
    assert meta["documents"] == {"train": 100, "val": 0}
    assert meta["policy"]["repeat_min_copies"] == 32 and meta["policy"]["repeat_max_ngram"] == 13
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("filters:")]
    assert len(lines) == 1
    assert "dropped 2 blank and 1 repetitive documents (30001 tokens; repeat_min_copies=32" in lines[0]

    # the same with other chunking (the policies are per document; worker processes run the same
    # encode_texts on the chunks: test_prepare.py::test_workers_do_not_change_output)
    two = run(tmp_path, src, "two", val_fraction=0.0, docs_per_task=3)
    assert [s.sha256 for s in read_manifest(two).shards] == [s.sha256 for s in read_manifest(out).shards]
    assert read_manifest(two).meta["filters"] == f

    # the filters off: every document is kept, nothing counted
    off = run(tmp_path, src, "off", val_fraction=0.0, drop_blank=False, repeat_min_copies=0)
    assert decoded_docs(off) == texts
    assert not any(read_manifest(off).meta["filters"].values())


@pytest.mark.parametrize(
    "policy, rows, counters",
    [
        (
            "split",
            [LONG[i : i + 99] for i in range(0, 1000, 99)],
            {"long_split_documents": 1, "long_split_pieces": 11},
        ),
        ("truncate", [LONG[:99]], {"long_truncated_documents": 1, "long_truncated_tokens": 901}),
        ("drop", [], {"long_dropped_documents": 1, "long_dropped_tokens": 1001}),
    ],
)
def test_long_document_policies_counted(tmp_path, policy, rows, counters):
    """C7: a 1000-token document with max_doc_tokens=100 (rows end-of-text included) under each
    policy; the short documents around it are untouched."""
    short = [f"short document {i}" for i in range(20)]
    src = write_jsonl(tmp_path / "a.jsonl", short[:10] + [LONG] + short[10:])
    out = run(tmp_path, src, val_fraction=0.0, long_docs=policy, max_doc_tokens=100)
    assert decoded_docs(out) == short[:10] + rows + short[10:]
    filters = read_manifest(out).meta["filters"]
    assert {k: v for k, v in filters.items() if v} == counters


def longest_segment(out, tmp_path, seq_len: int, batches: int) -> int:
    """The longest run of one document inside any window the loader packs from `out`."""
    cfg = DataConfig(sources=[SourceConfig(name="web", path=str(out))], cache_dir=str(tmp_path / "c"))
    loader = MixtureLoader(
        cfg,
        TrainerConfig(seq_len=seq_len, global_batch_size=8, micro_batch_size=8, seed=0),
        ByteTokenizer(),
        257,
    )
    longest = 0
    for _ in range(batches):
        batch = next(loader)
        assert batch.inputs.shape == (8, seq_len) and batch.targets.shape == (8, seq_len)
        if batch.doc_ids is None:  # every window one document
            longest = max(longest, seq_len)
            continue
        for row in batch.doc_ids.numpy():
            longest = max(longest, np.unique(row, return_counts=True)[1].max())
    return longest


def test_split_rows_read_through_the_loader_never_exceed_limits(tmp_path):
    """C7: documents split to max_doc_tokens=48, packed into seq_len=64 windows with document
    masking: every window is (B, 64), and no document inside one is longer than 48 tokens (without
    the split, longer ones are)."""
    texts = [(LONG + " ") * 3 + str(i) for i in range(6)] + TEXTS[:30]
    src = write_jsonl(tmp_path / "a.jsonl", texts)
    out = run(tmp_path, src, val_fraction=0.0, max_doc_tokens=48)
    m = read_manifest(out)
    lengths = [len(t) for t in texts]  # bytes = text tokens
    pieces = sum(-(-n // 47) for n in lengths if n + 1 > 48)
    assert m.meta["filters"]["long_split_documents"] == sum(n + 1 > 48 for n in lengths) > 6
    assert m.meta["filters"]["long_split_pieces"] == pieces
    assert m.meta["documents"]["train"] == sum(n + 1 <= 48 for n in lengths) + pieces
    assert longest_segment(out, tmp_path, 64, 30) == 48  # 30 x 8 windows: the source 3 times over
    whole = run(tmp_path, src, "whole", val_fraction=0.0, max_doc_tokens=None)
    assert longest_segment(whole, tmp_path, 64, 30) == 64


def test_unchanged_data_keeps_its_fingerprint_and_old_manifests_load(tmp_path):
    """Data the filters do not touch is written byte for byte as with every filter off, so the
    checkpoint's data identity is unchanged; a manifest from before meta.filters still loads, and
    re-preparing over it says why it is not a no-op."""
    src = write_jsonl(tmp_path / "a.jsonl", TEXTS)
    new = run(tmp_path, src, "new")
    off = run(tmp_path, src, "off", drop_blank=False, repeat_min_copies=None, max_doc_tokens=None)
    assert not any(read_manifest(new).meta["filters"].values())
    assert manifest_fingerprint(read_manifest(new)) == manifest_fingerprint(read_manifest(off))

    manifest = json.loads((off / "manifest.json").read_text())
    for key in ("filters", "policy"):
        del manifest["meta"][key]
    (off / "manifest.json").write_text(json.dumps(manifest))
    assert manifest_fingerprint(read_manifest(off)) == manifest_fingerprint(read_manifest(new))
    cfg = DataConfig(sources=[SourceConfig(name="old", path=str(off))], cache_dir=str(tmp_path / "c"))
    assert next(
        MixtureLoader(
            cfg,
            TrainerConfig(seq_len=32, global_batch_size=2, micro_batch_size=2, seed=0),
            ByteTokenizer(),
            257,
        )
    ).inputs.shape == (2, 32)
    with pytest.raises(PrepareError, match="or by a prepare without the document filters"):
        run(tmp_path, src, "off")


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"long_docs": "cut"}, "long_docs='cut' must be one of split, truncate, drop"),
        ({"max_doc_tokens": 1}, "max_doc_tokens=1 must be at least 2"),
        ({"repeat_min_copies": 1}, "repeat_min_copies=1 must be >= 2, or 0/null"),
        ({"repeat_max_ngram": 0}, "repeat_max_ngram=0 must be >= 1"),
    ],
)
def test_bad_policy_keys_named(tmp_path, kw, message):
    src = write_jsonl(tmp_path / "a.jsonl", TEXTS[:10])
    with pytest.raises(PrepareError, match=message):
        run(tmp_path, src, **kw)
    assert not (tmp_path / "out").exists()


def test_policy_keys_compose_from_the_command_line():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from framework.data.formats import doc_policy
    from framework.prepare import CONF_DIR, PrepareConfig

    overrides = ["input=x", "output=y", "long_docs=drop", "max_doc_tokens=null", "repeat_min_copies=0"]
    with initialize_config_dir(CONF_DIR, version_base=None):
        cfg = OmegaConf.to_object(compose("prepare", overrides=overrides))
    assert isinstance(cfg, PrepareConfig)
    policy = doc_policy(cfg)
    assert (policy.long_docs, policy.max_doc_tokens, policy.repeat_min_copies, policy.drop_blank) == (
        "drop",
        None,
        None,
        True,
    )
    assert doc_policy(PrepareConfig(input="x", output="y")).max_doc_tokens == 1 << 20

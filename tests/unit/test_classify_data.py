"""Labelled data for task=classify (issue 11 item 3): the prepared layout (one example per
window, the label id the target of the last text token, sorted label set in the manifest), bad
records refused by file and line with nothing written, the overlong policies, the loader's
targets and weights, and the start-up checks (labels -> model.num_labels, seq_len = max_tokens,
sources of another kind refused)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from framework.config import ConfigError, TrainerConfig
from framework.data.classify import ClassifyError
from framework.data.loader import DataRank, MixtureLoader
from framework.data.packing import PackedSource
from framework.data.shards import read_manifest
from framework.data.tokenizer import ByteTokenizer
from framework.model.gpt import num_params
from framework.prepare import PrepareConfig, prepare
from framework.task import check_sources, resolve_task
from tests.helpers import make_cfg

TOK = ByteTokenizer()
EOT = TOK.eot_id


def prep(tmp_path: Path, records: list, max_tokens: int = 8, **kw) -> Path:
    src = tmp_path / "labelled.jsonl"
    src.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    cfg = PrepareConfig(input=str(src), output=str(tmp_path / "out"), format="classify",
                        max_tokens=max_tokens, val_fraction=0.0, workers=1, **kw)  # fmt: skip
    return prepare(cfg)


def rows(out: Path, kind: str = "") -> list[list[int]]:
    m = read_manifest(out)
    mm = m.mask_manifest() if kind == "mask" else m
    p = PackedSource("x", out, mm, "train", 8, 0, shuffle=False)
    return [p.tokens[0][a:b].tolist() for a, b in zip(p.doc_start, p.doc_start + p.doc_len)]


def test_each_example_is_one_padded_row_with_its_label_after_the_text(tmp_path):
    out = prep(tmp_path, [{"text": "ab", "label": "spam"}, {"text": "hello world", "label": "ham"},
                          {"text": "x", "label": "spam"}])  # fmt: skip
    m = read_manifest(out)
    assert m.kind == "classify" and m.labels == ["ham", "spam"]  # sorted, not first-seen
    assert m.meta["examples_per_label"]["train"] == [0, 2]  # the "ham" example is too long (below)
    assert m.trained_tokens == {"train": 2, "val": 0}  # one target per kept example
    got = rows(out)
    # "hello world" (11 > 7 tokens) is dropped under the default overlong=drop
    assert got == [[*b"ab", *[EOT] * 6], [*b"x", *[EOT] * 7]]
    # the label (id + 1) sits at the first padding token: the target of the last text token
    assert rows(out, "mask") == [[0, 0, 2, 0, 0, 0, 0, 0], [0, 2, 0, 0, 0, 0, 0, 0]]
    assert m.meta["overlong"] | {"first": None} == {
        "policy": "drop", "max_tokens": 8, "count": 1, "dropped": 1, "truncated": 0, "first": None
    }  # fmt: skip
    assert m.meta["overlong"]["first"] == [f"{tmp_path / 'labelled.jsonl'} line 2"]


def test_int_labels_sort_numerically_and_truncate_keeps_the_head(tmp_path):
    out = prep(tmp_path, [{"text": "abcdefghijk", "label": 10}, {"text": "b", "label": 2},
                          {"text": "c", "label": 0}], overlong="truncate")  # fmt: skip
    m = read_manifest(out)
    assert m.labels == [0, 2, 10]  # numeric order (as strings "10" < "2")
    assert rows(out)[0] == [*b"abcdefg", EOT]  # max_tokens - 1 text tokens, then one EOT
    assert rows(out, "mask")[0] == [0] * 7 + [3]
    assert m.meta["overlong"]["truncated"] == 1


@pytest.mark.parametrize(
    "record, message",
    [
        ('{"text": "a", "label": "x"', "line 2: not JSON"),
        ({"label": "x"}, "line 2: no 'text' field"),
        ({"text": 5, "label": "x"}, "line 2: 'text' is int, not a string"),
        ({"text": "", "label": "x"}, "line 2: 'text' is empty"),
        ({"text": "a"}, "line 2: no 'label' field"),
        (
            {"text": "a", "label": 1.5},
            r"line 2: 'label' is float \(1.5\); a label is a string or an int",
        ),
        ({"text": "a", "label": True}, "line 2: 'label' is bool"),
        ({"text": "a", "label": None}, "line 2: 'label' is NoneType"),
        (
            {"text": "a", "label": 3},
            r"line 2: label 3 \(int\), but .* line 1 has a str label; use only strings or only ints",
        ),
        (["text"], "line 2: a record must be a JSON object"),
    ],
)
def test_bad_records_are_refused_by_file_and_line_and_nothing_is_written(tmp_path, record, message):
    with pytest.raises(ClassifyError, match=message) as e:
        prep(tmp_path, [{"text": "ok", "label": "x"}, record, {"text": "fine", "label": "y"}])
    assert "labelled.jsonl" in str(e.value)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp dir left


def test_overlong_error_and_missing_max_tokens_are_refused(tmp_path):
    with pytest.raises(ClassifyError, match="line 1: the text has more than max_tokens - 1 = 7"):
        prep(tmp_path, [{"text": "a" * 8, "label": "x"}], overlong="error")
    with pytest.raises(ClassifyError, match="needs max_tokens >= 2 .* set it to trainer.seq_len"):
        prep(tmp_path, [{"text": "a", "label": "x"}], max_tokens=None)
    assert not (tmp_path / "out").exists()


def classify_cfg(out: Path, *extra: str):
    return make_cfg(["task=classify", f"data.sources=[{{name: c, path: {out}}}]", "trainer.seq_len=8",
                     "trainer.micro_batch_size=2", "trainer.global_batch_size=4", *extra])  # fmt: skip


def test_loader_targets_are_label_ids_at_the_last_text_token(tmp_path):
    out = prep(
        tmp_path, [{"text": "ab" * (i % 3 + 1), "label": ["a", "b", "c"][i % 3]} for i in range(12)]
    )
    cfg = classify_cfg(out)
    resolve_task(cfg)
    assert cfg.model.num_labels == 3 and cfg.task.labels == ["a", "b", "c"]
    loader = MixtureLoader(
        cfg.data,
        TrainerConfig(seq_len=8, global_batch_size=4, micro_batch_size=2, seed=0),
        TOK,
        cfg.model.vocab_size,
    )
    assert loader.kinds == {"c": "classify"}
    check_sources(cfg.task, loader.kinds)
    for _ in range(2):  # one optimizer step: 2 micro-batches of 2
        b = next(loader)
        assert b.loss_weight == 1.0  # 2 examples here x 2 micro-batches / 4 in the global batch
        for x, t in zip(b.inputs, b.targets):
            n = int((x != EOT).sum())  # text length: "ab" x 1..3
            label = n // 2 - 1
            assert t.tolist() == [-100] * (n - 1) + [label] + [-100] * (8 - n)
    loader.close()


def test_start_up_refuses_mismatched_seq_len_num_labels_and_other_kinds(tmp_path):
    out = prep(tmp_path, [{"text": "ab", "label": "a"}, {"text": "cd", "label": "b"}])
    with pytest.raises(
        ConfigError, match=r"max_tokens=8, but trainer.seq_len=16: set trainer.seq_len=8"
    ):
        resolve_task(classify_cfg(out, "trainer.seq_len=16"))
    with pytest.raises(ConfigError, match=r"model.num_labels=3 but the data has 2 labels"):
        resolve_task(classify_cfg(out, "model.num_labels=3"))
    with pytest.raises(
        ConfigError, match="task=classify trains on classify sources, but data source 'w' is sft"
    ):
        check_sources(classify_cfg(out).task, {"w": "sft"})
    with pytest.raises(ConfigError, match="data source 'c' is classify: .* or choose task=classify"):
        check_sources(make_cfg([]).task, {"c": "classify"})
    with pytest.raises(ConfigError, match="model.num_labels=2 is a classifier head, but task=pretrain"):
        from framework.config import validate

        validate(make_cfg(["model.num_labels=2", "model.tie_embeddings=false"]), 1)


def test_classifier_head_needs_untied_embeddings_and_has_num_labels_rows():
    from framework.model import GPT, ModelShapeError, num_params

    with pytest.raises(ModelShapeError, match="model.num_labels=2 .* needs model.tie_embeddings=false"):
        GPT(make_cfg(["model.num_labels=2", "model.tie_embeddings=true"]).model)
    cfg = make_cfg(["task=classify", "model.num_labels=2"]).model
    model = GPT(cfg)
    assert model.lm_head.weight.shape == (2, cfg.n_embd)
    assert model(torch.zeros(1, 5, dtype=torch.long)).shape == (1, 5, 2)
    assert num_params(cfg) == sum(p.numel() for p in model.parameters())


def test_loss_is_the_mean_over_examples_of_the_global_batch(tmp_path):
    """Weighted as the engines do (loss x loss_weight / accum, averaged over dp ranks), the step
    loss equals one cross-entropy over all examples, whatever micro-batch and dp split."""
    from framework.model import GPT

    out = prep(tmp_path, [{"text": "ab" * (i % 3 + 1), "label": ["a", "b"][i % 2]} for i in range(16)])
    cfg = classify_cfg(out, "trainer.global_batch_size=8")
    resolve_task(cfg)
    torch.manual_seed(0)
    model = GPT(cfg.model)

    @torch.no_grad()
    def step_loss(mb: int, dp: int) -> float:
        total = 0.0
        for rank in range(dp):
            loader = MixtureLoader(
                cfg.data,
                TrainerConfig(seq_len=8, global_batch_size=8, micro_batch_size=mb, seed=0),
                TOK,
                cfg.model.vocab_size,
                DataRank(rank, dp),
            )
            accum = 8 // dp // mb
            for _ in range(accum):
                b = next(loader)
                total += float(model(b.inputs, b.targets) * b.loss_weight) / accum / dp
            loader.close()
        return total

    one = step_loss(8, 1)
    assert abs(step_loss(2, 1) - one) < 1e-6 and abs(step_loss(1, 2) - one) < 1e-6
    assert np.isfinite(one) and one > 0


def test_plan_sizes_the_classifier_head_from_the_data(tmp_path):
    """framework.plan counted a vocabulary-sized head for task=classify."""
    from framework.plan import make_plan

    out = prep(tmp_path, [{"text": "ab", "label": x} for x in ("a", "b", "c")])
    cfg = classify_cfg(out, "model.tie_embeddings=false")
    p = make_plan(cfg, 1)
    assert cfg.model.num_labels == 3
    assert p.params == num_params(cfg.model) and num_params(cfg.model) < num_params(
        make_cfg(["model.tie_embeddings=false"]).model
    )

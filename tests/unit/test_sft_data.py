"""Instruction data and the sft loss (issue 11 items 1, 2, 5): rendering and loss mask, bad
records refused by file and line with nothing written, the loss as the mean over the global
batch's trained tokens whatever the accumulation and data-parallel size, and prompt tokens with
exactly no gradient."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from framework.config import ConfigError, TaskConfig, TrainerConfig
from framework.data.chat import ChatError, render, render_prompt
from framework.data.loader import DataRank, MixtureLoader, to_batches
from framework.data.shards import MANIFEST, read_manifest
from framework.data.tokenizer import ByteTokenizer
from framework.model import GPT
from framework.prepare import PrepareConfig, prepare
from framework.task import check_sources
from tests.helpers import make_cfg

TOK = ByteTokenizer()
EOT = TOK.eot_id


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def prep(tmp_path: Path, records: list, **kw) -> Path:
    src = write_jsonl(tmp_path / "chat.jsonl", records)
    cfg = PrepareConfig(input=str(src), output=str(tmp_path / "out"), format="chat", workers=1, **kw)
    return prepare(cfg)


def test_render_masks_assistant_content_and_end_of_turn_only():
    turns = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "ab"},
        {"role": "user", "content": "r"},
        {"role": "assistant", "content": "c"},
    ]
    ids, mask = render(turns, TOK)
    text = "<|system|>\ns\n<|user|>\nq\n<|assistant|>\n"
    expected = [*TOK.encode(text), *b"ab", EOT, *TOK.encode("<|user|>\nr\n<|assistant|>\n"), *b"c", EOT]
    assert ids.tolist() == expected
    trained = [int(i) for i, m in zip(ids, mask) if m]
    assert trained == [*b"ab", EOT, *b"c", EOT]
    # generate chat=true continues exactly the ids training saw before an answer
    assert render_prompt("q", TOK) == TOK.encode("<|user|>\nq\n<|assistant|>\n")


def test_prompt_completion_equals_one_turn_of_messages(tmp_path):
    out = prep(
        tmp_path,
        [
            {"prompt": "2+2", "completion": "4"},
            {"messages": [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}]},
        ],
        val_fraction=0.0,
    )
    m = read_manifest(out)
    assert m.kind == "sft" and len(m.mask_shards) == len(m.shards) == 1
    from framework.data.shards import open_shard

    toks, offs = open_shard(out / m.shards[0].file, m.dtype)
    masks, moffs = open_shard(out / m.mask_shards[0].file, "uint8")
    assert offs.tolist() == moffs.tolist()
    assert toks[offs[0] : offs[1]].tolist() == toks[offs[1] : offs[2]].tolist()
    assert m.trained_tokens == {"train": 4, "val": 0}  # "4" + end-of-text, twice
    assert int(masks.sum()) == 4


def test_pretraining_manifest_unchanged(tmp_path):
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}] * 3)
    out = prepare(PrepareConfig(input=str(src), output=str(tmp_path / "pt"), workers=1))
    raw = json.loads((out / MANIFEST).read_text())
    assert not {"kind", "mask_shards", "trained_tokens"} & set(raw)
    assert read_manifest(out).kind == "pretrain"


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (
            {"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]},
            "turn 0 has no 'role'",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
            "empty assistant",
        ),
        (
            {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
            "content is int",
        ),
        ({"messages": [{"role": "bot", "content": "q"}]}, "role 'bot'"),
        (
            {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
            "last turn",
        ),
        ({"text": "plain"}, "no 'messages' field"),
        ("{not json", "not JSON"),
    ],
)
def test_bad_record_refused_with_file_and_line_nothing_written(tmp_path, bad, match):
    good = {"prompt": "p", "completion": "c"}
    with pytest.raises(ChatError, match=match) as e:
        prep(tmp_path, [good, good, bad, good])
    assert f"{tmp_path / 'chat.jsonl'} line 3" in str(e.value)
    assert not (tmp_path / "out").exists()  # no half-written source
    assert [p.name for p in tmp_path.iterdir()] == ["chat.jsonl"]


def test_overlong_drop_truncate_error(tmp_path):
    records = [{"prompt": "p", "completion": "c"}, {"prompt": "p" * 50, "completion": "long answer"}]
    short = len(
        render([{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}], TOK)[0]
    )
    (tmp_path / "d").mkdir()
    m = read_manifest(prep(tmp_path / "d", records, max_tokens=40, val_fraction=0.0))
    assert m.meta["overlong"]["dropped"] == 1 and m.meta["documents"]["train"] == 1
    assert m.shards[0].tokens == short
    (tmp_path / "t").mkdir()
    m = read_manifest(
        prep(tmp_path / "t", records, max_tokens=40, overlong="truncate", val_fraction=0.0)
    )
    # the prompt alone fills the 40 tokens: nothing trained is left, so it is dropped (counted)
    assert m.meta["overlong"] | {"first": None} == {
        "policy": "truncate", "max_tokens": 40, "count": 1, "dropped": 1, "truncated": 0, "first": None,
    }  # fmt: skip
    (tmp_path / "k").mkdir()
    m = read_manifest(
        prep(tmp_path / "k", records, max_tokens=80, overlong="truncate", val_fraction=0.0)
    )
    assert m.meta["overlong"]["truncated"] == 1 and m.shards[0].tokens == short + 80
    (tmp_path / "e").mkdir()
    with pytest.raises(ChatError, match=r"chat.jsonl line 2: \d+ tokens > max_tokens=40"):
        prep(tmp_path / "e", records, max_tokens=40, overlong="error")


def test_task_refuses_other_kind_of_source():
    with pytest.raises(
        ConfigError, match="task=sft trains on sft sources, but data source 'web' is pretrain"
    ):
        check_sources(TaskConfig("sft"), {"chat": "sft", "web": "pretrain"})
    with pytest.raises(ConfigError, match="data source 'chat' is sft"):
        check_sources(TaskConfig("pretrain"), {"chat": "sft"})
    check_sources(TaskConfig("sft"), {"chat": "sft"})


# -- the loss -----------------------------------------------------------------------------------


def chat_source(tmp_path: Path, n: int = 64) -> Path:
    rng = np.random.default_rng(0)
    recs = [
        {"prompt": "q" * int(rng.integers(1, 12)), "completion": "a" * int(rng.integers(1, 6))}
        for _ in range(n)
    ]
    return prep(tmp_path, recs, val_fraction=0.0)


def step_loss(tmp_path: Path, src: Path, model: GPT, mb: int, dp: int) -> torch.Tensor:
    """The loop's step loss: sum over ranks and micro-batches of weight x mean / (accum x dp)."""
    G, T = 8, 16
    total = torch.zeros(())
    for rank in range(dp):
        cfg = make_cfg([f"data.sources=[{{name: chat, path: {src}}}]", "task=sft"])
        loader = MixtureLoader(
            cfg.data,
            TrainerConfig(seq_len=T, global_batch_size=G, micro_batch_size=mb, seed=0),
            TOK,
            257,
            DataRank(rank, dp),
        )
        accum = G // (mb * dp)
        for _ in range(accum):
            b = next(loader)
            total += model(b.inputs, b.targets, b.doc_ids) * b.loss_weight / (accum * dp)
        trained = loader.trained_tokens()
        loader.close()
    return total, trained


def test_sft_loss_is_global_trained_token_mean_for_any_accum_and_dp(tmp_path):
    src = chat_source(tmp_path)
    torch.manual_seed(0)
    model = GPT(make_cfg(["model.n_layer=1", "model.n_embd=32", "model.n_head=2"]).model).eval()
    with torch.no_grad():
        ref, trained = step_loss(tmp_path, src, model, 8, 1)  # one micro-batch: plain CE mean
        # the reference by hand: every trained target of the global batch, one mean
        cfg = make_cfg([f"data.sources=[{{name: chat, path: {src}}}]"])
        b = next(
            MixtureLoader(
                cfg.data,
                TrainerConfig(seq_len=16, global_batch_size=8, micro_batch_size=8, seed=0),
                TOK,
                257,
            )
        )
        n = int((b.targets != -100).sum())
        assert trained == n and 0 < n < 8 * 16
        assert b.loss_weight == pytest.approx(1.0)
        for mb, dp in [(2, 1), (1, 2), (2, 4), (1, 8)]:
            got, trained_dp = step_loss(tmp_path, src, model, mb, dp)
            assert trained_dp == trained
            assert got.item() == pytest.approx(ref.item(), rel=1e-6), (mb, dp)
        # a plain per-micro-batch mean would differ (the micro-batches hold unequal trained counts)
        cfgm = make_cfg([f"data.sources=[{{name: chat, path: {src}}}]"])
        loader = MixtureLoader(
            cfgm.data,
            TrainerConfig(seq_len=16, global_batch_size=8, micro_batch_size=1, seed=0),
            TOK,
            257,
        )
        naive = sum(model(x.inputs, x.targets, x.doc_ids) for x in [next(loader) for _ in range(8)]) / 8
        assert abs(naive.item() - ref.item()) > 1e-3


def grads(model: GPT, batch) -> list[torch.Tensor]:
    model.zero_grad()
    (model(batch.inputs, batch.targets) * batch.loss_weight).backward()
    return [p.grad.clone() for p in model.parameters()]


def test_prompt_token_targets_get_exactly_zero_gradient():
    """Changing the target of an untrained (prompt) token changes no gradient bit; changing a
    trained one does (so the check can fail). Window position T is only ever a target."""
    T = 16
    rng = np.random.default_rng(1)
    windows = rng.integers(0, 256, size=(2, T + 1)).astype(np.int64)
    mask = np.zeros((2, T + 1), np.uint8)
    mask[:, 5:9] = 1  # an "answer" in the middle; position T is prompt
    torch.manual_seed(0)
    model = GPT(make_cfg(["model.n_layer=1", "model.n_embd=32", "model.n_head=2"]).model)
    base = grads(model, to_batches(windows, None, 2, False, mask, int(mask[:, 1:].sum()))[0])
    changed = windows.copy()
    changed[0, T] = (changed[0, T] + 7) % 256
    same = grads(model, to_batches(changed, None, 2, False, mask, int(mask[:, 1:].sum()))[0])
    assert all(torch.equal(a, b) for a, b in zip(base, same))
    mask[0, T] = 1  # now that target is trained: its change must show
    a = grads(model, to_batches(windows, None, 2, False, mask, int(mask[:, 1:].sum()))[0])
    b = grads(model, to_batches(changed, None, 2, False, mask, int(mask[:, 1:].sum()))[0])
    assert not all(torch.equal(x, y) for x, y in zip(a, b))


def test_micro_batch_without_trained_tokens_has_zero_finite_loss():
    windows = np.arange(2 * 9, dtype=np.int64).reshape(2, 9)
    mask = np.zeros((2, 9), np.uint8)
    mask[1, 3] = 1
    batches = to_batches(windows, None, 1, False, mask, 1, 1)
    assert [b.loss_weight for b in batches] == [0.0, 2.0]
    torch.manual_seed(0)
    model = GPT(make_cfg(["model.n_layer=1", "model.n_embd=32", "model.n_head=2"]).model)
    loss = model(batches[0].inputs, batches[0].targets) * batches[0].loss_weight
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())

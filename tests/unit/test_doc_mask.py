"""Document-masked attention (data.attend_across_documents=false, the default): a packed window
computes exactly what its documents computed one by one; positions restart per document; every
kernel agrees; old checkpoints keep the attention they were trained with on resume."""

from __future__ import annotations

import logging

import pytest
import torch

from framework.config import TrainerConfig
from framework.data.identity import check_data_resume, with_legacy_attention
from framework.data.loader import MixtureLoader
from framework.data.tokenizer import ByteTokenizer
from framework.errors import CheckpointError
from framework.model.attention import dense_doc_mask, doc_positions, kernel_for
from framework.model.gpt import GPT, ModelConfig
from framework.train import train
from tests.helpers import TINY, loss_and_grads_per_kernel, make_cfg

STYLES = {
    "gpt2": ModelConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=50, block_size=32),
    "llama": ModelConfig(
        style="llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=32, vocab_size=50, block_size=32,
        multiple_of=16, bias=False, tie_embeddings=False,
    ),
}  # fmt: skip
LENGTHS = [(5, 9, 7), (21,), (1, 12, 8)]  # per window: its documents' lengths (21 tokens)


def packed(lengths: list[tuple[int, ...]], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths[0])
    idx = torch.randint(0, 50, (len(lengths), T), generator=g)
    targets = torch.randint(0, 50, (len(lengths), T), generator=g)
    doc_ids = torch.tensor([[d for d, n in enumerate(row) for _ in range(n)] for row in lengths])
    return idx, targets, doc_ids


def test_positions_restart_at_each_document():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [0] * 9])
    assert doc_positions(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3], list(range(9))]
    m = dense_doc_mask(doc_ids)[0, 0]
    assert m[4].tolist() == [False] * 3 + [True, True] + [False] * 4  # its document, causal


@pytest.mark.parametrize("kernel", ["sdpa", "varlen"])
@pytest.mark.parametrize("style", list(STYLES))
def test_packed_loss_is_the_token_weighted_mean_of_the_documents_alone(style, kernel):
    torch.manual_seed(0)
    model = GPT(STYLES[style]).eval()
    model.use_attention(kernel)
    idx, targets, doc_ids = packed(LENGTHS)
    with torch.no_grad():
        got = model(idx, targets, doc_ids)
        total, n = 0.0, 0
        for b, row in enumerate(LENGTHS):
            s = 0
            for length in row:  # each document alone, from position 0
                e = s + length
                total += model(idx[b : b + 1, s:e], targets[b : b + 1, s:e]).item() * length
                n, s = n + length, e
        assert abs(got.item() - total / n) <= 1e-5 * total / n
        # without the mask the later documents see the earlier ones: a different loss
        assert abs(model(idx, targets).item() - total / n) > 1e-3


@pytest.mark.parametrize("style", list(STYLES))
def test_a_token_does_not_see_the_document_before_it(style):
    torch.manual_seed(0)
    model = GPT(STYLES[style]).eval()
    idx, _, doc_ids = packed([(5, 9, 7)])
    other = idx.clone()
    other[:, :5] = (idx[:, :5] + 1) % 50  # another first document
    with torch.no_grad():
        a, b = model(idx, doc_ids=doc_ids), model(other, doc_ids=doc_ids)
        torch.testing.assert_close(a[:, 5:], b[:, 5:], rtol=0, atol=1e-6)
        assert (a[:, :5] - b[:, :5]).abs().max() > 1e-3
        c, d = model(idx), model(other)  # attending across documents: it does
        assert (c[:, 5:] - d[:, 5:]).abs().max() > 1e-3


def test_kernels_agree_in_forward_and_backward():
    torch.manual_seed(0)
    model = GPT(STYLES["llama"])
    idx, targets, doc_ids = packed(LENGTHS)
    out = loss_and_grads_per_kernel(model, ("sdpa", "varlen"), idx, targets, doc_ids)
    torch.testing.assert_close(out["sdpa"][0], out["varlen"][0], rtol=1e-6, atol=1e-6)
    for a, b in zip(out["sdpa"][1], out["varlen"][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert kernel_for("cpu", 0.0, 512) == "sdpa" and kernel_for("cpu", 0.0, 4096) == "varlen"
    assert kernel_for("cuda", 0.0, 512) == "flex" and kernel_for("cuda", 0.1, 512) == "sdpa"


def test_the_default_config_masks_documents(sample_data):
    cfg = make_cfg(TINY)
    assert cfg.data.attend_across_documents is False
    trainer = TrainerConfig(seq_len=32, global_batch_size=8, micro_batch_size=4, seed=0)
    loader = MixtureLoader(cfg.data, trainer, ByteTokenizer(), 257)
    batches = [next(loader) for _ in range(8)]
    masked = [b for b in batches if b.doc_ids is not None]
    assert masked and all(int(b.doc_ids.max()) > 0 for b in masked)
    loader.close()


def identity(attend: bool | None) -> dict:
    base = {"sources": {}, "tokenizer": "t", "seq_len": 32, "weights": {}, "schedule": []}
    return base if attend is None else {**base, "attend_across_documents": attend}


def test_a_checkpoint_from_before_the_key_keeps_its_attention(tmp_path, caplog):
    """Old pretraining checkpoints (data.doc_mask=false) attended across documents: resuming them
    under the new default is refused, naming the key to set; doc_mask=true ones masked."""
    old_pretrain = with_legacy_attention(identity(None), {"data": {"doc_mask": False}})
    with pytest.raises(CheckpointError, match=r"attend_across_documents: True \(data.doc_mask=False"):
        check_data_resume(old_pretrain, identity(False), False, tmp_path)
    check_data_resume(old_pretrain, identity(True), False, tmp_path)  # the user kept it: fine
    with caplog.at_level(logging.WARNING, logger="framework"):
        check_data_resume(old_pretrain, identity(False), True, tmp_path)  # or allowed the change
    assert "attend_across_documents" in caplog.text
    old_sft = {"data": {"doc_mask": True}, "model": {"style": "llama"}}
    check_data_resume(with_legacy_attention(identity(None), old_sft), identity(False), False, tmp_path)


def test_resume_refuses_a_changed_attention(tmp_path, sample_data):
    base = [*TINY, f"run.dir={tmp_path}", "trainer.max_steps=3", "model.dropout=0"]
    train(make_cfg([*base, "trainer.stop_at_step=1", "data.attend_across_documents=true"]))
    with pytest.raises(CheckpointError, match="data.attend_across_documents=True to keep"):
        train(make_cfg(base))
    train(make_cfg([*base, "data.attend_across_documents=true"]))

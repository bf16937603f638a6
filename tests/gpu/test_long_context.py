"""GPU tier (marker `gpu`) of the long-context paths that cannot run on CPU. Written without a
GPU to try them on: unverified until a GPU run passes them.

- FlexAttention with a document block mask (the CUDA kernel framework.model.attention picks)
  gives the dense-mask SDPA's loss and gradients;
- cp_method=ring (torch's context_parallel) on 2 GPUs gives single's losses (needs 2 devices:
  NCCL does not put two ranks on one GPU).

    pytest -m gpu tests/gpu/test_long_context.py
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from framework.model.gpt import GPT  # noqa: E402
from tests.distributed.launch import PARITY, losses, max_rel_diff, run_train  # noqa: E402
from tests.helpers import loss_and_grads_per_kernel, make_cfg  # noqa: E402

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda", 0)


def test_flex_document_mask_matches_dense_sdpa():
    cfg = make_cfg(["model=debug-llama", "model.block_size=512"]).model
    torch.manual_seed(0)
    model = GPT(cfg).to(CUDA)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size, (2, 512), generator=g).to(CUDA)
    lengths = [[100, 300, 112], [512]]
    doc_ids = torch.tensor([[d for d, n in enumerate(r) for _ in range(n)] for r in lengths]).to(CUDA)
    out = loss_and_grads_per_kernel(model, ("sdpa", "flex"), idx, idx, doc_ids)
    torch.testing.assert_close(out["flex"][0], out["sdpa"][0], rtol=1e-4, atol=1e-5)
    for a, b in zip(out["flex"][1], out["sdpa"][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="ring attention needs 2 GPUs")
def test_ring_context_parallel_matches_single(tmp_path, sample_data):
    from framework.train import train

    args = ["trainer.device=cuda", "precision=fp32", "trainer.seq_len=256",
            "data.attend_across_documents=true"]  # fmt: skip
    train(make_cfg([*PARITY, *args, f"run.dir={tmp_path / 'single'}"]))
    run_train(tmp_path / "ring", "strategy=fsdp", "strategy.cp=2", "strategy.cp_method=ring", *args)
    assert max_rel_diff(losses(tmp_path / "ring"), losses(tmp_path / "single")) <= 1e-4

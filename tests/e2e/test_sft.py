"""Instruction fine-tuning end to end (issue 11 item 5, partly): a synthetic task with exact
answers, fine-tuned through prepare format=chat -> train task=sft -> greedy chat replies on
held-out prompts (the zero gradient on prompt tokens is tests/unit/test_sft_data.py).

The task: "repeat: 381" -> "381" (three digits; 1000 prompts, chance of an exact match 1/1000),
on the tiny Llama-style model (RoPE makes "copy the token d positions back" one pattern for every
position). The held-out prompts never appear in the training data.

Measured on this 2-core CPU (2026-12-03, model=debug-llama, 16 conversations per step, lr 3e-3
decaying to 3e-4 over 900 steps, ~40 s when the machine is not shared): exact match on 50 held-out
prompts 0.00 for the base model, 1.00 after SFT with trainer.seed 1337, 1 and 2 (loss over trained
tokens 5.5 -> 0.0002). The loss sits on the digit-uniform plateau (3 ln 10 / 4 = 1.73) until it
drops near step 330-350. When it drops depends on the LR schedule and the order of float sums:
with 600 steps (a faster LR decay) it left the plateau only near step 400 and ended at loss 0.80,
0.18 exact (the same on the round's base commit), so the run is 900 steps.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from framework.checkpoint import load_model
from framework.data.chat import render, render_prompt
from framework.data.tokenizer import ByteTokenizer
from framework.generate import sample
from framework.prepare import PrepareConfig, prepare
from tests.helpers import make_cfg, read_metrics

STEPS = 900
MIN_EXACT_MATCH = 0.5  # measured 1.00 (three seeds); chance 1/1000


def digit_split(seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, held-out) three-digit prompts, disjoint."""
    numbers = [f"{i:03d}" for i in range(1000)]
    random.Random(seed).shuffle(numbers)
    return numbers[100:], numbers[:50]


def write_chat_jsonl(path: Path, numbers: list[str]) -> None:
    with open(path, "w") as f:
        for n in numbers:
            f.write(json.dumps({"prompt": f"repeat: {n}", "completion": n}) + "\n")


def exact_match(model, numbers: list[str]) -> float:
    """Share of greedy chat replies (stopped at end-of-text) equal to the prompt's digits."""
    tok = ByteTokenizer()
    model.eval()
    hits = 0
    for n in numbers:
        ids = render_prompt(f"repeat: {n}", tok)
        out = sample(model, ids, 6, model.cfg.block_size, greedy=True, stop_ids=(tok.eot_id,))
        reply = out[len(ids) :]
        hits += reply == [*tok.encode(n), tok.eot_id]
    return hits / len(numbers)


def sft_run(tmp_path: Path, steps: int):
    """Prepare the repeat task and fine-tune the Llama-style debug model on it; (cfg, run dir)."""
    from framework.train import train

    train_numbers, _ = digit_split()
    write_chat_jsonl(tmp_path / "repeat.jsonl", train_numbers)
    prepare(PrepareConfig(input=str(tmp_path / "repeat.jsonl"), output=str(tmp_path / "data"),
                          format="chat", val_fraction=0.0, workers=1))  # fmt: skip
    # seq_len = one conversation (all are alike): each window holds exactly one example
    turns = [{"role": "user", "content": "repeat: 000"}, {"role": "assistant", "content": "000"}]
    seq_len = len(render(turns, ByteTokenizer())[0])
    cfg = make_cfg([
        "task=sft", "model=debug-llama", "data.name=chat",
        f"data.sources=[{{name: rep, path: {tmp_path / 'data'}}}]", f"trainer.seq_len={seq_len}",
        "trainer.micro_batch_size=16", "trainer.global_batch_size=16", f"trainer.max_steps={steps}",
        "trainer.eval_every=0", "trainer.log_every=10", "trainer.device=cpu", "optim.lr=3e-3",
        "optim.warmup_steps=10", "optim.min_lr_ratio=0.1", f"checkpoint.every={steps}",
        f"run.dir={tmp_path / 'run'}", "checkpoint.resume=never",
    ])  # fmt: skip
    train(cfg)
    return cfg, tmp_path / "run"


@pytest.mark.slow
def test_sft_learns_held_out_exact_answers(tmp_path):
    """The base model never answers in shape (three digits, end of turn) nor right; after SFT
    every held-out reply has the shape and most are exact."""
    cfg, run = sft_run(tmp_path, STEPS)
    _, held_out = digit_split()
    tok = ByteTokenizer()
    base = make_base(cfg)
    model, _ = load_model(str(run))
    for m, want in ((base, False), (model, True)):
        shapes = []
        for n in held_out[:10]:
            ids = render_prompt(f"repeat: {n}", tok)
            reply = sample(m.eval(), ids, 6, 256, greedy=True, stop_ids=(tok.eot_id,))[len(ids) :]
            shapes.append(len(reply) == 4 and reply[-1] == tok.eot_id and bytes(reply[:3]).isdigit())
        assert all(shapes) if want else not any(shapes), shapes
    assert exact_match(base, held_out) == 0.0
    tuned = exact_match(model, held_out)
    print(f"exact match on {len(held_out)} held-out prompts after {STEPS} SFT steps: {tuned:.2f}")
    assert tuned >= MIN_EXACT_MATCH
    losses = [r["loss"] for r in read_metrics(run) if "loss" in r]
    assert losses[0] > 5.0 and losses[-1] < 1.0  # below the digit-uniform plateau, 3 ln 10 / 4 = 1.73
    rec = [r for r in read_metrics(run) if "loss" in r][-1]
    assert rec["tokens"] == STEPS * 16 * cfg.trainer.seq_len
    assert rec["trained_tokens"] == STEPS * 16 * 4  # three digits and end-of-text per window


def make_base(cfg):
    """The model train() starts from (the same seed): the 'base' of this fine-tuning."""
    from framework.parallel.materialize import initial_values, materialize, meta_model

    model = meta_model(cfg.model)  # as build_engine does for strategy=single
    materialize(model, torch.device("cpu"), initial_values(cfg))
    return model


def test_init_from_our_checkpoint_copies_weights_and_refuses_other_shapes(tmp_path, sample_data):
    from framework.checkpoint import CheckpointError
    from framework.model import GPT
    from framework.parallel.materialize import init_weights_from
    from framework.train import train
    from tests.helpers import TINY

    run = tmp_path / "run"
    train(make_cfg([*TINY, "trainer.max_steps=2", "trainer.device=cpu", f"run.dir={run}"]))
    src, _ = load_model(str(run))
    cfg = make_cfg([*TINY, f"model.init_from={run}"])
    model = GPT(cfg.model)
    init_weights_from(model, cfg.model.init_from)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), src.state_dict().values()))
    wide = GPT(make_cfg([*TINY, "model.n_embd=32"]).model)
    with pytest.raises(
        CheckpointError, match=r"tok_emb.weight: \(257, 64\) in the checkpoint, \(257, 32\)"
    ):
        init_weights_from(wide, str(run))
    with pytest.raises(CheckpointError, match="neither a Hugging Face directory"):
        init_weights_from(wide, str(tmp_path))


def test_generate_chat_renders_one_user_turn_and_stops_at_end_of_turn(tmp_path, sample_data):
    from framework.generate import GenerateConfig, run
    from framework.train import train
    from tests.helpers import TINY

    tok = ByteTokenizer()
    script = [5, 6, tok.eot_id, 7]  # a fake model that says "\x05\x06", ends its turn, then more

    def fake(ctx):
        n = ctx.size(1) - len(render_prompt("hi", tok))
        logits = torch.zeros(1, ctx.size(1), 257)
        logits[0, -1, script[n]] = 1.0
        return logits

    prompt = render_prompt("hi", tok)
    assert sample(fake, prompt, 10, 256, greedy=True, stop_ids=(tok.eot_id,)) == [
        *prompt,
        5,
        6,
        tok.eot_id,
    ]
    assert len(sample(fake, prompt, 4, 256, greedy=True)) == len(prompt) + 4  # no stop without chat

    run_dir = tmp_path / "run"
    train(make_cfg([*TINY, "trainer.max_steps=1", "trainer.device=cpu", f"run.dir={run_dir}"]))
    out = run(
        GenerateConfig(checkpoint=str(run_dir), prompt="hi", chat=True, greedy=True, max_new_tokens=5)
    )
    assert out["ids"][: len(prompt)] == prompt
    new = out["ids"][len(prompt) :]
    assert 1 <= len(new) <= 5 and tok.eot_id not in new[:-1]
    assert out["reply"] == tok.decode(new[:-1] if new[-1] == tok.eot_id else new)

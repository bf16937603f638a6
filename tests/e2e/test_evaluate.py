"""Issue 11 item 4: `python -m framework.evaluate` runs lm-evaluation-harness on our checkpoint,
offline, on a local multiple-choice task; its accuracy equals the one computed here by hand from
our own model's log-likelihoods of each choice."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from framework.checkpoint import load_model
from framework.data.tokenizer import load_tokenizer
from framework.train import train
from tests.helpers import TINY, make_cfg

lm_eval = pytest.importorskip("lm_eval")

# Sums with wrong answers that look like right ones, and choices of unequal length, so that
# acc (summed log-likelihood) and acc_norm (per character) can pick differently.
PAIRS = [
    (1, 2),
    (3, 4),
    (5, 5),
    (7, 1),
    (2, 9),
    (6, 6),
    (4, 8),
    (9, 9),
    (12, 7),
    (23, 45),
    (8, 0),
    (31, 3),
]
TASK_YAML = """\
task: arith_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def _docs() -> list[dict]:
    docs = []
    for i, (a, b) in enumerate(PAIRS):
        choices = [str(a + b), str(a + b + 1), str(a * b + 10), str(a - b)]
        k = i % 4  # the right answer's position varies
        choices[0], choices[k] = choices[k], choices[0]
        docs.append({"question": f"{a}+{b}=", "choices": choices, "answer": k})
    return docs


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sample_data):
    d = tmp_path_factory.mktemp("eval") / "run"
    train(make_cfg([*TINY, f"run.dir={d}", "trainer.max_steps=4"]))
    return d


@pytest.fixture(scope="module")
def ours(trained):
    model, state = load_model(trained)
    return model.eval(), load_tokenizer(state["config"]["data"]["tokenizer"])


@torch.no_grad()
def _logprob(model, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context) from one forward over the whole sequence, unbatched."""
    ids = torch.tensor([context + continuation])
    logp = F.log_softmax(model(ids[:, :-1]).float(), dim=-1)[0]  # (T-1, V)
    return sum(float(logp[len(context) - 1 + j, t]) for j, t in enumerate(continuation))


def _hand_accuracy(model, tok, docs) -> tuple[float, float]:
    acc = acc_norm = 0
    for d in docs:
        lls = [_logprob(model, tok.encode(d["question"]), tok.encode(c)) for c in d["choices"]]
        acc += max(range(len(lls)), key=lambda i: lls[i]) == d["answer"]
        norm = [ll / len(c) for ll, c in zip(lls, d["choices"], strict=True)]  # lm-eval: per character
        acc_norm += max(range(len(norm)), key=lambda i: norm[i]) == d["answer"]
    return acc / len(docs), acc_norm / len(docs)


def _cli(*args: str, cwd, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": os.getcwd(), "HF_DATASETS_CACHE": str(cwd / "hf-cache")}
    return subprocess.run(
        [sys.executable, "-m", "framework.evaluate", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env | (env_extra or {}),
    )


@pytest.mark.slow
def test_evaluate_cli_reports_the_hand_computed_accuracy(trained, ours, tmp_path):
    docs = _docs()
    data = tmp_path / "arith.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "arith.yaml").write_text(TASK_YAML.format(data=data))
    want_acc, want_norm = _hand_accuracy(*ours, docs)
    assert want_acc != want_norm  # the task tells the two metrics apart (else a mix-up could hide)

    out = _cli(f"checkpoint={trained}", "tasks=arith.yaml", "batch_size=5", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    result = json.loads((trained / "eval" / "step_00000004.json").read_text())
    metrics = result["tasks"]["arith_mc"]["metrics"]
    assert metrics["acc,none"] == pytest.approx(want_acc, abs=1e-12)
    assert metrics["acc_norm,none"] == pytest.approx(want_norm, abs=1e-12)
    assert result["step"] == 4 and result["tasks"]["arith_mc"]["n_samples"]["effective"] == len(docs)
    lines = [x for x in out.stdout.splitlines() if x.startswith("arith_mc:")]
    assert lines == [
        f"arith_mc: acc={want_acc:.4g} (+-{metrics['acc_stderr,none']:.3g}) "
        f"acc_norm={want_norm:.4g} (+-{metrics['acc_norm_stderr,none']:.3g}) n={len(docs)}"
    ]


def _instances(kind: str, args: list[tuple]):
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_wrapper_scores_with_our_model(ours):
    """FrameworkLM's loglikelihood / rolling / generate_until equal our model's own numbers:
    batched with right padding, an empty context conditioned on end-of-text, a context longer
    than block_size cut on the left, a text longer than block_size scored in windows."""
    from framework.generate import sample
    from framework.lm_eval_model import FrameworkLM

    model, tok = ours
    lm = FrameworkLM(model, tok, batch_size=3)
    bs = model.cfg.block_size
    long_ctx = "abcdefghij" * 30  # 300 bytes > block_size=256
    pairs = [("12+7=", "19"), ("the cat ", "sat"), ("", "hello"), ("x", "yz!"), (long_ctx, " end")]
    got = lm.loglikelihood(_instances("loglikelihood", pairs))
    eot = tok.eot_id
    want = [
        _logprob(model, tok.encode("12+7="), tok.encode("19")),
        _logprob(model, tok.encode("the cat"), tok.encode(" sat")),  # lm-eval moves the space
        _logprob(model, [eot], tok.encode("hello")),
        _logprob(model, tok.encode("x"), tok.encode("yz!")),
        _logprob(model, tok.encode(long_ctx)[-(bs + 1 - 4) :], tok.encode(" end")),
    ]
    assert [g for g, _ in got] == pytest.approx(want, rel=1e-5, abs=1e-5)
    greedy = sample(model, tok.encode("12+7="), 2, bs, greedy=True)[-2:]
    assert got[0][1] == (greedy == tok.encode("19"))

    text = "".join(chr(97 + (i * 7) % 26) for i in range(300))  # 300 tokens: two windows
    ids = tok.encode(text)
    first = _logprob(model, [eot], ids[:bs])
    # second window: the last bs tokens in, scoring only the 300 - bs tokens not yet predicted
    second = _logprob(model, ids[len(ids) - bs - 1 : bs], ids[bs:])
    short = _logprob(model, [eot], tok.encode("abc"))
    rolling = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(text,), ("abc",)]))
    assert rolling == pytest.approx([first + second, short], rel=1e-5)

    gen = lm.generate_until(
        _instances("generate_until", [("the ", {"until": ["\n"], "max_gen_toks": 12})])
    )
    full = tok.decode(sample(model, tok.encode("the "), 12, bs, greedy=True)[4:])
    assert gen == [full.split("\n")[0]]


def test_evaluate_errors_are_one_line(trained, tmp_path):
    missing = _cli(f"checkpoint={tmp_path / 'nope'}", "tasks=x.yaml", cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nope'}: no committed checkpoint here (nor a run dir or checkpoints/ "
        "with `latest`)"
    ]
    unknown = _cli(f"checkpoint={trained}", "tasks=[nope.yaml]", cwd=tmp_path)
    assert unknown.returncode == 2
    assert unknown.stderr.strip().splitlines() == ["error: tasks: no such task YAML file: nope.yaml"]

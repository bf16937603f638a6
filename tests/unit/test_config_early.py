"""RELIABILITY D1-D4: impossible parallel layouts, batch arithmetic and model shapes are refused
by `train` before any process group or device exists, naming every key, degree and the world
size; the checks are explicit raises (they survive `python -O`); a `???` left unset fails at
resolve time naming its key path."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from framework.config import ConfigError, load
from tests.helpers import ROOT, checkout_env, compose

# (overrides, world size, every fragment the message must name)
CASES = {
    # D1: world size not divisible by TP; a data-parallel degree of 0 (TP larger than the world)
    "world_not_divisible_by_tp": (
        ["strategy=tp_fsdp", "strategy.tp=2"],
        3,
        ["world size 3", "strategy.tp=2", "data-parallel degree world/tp = 3/2"],
    ),
    "dp_degree_zero": (
        ["strategy=tp_fsdp", "strategy.tp=4"],
        2,
        ["world size 2", "strategy.tp=4", "world/tp = 2/4"],
    ),
    # D2: global batch not divisible by micro-batch x DP; gradient accumulation below 1
    "batch_not_divisible": (
        ["strategy=ddp", "trainer.global_batch_size=8", "trainer.micro_batch_size=4"],
        4,
        [
            "trainer.global_batch_size=8",
            "trainer.micro_batch_size=4",
            "data-parallel degree 4",
            "world size 4",
        ],
    ),  # fmt: skip
    "grad_accum_below_one": (
        ["strategy=ddp", "trainer.global_batch_size=4", "trainer.micro_batch_size=4"],
        2,
        ["trainer.global_batch_size=4", "data-parallel degree 2", "accumulation steps would be 0.5"],
    ),
    "grad_accum_zero": (
        ["trainer.global_batch_size=0"],
        1,
        ["trainer.global_batch_size=0 must be > 0"],
    ),
    # D3: hidden % heads; heads % TP; kv heads % TP (GQA); the embedding rows
    "hidden_not_divisible_by_heads": (
        ["model.n_embd=100", "model.n_head=3"],
        1,
        ["model.n_embd=100 is not divisible by model.n_head=3"],
    ),
    "heads_not_divisible_by_tp": (
        ["strategy=tp", "strategy.tp=8"],
        8,
        ["model.n_head=4 is not divisible by strategy.tp=8"],
    ),
    "kv_heads_not_divisible_by_tp": (
        ["model=debug-llama", "model.n_head=4", "model.n_kv_head=1", "strategy=tp", "strategy.tp=2"],
        2,
        ["model.n_kv_head=1 is not divisible by strategy.tp=2"],
    ),
    "vocab_rows": (["model.vocab_size=0"], 1, ["model.vocab_size=0 must be > 0"]),
}

# One fresh interpreter under `python -O` (asserts stripped) runs every case through `train`, as
# a launcher would start it, and reports what it saw: refusals and CUDA / process-group state.
SCRIPT = """
import json, os, sys, time
import torch
from framework.config import ConfigError
from framework.train import train
from tests.helpers import make_cfg
out = {}
for name, (overrides, world) in json.loads(sys.argv[1]).items():
    os.environ.update(WORLD_SIZE=str(world), RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE=str(world))
    cfg = make_cfg(overrides + ["run.dir=" + sys.argv[2] + "/" + name])
    t0 = time.process_time()
    try:
        train(cfg)
        msg = None
    except ConfigError as e:
        msg = str(e)
    out[name] = {"error": msg, "cpu_s": time.process_time() - t0}
out["cuda_initialized"] = torch.cuda.is_initialized()
out["process_group"] = torch.distributed.is_initialized()
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def refused(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("early")
    cases = {k: (o, w) for k, (o, w, _) in CASES.items()}
    p = subprocess.run(
        [sys.executable, "-O", "-c", SCRIPT, json.dumps(cases), str(tmp)],
        cwd=ROOT, env=checkout_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT")]
    assert p.returncode == 0 and lines, p.stdout[-2000:] + p.stderr[-4000:]
    result = json.loads(lines[0][len("RESULT") :])
    result["run_dirs"] = [x.name for x in tmp.iterdir()]
    return result


@pytest.mark.parametrize("name", CASES)
def test_refused_before_any_process_group_or_device_naming_every_key(refused, name):
    msg = refused[name]["error"]
    assert msg is not None, f"{name} was not refused"
    for fragment in CASES[name][2]:
        assert fragment in msg, (fragment, msg)
    assert refused[name]["cpu_s"] < 5  # CPU seconds, not wall: a loaded machine does not flake it


def test_no_cuda_context_no_process_group_no_run_dir(refused):
    assert refused["cuda_initialized"] is False
    assert refused["process_group"] is False
    assert refused["run_dirs"] == []  # refused before run.dir was created


def test_unset_mandatory_key_fails_at_resolve_naming_its_path():
    """D4: a `???` left unset (here run.dir) is a ConfigError naming the full key path."""
    with pytest.raises(ConfigError, match=r"(?s)missing mandatory value: dir.*full_key: run\.dir"):
        load(compose(["run.dir=???"]))

"""Issue 10 item 4, measured: exporting a sharded (fsdp, 2 ranks) gpt2-124m checkpoint peaks near
one tensor plus one output file of host memory, not the whole model; `model.init_from` of the
export adds about one tensor to the model it fills, not a second copy of the model.

Peak host memory is the export process's own ru_maxrss (os.wait4 on that one child: pytest's
RUSAGE_CHILDREN would be the largest of all its children, e.g. the training ranks). The baseline
is a process that imports what the export imports."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.distributed.launch import BIN, free_port
from tests.helpers import ROOT, checkout_env

pytestmark = pytest.mark.slow

PARAMS_124M = 124_439_808  # tied embeddings
MODEL_BYTES = PARAMS_124M * 4  # fp32
LARGEST_BYTES = 50257 * 768 * 4  # the token embedding (wte)


def peak_rss_bytes(cmd: list[str], cwd: Path, log: Path) -> int:
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=checkout_env(OMP_NUM_THREADS="1"), stdout=out, stderr=out
        )
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{log.read_text()[-4000:]}")
    return usage.ru_maxrss * 1024  # KiB on Linux


@pytest.fixture(scope="module")
def fsdp_124m(tmp_path_factory, sample_data) -> Path:
    """One step of gpt2-124m under fsdp on 2 gloo ranks, checkpointed: 2 DCP shard files."""
    run = tmp_path_factory.mktemp("fsdp124m") / "run"
    cmd = [
        str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
        "-m", "framework.train", "model=gpt2-124m", "strategy=fsdp", "trainer.device=cpu",
        "trainer.seq_len=32", "trainer.micro_batch_size=1", "trainer.global_batch_size=2",
        "trainer.max_steps=1", "trainer.eval_every=0", "trainer.sample_tokens=0",
        "checkpoint.every=1", f"run.dir={run}",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=ROOT, env=checkout_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    shards = list((run / "checkpoints" / "step_00000001" / "state").glob("*.distcp"))
    assert len(shards) == 2
    return run


def test_export_of_sharded_checkpoint_peaks_near_one_tensor(fsdp_124m, tmp_path):
    py = sys.executable
    imports = (
        "import framework.export, framework.checkpoint, torch.distributed.checkpoint, safetensors.torch"
    )
    baseline = peak_rss_bytes(
        [py, "-c", imports + ", huggingface_hub, hydra"], tmp_path, tmp_path / "b.log"
    )

    def export(out: str, *extra: str) -> int:
        cmd = [py, "-m", "framework.export", f"checkpoint={fsdp_124m}", f"out={tmp_path / out}", *extra]
        return peak_rss_bytes(cmd, tmp_path, tmp_path / f"{out}.log") - baseline

    sharded = export("sharded", "max_shard_size=50MB")
    mib = 2**20
    print(
        f"\nexport peak above baseline ({baseline / mib:.0f} MiB): {sharded / mib:.0f} MiB; "
        f"model {MODEL_BYTES / mib:.0f} MiB, largest tensor {LARGEST_BYTES / mib:.0f} MiB"
    )
    # Measured (2 cores, torch 2.13 CPU): 263 MiB = 0.55 x the model = 1.8 x the embedding (the
    # tensor plus DCP's read buffers of its two rank chunks), the same for 10MB and 50MB
    # shards. The default one-file export of the same checkpoint peaked 581-625 MiB above the
    # baseline (it holds the whole model; not repeated here to save ~25 s); before issue 10
    # the export held the loaded model plus its converted copy (about 2x the model).
    assert sharded < 0.7 * MODEL_BYTES
    assert sharded < 2.5 * LARGEST_BYTES

    out = tmp_path / "sharded"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == MODEL_BYTES
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == 9  # 50MB shards of 498MB: the 154MB embedding alone, then 8 more
    limit = 50_000_000
    for name in files:
        with safe_open(str(out / name), framework="pt") as part:
            sizes = [part.get_slice(k).get_shape() for k in part.keys()]
        nbytes = sum(4 * math.prod(s) for s in sizes)
        assert nbytes <= limit or len(sizes) == 1, (name, nbytes)

    # init_from of that export: the peak above the freshly built model (whose build sets the
    # peak before loading). Measured 77 MiB; the whole-file load before issue 10: 601 MiB.
    script = (
        "import json, resource, sys\n"
        "from framework.hf.load import load_hf_weights\n"
        "from framework.model import GPT, ModelConfig\n"
        "m = GPT(ModelConfig(style='gpt2', n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024))\n"
        "built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "load_hf_weights(m, sys.argv[1])\n"
        "loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps({'added_bytes': (loaded - built) * 1024}))\n"
    )
    proc = subprocess.run(
        [py, "-c", script, str(out)], cwd=tmp_path, env=checkout_env(OMP_NUM_THREADS="1"),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    added = json.loads(proc.stdout.strip().splitlines()[-1])["added_bytes"]
    print(f"init_from peak above the built model: {added / mib:.0f} MiB")
    assert added < 0.4 * MODEL_BYTES

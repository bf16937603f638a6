"""RELIABILITY E1/E2, issue 8 failure 1: nothing in a checkpoint runs code when loaded.

A pickle payload planted in any checkpoint file, with manifest.json re-hashed (anyone who can
write the folder can), must execute nothing on resume, generate or export, and the error must
name the file. A static check keeps unrestricted unpickling out of framework/."""

from __future__ import annotations

import ast
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from framework.checkpoint import CheckpointError, load_model
from framework.data.shards import sha256_file
from framework.safeload import RestrictedUnpickler, SafeLoadPlanner, UnsafeCheckpointError
from framework.train import train
from tests.helpers import TINY, make_cfg

ROOT = Path(__file__).resolve().parents[2]
STEP = "checkpoints/step_00000001"


# -- E1: static check -----------------------------------------------------------------------
def unsafe_loads(source: str, filename: str) -> list[str]:
    """Calls that may unpickle attacker bytes: torch.load without weights_only=True, and any
    pickle.load / loads / Unpickler except the restricted unpickler of framework/safeload.py."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            name = f"{node.value.id}.{node.attr}"
            if name in ("pickle.load", "pickle.loads", "pickle._load", "pickle._loads", "dill.load"):
                found.append(f"{filename}:{node.lineno}: {name}")
            if name == "pickle.Unpickler" and not filename.endswith("framework/safeload.py"):
                found.append(f"{filename}:{node.lineno}: {name}")
        if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "dill", "cloudpickle"):
            found.append(f"{filename}:{node.lineno}: from {node.module} import ...")
        # DCP reads its .metadata with plain pickle (and byte items with weights_only=False):
        # only framework/safeload.py may call dcp.load or build a plain FileSystemReader
        if not filename.endswith("framework/safeload.py"):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in ("load", "async_load")
                and (isinstance(node.value, ast.Name) and node.value.id == "dcp")
            ):
                found.append(f"{filename}:{node.lineno}: dcp.{node.attr} outside framework/safeload.py")
            if isinstance(node, ast.Name) and node.id == "FileSystemReader":
                found.append(f"{filename}:{node.lineno}: FileSystemReader outside framework/safeload.py")
        if isinstance(node, ast.Call):
            f = node.func
            is_torch_load = (isinstance(f, ast.Attribute) and f.attr == "load" and
                             isinstance(f.value, ast.Name) and f.value.id == "torch")  # fmt: skip
            if is_torch_load:
                kw = {k.arg: k.value for k in node.keywords}
                safe = (
                    isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                )
                if not safe:
                    found.append(f"{filename}:{node.lineno}: torch.load without weights_only=True")
    return found


def test_static_check_catches_unsafe_loads():
    bad = (
        "import pickle, torch\n"
        "torch.load(p)\n"
        "torch.load(p, weights_only=False)\n"
        "pickle.loads(b)\n"
        "class U(pickle.Unpickler): pass\n"
        "from pickle import load\n"
        "dcp.load(state, checkpoint_id=p)\n"
        "FileSystemReader(p).read_metadata()\n"
    )
    assert len(unsafe_loads(bad, "framework/x.py")) == 7
    assert (
        unsafe_loads("import torch\ntorch.load(p, map_location='cpu', weights_only=True)\n", "x.py")
        == []
    )


def test_framework_has_no_unrestricted_unpickling():
    found = []
    for path in sorted((ROOT / "framework").rglob("*.py")):
        found += unsafe_loads(path.read_text(), str(path.relative_to(ROOT)))
    assert found == [], "unrestricted unpickling in framework/:\n" + "\n".join(found)


# -- E2: planted payloads -----------------------------------------------------------------
class Payload:
    """Unpickling this creates the marker file (stands for any os.system(...))."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def rehash(ckpt: Path) -> None:
    """What an attacker does after planting: make manifest.json agree with the new bytes."""
    mf = ckpt / "manifest.json"
    files = json.loads(mf.read_text())["files"]
    for name in files:
        p = ckpt / name
        files[name] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    mf.write_text(json.dumps({"files": files}, indent=1))


def plant(run: Path, target: str, marker: Path) -> Path:
    """Replace one file of the checkpoint with a pickle payload; re-hash the manifest."""
    ckpt = run / STEP
    path = next(ckpt.glob(target))
    if path.suffix == ".pt":  # a torch.save zip archive, as our RNG files are
        torch.save({"torch": Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(Payload(marker)))
    rehash(ckpt)
    return path


@pytest.fixture(scope="module")
def trained(sample_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("safeload") / "run"
    train(make_cfg([*TINY, "trainer.max_steps=1", "checkpoint.every=1", f"run.dir={run}"]))
    return run


TARGETS = ["state/.metadata", "state/*.distcp", "rng/rank_00000.pt"]


@pytest.mark.parametrize("target", TARGETS)
def test_planted_payload_runs_nothing_on_resume_or_load_model(trained, tmp_path, target):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    marker = tmp_path / "PWNED"
    planted = plant(run, target, marker)
    with pytest.raises(CheckpointError, match=str(planted.name)) as resume_err:
        train(make_cfg([*TINY, "trainer.max_steps=2", "checkpoint.every=1", f"run.dir={run}"]))
    assert str(planted) in str(resume_err.value)
    assert not marker.exists()
    if target != "rng/rank_00000.pt":  # generate/export read only the model state
        with pytest.raises(CheckpointError, match=str(planted.name)):
            load_model(run)
        assert not marker.exists()


@pytest.mark.slow  # a fresh interpreter per CLI
@pytest.mark.parametrize("module", ["framework.generate", "framework.export"])
def test_planted_metadata_runs_nothing_in_generate_and_export_cli(trained, tmp_path, module):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    marker = tmp_path / "PWNED"
    planted = plant(run, "state/.metadata", marker)
    args = (
        ["prompt_ids=[1,2]", "max_new_tokens=2"]
        if module.endswith("generate")
        else [f"out={tmp_path}/hf"]
    )
    out = subprocess.run(
        [sys.executable, "-m", module, f"checkpoint={run}", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert out.returncode != 0
    assert str(planted) in out.stderr and "refused to load" in out.stderr
    assert not marker.exists()


def test_restricted_unpickler_refuses_globals_outside_the_allowlist(tmp_path):
    marker = tmp_path / "PWNED"
    with pytest.raises(UnsafeCheckpointError, match="posix.system|os.system"):
        RestrictedUnpickler(io.BytesIO(pickle.dumps(Payload(marker)))).load()
    assert not marker.exists()
    # what DCP's metadata does hold still loads
    assert RestrictedUnpickler(
        io.BytesIO(pickle.dumps((torch.Size([2, 3]), torch.bfloat16)))
    ).load() == (
        torch.Size([2, 3]),
        torch.bfloat16,
    )


def test_dcp_byte_items_are_read_with_weights_only(tmp_path):
    """DCP's DefaultLoadPlanner.load_bytes unpickles non-tensor items (optimizer
    hyperparameters) with weights_only=False; ours refuses a payload there."""
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

    marker = tmp_path / "PWNED"
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    buf.seek(0)
    planner = SafeLoadPlanner()
    planner.set_up_planner({"x": 0}, None, True)
    item = ReadItem(LoadItemType.BYTE_IO, MetadataIndex("x"), torch.Size([0]), MetadataIndex("x"),
                    torch.Size([0]), torch.Size([0]))  # fmt: skip
    with pytest.raises(pickle.UnpicklingError):
        planner.load_bytes(item, buf)
    assert not marker.exists()

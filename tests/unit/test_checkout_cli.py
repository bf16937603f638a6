"""Subprocess tests exercise THIS checkout's CLIs, never an installed copy: with an editable
install of another checkout in the environment, a test that launches `python -m framework.X`
without PYTHONPATH = repo root tests that other copy, and a broken CLI here passes."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT, run_module


def test_cli_subprocess_runs_the_checkout(tmp_path):
    """Hydra reports where the CLI found its config tree: conf/ next to the framework package
    that was imported (framework.config.CONF_DIR). Run from a foreign cwd, it must be ours."""
    out = run_module("framework.train", "--info", "searchpath", cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"file://{ROOT / 'conf'} " in out.stdout, out.stdout


# System tools a test may call as they are (they never import `framework`): the Slurm
# tier's daemons and queries, package installs.
SYSTEM_TOOLS = {"apt-get", "chown", "pgrep", "runuser", "munged", "scontrol", "scancel", "sinfo"}


def _system_tool(call: ast.Call) -> bool:
    """`subprocess.run(["scontrol", ...])` or a helper `_run("pgrep", ...)`-style list literal."""
    first = call.args[0] if call.args else None
    if isinstance(first, (ast.List, ast.Tuple)) and first.elts:
        first = first.elts[0]
    return isinstance(first, ast.Constant) and first.value in SYSTEM_TOOLS


def _subprocess_calls(tree: ast.AST):
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "subprocess"
            and not _system_tool(node)
        ):
            yield node


def test_every_test_subprocess_sets_env_and_cwd():
    """A subprocess launched without env= inherits whatever PYTHONPATH pytest had (often none:
    the installed copy wins); without cwd= it depends on where pytest was started. Use
    tests.helpers.run_module / checkout_env, or pass both explicitly."""
    offenders = []
    files = sorted((ROOT / "tests").rglob("*.py"))
    assert len(files) > 10
    for path in files:
        for call in _subprocess_calls(ast.parse(path.read_text(), str(path))):
            given = {k.arg for k in call.keywords}
            if not {"env", "cwd"} <= given:
                offenders.append(
                    f"{Path(path).relative_to(ROOT)}:{call.lineno}: missing {{'env', 'cwd'}} - {given}"
                )
    assert not offenders, "\n".join(offenders)

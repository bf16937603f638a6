"""Issue 17 item 1: framework/ is layered (framework/__init__.py lists the layers, setup.cfg's
import-linter contracts enforce them), has no import cycle, and imports inside functions only
what is heavy and optional, each with its reason."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"

# What a function may import: packages that take seconds to import or are optional extras, and
# our one module that subclasses lm_eval's model class (it must be imported after evaluate sets
# HF_*_OFFLINE, and with it lm_eval). Everything else goes at the top of its module.
LOCAL_IMPORTS_ALLOWED = (
    "deepspeed",
    "lm_eval",
    "transformers",
    "wandb",
    "torchao",
    "tiktoken",
    "matplotlib",
    "torch.utils.tensorboard",
    "torch.testing._internal.distributed.fake_pg",  # plan.dry_run's fake process group
    "framework.lm_eval_model",
)


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """lint-imports on the framework/ and setup.cfg under `root` (no cache written there)."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=root,
        env=os.environ | {"PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_import_contracts_are_kept():
    r = lint_imports(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Contracts: 2 kept, 0 broken." in r.stdout


def test_an_upward_import_breaks_the_layers_contract(tmp_path):
    """The check that CI runs fails on the first upward import, naming it."""
    shutil.copytree(
        ROOT / "framework", tmp_path / "framework", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "setup.cfg", tmp_path / "setup.cfg")
    gpt = tmp_path / "framework" / "model" / "gpt.py"
    gpt.write_text(gpt.read_text() + "\nimport framework.train  # noqa: E402\n")
    r = lint_imports(tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "framework.model is not allowed to import framework.train" in r.stdout
    assert "framework.model.gpt -> framework.train" in r.stdout


def test_no_import_cycle_inside_packages_either():
    """The layers contract sees imports between layers; a cycle inside one package (e.g. two
    modules of framework/data) would hide from it."""
    graph = grimp.build_graph("framework", cache_dir=None)
    imports = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    cycles = [(a, b) for a in imports for b in imports[a] if graph.chain_exists(importer=b, imported=a)]
    assert cycles == []


def _comment_above(lines: list[str], lineno: int) -> bool:
    """A `#` comment on the import's line or above it, through blank, import and comment lines
    (a group of imports shares one comment)."""
    if "#" in lines[lineno - 1]:
        return True
    for line in reversed(lines[: lineno - 1]):
        text = line.strip()
        if text.startswith("#") or "  #" in text:
            return True
        if text and not text.startswith(("import ", "from ")):
            return False
    return False


def local_imports() -> list[tuple[str, int, str, str]]:
    """(file, line, function, module) of every import inside a function of framework/."""
    found = []
    for path in sorted((ROOT / "framework").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    found += [(str(path), node.lineno, fn.name, a.name) for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    assert node.level == 0, f"{path}:{node.lineno}: relative import"
                    found.append((str(path), node.lineno, fn.name, node.module))
    return found


def test_function_local_imports_are_heavy_optional_dependencies_with_a_reason():
    allowed = [
        (f, n, fn, m)
        for f, n, fn, m in local_imports()
        if any(m == a or m.startswith(a + ".") for a in LOCAL_IMPORTS_ALLOWED)
    ]
    assert [x for x in local_imports() if x not in allowed] == []
    unexplained, explained = [], set()  # a package explained once per function
    for f, n, fn, m in allowed:
        lines = Path(f).read_text().splitlines()
        top = (f, fn, m.split(".")[0])
        if _comment_above(lines, n):
            explained.add(top)
        elif top not in explained:
            unexplained.append(f"{f}:{n} ({m})")
    assert unexplained == []


def test_no_imports_moved_inside_functions_to_hide_a_cycle():
    hits = [
        f"{p}:{n}"
        for p in (ROOT / "framework").rglob("*.py")
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if "imports this module" in line
    ]
    assert hits == []

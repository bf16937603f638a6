"""Every command README.md and the docs/ pages show runs (issue 7 Build 5, issue 17), and every
relative link of those pages resolves.

The fenced command blocks of the PAGES are extracted (untagged or sh/bash/console blocks; `\\`
continuations joined, `#` comments dropped) and each command is classified by the table RULES:
- `run`: executed in one scratch directory, in PAGES order and in page order within a page (so
  `checkpoint=runs/124m` finds the run an earlier command wrote, and fine-tuning finds the
  tour's export), with tiny sizes appended (the TINY model, 2 steps) and the per-command
  substitutions of SUBS; a command shown on several pages (the same words) runs once, where it
  first appears; inputs the pages assume (a corpus, a tokenizer file) are made by `make_inputs`,
  and a ```yaml block whose first line is `# <path>` is written to that path first (the pages'
  own config files);
- `plan`: multi-GPU / multi-node launches, validated with `python -m framework.plan` for the
  world size parsed from the launcher arguments, with the line's own overrides;
- `skip`: only `make test` (this suite).
A command no rule matches fails the fast test below, so a new command on any page cannot go
untested: add a rule (and inputs) here. A new page must be added to PAGES (a fast test says so).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.helpers import TINY, read_metrics

ROOT = Path(__file__).resolve().parents[2]
# Every documentation page, in the order their commands run (one scratch directory: later pages
# read what earlier ones wrote, e.g. fine-tuning starts from the tour's export hf/124m).
PAGES = ("README.md", "docs/README.md", "docs/configs.md", "docs/data.md", "docs/parallelism.md", "docs/3d-parallelism.md", "docs/plan.md",
         "docs/checkpoints.md", "docs/observability.md", "docs/launching.md", "docs/exporting.md", "docs/fine-tuning.md", "docs/moe.md", "docs/long-context.md")  # fmt: skip
COMMAND_LANGS = ("", "sh", "bash", "shell", "console")
ENTRY = ["python", "-m"]  # replaced by sys.executable: the checkout's framework, not an installed one
CONSOLE_SCRIPTS = {"fw-train": "train", "fw-prepare": "prepare", "fw-plan": "plan", "fw-generate": "generate",
                   "fw-export": "export", "fw-evaluate": "evaluate", "fw-report": "report"}  # fmt: skip
TRAIN_TINY = [*TINY, "trainer.max_steps=2", "trainer.device=cpu"]

# Per entry point: the pages' values replaced by tiny ones (whole tokens), and overrides appended.
SUBS: dict[str, dict[str, str]] = {
    # max_tokens=256: the classify example's, which must equal TINY's trainer.seq_len=32
    "prepare": {
        "workers=8": "workers=1",
        "train_tokenizer=32000": "train_tokenizer=320",
        "max_tokens=256": "max_tokens=32",
    },
    "generate": {"max_new_tokens=64": "max_new_tokens=8"},
}
APPEND: dict[str, list[str]] = {
    "train": TRAIN_TINY,
    "prepare": ["val_fraction=0.05"],  # the scratch corpus is small: keep a few validation docs
}
# Inputs a page's command expects beside the pages' own outputs: data/<name> directories
# the text says are yours to prepare, here the prepared data/web under other names.
LINKS = {"data/wiki": "data/web", "data/cc": "data/web", "data/webtext2": "data/web",
         "data/books1": "data/web", "data/books2": "data/web", "data/wikipedia": "data/web"}  # fmt: skip


@dataclass
class Command:
    line: int
    text: str
    page: str = "README.md"

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.text, comments=True)


def readme_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """(language, first line number, lines) of every fenced block."""
    blocks, lang, start, body = [], None, 0, []
    for n, raw in enumerate(text.splitlines(), 1):
        if raw.startswith("```"):
            if lang is None:
                lang, start, body = raw[3:].strip(), n + 1, []
            else:
                blocks.append((lang, start, body))
                lang = None
        elif lang is not None:
            body.append(raw)
    return blocks


def readme_commands(text: str, page: str = "README.md") -> list[Command]:
    cmds = []
    for lang, start, body in readme_blocks(text):
        if lang not in COMMAND_LANGS:
            continue
        joined, first = "", None
        for n, raw in enumerate(body, start):
            line = raw.rstrip()
            first = n if first is None else first
            if line.endswith("\\"):
                joined += line[:-1] + " "
                continue
            joined += line
            if joined.strip() and not joined.strip().startswith("#"):
                cmds.append(Command(first, joined.strip(), page))
            joined, first = "", None
    return cmds


def readme_files(text: str) -> dict[str, str]:
    """{path: content} of the ```yaml blocks that start with a `# <path>` comment."""
    files = {}
    for lang, _, body in readme_blocks(text):
        if lang == "yaml" and body and (m := re.fullmatch(r"#\s*(\S+\.ya?ml)\s*", body[0])):
            files[m[1]] = "\n".join(body) + "\n"
    return files


def merge(overrides: list[str], extra: list[str]) -> list[str]:
    """`overrides` then `extra`; a key set in both keeps only extra's value (Hydra refuses a
    key given twice). Flags (--config-dir DIR) stay first."""

    def key(o: str) -> str:
        return o.split("=", 1)[0].lstrip("+~") if "=" in o else o

    last = {key(e): i for i, e in enumerate(extra)}
    extra = [e for i, e in enumerate(extra) if last[key(e)] == i]
    return [o for o in overrides if key(o) not in last] + extra


def page_commands() -> list[Command]:
    """Every command of every page, in PAGES order; a command already shown on an earlier page
    or line (the same words, comments aside) is left out: it ran there."""
    cmds, seen = [], set()
    for page in PAGES:
        for c in readme_commands((ROOT / page).read_text(), page):
            if tuple(c.argv) not in seen:
                seen.add(tuple(c.argv))
                cmds.append(c)
    return cmds


@dataclass
class Plan:
    """What the test does with one command of a page."""

    kind: str  # run | plan | skip
    argv: list[str]  # the command to execute (run, plan)
    entry: str = ""  # framework entry point (train, prepare, ...)
    world: int = 1
    why: str = ""


def _entry_argv(entry: str, args: list[str]) -> Plan:
    args = [SUBS.get(entry, {}).get(a, a) for a in args]
    args = merge(args, APPEND.get(entry, []))
    return Plan("run", [sys.executable, "-m", f"framework.{entry}", *args], entry)


def _plan_argv(args: list[str], world: int) -> Plan:
    argv = [sys.executable, "-m", "framework.plan", *merge(args, [f"plan.world_size={world}"])]
    return Plan("plan", argv, "plan", world)


def _slurm_gpus_per_node(opts: dict) -> int:
    """Processes per node of train.sbatch: NPROC_PER_NODE defaults to the GPUs granted."""
    m = re.search(
        r"^#SBATCH --gpus-per-node=(\d+)", (ROOT / "launchers/slurm/train.sbatch").read_text(), re.M
    )
    return int(opts.get("--gpus-per-node", m[1] if m else 1))


def _python_m(a: list[str]) -> Plan | None:
    if len(a) > 2 and a[:2] == ENTRY and a[2].startswith("framework.") and a[2] != "framework.plan":
        return _entry_argv(a[2].removeprefix("framework."), a[3:])
    if a[:3] == [*ENTRY, "framework.plan"]:  # cheap at any size: run as written
        return Plan("run", [sys.executable, "-m", "framework.plan", *a[3:]], "plan")
    return None


def _console(a: list[str]) -> Plan | None:
    return (
        _python_m([*ENTRY, f"framework.{CONSOLE_SCRIPTS[a[0]]}", *a[1:]])
        if a[0] in CONSOLE_SCRIPTS
        else None
    )


def _make(a: list[str]) -> Plan | None:
    if a == ["make", "test"]:
        return Plan("skip", [], why="make test is this test suite")
    if a[:2] == ["make", "train"]:  # the Makefile runs `python -m framework.train $(ARGS)`
        args = [x for kv in a[2:] if kv.startswith("ARGS=") for x in shlex.split(kv[5:])]
        return _entry_argv("train", args)
    return None


def _launcher(a: list[str]) -> Plan | None:
    if a[0] in ("launchers/torchrun.sh", "launchers/deepspeed.sh"):
        return _plan_argv(a[2:], int(a[1]))
    if a[0] == "launchers/accelerate/launch.sh":
        return _plan_argv(a[3:], int(a[2]))
    if a[0] == "sbatch":
        i = a.index("launchers/slurm/train.sbatch")
        opts = dict(zip(a[1:i:2], a[2:i:2]))
        return _plan_argv(a[i + 1 :], int(opts.get("--nodes", 1)) * _slurm_gpus_per_node(opts))
    return None


RULES = (_python_m, _console, _make, _launcher)


def classify(cmd: Command) -> Plan | None:
    argv = cmd.argv
    for rule in RULES:
        if argv and (plan := rule(argv)) is not None:
            return plan
    return None


def make_inputs(cwd: Path) -> None:
    """What the pages' commands read but do not make: a jsonl.zst corpus, a books/ folder of
    text files, a `gpt2/tokenizer.json` (a small byte-level BPE trained here), `chat.jsonl` and
    `labelled.jsonl`."""
    import zstandard

    from framework.prepare import train_bpe

    words = "the of and to in is was for on that with as by at from his her it an are were".split()
    docs = [
        " ".join(words[(i * 7 + j) % len(words)] for j in range(40 + i % 30)) + f" {i}."
        for i in range(400)
    ]
    (cwd / "corpus").mkdir()
    data = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    (cwd / "corpus/part-0.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    (cwd / "books").mkdir()
    for k in range(2):
        (cwd / f"books/book{k}.txt").write_text("\n\n".join(docs[k::2]))
    (cwd / "gpt2").mkdir()
    train_bpe(iter(docs), 300, cwd / "gpt2/tokenizer.json")
    (cwd / "tasks").mkdir()  # the data of fine-tuning.md's local lm-eval task
    rows = [
        {"question": f"{a}+{b}=", "choices": [str(a + b), str(a + b + 1)], "answer": 0}
        for a, b in [(1, 2), (3, 4)]
    ]
    (cwd / "tasks/arith_mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    chat = [{"prompt": f"add: {i}+{i % 7}", "completion": str(i + i % 7)} for i in range(100)]
    (cwd / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chat))
    labelled = [
        {"text": f"message {i}" + "!" * (i % 3), "label": ["ham", "spam"][i % 2]} for i in range(100)
    ]
    (cwd / "labelled.jsonl").write_text("".join(json.dumps(x) + "\n" for x in labelled))
    files = {p: c for page in PAGES for p, c in readme_files((ROOT / page).read_text()).items()}
    for path, content in files.items():
        (cwd / path).parent.mkdir(parents=True, exist_ok=True)
        (cwd / path).write_text(content)


def link_inputs(cwd: Path) -> None:
    for name, target in LINKS.items():
        if not (cwd / name).exists() and (cwd / target).exists():
            (cwd / name).symlink_to((cwd / target).resolve(), target_is_directory=True)


def override(argv: list[str], key: str) -> str | None:
    values = [a.split("=", 1)[1] for a in argv if a.split("=", 1)[0] == key]
    return values[-1] if values else None


def check_outputs(plan: Plan, cwd: Path, out: str) -> str | None:
    """A behaviour per entry point, beyond the exit code: None if it holds, else what failed."""
    a = plan.argv
    if plan.entry == "train":
        run_dir = cwd / (override(a, "run.dir") or "runs/debug")
        steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
        return None if steps == [1, 2] else f"{run_dir}/metrics.jsonl has steps {steps}, expected [1, 2]"
    if plan.entry == "prepare":
        manifest = cwd / override(a, "output") / "manifest.json"
        return None if manifest.exists() else f"{manifest} was not written"
    if plan.entry == "export":
        out_dir = cwd / override(a, "out")
        missing = {"config.json", "model.safetensors"} - {p.name for p in out_dir.glob("*")}
        return f"{out_dir} lacks {sorted(missing)}" if missing else None
    if plan.entry == "generate":
        return None if json.loads(out.strip().splitlines()[-1]) else "generate printed no JSON result"
    if plan.entry == "report":
        last = json.loads(out.strip().splitlines()[-1])
        return (
            None if last["steps_run"] == 2 else f"report counted {last['steps_run']} steps, expected 2"
        )
    if plan.entry == "evaluate":
        lines = [x for x in out.splitlines() if x.startswith("results: ")]
        written = lines and json.loads((cwd / lines[-1].removeprefix("results: ")).read_text())
        return (
            None if written and written["tasks"] else f"evaluate wrote no results (stdout: {out[-500:]})"
        )
    if plan.entry == "plan":
        last = json.loads(out.strip().splitlines()[-1])
        want = override(a, "plan.world_size")
        if want is not None and last["world_size"] != int(want):
            return f"planned world size {last['world_size']}, expected {want}"
        return None
    return None


def test_every_page_is_in_the_run_order():
    pages = ["README.md", *(str(p.relative_to(ROOT)) for p in sorted((ROOT / "docs").glob("*.md")))]
    assert sorted(PAGES) == sorted(pages), "list every docs/*.md page in PAGES, in run order"


def test_every_command_of_every_page_is_classified():
    every = [c for page in PAGES for c in readme_commands((ROOT / page).read_text(), page)]
    cmds = page_commands()
    assert len(cmds) >= 10, [c.text for c in cmds]  # the extractor found the pages' blocks
    assert {c.page for c in every} >= {"README.md", "docs/data.md", "docs/fine-tuning.md"}
    unknown = [f"{c.page}:{c.line}: {c.text}" for c in every if classify(c) is None]
    assert unknown == [], "add a rule to tests/e2e/test_readme.py for:\n" + "\n".join(unknown)


def test_extractor_joins_continuations_and_tags():
    text = (
        "x\n```\npython -m framework.train a=1 \\\n    b=2   # why\n# note\n```\n```text\nruns/x\n```\n"
    )
    (cmd,) = readme_commands(text)
    assert cmd.line == 3 and cmd.argv == ["python", "-m", "framework.train", "a=1", "b=2"]
    plan = classify(Command(1, "launchers/accelerate/launch.sh multi_gpu 8 model=x run.dir=..."))
    assert (
        plan.kind == "plan"
        and plan.world == 8
        and plan.argv[-2:] == ["run.dir=...", "plan.world_size=8"]
    )
    plan = classify(Command(1, "sbatch --nodes 4 launchers/slurm/train.sbatch model=x"))
    assert plan.world == 4 * _slurm_gpus_per_node({})  # no gres asked: NPROC_PER_NODE 1
    plan = classify(
        Command(1, "sbatch --nodes 4 --gpus-per-node 8 launchers/slurm/train.sbatch model=x")
    )
    assert plan.world == 32
    plan = classify(Command(1, 'make train ARGS="trainer.max_steps=500 model=debug-llama"'))
    assert (
        plan.entry == "train" and "model=debug-llama" in plan.argv and "trainer.max_steps=2" in plan.argv
    )
    assert "trainer.max_steps=500" not in plan.argv
    assert "$(BIN)/python -m framework.train $(ARGS)" in (ROOT / "Makefile").read_text()


def prose(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside fenced blocks."""
    out, fenced = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            out.append((n, line))
    return out


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but `-` and `_` dropped, spaces to `-`;
    a repeated heading gets -1, -2, ..."""
    found, count = set(), {}
    for _, line in prose(text):
        if m := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line):
            base = re.sub(r"[^\w\- ]", "", m[1].lower()).replace(" ", "-")
            n = count[base] = count.get(base, -1) + 1
            found.add(f"{base}-{n}" if n else base)
    return found


def page_links(page: str) -> list[tuple[int, str]]:
    """(line, target) of the relative markdown links of a page (no URLs, none in code)."""
    return [
        (n, target)
        for n, line in prose((ROOT / page).read_text())
        for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`]*`", "", line))
        if not re.match(r"[a-z][a-z0-9+.-]*:", target)  # https:, mailto:
    ]


def test_anchor_rule():
    text = "# A tour\n## The plan: memory and FLOPs\n```\n# not a heading\n```\n## `model.init_from` (HF)\n# A tour\n"
    assert anchors(text) == {"a-tour", "the-plan-memory-and-flops", "modelinit_from-hf", "a-tour-1"}


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for n, target in page_links(page):
            path, _, anchor = target.partition("#")
            dest = ((ROOT / page).parent / path).resolve() if path else ROOT / page
            if not dest.exists():
                broken.append(f"{page}:{n}: {target} (no {os.path.relpath(dest, ROOT)})")
            elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest.read_text())):
                broken.append(f"{page}:{n}: {target} (no heading #{anchor} in {dest.name})")
    assert broken == [], "\n".join(broken)


def test_readme_links_every_docs_page():
    """The README's table is the way in: one click to each page (and to resuming elsewhere)."""
    linked = {t for _, t in page_links("README.md")}
    assert {t.partition("#")[0] for t in linked} >= {p for p in PAGES if p != "README.md"}
    assert "docs/checkpoints.md#resume-on-another-gpu-count-or-strategy" in linked


def test_model_sizes_table_matches_conf():
    """docs/configs.md's size table says what conf/model/*.yaml say."""
    row = re.compile(
        r"^\| `([\w.-]+)` \| (\w+) \| (\d+) \| (\d+)(?: \((\d+)\))? \| (\d+) \| (\d+) \|$", re.M
    )
    found = {
        m[1]: (m[2], int(m[3]), int(m[4]), int(m[5] or m[4]), int(m[6]), int(m[7]))
        for m in row.finditer((ROOT / "docs/configs.md").read_text())
    }
    want = {}
    for f in sorted((ROOT / "conf/model").glob("*.yaml")):
        c = yaml.safe_load(f.read_text())
        kv = c.get("n_kv_head", c["n_head"])
        want[f.stem] = (c["style"], c["n_layer"], c["n_head"], kv, c["n_embd"], c["block_size"])
    assert found == want


@pytest.mark.slow
def test_every_page_command_runs(tmp_path, sample_data):
    cwd = tmp_path / "work"
    cwd.mkdir()
    make_inputs(cwd)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    plans = [(c, classify(c)) for c in page_commands()]
    failures = []

    def report(c: Command, p: Plan, proc: subprocess.CompletedProcess | None, out: str, why: str):
        failures.append(
            f"{c.page}:{c.line}: {c.text}\n  ran: {shlex.join(p.argv)}\n  {why}\n{out[-2500:]}"
        )

    # plan checks are independent of each other and of the runs: start them together
    procs = [(c, p, subprocess.Popen(p.argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)) for c, p in plans if p.kind == "plan"]  # fmt: skip
    for c, p, proc in procs:
        out, _ = proc.communicate(timeout=300)
        why = f"exit {proc.returncode}" if proc.returncode else check_outputs(p, cwd, out)
        if why:
            report(c, p, None, out, why)
    for c, p in plans:  # in page order: later commands read what earlier ones wrote
        if p.kind != "run":
            continue
        link_inputs(cwd)
        proc = subprocess.run(p.argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        out = proc.stdout + proc.stderr
        why = f"exit {proc.returncode}" if proc.returncode else check_outputs(p, cwd, proc.stdout)
        if why:
            report(c, p, proc, out, why)
    assert not failures, "\n\n".join(failures)

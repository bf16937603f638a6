"""RELIABILITY E5, the checks that need no image: docker/Dockerfile and .dockerignore parsed.

The image itself is built and run by `make docker-test` (docker/test.sh)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuation lines joined."""
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return _instructions(DOCKERFILE.read_text())


def _run_text(instructions) -> str:
    return "\n".join(args for word, args in instructions if word == "RUN")


def test_parser_joins_continuations():
    parsed = _instructions("# c\nFROM a\nRUN x \\\n  && y\n\nUSER 1000\n")
    assert parsed == [("FROM", "a"), ("RUN", "x    && y"), ("USER", "1000")]


def test_base_image_is_a_build_argument(instructions):
    # the base is chosen per host (a CUDA base pinned by digest, a local base offline)
    first_from = next(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    args_before = [a.split("=")[0] for w, a in instructions[:first_from] if w == "ARG"]
    assert "BASE" in args_before
    assert instructions[first_from][1] in ("${BASE}", "$BASE")


def test_runs_as_a_non_root_user_without_sudo(instructions):
    users = [args for word, args in instructions if word == "USER"]
    assert users, "no USER: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("0", "root")
    # the uid the README's `chown 1000` recipe relies on
    assert user == "1000"
    # and the user is created with that uid before it is switched to
    assert re.search(r"useradd\b[^\n]*--uid 1000\b", _run_text(instructions))
    assert "sudo" not in _run_text(instructions), "a non-root user must not be able to become root"


def test_dependencies_are_pinned_by_the_lock(instructions):
    pip_installs = [a for a in _run_text(instructions).splitlines() if "pip install" in a]
    assert any(re.search(r"-c requirements/lock\.txt\b", a) for a in pip_installs)
    assert ("COPY", "requirements/lock.txt requirements/lock.txt") in instructions
    # torch is pinned by its own argument, never left to the resolver (a CUDA build per default)
    assert any(re.match(r"TORCH=torch==\d", a) for w, a in instructions if w == "ARG")


def test_a_cxx_compiler_is_installed(instructions):
    # DeepSpeed JIT-builds a C++ op at the first ZeRO start (on CPU too): no g++, no zero*
    assert re.search(r"apt-get install[^\n]*\bg\+\+", _run_text(instructions))


def test_deepspeed_jit_cache_is_a_fixed_writable_path(instructions):
    env = " ".join(a for w, a in instructions if w == "ENV")
    match = re.search(r"TORCH_EXTENSIONS_DIR=(\S+)", env)
    assert match, "TORCH_EXTENSIONS_DIR unset: a `--user` uid without a home cannot JIT-build"
    assert re.search(r"chmod 1777 [^\n]*\"?\$TORCH_EXTENSIONS_DIR", _run_text(instructions))


def test_no_secret_is_baked_into_the_image(instructions):
    # ARG and ENV values show in `docker history`: secrets go in at run time (-e WANDB_API_KEY)
    for word, args in instructions:
        if word in ("ARG", "ENV"):
            assert not re.search(r"(KEY|TOKEN|SECRET|PASSWORD)\w*=", args, re.IGNORECASE), args


def test_gpu_example_pins_the_base_by_digest():
    readme = (ROOT / "docker" / "README.md").read_text()
    bases = re.findall(r"--build-arg BASE=(\S+)", readme)
    assert bases, "docker/README.md has no build example with a BASE"
    for base in bases:
        assert re.search(r"@sha256:[0-9a-f]{64}$", base), f"base {base} is not pinned by digest"


@pytest.mark.parametrize(
    "path", [".venv", "data", "runs", ".git", "wandb", "__pycache__", ".pytest_cache"]
)
def test_dockerignore_keeps_local_state_out_of_the_context(path):
    ignore = ROOT / ".dockerignore"
    assert ignore.is_file(), ".dockerignore missing: the build context would carry .venv, data/, runs/"
    patterns = {ln.strip().strip("/") for ln in ignore.read_text().splitlines() if ln.strip()}
    assert path in patterns or f"**/{path}" in patterns

"""Issue 7 Build 1 / RELIABILITY E3: the locked dependency set. requirements/lock.txt pins every
dependency setup.cfg names (inside setup.cfg's ranges), `make install` and the Docker image
install with it, and the suite runs against exactly those versions."""

from __future__ import annotations

import configparser
import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements/lock.txt"


def locked() -> dict[str, str]:
    pins = {}
    for n, line in enumerate(LOCK.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line)
        assert m, f"{LOCK}:{n}: {line!r} is not a NAME==VERSION pin"
        pins[canonicalize_name(m[1])] = m[2]
    return pins


def declared() -> list[Requirement]:
    cp = configparser.ConfigParser()
    cp.read(ROOT / "setup.cfg")
    lines = (
        cp["options"]["install_requires"].splitlines() + cp["options.extras_require"]["dev"].splitlines()
    )
    return [Requirement(x) for x in (ln.strip() for ln in lines) if x]


def test_every_declared_dependency_is_pinned_within_its_range():
    pins = locked()
    problems = []
    for req in declared():
        name = canonicalize_name(req.name)
        if name == "torch":  # pinned by the Makefile's TORCH / the Dockerfile's TORCH argument
            assert name not in pins, "torch must not be in the lock: TORCH=... chooses the build"
            continue
        if name not in pins:
            problems.append(f"{req.name} (setup.cfg) has no pin: run `make lock`")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{req.name}=={pins[name]} is outside setup.cfg's {req.specifier}")
    assert problems == []


def test_install_paths_use_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    assert "LOCK    ?= requirements/lock.txt" in makefile
    assert re.search(r'pip install -q -c \$\(LOCK\) -e "\.\[dev\]"', makefile)
    assert re.search(r"^lock:", makefile, re.M)
    docker = (ROOT / "docker/Dockerfile").read_text()
    assert "COPY requirements/lock.txt" in docker and "pip install -c requirements/lock.txt" in docker


def test_the_suite_runs_against_the_locked_versions():
    """What `make test` passes with is what the lock says: a drifted environment fails here,
    naming the packages, instead of testing a set nobody will install."""
    drift = []
    for name, version in locked().items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # not on this platform
        if have != version:
            drift.append(f"{name}: installed {have}, locked {version}")
    assert drift == [], "run `make install` (or `make lock` to move the lock): " + "; ".join(drift)

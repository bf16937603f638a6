"""RELIABILITY E3: torch>=2.10 is enforced at import of the package, not only in setup.cfg."""

from __future__ import annotations

import importlib
from importlib import metadata

import pytest

import framework


@pytest.mark.parametrize("old", ["2.9.1", "2.9.0+cu121", "1.13.1"])
def test_an_older_torch_is_refused_naming_version_and_fix(old):
    with pytest.raises(ImportError) as e:
        framework.require_torch(old)
    msg = str(e.value)
    assert f"torch {old}" in msg and "torch>=2.10" in msg and "make install TORCH=" in msg


@pytest.mark.parametrize("ok", ["2.10.0", "2.13.0+cpu", "2.15.0.dev20261101", "3.0.0", None])
def test_the_floor_and_newer_are_accepted(ok):
    framework.require_torch(ok)


def test_importing_the_package_checks_the_installed_torch(monkeypatch):
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda d: "2.9.1" if d == "torch" else real(d))
    try:
        with pytest.raises(ImportError, match="this environment has torch 2.9.1"):
            importlib.reload(framework)
    finally:
        monkeypatch.undo()
        importlib.reload(framework)  # restore the module's functions for later tests

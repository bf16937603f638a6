"""precision=fp16 under DeepSpeed ZeRO on a CPU whose oneDNN has no fp16 (AMD EPYC, issue 7):
refused in validate(), before any process group, naming the device and the alternatives. The
probe is forced both ways so each branch is tested on every CPU."""

from __future__ import annotations

import pytest

from framework import precision
from framework.config import ConfigError, validate
from framework.plan import make_plan
from tests.helpers import make_cfg


def _cfg(strategy: str, prec: str = "fp16", device: str = "cpu"):
    return make_cfg([f"strategy={strategy}", f"precision={prec}", f"trainer.device={device}"])


@pytest.fixture
def no_cpu_fp16(monkeypatch):
    monkeypatch.setattr(precision, "deepspeed_cpu_fp16_supported", lambda: False)


@pytest.fixture
def cpu_fp16(monkeypatch):
    monkeypatch.setattr(precision, "deepspeed_cpu_fp16_supported", lambda: True)


@pytest.mark.parametrize("strategy", ["zero1", "zero2", "zero3"])
def test_fp16_zero_on_a_cpu_without_fp16_is_refused(no_cpu_fp16, strategy):
    with pytest.raises(ConfigError) as e:
        validate(_cfg(strategy), world_size=2)
    msg = str(e.value)
    assert f"precision=fp16 with strategy={strategy}" in msg
    assert "on device cpu" in msg
    assert "precision=bf16" in msg and "strategy=ddp" in msg and "strategy=fsdp" in msg


def test_auto_device_without_cuda_means_cpu(no_cpu_fp16, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ConfigError, match="on device cpu"):
        validate(_cfg("zero2", device="auto"), world_size=2)


def test_fp16_zero_where_the_cpu_has_fp16_is_accepted(cpu_fp16):
    validate(_cfg("zero2"), world_size=2)


@pytest.mark.parametrize(
    "strategy,prec,device",
    [
        ("ddp", "fp16", "cpu"),
        ("fsdp", "fp16", "cpu"),
        ("zero2", "bf16", "cpu"),
        ("zero2", "fp16", "cuda"),
    ],
)
def test_the_alternatives_are_accepted(no_cpu_fp16, strategy, prec, device):
    validate(_cfg(strategy, prec, device), world_size=2)


def test_plan_targets_a_gpu_so_fp16_zero_is_not_refused(no_cpu_fp16):
    # trainer.device=cpu on the planning machine must not matter: the plan sizes GPUs
    plan = make_plan(_cfg("zero3"), world_size=2)
    assert plan.precision == "fp16" and plan.strategy == "zero3"


def test_the_probe_agrees_with_deepspeed():
    ds = pytest.importorskip("deepspeed.accelerator.cpu_accelerator")
    assert precision.deepspeed_cpu_fp16_supported() == bool(ds.CPU_Accelerator().is_fp16_supported())

"""The Hydra tree: every file composes, the key set is frozen, cross-field errors name keys."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from framework.config import CONF_DIR, MULTI_PROCESS, ConfigError, load, validate
from tests.helpers import ROOT, checkout_env, compose, make_cfg, run_module

GROUPS = ("model", "data", "strategy", "precision", "logger", "task")
ROOT_CONFIGS = sorted(p.stem for p in Path(CONF_DIR).glob("*.yaml"))

# The full set of training config keys. Adding a knob is a deliberate change: update this list.
FROZEN_KEYS = """
checkpoint.async_save checkpoint.every checkpoint.keep checkpoint.path checkpoint.resume checkpoint.save_timeout_s
data.allow_change_on_resume data.allow_empty_source data.attend_across_documents data.cache_dir data.name data.num_workers data.root data.schedule
data.sources data.tokenizer
faults.crash_in_async_save faults.hang_at_step faults.nan_grad_at_step faults.nan_loss_at_step faults.rank faults.sleep_in_save_s
faults.sleep_in_step_s faults.spike_at_step faults.spike_factor faults.slow_ms faults.slow_rank
logger.entity logger.mode logger.name logger.project logger.tags
model.bias model.block_size model.dropout model.ffn_hidden model.init_from model.init_std model.multiple_of
model.n_embd model.n_head model.n_kv_head model.n_layer model.name model.norm_eps model.num_labels model.rope_theta
model.rope_attention_factor model.rope_beta_fast model.rope_beta_slow model.rope_factor model.rope_high_freq_factor
model.rope_low_freq_factor model.rope_original_max_position model.rope_scaling
model.style model.tie_embeddings model.vocab_size model.qk_norm
model.moe.num_experts model.moe.top_k model.moe.every model.moe.expert_hidden model.moe.shared_experts
model.moe.router model.moe.norm_topk_prob model.moe.aux_loss_coef model.moe.z_loss_coef
optim.beta1 optim.beta2 optim.decay_fraction optim.eps optim.fused optim.grad_clip optim.lr optim.min_lr_ratio
optim.schedule optim.warmup_steps optim.weight_decay
plan.dry_run plan.gpu plan.mfu plan.world_size
plan.gpus_per_node plan.inter_node_gbps plan.intra_node_gbps plan.search
precision.fp8_min_dim precision.initial_loss_scale precision.loss_scale_window precision.min_loss_scale
precision.max_overflows_at_min precision.name
run.dir run.name
strategy.activation_checkpointing strategy.compile strategy.hsdp_replicas strategy.name
strategy.overlap_comm strategy.reshard_after_forward strategy.sequence_parallel strategy.tp strategy.zero_offload
strategy.cp strategy.cp_method strategy.ep strategy.pp strategy.pp_layers strategy.pp_schedule strategy.pp_stages_per_rank
trainer.deterministic trainer.device trainer.eval_batches trainer.eval_every trainer.global_batch_size
trainer.log_every trainer.max_steps trainer.micro_batch_size trainer.peak_flops trainer.sample_tokens
trainer.seed trainer.seq_len trainer.stop_at_step
trainer.collective_timeout_s trainer.on_nan trainer.spike_window trainer.spike_zscore
trainer.memory_snapshot trainer.straggler_every trainer.straggler_factor trainer.profile.ranks
trainer.profile.record_shapes trainer.profile.steps trainer.profile.with_memory trainer.profile.with_stack
task.labels task.name
""".split()


def _flat_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flat_keys(v, f"{prefix}{k}.")
        else:
            out.append(prefix + k)
    return out


def group_files():
    return [(g, p.stem) for g in GROUPS for p in sorted((Path(CONF_DIR) / g).glob("*.yaml"))]


@pytest.mark.parametrize(("group", "option"), group_files())
def test_every_group_file_composes(group, option):
    dcfg = compose([f"{group}={option}"])
    if (group, option) == ("data", "gpt3_mix"):
        # The user must give the paths: conversion fails naming the missing key.
        with pytest.raises(ConfigError, match=r"data.tokenizer|sources"):
            load(dcfg)
        return
    cfg = load(dcfg)
    assert getattr(cfg, group).name == option


@pytest.mark.parametrize("name", [n for n in ROOT_CONFIGS if n != "config"])
def test_every_root_config_composes(name):
    importlib.import_module(f"framework.{name}")  # registers its schema in the ConfigStore
    dcfg = compose(name=name)
    schema = ConfigStore.instance().load(f"{name}_schema.yaml").node
    assert set(dcfg) == set(schema)  # every schema key, nothing else (the hydra node is Hydra's)


def test_key_set_is_frozen():
    keys = sorted(_flat_keys(OmegaConf.to_container(compose())))
    assert keys == sorted(FROZEN_KEYS)


def test_data_sample_has_three_weighted_sources():
    cfg = make_cfg()
    assert [s.name for s in cfg.data.sources] == ["markov", "zipf", "arith"]
    assert sum(s.weight for s in cfg.data.sources) == pytest.approx(1.0)
    assert cfg.model.name == "debug" and cfg.strategy.name == "single"


def test_gpt3_mix_weights_are_gpt3_table():
    dcfg = compose(["data=gpt3_mix"])
    weights = {s.name: s.weight for s in dcfg.data.sources}
    assert weights == {
        "commoncrawl": 0.60,
        "webtext2": 0.22,
        "books1": 0.08,
        "books2": 0.08,
        "wikipedia": 0.03,
    }


def test_wrong_type_fails_at_compose_with_key_path():
    with pytest.raises(Exception, match=r"trainer.max_steps"):
        compose(["trainer.max_steps=lots"])


def test_unknown_key_fails_at_compose():
    with pytest.raises(Exception, match=r"trainer.max_step"):
        compose(["trainer.max_step=3"])


@pytest.mark.parametrize(
    ("overrides", "world", "expected"),
    [
        (
            ["model.n_embd=100", "model.n_head=3"],
            1,
            r"model.n_embd=100 is not divisible by model.n_head=3",
        ),
        (
            ["trainer.global_batch_size=10", "trainer.micro_batch_size=4"],
            1,
            r"trainer.global_batch_size=10 is not divisible by trainer.micro_batch_size=4",
        ),
        (
            ["trainer.global_batch_size=8", "trainer.micro_batch_size=4", "strategy=ddp"],
            4,
            r"data-parallel degree 4",
        ),
        (["strategy=tp", "strategy.tp=2"], 3, r"world size 3 is not divisible by strategy.tp=2"),
        (["strategy=tp", "strategy.tp=8"], 8, r"model.n_head=4 is not divisible by strategy.tp=8"),
        (["trainer.seq_len=512"], 1, r"trainer.seq_len=512 exceeds model.block_size=256"),
        (["checkpoint.keep=1"], 1, r"checkpoint.keep=1"),
        (["trainer.stop_at_step=500", "trainer.max_steps=100"], 1, r"trainer.stop_at_step=500"),
        (["strategy=single"], 2, r"strategy=single runs on one process"),
        (["strategy=tp", "strategy.tp=2"], 4, r"strategy.tp=2 must equal the world size 4"),
        (
            ["strategy=tp", "strategy.tp=2", "trainer.seq_len=33"],
            2,
            r"trainer.seq_len=33 is not divisible",
        ),
        (["strategy=zero2", "precision=fp8"], 2, r"fp8 is not supported with DeepSpeed ZeRO"),
        (
            ["strategy=fsdp", "strategy.overlap_comm=true"],
            2,
            r"overlap_comm=True is a DeepSpeed setting",
        ),
        (["strategy=ddp", "strategy.hsdp_replicas=2"], 4, r"hsdp_replicas=2 needs strategy=fsdp"),
        (["strategy=fsdp", "strategy.hsdp_replicas=3"], 4, r"hsdp_replicas=3 does not divide"),
        (["trainer.on_nan=ignore"], 1, r"trainer.on_nan='ignore' must be abort\|skip\|rollback"),
        (["trainer.spike_zscore=-1"], 1, r"trainer.spike_zscore=-1.0 must be"),
        (
            ["trainer.collective_timeout_s=0"],
            1,
            r"trainer.collective_timeout_s=0.0 must be a positive number",
        ),
        (["faults.nan_loss_at_step=0"], 1, r"faults.nan_loss_at_step=0 must be in \[1, "),
        (["faults.rank=2"], 2, r"faults.rank=2 must be in \[0, world size 2\)"),
        (["faults.sleep_in_save_s=-1"], 1, r"faults.sleep_in_save_s=-1.0 must be >= 0"),
        (
            ["strategy=zero2", "checkpoint.async_save=true"],
            2,
            r"checkpoint.async_save=true is not supported with strategy=zero2",
        ),
        (
            ["faults.crash_in_async_save=3"],
            1,
            r"faults.crash_in_async_save=3 needs checkpoint.async_save",
        ),
        (
            ["checkpoint.async_save=true", "faults.crash_in_async_save=0"],
            1,
            r"faults.crash_in_async_save=0 must be in \[1, trainer.max_steps",
        ),
        (["faults.slow_rank=2", "faults.slow_ms=10"], 2, r"faults.slow_rank=2 must be in \[0, world"),
        (["faults.slow_ms=10"], 2, r"faults.slow_ms=10.0 needs faults.slow_rank"),
        (["faults.slow_rank=0", "faults.slow_ms=-5"], 2, r"faults.slow_ms=-5.0 must be >= 0"),
        (["trainer.profile.steps=[5,3]"], 1, r"trainer.profile.steps=\[5, 3\] must be \[first, last\]"),
        (["trainer.profile.steps=[3]"], 1, r"trainer.profile.steps=\[3\] must be"),
        (
            ["trainer.profile.steps=[1,2]", "trainer.profile.ranks=[0,2]"],
            2,
            r"trainer.profile.ranks=\[0, 2\]: \[2\] not in \[0, world size 2\)",
        ),
        (
            ["trainer.device=cpu", "trainer.memory_snapshot=true"],
            1,
            r"trainer.memory_snapshot=true records the CUDA caching allocator's history, but the "
            r"device is cpu .*host_rss_gib",
        ),
        (["trainer.straggler_every=-1"], 2, r"trainer.straggler_every=-1 must be >= 0"),
        (["trainer.straggler_factor=1"], 2, r"trainer.straggler_factor=1.0 must be a finite number > 1"),
    ],
)
def test_cross_field_errors_name_keys(overrides, world, expected):
    with pytest.raises(ConfigError, match=expected):
        validate(make_cfg(overrides), world)


@pytest.mark.parametrize("strategy", MULTI_PROCESS)
def test_multi_process_strategy_refused_only_in_a_plain_process(strategy):
    """World 1 in one plain process: a forgotten launcher, refused. World 1 under a launcher
    (torchrun --nproc_per_node 1, a job scaled down to one GPU): valid for every strategy."""
    degree = {"tp": "strategy.tp=1", "tp_fsdp": "strategy.tp=1", "pp": "strategy.pp=1"}
    cfg = make_cfg([f"strategy={strategy}", *([degree[strategy]] if strategy in degree else [])])
    with pytest.raises(
        ConfigError, match=f"strategy={strategy} needs several processes.*one plain process"
    ):
        validate(cfg, 1)
    validate(cfg, 1, launched=True)


def test_all_problems_reported_at_once():
    cfg = make_cfg(["model.n_embd=100", "model.n_head=3", "checkpoint.keep=1", "optim.lr=-1"])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    msg = str(e.value)
    assert "model.n_embd" in msg and "checkpoint.keep" in msg and "optim.lr" in msg


@pytest.mark.parametrize("weight", ["-1", "nan", "inf"])
def test_bad_weights_refused(weight):
    with pytest.raises(ConfigError, match=r"data.sources\[0\] \(markov\).weight"):
        validate(make_cfg([f"data.sources.0.weight={weight}"]))


def test_all_zero_weights_refused():
    zero = [f"data.sources.{i}.weight=0" for i in range(3)]
    with pytest.raises(ConfigError, match="all weights are 0"):
        validate(make_cfg(zero))


def test_validation_survives_python_O(tmp_path):
    """Errors are raised explicitly, never by `assert`, so `python -O` keeps them."""
    code = (
        "from tests.helpers import make_cfg\n"
        "from framework.config import validate, ConfigError\n"
        "try:\n"
        "    validate(make_cfg(['model.n_embd=100', 'model.n_head=3']))\n"
        "except ConfigError as e:\n"
        "    print('REFUSED', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-O", "-c", code], capture_output=True, text=True, cwd=ROOT, env=checkout_env()
    )
    assert "REFUSED" in out.stdout and "model.n_embd=100" in out.stdout, out.stderr


def test_unknown_flavor_lists_valid_ones(tmp_path):
    out = run_module("framework.train", "model=gpt5", f"run.dir={tmp_path}/r")
    assert out.returncode != 0
    err = out.stderr + out.stdout
    assert "gpt5" in err and "gpt2-124m" in err and "llama-7b" in err
    assert not (tmp_path / "r").exists()

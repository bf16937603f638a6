"""framework.cli: unknown keys (also with + / ++), misspelt group options and secrets are refused
with the nearest valid key, for every CLI's schema; UserErrors become one message and an exit code."""

from __future__ import annotations

import io
import sys

import pytest

from framework import cli
from framework.checkpoint import CheckpointError
from framework.config import Config, ConfigError
from framework.data.shards import DataError
from framework.errors import EXIT_CHECKPOINT, EXIT_CONFIG, EXIT_DATA, EXIT_DIVERGED
from framework.export import ExportConfig
from framework.generate import GenerateConfig
from framework.model.gpt import ModelShapeError
from framework.parallel import NonFiniteError
from framework.precision import LossScaleAbort
from framework.prepare import PrepareConfig, PrepareError
from tests.helpers import compose

CASES = [
    (Config, "+trainer.max_step=10", "unknown key trainer.max_step (did you mean trainer.max_steps?)"),
    (Config, "++trainer.max_step=10", "unknown key trainer.max_step (did you mean trainer.max_steps?)"),
    (Config, "trainer.max_step=10", "unknown key trainer.max_step (did you mean trainer.max_steps?)"),
    (Config, "+trainer.lr=1e-3", "unknown key trainer.lr (did you mean optim.lr?)"),
    (Config, "+plan.world_sizes=8", "unknown key plan.world_sizes (did you mean plan.world_size?)"),
    (Config, "modle=debug", "unknown key modle (did you mean model?)"),
    (Config, "model=gpt2-124", "unknown option model=gpt2-124 (did you mean model=gpt2-124m? options in conf/model:"),
    (Config, "strategy=fdsp", "unknown option strategy=fdsp (did you mean strategy=fsdp?"),
    (Config, "+logger.api_key=SECRET", "logger.api_key looks like a secret"),
    (Config, "++logger.wandb_token=SECRET", "logger.wandb_token looks like a secret"),
    (GenerateConfig, "+temprature=0.5", "unknown key temprature (did you mean temperature?)"),
    (GenerateConfig, "model=debug", "unknown key model (valid keys: checkpoint, prompt,"),
    (ExportConfig, "+overwirte=true", "unknown key overwirte (did you mean overwrite?)"),
    (PrepareConfig, "outptu=data/x", "unknown key outptu (did you mean output?)"),
    (PrepareConfig, "+hf_token=SECRET", "hf_token looks like a secret"),
]  # fmt: skip


@pytest.mark.parametrize("schema, override, message", CASES, ids=[c[1] for c in CASES])
def test_bad_override_is_named_with_the_nearest_valid_key(schema, override, message):
    problems = cli.override_problems([override], schema)
    assert len(problems) == 1 and problems[0].startswith(message), problems
    assert "SECRET" not in problems[0]  # the value itself is never echoed
    if "secret" in message:
        assert "WANDB_API_KEY" in problems[0] and "environment" in problems[0]


def test_valid_overrides_pass():
    ok = ["model=gpt2-124m", "strategy=zero3", "strategy.tp=1", "trainer.max_steps=5", "+trainer.max_steps=5",
          "data.sources.0.weight=2", "hydra.run.dir=.", "~logger", "trainer.sample_tokens=0", "data.tokenizer=byte",
          "--config-dir", "/nonexistent", "-m", "strategy=zero1,zero2"]  # fmt: skip
    assert cli.override_problems(ok, Config) == []
    assert cli.override_problems(["checkpoint=x", "max_new_tokens=4"], GenerateConfig) == []


def test_group_options_include_the_users_config_dir(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.yaml").write_text("defaults:\n  - sample\n")
    assert cli.override_problems(["data=mine"], Config)[0].startswith("unknown option data=mine")
    assert cli.override_problems(["--config-dir", str(tmp_path), "data=mine"], Config) == []
    assert cli.override_problems([f"--config-dir={tmp_path}", "data=mne"], Config)[0].startswith(
        "unknown option data=mne (did you mean data=mine?"
    )


def test_composed_config_with_an_added_key_is_refused():
    # What `+key=` (or a --config-dir file) puts in the composed config, which to_object kept.
    with pytest.raises(
        ConfigError, match=r"unknown key trainer\.max_step \(did you mean trainer\.max_steps\?\)"
    ):
        cli.check_config_keys(compose(["+trainer.max_step=10"]), Config)
    with pytest.raises(ConfigError, match="logger.api_key looks like a secret"):
        cli.check_config_keys(compose(["+logger.api_key=SECRET"]), Config)
    cli.check_config_keys(compose(["model=gpt2-124m"]), Config)  # the shipped tree passes


def test_nested_keys_lists_and_free_form_mappings():
    cfg = {
        "data": {
            "sources": [{"name": "a", "path": "p", "wieght": 1.0}],
            "schedule": [{"step": 5, "weights": {"any_source_name": 1.0}}],  # keys are data
        }
    }
    assert cli.key_problems(cfg, Config, Config) == [
        "unknown key data.sources.0.wieght (did you mean data.sources.0.weight?)"
    ]


def test_train_main_refuses_a_secret_before_anything_runs(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["fw-train", "+logger.api_key=SECRET", f"run.dir={tmp_path}/r"])
    monkeypatch.delenv("FW_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    from framework import train

    with pytest.raises(SystemExit) as e:
        train.main()
    assert e.value.code == EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.startswith("error: invalid command line:\n  - logger.api_key looks like a secret")
    assert "SECRET" not in err and not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "error, code",
    [
        (ConfigError("x"), EXIT_CONFIG),
        (ModelShapeError("x"), EXIT_CONFIG),
        (DataError("x"), EXIT_DATA),
        (PrepareError("x"), EXIT_DATA),
        (CheckpointError("x"), EXIT_CHECKPOINT),
        (NonFiniteError("x"), EXIT_DIVERGED),
        (LossScaleAbort("x"), EXIT_DIVERGED),
    ],
)
def test_each_framework_error_exits_with_its_documented_code(error, code, capsys):
    with pytest.raises(SystemExit) as e, cli.reported():
        raise error
    assert e.value.code == code
    assert capsys.readouterr().err.startswith("error: x\nhint: ")


def test_a_bug_is_not_swallowed():
    with pytest.raises(KeyError), cli.reported():
        raise KeyError("bug")


def report(err, **env) -> str:
    buf = io.StringIO()
    cli.report(err, env=env, file=buf)
    return buf.getvalue()


def test_ranks_config_errors_once_rank_local_errors_on_each_rank_with_its_rank():
    cfg_err, data_err = ConfigError("bad key"), DataError("shard 3 damaged")
    assert report(cfg_err, RANK="0", WORLD_SIZE="2").startswith("error: [rank 0] bad key\n")
    assert report(cfg_err, RANK="1", WORLD_SIZE="2") == ""  # identical on every rank: rank 0 says it
    assert report(data_err, RANK="1", WORLD_SIZE="2").startswith("error: [rank 1] shard 3 damaged\n")
    assert report(data_err).startswith("error: shard 3 damaged\n")  # one process: no rank tag


def test_debug_switch_prints_the_traceback():
    try:
        raise CheckpointError("gone")
    except CheckpointError as e:
        err = e
    assert "Traceback" not in report(err)
    for env in ({"FW_DEBUG": "1"}, {"HYDRA_FULL_ERROR": "1"}):
        out = report(err, **env)
        assert out.startswith("Traceback (most recent call last)") and "error: gone\n" in out
    assert "Traceback" not in report(err, FW_DEBUG="0")


@pytest.mark.parametrize("schema", [Config, GenerateConfig, ExportConfig, PrepareConfig])
def test_no_schema_has_a_secret_looking_key(schema):
    # Such a key is refused on sight: a credential belongs in the environment, never in config.yaml.
    paths = cli._all_paths(schema)
    assert len(paths) >= 5  # the walk sees the fields
    assert [p for p in paths if cli.SECRET_KEY.search(p.rsplit(".", 1)[-1])] == []

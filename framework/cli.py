"""The boundary of every command-line entry point (train, generate, export, plan, prepare).

`@entry(config_name, schema)` replaces `@hydra.main`. It

- refuses, before Hydra composes anything, override keys that are not in the schema (also
  with `+`/`++`, which Hydra accepts and to_object silently keeps), misspelt group options
  (`model=gpt2-124`) and secret-looking keys, naming the nearest valid key (difflib);
- checks the composed config once more (keys from a user's `--config-dir` files);
- turns the framework's own errors (framework.errors.UserError) into one clean message on
  stderr, `error: ...` plus a `hint: ...` line, and the documented exit code of its class.
  FW_DEBUG=1 (or HYDRA_FULL_ERROR=1) also prints the traceback. Any other exception is a bug and
  keeps Hydra's traceback.

Under torchrun every rank runs the same entry. Config errors are identical on every rank (same
composed config, raised before any process group), so only rank 0 prints them; other errors can be
rank-local (a shard on one node, a NaN on one rank) and print on every failing rank, prefixed with
its rank, because that line may be the only record of the cause. Every failing rank exits non-zero.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import logging
import os
import re
import sys
import traceback
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path

import hydra
from hydra._internal.utils import get_args_parser  # Hydra's own argv grammar
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from framework.config import CONF_DIR, ConfigError
from framework.errors import DEBUG_ENV, UserError

SECRET_KEY = re.compile(
    r"(^|_)(api_?key|apikey|token|password|passwd|secret|access_key)$", re.IGNORECASE
)
"""Leaf names that hold credentials. No schema has one (they may only come from the environment),
so such a key is always refused, with that advice instead of a did-you-mean."""


def entry(
    config_name: str, schema: type
) -> Callable[[Callable[[DictConfig], None]], Callable[[], None]]:
    """Decorate `fn(dcfg)` as a Hydra app over conf/<config_name>.yaml whose schema is the
    dataclass `schema`; returns the console-script `main()`."""

    def wrap(fn: Callable[[DictConfig], None]) -> Callable[[], None]:
        @functools.wraps(fn)
        def task(dcfg: DictConfig) -> None:
            with reported():
                check_config_keys(dcfg, schema)
                fn(dcfg)

        hydra_task = hydra.main(config_path=CONF_DIR, config_name=config_name, version_base=None)(task)

        def main() -> None:
            with reported():
                check_overrides(sys.argv[1:], schema)
            hydra_task()

        main.__doc__ = fn.__doc__
        return main

    return wrap


class SweepHydraConfig(Callback):
    """A `hydra.callbacks` entry of conf/config.yaml. Under `-m`, Hydra's sweeper and launcher
    resolve hydra.sweep.dir (`${run.dir}`) once for the whole sweep, to make the directory and
    write multirun.yaml, before any job has set HydraConfig: a run.dir that uses a Hydra
    resolver (`run.dir=${hydra:runtime.cwd}/sweep/lr${optim.lr}`) died there with "HydraConfig
    was not set". Setting it from the sweep's config lets that resolve; every job then sets its
    own (Hydra's run_job), so each point still trains in `<its run.dir>/<job number>`."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        HydraConfig.instance().set_config(config)


def to_object(dcfg: DictConfig, schema: type):
    """Resolve and convert once; a missing `???` key or a bad interpolation is a ConfigError
    naming the key path (omegaconf's message carries it)."""
    try:
        OmegaConf.resolve(dcfg)
        obj = OmegaConf.to_object(dcfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"config error: {e}") from e
    if not isinstance(obj, schema):
        raise ConfigError(f"expected a {schema.__name__}, got {type(obj).__name__}")
    return obj


# -- reporting ------------------------------------------------------------------------------


def debug_enabled(env: typing.Mapping[str, str] = os.environ) -> bool:
    return any(env.get(k, "") not in ("", "0") for k in (DEBUG_ENV, "HYDRA_FULL_ERROR"))


@contextlib.contextmanager
def reported() -> Iterator[None]:
    """Report a UserError as one clean message and exit with its code."""
    try:
        yield
    except UserError as e:
        report(e)
        sys.exit(e.exit_code)


def report(
    e: UserError, env: typing.Mapping[str, str] = os.environ, file: typing.TextIO | None = None
) -> None:
    file = file or sys.stderr
    rank, world = int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
    if world > 1 and rank != 0 and e.same_on_every_rank:
        return  # rank 0 prints the identical message
    if debug_enabled(env):
        traceback.print_exception(e, file=file)
    where = f"[rank {rank}] " if world > 1 else ""
    lines = [f"error: {where}{e}"]
    if e.hint:
        lines.append(f"hint: {e.hint}")
    if not debug_enabled(env):
        lines.append(f"(set {DEBUG_ENV}=1 for the traceback)")
    text = "\n".join(lines)
    print(text, file=file, flush=True)
    # A run's train.log keeps the reason it ended (the stream handler already went to stderr above).
    for h in logging.getLogger("framework").handlers:
        if isinstance(h, logging.FileHandler):
            h.emit(logging.LogRecord("framework", logging.ERROR, __file__, 0, text, None, None))


# -- keys -------------------------------------------------------------------------------------


def _unwrap(t):
    """`X | None` -> X; `list[X]` stays a list type."""
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        args = [a for a in typing.get_args(t) if a is not type(None)]
        return args[0] if len(args) == 1 else t
    return t


def _fields(typ) -> dict[str, type] | None:
    """{field: type} of a dataclass schema; None where any key is allowed (dicts, Any, scalars)."""
    if not (isinstance(typ, type) and dataclasses.is_dataclass(typ)):
        return None
    hints = typing.get_type_hints(typ)
    return {f.name: _unwrap(hints[f.name]) for f in dataclasses.fields(typ)}


def _all_paths(typ, prefix: str = "") -> list[str]:
    out = []
    for name, t in (_fields(typ) or {}).items():
        out.append(prefix + name)
        out += _all_paths(t, f"{prefix}{name}.")
    return out


def _unknown(path: str, parent: str, siblings: list[str], schema: type) -> str:
    leaf = path.rsplit(".", 1)[-1]
    if SECRET_KEY.search(leaf):
        return _secret(path)
    near = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
    if near:
        return f"unknown key {path} (did you mean {parent}{near[0]}?)"
    # The right name under another section, e.g. trainer.lr -> optim.lr.
    elsewhere = [
        p
        for p in _all_paths(schema)
        if difflib.get_close_matches(leaf, [p.rsplit(".", 1)[-1]], cutoff=0.85)
    ]
    if elsewhere:
        return f"unknown key {path} (did you mean {elsewhere[0]}?)"
    return f"unknown key {path} (valid keys{' under ' + parent.rstrip('.') if parent else ''}: {', '.join(siblings)})"


def _secret(path: str) -> str:
    return (
        f"{path} looks like a secret: credentials are never read from the command line or config "
        "files (they would be saved in config.yaml, checkpoints and wandb's run files); set them in "
        "the environment instead (WANDB_API_KEY for wandb)"
    )


def key_problems(container, typ, schema: type, prefix: str = "") -> list[str]:
    """Every key of a plain (to_container) config that the dataclass schema `typ` lacks."""
    problems: list[str] = []
    fields = _fields(typ)
    if isinstance(container, list):
        elem = typing.get_args(typ)[0] if typing.get_args(typ) else None
        for i, item in enumerate(container):
            problems += key_problems(item, _unwrap(elem), schema, f"{prefix}{i}.")
        return problems
    if not isinstance(container, dict):
        return problems
    for key, value in container.items():
        path = f"{prefix}{key}"
        if fields is None:  # a free-form mapping (e.g. data.schedule weights): keys are data
            continue
        if key not in fields:  # a secret-looking key gets the environment advice from _unknown
            problems.append(_unknown(path, prefix, list(fields), schema))
        else:
            problems += key_problems(value, fields[key], schema, f"{path}.")
    return problems


def check_config_keys(dcfg: DictConfig, schema: type) -> None:
    """The composed config has only schema keys: `+key=` overrides and a user's --config-dir
    files cannot add one that would be silently ignored (or saved, if it is a secret)."""
    problems = key_problems(OmegaConf.to_container(dcfg, resolve=False), schema, schema)
    if problems:
        raise ConfigError("\n  - ".join(["invalid config:", *problems]))


def _groups(search_dirs: list[Path]) -> dict[str, set[str]]:
    """{group: option names} over the config search path (the package's conf/ and --config-dir)."""
    groups: dict[str, set[str]] = {}
    for d in search_dirs:
        if not d.is_dir():
            continue
        for g in d.iterdir():
            if g.is_dir() and g.name != "hydra":
                groups.setdefault(g.name, set()).update(p.stem for p in g.glob("*.yaml"))
    return groups


def override_problems(argv: list[str], schema: type, conf_dir: str = CONF_DIR) -> list[str]:
    """Problems of the command line's overrides, before Hydra composes: unknown keys (with or
    without `+`/`++`), misspelt group options and groups, secret-looking keys."""
    args, _ = get_args_parser().parse_known_args(argv)
    dirs = [Path(conf_dir)] + ([Path(args.config_dir)] if args.config_dir else [])
    groups = _groups(dirs)
    fields = _fields(schema) or {}
    try:
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except OverrideParseException:
        return []  # Hydra reports its own grammar errors, quoting the offending text
    problems = []
    for ov in overrides:
        key = ov.key_or_group
        if key == "hydra" or key.startswith(("hydra.", "hydra/")) or ov.is_delete():
            continue
        adds = ov.is_add() or ov.is_force_add()
        if "." not in key and key in groups and (key in fields or adds):
            values = (
                list(ov.sweep_string_iterator())
                if ov.is_sweep_override()
                else [ov.get_value_element_as_str()]
            )
            for v in values:
                if v not in groups[key]:
                    options = sorted(groups[key])
                    near = difflib.get_close_matches(v, options, n=1, cutoff=0.5)
                    hint = f"did you mean {key}={near[0]}? " if near else ""
                    problems.append(
                        f"unknown option {key}={v} ({hint}options in conf/{key}: {', '.join(options)})"
                    )
            continue
        problems += _path_problems(key, schema)
    return problems


def _path_problems(key: str, schema: type) -> list[str]:
    typ, prefix = schema, ""
    for seg in key.split("."):
        fields = _fields(typ)
        if fields is None:
            return []  # lists, free-form mappings and scalars: Hydra and omegaconf check the rest
        if seg not in fields:
            return [_unknown(prefix + seg, prefix, list(fields), schema)]
        typ, prefix = fields[seg], f"{prefix}{seg}."
    return []


def check_overrides(argv: list[str], schema: type) -> None:
    problems = override_problems(argv, schema)
    if problems:
        raise ConfigError("\n  - ".join(["invalid command line:", *problems]))

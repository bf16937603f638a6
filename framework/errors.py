"""The framework's own errors: what a user can fix, as opposed to a bug.

They live here, in the lowest layer, so that any module can raise them without importing the
module above it that catches them (framework/__init__.py lists the layers).

Every error the CLIs report as one clean line derives from `UserError`; its class says the
exit code and the advice printed under the message (framework.cli). Anything else is a bug
and keeps its traceback.

Exit codes (documented in docs/configs.md):
  2  config or usage (unknown key, bad value, model shape)      EXIT_CONFIG
  3  data (shards, manifests, prepare inputs)                     EXIT_DATA
  4  checkpoint (missing, damaged, other model)                   EXIT_CHECKPOINT
  5  training diverged (NaN/Inf loss or gradients, fp16 floor)    EXIT_DIVERGED
  1  anything else: a bug, reported with its traceback
"""

from __future__ import annotations

EXIT_CONFIG = 2
EXIT_DATA = 3
EXIT_CHECKPOINT = 4
EXIT_DIVERGED = 5

DEBUG_ENV = "FW_DEBUG"
"""FW_DEBUG=1 prints the full traceback of a UserError (same exit code)."""

HINTS = {
    EXIT_CONFIG: "fix the keys named above (`--cfg job` prints the composed config without running it)",
    EXIT_DATA: "check the paths named above (data.sources / input=); `python -m framework.prepare` "
    "writes a source's shards and manifest",
    EXIT_CHECKPOINT: "point at a committed step directory or a run directory with checkpoints/latest; "
    "training can start afresh with checkpoint.resume=never",
    EXIT_DIVERGED: "resume from the last checkpoint with a lower optim.lr, more optim.warmup_steps or "
    "precision=bf16",
}


class UserError(Exception):
    """An error the user can fix; the message names the file/key/rank/step."""

    exit_code = 1
    same_on_every_rank = False
    """True when every rank raises it identically (config checks before any process group): only
    rank 0 prints it. Rank-local causes (a shard, a disk, a NaN) print on each failing rank."""

    @property
    def hint(self) -> str:
        return HINTS.get(self.exit_code, "")


class ConfigError(UserError, ValueError):
    """A config that cannot run. The message names the keys and what to do."""

    exit_code = EXIT_CONFIG
    same_on_every_rank = True


class DataError(UserError, ValueError):
    """Bad data on disk or a bad data config; the message names the source/shard/row."""

    exit_code = EXIT_DATA


class PrepareError(DataError):
    """Bad input or output for prepare; the message names the pattern, file or line."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message names the path and what is wrong."""

    exit_code = EXIT_CHECKPOINT


class DivergedError(UserError, RuntimeError):
    """Training diverged: the numbers left the range the run can continue in."""

    exit_code = EXIT_DIVERGED


class NonFiniteError(DivergedError):
    """Loss or gradient norm is NaN/Inf; raised before optimizer.step() so weights stay intact."""

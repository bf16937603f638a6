"""Checkpoints that survive crashes: written to a temp dir, committed last, verified on load.

Layout of one checkpoint (DESIGN "Run-directory contract"):

    checkpoints/step_<N:08d>/
        state/              engine state (model + optimizer), torch.distributed.checkpoint,
                            sharded by the writing strategy, one layout for all strategies
        rng/rank_<r>.pt     each rank's torch (and CUDA) RNG state
        trainer.json        step, data-loader position, engine extras (loss scale), model shape
        manifest.json       size and xxh3_128 of every file above (older ones: sha256)
        COMMITTED           written last: a directory without it is not a checkpoint
    checkpoints/latest      name of the newest committed checkpoint, replaced atomically

Why our own manifest: DCP has no checksums (flipped bytes load silently) and reads its
`.metadata` with pickle, so nothing is loaded before every file's hash matches what we wrote.
Hashing is spread over the ranks (rank r hashes files r, r+W, ...) so it scales with them.
The manifest proves integrity, not authorship (whoever can plant a file can re-hash it): loading
goes through framework/safeload.py, which unpickles nothing but what our saves contain. So the
hash need not resist an attacker, only rot and truncation: xxh3_128 (any changed byte changes it
but with probability 2^-128) reads at memory speed, where sha256 took as long as half of DCP's
write (issue 8 item 8). Manifests with sha256 entries, written before, still verify.

checkpoint.async_save: save() copies the state into reused CPU buffers (DCP's stager) and
returns; a background thread writes the files and hashes this rank's share. The commit (manifest,
COMMITTED, `latest`, pruning) waits for every rank's write: finish() gathers the hashes and
commits, and runs at the next save, before a load and at the end of the run. A crash before then
leaves `latest` on the previous checkpoint; pruning runs only after a commit, so it never deletes
the last committed checkpoint; the uncommitted .tmp-* folder is removed at the next start.

Resharding (another strategy, world size or pipeline layout on resume) happens on load, in one
path: every engine, DeepSpeed ZeRO included, saves the single-device model's keys (parameter
FQNs; the optimizer state flattened by name, optim.state.<fqn>.exp_avg / exp_avg_sq / step and
optim.param_groups.<fqn>.lr / betas / ..., so pipeline stages do not overwrite each other's
groups) and loads by asking DCP for the tensors of its own layout, which DCP cuts from whatever
shards were written. Checkpoints in torch's former per-group layout (optim.param_groups.<index>)
still load (framework.parallel.engine). The loader's
position is global (sequences consumed), so the data continues on any number of ranks; ranks
beyond the saved ones get a reseeded RNG stream (logged).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as tdist
import xxhash
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from framework.config import CheckpointConfig, FaultsConfig
from framework.data.shards import sha256_file
from framework.dist import Dist
from framework.errors import CheckpointError, ConfigError
from framework.model import GPT, ModelConfig
from framework.safeload import SafeFileSystemReader, dcp_load, load_pt

log = logging.getLogger("framework")

COMMIT = "COMMITTED"
CRASH_EXIT_CODE = 86  # faults.crash_in_async_save: a distinctive status for the test to expect
MANIFEST = "manifest.json"
LATEST = "latest"
TRAINER = "trainer.json"
# Shape keys of the model that a checkpoint must agree with (dropout or init may differ).
SHAPE_KEYS = (
    "style",
    "n_layer",
    "n_head",
    "kv_heads",
    "n_embd",
    "vocab_size",
    "ffn_dim",
    "bias",
    "tie_embeddings",
    "num_labels",
    "qk_norm",
    "moe_shape",
)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _files(root: Path) -> list[str]:
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and p.name not in (MANIFEST, COMMIT)
    )


def xxh3_file(path: Path, chunk_bytes: int = 1 << 24) -> str:
    h = xxhash.xxh3_128()
    buf = bytearray(chunk_bytes)  # one buffer, refilled: no allocation per chunk
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "xxh3_128": xxh3_file(path)}


def _hash_share(root: Path, files: list[str], rank: int, world_size: int) -> dict:
    return {f: _entry(root / f) for f in files[rank::world_size]}


@dataclass
class _Pending:
    """An async save dispatched but not committed."""

    step: int
    tmp: Path
    hashed: Future  # resolves to this rank's manifest share once every rank's files are written
    t0: float


def model_shape(model_cfg) -> dict:
    return {k: getattr(model_cfg, k) for k in SHAPE_KEYS}


class Checkpointer:
    _pending: _Pending | None = None  # the async save dispatched and not yet committed

    def __init__(
        self, root: Path, cfg: CheckpointConfig, dist: Dist, faults: FaultsConfig | None = None
    ):
        """Checkpoints under `root` as cfg says (keep, async_save); `faults`: the test-only
        injections into saves (sleep_in_save_s, crash_in_async_save)."""
        faults = faults or FaultsConfig()
        self.root, self.keep, self.dist = root, cfg.keep, dist
        self.last_save_s: float | None = None  # time the caller was blocked by the last save
        self.pause_s = faults.sleep_in_save_s  # fault injection
        self.crash_step = faults.crash_in_async_save  # fault injection
        self.async_save = cfg.async_save
        self._group = self._stager = None
        if self.async_save:
            # DCP's background thread runs collectives (plans, write results) while the loop
            # runs its own: on one group they could interleave differently on each rank, so
            # DCP gets a gloo group of its own (also the CPU backend async_save needs under nccl)
            if dist.initialized:
                self._group = tdist.new_group(backend="gloo")
            # one stager for the run: its CPU buffers are allocated at the first save and
            # reused (a copy, not an allocation, blocks the loop); pinned on CUDA for speed
            cuda = dist.device.type == "cuda"
            self._stager = DefaultStager(StagingOptions(cuda, False, False, False))
        if dist.is_main:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".tmp-*"):  # partial saves of a crashed run: never loadable
                log.warning("removing incomplete checkpoint %s", stale)
                shutil.rmtree(stale, ignore_errors=True)
        dist.barrier()

    # -- finding -------------------------------------------------------------------------
    def committed(self) -> list[Path]:
        return sorted(p for p in self.root.glob("step_*") if (p / COMMIT).is_file())

    def latest(self) -> Path | None:
        """The checkpoint `latest` names; if it is missing or uncommitted, the newest committed
        one (logged), else None. A save still in flight is committed first (all ranks call it)."""
        self.finish()
        marker = self.root / LATEST
        if marker.is_file():
            target = self.root / marker.read_text().strip()
            if (target / COMMIT).is_file():
                return target
            log.warning("%s names %s, which is not a committed checkpoint", marker, target)
        done = self.committed()
        return done[-1] if done else None

    def find_resume(self, mode: str, path: str | None) -> Path | None:
        """checkpoint.resume: auto (latest if any), never, required (fail at once if none)."""
        if mode == "never":
            return None
        if path:
            p = Path(path)
            if not (p / COMMIT).is_file():
                raise CheckpointError(
                    f"checkpoint.path={path} is not a committed checkpoint (no {COMMIT} marker)"
                )
            return p
        found = self.latest()
        if found is None and mode == "required":
            raise CheckpointError(
                f"checkpoint.resume=required but there is no committed checkpoint under {self.root} "
                "(set checkpoint.path=<dir> or checkpoint.resume=auto)"
            )
        if found is None and self.dist.is_main:  # once per run, not once per rank
            log.warning("fresh start: no checkpoint under %s", self.root)
        return found

    # -- saving --------------------------------------------------------------------------
    def save(self, step: int, engine, trainer_state: dict) -> Path:
        """All ranks call this. The checkpoint appears under its final name only when complete:
        here (synchronous) or at finish() (checkpoint.async_save; returns once staged)."""
        self.finish()  # one save in flight at most: the previous one commits first
        d = self.dist
        t0 = time.perf_counter()
        name = step_dir_name(step)
        tmp = self.root / f".tmp-{name}"
        if d.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        d.barrier()
        with _naming_write_errors(tmp, self.root):
            # rng and trainer.json before the state: DCP's first collective then proves them
            # written on every rank, so the background hashing may list the whole folder
            torch.save(rng_state(), tmp / "rng" / f"rank_{d.rank:05d}.pt")
            if d.is_main:
                _fsync_write(tmp / TRAINER, json.dumps(trainer_state, indent=1))
            if self.async_save:
                written = engine.save_async(tmp / "state", self._group, self._stager)
            else:
                engine.save(tmp / "state")
        if self.async_save:
            hasher = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-hash")
            hashed = hasher.submit(self._hash_when_written, written, tmp)
            hasher.shutdown(wait=False)  # the thread ends with its one task
            self._pending = _Pending(step, tmp, hashed, t0)
            self.last_save_s = time.perf_counter() - t0
            log.info("save of step %d staged in %.2f s; writing %s", step, self.last_save_s, tmp)
            return self.root / name
        d.barrier()
        manifest = self._hash_all(tmp)
        self._commit(step, tmp, manifest)
        self.last_save_s = time.perf_counter() - t0
        self._log_saved(step, manifest, f"in {self.last_save_s:.1f} s")
        return self.root / name

    def finish(self) -> None:
        """Commit the async save in flight, if any, once every rank's write finished (all ranks
        call it). A failed write on any rank raises on every rank; nothing is committed."""
        p, self._pending = self._pending, None
        if p is None:
            return
        t0 = time.perf_counter()
        error, share = None, {}
        try:
            with _naming_write_errors(p.tmp, self.root):
                share = p.hashed.result()
        except CheckpointError as e:
            error = e
        parts = self.dist.all_gather_object(str(error) if error else share)
        failed = [f"rank {r}: {x}" for r, x in enumerate(parts) if isinstance(x, str)]
        if error is not None:
            raise error
        if failed:
            raise CheckpointError("async checkpoint write failed on " + "; ".join(failed))
        if self.crash_step == p.step:
            log.error("faults.crash_in_async_save=%d: exiting before the commit of %s", p.step, p.tmp)
            logging.shutdown()
            os._exit(CRASH_EXIT_CODE)
        merged: dict = {}
        for part in parts:
            merged.update(part)
        manifest = {"files": dict(sorted(merged.items()))}
        self._commit(p.step, p.tmp, manifest)
        waited = time.perf_counter() - t0
        self._log_saved(
            p.step,
            manifest,
            f"{time.perf_counter() - p.t0:.1f} s after dispatch ({waited:.2f} s waited)",
        )

    def _hash_when_written(self, written: Future, tmp: Path) -> dict:
        """Background: this rank's share of the manifest, once DCP's write finished. DCP's last
        collective returns only after every rank wrote its files and rank 0 the metadata."""
        written.result()
        return _hash_share(tmp, _files(tmp), self.dist.rank, self.dist.world_size)

    def _commit(self, step: int, tmp: Path, manifest: dict) -> None:
        if self.dist.is_main:
            name = step_dir_name(step)
            _fsync_write(tmp / MANIFEST, json.dumps(manifest, indent=1))
            _pause_before_commit(self.pause_s)
            _fsync_write(tmp / COMMIT, f"{step}\n")
            final = self.root / name
            if final.exists():  # redoing a step after resuming from an earlier checkpoint
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_write(self.root / (LATEST + ".tmp"), name + "\n")
            os.replace(self.root / (LATEST + ".tmp"), self.root / LATEST)
            self._prune(keep_name=name)
        self.dist.barrier()

    def _log_saved(self, step: int, manifest: dict, how: str) -> None:
        size = sum(f["bytes"] for f in manifest["files"].values())
        log.info("saved %s (%.1f MB) %s", self.root / step_dir_name(step), size / 1e6, how)

    def _hash_all(self, root: Path) -> dict:
        files = _files(root) if self.dist.is_main else None
        files = self.dist.broadcast_object(files)
        merged: dict = {}
        for part in self.dist.all_gather_object(
            _hash_share(root, files, self.dist.rank, self.dist.world_size)
        ):
            merged.update(part)
        return {"files": dict(sorted(merged.items()))}

    def _prune(self, keep_name: str) -> None:
        if self.keep <= 0:
            return
        done = self.committed()
        for old in done[: -self.keep]:
            if old.name == keep_name:
                continue
            try:
                shutil.rmtree(old)
            except OSError as e:  # a failed delete leaves an extra checkpoint, never a lost one
                log.warning("could not delete old checkpoint %s: %s", old, e)

    # -- loading -------------------------------------------------------------------------
    def load(self, path: Path, engine, expect_shape: dict, tokenizer_fingerprint: str) -> dict:
        """Verify, check compatibility, then load engine state and this rank's RNG state."""
        self.finish()
        state = verify(path, self.dist)
        saved_shape = state.get("model", {})
        # checkpoints older than classifiers, QK-norm and MoE: dense LMs without QK-norm
        saved_shape = {"num_labels": 0, "qk_norm": False, "moe_shape": None, **saved_shape}
        diff = {k: (saved_shape.get(k), v) for k, v in expect_shape.items() if saved_shape.get(k) != v}
        if state.get("tokenizer") != tokenizer_fingerprint:
            diff["data.tokenizer"] = (state.get("tokenizer"), tokenizer_fingerprint)
        if diff:
            lines = [f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items()]
            raise CheckpointError(f"{path} does not match this config:\n  " + "\n  ".join(lines))
        if (path / "state" / "zero").is_dir():
            raise CheckpointError(
                f"{path / 'state' / 'zero'}: DeepSpeed's own checkpoint files (pickles, written by an "
                "earlier version of this framework), which are not loaded. Its weights alone load "
                f"with framework.export / framework.generate checkpoint={path}; start training anew."
            )
        t0 = time.perf_counter()
        engine.load(path / "state")
        rng_file = path / "rng" / f"rank_{self.dist.rank:05d}.pt"
        if rng_file.is_file():
            set_rng_state(load_pt(rng_file))
        else:  # resumed on more ranks than saved: new ranks get a fresh, deterministic stream
            log.warning("%s absent (saved with %s ranks); reseeding", rng_file, state.get("world_size"))
            torch.manual_seed(int(state.get("seed", 0)) + 7919 * self.dist.rank + state["step"])
        log.info("resumed from %s (step %d) in %.1fs", path, state["step"], time.perf_counter() - t0)
        return state


@contextlib.contextmanager
def _naming_write_errors(tmp: Path, root: Path):
    """A failed write (disk full, permission, quota) as an error that names the checkpoint
    directory and the OS error. torch.save reports a full disk as `enforce fail at
    inline_container.cc ... unexpected pos` and DCP wraps that per rank; the free space is
    added so the cause is plain. Nothing is committed: `latest` keeps naming the previous
    checkpoint and the next start removes the partial folder."""
    try:
        yield
    except (OSError, RuntimeError, CheckpointException) as e:
        if isinstance(e, CheckpointError):
            raise
        try:
            free = f"{shutil.disk_usage(tmp).free / 2**20:.0f} MiB free there"
        except OSError:
            free = "free space unknown"
        cause = f"{type(e).__name__}: {e}".strip().splitlines()
        if isinstance(e, CheckpointException):  # the first rank's underlying error
            cause = [f"{type(x).__name__}: {x}" for x, _ in e.failures.values()][:1] or cause
        if "unexpected pos" in cause[0] and "No space" not in cause[0]:
            cause[0] += " (a short write: the disk is probably full)"
        previous = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else "none"
        raise CheckpointError(
            f"could not write checkpoint {tmp} ({free}): {cause[0]}. Nothing was committed: "
            f"{root / LATEST} still names {previous}; the partial folder is removed at the next "
            "start. Free space or fix permissions there, or set run.dir elsewhere."
        ) from e


def verify(path: Path, dist: Dist | None = None) -> dict:
    """Check every file against the manifest before anything is unpickled; returns
    trainer.json. Every rank calls it and hashes its share; the problems are gathered."""
    dist = dist or Dist()
    mf = path / MANIFEST
    if not (path / COMMIT).is_file() or not mf.is_file():
        raise CheckpointError(f"{path} is not a committed checkpoint (no {COMMIT} or {MANIFEST})")
    files = json.loads(mf.read_text())["files"]
    names = sorted(files)
    problems = []
    for f in names[dist.rank :: dist.world_size]:
        p, want = path / f, files[f]
        if not p.is_file():
            problems.append(f"{p}: missing")
        elif p.stat().st_size != want["bytes"]:
            problems.append(f"{p}: {p.stat().st_size} bytes, expected {want['bytes']}")
        else:  # xxh3_128 since async_save; sha256 in manifests written before
            kind = "xxh3_128" if "xxh3_128" in want else "sha256"
            got = xxh3_file(p) if kind == "xxh3_128" else sha256_file(p)
            if got != want[kind]:
                problems.append(f"{p}: {kind} {got}, expected {want[kind]}")
    extra = sorted(set(_files(path)) - set(names)) if dist.is_main else []
    problems += [f"{path / f}: not in the manifest" for f in extra]
    problems = [x for part in dist.all_gather_object(problems) for x in part]
    if problems:
        raise CheckpointError("checkpoint failed verification:\n  " + "\n  ".join(problems))
    return json.loads((path / TRAINER).read_text())


def resolve(path: str | Path) -> Path:
    """A checkpoint dir, a checkpoints/ dir or a run dir -> the committed checkpoint it means."""
    p = Path(path)
    if (p / COMMIT).is_file():
        return p
    for root in (p, p / "checkpoints"):
        marker = root / LATEST
        if marker.is_file() and (root / marker.read_text().strip() / COMMIT).is_file():
            return root / marker.read_text().strip()
    raise CheckpointError(
        f"{path}: no committed checkpoint here (nor a run dir or checkpoints/ with `latest`)"
    )


def load_model(path: str | Path):
    """A plain GPT (CPU, fp32) with the weights of a checkpoint of any strategy, and the
    checkpoint's trainer state. No process group: DCP reads the shards of every rank."""
    ckpt = resolve(path)
    state = verify(ckpt)
    model = GPT(ModelConfig(**state["config"]["model"]))
    sd = model.state_dict()
    dcp_load({"model": sd}, ckpt / "state")
    model.load_state_dict(sd)
    return model, state


def require_language_model(model: GPT, checkpoint: str | Path, entry: str) -> None:
    """A classifier's head scores labels, not next tokens: sampling from it would print noise."""
    if model.cfg.num_labels:
        raise ConfigError(
            f"checkpoint={checkpoint} is a classifier (task=classify, model.num_labels="
            f"{model.cfg.num_labels}): {entry} needs a language model; score texts with its "
            "Hugging Face export (framework.export format=hf: a *ForSequenceClassification)"
        )


class ModelTensorReader:
    """The model's tensors of a checkpoint of any strategy, one full tensor per `get`: DCP
    plans the read of that one key and reads only its pieces, from whichever ranks' files hold
    them (its metadata maps every saved shard). For streamed export of models larger than a
    host's memory. No process group."""

    def __init__(self, state_dir: Path, model_cfg):
        self.dir = state_dir
        with torch.device("meta"):  # shapes and dtypes of our full tensors, nothing allocated
            self.like = GPT(model_cfg).state_dict()
        # DCP's .metadata is a pickle: read through the restricted unpickler like every load
        saved = SafeFileSystemReader(state_dir).read_metadata().state_dict_metadata
        # name -> the saved full shape (the refusals of a misfit init_from name both shapes)
        self.shapes = {
            k.removeprefix("model."): tuple(getattr(v, "size", ()))
            for k, v in saved.items()
            if k.startswith("model.")
        }
        self.saved = set(self.shapes)

    def get(self, name: str) -> torch.Tensor | None:
        """The full fp32 tensor `name`, or None if the model has no such tensor (a bias of a
        bias-free model)."""
        if name not in self.like:
            return None
        if name not in self.saved:
            raise CheckpointError(f"{self.dir}: the checkpoint has no tensor model.{name}")
        out = torch.empty_like(self.like[name], device="cpu")
        dcp_load({"model": {name: out}}, self.dir)
        return out


def rng_state() -> dict:
    s = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def _pause_before_commit(pause_s: float = 0.0) -> None:
    """Fault injection for the crash-during-save test (RELIABILITY A4) and the signal-during-save
    test (B5): FW_TEST_PAUSE_BEFORE_COMMIT (or faults.sleep_in_save_s) seconds of sleep between
    the data files and the commit marker."""
    pause = max(pause_s, float(os.environ.get("FW_TEST_PAUSE_BEFORE_COMMIT", "0")))
    if pause > 0:
        log.warning("pausing %.0fs before commit (FW_TEST_PAUSE_BEFORE_COMMIT)", pause)
        time.sleep(pause)


def checkpoint_readers(model_cfg, ckpt: Path, state: dict, init_from: str | Path) -> dict:
    """model.init_from=`init_from` (named in refusals), resolved to our verified checkpoint
    `ckpt` (`state`: its trainer.json), any strategy: our state-dict name -> a reader of that full tensor (fp32, CPU; ModelTensorReader,
    one DCP read per tensor). Every tensor must exist with our shape, checked here before any is
    read; the refusal names each one that differs. One exception: a classifier
    (model.num_labels) from a language model gets None for its head (the LM head has vocab_size
    rows): the caller initialises it."""
    reader = ModelTensorReader(ckpt / "state", model_cfg)
    ours, theirs = reader.like, reader.shapes
    fresh = set()
    if model_cfg.num_labels and not state["config"]["model"].get("num_labels"):
        fresh = {"lm_head.weight"}  # a classifier from a language model: a new head
        ours = {k: v for k, v in ours.items() if k not in fresh}
        theirs = {k: v for k, v in theirs.items() if k not in fresh}
    problems = [f"missing {k}" for k in ours if k not in theirs]
    problems += [f"unexpected {k}" for k in theirs if k not in ours]
    problems += [
        f"{k}: {tuple(theirs[k])} in the checkpoint, {tuple(v.shape)} in model.*"
        for k, v in ours.items()
        if k in theirs and tuple(theirs[k]) != tuple(v.shape)
    ]
    if problems:
        raise CheckpointError(
            f"model.init_from={init_from} does not fit the configured model: "
            + "; ".join(problems)
            + ". Set model=... (and model.vocab_size) to the checkpoint's model"
        )
    readers = {k: (lambda k=k: reader.get(k)) for k in ours}
    return readers | dict.fromkeys(fresh)

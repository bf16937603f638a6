"""The one typed config tree. Hydra composes YAML (conf/) over these dataclasses, `load()`
converts once to `Config`, and nothing below `main()` ever sees a DictConfig.

Cross-field checks live in `validate()`; they raise ConfigError naming every offending key
(never a bare assert: `python -O` strips those).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import MISSING, DictConfig, OmegaConf

from framework import precision  # the fp16 probe is looked up there (tests patch it)
from framework.errors import ConfigError
from framework.memory import GPUS
from framework.model.gpt import ModelConfig, ModelShapeError
from framework.optim import SCHEDULE_KEYS, OptimConfig
from framework.precision import PrecisionConfig
from framework.stages import LOOPED, SCHEDULES, stages_per_rank
from framework.stages import split as split_stages

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@dataclass
class SourceConfig:
    name: str = MISSING
    path: str = MISSING
    """Directory written by `framework.prepare` (holds manifest.json), or an fsspec URL."""
    weight: float = 1.0
    """Share of training tokens (normalised over sources); 0 disables the source."""
    max_epochs: float | None = None
    """Refuse a plan that draws this source more than this many times."""
    generator: str | None = None
    """Built-in sample generator that creates `path` when it holds no manifest (data=sample)."""


@dataclass
class ScheduleEntry:
    step: int = MISSING
    """First optimizer step at which `weights` apply."""
    weights: dict[str, float] = field(default_factory=dict)
    """{source name: weight} from `step` on; a source not named keeps its previous weight."""


@dataclass
class DataConfig:
    name: str = "sample"
    sources: list[SourceConfig] = field(default_factory=list)
    schedule: list[ScheduleEntry] = field(default_factory=list)
    """Weight changes at given steps (data stages)."""
    tokenizer: str = "byte"
    """Tokenizer the shards must have been written with: byte | path/to/tokenizer.json | tiktoken:NAME."""
    num_workers: int = 0
    """Background loader workers (the sample order does not depend on this)."""
    attend_across_documents: bool = False
    """false: each packed document attends only to itself and its positions restart at 0;
    true: attention runs over the whole window (documents see the ones before them)."""
    allow_empty_source: bool = False
    allow_change_on_resume: bool = False
    """Resume on changed data (manifests, tokenizer, seq_len, mixture, attend_across_documents): logged, positions kept by source name."""
    cache_dir: str = "${oc.env:FW_CACHE_DIR,${oc.env:HOME,.}/.cache/framework}"
    """Local cache for fsspec-URL shards."""
    root: str = "${oc.env:FW_DATA_ROOT,data}"
    """Where the embedded sample corpus is generated."""


@dataclass
class StrategyConfig:
    name: str = "single"
    """single | ddp | zero1 | zero2 | zero3 | fsdp | tp | tp_fsdp | pp (pipeline, replicas across dp)."""
    tp: int = 1
    """Tensor-parallel degree (tp, tp_fsdp); data-parallel degree = world_size / tp."""
    sequence_parallel: bool = True
    """Shard norms/dropout activations along the sequence under tensor parallel."""
    reshard_after_forward: bool = True
    """FSDP: free gathered parameters after forward (ZeRO-3 like) or keep them (ZeRO-2 like)."""
    hsdp_replicas: int = 1
    """FSDP: >1 shards within groups of world/hsdp_replicas and replicates across them (HSDP)."""
    activation_checkpointing: str = "none"
    """none | full | selective."""
    compile: bool = False
    """torch.compile each block."""
    zero_offload: bool = False
    """DeepSpeed: offload optimizer state to CPU."""
    overlap_comm: bool | None = None
    """DeepSpeed: overlap gradient reduction with the backward pass. None: on for CUDA (faster),
    off on CPU (the reduction order then matches the other strategies bitwise)."""
    pp: int = 1
    """Pipeline-parallel degree: the blocks split into pp stages (the outermost mesh dimension)."""
    pp_schedule: str = "1f1b"
    """gpipe | 1f1b | interleaved_1f1b | zero_bubble | dualpipev (torch.distributed.pipelining)."""
    pp_stages_per_rank: int = 2
    """interleaved_1f1b and zero_bubble: model chunks (virtual stages) per rank, placed round-robin
    (dualpipev always holds 2, in a V; gpipe and 1f1b hold 1)."""
    pp_layers: list[int] | None = None
    """Blocks per stage in order, e.g. [5, 6, 6, 5] (None: balanced by cost, the head counted)."""
    cp: int = 1
    """Context-parallel degree: every sequence split over cp ranks (same data, other positions)."""
    cp_method: str = "ulysses"
    """ulysses (all-to-all over heads; every backend) | ring (torch's ring attention; CUDA only)."""
    ep: int = 1
    """Expert-parallel degree (MoE models): experts split over ep of the data-parallel ranks."""


@dataclass
class LoggerConfig:
    name: str = "none"
    """none | wandb | tensorboard."""
    project: str = "framework"
    entity: str | None = None
    mode: str = "offline"
    """wandb: online | offline | disabled. The API key comes only from WANDB_API_KEY."""
    tags: list[str] = field(default_factory=list)


@dataclass
class ProfileConfig:
    """torch.profiler over a window of steps (framework.observe.StepProfiler); off by default."""

    steps: list[int] = field(default_factory=list)
    """[first, last] optimizer steps to trace, inclusive (empty: off): <run.dir>/profile/step_<first>/rank_<r>.json."""
    ranks: list[int] = field(default_factory=list)
    """Ranks that trace (empty: every rank)."""
    record_shapes: bool = False
    """Record operator input shapes (larger trace; groups the top-operator table by shape)."""
    with_stack: bool = False
    """Record the Python stack of every operator (much larger trace, more overhead)."""
    with_memory: bool = False
    """Record tensor allocations and frees (the trace's memory view)."""


@dataclass
class TrainerConfig:
    max_steps: int = 200
    """Optimizer steps of the whole run; the LR schedule follows it."""
    stop_at_step: int | None = None
    """End this invocation after this step with a committed checkpoint (as a preemption would)."""
    seed: int = 1337
    seq_len: int = 128
    micro_batch_size: int = 16
    """Sequences per forward/backward on one data-parallel rank."""
    global_batch_size: int = 32
    """Sequences per optimizer step over all ranks (accumulation is derived from it)."""
    eval_every: int = 50
    eval_batches: int = 8
    log_every: int = 10
    device: str = "auto"
    """auto | cpu | cuda."""
    sample_tokens: int = 64
    """Tokens of text sampled at each eval (0: none)."""
    peak_flops: float | None = None
    """Per-device dense peak for MFU; None detects it from the device name."""
    deterministic: bool = False
    """Deterministic kernels (slower) for bitwise-reproducible GPU runs."""
    on_nan: str = "abort"
    """A non-finite loss or gradient norm on any rank, decided on all ranks before the update:
    abort (stop, nothing saved) | skip (drop the update) | rollback (reload the last checkpoint
    and skip the data window that produced it)."""
    spike_zscore: float | None = None
    """Skip a step whose loss is this many standard deviations above the recent losses (None/0: off)."""
    spike_window: int = 50
    """Recent losses the spike detector compares against (checkpointed)."""
    collective_timeout_s: float = 300.0
    """A step (or eval) that takes longer on any rank dumps every rank's stacks and last
    collectives into run.dir/stacks and exits non-zero. Saves use checkpoint.save_timeout_s."""
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    memory_snapshot: bool = False
    """CUDA only: record the allocator's history over the first steps and dump
    <run.dir>/memory/rank_<r>.pickle (pytorch.org/memory_viz), also on an out-of-memory error."""
    straggler_every: int = 50
    """Compare the ranks' step times every this many steps and name a slow rank (0: off)."""
    straggler_factor: float = 1.2
    """A rank slower than the median rank by more than this factor, 3 checks in a row, is named."""


@dataclass
class RunConfig:
    name: str = "${model.name}"
    dir: str = "runs/${run.name}"
    """The run directory; the same on every rank."""


@dataclass
class CheckpointConfig:
    every: int = 100
    """Save every this many optimizer steps (0: only at stop_at_step / the end)."""
    keep: int = 3
    """Newest committed checkpoints kept (0 keeps all; 1 is refused: a bad newest would leave none)."""
    resume: str = "auto"
    """auto (latest if any) | never | required (fail if none)."""
    path: str | None = None
    """Resume from this checkpoint directory instead of <run.dir>/checkpoints/latest."""
    save_timeout_s: float = 1800.0
    """Hang limit for a save and for the first step (compilation, first allocations); also the
    process group's collective timeout, so save barriers outlive slow writers."""
    async_save: bool = False
    """Write checkpoints in the background (DCP async_save): the loop waits only for a copy of the
    state to CPU memory (kept between saves: host memory of one more state per rank); the commit
    and `latest` follow once every rank's write finished (at the next save or the run's end).
    Torch strategies only (single, ddp, fsdp, tp, tp_fsdp)."""


@dataclass
class PlanConfig:
    world_size: int | None = None
    """Target GPUs for framework.plan (None: the launcher's WORLD_SIZE, else 1)."""
    gpu: str = "h100"
    """h100 | h200 | a100 | ... (memory and peak FLOPs of the target)."""
    mfu: float = 0.45
    """MFU assumed for the step-time estimate."""
    dry_run: bool = False
    """Also build the model on meta over a fake process group of world_size ranks and report
    the per-rank bytes of the real sharded tensors (and, for the torch strategies, the bytes
    each collective moves in one step) beside the analytic plan."""
    gpus_per_node: int = 8
    """GPUs per node: groups of ranks inside one node communicate over intra_node_gbps."""
    intra_node_gbps: float | None = None
    """GPU-to-GPU bandwidth inside a node, per GPU and direction, in gigabits per second
    (None: plan.gpu's NVLink / PCIe figure, e.g. 3600 = 450 GB/s for H100 SXM)."""
    inter_node_gbps: float | None = None
    """Network bandwidth between nodes, per GPU and direction, in gigabits per second (None:
    plan.gpu's figure, 400 = one 400 Gb/s InfiniBand NIC per GPU for Hopper nodes)."""
    search: bool = False
    """Rank the layouts (tp x pp x dp x cp x schedule x micro-batch x checkpointing) of this
    model, world size and GPU by estimated step time instead of planning strategy.* as given."""


@dataclass
class FaultsConfig:
    """Test-only fault injection (all off by default)."""

    nan_loss_at_step: int | None = None
    """The loss of this step is NaN (its gradients too) on faults.rank."""
    nan_grad_at_step: int | None = None
    """One gradient element of this step is NaN on faults.rank, after the data-parallel reduction."""
    spike_at_step: int | None = None
    """The loss of this step is multiplied by faults.spike_factor on faults.rank."""
    spike_factor: float = 50.0
    rank: int | None = None
    """The rank that injects (None: every rank)."""
    hang_at_step: int | None = None
    """faults.rank sleeps forever inside this step."""
    sleep_in_step_s: float = 0.0
    """Sleep this long in every step (gives a test time to send a signal mid-run)."""
    sleep_in_save_s: float = 0.0
    """Sleep this long inside every save, before the commit."""
    crash_in_async_save: int | None = None
    """Every rank exits (status 86) once the async save of this step is written, before its commit."""
    slow_rank: int | None = None
    """This rank sleeps faults.slow_ms at the start of every step (a straggler, in compute)."""
    slow_ms: float = 0.0
    """How long faults.slow_rank sleeps in every step, in milliseconds."""


@dataclass
class TaskConfig:
    name: str = "pretrain"
    """pretrain (every token is a target) | sft (instruction data from `prepare format=chat`: loss
    on assistant tokens only) | classify (labelled text from `prepare format=classify`: a linear
    head on the last text token); chosen once at build time by framework.task."""
    labels: list[str] = field(default_factory=list)
    """classify: the label of each class id, filled at start-up from the sources' manifests
    (recorded in the run's config, so export writes id2label); empty otherwise."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    task: TaskConfig = field(default_factory=TaskConfig)


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)


register()

TASKS = ("pretrain", "sft", "classify")  # framework/task.py builds each
STRATEGIES = ("single", "ddp", "zero1", "zero2", "zero3", "fsdp", "tp", "tp_fsdp", "pp")
MULTI_PROCESS = ("ddp", "fsdp", "tp", "tp_fsdp", "pp")
"""Strategies whose engine needs a process group of >= 2 ranks (ZeRO makes its own of 1)."""
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "fp8")


def load(cfg: DictConfig) -> Config:
    """Resolve (missing `???` keys fail here, naming the key path) and convert once."""
    try:
        OmegaConf.resolve(cfg)
        obj = OmegaConf.to_object(cfg)
    except Exception as e:  # omegaconf errors carry the full key path; re-raise as ours
        raise ConfigError(f"config error: {e}") from e
    if not isinstance(obj, Config):
        raise ConfigError(f"expected a Config, got {type(obj).__name__}")
    return obj


def job_run_dir(run_dir: str) -> str:
    """run.dir of this Hydra job: under `-m` each sweep point gets its own directory
    (hydra.sweep.subdir: `<run.dir>/<job number>`), never a shared one."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return run_dir
    return str(HydraConfig.get().runtime.output_dir)


# Keys a resume may change without a word: where and how the run is launched, logged and
# checkpointed (strategy and world size reshard on load); the LR schedule, the data and the model
# shape have checks of their own (optim.schedule_change_warning, data.identity, Checkpointer.load).
RESUME_MAY_CHANGE = (
    "run.", "checkpoint.", "logger.", "faults.", "plan.", "strategy.", "data.", "model.init_from",
    "model.name", "trainer.stop_at_step", "trainer.log_every", "trainer.eval_every",
    "trainer.eval_batches", "trainer.sample_tokens", "trainer.device", "trainer.collective_timeout_s",
    "trainer.peak_flops", "trainer.profile.", "trainer.memory_snapshot", "trainer.straggler_",
    *SCHEDULE_KEYS,
)  # fmt: skip


def resume_changes(saved: dict | None, cfg: Config) -> list[str]:
    """`key: old -> new` for every other key whose value differs from the checkpoint's saved
    config (trainer.json "config"): a resume that changes, e.g., the seed, weight decay, dropout or
    the batch size continues a different run than the one it names."""
    if not saved:
        return []

    def flat(d: Any, prefix: str = "") -> dict:
        if not isinstance(d, dict):
            return {prefix[:-1]: d}
        return {k: v for key, val in d.items() for k, v in flat(val, f"{prefix}{key}.").items()}

    old, new = flat(saved), flat(to_dict(cfg))
    return [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k) and not k.startswith(RESUME_MAY_CHANGE)
    ]


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def grad_accum_steps(cfg: Config, dp_size: int) -> int:
    return cfg.trainer.global_batch_size // (cfg.trainer.micro_batch_size * dp_size)


@dataclass(frozen=True)
class Layout:
    """The degree of every parallel axis. World ranks are laid out row-major over AXES, tensor
    parallel innermost (DESIGN: mesh order pp, dp (replicate, shard), cp, tp): tensor-parallel
    peers are neighbouring ranks (one node's NVLink), pipeline stages the farthest apart (they
    exchange only activations). Expert parallelism does not add ranks: its ep groups are carved
    out of the data-parallel ranks (ep divides dp). Pure arithmetic: validate(), the plan and the
    mesh builder (framework.parallel) share it."""

    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    ep: int = 1

    AXES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, a) for a in self.AXES)

    @property
    def world(self) -> int:
        return math.prod(self.shape)

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many distinct micro-batch streams a step reads."""
        return self.dp_replicate * self.dp_shard

    def coords(self, rank: int) -> dict[str, int]:
        """{axis: index} of global `rank` (row-major over AXES)."""
        out = {}
        for axis, size in reversed(list(zip(self.AXES, self.shape))):
            rank, out[axis] = divmod(rank, size)
        return {a: out[a] for a in self.AXES}

    def dp_rank(self, rank: int) -> int:
        """The loader's coordinate: ranks that differ only in pp, cp or tp read the same data."""
        c = self.coords(rank)
        return c["dp_replicate"] * self.dp_shard + c["dp_shard"]


def layout(s: StrategyConfig, world_size: int) -> Layout:
    """The Layout strategy `s` gives on `world_size` ranks (validate() refuses what does not
    divide; here the degrees are floored so that a refused config still yields numbers)."""
    tp, pp, cp = max(s.tp, 1), max(s.pp, 1), max(s.cp, 1)
    dp = max(world_size // (pp * cp * tp), 1)
    replicate = 1
    if s.name in ("ddp", "pp"):
        replicate = dp  # whole replicas, gradients all-reduced
    elif s.name == "fsdp":
        replicate = max(min(s.hsdp_replicas, dp), 1)  # HSDP: shard inside, replicate across
    return Layout(pp, replicate, dp // replicate, cp, tp, max(s.ep, 1))


def dp_degree(cfg: Config, world_size: int) -> int:
    return layout(cfg.strategy, world_size).dp


def pipeline_stages(s: StrategyConfig) -> int:
    """Pipeline stages in all (1 without a pipeline): pp ranks times the stages each holds
    (framework.stages.stages_per_rank)."""
    return s.pp * stages_per_rank(s.pp_schedule, s.pp_stages_per_rank) if s.pp > 1 else 1


def validate(
    cfg: Config, world_size: int = 1, device: str | None = None, *, launched: bool = False
) -> None:
    """Every cross-field check that can run without a GPU or a process group. Collects all
    problems and raises one ConfigError that names each key. `device` is the target device type
    (cpu | cuda); None resolves trainer.device here (framework.plan passes cuda: it sizes GPUs).
    `launched`: a launcher (torchrun, deepspeed, accelerate, srun of several tasks) started this
    process, so a world of 1 is a job scaled down to one GPU and runs every strategy; False
    means one plain process, where a multi-process strategy is a forgotten launcher."""
    errors: list[str] = []
    try:
        cfg.model.validate()
    except ModelShapeError as e:
        errors.append(str(e))
    m, t, s, p = cfg.model, cfg.trainer, cfg.strategy, cfg.precision

    if s.name not in STRATEGIES:
        errors.append(f"strategy.name={s.name!r} is not one of {', '.join(STRATEGIES)}")
    if p.name not in PRECISIONS:
        errors.append(f"precision.name={p.name!r} is not one of {', '.join(PRECISIONS)}")
    if cfg.task.name not in TASKS:
        errors.append(f"task.name={cfg.task.name!r} is not one of {', '.join(TASKS)}")
    if cfg.model.num_labels and cfg.task.name != "classify":
        errors.append(
            f"model.num_labels={cfg.model.num_labels} is a classifier head, but task={cfg.task.name} "
            "trains a language model: set task=classify or model.num_labels=0"
        )
    if world_size < 1:
        errors.append(f"world size {world_size} must be >= 1")
    if s.tp < 1:
        errors.append(f"strategy.tp={s.tp} must be >= 1")
    elif s.tp > 1 and s.name not in ("tp", "tp_fsdp"):
        why = ""
        if s.name in ("zero1", "zero2", "zero3"):
            why = ": DeepSpeed ZeRO is not combined with tensor parallel here; use strategy=tp_fsdp"
        errors.append(f"strategy.tp={s.tp} needs strategy=tp or tp_fsdp (got strategy={s.name}){why}")
    elif world_size % s.tp:
        errors.append(
            f"world size {world_size} is not divisible by strategy.tp={s.tp}: the data-parallel "
            f"degree world/tp = {world_size}/{s.tp} must be a whole number >= 1"
        )
    else:
        if m.n_head % s.tp:
            errors.append(f"model.n_head={m.n_head} is not divisible by strategy.tp={s.tp}")
        if m.kv_heads % s.tp:
            errors.append(f"model.n_kv_head={m.kv_heads} is not divisible by strategy.tp={s.tp}")
        if m.ffn_dim % s.tp:
            errors.append(f"model ffn width {m.ffn_dim} is not divisible by strategy.tp={s.tp}")
    if s.name in ("tp", "tp_fsdp") and m.moe.enabled:
        errors.append(
            f"model.moe.num_experts={m.moe.num_experts}: strategy={s.name} has no tensor-parallel "
            "plan for expert layers; use strategy=fsdp, ddp or zero1/2/3"
        )
    if s.name in ("tp", "tp_fsdp") and m.qk_norm:
        errors.append(
            f"model.qk_norm=true normalises the whole query/key projection, which strategy={s.name} "
            "splits over ranks; use strategy=fsdp, ddp or zero1/2/3"
        )
    if s.name in MULTI_PROCESS and world_size == 1 and not launched:
        errors.append(
            f"strategy={s.name} needs several processes, but the world size is 1 (one plain "
            "process): launch with `launchers/torchrun.sh N ...` (N may be 1), `torchrun "
            "--nproc_per_node N -m framework.train ...`, `srun --ntasks-per-node N python -m framework.train ...` or "
            "`launchers/slurm/train.sbatch`, or use strategy=single (zero1/2/3 also run in one "
            "process)"
        )
    if s.name == "single" and world_size > 1:
        errors.append(f"strategy=single runs on one process, but the world size is {world_size}")
    pp = max(s.pp, 1)
    if s.name == "tp" and world_size % max(s.tp, 1) == 0 and s.tp * pp != world_size:
        across = f" / strategy.pp={s.pp} = {world_size // pp}" if pp > 1 else ""
        errors.append(
            f"strategy=tp splits the model over all ranks: strategy.tp={s.tp} must equal the world "
            f"size {world_size}{across} (use strategy=tp_fsdp for tensor x data parallel)"
        )
    if s.name in ("tp", "tp_fsdp") and s.sequence_parallel and s.tp >= 1 and t.seq_len % s.tp:
        errors.append(
            f"sequence parallel splits each sequence over the TP ranks: trainer.seq_len={t.seq_len} "
            f"is not divisible by strategy.tp={s.tp} (or set strategy.sequence_parallel=false)"
        )
    if s.name.startswith("zero") and p.name == "fp8":
        errors.append("precision=fp8 is not supported with DeepSpeed ZeRO: use strategy=fsdp")
    errors += _validate_device_precision(cfg, device)
    if s.name == "tp_fsdp" and s.tp > 1 and world_size // (s.tp * pp) < 2:
        errors.append(
            f"strategy=tp_fsdp needs a data-parallel degree >= 2: world {world_size} / tp {s.tp}"
            + (f" / pp {s.pp}" if pp > 1 else "")
        )
    errors += _validate_hsdp(s, world_size)
    errors += _validate_axes(s, world_size)
    errors += _validate_cp(cfg, device)
    errors += _validate_pipeline(cfg, world_size)
    errors += _validate_ep(cfg, world_size)
    if s.activation_checkpointing not in ("none", "full", "selective"):
        errors.append(
            f"strategy.activation_checkpointing={s.activation_checkpointing!r} must be none|full|selective"
        )

    dp = dp_degree(cfg, world_size) if s.tp >= 1 else world_size
    for key in ("max_steps", "seq_len", "micro_batch_size", "global_batch_size"):
        if getattr(t, key) <= 0:
            errors.append(f"trainer.{key}={getattr(t, key)} must be > 0")
    if t.micro_batch_size > 0 and dp > 0 and t.global_batch_size > 0:
        per_step = t.micro_batch_size * dp  # sequences of one micro-batch on every dp rank
        model_ranks = " x ".join(  # the ranks that share a micro-batch, outermost axis first
            [f"strategy.{k}={getattr(s, k)}" for k in ("pp", "cp") if getattr(s, k) > 1]
            + [f"strategy.tp={s.tp}"]
        )
        if t.global_batch_size % per_step:
            lower = t.global_batch_size // per_step * per_step
            near = " or ".join(str(n) for n in (lower, lower + per_step) if n > 0)
            errors.append(
                f"trainer.global_batch_size={t.global_batch_size} is not divisible by "
                f"trainer.micro_batch_size={t.micro_batch_size} x data-parallel degree {dp} "
                f"(world size {world_size} / {model_ranks}) = {per_step}, so gradient "
                f"accumulation steps would be {t.global_batch_size / per_step:.3g}; nearest valid "
                f"trainer.global_batch_size: {near}"
            )
    if t.seq_len > m.block_size:
        errors.append(f"trainer.seq_len={t.seq_len} exceeds model.block_size={m.block_size}")
    if t.stop_at_step is not None and not 1 <= t.stop_at_step <= t.max_steps:
        errors.append(
            f"trainer.stop_at_step={t.stop_at_step} must be in [1, trainer.max_steps={t.max_steps}]"
        )
    if t.device not in ("auto", "cpu", "cuda"):
        errors.append(f"trainer.device={t.device!r} must be auto|cpu|cuda")
    if t.eval_every < 0 or t.log_every <= 0:
        errors.append("trainer.eval_every must be >= 0 and trainer.log_every > 0")

    o = cfg.optim
    if o.schedule not in ("cosine", "wsd", "constant"):
        errors.append(f"optim.schedule={o.schedule!r} must be cosine|wsd|constant")
    if not (o.lr > 0 and math.isfinite(o.lr)):
        errors.append(f"optim.lr={o.lr} must be a positive finite number")
    if o.warmup_steps < 0:
        errors.append(f"optim.warmup_steps={o.warmup_steps} must be >= 0")

    c = cfg.checkpoint
    if c.resume not in ("auto", "never", "required"):
        errors.append(f"checkpoint.resume={c.resume!r} must be auto|never|required")
    if c.keep == 1 or c.keep < 0:
        errors.append(
            f"checkpoint.keep={c.keep}: keep at least 2 (a damaged newest checkpoint must leave "
            "one to fall back on), or 0 to keep all"
        )
    if c.every < 0:
        errors.append(f"checkpoint.every={c.every} must be >= 0")
    if c.async_save and s.name.startswith("zero"):
        # not built for ZeRO: its save first gathers whole fp32 tensors into fresh host memory on
        # every rank (collectives under ZeRO-3), which the loop would wait for anyway, and the
        # stager would hold one more whole copy per rank; refused rather than left untested
        errors.append(
            f"checkpoint.async_save=true is not supported with strategy={s.name} (DeepSpeed): set "
            "checkpoint.async_save=false, or use strategy=ddp|fsdp|tp|tp_fsdp"
        )

    if cfg.logger.name not in ("none", "wandb", "tensorboard"):
        errors.append(f"logger.name={cfg.logger.name!r} must be none|wandb|tensorboard")
    if cfg.logger.mode not in ("online", "offline", "disabled"):
        errors.append(f"logger.mode={cfg.logger.mode!r} must be online|offline|disabled")

    errors += _validate_faults(cfg, world_size)
    errors += _validate_observe(cfg, world_size, device)
    errors += _validate_targets(cfg)
    errors += _validate_sources(cfg.data)
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))


def target_device(trainer: TrainerConfig) -> str:
    """The device type trainer.device means on this machine (auto: cuda when one is visible).
    torch.cuda.is_available() does not create a CUDA context."""
    if trainer.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return trainer.device


def _validate_device_precision(cfg: Config, device: str | None) -> list[str]:
    """DeepSpeed's CPU accelerator refuses fp16 where oneDNN has no fp16 (e.g. AMD EPYC), and
    would do so only after the process group is up: refuse it here, naming the way out."""
    s, p = cfg.strategy, cfg.precision
    if p.name != "fp16" or s.name not in ("zero1", "zero2", "zero3"):
        return []
    device = device or target_device(cfg.trainer)
    if device != "cpu":
        return []
    if precision.deepspeed_cpu_fp16_supported():
        return []
    return [
        f"precision=fp16 with strategy={s.name} (DeepSpeed) on device cpu "
        f"(trainer.device={cfg.trainer.device}): DeepSpeed's CPU accelerator has no fp16 on this "
        "CPU (oneDNN reports no fp16 support). Use precision=bf16, or keep fp16 with "
        "strategy=ddp or strategy=fsdp, or run on a CUDA GPU"
    ]


def _validate_faults(cfg: Config, world_size: int) -> list[str]:
    t, f, errors = cfg.trainer, cfg.faults, []
    if t.on_nan not in ("abort", "skip", "rollback"):
        errors.append(f"trainer.on_nan={t.on_nan!r} must be abort|skip|rollback")
    if t.spike_zscore is not None and not (t.spike_zscore >= 0 and math.isfinite(t.spike_zscore)):
        errors.append(
            f"trainer.spike_zscore={t.spike_zscore} must be a finite number >= 0 (0 or null: off)"
        )
    if t.spike_window < 2:
        errors.append(f"trainer.spike_window={t.spike_window} must be >= 2")
    for key, value in (
        ("trainer.collective_timeout_s", t.collective_timeout_s),
        ("checkpoint.save_timeout_s", cfg.checkpoint.save_timeout_s),
    ):
        if not (value > 0 and math.isfinite(value)):
            errors.append(f"{key}={value} must be a positive number of seconds")
    for key in (
        "nan_loss_at_step",
        "nan_grad_at_step",
        "spike_at_step",
        "hang_at_step",
        "crash_in_async_save",
    ):
        step = getattr(f, key)
        if step is not None and not 1 <= step <= t.max_steps:
            errors.append(f"faults.{key}={step} must be in [1, trainer.max_steps={t.max_steps}]")
    if f.rank is not None and not 0 <= f.rank < world_size:
        errors.append(f"faults.rank={f.rank} must be in [0, world size {world_size})")
    if f.crash_in_async_save is not None and not cfg.checkpoint.async_save:
        errors.append(
            f"faults.crash_in_async_save={f.crash_in_async_save} needs checkpoint.async_save=true"
        )
    for key in ("sleep_in_step_s", "sleep_in_save_s", "slow_ms"):
        if not (getattr(f, key) >= 0 and math.isfinite(getattr(f, key))):
            errors.append(f"faults.{key}={getattr(f, key)} must be >= 0 and finite")
    if f.slow_rank is not None and not 0 <= f.slow_rank < world_size:
        errors.append(f"faults.slow_rank={f.slow_rank} must be in [0, world size {world_size})")
    if f.slow_ms > 0 and f.slow_rank is None:
        errors.append(f"faults.slow_ms={f.slow_ms} needs faults.slow_rank (the one rank to slow down)")
    return errors


def _validate_observe(cfg: Config, world_size: int, device: str | None) -> list[str]:
    """The profiler window and ranks, the memory snapshot's device, the straggler check."""
    t, pr, errors = cfg.trainer, cfg.trainer.profile, []
    if pr.steps and not (len(pr.steps) == 2 and 1 <= pr.steps[0] <= pr.steps[1] <= t.max_steps):
        errors.append(
            f"trainer.profile.steps={list(pr.steps)} must be [first, last] with 1 <= first <= last "
            f"<= trainer.max_steps={t.max_steps} (or [] for no profile)"
        )
    bad = [r for r in pr.ranks if not 0 <= r < world_size]
    if bad:
        errors.append(
            f"trainer.profile.ranks={list(pr.ranks)}: {bad} not in [0, world size {world_size})"
        )
    if t.memory_snapshot and (device or target_device(t)) != "cuda":
        # the snapshot is the CUDA caching allocator's history; host memory is already in
        # metrics.jsonl every step (host_rss_gib, host_peak_rss_gib)
        errors.append(
            f"trainer.memory_snapshot=true records the CUDA caching allocator's history, but the "
            f"device is cpu (trainer.device={t.device}): host memory is logged every step as "
            "host_rss_gib / host_peak_rss_gib; set trainer.memory_snapshot=false or run on a GPU"
        )
    if t.straggler_every < 0:
        errors.append(f"trainer.straggler_every={t.straggler_every} must be >= 0 (0: off)")
    if not (t.straggler_factor > 1 and math.isfinite(t.straggler_factor)):
        errors.append(f"trainer.straggler_factor={t.straggler_factor} must be a finite number > 1")
    return errors


CP_METHODS = ("ulysses", "ring")


def _validate_axes(s: StrategyConfig, world_size: int) -> list[str]:
    """The pipeline, context and expert axes: degrees, names, and that pp x cp x tp divides the
    world (the tensor-parallel checks above cover tp alone)."""
    errors = []
    for key in ("pp", "cp", "ep", "pp_stages_per_rank"):
        if getattr(s, key) < 1:
            errors.append(f"strategy.{key}={getattr(s, key)} must be >= 1")
    if s.pp_schedule not in SCHEDULES:
        errors.append(f"strategy.pp_schedule={s.pp_schedule!r} is not one of {', '.join(SCHEDULES)}")
    if s.cp_method not in CP_METHODS:
        errors.append(f"strategy.cp_method={s.cp_method!r} is not one of {', '.join(CP_METHODS)}")
    if errors:
        return errors
    model_ranks = s.pp * s.cp * max(s.tp, 1)
    if (s.pp > 1 or s.cp > 1) and world_size % model_ranks:
        errors.append(
            f"world size {world_size} is not divisible by strategy.pp={s.pp} x strategy.cp={s.cp} "
            f"x strategy.tp={s.tp} = {model_ranks}: the data-parallel degree must be a whole number"
        )
    return errors


CP_STRATEGIES = ("ddp", "fsdp", "tp_fsdp")


def _validate_cp(cfg: Config, device: str | None) -> list[str]:
    """Context parallelism: which strategies and methods it runs with, and that the sequence and
    the heads split evenly (heads over tp, then over cp)."""
    s, m, t = cfg.strategy, cfg.model, cfg.trainer
    if s.cp <= 1:
        return []
    errors = []
    if s.name not in CP_STRATEGIES:
        errors.append(
            f"strategy.cp={s.cp} needs strategy={'|'.join(CP_STRATEGIES)} (got {s.name}): the cp "
            "ranks reduce gradients with the data-parallel ones"
            + (" (DeepSpeed's engine does not)" if s.name.startswith("zero") else "")
        )
    tp = s.tp if s.name == "tp_fsdp" else 1
    if m.n_head % (tp * s.cp):
        errors.append(
            f"model.n_head={m.n_head} is not divisible by strategy.tp={tp} x strategy.cp={s.cp}: "
            "attention heads are split over tp, then over cp"
        )
    sp = tp if s.sequence_parallel else 1
    chunks = s.cp * sp * (2 if s.cp_method == "ring" else 1)
    if t.seq_len % chunks:
        what = (
            "2 x strategy.cp (ring's load-balanced chunks)" if s.cp_method == "ring" else "strategy.cp"
        )
        errors.append(
            f"trainer.seq_len={t.seq_len} is not divisible by {what}"
            + (f" x strategy.tp={tp} (sequence parallel)" if sp > 1 else "")
            + f" = {chunks}: every rank takes an equal chunk of each sequence"
        )
    if s.cp_method == "ring":
        device = device or target_device(t)
        if device != "cuda":
            errors.append(
                f"strategy.cp_method=ring runs torch's ring attention (context_parallel), which "
                f"needs CUDA's SDPA kernels (device {device}: the CPU SDPA op has no sharding "
                "strategy): use strategy.cp_method=ulysses"
            )
        if not cfg.data.attend_across_documents:
            errors.append(
                "strategy.cp_method=ring supports causal attention only, not document masks: set "
                "data.attend_across_documents=true, or use strategy.cp_method=ulysses"
            )
        if cfg.task.name != "pretrain":
            errors.append(f"strategy.cp_method=ring is built for task=pretrain (got {cfg.task.name})")
    return errors


def _validate_pipeline(cfg: Config, world_size: int) -> list[str]:
    """strategy.pp > 1: the strategies it composes with, the split of the blocks into stages, and
    the micro-batches per step that the schedule needs (framework/parallel/pp.py)."""
    s, t, errors = cfg.strategy, cfg.trainer, []
    if s.pp < 1 or s.pp_stages_per_rank < 1 or s.pp_schedule not in SCHEDULES:
        return []  # named by _validate_axes
    if s.pp == 1:
        if s.pp_layers is not None:
            errors.append(f"strategy.pp_layers={s.pp_layers} needs strategy.pp > 1")
        return errors
    if s.name.startswith("zero"):
        return [
            f"strategy={s.name} (DeepSpeed ZeRO) does not compose with strategy.pp={s.pp}: use "
            "strategy=fsdp strategy.pp=... (ZeRO-3 like; strategy.reshard_after_forward=false "
            "is the ZeRO-2 analogue) or strategy=pp (whole replicas, ZeRO-0)"
        ]
    if s.name == "single":
        return [f"strategy.pp={s.pp} needs several processes: use strategy=pp (or ddp|fsdp|tp|tp_fsdp)"]
    if s.cp > 1:
        errors.append(
            f"strategy.cp={s.cp} with strategy.pp={s.pp}: context parallelism inside pipeline "
            "stages is not built; use one of them (the plan's search ranks both)"
        )
    if cfg.precision.name == "fp16":
        errors.append(
            f"precision=fp16 (dynamic loss scaling) is not built for strategy.pp={s.pp}: use "
            "precision=bf16, which needs no loss scale"
        )
    split = s.pp_schedule in ("zero_bubble", "dualpipev")  # backward split in input, weight grads
    if split and s.compile:
        errors.append(
            f"strategy.pp_schedule={s.pp_schedule} splits each backward into input and weight "
            "gradients, which torch.compile'd blocks do not support: set strategy.compile=false "
            "or strategy.pp_schedule=1f1b|interleaved_1f1b|gpipe"
        )
    if split and s.activation_checkpointing == "selective":
        errors.append(
            f"strategy.pp_schedule={s.pp_schedule} runs two backward passes over each block (input, "
            "then weight gradients), which selective activation checkpointing refuses: set "
            "strategy.activation_checkpointing=full, or strategy.pp_schedule=1f1b|interleaved_1f1b"
        )
    if s.pp_schedule == "dualpipev" and s.pp_stages_per_rank != 2:
        errors.append(
            f"strategy.pp_schedule=dualpipev holds exactly 2 stages per rank (a V): "
            f"strategy.pp_stages_per_rank={s.pp_stages_per_rank} must be 2"
        )
    stages = pipeline_stages(s)
    try:
        split_stages(cfg.model, t.seq_len, stages, s.pp_layers)
    except ValueError as e:
        per_rank = f" ({s.pp} ranks x {stages // s.pp} stages each)" if stages > s.pp else ""
        errors.append(f"strategy.pp={s.pp}, strategy.pp_schedule={s.pp_schedule}{per_rank}: {e}")
    dp = dp_degree(cfg, world_size)
    if t.micro_batch_size > 0 and t.global_batch_size % (t.micro_batch_size * dp) == 0:
        accum = t.global_batch_size // (t.micro_batch_size * dp)
        # torch's checks: 1F1B-style schedules fill the pipeline with one micro-batch per stage
        # (the round-robin ones per rank, in rounds of pp); DualPipeV with one per stage of the V
        need = 1 if s.pp_schedule == "gpipe" else stages if s.pp_schedule == "dualpipev" else s.pp
        what = f"its {stages} stages" if s.pp_schedule == "dualpipev" else f"strategy.pp={s.pp}"
        why = (
            f"trainer.global_batch_size={t.global_batch_size} / (trainer.micro_batch_size="
            f"{t.micro_batch_size} x data-parallel degree {dp}) = {accum} micro-batches per step"
        )
        if accum < need:
            errors.append(
                f"strategy.pp_schedule={s.pp_schedule} needs at least {need} micro-batches per step "
                f"({what}), but {why}: raise "
                f"trainer.global_batch_size to {need * t.micro_batch_size * dp} or lower "
                "trainer.micro_batch_size (or use strategy.pp_schedule=gpipe)"
            )
        elif s.pp_schedule in LOOPED and accum % s.pp:
            errors.append(
                f"strategy.pp_schedule={s.pp_schedule} runs the micro-batches in rounds of "
                f"strategy.pp={s.pp}, but {why}: make it a multiple of {s.pp}"
            )
    return errors


EP_STRATEGIES = ("ddp", "fsdp")


def _validate_ep(cfg: Config, world_size: int) -> list[str]:
    """Expert parallelism (framework/parallel/ep.py): a mixture-of-experts model, experts split
    evenly over ep, ep carved out of the data-parallel ranks of ddp or fsdp."""
    s, moe = cfg.strategy, cfg.model.moe
    if s.ep <= 1:
        return []
    if not moe.enabled:
        return [
            f"strategy.ep={s.ep} splits the experts of a mixture-of-experts model, but "
            "model.moe.num_experts=0 (a dense model): set strategy.ep=1 or model=debug-moe|"
            "olmoe-1b-7b|mixtral-8x7b"
        ]
    errors = []
    if moe.num_experts % s.ep:
        errors.append(
            f"model.moe.num_experts={moe.num_experts} is not divisible by strategy.ep={s.ep}: every "
            "ep rank holds the same number of experts"
        )
    if s.name in ("zero1", "zero2", "zero3"):
        errors.append(
            f"strategy.ep={s.ep} is not combined with DeepSpeed ZeRO (strategy={s.name}), whose "
            "engine reduces every gradient over all ranks: use strategy=fsdp (ZeRO-3-like sharding)"
            " or ddp"
        )
    elif s.name not in EP_STRATEGIES:
        hint = "; tensor parallel has no plan for expert layers" if s.name.startswith("tp") else ""
        errors.append(f"strategy.ep={s.ep} needs strategy=fsdp or ddp (got strategy={s.name}){hint}")
    if s.pp > 1 or s.cp > 1 or s.hsdp_replicas > 1:
        errors.append(
            f"strategy.ep={s.ep} is not combined with strategy.pp={s.pp}, strategy.cp={s.cp} or "
            f"strategy.hsdp_replicas={s.hsdp_replicas} yet: set those to 1"
        )
    if s.name == "fsdp" and s.activation_checkpointing == "selective":
        # torch 2.13: selective checkpointing replays ops by count, and the experts' own FSDP
        # units inside each block issue different profiler ops in forward and in recompute
        errors.append(
            f"strategy.activation_checkpointing=selective with strategy.ep={s.ep} under "
            "strategy=fsdp fails in torch's selective-checkpoint replay (the experts' FSDP units "
            "inside each block): use strategy.activation_checkpointing=full, or strategy=ddp"
        )
    dp = layout(s, world_size).dp
    if dp % s.ep:
        errors.append(
            f"strategy.ep={s.ep} must divide the data-parallel degree {dp} (world size "
            f"{world_size}): the expert-parallel groups are carved out of the data-parallel ranks"
        )
    return errors


def _validate_hsdp(s: StrategyConfig, world_size: int) -> list[str]:
    """HSDP replicates FSDP shard groups: only strategy=fsdp has them, and the data-parallel
    ranks must split evenly into strategy.hsdp_replicas groups."""
    if s.hsdp_replicas < 1:
        return [f"strategy.hsdp_replicas={s.hsdp_replicas} must be >= 1"]
    if s.hsdp_replicas == 1:
        return []
    if s.name != "fsdp":
        return [f"strategy.hsdp_replicas={s.hsdp_replicas} needs strategy=fsdp (got {s.name})"]
    dp = world_size // (s.tp * max(s.cp, 1) * max(s.pp, 1)) if s.tp >= 1 else world_size
    if dp % s.hsdp_replicas:
        return [
            f"strategy.hsdp_replicas={s.hsdp_replicas} does not divide the data-parallel degree {dp} "
            f"(world size {world_size} / strategy.tp={s.tp}"
            + (f" / strategy.cp={s.cp}" if s.cp > 1 else "")
            + (f" / strategy.pp={s.pp})" if s.pp > 1 else ")")
        ]
    return []


def _validate_targets(cfg: Config) -> list[str]:
    """Checks of the target hardware (plan.*) and of options that belong to one engine."""
    errors = []
    pl, s = cfg.plan, cfg.strategy
    gpu = GPUS.get(pl.gpu)
    if gpu is None:
        errors.append(f"plan.gpu={pl.gpu!r} is not one of {', '.join(GPUS)}")
    elif cfg.precision.name == "fp8" and not gpu.fp8:
        fp8_gpus = "|".join(name for name, g in GPUS.items() if g.fp8)
        errors.append(
            f"precision=fp8 needs a Hopper-class (sm_90+) GPU, but plan.gpu={pl.gpu}: use "
            f"precision=bf16, or plan.gpu={fp8_gpus}"
        )
    if not 0 < pl.mfu <= 1:
        errors.append(f"plan.mfu={pl.mfu} must be in (0, 1]")
    if pl.world_size is not None and pl.world_size < 1:
        errors.append(f"plan.world_size={pl.world_size} must be >= 1")
    if pl.gpus_per_node < 1:
        errors.append(f"plan.gpus_per_node={pl.gpus_per_node} must be >= 1")
    if pl.search and pl.dry_run:
        errors.append(
            "plan.search=true ranks layouts analytically; plan.dry_run=true builds one: run the "
            "search, then the dry run with the chosen layout's keys"
        )
    for key in ("intra_node_gbps", "inter_node_gbps"):
        value = getattr(pl, key)
        if value is not None and not (value > 0 and math.isfinite(value)):
            errors.append(f"plan.{key}={value} must be a positive number of gigabits per second")
    if s.zero_offload and s.name not in ("zero1", "zero2", "zero3"):
        errors.append(f"strategy.zero_offload=true needs strategy=zero1|zero2|zero3 (got {s.name})")
    if s.overlap_comm is not None and s.name not in ("zero1", "zero2", "zero3"):
        errors.append(
            f"strategy.overlap_comm={s.overlap_comm} is a DeepSpeed setting: it needs "
            f"strategy=zero1|zero2|zero3 (got {s.name})"
        )
    return errors


def _validate_sources(d: DataConfig) -> list[str]:
    errors = []
    if not d.sources:
        errors.append("data.sources is empty: list at least one {name, path, weight}")
    names = [s.name for s in d.sources]
    if len(set(names)) != len(names):
        errors.append(f"data.sources has duplicate names: {names}")
    for i, s in enumerate(d.sources):
        w = s.weight
        if not isinstance(w, (int, float)) or math.isnan(w) or math.isinf(w) or w < 0:
            errors.append(f"data.sources[{i}] ({s.name}).weight={w} must be a finite number >= 0")
        if s.max_epochs is not None and not s.max_epochs > 0:
            errors.append(f"data.sources[{i}] ({s.name}).max_epochs={s.max_epochs} must be > 0")
    if d.sources and not errors and sum(s.weight for s in d.sources) <= 0:
        errors.append("data.sources: all weights are 0; at least one source must have weight > 0")
    steps = [e.step for e in d.schedule]
    if any(st < 1 for st in steps) or steps != sorted(set(steps)):
        errors.append(f"data.schedule steps {steps} must be >= 1 and strictly increasing")
    for j, entry in enumerate(d.schedule):
        unknown = set(entry.weights) - set(names)
        if unknown:
            errors.append(f"data.schedule[{j}].weights names unknown sources {sorted(unknown)}")
        bad = [k for k, w in entry.weights.items() if math.isnan(w) or math.isinf(w) or w < 0]
        if bad:
            errors.append(f"data.schedule[{j}].weights {bad} must be finite and >= 0")
    return errors

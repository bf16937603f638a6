"""`python -m framework.plan`: validate a composed config for a target world size and print the
per-GPU memory and FLOPs plan, without a process group and without touching a GPU (nothing
here calls into CUDA), so a 1024-GPU config is checked on a laptop in a second or two.

    python -m framework.plan model=gpt3-175b strategy=zero3 plan.world_size=1024 plan.gpu=h100 \
        trainer.seq_len=2048 trainer.micro_batch_size=1 trainer.global_batch_size=2048 \
        strategy.activation_checkpointing=full

Same config tree as training (conf/config.yaml); plan.world_size (default: the launcher's
WORLD_SIZE, else 1), plan.gpu and plan.mfu pick the target. The memory model is in
framework/memory.py. A config that cannot run exits 1 with a ConfigError naming the keys. The
last stdout line is one JSON object (memory_gib, flops_per_token, the breakdown, fits).

plan.dry_run=true (RELIABILITY D5) also runs the real build path: the model on `meta`, the
real parallel functions (TP, AC, compile, FSDP) over torch's fake process group of
plan.world_size ranks, this process playing rank 0, and counts the bytes of the local shards
themselves; the JSON line gains "dry_run". Still no GPU, no memory for weights, no real peers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace

import torch.distributed as tdist
from omegaconf import DictConfig
from torch.distributed.tensor import DTensor

from framework import memory
from framework.cli import entry
from framework.config import Config, ConfigError, dp_degree, grad_accum_steps, load, validate
from framework.data.vocab import resolve_vocab_size
from framework.dist import Dist
from framework.model.gpt import num_params
from framework.parallel import build_engine
from framework.perf import flops_per_token, peak_flops
from framework.task import resolve_task

GIB = memory.GIB


def resolve_world_size(requested: int | None, env: dict[str, str] | None = None) -> int:
    """plan.world_size, else the launcher's WORLD_SIZE, else 1."""
    if requested is not None:
        return requested
    env = os.environ if env is None else env
    raw = env.get("WORLD_SIZE", "1")
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={raw!r} is not an integer; set plan.world_size instead") from None


@dataclass
class Plan:
    model: str
    gpu: str
    world_size: int
    strategy: str
    dp: int
    tp: int
    precision: str
    activation_checkpointing: str
    micro_batch_size: int
    grad_accum: int
    params: int
    """Whole model."""
    params_per_gpu: float
    """Parameters stored on one GPU (after tp and dp sharding)."""
    flops_per_token: float
    tokens_per_step: int
    peak_flops: float
    mfu: float
    step_time_s: float
    params_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    weight_copies_bytes: float
    """16-bit weights held during a step: gathered ZeRO-3/FSDP blocks, or autocast's casts."""
    activations_bytes: float
    """Under strategy.activation_checkpointing."""
    activations_by_mode_bytes: dict[str, float]
    """Under each mode (none | selective | full), to show the trade-off."""
    gpu_memory_gib: float
    ep: int = 1
    """Expert-parallel degree (carved out of dp)."""
    ep_buffers_bytes: float = 0.0
    """One sparse layer's all-to-all send and receive buffers (memory.ep_buffer_bytes)."""
    ep_all_to_all_bytes: float = 0.0
    """Bytes one rank sends by all-to-all per step (memory.ep_all_to_all_bytes)."""

    @property
    def memory_bytes(self) -> float:
        return (
            self.params_bytes
            + self.grads_bytes
            + self.optimizer_bytes
            + self.weight_copies_bytes
            + self.activations_bytes
            + self.ep_buffers_bytes
        )

    @property
    def limit_gib(self) -> float:
        return memory.FIT_FRACTION * self.gpu_memory_gib

    @property
    def fits(self) -> bool:
        return self.memory_bytes / GIB <= self.limit_gib

    def summary(self) -> dict:
        """The JSON line: per-GPU sizes in GiB."""

        def gib(x: float) -> float:
            return round(x / GIB, 4)

        return {
            "model": self.model,
            "gpu": self.gpu,
            "world_size": self.world_size,
            "strategy": self.strategy,
            "dp": self.dp,
            "tp": self.tp,
            "ep": self.ep,
            "precision": self.precision,
            "activation_checkpointing": self.activation_checkpointing,
            "grad_accum": self.grad_accum,
            "params": self.params,
            "params_per_gpu": round(self.params_per_gpu),
            "flops_per_token": self.flops_per_token,
            "tokens_per_step": self.tokens_per_step,
            "step_time_s": round(self.step_time_s, 4),
            "tokens_per_s": round(self.tokens_per_step / self.step_time_s),
            "mfu": self.mfu,
            "params_gib": gib(self.params_bytes),
            "grads_gib": gib(self.grads_bytes),
            "optimizer_gib": gib(self.optimizer_bytes),
            "weight_copies_gib": gib(self.weight_copies_bytes),
            "activations_gib": gib(self.activations_bytes),
            "activations_by_mode_gib": {k: gib(v) for k, v in self.activations_by_mode_bytes.items()},
            "ep_buffers_gib": gib(self.ep_buffers_bytes),
            "ep_all_to_all_gb_per_step": round(self.ep_all_to_all_bytes / 1e9, 3),
            "memory_gib": gib(self.memory_bytes),
            "gpu_memory_gib": self.gpu_memory_gib,
            "fits": self.fits,
        }


def make_plan(cfg: Config, world_size: int) -> Plan:
    """Validate `cfg` for `world_size` GPUs (ConfigError naming the keys) and size one GPU."""
    resolve_vocab_size(cfg)  # model.vocab_size=auto: from the data's manifests or tokenizer
    resolve_task(cfg)  # task=classify: model.num_labels (the head's rows) from the manifests
    # the plan sizes GPUs, whatever this machine has, for a launch (torchrun, srun, ...) of
    # world_size processes: a world of 1 is a valid launch of every strategy
    validate(cfg, world_size, device="cuda", launched=True)
    m, s, t = cfg.model, cfg.strategy, cfg.trainer
    gpu = memory.GPUS[cfg.plan.gpu]
    # The plan targets GPUs, where precision=auto means bf16.
    precision = "bf16" if cfg.precision.name == "auto" else cfg.precision.name
    dp = dp_degree(cfg, world_size)
    sb = memory.state_bytes(precision, s.name)
    shards = memory.dp_shards(s.name, dp, s.hsdp_replicas)
    n_local = memory.params_per_tp_rank(m, s.tp, s.sequence_parallel)
    # expert parallelism: each rank holds 1/ep of the routed experts (framework/parallel/ep.py)
    ep = max(s.ep, 1)
    experts = memory.routed_expert_params(m) if ep > 1 else 0.0
    state = memory.model_state_bytes(n_local, sb, shards, experts, ep)
    if s.zero_offload:  # DeepSpeed keeps the fp32 master and AdamW state in host memory
        state["optimizer"] = 0.0
    fpt = flops_per_token(m, t.seq_len)
    tokens_per_step = t.global_batch_size * t.seq_len
    peak = t.peak_flops or peak_flops(gpu.device_name)  # trainer.peak_flops overrides, as in training
    if peak is None:  # every GPUS entry has a peak; a test keeps the two tables in step
        raise ConfigError(f"plan.gpu={cfg.plan.gpu}: no peak FLOP/s known for {gpu.device_name!r}")
    act_args = (s.tp, s.sequence_parallel, sb.compute, memory.stream_bytes(precision, s.name))
    by_mode = {
        mode: memory.activation_bytes(m, t.seq_len, t.micro_batch_size, mode, *act_args)
        for mode in memory.AC_MODES
    }
    return Plan(
        model=m.name,
        gpu=cfg.plan.gpu,
        world_size=world_size,
        strategy=s.name,
        dp=dp,
        tp=s.tp,
        precision=precision,
        activation_checkpointing=s.activation_checkpointing,
        micro_batch_size=t.micro_batch_size,
        grad_accum=grad_accum_steps(cfg, dp),
        params=num_params(m),
        params_per_gpu=memory.params_per_rank(n_local, shards.params, experts, ep),
        flops_per_token=fpt,
        tokens_per_step=tokens_per_step,
        peak_flops=peak,
        mfu=cfg.plan.mfu,
        step_time_s=memory.step_time_s(fpt, tokens_per_step, world_size, peak, cfg.plan.mfu),
        params_bytes=state["params"],
        grads_bytes=state["grads"],
        optimizer_bytes=state["optimizer"],
        weight_copies_bytes=memory.weight_copies_bytes(
            m, s.tp, s.name, precision, s.reshard_after_forward, ep
        ),
        activations_bytes=by_mode[s.activation_checkpointing],
        activations_by_mode_bytes=by_mode,
        gpu_memory_gib=gpu.memory_gib,
        ep=ep,
        ep_buffers_bytes=(
            memory.ep_buffer_bytes(m, t.seq_len, t.micro_batch_size, sb.compute) if ep > 1 else 0.0
        ),
        ep_all_to_all_bytes=memory.ep_all_to_all_bytes(
            m,
            t.seq_len,
            t.micro_batch_size,
            grad_accum_steps(cfg, dp),
            ep,
            sb.compute,
            recompute=s.activation_checkpointing == "full",
        ),  # fmt: skip
    )


def _count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def _si(x: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} "


def _copies_note(p: Plan) -> str:
    if p.strategy in ("zero3", "fsdp", "tp_fsdp"):
        return "ZeRO-3/FSDP gathered blocks in flight"
    if p.weight_copies_bytes:
        return "autocast's 16-bit casts of the fp32 matrices"
    return "none: the weights are already in the compute dtype"


def _sharding(divisor: int) -> str:
    return f"sharded over {divisor} dp ranks" if divisor > 1 else "replicated over dp"


def render(p: Plan, cfg: Config) -> str:
    """The human-readable plan (the JSON line follows it)."""
    s = cfg.strategy
    sb = memory.state_bytes(p.precision, p.strategy)
    shards = memory.dp_shards(p.strategy, p.dp, s.hsdp_replicas)
    tp_note = f", block matrices split over tp={p.tp}" if p.tp > 1 else ""
    if s.zero_offload:
        optim_note = "in host memory: strategy.zero_offload"
    elif sb.param < 4:
        optim_note = "fp32 m, v + fp32 master"
    elif p.precision == "fp32":
        optim_note = "fp32 m, v"
    else:
        optim_note = "fp32 m, v; the fp32 weights are the master"
    sp_note = " / tp (sequence parallel)" if p.tp > 1 and s.sequence_parallel else ""
    gib = lambda x: f"{x / GIB:9.2f}"  # noqa: E731
    by_mode = ", ".join(f"{k} {v / GIB:.2f}" for k, v in p.activations_by_mode_bytes.items())
    ep_note = f", ep={p.ep}" if p.ep > 1 else ""
    lines = [
        f"plan: {p.model} on {p.world_size} x {p.gpu} ({p.gpu_memory_gib:g} GiB), strategy={p.strategy} "
        f"(dp={p.dp}, tp={p.tp}{ep_note}), precision={p.precision}, "
        f"activation_checkpointing={p.activation_checkpointing}",
        f"  parameters   {_count(p.params)} in the model, {_count(p.params_per_gpu)} stored per GPU",
        f"  batch        {cfg.trainer.global_batch_size} sequences x {cfg.trainer.seq_len} tokens = "
        f"{_count(p.tokens_per_step)} tokens/step; micro-batch {p.micro_batch_size} x "
        f"{p.grad_accum} accumulation steps per dp rank",
        f"  compute      {_si(p.flops_per_token)}FLOP/token (6N + 12 L H Q T); "
        f"{p.flops_per_token * p.tokens_per_step:.3g} FLOP/step",
        f"  step time    {p.step_time_s:.3g} s at {p.mfu:.0%} MFU of {p.peak_flops / 1e12:g} TFLOP/s per GPU "
        f"({_count(p.tokens_per_step / p.step_time_s)} tokens/s)",
        "  memory per GPU (GiB)",
        f"    weights       {gib(p.params_bytes)}  {sb.param} B/param, {_sharding(shards.params)}{tp_note}",
        f"    gradients     {gib(p.grads_bytes)}  {sb.grad} B/param, {_sharding(shards.grads)}",
        f"    optimizer     {gib(p.optimizer_bytes)}  {sb.optimizer} B/param ({optim_note}), "
        f"{_sharding(shards.optimizer)}",
        f"    weight copies {gib(p.weight_copies_bytes)}  {_copies_note(p)}",
        f"    activations   {gib(p.activations_bytes)}  one micro-batch of {p.micro_batch_size}, "
        f"checkpointing={p.activation_checkpointing}{sp_note}, + loss (by mode: {by_mode})",
        f"    total         {gib(p.memory_bytes)}  of {p.gpu_memory_gib:g} "
        f"(plan limit {p.limit_gib:.0f} = {memory.FIT_FRACTION:.0%}): "
        + ("fits" if p.fits else "DOES NOT FIT"),
    ]
    if p.ep > 1:
        lines[1] += f" (each rank 1/{p.ep} of the routed experts)"
        lines.insert(
            -1,
            f"    ep buffers    {gib(p.ep_buffers_bytes)}  one sparse layer's all-to-all send + "
            f"receive rows; all-to-all {p.ep_all_to_all_bytes / 1e9:.3g} GB sent per rank per step",
        )
    if not p.fits:
        lines.append(
            "  to fit: shard more (strategy=zero3|fsdp|tp_fsdp), raise strategy.tp, turn on "
            "strategy.activation_checkpointing=full, or lower trainer.micro_batch_size"
        )
    return "\n".join(lines)


def render_dry_run(d: dict, p: Plan) -> str:
    """The dry run's per-rank figures beside the analytic ones."""

    def row(name: str, real: float, planned: float) -> str:
        return f"    {name:13s} {real / GIB:9.2f}  plan {planned / GIB:.2f} ({real / planned - 1:+.2%})"

    return "\n".join(
        [
            f"  dry run (meta build over a fake process group of {p.world_size} ranks; rank 0, "
            f"the most loaded): {_count(d['params_per_rank'])} parameters per rank (GiB)",
            row("weights", d["weight_bytes_per_rank"], p.params_bytes),
            row("gradients", d["grad_bytes_per_rank"], p.grads_bytes),
            row("optimizer", d["optimizer_bytes_per_rank"], p.optimizer_bytes),
        ]
    )


def dry_run(cfg: Config, world_size: int) -> dict:
    """Per-rank model state of the most loaded rank, from the sharded (meta) tensors the real
    build path produces over a fake process group of `world_size` ranks.

    This process is rank 0 of the fake group. DTensor and FSDP2 split a dimension as
    torch.chunk does (the first ranks get the rounded-up chunks), so rank 0 holds the largest
    shard on every mesh dimension: its figures are the most loaded rank's."""
    # torch's test-only fake process group: registers backend "fake" as a side effect of import
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if tdist.is_initialized():
        raise ConfigError("plan.dry_run needs a process without a process group (run framework.plan)")
    if cfg.precision.name in ("auto", "fp8"):
        # the plan targets GPUs (auto = bf16); fp8's casts are transient, its weights bf16/fp32
        cfg = replace(cfg, precision=replace(cfg.precision, name="bf16"))
    tdist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        engine = build_engine(None, cfg, Dist(rank=0, world_size=world_size), dry_run=True)
        local = [
            p.to_local() if isinstance(p, DTensor) else p for p in engine.plain_model().parameters()
        ]
        weight_bytes = sum(t.numel() * t.element_size() for t in local)
        return {
            "params_per_rank": sum(t.numel() for t in local),
            "weight_bytes_per_rank": weight_bytes,
            # torch strategies: gradients take the parameters' dtype and sharding, and AdamW's
            # exp_avg / exp_avg_sq are zeros_like(param) (the fp32 weights are the master)
            "grad_bytes_per_rank": weight_bytes,
            "optimizer_bytes_per_rank": 2 * weight_bytes,
            "device": str(local[0].device) if local else "meta",
        }
    finally:
        tdist.destroy_process_group()


@entry("config", Config)
def main(dcfg: DictConfig) -> None:
    """Console script `fw-plan`."""
    cfg = load(dcfg)
    plan = make_plan(cfg, resolve_world_size(cfg.plan.world_size))
    summary = plan.summary()
    text = render(plan, cfg)
    if cfg.plan.dry_run:
        summary["dry_run"] = dry_run(cfg, plan.world_size)
        text += "\n" + render_dry_run(summary["dry_run"], plan)
    print(text)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""Training entry point: Hydra composes -> typed Config (converted once) -> build -> loop.

    python -m framework.train model=gpt2-124m strategy=fsdp precision=bf16 trainer.max_steps=5000
    torchrun --nproc_per_node 8 -m framework.train strategy=zero2 ...

The same entry runs under python, torchrun, deepspeed --no_local_rank, accelerate launch and
srun: ranks come from the environment (framework.dist).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from framework import config as C
from framework import faults, observe
from framework.checkpoint import Checkpointer, model_shape
from framework.cli import entry
from framework.data.identity import check_data_resume, data_identity, with_legacy_attention
from framework.data.loader import DataRank, MixtureLoader, val_batches
from framework.data.sample import generate as generate_sample_source
from framework.data.shards import MANIFEST
from framework.data.tokenizer import Tokenizer, load_tokenizer
from framework.data.vocab import resolve_vocab_size
from framework.dist import Dist, init_distributed, launch_env, teardown
from framework.metrics import Metrics, perplexity, setup_logging
from framework.model.gpt import num_params
from framework.model.moe import moe_metrics
from framework.model.sampling import sample
from framework.optim import lr_at, schedule_change_warning
from framework.parallel import build_engine
from framework.perf import StepTimer, device_sync, flops_per_token, host_memory, mfu, peak_flops
from framework.task import check_sources, eval_metrics, resolve_task

log = logging.getLogger("framework")


def train(cfg: C.Config) -> dict:
    """Run (or resume) training as configured; returns the last step's numbers."""
    resolve_vocab_size(cfg)  # model.vocab_size=auto -> the data's vocabulary, before validation
    resolve_task(cfg)  # task=classify: task.labels and model.num_labels from the manifests
    le = launch_env()  # before any process group or device is touched
    C.validate(cfg, le.world_size, launched=le.launcher != "none")
    guard = faults.Guard(cfg, faults.StopSignal().install())  # a stop signal only sets a flag
    # steps are watched by guard's watchdog (trainer.collective_timeout_s); the group's own
    # timeout is the longer save limit, so barriers around a slow save do not fail
    dist = init_distributed(cfg.trainer.device, cfg.checkpoint.save_timeout_s)
    watch = observe.Watch(cfg, dist)  # profiler, stragglers; CUDA memory history starts here
    clean = False
    try:
        result = _train(cfg, dist, guard, watch)
        clean = True
        return result
    except torch.OutOfMemoryError as e:
        watch.out_of_memory(e)  # trainer.memory_snapshot: dumped first, the file named in e
        raise
    finally:
        watch.close()
        guard.close()
        teardown(clean)


def _train(cfg: C.Config, dist: Dist, guard: faults.Guard, watch: observe.Watch) -> dict:
    t, seed = cfg.trainer, cfg.trainer.seed
    run_dir = prepare_run_dir(cfg.run.dir, dist)
    setup_logging(dist.rank, run_dir / "train.log" if dist.is_main else None)
    if t.deterministic:
        torch.use_deterministic_algorithms(True)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    make_sample_sources(cfg.data, dist)

    # built on meta, each rank allocating only its part; initial weights from trainer.seed (or
    # model.init_from), the same for every strategy and world size
    engine = build_engine(None, cfg, dist)
    data_rank = DataRank(engine.dp_rank, engine.dp_size)  # TP peers share a dp rank (same data)
    accum = C.grad_accum_steps(cfg, data_rank.size)
    loader = MixtureLoader(cfg.data, t, tokenizer, cfg.model.vocab_size, data_rank)
    loader.check_plan(t.max_steps)  # refuses a plan past a source's max_epochs now, not mid-run
    check_sources(cfg.task, loader.kinds)  # the task trains on its kind of source only
    log.info("data mixture:\n%s", loader.mixture_table(t.max_steps))
    val = val_batches(cfg.data, t, data_rank)
    weights = {s.name: s.weight for s in cfg.data.sources}

    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint, dist, cfg.faults)
    torch.manual_seed(seed + 1 + engine.rng_rank)  # dropout stream (Engine.rng_rank says who shares it)
    guard.start(run_dir, dist, engine)
    resume_from = ckpt.find_resume(cfg.checkpoint.resume, cfg.checkpoint.path)
    start = restore(ckpt, resume_from, cfg, engine, loader, guard, tokenizer)
    if start >= t.max_steps:  # a finished run launched again: leave metrics.jsonl and checkpoints be
        log.info("already at max_steps=%d (checkpoint step %d), nothing to do", t.max_steps, start)
        loader.close()
        return {}
    if dist.is_main:
        (run_dir / "config.yaml").write_text(C.to_yaml(cfg))
    metrics = Metrics(cfg, run_dir, dist.rank, start)
    watch.start(run_dir, start)
    tokens_per_step = t.global_batch_size * t.seq_len
    fpt = flops_per_token(cfg.model, t.seq_len)
    peak = t.peak_flops or (
        peak_flops(torch.cuda.get_device_name()) if dist.device.type == "cuda" else None
    )
    log.info(
        "model %s: %.2fM parameters, %.2fM active per token; %d ranks (dp %d), %d micro-batches "
        "of %d per step, %d tokens/step",
        cfg.model.name,
        num_params(cfg.model) / 1e6,  # the whole model's (a pipeline rank holds its stages)
        num_params(cfg.model, active=True) / 1e6,  # MFU counts these (framework.perf)
        dist.world_size,
        data_rank.size,
        accum,
        t.micro_batch_size,
        tokens_per_step,
    )

    engine.train(True)
    if val and t.eval_every and start == 0:  # the untrained baseline: the curve starts at ~log(vocab)
        metrics.log_eval(*evaluate(engine, val, weights, 0, tokenizer, cfg, dist))
    record: dict = {}
    # time/* phases: device-synchronised on the steps that log them only (perf.StepTimer)
    timer = StepTimer(t.log_every, t.stop_at_step or t.max_steps, device_sync(dist.device))
    step, save_s = start, None
    while step < t.max_steps:
        step += 1
        watch.begin_step(step)  # the profiler's step marker, the straggler clock
        clock = time.perf_counter()  # step time: data + forward/backward + update, not eval/save
        timer.begin(step)
        lr = lr_at(step, cfg.optim, t.max_steps)
        guard.begin_step(step, loader, accum)  # watchdog, rolled-back data windows, fault injection
        loss = torch.zeros((), device=dist.device)
        for _ in range(accum):
            with timer("data"):
                batch = next(loader)
            with timer("forward_backward"):
                loss += engine.forward_backward(batch, accum)
        with timer("optimizer"):
            # One all-reduce, before the update, gives every rank the mean loss, any rank's stop
            # signal and non-finite flags (loss, grad norm): all ranks take the same decision
            # here, before any engine (DeepSpeed's included) applies the step. on_nan=abort raises.
            verdict = guard.decide(step, loss / accum, engine, loader)
            res = engine.apply(lr) if verdict.action == "apply" else engine.skip()
        if verdict.action == "rollback":  # the bad window is recorded: redo from the last checkpoint
            step = restore(ckpt, ckpt.latest(), cfg, engine, loader, guard, tokenizer, rollback=True)
            continue
        loss = verdict.loss
        tps = tokens_per_step / (time.perf_counter() - clock)
        record = {
            "step": step,
            "loss": loss,
            "lr": lr,
            "grad_norm": res.grad_norm,
            "tokens": step * tokens_per_step,
            "trained_tokens": loader.trained_tokens(),  # targets with loss (sft: assistant tokens)
            "tokens_per_s": tps,
            "mfu": mfu(tps, fpt, peak, dist.world_size),
        }
        if (scale := engine.loss_scale()) is not None:
            record["loss_scale"] = scale
        if res.skipped:
            record["skipped"] = True
        if res.skipped and verdict.action == "apply":  # an fp16 overflow (guard logs its own skips)
            log.warning(
                "step %d: fp16 gradient overflow: update skipped, loss scale now %g", step, scale
            )
        record.update(guard.counters() | watch.end_step(step, timer))  # stragglers every N steps
        record.update(moe_metrics(engine.plain_model()))  # routing statistics; none when dense
        record.update(timer.record() | host_memory() | engine.device_memory())
        if save_s is not None:  # the save after the previous step, between the two
            record["time/checkpoint_s"], save_s = save_s, None
        last = step == t.max_steps or step == t.stop_at_step or verdict.stop
        if step % t.log_every == 0 or last:
            record.update({f"data/tokens/{k}": v for k, v in loader.tokens_per_source().items()})
        metrics.log_train(record)

        evaluate_now = t.eval_every and (step % t.eval_every == 0 or step == t.max_steps)
        if val and evaluate_now and not verdict.stop:  # a stop saves first: the grace period is short
            metrics.log_eval(*evaluate(engine, val, weights, step, tokenizer, cfg, dist))
        if last or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
            with guard.saving():
                state = trainer_state(cfg, step, loader, engine, tokenizer, dist)
                ckpt.save(step, engine, {**state, "faults": guard.state_dict()})
            save_s = ckpt.last_save_s
        if verdict.stop or step == t.stop_at_step:
            why = (
                f"stop signal: {guard.stop.received or 'on another rank'}"
                if verdict.stop
                else "stop_at_step"
            )
            # a stop signal is logged on every rank (WARNING): all name the same step
            (log.warning if verdict.stop else log.info)(
                "stopping after step %d (%s); resume continues from here", step, why
            )
            break
    with guard.saving():  # checkpoint.async_save: the last save commits before the run ends
        ckpt.finish()
    loader.close()
    metrics.close()
    metrics.print_summary()
    return record


def restore(ckpt, path, cfg: C.Config, engine, loader, guard, tok: Tokenizer, rollback=False) -> int:
    """Load a checkpoint (None: fresh start) into engine, loader and guard; returns its step."""
    if path is None:
        if rollback:
            raise faults.NonFiniteError("trainer.on_nan=rollback: no checkpoint to roll back to")
        return 0
    state = ckpt.load(path, engine, model_shape(cfg.model), tok.fingerprint)
    identity = data_identity(loader, tok.fingerprint)
    saved = with_legacy_attention(state.get("data"), state.get("config"))
    check_data_resume(saved, identity, cfg.data.allow_change_on_resume, path)
    loader.load_state_dict(state["loader"])
    engine.load_extra_state(state["engine"])
    guard.load_state_dict(state.get("faults"))
    if not rollback and ckpt.dist.is_main:
        if changed := schedule_change_warning(state.get("config"), cfg, state["step"]):
            log.warning(changed)
        if changed := C.resume_changes(state.get("config"), cfg):
            log.warning("resuming %s with a changed config: %s", path, "; ".join(changed))
    return state["step"]


def evaluate(engine, val: dict, weights: dict, step: int, tok: Tokenizer, cfg: C.Config, dist: Dist):
    """Per-source validation loss (mean over this source's fixed val batches and all ranks) and
    the mixture-weighted mean, plus a short text sample from a private generator."""
    engine.train(False)
    record: dict = {"step": step}
    for name, batches in val.items():
        total = torch.zeros((), device=dist.device)
        for b in batches:
            total += engine.eval_loss(b)
        record[f"val_loss/{name}"] = dist.all_reduce_mean(total / max(len(batches), 1)).item()
    w = {n: weights.get(n, 0.0) for n in val}
    if not sum(w.values()):  # only disabled (scheduled-later) sources have a val split
        w = dict.fromkeys(val, 1.0)
    record["val_loss"] = sum(w[n] * record[f"val_loss/{n}"] for n in val) / sum(w.values())
    record["val_ppl"] = perplexity(record["val_loss"])
    record.update(eval_metrics(cfg.task, engine, val, dist))  # classify: accuracy, per-class counts
    text = None
    if cfg.trainer.sample_tokens:
        g = torch.Generator().manual_seed(cfg.trainer.seed + step)
        ids = sample(
            engine.logits,
            [tok.eot_id],
            cfg.trainer.sample_tokens,
            cfg.model.block_size,
            top_k=50,
            generator=g,
            device=dist.device,
        )
        text = tok.decode(ids[1:])
    engine.train(True)
    return record, text


def trainer_state(cfg: C.Config, step: int, loader, engine, tok: Tokenizer, dist: Dist) -> dict:
    return {
        "step": step,
        "seed": cfg.trainer.seed,
        "world_size": dist.world_size,
        "loader": loader.state_dict(),
        "engine": engine.extra_state(),
        "model": model_shape(cfg.model),
        "tokenizer": tok.fingerprint,
        "data": data_identity(loader, tok.fingerprint),
        "config": C.to_dict(cfg),
    }


def prepare_run_dir(path: str, dist: Dist) -> Path:
    """Create run.dir on rank 0 and prove it writable; every rank fails alike if it is not."""
    run_dir = Path(path)
    error = None
    if dist.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / ".write-probe"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            error = f"run.dir={path} is not writable: {e}"
    error = dist.broadcast_object(error)
    if error:
        raise C.ConfigError(error)
    return run_dir


def make_sample_sources(data: C.DataConfig, dist: Dist) -> None:
    """Generate the embedded sample sources that are not there yet (one process per node)."""
    missing = [s for s in data.sources if s.generator and not (Path(s.path) / MANIFEST).is_file()]
    if missing and dist.local_rank == 0:
        for s in missing:
            log.info("generating sample source %s into %s", s.name, s.path)
            generate_sample_source(s.generator, s.path)
    dist.barrier()


@entry("config", C.Config)
def main(dcfg: DictConfig) -> None:
    """Console script `fw-train`."""
    cfg = C.load(dcfg)
    cfg.run.dir = C.job_run_dir(cfg.run.dir)  # -m: each sweep point in its own run directory
    train(cfg)


if __name__ == "__main__":
    main()

"""The training loop: :func:`train` runs one configured run, single-process or one rank of many.

Started by ``fastnet-train`` (:mod:`fastnet.cli`, also ``python -m fastnet.train``); this module
imports nothing from the command line.

One optimizer step (the data flow of docs/ARCHITECTURE.md):
  1. each rank runs ``accumulation_steps`` micro-batches of ``micro_batch_size`` forward/backward
     (loss divided by the accumulation steps), so the global batch is
     ``world_size × micro_batch_size × accumulation_steps``;
  2. gradients are averaged over ranks by :class:`fastnet.comm.GradientSynchronizer`: buckets are
     launched from backward hooks on the last micro-batch (the others run under ``no_sync()``) and
     overlap the rest of backward; ``synchronize()`` waits for them before the step;
  3. the mean loss over ranks is checked: a non-finite loss in fp32 stops the run, naming the step;
  4. the precision policy steps the optimizer (skipping on overflow with loss scaling), then the
     per-iteration LR schedule advances.
Evaluation shards the test set over ranks without padding and all-reduces the counts, so every
test image counts once. Rank 0 writes ``config.yaml``, ``metrics.jsonl`` and checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import yaml
from tqdm import tqdm

from fastnet import checkpoint as ckpt
from fastnet import faults
from fastnet.comm import CostModel, GradientSynchronizer, trace
from fastnet.comm.communicators.factory import build_communicator
from fastnet.config import REPLANNED, TrainConfig, accumulation_steps, check_world, config_changes, epoch_plan
from fastnet.data import (EpochSeeded, ResumableDistributedSampler, build_datasets, eval_loader, hold_out,
                          train_loader)
from fastnet.distributed import (World, all_reduce_sum, broadcast_from_rank0, gather_objects, load_buffers,
                                 sync_buffers, synced_buffers)
from fastnet.metrics import MetricsWriter
from fastnet.models import build_model
from fastnet.noise_scale import GradientNoiseScale, MicroBatchGradNorms
from fastnet.optim import build_optimizer, build_schedule
from fastnet.optim.schedules import position_schedule
from fastnet.optim.update_ratio import UpdateRatio
from fastnet.precision import Precision


class NonFiniteLossError(FloatingPointError):
    """The loss became inf/NaN in a run without loss scaling."""


class NonFiniteParametersError(FloatingPointError):
    """A parameter became inf/NaN: the run stops before writing a checkpoint (the last good one stays)."""


@dataclasses.dataclass
class Progress:
    """Where the run is; saved in checkpoints."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    samples_seen: int = 0
    best_top1: float = 0.0
    final_top1: float | None = None
    time_to_target_s: float | None = None
    steps_to_target: int | None = None  # optimizer steps at the first evaluation at or above the target
    samples_to_target: int | None = None  # training images seen by then (epochs to target = this / train set)
    elapsed_s: float = 0.0  # wall seconds of earlier sessions of this run
    train_s: float = 0.0  # wall seconds spent in training steps (not evaluation)
    overflow_skips: int = 0  # steps skipped by loss scaling (inf/NaN gradients)
    epoch_loss_sum: float = 0.0  # this epoch's training losses so far (its mean is the epoch record's)
    epoch_loss_steps: int = 0


def param_checksum(model: nn.Module, buffers: bool = False) -> str:
    """SHA-256 of all parameters' bytes in registration order (and then the buffers', with ``buffers``)."""
    h = hashlib.sha256()
    for p in list(model.parameters()) + (list(model.buffers()) if buffers else []):
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def evaluate(model: nn.Module, loader, world: World, precision: Precision, channels_last: bool) -> dict[str, float]:
    """Top-1/top-5 (percent), mean loss and the number of images, summed over all ranks."""
    model.eval()
    correct1 = correct5 = loss_sum = count = 0.0
    for x, y in loader:
        x, y = x.to(world.device, non_blocking=True), y.to(world.device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with precision.autocast():
            logits = model(precision.cast_input(x))
        loss_sum += nn.functional.cross_entropy(logits.float(), y, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top.eq(y[:, None])
        correct1 += hit[:, 0].sum().item()
        correct5 += hit.any(dim=1).sum().item()
        count += y.numel()
    correct1, correct5, loss_sum, count = all_reduce_sum([correct1, correct5, loss_sum, count], world)
    model.train()
    n = max(count, 1.0)
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "eval_loss": loss_sum / n,
            "eval_samples": int(count)}


def _checkpoint_state(cfg: TrainConfig, model, optimizer, scheduler, precision, progress: Progress,
                      rng: list[Any], noise: GradientNoiseScale | None = None,
                      buffers: list[Any] | None = None, bucket_plan: dict | None = None) -> dict[str, Any]:
    """The checkpoint: ``model`` holds the buffers agreed over the ranks (an evaluation model);
    ``buffers`` each rank's live ones (a list by rank, or None with one rank), restored on an exact
    resume so that the running statistics continue as in the uninterrupted run; ``bucket_plan`` the
    synchronizer's re-cut buckets (restored so that the resumed run reduces in the same buckets)."""
    return {
        "version": ckpt.VERSION, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "precision": precision.state_dict(),
        "progress": dataclasses.asdict(progress), "rng": rng, "config": cfg.to_dict(),
        "noise_scale": noise.state_dict() if noise is not None else None,
        "buffers": buffers, "bucket_plan": bucket_plan,
    }


def parameters_finite(model: nn.Module, world: World) -> bool:
    """Collective: True when every parameter on every rank is finite (one all-reduce)."""
    bad = sum(int(not torch.isfinite(p.detach()).all()) for p in model.parameters())
    return all_reduce_sum([float(bad)], world)[0] == 0


def _load_checkpoint(state: dict[str, Any], model, optimizer, scheduler, precision, step: int) -> None:
    """Restore a checkpoint into freshly built objects, re-planning the LR schedule: the optimizer's
    hyperparameters (momentum, weight decay, peak LR, ...) are this run's, its state (momentum
    buffers) the checkpoint's, and the schedule continues at ``step`` under this run's plan."""
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        precision.load_state_dict(state["precision"])
    except (RuntimeError, ValueError, KeyError) as exc:
        first = " ".join(str(exc).split())[:300]
        raise ValueError(f"checkpoint {state.get('path')} ({ckpt.describe(state)}) does not fit this run's model or "
                         f"optimizer: {first}") from None
    for group, new in zip(optimizer.param_groups, fresh):
        group.update(new)
    position_schedule(scheduler, step)


def train(cfg: TrainConfig, world: World, state: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Run the training job described by ``cfg`` on this rank. Returns the summary record, or None
    when ``state`` (a checkpoint to resume, see :func:`fastnet.cli.prepare`) is of a run that has
    already reached its last step.

    Resuming re-plans the run from the checkpoint's step (README, "Resuming a run"): the epoch plan
    and the LR schedule are those of ``cfg``; on another world size or micro-batch the accumulation
    steps are re-derived and the sampler continues at the same image of the epoch.

    Raises:
        ValueError: bad configuration (a global batch that does not divide, missing data, a
            checkpoint of another model).
        NonFiniteLossError: the loss became inf/NaN in fp32 (the message names the step).
        NonFiniteParametersError: a parameter became inf/NaN; no checkpoint is written.
        RuntimeError / DistBackendError: a peer rank died (raised within ``timeout_s``).
    """
    t_start = time.perf_counter()
    check_world(cfg, world.size)
    accum = accumulation_steps(cfg.global_batch_size, world.size, cfg.micro_batch_size)
    precision = Precision(cfg.precision, world.device, loss_scaling=cfg.loss_scaling,  # validates the name early
                          init_scale=cfg.init_loss_scale, growth_interval=cfg.loss_scale_growth_interval,
                          min_scale=cfg.min_loss_scale, hysteresis=cfg.loss_scale_hysteresis)
    if cfg.communicator == "nccl" and world.distributed and world.device.type != "cuda":
        raise ValueError("communicator 'nccl' (CuPy NCCL) needs CUDA tensors; on CPU use --communicator torch or mpi")
    if cfg.sync_batchnorm and world.distributed and world.device.type != "cuda":
        raise ValueError("sync_batchnorm needs CUDA (torch.nn.SyncBatchNorm runs on GPU inputs only); on CPU keep "
                         "per-rank batch statistics and --buffer-sync average")
    splits = build_datasets(cfg.dataset, cfg.data_dir, cfg.image_size, cfg.synthetic_samples, cfg.num_classes)
    val_set = None
    if cfg.val_samples:  # choices are made on held-out training images; the test set is read once, at the end
        splits.train, val_set = hold_out(splits, cfg.val_samples)
    train_images = len(splits.train)
    torch.manual_seed(cfg.seed)  # identical initial weights; rank 0's are broadcast anyway
    model = build_model(cfg.model, splits.num_classes, splits.image_size).to(world.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.sync_batchnorm and world.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    broadcast_from_rank0(model, world)
    model = precision.prepare(model)  # fp16/bf16: cast (norms stay FP32), FP32 masters, flat buffers
    torch.manual_seed(cfg.seed + world.rank)  # per-rank stream for dropout and the like

    train_set = EpochSeeded(splits.train, cfg.seed)
    sampler = ResumableDistributedSampler(train_set, world.size, world.rank, cfg.seed, block_size=cfg.micro_batch_size)
    pin = world.device.type == "cuda"
    loader = train_loader(train_set, sampler, cfg.micro_batch_size, cfg.workers, cfg.seed, pin)
    test_loader = eval_loader(splits.test, world.size, world.rank, cfg.eval_batch_size, cfg.workers, pin)
    eval_set_loader = eval_loader(val_set, world.size, world.rank, cfg.eval_batch_size, cfg.workers, pin) \
        if val_set is not None else test_loader
    plan = epoch_plan(cfg, world.size, sampler.num_samples)
    steps_per_epoch = plan[0].steps  # of the first epoch: converts warm-up and milestone epochs to steps
    total_steps = sum(e.steps for e in plan)
    stop_step = min(total_steps, cfg.max_steps or total_steps)
    progress = Progress(**state["progress"]) if state is not None else Progress()
    if progress.global_step >= stop_step or (cfg.stop_at_target and progress.steps_to_target is not None):
        return None  # every rank holds the same checkpoint: all return here

    peak_lr = cfg.scaled_lr
    optimizer = build_optimizer(cfg.optimizer, model, lr=peak_lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, nesterov=cfg.nesterov,
                                trust_coefficient=cfg.trust_coefficient, trust_clip=cfg.trust_clip,
                                lars_exclude=cfg.lars_exclude, eps=cfg.lars_eps,
                                excluded_lr=cfg.lars_excluded_lr,
                                map_groups=precision.optimizer_params)
    scheduler = build_schedule(cfg.lr_schedule, optimizer, total_steps=total_steps,
                               warmup_steps=min(total_steps, round(cfg.warmup_epochs * steps_per_epoch)),
                               warmup_start_lr=min(cfg.base_lr, peak_lr), steps_per_epoch=steps_per_epoch,
                               milestones_epochs=cfg.lr_milestones, gamma=cfg.lr_gamma, power=cfg.poly_power)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    # The gradient noise scale needs two batch sizes: the local and the global batch (world size >= 2), or
    # the micro-batches and their accumulation (one process).
    two_batch_sizes = world.distributed or max(e.accumulation_steps for e in plan) >= 2
    if cfg.grad_noise_scale == "on" and not two_batch_sizes:
        raise ValueError(f"grad_noise_scale needs two batch sizes: world size >= 2, or micro_batch_size "
                         f"({cfg.micro_batch_size}) below global_batch_size ({cfg.global_batch_size}) so that "
                         f"micro-batches accumulate; or --grad-noise-scale auto/off")
    noise = GradientNoiseScale(cfg.noise_scale_ema) if cfg.grad_noise_scale != "off" and two_batch_sizes else None
    micro_norms = MicroBatchGradNorms() if noise is not None and not world.distributed else None
    update_ratio = UpdateRatio(optimizer) if cfg.log_update_ratio else None
    grad_sync = None
    if world.distributed:  # gradients become views into its buckets (or its buckets slice the FP16 buffers)
        bucket_comm = build_communicator(cfg.communicator, timeout_s=cfg.timeout_s)
        grad_sync = GradientSynchronizer(
            bucket_comm, model.parameters(), algorithm=cfg.allreduce,
            fusion_threshold_bytes=int(cfg.fusion_mb * (1 << 20)), wire_dtype=cfg.wire_dtype,
            ranks_per_node=cfg.ranks_per_node,  # None: nodes from the hosts
            cost_model=CostModel.load(cfg.cost_model) if cfg.cost_model else None, overlap=cfg.overlap,
            rebuild_buckets=cfg.rebuild_buckets,
            storage=precision.masters.grad_location if precision.masters is not None else None,
            timeout_s=cfg.timeout_s, find_unused_parameters=cfg.find_unused_parameters,
            predivide_factor=cfg.grad_predivide_factor, debug=cfg.distributed_debug,
            measure_grad_norms=noise is not None)

    if state is not None:
        _load_checkpoint(state, model, optimizer, scheduler, precision, progress.global_step)
        ckpt.restore_rng(state["rng"], world.rank, world.size, cfg.seed, progress.global_step)
        if noise is not None and state.get("noise_scale"):
            noise.load_state_dict(state["noise_scale"])
        saved_plan, saved_cfg = state.get("bucket_plan"), state.get("config", {})
        if grad_sync is not None and saved_plan and all(
                saved_cfg.get(k) == getattr(cfg, k) for k in ("fusion_mb", "wire_dtype", "allreduce")):
            grad_sync.load_plan_state(saved_plan)  # the uninterrupted run's buckets, not a new timing-dependent cut
        per_rank = state.get("buffers")
        if per_rank is not None and len(per_rank) == world.size:  # this rank's live statistics (an exact resume)
            load_buffers(model, per_rank[world.rank])

    out_dir = Path(cfg.out_dir)
    metrics = MetricsWriter(out_dir, world.is_main, tensorboard=cfg.tensorboard)
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        resolved = {**cfg.to_dict(), "world_size": world.size, "accumulation_steps": accum,
                    "epoch_plan": [dataclasses.asdict(e) for e in plan], "total_steps": total_steps,
                    "peak_lr": peak_lr, "buckets": grad_sync.describe() if grad_sync else []}
        (out_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))

    def wall() -> float:
        return progress.elapsed_s + time.perf_counter() - session_start

    if state is None and world.is_main and metrics.path.is_file() and metrics.path.stat().st_size:
        # --resume auto in the out_dir of this run, stopped before its first checkpoint: it starts over
        metrics.write("resume", step=0, epoch=0, world_size=world.size, accumulation_steps=accum, checkpoint=None,
                      changed={}, replanned=[], lr=optimizer.param_groups[0]["lr"])
    if state is not None:
        changed = config_changes(state.get("config") or {}, cfg)
        metrics.write("resume", step=progress.global_step, epoch=progress.epoch, world_size=world.size,
                      accumulation_steps=accum, checkpoint=state.get("path"), changed=changed,
                      replanned=sorted(k for k in changed if k in REPLANNED),
                      lr=optimizer.param_groups[0]["lr"])
    show = cfg.progress if cfg.progress != "auto" else ("bar" if sys.stderr.isatty() else "log")
    show = show if world.is_main else "none"

    kill_at = faults.kill_step(world.rank)  # FASTNET_KILL_AT: the restart tests' injected crash
    trace_until = progress.global_step + cfg.trace_steps
    if cfg.trace:
        trace.start(world.rank)
    last_saved = [progress.global_step if state is not None else -1]  # the step of the newest checkpoint

    def save() -> None:  # collective: buffers agreed, every rank's RNG gathered to rank 0
        if not parameters_finite(model, world):  # never replace a good checkpoint with a broken one
            where = cfg.checkpoint_path
            raise NonFiniteParametersError(
                f"parameters became inf/NaN by step {progress.global_step} (epoch {progress.epoch}); no checkpoint "
                f"written" + (f", the last good one stays at {where}" if where.exists() else "") +
                f". Lower base_lr ({cfg.base_lr}) or weight_decay, add warm-up, or use loss scaling")
        rng = gather_objects(ckpt.rng_state(), world)
        live = gather_objects([b.detach().cpu().clone() for b in model.buffers()], world) if world.distributed \
            else None  # each rank's running statistics, as they go on
        with synced_buffers(model, world, cfg.buffer_sync):  # the checkpoint's model: the agreed ones
            if world.is_main:
                saved = dataclasses.replace(progress, elapsed_s=wall())
                try:
                    ckpt.save_atomic(_checkpoint_state(cfg, model, optimizer, scheduler, precision, saved, rng, noise,
                                                       live, grad_sync.plan_state() if grad_sync else None),
                                     cfg.checkpoint_path, keep=cfg.keep_checkpoints,
                                     rotate=progress.global_step != last_saved[0])
                    last_saved[0] = progress.global_step
                except OSError as exc:
                    kept = ", ".join(str(p) for p in ckpt.candidates(cfg.checkpoint_path.parent)) or "none yet"
                    raise OSError(exc.errno, f"writing the checkpoint of step {progress.global_step} to "
                                  f"{cfg.checkpoint_path} failed ({exc.strerror or exc}); the earlier checkpoints "
                                  f"are untouched: {kept}") from None

    def evaluate_and_track() -> dict[str, float]:
        """Evaluate on the eval set (collective) and record best top-1 and the first step at the target."""
        with synced_buffers(model, world, cfg.buffer_sync):  # every rank evaluates the same model
            ev = evaluate(model, eval_set_loader, world, precision, cfg.channels_last)
        progress.final_top1 = ev["top1"]
        progress.best_top1 = max(progress.best_top1, ev["top1"])
        if cfg.target_accuracy is not None and progress.steps_to_target is None and \
                ev["top1"] >= cfg.target_accuracy:
            progress.time_to_target_s = wall()
            progress.steps_to_target = progress.global_step
            progress.samples_to_target = progress.samples_seen
        return ev

    session_start = time.perf_counter()
    evaluated_at_stop = False  # the stop came from an evaluation at this step (stop_at_target)
    model.train()
    window = {"t": time.perf_counter(), "samples": 0, "comm": 0.0, "busy": 0.0, "hidden": 0.0}
    epoch_comm = 0.0
    stopped = progress.global_step >= stop_step
    for epoch in range(progress.epoch, len(plan)):
        if stopped:
            break
        batch, accum, steps_per_epoch = plan[epoch].global_batch_size, plan[epoch].accumulation_steps, plan[epoch].steps
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        sampler.set_start_index(progress.step_in_epoch * accum * cfg.micro_batch_size)
        if progress.step_in_epoch == 0:
            progress.epoch_loss_sum, progress.epoch_loss_steps = 0.0, 0
        epoch_comm = 0.0
        bar = tqdm(total=steps_per_epoch, initial=progress.step_in_epoch, desc=f"epoch {epoch}", unit="step",
                   disable=show != "bar", dynamic_ncols=True, leave=False)
        it = iter(loader)
        step_t0 = time.perf_counter()
        while progress.step_in_epoch < steps_per_epoch and progress.global_step < stop_step:
            tracer = trace.current()
            t_step = tracer.now_us() if tracer is not None else 0.0
            loss_sum = torch.zeros((), device=world.device)
            if micro_norms is not None:
                micro_norms.reset()
            for micro in range(accum):
                x, y = next(it)
                x, y = x.to(world.device, non_blocking=True), y.to(world.device, non_blocking=True)
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                accumulate_only = grad_sync.no_sync() if grad_sync and micro < accum - 1 else contextlib.nullcontext()
                with precision.autocast():
                    loss = criterion(model(precision.cast_input(x)).float(), y) / accum
                if grad_sync is not None and micro == accum - 1:
                    grad_sync.prepare_for_backward(loss)  # find_unused_parameters: mark unused ones ready now
                with accumulate_only:
                    precision.backward(loss)
                if micro_norms is not None and accum >= 2:
                    micro_norms.after_backward(precision.grad_buffers(model.parameters()))
                loss_sum += loss.detach().float()
            t_sync = tracer.now_us() if tracer is not None else 0.0
            if grad_sync:
                grad_sync.synchronize()
            if tracer is not None:
                tracer.complete("forward+backward", "train", t_step, t_sync, micro_batches=accum)
                tracer.complete("synchronize", "train", t_sync, tracer.now_us())
            noise_pair = None  # (|g_small|², |g_big|²) in the gradients' (loss-scaled) units
            if grad_sync is not None and noise is not None:
                noise_pair, b_small = grad_sync.grad_sq_norms(), cfg.micro_batch_size * accum
            elif micro_norms is not None and accum >= 2:
                noise_pair, b_small = micro_norms.result(), cfg.micro_batch_size
            if noise_pair is None:
                global_loss = all_reduce_sum([loss_sum.item()], world)[0] / world.size  # the step's one host sync
            else:  # still one host sync: the loss and both norms together
                host = torch.stack([loss_sum.double(), *noise_pair]).tolist()
                summed = all_reduce_sum(host[:2], world)  # |g_small|² averaged over the ranks
                global_loss = summed[0] / world.size
                unscale = precision.loss_scale ** 2  # this step's scale (the step below may change it)
                noise.update(summed[1] / world.size / unscale, host[2] / unscale, b_small, batch)
            comm_s = grad_sync.exposed_seconds() if grad_sync else 0.0  # not hidden behind backward
            busy_s = grad_sync.busy_seconds() if grad_sync else 0.0
            window["busy"] += busy_s
            window["hidden"] += max(0.0, busy_s - comm_s)  # communication that ran behind backward
            if grad_sync is not None and "rebuilt_buckets" in grad_sync.last_step:  # once, after step 2
                metrics.write("buckets", step=progress.global_step + 1, buckets=grad_sync.describe(),
                              launch_order=list(grad_sync.launch_order))
            if not math.isfinite(global_loss) and not precision.loss_scaling:
                raise NonFiniteLossError(
                    f"non-finite loss {global_loss} at step {progress.global_step + 1} (epoch {epoch}); "
                    f"lower base_lr ({cfg.base_lr}), add warm-up, or check the data")
            logged = (progress.global_step + 1) % cfg.log_interval == 0
            if update_ratio is not None and logged:
                update_ratio.before()
            t_opt = tracer.now_us() if tracer is not None else 0.0
            if not precision.step(optimizer, skip=grad_sync.unused_parameters if grad_sync else None):
                progress.overflow_skips += 1
            if tracer is not None:
                tracer.complete("optimizer", "train", t_opt, tracer.now_us())
                tracer.complete(f"step {progress.global_step + 1}", "train", t_step, tracer.now_us())
                if progress.global_step + 1 >= trace_until:
                    trace.stop(out_dir / "trace" / f"rank{world.rank}.json")
            ratios = update_ratio.after() if update_ratio is not None and logged else {}
            if grad_sync is not None and precision.masters is None:
                grad_sync.zero_grad()  # keeps p.grad as views into the buckets
            else:
                precision.zero_grad(optimizer)
            scheduler.step()
            progress.global_step += 1
            progress.step_in_epoch += 1
            progress.samples_seen += batch
            now = time.perf_counter()
            progress.train_s += now - step_t0
            step_t0 = now
            progress.epoch_loss_sum += global_loss
            progress.epoch_loss_steps += 1
            epoch_comm += comm_s
            window["samples"] += batch
            window["comm"] += comm_s
            lr = optimizer.param_groups[0]["lr"]
            if logged:
                ips = window["samples"] / max(now - window["t"], 1e-9)
                metrics.write("step", epoch=epoch, step=progress.global_step, samples_seen=progress.samples_seen,
                              global_batch_size=batch, train_loss=global_loss, lr=lr, loss_scale=precision.loss_scale,
                              images_per_s=ips, wall_s=wall(), comm_s=window["comm"], comm_busy_s=window["busy"],
                              comm_hidden_s=window["hidden"],
                              **{f"update_ratio_{name}": r for name, r in ratios.items()},
                              **({"grad_noise_scale": noise.b_simple, "grad_sq_norm": noise.grad_sq_norm,
                                  "grad_trace": noise.trace} if noise is not None else {}))
                bar.set_postfix(loss=f"{global_loss:.3f}", lr=f"{lr:.3g}", img_s=f"{ips:.0f}")
                if show == "log":
                    print(f"epoch {epoch} step {progress.step_in_epoch}/{steps_per_epoch} ({progress.global_step}/"
                          f"{stop_step}) loss {global_loss:.4f} lr {lr:.4g} {ips:.0f} img/s", file=sys.stderr,
                          flush=True)
                window = {"t": now, "samples": 0, "comm": 0.0, "busy": 0.0, "hidden": 0.0}
            bar.update(1)
            if cfg.eval_every_steps and progress.global_step % cfg.eval_every_steps == 0 and \
                    progress.step_in_epoch < steps_per_epoch and progress.global_step < stop_step:
                ev = evaluate_and_track()  # mid-epoch; the epoch's last step is evaluated below
                metrics.write("eval", epoch=epoch, step=progress.global_step, samples_seen=progress.samples_seen,
                              eval_set="val" if val_set is not None else "test", **ev, wall_s=wall())
                if show == "log":
                    print(f"step {progress.global_step}: top1 {ev['top1']:.2f}%", file=sys.stderr, flush=True)
                if cfg.stop_at_target and progress.steps_to_target is not None:
                    stop_step, evaluated_at_stop = progress.global_step, True
                step_t0 = time.perf_counter()
            if progress.global_step == kill_at:
                faults.kill_self()
            if cfg.checkpoint_interval and progress.global_step % cfg.checkpoint_interval == 0:
                save()
                step_t0 = time.perf_counter()
        bar.close()
        epoch_done = progress.step_in_epoch >= plan[epoch].full_steps  # a shortened last epoch is not done
        if epoch_done:
            progress.epoch, progress.step_in_epoch = epoch + 1, 0
        stopped = progress.global_step >= stop_step
        if (epoch_done and (epoch + 1) % cfg.eval_interval == 0) or (stopped and not evaluated_at_stop):
            epoch_loss = progress.epoch_loss_sum / max(progress.epoch_loss_steps, 1)
            ev = evaluate_and_track()
            metrics.write("epoch", epoch=epoch, step=progress.global_step, samples_seen=progress.samples_seen,
                          train_loss=epoch_loss, eval_set="val" if val_set is not None else "test",
                          **ev,
                          images_per_s=progress.samples_seen / max(progress.train_s, 1e-9), wall_s=wall(),
                          comm_s=epoch_comm)
            if show != "none":
                tqdm.write(f"epoch {epoch} step {progress.global_step}: loss {epoch_loss:.4f} "
                           f"top1 {ev['top1']:.2f}% top5 {ev['top5']:.2f}% ({ev['eval_samples']} images) "
                           f"{progress.samples_seen / max(progress.train_s, 1e-9):.0f} img/s", file=sys.stderr)
        if cfg.stop_at_target and progress.steps_to_target is not None:
            stopped = True
        save()

    test_top1 = progress.final_top1
    sync_buffers(model, world, cfg.buffer_sync)  # training is over: the agreed statistics, for good
    if val_set is not None and progress.global_step > 0:  # the test set, read once, with the final model
        test = evaluate(model, test_loader, world, precision, cfg.channels_last)
        test_top1 = test["top1"]
        metrics.write("test", step=progress.global_step, **test)
    checksums = [param_checksum(model), param_checksum(model, buffers=True)]
    if world.distributed:
        gathered: list[Any] = [None] * world.size
        dist.all_gather_object(gathered, checksums)
        checksums = gathered
    else:
        checksums = [checksums]
    if trace.current() is not None:  # the run ended before trace_steps steps
        trace.stop(out_dir / "trace" / f"rank{world.rank}.json")
    if grad_sync is not None:  # every rank closes the same communicators in the same order
        grad_sync.close()
        bucket_comm.close()
    summary = {
        "best_top1": progress.best_top1, "final_top1": progress.final_top1, "test_top1": test_top1,
        "eval_set": "val" if val_set is not None else "test",
        "time_to_target_s": progress.time_to_target_s, "target_accuracy": cfg.target_accuracy,
        "steps_to_target": progress.steps_to_target,
        "grad_noise_scale": noise.b_simple if noise is not None else None,
        "epochs_to_target": None if progress.samples_to_target is None else progress.samples_to_target / train_images,
        "mean_images_per_s": progress.samples_seen / max(progress.train_s, 1e-9), "wall_s": wall(),
        "steps": progress.global_step, "overflow_skips": progress.overflow_skips, "loss_scale": precision.loss_scale,
        "world_size": world.size, "accumulation_steps": accum,
        "param_checksums": [c[0] for c in checksums], "state_checksums": [c[1] for c in checksums],
        "session_s": time.perf_counter() - t_start,
    }
    metrics.write("summary", **summary)
    metrics.close()
    return summary

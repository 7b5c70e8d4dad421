"""``fastnet-train``'s entry point: parse, check the run directory and the checkpoint, then train.

Everything up to the start of training imports no torch, so ``--help`` and a bad option answer at
once (``--help`` ~0.4 s). Errors reach the user once, as one line ``fastnet-train: error: ...``:

* argument and configuration errors (exit code 2) are the same on every rank, so only rank 0 (or
  the single process) prints them;
* errors during the run (exit code 1) are printed by rank 0, and by another rank only when they
  are its own (not a failure every rank raises together, such as a non-finite loss, nor the
  collective error a rank sees when a peer died). Under ``torchrun`` every rank also records its
  error through ``torch.distributed.elastic``'s ``@record`` error file, so torchrun's summary names
  the root cause (the first failure) instead of "To enable traceback see ...".
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

from fastnet.config import TrainConfig, check_world, parse_cli

# Errors every rank raises together (configuration, data, a non-finite loss decided on all-reduced
# values): rank 0 speaks for all of them.
AGREED = (ValueError, FileNotFoundError, FloatingPointError)
RUN_FILES = ("metrics.jsonl", "config.yaml")


def launch_rank() -> int:
    """This process's rank from the launcher's environment (torchrun, MPICH, Open MPI, Slurm's srun),
    before any process group exists; 0 for a single process."""
    for name in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", *_SLURM_STEP("SLURM_PROCID")):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def _SLURM_STEP(name: str) -> tuple[str, ...]:  # noqa: N802
    """``(name,)`` inside a task of an ``srun`` step of several tasks (where ``SLURM_PROCID`` is the
    task's rank; a batch script's own ``SLURM_*`` describe the job, not a rank), else ``()``."""
    return (name,) if os.environ.get("SLURM_STEP_NUM_TASKS", "1").isdigit() and \
        int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1 else ()


def launch_world_size() -> int:
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", *_SLURM_STEP("SLURM_STEP_NUM_TASKS")):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def _say(message: str) -> None:
    print(f"fastnet-train: {message}", file=sys.stderr, flush=True)


def run_files(cfg: TrainConfig) -> list[Path]:
    """The files of an earlier run that a new run in ``cfg.out_dir`` would overwrite or append to."""
    from fastnet.checkpoint import candidates

    return [p for p in [*(Path(cfg.out_dir) / f for f in RUN_FILES), *candidates(cfg.checkpoint_path.parent)]
            if p.exists()]


def check_fresh_out_dir(cfg: TrainConfig) -> list[Path]:
    """A new run (no ``--resume``) refuses an out_dir that holds a run, unless ``--overwrite``.
    Returns the files ``--overwrite`` will remove (rank 0 removes them once training starts).

    Raises:
        ValueError: the out_dir holds another run's files and ``overwrite`` is off; the message
            names them and the three ways on (``--resume``, ``--overwrite``, another ``--out-dir``).
    """
    found = run_files(cfg)
    if found and not cfg.overwrite:
        names = ", ".join(str(p) for p in found)
        raise ValueError(f"out_dir {cfg.out_dir!r} already holds a run ({names}); continue it with --resume "
                         f"{cfg.out_dir}, replace it with --overwrite, or choose another --out-dir")
    return found


def prepare(cfg: TrainConfig) -> tuple[TrainConfig, dict | None, list[Path]]:
    """Resolve ``--resume`` (``auto``, a run directory, a checkpoints directory or a file) and merge
    the checkpoint's config under this invocation's options. Returns (config, checkpoint state or
    None, files to remove for ``--overwrite``).

    Raises:
        ValueError / FileNotFoundError: a missing or broken checkpoint, options that cannot change
            within a run (listed), or an out_dir that holds another run.
    """
    from fastnet import checkpoint as ckpt
    from fastnet.config import merge_resumed, resume_conflicts

    ckpt.check_writable(cfg.checkpoint_path.parent)  # at the start, not at the first checkpoint hours later
    resume = cfg.resume
    if resume == "auto":  # the run's checkpoints directory: the newest checkpoint there that loads
        resume = str(cfg.checkpoint_path.parent) if ckpt.candidates(cfg.checkpoint_path.parent) else None
    if resume is None:
        auto = cfg.resume == "auto"
        cfg = cfg.model_copy(update={"resume": None})
        if auto and _same_run_without_checkpoint(cfg):
            return cfg, None, []  # it crashed before its first checkpoint: start it over, in place
        return cfg, None, check_fresh_out_dir(cfg)
    state = ckpt.load(resume, map_location="cpu")
    saved = state.get("config") or {}
    merged = merge_resumed(saved, cfg.model_copy(update={"resume": resume}))
    conflicts = resume_conflicts(saved, merged)
    if conflicts:
        raise ValueError(f"cannot resume {state['path']} ({ckpt.describe(state)}): these options cannot change "
                         f"within a run: {'; '.join(conflicts)}. Drop them to continue the run, or start a new "
                         f"run with another --out-dir")
    return merged, state, []


def _same_run_without_checkpoint(cfg: TrainConfig) -> bool:
    """``--resume auto`` and no checkpoint: True when the out_dir holds this same run (its
    ``config.yaml`` differs from ``cfg`` in no option) that has not finished (no ``summary``
    record) and stopped before its first checkpoint (e.g. a crash that torchrun restarts): it starts over from
    step 0 in place, its metrics continued after a ``resume`` record at step 0. Any other run there
    is refused by :func:`check_fresh_out_dir`."""
    import yaml

    from fastnet.config import config_changes

    path, metrics = Path(cfg.out_dir) / "config.yaml", Path(cfg.out_dir) / "metrics.jsonl"
    if not run_files(cfg) or not path.is_file():
        return False
    if metrics.is_file() and '"kind": "summary"' in metrics.read_text():
        return False  # it finished (its checkpoints are gone or elsewhere): not a crash to restart
    try:
        saved = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return False
    return isinstance(saved, dict) and not config_changes(saved, cfg)


def print_config(cfg: TrainConfig) -> None:
    """``--print-config``: the resolved options, then the numbers derived from them for this
    launch's world size (``WORLD_SIZE``, 1 outside a launcher) and the dataset's size."""
    import yaml

    from fastnet.config import epoch_plan
    from fastnet.data import ResumableDistributedSampler, build_datasets, hold_out

    world_size = launch_world_size()
    splits = build_datasets(cfg.dataset, cfg.data_dir, cfg.image_size, cfg.synthetic_samples, cfg.num_classes)
    train = hold_out(splits, cfg.val_samples)[0] if cfg.val_samples else splits.train
    per_rank = ResumableDistributedSampler(train, world_size, 0, cfg.seed, cfg.micro_batch_size).num_samples
    plan = epoch_plan(cfg, world_size, per_rank)
    total = sum(e.steps for e in plan)
    derived = {"world_size": world_size, "train_samples": len(train), "accumulation_steps": plan[0].accumulation_steps,
               "steps_per_epoch": plan[0].full_steps, "total_steps": total, "stop_step": min(total, cfg.max_steps or total),
               "peak_lr": cfg.scaled_lr, "warmup_steps": round(cfg.warmup_epochs * plan[0].full_steps)}
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    print("# derived\n" + yaml.safe_dump({"derived": derived}, sort_keys=False), end="")


def main(argv: Sequence[str] | None = None) -> int:
    """``fastnet-train [--config YAML] [--print-config] [--OPTION VALUE ...]``. Returns the exit
    code: 0 done (or the run had already finished), 1 the run failed, 2 bad arguments or options."""
    rank = launch_rank()
    try:
        cfg, args = parse_cli(argv)
        if args.print_config:
            check_world(cfg, launch_world_size())
            print_config(cfg)
            return 0
        cfg, state, stale = prepare(cfg)
        notes = check_world(cfg, launch_world_size())
    except (ValueError, FileNotFoundError) as exc:
        if rank == 0:
            _say(f"error: {exc}")
        return 2
    if rank == 0:
        for path, why in (state or {}).get("skipped", []):
            _say(f"note: skipped checkpoint {path}: {why}")
        for note in notes:
            _say(f"note: {note}")
        if cfg.progress != "none":
            how = f"resuming {state['path']}" if state else "starting"
            _say(f"{how}: {cfg.model} on {cfg.dataset}, global batch {cfg.global_batch_size}, {cfg.epochs:g} epochs, "
                 f"{cfg.optimizer}, {cfg.precision} -> {cfg.out_dir}")
    return _run(cfg, state, stale, rank)


def _run(cfg: TrainConfig, state: dict | None, stale: list[Path], rank: int) -> int:
    from torch.distributed.elastic.multiprocessing.errors import record

    from fastnet.distributed import is_peer_failure, setup, teardown
    from fastnet.trainer import train

    world = None

    @record  # torchrun's error file: its summary names this rank's exception when it is the first failure
    def recorded() -> dict | None:
        nonlocal world
        world = setup(cfg.device, cfg.backend, cfg.timeout_s)
        if world.is_main:
            for p in stale:  # --overwrite: the earlier run's files go, once this run has started
                p.unlink(missing_ok=True)
        return train(cfg, world, state)

    try:
        summary = recorded()
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - every failure ends as one line + exit 1
        me = world.rank if world is not None else rank
        peer = is_peer_failure(exc)
        # torchrun's agent gathers every rank's error file and names the first failure; under any other
        # launcher (srun, mpiexec, a scheduler, by hand) nobody does, so each rank a peer stopped says so
        agent = bool(os.environ.get("TORCHELASTIC_ERROR_FILE") or os.environ.get("TORCHELASTIC_RUN_ID"))
        if me == 0 or not (isinstance(exc, AGREED) or peer) or (peer and not agent):
            where = f" (rank {me})" if world is not None and world.distributed else ""
            cause = ""
            if peer:
                cause = " — a peer rank failed; torchrun's summary names the root cause" if agent else \
                    f" — rank {me} lost a peer rank (it died, hung or was stopped; the message above names the " \
                    f"connection where the backend says it); its own output says why, if it could"
            _say(f"error{where}: {type(exc).__name__}: {' '.join(str(exc).split())}{cause}")
        if world is not None and world.distributed:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)  # a peer may be gone: leave without the collective teardown that could block on it
        return 1
    if world.is_main:
        if summary is None:
            done = state["progress"]
            if cfg.stop_at_target and done.get("steps_to_target") is not None:
                _say(f"the run in {cfg.out_dir} had already reached its target top-1 {cfg.target_accuracy}% at step "
                     f"{done['steps_to_target']}; nothing to do. Continue it with --no-stop-at-target")
            else:
                _say(f"the run in {cfg.out_dir} had already finished ({done['global_step']} steps); nothing "
                     f"to do. Extend it with --resume {cfg.out_dir} --epochs N (or --max-steps N)")
        else:
            _say(f"best top-1 {summary['best_top1']:.2f}%  mean {summary['mean_images_per_s']:.0f} img/s  "
                 f"{summary['steps']} steps in {summary['wall_s']:.1f} s  -> {cfg.out_dir}/metrics.jsonl")
    teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

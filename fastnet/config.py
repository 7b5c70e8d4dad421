"""Training configuration, resolved in one place.

Precedence (highest first): ``--key value`` command-line overrides > ``FASTNET_<KEY>``
environment variables > the YAML file given by ``--config`` > the defaults below.
The result is a frozen :class:`TrainConfig` passed down to every part of the trainer;
nothing deeper reads ``os.environ`` or the command line.

Global batch semantics (Goyal et al. 2017, §2; Jia et al. 2018, §3): the global batch
``B = world_size × micro_batch_size × accumulation_steps``. ``accumulation_steps`` is
derived by :func:`accumulation_steps` and a ``B`` that does not divide raises
``ValueError`` naming the three numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

ENV_PREFIX = "FASTNET_"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every option of ``fastnet-train``. Units are in the field names or comments."""

    # what to train
    model: str = "small_cnn"
    dataset: str = "digits"
    data_dir: str | None = None
    num_classes: int | None = None  # None: the dataset's own
    image_size: int | None = None  # None: the dataset's own (synthetic: 32)
    synthetic_samples: int = 4096  # train-set size of the synthetic dataset
    val_samples: int = 0  # training images held out for validation (evaluated each epoch; test top-1 once at the end)
    # batch: global = world_size x micro_batch_size x accumulation steps
    global_batch_size: int = 256
    micro_batch_size: int = 64  # per rank, per forward/backward
    eval_batch_size: int = 256  # per rank
    epochs: float = 10.0
    max_steps: int | None = None  # optimizer steps; stops early when reached
    # optimizer and schedule
    optimizer: str = "sgd"
    base_lr: float = 0.1  # LR at reference_batch_size; scaled linearly to global_batch_size
    reference_batch_size: int = 256
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    trust_coefficient: float = 0.001  # LARS η
    trust_clip: bool = False  # LARS: cap the local LR at 1 (LARC clip mode)
    lars_exclude: str = "1d"  # LARS: 1d | bn_bias | none — no weight decay and no adaptation for these
    lars_eps: float = 1e-9
    batch_schedule: str = "constant"  # constant | increase (Smith et al. 2018)
    batch_milestones: tuple[float, ...] = ()  # epochs at which the global batch grows, for "increase"
    batch_factor: float = 5.0  # growth per milestone, for "increase"
    max_global_batch_size: int | None = None  # cap for "increase"
    lr_schedule: str = "cosine"
    lr_milestones: tuple[float, ...] = (30.0, 60.0, 80.0)  # epochs, for "multistep"
    lr_gamma: float = 0.1  # decay factor, for "multistep"
    poly_power: float = 2.0  # for "poly"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    # numerics
    precision: str = "fp32"  # fp32 | amp | fp16 | bf16
    loss_scaling: bool | None = None  # dynamic loss scaling; None: on for fp16 (and amp), off for bf16
    init_loss_scale: float = 65536.0
    loss_scale_growth_interval: int = 2000  # clean steps before the scale doubles
    min_loss_scale: float = 1.0  # floor of the dynamic loss scale; persistent overflow there is an error
    loss_scale_hysteresis: int = 1  # consecutive overflowing steps before the scale backs off
    channels_last: bool = False
    seed: int = 0
    # input pipeline
    workers: int = 2
    # bookkeeping
    out_dir: str = "runs/default"
    checkpoint_dir: str | None = None  # None: <out_dir>/checkpoints
    checkpoint_interval: int = 0  # optimizer steps between checkpoints; 0: end of each epoch only
    resume: str | None = None  # checkpoint file, or a directory holding last.pt
    target_accuracy: float | None = None  # top-1 in percent; time to reach it is reported
    eval_interval: int = 1  # epochs between evaluations
    log_interval: int = 10  # optimizer steps between per-step JSON records
    progress: bool = True  # tqdm bar on rank 0
    # distributed
    device: str = "auto"  # auto | cpu | cuda
    backend: str = "auto"  # auto (gloo on CPU, nccl on CUDA) | gloo | nccl
    timeout_s: float = 300.0  # collective timeout in seconds; a dead rank ends the job within it
    communicator: str = "torch"  # torch (torch.distributed group) | nccl (CuPy NCCL, CUDA) | mpi (mpi4py; launch with mpiexec)
    allreduce: str = "native"  # native | ring | hierarchical(_p2p) | leader(_p2p) | hybrid (per bucket, by the cost model)
    fusion_mb: float = 25.0  # fusion threshold: MiB per bucket on the wire (DDP's default)
    wire_dtype: str = "none"  # none | fp16 | bf16: gradients on the wire (divided by world size first)
    ranks_per_node: int | None = None  # emulated node size for hierarchical/leader; None: nodes from the hosts
    cost_model: str | None = None  # YAML from `fastnet-bench --calibrate` for hybrid; None: built-in placeholders
    overlap: bool = True  # all-reduce buckets during backward (False: all after backward)
    grad_predivide_factor: float | None = None  # divide by f before the sum, world_size/f after; None: f = world size
    find_unused_parameters: bool = False  # walk the graph each step so unused parameters never hold back a bucket
    buffer_sync: str = "average"  # average | broadcast | none: BN running stats before each evaluation and checkpoint
    sync_batchnorm: bool = False  # torch.nn.SyncBatchNorm (CUDA only): batch statistics over all ranks
    distributed_debug: bool = False  # check every bucket launch across ranks (one all-gather per bucket)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lr_milestones"] = list(self.lr_milestones)
        d["batch_milestones"] = list(self.batch_milestones)
        return d

    @property
    def scaled_lr(self) -> float:
        """Peak LR by the linear scaling rule: ``base_lr × B / reference_batch_size`` (Goyal et al. §2.1)."""
        return self.base_lr * self.global_batch_size / self.reference_batch_size


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPE_HINTS = typing.get_type_hints(TrainConfig)


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {text!r}")


def _convert(key: str, value: Any) -> Any:
    """Convert ``value`` (a string from the CLI/env or a YAML scalar) to the field's type."""
    hint = _TYPE_HINTS[key]
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ValueError(f"option {key!r} cannot be empty")
    try:
        if typing.get_origin(hint) is tuple:
            if isinstance(value, str):
                value = [v for v in value.replace(",", " ").split() if v]
            if not isinstance(value, (list, tuple)):
                value = [value]
            return tuple(float(v) for v in value)
        if hint is bool:
            return value if isinstance(value, bool) else _parse_bool(str(value))
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"{value} is not an integer")
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if hint is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"Invalid value for option {key!r}: {value!r} ({exc})") from None


def _check_keys(keys: Sequence[str], origin: str) -> None:
    unknown = [k for k in keys if k not in FIELDS]
    if unknown:
        raise ValueError(
            f"Unknown option(s) {', '.join(map(repr, unknown))} in {origin}; "
            f"valid options: {', '.join(sorted(FIELDS))}"
        )


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML config (a mapping of option names to values). Raises ValueError on bad files."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"Config file {str(p)!r} does not exist; configs ship in experiments/*.yaml")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"Config file {str(p)!r} must hold a mapping of option: value, got {type(data).__name__}")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    _check_keys(list(data), f"config file {str(p)!r}")
    return data


def env_overrides(environ: Mapping[str, str]) -> dict[str, str]:
    """``FASTNET_<KEY>`` variables that name an option (others under the prefix are ignored)."""
    out = {}
    for name, value in environ.items():
        if name.startswith(ENV_PREFIX):
            key = name[len(ENV_PREFIX):].lower()
            if key in FIELDS:
                out[key] = value
    return out


def parse_overrides(tokens: Sequence[str]) -> dict[str, str]:
    """Parse ``--key value`` / ``--key=value`` pairs (dashes or underscores) into a dict."""
    out: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--"):
            raise ValueError(f"Expected an option like --key value, got {tok!r}")
        body = tok[2:]
        if "=" in body:
            key, value = body.split("=", 1)
            i += 1
        else:
            key = body
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                # a bare flag means true for booleans
                value = "true"
                i += 1
            else:
                value = tokens[i + 1]
                i += 2
        key = key.replace("-", "_")
        if key.startswith("no_") and key[3:] in FIELDS and _TYPE_HINTS[key[3:]] is bool:
            key, value = key[3:], "false"
        out[key] = value
    _check_keys(list(out), "the command line")
    return out


def resolve(
    config_path: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> TrainConfig:
    """Build the frozen config: defaults < YAML < ``FASTNET_*`` env < ``overrides``.

    Raises:
        ValueError: unknown option names (the message lists the valid ones), values that do not
            convert to the option's type, or values out of range (see :func:`validate`).
    """
    values: dict[str, Any] = {}
    if config_path:
        values.update(load_yaml(config_path))
    values.update(env_overrides(os.environ if environ is None else environ))
    values.update(overrides or {})
    _check_keys(list(values), "the configuration")
    cfg = TrainConfig(**{k: _convert(k, v) for k, v in values.items()})
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Range checks that need no knowledge of the world size. Raises ValueError naming the value."""
    positive = ("global_batch_size", "micro_batch_size", "eval_batch_size", "reference_batch_size", "log_interval",
                "eval_interval", "synthetic_samples", "init_loss_scale", "loss_scale_growth_interval")
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise ValueError(f"Invalid {key}: {getattr(cfg, key)} (must be > 0)")
    for key in ("base_lr", "momentum", "weight_decay", "warmup_epochs", "label_smoothing", "workers",
                "checkpoint_interval", "trust_coefficient", "lars_eps"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"Invalid {key}: {getattr(cfg, key)} (must be >= 0)")
    if cfg.epochs <= 0:
        raise ValueError(f"Invalid epochs: {cfg.epochs} (must be > 0)")
    if cfg.val_samples < 0:
        raise ValueError(f"Invalid val_samples: {cfg.val_samples} (must be >= 0; 0: evaluate on the test set)")
    if cfg.max_steps is not None and cfg.max_steps <= 0:
        raise ValueError(f"Invalid max_steps: {cfg.max_steps} (must be > 0, or none)")
    if not 0 <= cfg.label_smoothing < 1:
        raise ValueError(f"Invalid label_smoothing: {cfg.label_smoothing} (must be in [0, 1))")
    if cfg.timeout_s <= 0:
        raise ValueError(f"Invalid timeout_s: {cfg.timeout_s} (must be > 0 seconds)")
    if cfg.target_accuracy is not None and not 0 < cfg.target_accuracy <= 100:
        raise ValueError(f"Invalid target_accuracy: {cfg.target_accuracy} (a top-1 percentage in (0, 100])")
    if cfg.fusion_mb <= 0:
        raise ValueError(f"Invalid fusion_mb: {cfg.fusion_mb} (must be > 0 MiB)")
    if cfg.cost_model is not None and not Path(cfg.cost_model).is_file():
        raise ValueError(f"Invalid cost_model: {cfg.cost_model!r} is not a file (write one with "
                         f"`fastnet-bench --calibrate FILE`, or leave it unset)")
    if cfg.ranks_per_node is not None and cfg.ranks_per_node < 1:
        raise ValueError(f"Invalid ranks_per_node: {cfg.ranks_per_node} (must be >= 1)")
    if not (math.isfinite(cfg.min_loss_scale) and 0 < cfg.min_loss_scale <= cfg.init_loss_scale):
        raise ValueError(f"Invalid min_loss_scale: {cfg.min_loss_scale} (must be in (0, init_loss_scale="
                         f"{cfg.init_loss_scale}])")
    if cfg.loss_scale_hysteresis < 1:
        raise ValueError(f"Invalid loss_scale_hysteresis: {cfg.loss_scale_hysteresis} (must be >= 1)")
    if cfg.grad_predivide_factor is not None and not (math.isfinite(cfg.grad_predivide_factor)
                                                      and cfg.grad_predivide_factor > 0):
        raise ValueError(f"Invalid grad_predivide_factor: {cfg.grad_predivide_factor} (must be finite and > 0, "
                         f"or none for the world size)")
    if cfg.batch_factor < 1:
        raise ValueError(f"Invalid batch_factor: {cfg.batch_factor} (must be >= 1)")
    for key, choices in (("device", ("auto", "cpu", "cuda")), ("backend", ("auto", "gloo", "nccl")),
                         ("lars_exclude", ("1d", "bn_bias", "none")), ("batch_schedule", ("constant", "increase")),
                         ("allreduce", ("native", "ring", "hierarchical", "hierarchical_p2p", "leader", "leader_p2p", "hybrid")),
                         ("wire_dtype", ("none", "fp16", "bf16")), ("buffer_sync", ("average", "broadcast", "none")),
                         ("communicator", ("torch", "nccl", "mpi"))):
        if getattr(cfg, key) not in choices:
            raise ValueError(f"Invalid {key}: {getattr(cfg, key)!r}; valid choices: {', '.join(choices)}")


def accumulation_steps(global_batch_size: int, world_size: int, micro_batch_size: int) -> int:
    """Micro-batches each rank accumulates per optimizer step: ``B / (world_size × micro_batch_size)``.

    Raises:
        ValueError: when ``global_batch_size`` is not a multiple of ``world_size × micro_batch_size``;
            the message names the three numbers and the nearest valid global batches.
    """
    per_step = world_size * micro_batch_size
    if global_batch_size % per_step:
        lo = max(per_step, global_batch_size // per_step * per_step)
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by world_size {world_size} × "
            f"micro_batch_size {micro_batch_size} = {per_step}; use a global batch such as {lo} or "
            f"{lo + per_step}, or another micro_batch_size"
        )
    return global_batch_size // per_step


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastnet-train",
        description="Large-batch data-parallel training. Run single-process or under "
        "`torchrun --nproc_per_node=N`. Any option below can be given as --key value "
        "(dashes or underscores), set in the YAML file, or as FASTNET_<KEY> in the environment.",
        epilog="options: " + ", ".join(f"--{k.replace('_', '-')} (default {f.default!r})" for k, f in FIELDS.items()),
    )
    p.add_argument("--config", help="YAML file of options, e.g. experiments/digits.yaml")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    return p


def parse_cli(argv: Sequence[str] | None = None) -> tuple[TrainConfig, bool]:
    """Parse ``fastnet-train`` arguments. Returns (config, print_only)."""
    parser = build_arg_parser()
    known, rest = parser.parse_known_args(argv)
    try:
        cfg = resolve(known.config, parse_overrides(rest))
    except ValueError as exc:
        parser.error(str(exc))
    return cfg, known.print_config


@dataclasses.dataclass(frozen=True)
class EpochBatch:
    """One epoch of the run: its global batch, accumulation steps and optimizer steps."""

    global_batch_size: int
    accumulation_steps: int
    steps: int


def epoch_plan(cfg: TrainConfig, world_size: int, samples_per_rank: int) -> list[EpochBatch]:
    """The run epoch by epoch (``ceil(epochs)`` entries; a fractional last epoch is shortened).

    With ``batch_schedule="increase"`` the global batch of epoch ``e`` follows
    :class:`fastnet.optim.BatchSizeSchedule` (Smith et al. 2018); the micro-batch stays fixed and
    the accumulation steps absorb the growth.

    Raises:
        ValueError: a global batch that does not divide (see :func:`accumulation_steps`), or one
            larger than the training set (not a single step per epoch).
    """
    from fastnet.optim.schedules import BatchSizeSchedule

    if cfg.batch_schedule == "increase":
        sched = BatchSizeSchedule(cfg.global_batch_size, cfg.batch_milestones, cfg.batch_factor,
                                  cfg.max_global_batch_size)
    else:
        sched = BatchSizeSchedule(cfg.global_batch_size)
    n_epochs = max(1, int(-(-cfg.epochs // 1)))
    plan = []
    for e in range(n_epochs):
        b = sched.batch_size(e)
        accum = accumulation_steps(b, world_size, cfg.micro_batch_size)
        steps = samples_per_rank // (cfg.micro_batch_size * accum)
        if steps == 0:
            raise ValueError(f"global_batch_size {b} (epoch {e}) exceeds the {samples_per_rank * world_size} training "
                             f"samples that {world_size} rank(s) share: not one step per epoch; lower the batch")
        frac = cfg.epochs - e
        if frac < 1:
            steps = max(1, int(-(-frac * steps // 1)))
        plan.append(EpochBatch(b, accum, steps))
    return plan

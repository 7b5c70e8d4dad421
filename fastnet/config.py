"""Training configuration, resolved in one place, validated when it is parsed.

Precedence (highest first): ``--key value`` command-line options > ``FASTNET_<KEY>``
environment variables > the YAML file given by ``--config`` > the defaults below. Resuming
(``--resume``) puts the checkpoint's own config under those three, so ``--resume DIR`` alone
continues the run as it was (see :func:`merge_resumed`).

The fields of :class:`TrainConfig` (a frozen pydantic model) are the single source of the command
line: ``fastnet-train --help`` is generated from their types, choices, defaults and descriptions
by pydantic-settings' ``CliSettingsSource``; pydantic validates every value from every source
(types, ``Literal`` choices, ranges, and no NaN or infinity in any float). Nothing deeper reads
``os.environ`` or the command line. This module imports neither torch nor torchvision, so
``--help`` and argument errors come back in well under a second.

Global batch semantics (Goyal et al. 2017, §2; Jia et al. 2018, §3): the global batch
``B = world_size × micro_batch_size × accumulation_steps``. ``accumulation_steps`` is
derived by :func:`accumulation_steps` and a ``B`` that does not divide raises
``ValueError`` naming the three numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import NoDecode

from fastnet.yamlio import load_yaml_file

ENV_PREFIX = "FASTNET_"
# FASTNET_* variables that are read elsewhere, not options of fastnet-train
OTHER_ENV = {"FASTNET_KERNELS": "opt in to the fused CUDA kernels (fastnet.kernels)",
             "FASTNET_KILL_AT": "fault injection for the restart tests (fastnet.faults)"}

# Registries, spelt out here so that parsing needs no torch; tests check them against the registries.
MODELS = ("small_cnn", "small_cnn_dropout", "resnet8", "resnet20", "resnet56", "resnet18_cifar", "resnet50", "alexnet",
          "alexnet_bn")
DATASETS = ("digits", "cifar10", "fashion_mnist", "imagenet", "imagefolder", "synthetic")
ALGORITHMS = ("native", "ring", "hierarchical", "hierarchical_p2p", "leader", "leader_p2p", "hybrid")
Milestones = Annotated[tuple[float, ...], NoDecode]  # "30,60" or "30 60" from env / CLI, a list in YAML


class TrainConfig(BaseModel):
    """Every option of ``fastnet-train``; units are in the names or descriptions.

    Raises ``pydantic.ValidationError`` (a ``ValueError``) on construction with a wrong type, a value
    outside its choices or range, or NaN/infinity; :func:`resolve` turns it into one line per option.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, validate_default=True)

    # what to train
    model: str = Field("small_cnn", description="network: fastnet's (" + ", ".join(MODELS) + "), any torchvision "
                       "classification model by name (resnet18, vit_b_16, ...), or timm:NAME (the timm extra)")
    dataset: Literal[DATASETS] = Field("digits", description="training data; digits is embedded (no download)")
    data_dir: str | None = Field(None, description="directory of the dataset's files (see README)")
    num_classes: int | None = Field(None, ge=2, description="classes (default: the dataset's own)")
    image_size: int | None = Field(None, ge=4, description="image side in pixels (default: the dataset's own; "
                                   "synthetic: 32)")
    synthetic_samples: int = Field(4096, gt=0, description="train-set size of the synthetic dataset")
    val_samples: int = Field(0, ge=0, description="training images held out for validation (evaluated each "
                             "epoch; the test set is then read once, at the end)")
    # batch: global = world_size x micro_batch_size x accumulation steps
    global_batch_size: int = Field(256, gt=0, description="global batch B = world size x micro-batch x "
                                   "accumulation steps (the steps are derived)")
    micro_batch_size: int = Field(64, gt=0, description="images per rank per forward/backward")
    eval_batch_size: int = Field(256, gt=0, description="images per rank per evaluation batch")
    epochs: float = Field(10.0, gt=0, le=1e6, description="length of the run in epochs (the LR schedule spans it)")
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps (the schedule "
                                  "still spans --epochs)")
    # optimizer and schedule
    optimizer: Literal["sgd", "lars"] = Field("sgd", description="momentum SGD, or LARS (You et al. 2017)")
    base_lr: float = Field(0.1, ge=0, description="LR at reference_batch_size; peak LR = base_lr x "
                           "global_batch_size / reference_batch_size (linear scaling rule)")
    reference_batch_size: int = Field(256, gt=0, description="batch at which base_lr was tuned")
    momentum: float = Field(0.9, ge=0, lt=1, description="momentum coefficient")
    nesterov: bool = Field(False, description="Nesterov momentum")
    weight_decay: float = Field(5e-4, ge=0, description="L2 weight decay (LARS: not on biases/BN, see lars_exclude)")
    trust_coefficient: float = Field(0.001, gt=0, description="LARS trust coefficient eta")
    trust_clip: bool = Field(False, description="LARS: LARC's clip mode, each adapted tensor's LR is min(local LR, "
                             "global LR) instead of their product (Apex LARC(clip=True))")
    lars_excluded_lr: float | None = Field(None, ge=0, description="LARS: peak LR of the excluded tensors (biases, "
                                           "BN), warmed up and decayed by the same schedule (default: the global "
                                           "peak LR, as the reference LARS)")
    grad_noise_scale: Literal["auto", "on", "off"] = Field(
        "auto", description="measure the gradient noise scale B_simple (McCandlish et al. 2018) from the local and "
        "all-reduced gradients, or from the micro-batches with one process (auto: where there are two batch sizes; "
        "on: refuse a run without them)")
    noise_scale_ema: float = Field(0.95, ge=0, lt=1, description="decay of the noise scale's moving averages "
                                   "per step")
    log_update_ratio: bool = Field(False, description="log ||dw||/||w|| of the adapted and excluded tensors on "
                                   "logged steps (update_ratio_adapted / _excluded)")
    lars_exclude: Literal["1d", "bn_bias", "none"] = Field("1d", description="LARS: tensors with no weight decay "
                                                            "and no adaptation (1d: biases and BN gamma/beta)")
    lars_eps: float = Field(1e-9, ge=0, description="LARS: added to the norms' denominator")
    batch_schedule: Literal["constant", "increase"] = Field("constant", description="increase: grow the global "
                                                             "batch at batch_milestones (Smith et al. 2018)")
    batch_milestones: Milestones = Field((), description="epochs at which the global batch grows (increase)")
    batch_factor: float = Field(5.0, ge=1, description="growth of the global batch per milestone (increase)")
    max_global_batch_size: int | None = Field(None, gt=0, description="cap of the growing global batch (increase)")
    lr_schedule: Literal["cosine", "poly", "multistep", "constant"] = Field(
        "cosine", description="decay after warm-up, per iteration (poly: You et al.)")
    lr_milestones: Milestones = Field((30.0, 60.0, 80.0), description="epochs of the LR decays (multistep)")
    lr_gamma: float = Field(0.1, gt=0, le=1, description="LR factor per milestone (multistep)")
    poly_power: float = Field(2.0, gt=0, description="power of the poly decay")
    warmup_epochs: float = Field(0.0, ge=0, description="linear warm-up from base_lr to the peak LR (Goyal et al.)")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the cross-entropy")
    # numerics
    precision: Literal["fp32", "amp", "fp16", "bf16"] = Field(
        "fp32", description="amp: autocast + GradScaler; fp16/bf16: half model, FP32 master weights")
    loss_scaling: bool | None = Field(None, description="dynamic loss scaling (default: on for fp16 and amp, off "
                                      "for bf16)")
    init_loss_scale: float = Field(65536.0, gt=0, description="initial dynamic loss scale")
    loss_scale_growth_interval: int = Field(2000, gt=0, description="clean steps before the loss scale doubles")
    min_loss_scale: float = Field(1.0, gt=0, description="floor of the loss scale; persistent overflow there is "
                                  "an error")
    loss_scale_hysteresis: int = Field(1, ge=1, description="overflowing steps in a row before the scale backs off")
    channels_last: bool = Field(False, description="NHWC memory format for the model and inputs")
    seed: int = Field(0, ge=0, description="seed of the initial weights, the data order and augmentation")
    # input pipeline
    workers: int = Field(2, ge=0, description="DataLoader worker processes per rank")
    # bookkeeping
    out_dir: str = Field("runs/default", description="run directory: config.yaml, metrics.jsonl, checkpoints/")
    checkpoint_dir: str | None = Field(None, description="checkpoints (default: <out_dir>/checkpoints)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept (last.pt, last.1.pt, ...); a resume "
                                  "falls back to the newest that loads")
    checkpoint_interval: int = Field(0, ge=0, description="optimizer steps between checkpoints (0: at each "
                                     "epoch end only)")
    resume: str | None = Field(None, description="continue a run: its out_dir, its checkpoints directory or a "
                               "checkpoint file; 'auto': <out_dir> if it holds a checkpoint, else a new run")
    overwrite: bool = Field(False, description="start a new run in an out_dir that holds an earlier run's files "
                            "(they are removed first)")
    target_accuracy: float | None = Field(None, gt=0, le=100, description="top-1 percent; the time to reach it is "
                                          "reported")
    eval_interval: int = Field(1, gt=0, description="epochs between evaluations")
    eval_every_steps: int | None = Field(None, gt=0, description="also evaluate every N optimizer steps (steps to "
                                         "a target accuracy, Shallue et al. 2019)")
    stop_at_target: bool = Field(False, description="end the run at the first evaluation whose top-1 reaches "
                                 "target_accuracy (steps and epochs to target in the summary)")
    tensorboard: bool = Field(False, description="also write TensorBoard event files to <out_dir>/tensorboard "
                              "(loss, LR, loss scale, images/s, communication, top-1/top-5, noise scale; the viz "
                              "extra)")
    trace: bool = Field(False, description="write a Chrome/Perfetto trace per rank of the first trace_steps steps "
                        "(bucket ready, queue wait, all-reduce, each phase, cast, forward+backward, optimizer) to "
                        "<out_dir>/trace/rank<R>.json (fastnet.comm.trace; open in ui.perfetto.dev)")
    trace_steps: int = Field(20, gt=0, description="optimizer steps the trace covers (from the session's first)")
    log_interval: int = Field(10, gt=0, description="optimizer steps between step records (and progress lines)")
    progress: Literal["auto", "bar", "log", "none"] = Field(
        "auto", description="rank 0's progress: auto (a bar on a terminal, plain lines otherwise), bar, log, none")
    # distributed
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="torch.distributed backend (auto: gloo "
                                                     "on CPU, nccl on CUDA)")
    timeout_s: float = Field(300.0, gt=0, description="collective timeout in seconds; a dead rank ends the job "
                             "within it")
    communicator: Literal["torch", "nccl", "mpi"] = Field(
        "torch", description="what carries the gradient buckets: the torch.distributed group, CuPy NCCL, mpi4py")
    allreduce: Literal[ALGORITHMS] = Field("native", description="gradient all-reduce algorithm (hybrid: per "
                                           "bucket, by the cost model)")
    fusion_mb: float = Field(25.0, gt=0, description="fusion threshold: MiB per bucket on the wire")
    wire_dtype: Literal["none", "fp16", "bf16"] = Field("none", description="gradients on the wire")
    ranks_per_node: int | None = Field(None, ge=1, description="emulated node size for hierarchical/leader "
                                       "(default: nodes from the hosts)")
    cost_model: str | None = Field(None, description="YAML from `fastnet-bench --calibrate` for hybrid")
    overlap: bool = Field(True, description="all-reduce buckets during backward (off: all after backward)")
    rebuild_buckets: bool = Field(True, description="with overlap: re-cut the buckets once, after step 2, from "
                                  "rank 0's measured gradient ready times (fusion threshold = largest bucket)")
    grad_predivide_factor: float | None = Field(None, gt=0, description="divide by f before the sum and by world "
                                                "size / f after (default: f = world size)")
    find_unused_parameters: bool = Field(False, description="walk the graph each step so unused parameters never "
                                         "hold back a bucket")
    buffer_sync: Literal["average", "broadcast", "none"] = Field(
        "average", description="BN running statistics before each evaluation and checkpoint")
    sync_batchnorm: bool = Field(False, description="torch.nn.SyncBatchNorm (CUDA only)")
    distributed_debug: bool = Field(False, description="check every bucket launch across ranks")

    @field_validator("batch_milestones", "lr_milestones", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [v for v in value.replace(",", " ").split() if v]
        if isinstance(value, (int, float)):
            return [value]
        return value

    @field_validator("batch_milestones", "lr_milestones")
    @classmethod
    def _increasing(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(v < 0 for v in value) or list(value) != sorted(value):
            raise ValueError(f"must be increasing epochs >= 0, got {list(value)}")
        return value

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value not in MODELS:  # torchvision / timm names: checked against their registries (imports them)
            from fastnet.models import check_model_name

            check_model_name(value)
        return value

    @field_validator("progress", mode="before")
    @classmethod
    def _progress_bool(cls, value: Any) -> Any:  # configs written before --progress took a mode
        if isinstance(value, bool):
            return "auto" if value else "none"
        return {"true": "auto", "false": "none"}.get(str(value).lower(), value) if isinstance(value, str) else value

    @field_validator("*", mode="before")
    @classmethod
    def _none_words(cls, value: Any, info) -> Any:
        if isinstance(value, str) and value.lower() in ("none", "null") and \
                type(None) in getattr(TrainConfig.model_fields[info.field_name].annotation, "__args__", ()):
            return None
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> "TrainConfig":
        if self.min_loss_scale > self.init_loss_scale:
            raise ValueError(f"min_loss_scale {self.min_loss_scale} exceeds init_loss_scale {self.init_loss_scale}")
        if self.max_global_batch_size is not None and self.max_global_batch_size < self.global_batch_size:
            raise ValueError(f"max_global_batch_size {self.max_global_batch_size} is below global_batch_size "
                             f"{self.global_batch_size}")
        if self.lars_excluded_lr is not None and self.optimizer != "lars":
            raise ValueError(f"lars_excluded_lr {self.lars_excluded_lr} needs optimizer 'lars' (optimizer "
                             f"{self.optimizer!r} has no excluded group); unset it or use --optimizer lars")
        if self.sync_batchnorm and self.overlap:
            raise ValueError("sync_batchnorm with overlap: SyncBatchNorm's all-reduces (issued by autograd during "
                             "backward) and the gradient buckets' (issued by the communication thread as they fill) "
                             "would reach NCCL in a different order on each rank, on two communicators (NCCL's "
                             "rule for several communicators: a possible hang); add --no-overlap (the buckets are "
                             "then all-reduced after backward, after every SyncBatchNorm all-reduce)")
        if self.stop_at_target and self.target_accuracy is None:
            raise ValueError("stop_at_target needs target_accuracy (the top-1 percent to stop at)")
        if self.cost_model is not None and not Path(self.cost_model).is_file():
            raise ValueError(f"cost_model {self.cost_model!r} is not a file (write one with `fastnet-bench "
                             f"--calibrate FILE`, or leave it unset)")
        if self.cost_model is not None and not isinstance(load_yaml_file(self.cost_model, "cost model"), dict):
            raise ValueError(f"cost_model {self.cost_model!r} must hold a mapping of link levels (see "
                             f"`fastnet-bench --calibrate`)")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain values (tuples as lists), as written to ``config.yaml`` and checkpoints."""
        d = self.model_dump()
        d["lr_milestones"] = list(self.lr_milestones)
        d["batch_milestones"] = list(self.batch_milestones)
        return d

    @property
    def checkpoint_path(self) -> Path:
        """The run's checkpoint file: ``<checkpoint_dir or out_dir/checkpoints>/last.pt``."""
        return (Path(self.checkpoint_dir) if self.checkpoint_dir else Path(self.out_dir) / "checkpoints") / "last.pt"

    @property
    def scaled_lr(self) -> float:
        """Peak LR by the linear scaling rule: ``base_lr × B / reference_batch_size`` (Goyal et al. §2.1)."""
        return self.base_lr * self.global_batch_size / self.reference_batch_size


FIELDS = TrainConfig.model_fields
DEFAULTS = {name: f.default for name, f in FIELDS.items()}


def _error_lines(exc: ValidationError, origin: Mapping[str, str]) -> str:
    """One line per invalid option: ``Invalid <option> <value> (from <source>): <problem>``."""
    lines = []
    for err in exc.errors(include_url=False):
        key = str(err["loc"][0]) if err["loc"] else ""
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "literal_error":
            msg = f"valid choices: {', '.join(str(c) for c in FIELDS[key].annotation.__args__)}"
        elif err["type"] == "extra_forbidden":
            lines.append(_unknown_message([key], origin.get(key, "the configuration")))
            continue
        if not key:
            lines.append(f"Invalid configuration: {msg}")
            continue
        src = f" (from {origin[key]})" if key in origin else ""
        lines.append(f"Invalid {key} {err.get('input')!r}{src}: {msg}")
    return "; ".join(lines)


def _unknown_message(keys: Sequence[str], origin: str) -> str:
    hints = []
    for k in keys:
        close = difflib.get_close_matches(k, FIELDS, n=1)
        hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return f"Unknown option(s) {', '.join(hints)} in {origin}; valid options: {', '.join(sorted(FIELDS))}"


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML config (a mapping of option names to values).

    Raises:
        ValueError: a missing file, invalid or unsafe YAML (one line: file, line, column, problem), a
            document that is not a mapping, or unknown option names (with a "did you mean").
    """
    data = load_yaml_file(path, "config file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of option: value, got {type(data).__name__}")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = [k for k in data if k not in FIELDS]
    if unknown:
        raise ValueError(_unknown_message(unknown, f"config file {str(path)!r}"))
    return data


def env_overrides(environ: Mapping[str, str]) -> dict[str, str]:
    """The ``FASTNET_<KEY>`` variables, as option values.

    Raises:
        ValueError: a ``FASTNET_`` variable that names no option (nor one read elsewhere, such as
            ``FASTNET_KERNELS``), with a "did you mean" — a misspelt variable is never ignored.
    """
    out, unknown = {}, []
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name in OTHER_ENV:
            continue
        key = name[len(ENV_PREFIX):].lower()
        if key in FIELDS:
            out[key] = value
        else:
            unknown.append(name)
    if unknown:
        names = [f"{ENV_PREFIX}{k.upper()}" for k in FIELDS] + list(OTHER_ENV)
        hints = [n + (f" (did you mean {c[0]}?)" if (c := difflib.get_close_matches(n, names, n=1)) else "")
                 for n in sorted(unknown)]
        raise ValueError(f"Unknown environment variable(s) {', '.join(hints)}: every {ENV_PREFIX}<KEY> must name an "
                         f"option of fastnet-train (unset it, or see fastnet-train --help)")
    return out


def _normalise_tokens(tokens: Sequence[str]) -> list[str]:
    """``--key_name`` → ``--key-name`` (underscores accepted as in the YAML names); values untouched."""
    out = []
    for tok in tokens:
        if tok.startswith("--"):
            name, sep, value = tok[2:].partition("=")
            tok = "--" + name.replace("_", "-") + sep + value
        out.append(tok)
    return out


class _ArgumentParser(argparse.ArgumentParser):
    """argparse raising ValueError instead of exiting, so every error takes the same one-line path."""

    def error(self, message: str):  # type: ignore[override]
        raise ValueError(message)


def build_arg_parser() -> tuple[argparse.ArgumentParser, Any]:
    """``fastnet-train``'s parser: ``--config`` and ``--print-config`` plus one option per field of
    :class:`TrainConfig`, generated by pydantic-settings (types, choices, defaults, help)."""
    from pydantic_settings import CliSettingsSource

    parser = _ArgumentParser(
        prog="fastnet-train", allow_abbrev=False, usage="fastnet-train [--config YAML] [--print-config] [--OPTION VALUE ...]",
        formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=36, width=110),
        description="Large-batch data-parallel training (one process, `torchrun --nproc_per_node=N -m "
        "fastnet.train`, or `mpiexec -n N`). Every option can also be set in the --config YAML file (its name "
        "with underscores) or as FASTNET_<NAME> in the environment; the command line wins over the environment, "
        "which wins over the file.")
    parser.add_argument("--config", metavar="YAML", help="YAML file of options, e.g. experiments/digits.yaml")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved options and the derived numbers (world size, accumulation steps, "
                        "peak LR, steps per epoch) as YAML and exit")
    source = CliSettingsSource(TrainConfig, root_parser=parser, cli_kebab_case=True, cli_implicit_flags=True,
                               cli_avoid_json=True, cli_enforce_required=False)
    return parser, source


@dataclasses.dataclass(frozen=True)
class CliArgs:
    """What the command line asked for besides the options: the YAML file and ``--print-config``."""

    config: str | None
    print_config: bool


def _parse_tokens(tokens: Sequence[str]) -> tuple[CliArgs, dict[str, Any]]:
    parser, source = build_arg_parser()
    tokens = _normalise_tokens(tokens)
    try:
        ns, rest = parser.parse_known_args(tokens)
    except ValueError as exc:
        raise ValueError(f"{exc} (see fastnet-train --help)") from None
    if rest:
        unknown = [t[2:].partition("=")[0].replace("-", "_") for t in rest if t.startswith("--")]
        if unknown:
            raise ValueError(_unknown_message(unknown, "the command line"))
        raise ValueError(f"Expected an option like --key value, got {rest[0]!r}")
    values = source(parsed_args=ns)()
    return CliArgs(ns.config, ns.print_config), dict(values)


def parse_overrides(tokens: Sequence[str]) -> dict[str, Any]:
    """Parse ``--key value`` / ``--key=value`` / ``--flag`` / ``--no-flag`` tokens into option values.

    Raises:
        ValueError: an unknown option (with a "did you mean"), a stray positional token, or a value
            argparse rejects (e.g. not one of a choice's values).
    """
    return _parse_tokens(tokens)[1]


def resolve(config_path: str | None = None, overrides: Mapping[str, Any] | None = None,
            environ: Mapping[str, str] | None = None) -> TrainConfig:
    """Build the frozen config: defaults < YAML < ``FASTNET_*`` env < ``overrides``.

    The result's ``model_fields_set`` holds the options that some source set (what a resumed run
    takes over its checkpoint's config).

    Raises:
        ValueError: unknown option names or environment variables, YAML errors, and values of the
            wrong type, outside their choices or range, NaN or infinite — one message naming every
            offending option, its value and where it came from.
    """
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if config_path:
        data = load_yaml(config_path)
        values.update(data)
        origin.update({k: f"config file {config_path}" for k in data})
    env = env_overrides(os.environ if environ is None else environ)
    values.update(env)
    origin.update({k: f"{ENV_PREFIX}{k.upper()}" for k in env})
    values.update(overrides or {})
    origin.update({k: "the command line" for k in overrides or {}})
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as exc:
        raise ValueError(_error_lines(exc, origin)) from None


def parse_cli(argv: Sequence[str] | None = None) -> tuple[TrainConfig, CliArgs]:
    """Parse ``fastnet-train`` arguments (``--help`` prints and exits 0).

    Raises:
        ValueError: anything :func:`parse_overrides` or :func:`resolve` rejects.
    """
    args, values = _parse_tokens(sys.argv[1:] if argv is None else argv)
    return resolve(args.config, values), args


def merge_resumed(saved: Mapping[str, Any], cfg: TrainConfig) -> TrainConfig:
    """The config of a resumed run: the checkpoint's config ``saved``, overridden by the options
    this invocation set (``cfg.model_fields_set``: YAML, env or command line). Keys of ``saved``
    that are no longer options are dropped.

    Raises:
        ValueError: the merged values are invalid (e.g. a checkpoint written with other bounds).
    """
    values = {k: v for k, v in saved.items() if k in FIELDS}
    values.update({k: getattr(cfg, k) for k in cfg.model_fields_set})
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as exc:
        raise ValueError(_error_lines(exc, {})) from None


# How each option may change when a run is resumed (README, "Resuming a run").
# Re-planned: the LR schedule is rebuilt for the new values and continues at the checkpoint's step
# (the LR of step s is the new plan's LR of step s: the run is extended as if it had been planned so).
REPLANNED = ("epochs", "max_steps", "base_lr", "lars_excluded_lr", "reference_batch_size", "lr_schedule", "lr_milestones", "lr_gamma",
             "poly_power", "warmup_epochs")
# Taken as given from the resumed step on: optimizer hyperparameters and everything about how the run
# executes (world size and micro-batch: the accumulation steps are re-derived, the sampler keeps its place).
# Refused: they change what is trained or the meaning of a step; the message lists every difference.
REFUSED = ("model", "num_classes", "image_size", "dataset", "synthetic_samples", "val_samples", "global_batch_size",
           "batch_schedule", "batch_milestones", "batch_factor", "max_global_batch_size", "optimizer", "lars_exclude",
           "precision", "loss_scaling", "seed")


def config_changes(saved: Mapping[str, Any], cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """The options (other than ``resume``) whose value in ``cfg`` differs from the checkpoint's
    config ``saved``: ``{name: (saved value, new value)}``, in field order, plain values as in
    :meth:`TrainConfig.to_dict`. Options ``saved`` lacks (older checkpoints) are not compared."""
    new = cfg.to_dict()
    return {k: (saved[k], v) for k, v in new.items() if k in saved and k != "resume" and saved[k] != v}


def resume_conflicts(saved: Mapping[str, Any], cfg: TrainConfig) -> list[str]:
    """The refused options whose value in ``cfg`` differs from the checkpoint's config ``saved``,
    as ``"name: saved -> new"`` strings (empty when the run may continue)."""
    changes = config_changes(saved, cfg)
    return [f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in REFUSED if k in changes]


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


def check_world(cfg: TrainConfig, world_size: int) -> list[str]:
    """Checks that need the world size. Returns notes on options that have no effect (e.g. the
    all-reduce options of a single process).

    Raises:
        ValueError: a ``ranks_per_node`` larger than the world size or not dividing it, naming both.
    """
    notes = []
    if world_size == 1:
        unused = [k for k in ("cost_model", "ranks_per_node", "grad_predivide_factor")
                  if getattr(cfg, k) is not None] + [k for k in ("allreduce", "wire_dtype", "communicator")
                                                     if getattr(cfg, k) != DEFAULTS[k]]
        if unused:
            notes.append(f"world size 1: no gradient all-reduce, so {', '.join(unused)} "
                         f"{'has' if len(unused) == 1 else 'have'} no effect")
    elif cfg.ranks_per_node is not None and (cfg.ranks_per_node > world_size or world_size % cfg.ranks_per_node):
        raise ValueError(f"Invalid ranks_per_node {cfg.ranks_per_node}: the world size {world_size} must be a "
                         f"multiple of it (nodes of ranks_per_node consecutive ranks)")
    return notes


@dataclasses.dataclass(frozen=True)
class EpochBatch:
    """One epoch of the run: its global batch, accumulation steps and optimizer steps (``steps``;
    the last epoch of a fractional ``epochs`` is shortened; ``full_steps``: the epoch's whole length)."""

    global_batch_size: int
    accumulation_steps: int
    steps: int
    full_steps: int


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
    n_epochs = max(1, math.ceil(cfg.epochs))
    plan = []
    for e in range(n_epochs):
        b = sched.batch_size(e)
        accum = accumulation_steps(b, world_size, cfg.micro_batch_size)
        full = samples_per_rank // (cfg.micro_batch_size * accum)
        if full == 0:
            raise ValueError(f"global_batch_size {b} (epoch {e}) exceeds the {samples_per_rank * world_size} training "
                             f"samples that {world_size} rank(s) share: not one step per epoch; lower the batch")
        frac = cfg.epochs - e
        steps = max(1, math.ceil(frac * full)) if frac < 1 else full
        plan.append(EpochBatch(b, accum, steps, full))
    return plan

"""fastnet-train's configuration: sources and precedence, the generated command line, validation at
parse time (types, choices, ranges, NaN/inf), YAML and environment errors, resume merging."""

import subprocess
import sys

import pytest

from fastnet.config import (FIELDS, REFUSED, REPLANNED, TrainConfig, accumulation_steps, check_world, merge_resumed,
                            parse_cli, parse_overrides, resolve, resume_conflicts)
from tests.conftest import REPO, child_env

FLOAT_OPTIONS = sorted(k for k, f in FIELDS.items() if f.annotation in (float, float | None))


def test_precedence_cli_over_env_over_yaml_over_default(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("model: resnet20\nepochs: 3\nbase_lr: 0.5\n")
    env = {"FASTNET_EPOCHS": "7", "FASTNET_BASE_LR": "0.25", "FASTNET_KERNELS": "1", "PATH": "/bin"}
    cfg = resolve(str(y), parse_overrides(["--base-lr", "0.125"]), environ=env)
    assert (cfg.model, cfg.epochs, cfg.base_lr, cfg.momentum) == ("resnet20", 7.0, 0.125, FIELDS["momentum"].default)
    assert cfg.model_fields_set == {"model", "epochs", "base_lr"}  # what a resumed run takes over its checkpoint


def test_override_forms_and_types():
    o = parse_overrides(["--global-batch-size=512", "--nesterov", "--progress", "none", "--lr-milestones", "1,2.5",
                         "--data-dir", "none", "--base_lr", "0.3", "--no-overlap", "--max-steps", "None"])
    cfg = resolve(None, o, environ={})
    assert cfg.global_batch_size == 512 and cfg.nesterov is True and cfg.progress == "none"
    assert cfg.lr_milestones == (1.0, 2.5) and cfg.data_dir is None and cfg.base_lr == 0.3 and cfg.overlap is False
    assert cfg.max_steps is None
    # env strings and YAML values take the same forms; "none" stays a value where it is a choice
    cfg = resolve(None, environ={"FASTNET_LR_MILESTONES": "3 4", "FASTNET_NESTEROV": "yes",
                                 "FASTNET_WIRE_DTYPE": "none", "FASTNET_MAX_STEPS": "none"})
    assert cfg.lr_milestones == (3.0, 4.0) and cfg.nesterov and cfg.wire_dtype == "none" and cfg.max_steps is None


def test_scaled_lr_linear_rule():
    cfg = resolve(None, {"base_lr": "0.1", "global_batch_size": "8192"}, environ={})
    assert cfg.scaled_lr == pytest.approx(3.2)


@pytest.mark.parametrize("tokens,match", [
    (["--epochs", "0"], "Invalid epochs '0'.*greater than 0"),
    (["--momentum", "-1"], "Invalid momentum '-1'"),
    (["--momentum", "1"], "Invalid momentum '1'.*less than 1"),
    (["--global-batch-size", "abc"], "Invalid global_batch_size 'abc'"),
    (["--global-batch-size", "2.5"], "Invalid global_batch_size"),
    (["--device", "tpu"], "valid choices: auto, cpu, cuda"),
    (["--model", "nope"], "Invalid model 'nope'.*Unknown model 'nope'.*any torchvision classification model"),
    (["--model", "resnet19"], "close matches: resnet18"),
    (["--label-smoothing", "1.5"], "label_smoothing"),
    (["--lr-milestones", "60,30"], "lr_milestones.*increasing"),
    (["--min-loss-scale", "1e9"], "min_loss_scale 1000000000.0 exceeds init_loss_scale"),
    (["--bogus", "1"], "Unknown option.*'bogus'.*valid options:"),
    (["--sync-batchnorm"], "sync_batchnorm with overlap.*different order on each rank.*--no-overlap"),
    (["--lars-excluded-lr", "0.1"], "lars_excluded_lr 0.1 needs optimizer 'lars'"),
    (["--stop-at-target"], "stop_at_target needs target_accuracy"),
    (["--modle", "resnet20"], "'modle' \\(did you mean 'model'\\?\\)"),
    (["positional"], "Expected an option"),
])
def test_bad_values_name_the_value(tokens, match):
    with pytest.raises(ValueError, match=match):
        parse_cli(tokens)


def test_sync_batchnorm_without_overlap_is_accepted():
    cfg, _ = parse_cli(["--sync-batchnorm", "--no-overlap"])
    assert cfg.sync_batchnorm and not cfg.overlap


@pytest.mark.parametrize("key", FLOAT_OPTIONS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_option_rejects_nan_and_inf(key, value):
    with pytest.raises(ValueError, match=f"Invalid {key} '{value}'.*finite"):
        parse_cli([f"--{key.replace('_', '-')}={value}"])  # "=": argparse reads a bare "-inf" as an option
    with pytest.raises(ValueError, match=f"Invalid {key} '{value}' \\(from FASTNET_{key.upper()}\\)"):
        resolve(None, environ={f"FASTNET_{key.upper()}": value})


def test_every_option_has_help_and_the_help_is_generated(capsys):
    from fastnet.cli import main

    assert all(f.description for f in FIELDS.values())
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for key, f in FIELDS.items():
        assert f"--{key.replace('_', '-')}" in out, key
    assert "{fp32,amp,fp16,bf16}" in out and "(default: 0.9)" in out and "--no-nesterov" in out


def test_help_and_bad_options_import_no_torch():
    # (an unknown --model is the exception: torchvision's and timm's registries are looked up for it)
    code = ("import sys; from fastnet.cli import main; rc = main(['--optimizer', 'nope']); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(), capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("fastnet-train: error") == 1 and "valid choices" in res.stderr


def test_unknown_environment_variable_is_an_error_with_a_suggestion():
    with pytest.raises(ValueError, match="FASTNET_EPOCS \\(did you mean FASTNET_EPOCHS\\?\\)"):
        resolve(None, environ={"FASTNET_EPOCS": "3"})
    assert resolve(None, environ={"FASTNET_KERNELS": "1"}).epochs == FIELDS["epochs"].default  # read elsewhere


def test_yaml_errors_are_one_line_naming_file_and_line(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        resolve(str(tmp_path / "missing.yaml"), environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        resolve(str(bad), environ={})
    typo = tmp_path / "typo.yaml"
    typo.write_text("modle: resnet20\n")
    with pytest.raises(ValueError, match="'modle' \\(did you mean 'model'\\?\\).*valid options"):
        resolve(str(typo), environ={})
    syntax = tmp_path / "syntax.yaml"
    syntax.write_text("model: resnet20\nepochs: [1\n")
    with pytest.raises(ValueError) as exc:
        resolve(str(syntax), environ={})
    assert f"{syntax}:3:1:" in str(exc.value) and "\n" not in str(exc.value)
    hostile = tmp_path / "hostile.yaml"
    hostile.write_text("model: !!python/object/apply:os.system ['touch " + str(tmp_path / "pwned") + "']\n")
    with pytest.raises(ValueError, match="hostile.yaml:1:8: .*python/object.*only plain YAML"):
        resolve(str(hostile), environ={})
    assert not (tmp_path / "pwned").exists()
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("epochs: .nan\n")
    with pytest.raises(ValueError, match="Invalid epochs nan \\(from config file .*wrong.yaml\\).*finite"):
        resolve(str(wrong), environ={})


def test_cost_model_yaml_checked_at_parse_time(tmp_path):
    hostile = tmp_path / "cm.yaml"
    hostile.write_text("inter: !!python/name:os.system\n")
    with pytest.raises(ValueError, match="cost model .*cm.yaml:1:8: .*only plain YAML"):
        parse_cli(["--cost-model", str(hostile)])
    with pytest.raises(ValueError, match="cost_model .* is not a file"):
        parse_cli(["--cost-model", str(tmp_path / "none.yaml")])
    from fastnet.comm.planning.cost_model import CostModel

    with pytest.raises(ValueError, match="only plain YAML"):
        CostModel.load(hostile)


def test_shipped_configs_resolve():
    # common.yaml is merged under each study config; results.yaml is a study's record and study.yaml the
    # steps-to-target study's grid, not configs (tests/test_experiments.py resolves what that study builds)
    for y in sorted((REPO / "experiments").glob("**/*.yaml")):
        if y.name not in ("common.yaml", "results.yaml", "study.yaml"):
            resolve(str(y), environ={})


def test_choices_match_the_registries():
    from fastnet.comm.gradients.reducer import ALGORITHMS
    from fastnet.config import DATASETS, MODELS
    from fastnet.data import DATASETS as DATA_REGISTRY
    from fastnet.models import MODELS as MODEL_REGISTRY
    from fastnet.optim import OPTIMIZERS
    from fastnet.optim.schedules import SCHEDULES
    from fastnet.precision import PRECISIONS

    def choices(key):
        return set(FIELDS[key].annotation.__args__)

    assert set(MODELS) == set(MODEL_REGISTRY)  # fastnet's own; torchvision's and timm's are checked by name
    assert set(DATASETS) == choices("dataset") == set(DATA_REGISTRY)
    assert choices("optimizer") == set(OPTIMIZERS) and choices("lr_schedule") == set(SCHEDULES)
    assert choices("precision") == set(PRECISIONS) and choices("allreduce") == set(ALGORITHMS)


def test_check_world_names_ranks_per_node_and_notes_unused_options(tmp_path):
    cfg = resolve(None, {"ranks_per_node": "4", "allreduce": "hybrid"}, environ={})
    with pytest.raises(ValueError, match="Invalid ranks_per_node 4: the world size 2"):
        check_world(cfg, 2)
    assert check_world(cfg, 4) == [] and check_world(cfg, 8) == []
    (note,) = check_world(cfg, 1)
    assert "ranks_per_node" in note and "allreduce" in note and "no effect" in note


def test_resume_merge_takes_the_checkpoint_config_under_set_options():
    saved = TrainConfig(model="resnet20", epochs=2, global_batch_size=128, out_dir="runs/x").to_dict()
    saved["retired_option"] = 1  # an option of an older version is dropped
    cfg = merge_resumed(saved, resolve(None, {"epochs": "4"}, environ={}))
    assert (cfg.model, cfg.epochs, cfg.global_batch_size, cfg.out_dir) == ("resnet20", 4.0, 128, "runs/x")
    assert resume_conflicts(saved, cfg) == []
    cfg = merge_resumed(saved, resolve(None, {"model": "small_cnn", "global_batch_size": "256", "momentum": "0.5"},
                                       environ={}))
    assert resume_conflicts(saved, cfg) == ["model: 'resnet20' -> 'small_cnn'", "global_batch_size: 128 -> 256"]
    assert not set(REPLANNED) & set(REFUSED)


@pytest.mark.parametrize("b,w,m,expected", [(256, 2, 64, 2), (65536, 8, 128, 64), (96, 3, 16, 2), (64, 1, 64, 1)])
def test_accumulation_steps(b, w, m, expected):
    assert accumulation_steps(b, w, m) == expected
    assert b == w * m * accumulation_steps(b, w, m)


def test_accumulation_steps_error_names_three_numbers():
    with pytest.raises(ValueError, match=r"global_batch_size 1000 .* world_size 3 .* micro_batch_size 64"):
        accumulation_steps(1000, 3, 64)


def test_epoch_plan_constant_and_fractional():
    from fastnet.config import epoch_plan
    cfg = resolve(None, {"global_batch_size": "256", "micro_batch_size": "64", "epochs": "2.5"}, environ={})
    plan = epoch_plan(cfg, world_size=2, samples_per_rank=1000)
    assert [(e.global_batch_size, e.accumulation_steps, e.steps, e.full_steps) for e in plan] == [
        (256, 2, 7, 7), (256, 2, 7, 7), (256, 2, 4, 7)]


def test_epoch_plan_batch_increase_uses_accumulation():
    from fastnet.config import epoch_plan
    cfg = resolve(None, {"global_batch_size": "128", "micro_batch_size": "32", "epochs": "4",
                         "batch_schedule": "increase", "batch_milestones": "1,3", "batch_factor": "2"}, environ={})
    plan = epoch_plan(cfg, world_size=2, samples_per_rank=1024)
    assert [(e.global_batch_size, e.accumulation_steps, e.steps) for e in plan] == [
        (128, 2, 16), (256, 4, 8), (256, 4, 8), (512, 8, 4)]


def test_epoch_plan_errors():
    from fastnet.config import epoch_plan
    cfg = resolve(None, {"global_batch_size": "4096", "micro_batch_size": "64"}, environ={})
    with pytest.raises(ValueError, match="exceeds the 2000 training samples"):
        epoch_plan(cfg, world_size=2, samples_per_rank=1000)
    cfg = resolve(None, {"global_batch_size": "128", "micro_batch_size": "64", "batch_schedule": "increase",
                         "batch_milestones": "1", "batch_factor": "1.5"}, environ={})
    with pytest.raises(ValueError, match="global_batch_size 192 is not divisible"):
        epoch_plan(cfg, world_size=2, samples_per_rank=10000)


def test_print_config_shows_derived_numbers(capsys, monkeypatch):
    import yaml

    from fastnet.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["--print-config", "--global-batch-size", "128", "--micro-batch-size", "32", "--epochs", "2",
                 "--warmup-epochs", "1"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert doc["global_batch_size"] == 128
    # digits: 1438 training images; 2 ranks x 32 x 2 accumulation steps = 128 -> 11 steps per epoch
    assert doc["derived"] == {"world_size": 2, "train_samples": 1438, "accumulation_steps": 2, "steps_per_epoch": 11,
                              "total_steps": 22, "stop_step": 22, "peak_lr": 0.05, "warmup_steps": 11}

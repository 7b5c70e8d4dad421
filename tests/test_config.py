import pytest

from fastnet.config import TrainConfig, accumulation_steps, parse_overrides, resolve


def test_precedence_cli_over_env_over_yaml_over_default(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("model: resnet20\nepochs: 3\nbase_lr: 0.5\n")
    env = {"FASTNET_EPOCHS": "7", "FASTNET_BASE_LR": "0.25", "FASTNET_UNRELATED": "x"}
    cfg = resolve(str(y), parse_overrides(["--base-lr", "0.125"]), environ=env)
    assert (cfg.model, cfg.epochs, cfg.base_lr, cfg.momentum) == ("resnet20", 7.0, 0.125, TrainConfig.momentum)


def test_override_forms_and_types():
    o = parse_overrides(["--global-batch-size=512", "--nesterov", "--no-progress", "--lr-milestones", "1,2.5",
                         "--data-dir", "none"])
    cfg = resolve(None, o, environ={})
    assert cfg.global_batch_size == 512 and cfg.nesterov is True and cfg.progress is False
    assert cfg.lr_milestones == (1.0, 2.5) and cfg.data_dir is None


def test_scaled_lr_linear_rule():
    cfg = resolve(None, {"base_lr": "0.1", "global_batch_size": "8192"}, environ={})
    assert cfg.scaled_lr == pytest.approx(3.2)


@pytest.mark.parametrize("tokens,match", [
    (["--epochs", "0"], "Invalid epochs: 0"),
    (["--momentum", "-1"], "Invalid momentum: -1"),
    (["--global-batch-size", "abc"], "global_batch_size"),
    (["--device", "tpu"], "valid choices: auto, cpu, cuda"),
    (["--label-smoothing", "1.5"], "label_smoothing"),
    (["--bogus", "1"], "valid options:"),
    (["positional"], "Expected an option"),
])
def test_bad_values_name_the_value(tokens, match):
    with pytest.raises(ValueError, match=match):
        resolve(None, parse_overrides(tokens), environ={})


def test_yaml_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        resolve(str(tmp_path / "missing.yaml"), environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        resolve(str(bad), environ={})
    typo = tmp_path / "typo.yaml"
    typo.write_text("modle: resnet20\n")
    with pytest.raises(ValueError, match="'modle'.*valid options"):
        resolve(str(typo), environ={})


def test_shipped_configs_resolve():
    from pathlib import Path
    for y in sorted((Path(__file__).parents[1] / "experiments").glob("*.yaml")):
        resolve(str(y), environ={})


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
    assert [(e.global_batch_size, e.accumulation_steps, e.steps) for e in plan] == [(256, 2, 7), (256, 2, 7),
                                                                                    (256, 2, 4)]


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

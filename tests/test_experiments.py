"""The experiment configs: each resolves, names its source, derives its accumulation for the paper's
world size, and (paper configs) starts and steps on synthetic ImageNet-shaped data on CPU."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from fastnet.config import accumulation_steps, parse_cli
from tests.conftest import REPO, run_trainer

PAPER = sorted((REPO / "experiments" / "paper").glob("*.yaml"))
CIFAR = REPO / "experiments" / "cifar10_large_batch"
# (config, a world size of the paper's cluster, its micro-steps per optimizer step)
PAPER_SCALE = {"resnet50_imagenet_64k_jia2018": (2048, 1), "alexnet_bn_imagenet_64k_jia2018": (1024, 1),
               "resnet50_imagenet_32k_you2018": (1024, 1), "resnet50_imagenet_8k_goyal2017": (256, 1)}


def test_every_paper_config_is_listed():
    assert {p.stem for p in PAPER} == set(PAPER_SCALE)


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_config_resolves(path):
    text = path.read_text()
    assert "Source:" in text  # every config names its paper
    cfg, _ = parse_cli(["--config", str(path)])
    world, accum = PAPER_SCALE[path.stem]
    assert accumulation_steps(cfg.global_batch_size, world, cfg.micro_batch_size) == accum
    assert accumulation_steps(cfg.global_batch_size, 8, cfg.micro_batch_size) == cfg.global_batch_size // (8 * cfg.micro_batch_size)
    with pytest.raises(ValueError, match="is not divisible by world_size 3"):
        accumulation_steps(cfg.global_batch_size, 3, cfg.micro_batch_size)


@pytest.mark.slow
@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_config_starts_on_synthetic_imagenet(path, tmp_path):
    # The paper's config (its precision, all-reduce, wire dtype, optimizer) with only the data and the batch
    # shrunk: 2 ranks x micro-batch 2 x 2 accumulation steps, 64-pixel ImageNet-like images (FP16 convolutions
    # are emulated on this CPU, so 224 pixels would take minutes per config).
    res = run_trainer(["--config", str(path), "--dataset", "synthetic", "--image-size", "64", "--num-classes", "1000",
                       "--synthetic-samples", "16", "--global-batch-size", "8", "--micro-batch-size", "2",
                       "--max-steps", "2", "--eval-batch-size", "4", "--workers", "0", "--progress", "none",
                       "--timeout-s", "120", "--out-dir", str(tmp_path)], nproc=2, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    (summary,) = [r for r in records if r["kind"] == "summary"]
    assert summary["steps"] == 2 and summary["accumulation_steps"] == 2 and summary["world_size"] == 2
    assert len(set(summary["param_checksums"])) == 1
    resolved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert resolved["model"] == yaml.safe_load(path.read_text())["model"] and resolved["buckets"]


def _cifar_module(name: str):
    """``run`` or ``summarize`` from experiments/cifar10_large_batch/ (not a package)."""
    import importlib

    sys.path.insert(0, str(CIFAR))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(CIFAR))


@pytest.mark.parametrize("name", ["b256_sgd", "b2048_sgd", "b4096_sgd", "b8192_sgd", "b2048_lars", "b4096_lars",
                                  "b8192_lars"])
def test_cifar10_study_configs_resolve(name, tmp_path):
    study = _cifar_module("run")
    cfg = study.config_for(name, {"data_dir": str(tmp_path)})
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    resolved, _ = parse_cli(["--config", str(cfg_path)])
    assert resolved.model == "resnet20" and resolved.precision == "fp16" and resolved.epochs == 30
    assert accumulation_steps(resolved.global_batch_size, 2, resolved.micro_batch_size) == resolved.global_batch_size // 256


@pytest.mark.slow
def test_cifar10_study_skips_finished_runs_and_resumes_interrupted_ones(tmp_path):
    """run.py is resumable per run, so a study can span sessions."""
    import subprocess

    from tests.conftest import child_env

    out = tmp_path / "study"
    cmd = [sys.executable, str(CIFAR / "run.py"), "--synthetic", "--runs", "b256_sgd", "--nproc", "1", "--out",
           str(out), "--set", "precision=fp32", "global_batch_size=32", "micro_batch_size=32", "eval_batch_size=256",
           "checkpoint_interval=1", "model=small_cnn"]

    def study(max_steps: int) -> subprocess.CompletedProcess:
        res = subprocess.run([*cmd, f"max_steps={max_steps}"], cwd=REPO, env=child_env(), capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        return res

    study(1)
    metrics = out / "b256_sgd_s0" / "metrics.jsonl"
    assert "finished earlier, skipped" in study(1).stderr  # a finished run is not run again
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(l for l in lines if '"kind": "summary"' not in l) + "\n")  # interrupted
    res = study(2)
    assert "resuming from its checkpoint" in res.stderr
    summaries = [json.loads(l) for l in metrics.read_text().splitlines() if '"kind": "summary"' in l]
    assert [s["steps"] for s in summaries] == [2]
    assert "| b256_sgd | 32 | sgd |" in res.stdout
    # the finished run is refused, not reported, under other settings (a per-run override here)
    res = subprocess.run([*cmd, "max_steps=2", "b256_sgd.base_lr=0.05"], cwd=REPO, env=child_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "finished with other settings (base_lr: 0.1 there, 0.05 asked)" in res.stderr
    # the training curves of the finished study (skipped runs: read from their metrics.jsonl)
    curves = tmp_path / "curves.png"
    res = subprocess.run([*cmd, "max_steps=2", "--curves", str(curves)], cwd=REPO, env=child_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"Training curves: `{curves}`" in res.stdout


def test_cifar10_study_overrides_for_every_run_and_per_run():
    study = _cifar_module("run")
    common, per_run = study.split_overrides(["epochs=3", "b8192_lars.base_lr=0.08", "b8192_sgd.base_lr=0.025"],
                                            ["b8192_sgd", "b8192_lars"])
    assert common == {"epochs": 3}
    assert per_run == {"b8192_lars": {"base_lr": 0.08}, "b8192_sgd": {"base_lr": 0.025}}
    with pytest.raises(SystemExit, match=r"'b4096_lars' is not a run of this call; runs: b8192_sgd, b8192_lars"):
        study.split_overrides(["b4096_lars.base_lr=0.1"], ["b8192_sgd", "b8192_lars"])
    with pytest.raises(SystemExit, match="expected KEY=VALUE"):
        study.split_overrides(["epochs"], ["b8192_sgd"])


def test_cifar10_study_settings_differ_ignores_bookkeeping_only():
    study = _cifar_module("run")
    rec = {"base_lr": 0.1, "epochs": 15, "out_dir": "a", "data_dir": "/x", "workers": 0, "resume": "auto"}
    assert study.settings_differ({**rec, "out_dir": "b", "data_dir": "data/y", "workers": 2}, rec) == []
    assert study.settings_differ({**rec, "base_lr": 0.08, "seed": 1}, rec) == [
        "base_lr: 0.1 there, 0.08 asked", "seed: '(unset)' there, 1 asked"]


def test_cifar10_record_rows_come_from_finished_runs_and_plot(tmp_path):
    """summarize.py: rows read from a run directory (not typed), unfinished and repeated runs refused,
    the shipped record well-formed, the plot written."""
    summarize = _cifar_module("summarize")
    run = tmp_path / "b4096_lars_s1"
    run.mkdir()
    (run / "study.yaml").write_text(yaml.safe_dump({"global_batch_size": 4096, "optimizer": "lars", "base_lr": 0.3,
                                                    "reference_batch_size": 128, "epochs": 15, "seed": 1,
                                                    "precision": "fp32"}))
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "epoch", "epoch": 0, "top1": 20.0}) + "\n")
    record = tmp_path / "results.yaml"
    record.write_text("# a comment that stays\n")
    with pytest.raises(SystemExit, match="has not finished"):
        summarize.main(["record", str(run), "--series", "rule", "--record", str(record)])
    summary = {"kind": "summary", "best_top1": 50.5, "test_top1": 49.75, "steps": 150, "mean_images_per_s": 400.4,
               "wall_s": 1800.2}
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(summary) + "\n")
    summarize.main(["record", str(run), "--series", "rule", "--note", "test", "--record", str(record),
                    "--metrics-dir", str(tmp_path / "kept")])
    rows = summarize.load(record)
    assert record.read_text().startswith("# a comment that stays\n")
    assert rows == [{**rows[0], "run": "b4096_lars", "global_batch": 4096, "peak_lr": 9.6, "seed": 1,
                     "val_top1": 50.5, "test_top1": 49.75, "images_per_s": 400, "series": "rule"}]
    assert (tmp_path / "kept" / "cpu_b4096_lars_lr9.6_e15_s1.jsonl").read_text() == (run / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit, match="already in"):
        summarize.main(["record", str(run), "--series", "rule", "--record", str(record)])
    shipped = summarize.load()
    keys = {"run", "profile", "series", "global_batch", "optimizer", "peak_lr", "epochs", "steps", "seed",
            "precision", "val_top1", "test_top1", "source"}
    assert shipped and all(keys <= set(r) and r["series"] in summarize.SERIES for r in shipped)
    png = tmp_path / "acc.png"
    summarize.main(["plot", "--out", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- the steps-to-target study (experiments/cifar10_steps_to_target) ------------------------------
STEPS = REPO / "experiments" / "cifar10_steps_to_target"


def _steps_study():
    import importlib.util

    spec = importlib.util.spec_from_file_location("steps_to_target_study", STEPS / "study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("batch", [256, 512, 1024, 2048, 4096, 8192])
def test_steps_study_configs_resolve(batch, tmp_path):
    study = _steps_study()
    cfg = study.train_config(batch, "lars", 2.0, 1, study.study_settings(), str(tmp_path))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    resolved, _ = parse_cli(["--config", str(path)])
    assert resolved.global_batch_size == batch and resolved.scaled_lr == pytest.approx(2.0)  # the peak LR asked
    assert resolved.stop_at_target and resolved.target_accuracy == study.study_settings()["target_accuracy"]
    steps_per_epoch = study.TRAIN_IMAGES // batch
    assert resolved.eval_every_steps == -(-steps_per_epoch // 4)  # four evaluations per epoch
    with pytest.raises(SystemExit, match="no budget for global batch 384"):
        study.train_config(384, "sgd", 0.1, 0, study.study_settings(), None)


def _row(batch, opt, lr, seed, curve, status="reached", target=60.0):
    return {"run": f"b{batch}_{opt}_lr{lr}_s{seed}", "global_batch": batch, "optimizer": opt, "peak_lr": lr,
            "seed": seed, "target_accuracy": target, "status": status, "budget_steps": 100, "val_curve": curve,
            "steps_to_target": None, "epochs_to_target": None, "best_val_top1": max((t for _, t in curve), default=0),
            "wall_s": 1}


def test_steps_study_reads_steps_to_target_from_the_curves_and_picks_the_best_lr():
    study = _steps_study()
    rows = [
        _row(256, "sgd", 0.1, 0, [[10, 40.0], [20, 61.0], [30, 66.0]], target=65.0),  # higher target: usable
        _row(256, "sgd", 0.1, 1, [[10, 50.0], [20, 58.0], [40, 60.5]]),
        _row(256, "sgd", 0.2, 0, [[10, 60.0]], target=55.0),  # stopped at a lower target: not usable
        _row(256, "sgd", 0.4, 0, [[10, 20.0]], status="diverged"),
        _row(4096, "lars", 8.0, 0, [[5, 30.0], [10, 50.0]], status="budget"),
    ]
    got = {r["run"]: r for r in study.usable(rows, 60.0)}
    assert "b256_sgd_lr0.2_s0" not in got
    assert got["b256_sgd_lr0.1_s0"]["steps_to_target"] == 20 and got["b256_sgd_lr0.1_s1"]["steps_to_target"] == 40
    assert got["b256_sgd_lr0.1_s0"]["epochs_to_target"] == pytest.approx(20 * 256 / 45000, abs=1e-3)
    assert got["b256_sgd_lr0.4_s0"]["status"] == "diverged" and got["b4096_lars_lr8.0_s0"]["status"] == "budget"
    best = study.best_per_batch(list(got.values()))
    assert best[(256, "sgd")]["peak_lr"] == 0.1 and best[(256, "sgd")]["median_steps"] == 30  # median of 20, 40
    lines = study.table_lines(list(got.values()))
    assert lines[0] == "| global batch | optimizer | peak LR | seeds | steps to target | epochs to target |"
    assert "| 256 | sgd | 0.1 | 2 | 30 |" in lines[2]
    assert lines[3].startswith("| 4096 | lars | 8 | 1 | not reached in 100 |")
    # a LARS run with its own excluded-tensor LR is another configuration of the same optimizer
    own = {**_row(4096, "lars", 8.0, 0, [[5, 30.0], [10, 61.0]]), "lars_excluded_lr": 1.6,
           "run": study.run_key(4096, "lars", 8.0, 0, 1.6)}
    assert own["run"] == "b4096_lars_lr8_ex1.6_s0"
    lines = study.table_lines(study.usable(rows + [own], 60.0))
    assert lines[3].startswith("| 4096 | lars | 8 (excluded 1.6) | 1 | 10 |")
    # the LR is chosen on the sweep's seed: the best one's second seed (60 steps) does not hand the batch
    # to a runner-up with one seed (25 on seed 0 against 10), and its median over both seeds is reported
    more = [_row(512, "sgd", 0.2, 0, [[10, 61.0]]), _row(512, "sgd", 0.2, 1, [[60, 61.0]]),
            _row(512, "sgd", 0.4, 0, [[25, 61.0]])]
    best = study.best_per_batch(study.usable(more, 60.0))
    assert best[(512, "sgd")]["peak_lr"] == 0.2 and best[(512, "sgd")]["median_steps"] == 35
    cfg = study.train_config(4096, "lars", 8.0, 0, study.study_settings(), None, 1.6)
    assert cfg["lars_excluded_lr"] == 1.6 and "lars_excluded_lr" not in study.train_config(
        4096, "lars", 8.0, 0, study.study_settings(), None)


@pytest.mark.slow
def test_steps_study_run_stops_at_the_target_and_records_divergence(tmp_path):
    """run_one on the digits data: stops at the first evaluation at the target; a NaN run is 'diverged'."""
    study = _steps_study()
    base = {"dataset": "digits", "model": "small_cnn", "workers": 0, "val_samples": 300, "global_batch_size": 64,
            "micro_batch_size": 32, "epochs": 8, "base_lr": 0.1, "eval_every_steps": 5, "target_accuracy": 50.0,
            "stop_at_target": True, "precision": "fp32", "log_interval": 5}
    summary, records, status = study.run_one(base, tmp_path / "ok")
    assert status == "reached"
    first = next(step for step, top1 in study.curve(records) if top1 >= 50.0)
    assert summary["steps_to_target"] == first == summary["steps"]  # stopped right there
    summary, _, status = study.run_one({**base, "base_lr": 1e6, "target_accuracy": 99.9}, tmp_path / "nan")
    assert summary is None and status == "diverged"


def test_steps_study_plot_draws_both_optimizers(tmp_path, monkeypatch):
    study = _steps_study()
    rows = [_row(b, opt, 0.1, 0, [[steps, 61.0]]) for opt, pts in
            (("sgd", [(256, 800), (512, 420), (1024, 260)]), ("lars", [(256, 900), (512, 480)])) for b, steps in pts]
    monkeypatch.setattr(study, "RESULTS", tmp_path / "results.yaml")
    (tmp_path / "results.yaml").write_text(yaml.safe_dump(rows))
    out = tmp_path / "plot.png"
    study.main(["plot", "--out", str(out)])
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"


def test_steps_study_summarizes_the_measured_noise_scale():
    study = _steps_study()
    rows = [{**_row(512, "sgd", 0.2, 0, [[10, 61.0]]), "noise_scale_curve": [[20, 300.0], [200, 900.0]]},
            {**_row(1024, "lars", 2.0, 0, [[10, 61.0]]), "noise_scale_curve": [[20, 500.0], [100, 1100.0]]},
            _row(256, "sgd", 0.1, 0, [[10, 61.0]])]  # no accumulation: nothing measured
    lines = study.noise_lines(rows)
    assert "| b512_sgd_lr0.2_s0 | 300 (20) | 900 (200) |" in lines
    assert lines[-1].startswith("B_noise ≈ 400 at the start and ≈ 1000 near the target (medians over 2 runs)")

"""--tensorboard and fastnet-plot on a short real run: the event file reads back with TensorBoard's
own reader, and the PNG of two overlaid runs is written and non-empty."""

from __future__ import annotations

import pytest

from fastnet.plot import main as plot_main
from tests.conftest import FAST, run_trainer


@pytest.mark.slow
def test_tensorboard_events_and_the_plot_of_a_short_run(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = []
    for name, batch in (("a", "64"), ("b", "128")):
        out = tmp_path / name
        res = run_trainer([*FAST, "--global-batch-size", batch, "--micro-batch-size", "32", "--epochs", "1",
                           "--log-interval", "2", "--tensorboard", "--out-dir", str(out)])
        assert res.returncode == 0, res.stderr
        runs.append(out)
    events = EventAccumulator(str(runs[0] / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("step/train_loss", "step/lr", "step/loss_scale", "step/images_per_s", "step/comm_s",
                "step/grad_noise_scale", "epoch/top1", "epoch/top5"):
        assert tag in tags, (tag, sorted(tags))
    loss = events.Scalars("step/train_loss")
    assert len(loss) >= 5 and loss[0].step == 2 and loss[-1].value < loss[0].value  # 11 steps at batch 128
    png = tmp_path / "curves.png"
    assert plot_main([str(r) for r in runs] + ["--out", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 20_000


def test_plot_names_a_directory_without_metrics(tmp_path, capsys):
    assert plot_main([str(tmp_path)]) == 2
    assert "holds no metrics.jsonl" in capsys.readouterr().err

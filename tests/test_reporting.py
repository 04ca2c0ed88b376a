"""Logging through the 'metaxl' logger and --report-to tensorboard (event files read back)."""

from __future__ import annotations

import logging

import pytest

from metaxl.cli import main
from metaxl.config import TrainConfig
from metaxl.errors import ConfigError


def _args(toy_data, tiny_model, out, *extra):
    return ["train", "--target", str(toy_data / "ner-tgt"), "--source", str(toy_data / "ner-src"),
            "--model", str(tiny_model), "--epochs", "2", "--batch-size", "8", "--target-size", "16",
            "--source-size", "24", "--lr", "5e-4", "--meta-lr", "1e-3", "--rtn-hidden", "8", "--max-length", "32",
            "--no-progress", "--device", "cpu", "--output-dir", str(out), "--method", "metaxl", *extra]


@pytest.fixture(autouse=True)
def _reset_logger():
    yield
    log = logging.getLogger("metaxl")
    for h in list(log.handlers):
        log.removeHandler(h)
    log.setLevel(logging.NOTSET)
    log.propagate = True


def test_logging_levels_on_the_command_line(toy_data, tiny_model, tmp_path, capsys):
    assert main(_args(toy_data, tiny_model, tmp_path / "a", "--epochs", "1")) == 0
    out = capsys.readouterr().out
    assert "epoch 1/1: loss" in out and "test f1" in out and "steps per epoch" not in out  # default: no debug
    assert main(["-v", *_args(toy_data, tiny_model, tmp_path / "b", "--epochs", "1")]) == 0
    out = capsys.readouterr().out
    assert "steps per epoch" in out and "epoch 1/1: loss" in out
    assert main(["-q", *_args(toy_data, tiny_model, tmp_path / "c", "--epochs", "1")]) == 0
    out = capsys.readouterr().out
    assert "epoch 1/1" not in out and "best epoch 1" in out  # the result lines remain
    assert main(["-q", *_args(toy_data, tiny_model, tmp_path / "d", "--epochs", "1", "--output-dir", "none")]) == 0
    assert "nothing was written" in capsys.readouterr().out and not (tmp_path / "d").exists()


def test_report_to_is_checked():
    with pytest.raises(ConfigError, match="choose one of: tensorboard"):
        TrainConfig(report_to=["wandb"]).validate()
    assert TrainConfig(report_to="tensorboard").report_to == ["tensorboard"]  # type: ignore[arg-type]
    assert TrainConfig.from_dict({"report_to": "tensorboard"}).report_to == ["tensorboard"]
    with pytest.raises(SystemExit):
        main(["train", "--report-to", "wandb"])


def test_tensorboard_events_hold_steps_and_epochs(toy_data, tiny_model, tmp_path, capsys):
    pytest.importorskip("tensorboard", reason="tensorboard not installed (pip install 'metaxl[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(_args(toy_data, tiny_model, out, "--report-to", "tensorboard", "--head-lr", "1e-3")) == 0
    assert "tensorboard: event files in" in capsys.readouterr().out
    acc = EventAccumulator(str(out))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    step_tags = {"train/loss", "train/meta_loss", "train/hypergrad_norm", "lr/encoder", "lr/head", "lr/rtn"}
    assert step_tags <= tags, tags
    assert {"dev/f1", "dev/precision", "dev/recall", "epoch/train_loss", "test/f1"} <= tags, tags
    import json

    results = json.loads((out / "results.json").read_text())
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 7))  # 3 steps x 2 epochs
    assert [e.step for e in acc.Scalars("dev/f1")] == [1, 2]
    assert [round(e.value, 4) for e in acc.Scalars("dev/f1")] == [round(e["dev"]["f1"], 4) for e in results["epochs"]]
    assert acc.Scalars("test/f1")[0].value == pytest.approx(results["test"]["f1"])
    head, enc = acc.Scalars("lr/head"), acc.Scalars("lr/encoder")
    assert head[0].value == pytest.approx(2 * enc[0].value) and enc[0].value > 0  # head_lr 1e-3, lr 5e-4
    losses = [e.value for e in acc.Scalars("epoch/train_loss")]
    assert losses == pytest.approx([e["train_loss"] for e in results["epochs"]])

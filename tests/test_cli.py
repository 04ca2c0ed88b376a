"""The command line's argument checks: enumerated choices, devices, negative numbers."""

from __future__ import annotations

import pytest

from metaxl.cli import build_parser, main
from metaxl.config import CHOICES, TrainConfig


def _train_help(capsys) -> str:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    return capsys.readouterr().out


def test_every_enumerated_option_lists_its_choices_in_help(capsys):
    text = " ".join(_train_help(capsys).split())
    for name, values in CHOICES.items():
        assert f"--{name.replace('_', '-')} {{{','.join(values)}}}" in text, name
    assert "--device {auto,cpu,cuda,cuda:N,mps}" in text
    assert set(CHOICES) >= {"method", "precision", "rtn_variant", "hypergrad", "meta_batch", "task", "sa_labels"}
    for name, values in CHOICES.items():  # every value is one TrainConfig.validate accepts
        for value in values:
            TrainConfig(**{name: value, "source": ["x"]}).replace(rtn_layers=[-1])


@pytest.mark.parametrize("flag,bad", [(f"--{n.replace('_', '-')}", "nope") for n in CHOICES] + [("--device", "gpu")])
def test_a_wrong_choice_is_rejected_by_argparse_naming_the_choices(capsys, flag, bad):
    with pytest.raises(SystemExit) as exc:
        main(["train", flag, bad, "--print-config"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and repr(bad) in err
    name = flag[2:].replace("-", "_")
    for value in CHOICES.get(name, ("auto", "cpu", "cuda:N")):
        assert value in err


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_device_takes_indexed_cuda_devices(device):
    args = build_parser().parse_args(["train", "--device", device])
    assert args.device == device
    for cmd in (["evaluate", "ckpt", "data"], ["predict", "ckpt"]):
        assert build_parser().parse_args([*cmd, "--device", device]).device == device


@pytest.mark.parametrize("value", ["-1e-4", "-3", "-.5", "-0.25"])
def test_negative_numbers_parse_and_validation_rejects_them(capsys, value):
    args = build_parser().parse_args(["train", "--lr", value, "--head-lr", value])
    assert args.lr == float(value) and args.head_lr == float(value)
    assert main(["train", "--lr", value, "--print-config"]) == 2
    assert "lr must be > 0" in capsys.readouterr().err

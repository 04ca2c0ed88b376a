"""Divergence, disk errors, closed pipes and suspicious inputs: one clear line, valid files."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from metaxl.cli import main
from metaxl.config import TrainConfig
from metaxl.errors import MetaXLError
from metaxl.guards import DiskError, check_output_dir
from metaxl.train import train


def _cfg(toy_data: Path, tiny_model: Path, out: Path, method: str = "jt", **kw: Any) -> TrainConfig:
    base = dict(target=str(toy_data / "ner-tgt"), source=[str(toy_data / "ner-src")], model=str(tiny_model),
                method=method, epochs=3, batch_size=8, target_size=16, source_size=24, lr=5e-4, meta_lr=1e-3,
                rtn_hidden=8, max_length=32, output_dir=str(out), progress=False, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def _argv(cfg: TrainConfig) -> list[str]:
    argv = ["train"]
    for key, value in cfg.to_dict().items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            argv += [flag, ",".join(map(str, value))]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def _strict(path: Path) -> Any:
    def bare(name: str) -> None:
        raise AssertionError(f"bare {name} in {path}")

    return json.loads(path.read_text(), parse_constant=bare)


def _nan_at_step(monkeypatch: Any, n: int) -> None:
    """The n-th training step (counted over the run) reports a NaN loss after its update."""
    from metaxl.meta import Learner, StepStats

    real = Learner.step
    calls = {"n": 0}

    def step(self: Any, *a: Any, **k: Any) -> Any:
        stats = real(self, *a, **k)
        calls["n"] += 1
        return StepStats(loss=float("nan"), meta_loss=float("nan")) if calls["n"] == n else stats

    monkeypatch.setattr(Learner, "step", step)


# ---------------------------------------------------------------------------- divergence
def test_a_nan_loss_stops_the_run_failed_with_the_best_checkpoint_kept(toy_data, tiny_model, tmp_path, monkeypatch,
                                                                         capsys):
    _nan_at_step(monkeypatch, 7)  # 3 steps an epoch: epoch 3, step 1
    cfg = _cfg(toy_data, tiny_model, tmp_path / "run")
    rc = main(_argv(cfg) + ["--resume"])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("metaxl: error:")]
    assert rc == 2 and "Traceback" not in err and len(lines) == 1
    assert "diverged at epoch 3, step 1: the training loss is nan" in lines[0] and "--lr" in lines[0]
    res = _strict(tmp_path / "run" / "results.json")
    assert res["status"] == "failed" and res["error"] in lines[0]
    assert [e["epoch"] for e in res["epochs"]] == [1, 2] and res["best_epoch"] in (1, 2)
    assert res["test"] is not None and res["checkpoint"] == "checkpoint"
    meta = json.loads((tmp_path / "run" / "checkpoint" / "metaxl.json").read_text())
    assert meta["epoch"] == res["best_epoch"]
    assert (tmp_path / "run" / "train_state" / "state.pt").is_file()  # kept: resume with --on-nonfinite skip


def test_a_nonfinite_hypergradient_stops_the_run(toy_data, tiny_model, tmp_path, monkeypatch):
    from metaxl.meta import Learner

    real = Learner._hypergradient

    def nan_hypergradient(self: Any, *a: Any, **k: Any) -> Any:
        phi_grads, meta_loss, g_tgt, loss_t = real(self, *a, **k)
        return [g * float("nan") for g in phi_grads], meta_loss, g_tgt, loss_t

    monkeypatch.setattr(Learner, "_hypergradient", nan_hypergradient)
    with pytest.raises(MetaXLError, match=r"epoch 1, step 1: the hypergradient .*--meta-lr"):
        train(_cfg(toy_data, tiny_model, tmp_path / "run", "metaxl"), log=lambda *_: None)
    res = _strict(tmp_path / "run" / "results.json")
    assert res["status"] == "failed" and "hypergradient" in res["error"] and res["epochs"] == []


def test_exploded_weights_after_one_step_fail_the_run(toy_data, tiny_model, tmp_path):
    cfg = _cfg(toy_data, tiny_model, tmp_path / "run", epochs=1, source_size=8, lr=1e30)
    with pytest.raises(MetaXLError, match="epoch 1, step 1: the weights exploded"):
        train(cfg, log=lambda *_: None)
    res = _strict(tmp_path / "run" / "results.json")
    assert res["status"] == "failed" and res["checkpoint"] is None
    assert not (tmp_path / "run" / "checkpoint").exists()


@pytest.mark.parametrize("method", ["jt", "metaxl"])
def test_the_weight_guard_scans_what_a_step_changes_and_not_the_frozen_embeddings(toy_data, tiny_model, tmp_path,
                                                                                  monkeypatch, method):
    """After each step the guard reads the trained weights (theta, the RTN) once; frozen ones (the
    word embeddings under --freeze-embeddings, most of e5-small's weights) cannot change and are not
    scanned (on the CPU that scan cost ~0.3 s a step)."""
    import metaxl.guards as guards

    seen: list[list[torch.Tensor]] = []
    real = guards.weight_problem
    monkeypatch.setattr(guards, "weight_problem", lambda params: seen.append(list(params)) or real(params))
    captured: dict[str, Any] = {}
    cfg = _cfg(toy_data, tiny_model, tmp_path / "run", method=method, epochs=1, source_size=16, freeze_embeddings=True)
    train(cfg, log=lambda *_: None, on_setup=lambda model, learner: captured.update(model=model, learner=learner))
    model, learner = captured["model"], captured["learner"]
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    assert frozen and id(model.get_input_embeddings().weight) in frozen
    trained = {id(p) for p in model.parameters() if p.requires_grad} | {id(p) for p in learner.phi}
    assert seen and all({id(p) for p in params} == trained for params in seen)
    assert (method == "metaxl") == bool(learner.phi)


def test_on_nonfinite_skip_undoes_the_step_and_counts_it(toy_data, tiny_model, tmp_path, monkeypatch):
    _nan_at_step(monkeypatch, 2)
    logs: list[str] = []
    res = train(_cfg(toy_data, tiny_model, tmp_path / "run", epochs=2, on_nonfinite="skip"), log=logs.append)
    assert res["status"] == "finished" and res["nonfinite_skips"] == 1
    assert [e["nonfinite_skips"] for e in res["epochs"]] == [1, 0]
    assert any("warning: step skipped" in m and "epoch 1, step 2" in m for m in logs)
    assert _strict(tmp_path / "run" / "results.json")["nonfinite_skips"] == 1


def test_skip_restores_weights_and_optimiser_exactly(tiny_model):
    from metaxl.guards import StepUndo
    from metaxl.models import load_model

    model = load_model(str(tiny_model), "ner", ["O", "B-PER", "I-PER"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.tensor([[2, 10, 11, 3]])
    model(input_ids=ids, labels=torch.tensor([[0, 1, 2, 0]])).loss.backward()
    opt.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    undo = StepUndo.take([model], [opt])
    model(input_ids=ids, labels=torch.tensor([[0, 1, 2, 0]])).loss.backward()
    opt.step()
    undo.restore()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert opt.state_dict()["state"][0]["step"] == 1


# ---------------------------------------------------------------------------- disks and folders
def _fail_fsync_under(monkeypatch: Any, marker: str) -> None:
    import metaxl.guards as guards
    import metaxl.train as tr

    real = os.fsync

    def fsync(fd: int) -> None:
        if marker in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(guards.os, "fsync", fsync)
    monkeypatch.setattr(tr.os, "fsync", fsync)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to tell which file is synced")
def test_disk_full_at_checkpoint_time_keeps_the_previous_checkpoint(toy_data, tiny_model, tmp_path, monkeypatch):
    cfg = _cfg(toy_data, tiny_model, tmp_path / "run", epochs=1)
    train(cfg, log=lambda *_: None)
    ckpt = tmp_path / "run" / "checkpoint"
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    _fail_fsync_under(monkeypatch, "checkpoint.tmp")
    with pytest.raises(DiskError, match="checkpoint: no space left on the device while writing the checkpoint"):
        train(cfg.replace(seed=5), log=lambda *_: None)
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    assert not (tmp_path / "run" / "checkpoint.tmp").exists() and not (tmp_path / "run" / "checkpoint.old").exists()
    res = _strict(tmp_path / "run" / "results.json")
    assert res["status"] == "failed" and "no space left" in res["error"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to tell which file is synced")
def test_disk_full_while_saving_the_state_fails_cleanly(toy_data, tiny_model, tmp_path, monkeypatch):
    _fail_fsync_under(monkeypatch, "state.pt.tmp")
    with pytest.raises(DiskError, match="state.pt: no space left"):
        train(_cfg(toy_data, tiny_model, tmp_path / "run", epochs=2), resume=True, log=lambda *_: None)
    assert not list((tmp_path / "run").rglob("*.tmp"))
    assert _strict(tmp_path / "run" / "results.json")["status"] == "failed"


def test_too_little_free_space_fails_before_anything_is_written(toy_data, tiny_model, tmp_path, monkeypatch):
    import shutil as sh

    import metaxl.guards as guards

    monkeypatch.setattr(guards.shutil, "disk_usage", lambda _p: sh._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(DiskError, match="needs about .* but only 1 KiB is free"):
        train(_cfg(toy_data, tiny_model, tmp_path / "run"), resume=True, log=lambda *_: None)
    assert not (tmp_path / "run").exists()


def test_output_folder_checks(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DiskError, match="is a file"):
        check_output_dir(tmp_path / "file" / "run")
    monkeypatch.setattr(os, "access", lambda *_a: False)
    with pytest.raises(DiskError, match="is not writable"):
        check_output_dir(tmp_path / "new" / "run")


def test_results_json_never_holds_a_bare_nan(tmp_path):
    from metaxl.train import write_json

    write_json(tmp_path / "r.json", {"loss": float("nan"), "rows": [{"x": float("-inf")}], "ok": 1.5})
    assert _strict(tmp_path / "r.json") == {"loss": None, "rows": [{"x": None}], "ok": 1.5}


# ---------------------------------------------------------------------------- pipes, checkpoints, long inputs
class _ClosedPipe:
    """stdout whose reader went away (``| head -1`` after its line)."""

    def __init__(self, fd: int) -> None:
        self.fd, self.lines = fd, 0

    def write(self, text: str) -> int:
        if self.lines >= 1:
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")
        self.lines += text.count("\n")
        return len(text)

    def flush(self) -> None:
        if self.lines > 1:
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    def fileno(self) -> int:
        return self.fd

    def isatty(self) -> bool:
        return False


def test_train_piped_into_head_finishes_the_run(toy_data, tiny_model, tmp_path, monkeypatch):
    import sys

    fd = os.open(tmp_path / "stdout", os.O_WRONLY | os.O_CREAT)
    try:
        monkeypatch.setattr(sys, "stdout", _ClosedPipe(fd))
        rc = main(_argv(_cfg(toy_data, tiny_model, tmp_path / "run", epochs=2)))
    finally:
        os.close(fd)
    assert rc == 0
    assert _strict(tmp_path / "run" / "results.json")["status"] == "finished"


def test_evaluating_nan_weights_warns(toy_data, tiny_model, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    train(_cfg(toy_data, tiny_model, tmp_path / "run", epochs=1), log=lambda *_: None)
    ckpt = tmp_path / "run" / "checkpoint"
    weights = load_file(str(ckpt / "model.safetensors"))
    weights = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in weights.items()}
    save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["evaluate", str(ckpt), str(toy_data / "ner-tgt"), "--device", "cpu"]) == 0
    assert "non-finite weights" in capsys.readouterr().err


def test_sentences_cut_by_max_length_are_reported(toy_data, tiny_model, tmp_path):
    logs: list[str] = []
    train(_cfg(toy_data, tiny_model, tmp_path / "run", epochs=1, max_length=6), log=logs.append)
    assert any(m.startswith("warning:") and "of dev are longer than max_length 6" in m for m in logs), logs

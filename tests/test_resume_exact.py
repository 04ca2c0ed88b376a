"""Interrupted runs resume bit-exactly: killed during a step, an evaluation or a file write, then
``--resume``d, a run writes the same metrics and byte-identical weights as the uninterrupted run,
for every method, with steps per epoch (3) not a multiple of the target batches per pass (2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from metaxl.config import TrainConfig
from metaxl.errors import ConfigError
from metaxl.train import train

REPO = Path(__file__).resolve().parents[1]


class Killed(BaseException):
    """Stands for kill -9: not an Exception, so nothing in metaxl catches it."""


def _cfg(toy_data: Path, tiny_model: Path, out: Path, method: str, **kw: Any) -> TrainConfig:
    base = dict(target=str(toy_data / "ner-tgt"), source=[str(toy_data / "ner-src")], model=str(tiny_model),
                method=method, epochs=3, batch_size=8, target_size=16, source_size=24, lr=5e-4, meta_lr=1e-3,
                rtn_hidden=8, max_length=32, output_dir=str(out), progress=False, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def _metrics(out: Path) -> dict[str, Any]:
    res = json.loads((out / "results.json").read_text())
    for row in res["epochs"]:
        row.pop("seconds")
    return {k: res[k] for k in ("status", "epochs", "best_epoch", "dev", "test", "checkpoint")}


def _weights(out: Path) -> dict[str, bytes]:
    files = ["checkpoint/model.safetensors", "rtn.safetensors"]
    return {f: (out / f).read_bytes() for f in files if (out / f).exists()}


# ---------------------------------------------------------------------------- kill points
def _kill_on_call(monkeypatch: Any, owner: Any, name: str, n: int, partial: Callable[..., None] | None = None) -> None:
    """Raise Killed at the n-th call of ``owner.name`` (after ``partial(*args)``, which writes half a file)."""
    real = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == n:
            if partial is not None:
                partial(*args, **kwargs)
            raise Killed(f"{name} #{n}")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


def kill_in_step(monkeypatch: Any, n: int) -> None:
    from metaxl.meta import Learner

    real = Learner.step
    calls = {"n": 0}

    def step(self: Any, *a: Any, **k: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == n:  # mid-step: the theta update is half done when the process dies
            with torch.no_grad():
                next(iter(self.theta.values())).add_(1.0)
            raise Killed("step")
        return real(self, *a, **k)

    monkeypatch.setattr(Learner, "step", step)


def kill_in_evaluate(monkeypatch: Any, n: int) -> None:
    import metaxl.train as tr

    _kill_on_call(monkeypatch, tr, "evaluate", n)


def kill_in_json_write(monkeypatch: Any, n: int) -> None:
    import metaxl.guards as guards

    def half(path: Path, data: bytes, what: str = "") -> None:
        path.with_name(path.name + ".tmp").write_bytes(data[: len(data) // 2])

    _kill_on_call(monkeypatch, guards, "write_bytes_atomic", n, half)


def kill_in_state_write(monkeypatch: Any, n: int) -> None:
    def half(obj: Any, f: Any, *a: Any, **k: Any) -> None:
        f.write(b"PK\x03\x04 half a state")

    _kill_on_call(monkeypatch, torch, "save", n, half)


def kill_in_checkpoint_write(monkeypatch: Any, n: int) -> None:
    import transformers

    def half(self: Any, folder: Any, *a: Any, **k: Any) -> None:
        (Path(folder) / "model.safetensors").write_bytes(b"half")

    _kill_on_call(monkeypatch, transformers.PreTrainedModel, "save_pretrained", n, half)


KILLS = {"step": kill_in_step, "evaluate": kill_in_evaluate, "json": kill_in_json_write,
         "state": kill_in_state_write, "checkpoint": kill_in_checkpoint_write}

# per method, a sequence of kills (each a fresh process's death), then a resume that finishes;
# 3 steps an epoch, 3 epochs: step 5 is the middle of epoch 2, evaluate 2 epoch 2's dev evaluation
PLANS = {
    "target-only": [("step", 4), ("evaluate", 1), ("checkpoint", 1)],
    "jt": [("state", 1), ("step", 2), ("json", 3)],
    "jt-rtn": [("evaluate", 2), ("json", 2), ("step", 3)],
    "metaxl": [("step", 5), ("state", 1), ("evaluate", 1), ("checkpoint", 1)],
}


@pytest.mark.parametrize("method", list(PLANS))
def test_killed_and_resumed_runs_are_bit_exact(method: str, toy_data: Path, tiny_model: Path, tmp_path: Path,
                                               monkeypatch: Any) -> None:
    quiet = lambda *_a, **_k: None  # noqa: E731
    whole = tmp_path / "whole"
    train(_cfg(toy_data, tiny_model, whole, method), log=quiet)
    run = tmp_path / "run"
    cfg = _cfg(toy_data, tiny_model, run, method)
    if method == "target-only":
        assert 16 % 8 == 0  # target-only runs over the target itself: every pass is whole
    for kind, n in PLANS[method]:
        with monkeypatch.context() as m:
            KILLS[kind](m, n)
            with pytest.raises(Killed):
                train(cfg, resume=True, log=quiet)
        if (run / "results.json").exists():
            assert json.loads((run / "results.json").read_text())["status"] == "running"
    logs: list[str] = []
    train(cfg, resume=True, log=logs.append)
    assert _metrics(run) == _metrics(whole)
    assert _weights(run) == _weights(whole) and "checkpoint/model.safetensors" in _weights(run)
    assert not (run / "train_state").exists()
    assert not [p for p in run.rglob("*") if p.name.endswith((".tmp", ".old"))]
    # a finished run: --resume does nothing but say so
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    logs.clear()
    again = train(cfg, resume=True, log=logs.append)
    assert any("nothing to do" in m for m in logs) and again["status"] == "finished"
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_resume_mid_target_pass_restores_the_target_cycle(toy_data: Path, tiny_model: Path, tmp_path: Path,
                                                         monkeypatch: Any) -> None:
    """The defect: 3 steps an epoch over 2 target batches a pass, so epoch 2 starts mid-pass."""
    quiet = lambda *_a, **_k: None  # noqa: E731
    whole = train(_cfg(toy_data, tiny_model, tmp_path / "whole", "jt"), log=quiet)
    cfg = _cfg(toy_data, tiny_model, tmp_path / "run", "jt")
    with monkeypatch.context() as m:
        kill_in_evaluate(m, 2)  # epoch 1's state saved; killed in epoch 2's dev evaluation
        with pytest.raises(Killed):
            train(cfg, resume=True, log=quiet)
    res = train(cfg, resume=True, log=quiet)
    assert [e["train_loss"] for e in res["epochs"]] == [e["train_loss"] for e in whole["epochs"]]


@pytest.mark.parametrize("change, named", [
    (dict(method="metaxl"), "method: jt -> metaxl"),
    (dict(rtn_hidden=16), "rtn_hidden: 8 -> 16"),
    (dict(source_size=16, seed=3), "seed: 11 -> 3; source_size: 24 -> 16"),
])
def test_resume_refuses_a_different_config(change: dict[str, Any], named: str, toy_data: Path, tiny_model: Path,
                                           tmp_path: Path, monkeypatch: Any) -> None:
    cfg = _cfg(toy_data, tiny_model, tmp_path / "run", "jt")
    with monkeypatch.context() as m:
        kill_in_evaluate(m, 2)
        with pytest.raises(Killed):
            train(cfg, resume=True, log=lambda *_: None)
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=named):
        train(cfg.replace(**change), resume=True, log=lambda *_: None)
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before
    # runtime-only keys may change
    res = train(cfg.replace(progress=True, eval_batch_size=7, device="cpu"), resume=True, log=lambda *_: None)
    assert res["status"] == "finished"


def test_kill_9_in_a_subprocess_then_resume_is_bit_exact(toy_data: Path, tiny_model: Path, tmp_path: Path) -> None:
    """Real process deaths (os._exit, no cleanup at all): mid-step in epoch 2, then while the
    epoch-2 state is written, then a resume that finishes."""
    args = ["--target", str(toy_data / "ner-tgt"), "--source", str(toy_data / "ner-src"), "--model", str(tiny_model),
            "--method", "metaxl", "--epochs", "3", "--batch-size", "8", "--target-size", "16", "--source-size", "24",
            "--lr", "5e-4", "--meta-lr", "1e-3", "--rtn-hidden", "8", "--max-length", "32", "--device", "cpu",
            "--no-progress", "--resume"]
    script = textwrap.dedent("""
        import os, sys, torch
        import metaxl.meta as meta
        from metaxl.cli import main
        kind, n = sys.argv[1], int(sys.argv[2])
        calls = {"n": 0}
        if kind == "step":
            real = meta.Learner._update_theta
            def hook(self, *a, **k):
                calls["n"] += 1
                if calls["n"] == n:
                    os._exit(137)  # after the forward and backward, before the update
                return real(self, *a, **k)
            meta.Learner._update_theta = hook
        elif kind == "state":
            real = torch.save
            def hook(obj, f, *a, **k):
                calls["n"] += 1
                if calls["n"] == n:
                    f.write(b"half"); f.flush(); os._exit(137)
                return real(obj, f, *a, **k)
            torch.save = hook
        sys.exit(main(["train", *sys.argv[3:]]))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def run(kind: str, n: int, out: Path) -> int:
        proc = subprocess.run([sys.executable, "-c", script, kind, str(n), *args, "--output-dir", str(out)],
                              env=env, capture_output=True, text=True, timeout=1800)
        assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
        return proc.returncode

    whole = tmp_path / "whole"  # in this process: a seed gives the same run in any process
    from metaxl.cli import main

    assert main(["train", *args, "--output-dir", str(whole)]) == 0
    run_dir = tmp_path / "run"
    assert run("step", 5, run_dir) == 137
    assert run("state", 1, run_dir) == 137  # the first state this process writes: epoch 2's
    assert (run_dir / "train_state" / "state.pt.tmp").exists()  # the half-written state of the dying process
    assert run("none", 0, run_dir) == 0
    assert _metrics(run_dir) == _metrics(whole)
    assert _weights(run_dir) == _weights(whole)

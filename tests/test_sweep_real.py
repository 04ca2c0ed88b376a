"""Real sweeps of tiny training runs: the Ray backend (a real local Ray instance) and Ctrl-C.

SIGINT to the sweep driver stops the sweep and every run within seconds, leaves no process behind
(training children, Ray workers and Ray's own processes) and the runs resume where they stopped:
for the local backend and for Ray. Ray starts slowly on 2 cores: these tests are marked ``ray``
and skip when ray is not installed.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from metaxl.sweep import run_status, run_sweep

REPO = Path(__file__).resolve().parents[1]


def _sweep(tmp_path: Path, toy_data: Path, tiny_model: Path, epochs: int, **base: object) -> Path:
    spec = {
        "base": {"source": [str(toy_data / "ner-src")], "model": str(tiny_model), "epochs": epochs,
                 "batch_size": 8, "target_size": 16, "source_size": 24, "lr": 5e-4, "meta_lr": 1e-3,
                 "rtn_hidden": 8, "max_length": 32, "device": "cpu", "progress": False, "dev_size": 4,
                 "test_size": 4, **base},
        "grid": {"targets": [str(toy_data / "ner-tgt")], "methods": ["jt", "metaxl"], "seeds": [1]},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _marked(mark: str) -> list[int]:
    """Live (not zombie) processes whose environment holds ``mark``."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if mark.encode() in (d / "environ").read_bytes() and (d / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the sweep ended before {what}: {proc.communicate()[0].decode()[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def _logs(runs_dir: Path) -> list[str]:
    return [p.read_text(errors="replace") for p in sorted(runs_dir.rglob("train.log"))]


needs_proc = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")


@pytest.mark.ray
def test_a_real_ray_sweep_runs_two_tiny_runs_with_tensorboard(toy_data, tiny_model, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray", reason="ray not installed (pip install 'metaxl[ray]')")
    tb = pytest.importorskip("tensorboard", reason="tensorboard not installed")  # noqa: F841
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    runs_dir = tmp_path / "runs"
    out = io.StringIO()
    outcome = run_sweep(_sweep(tmp_path, toy_data, tiny_model, 2, report_to=["tensorboard"]), runs_dir=runs_dir,
                        backend="ray", num_cpus=1, progress=False, out=out)
    assert outcome.exit_code == 0 and outcome.finished == 2, out.getvalue() + "\n".join(_logs(runs_dir))
    assert not ray.is_initialized(), "the sweep's own Ray instance was left running"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dirs = sorted(p.parent for p in runs_dir.rglob("results.json"))
    assert len(run_dirs) == 2 and all(run_status(d) == "finished" for d in run_dirs)
    for d in run_dirs:  # one TensorBoard run per sweep run: tensorboard --logdir runs_dir compares them
        acc = EventAccumulator(str(d))
        acc.Reload()
        assert [e.step for e in acc.Scalars("dev/f1")] == [1, 2]
        assert ("train/hypergrad_norm" in acc.Tags()["scalars"]) == ("/metaxl/" in str(d))


@needs_proc
@pytest.mark.parametrize("backend", ["local", pytest.param("ray", marks=pytest.mark.ray)])
def test_sigint_stops_the_sweep_and_every_run_and_the_runs_resume(toy_data, tiny_model, tmp_path, backend):
    if backend == "ray":
        pytest.importorskip("ray", reason="ray not installed (pip install 'metaxl[ray]')")
    runs_dir = tmp_path / "runs"
    sweep = _sweep(tmp_path, toy_data, tiny_model, 1000)
    mark = f"METAXL_TEST_MARK={uuid.uuid4().hex}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           mark.split("=")[0]: mark.split("=")[1]}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "metaxl.sweep", str(sweep), "--runs-dir", str(runs_dir), "--jobs", "2",
           "--backend", backend, "--no-progress"]

    def interrupt_when(ready, what: str) -> str:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            _wait_for(ready, 240, what, proc)
            assert _marked(mark), "no process of the sweep found"
            t0 = time.monotonic()
            proc.send_signal(signal.SIGINT)
            output = proc.communicate(timeout=60)[0].decode()
        finally:
            if proc.poll() is None:
                proc.kill()
        stopped = time.monotonic() - t0
        assert proc.returncode == 130, output
        assert stopped < 30, f"the sweep took {stopped:.0f}s to stop"
        _wait_for(lambda: not _marked(mark), 15, "every process of the sweep to end")
        assert "interrupted: run the same command again to resume" in output
        return output

    def both_past_epoch(n: int):
        return lambda: (len(logs := _logs(runs_dir)) == 2 and all(f"epoch {n}/1000" in t for t in logs))

    interrupt_when(both_past_epoch(2), "both runs to pass epoch 2")
    state = json.loads((runs_dir / "sweep_state.json").read_text())
    assert {r["status"] for r in state["runs"].values()} == {"interrupted"}
    assert len(list(runs_dir.rglob("train_state/state.pt"))) == 2  # each run saved its last epoch
    # the same command resumes both runs where they stopped
    interrupt_when(lambda: (len(logs := _logs(runs_dir)) == 2 and all("resuming" in t for t in logs)
                            and all(t.split("resuming", 1)[1].count("epoch ") >= 1 for t in logs)),
                   "both runs to resume and train an epoch")
    for text in _logs(runs_dir):
        resumed_at = int(text.split("from epoch ", 1)[1].split()[0])
        assert resumed_at >= 3

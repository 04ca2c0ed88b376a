"""Sweep expansion, resumable execution, failures, interruption and the Ray path, with a fake trainer."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

import metaxl.sweep as sweep_mod
from metaxl.config import TrainConfig
from metaxl.errors import ConfigError, DataError, MetaXLError
from metaxl.sweep import (
    ExpansionStats,
    config_hash,
    effective_config,
    expand_sweep,
    load_sweep,
    parse_only,
    read_failed_marker,
    register_cli,
    run_status,
    run_sweep,
    select_runs,
)

REPO = Path(__file__).resolve().parents[1]

FAKE_TRAIN = textwrap.dedent(
    '''
    """Fake `metaxl train`: writes results.json per the schema, deterministic metrics from the config."""
    import argparse, json, os, sys, time, zlib
    import yaml

    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--resume", action="store_true")
    a = p.parse_args()
    cfg = yaml.safe_load(open(a.config))
    out = a.output_dir
    log = os.environ.get("FAKE_LAUNCH_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {int(a.resume)} {out}\\n")

    def write(status, **extra):
        res = {"status": status, "config": cfg, "method": cfg["method"], "task": "ner",
               "target": cfg["target"], "source": cfg["source"], "seed": cfg["seed"],
               "source_size": cfg["source_size"], "target_size": cfg["target_size"],
               "rtn_layers": cfg["rtn_layers"], "labels": ["O", "B-PER", "I-PER"], **extra}
        tmp = os.path.join(out, "results.json.tmp")
        with open(tmp, "w") as f:
            json.dump(res, f)
        os.replace(tmp, os.path.join(out, "results.json"))

    write("running", epochs=[])
    print("training", cfg["target"], cfg["method"], flush=True)
    if os.environ.get("FAKE_PRINT_ENV"):
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            print(f"env {var}={os.environ.get(var)}", flush=True)
    if os.environ.get("FAKE_EPOCH_LINE"):
        print("epoch 1/2: loss 1.0000  dev f1 50.00  (best)  [1s]", flush=True)
    sleep = float(json.loads(os.environ.get("FAKE_SLEEPS", "{}")).get(cfg["target"], os.environ.get("FAKE_SLEEP", "0")))
    if os.environ.get("FAKE_FOLLOW_THREADS") and os.environ.get("METAXL_THREADS_FILE"):
        from metaxl.threads import ThreadsFile  # as the training loop does: print each new thread count

        follower, end = ThreadsFile.from_env(every_s=0), time.monotonic() + sleep
        while True:
            n = follower.poll()
            if n is not None:
                print("threads", n, time.time(), flush=True)
            if time.monotonic() >= end:
                break
            time.sleep(0.05)
    else:
        time.sleep(sleep)
    print("slept until", time.time(), flush=True)
    if "fail" in cfg["target"] or os.environ.get("FAKE_FAIL"):
        print("Traceback: something went wrong in", cfg["target"], file=sys.stderr)
        sys.exit(1)
    base = {"target-only": 50.0, "jt": 60.0, "jt-rtn": 58.0, "metaxl": 62.0}[cfg["method"]]
    f1 = base + zlib.crc32(cfg["target"].encode()) % 10 + 0.5 * cfg["seed"]
    write("finished", epochs=[{"epoch": 1, "steps": 1, "train_loss": 1.0, "seconds": 0.1, "dev": {"f1": f1}}],
          best_epoch=1, dev={"f1": f1}, test={"f1": f1 - 1.0}, wall_seconds=0.1, checkpoint="checkpoint")
    '''
)


@pytest.fixture
def fake_train(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    launches = tmp_path / "launches.log"
    monkeypatch.setenv("METAXL_TRAIN_CMD", f"{sys.executable} {script}")
    monkeypatch.setenv("FAKE_LAUNCH_LOG", str(launches))
    monkeypatch.delenv("FAKE_SLEEP", raising=False)
    monkeypatch.delenv("FAKE_FAIL", raising=False)
    monkeypatch.delenv("FAKE_EPOCH_LINE", raising=False)
    monkeypatch.delenv("FAKE_SLEEPS", raising=False)
    monkeypatch.delenv("FAKE_FOLLOW_THREADS", raising=False)
    monkeypatch.delenv("FAKE_PRINT_ENV", raising=False)
    return launches


def launches_by_dir(log: Path) -> Counter[str]:
    if not log.exists():
        return Counter()
    return Counter(line.split(" ", 2)[2] for line in log.read_text().splitlines() if line.strip())


def write_sweep(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


RELATED = {"masakhaner2:luo": "masakhaner2:swa", "masakhaner2:wol": "masakhaner2:en"}


def fake_related(target: str) -> tuple[str, str]:
    return RELATED[target], "test table"


# ---------------------------------------------------------------------------------------------
# expansion
# ---------------------------------------------------------------------------------------------
def test_grid_expansion_dedup_and_related() -> None:
    spec = {
        "base": {"epochs": 2, "lr": "3e-5", "backoff_epochs": 1},
        "grid": {
            "targets": ["masakhaner2:luo", "masakhaner2:wol"],
            "sources": ["masakhaner2:en", "related"],
            "methods": ["target-only", "jt", "metaxl"],
            "rtn_layers": [12, [0, 12]],
            "seeds": [1, 2],
        },
    }
    stats = ExpansionStats()
    calls: list[str] = []

    def related(t: str) -> tuple[str, str]:
        calls.append(t)
        return fake_related(t)

    runs = expand_sweep(spec, related=related, stats=stats)
    assert stats.combinations == 2 * 2 * 3 * 2 * 2
    # luo: target-only 2 + jt 2 sources x 2 seeds + metaxl 2 x 2 layers x 2 seeds = 14
    # wol: related == en, so jt 1 x 2 + metaxl 1 x 2 x 2 = 2 + 2 + 4 = 8
    assert len(runs) == 22
    assert stats.duplicates == stats.combinations - 22
    assert sorted(set(calls)) == ["masakhaner2:luo", "masakhaner2:wol"]  # resolved once per target
    names = [r.name for r in runs]
    assert len(set(names)) == len(names)
    assert "ner/masakhaner2-luo/metaxl/src-masakhaner2-en/n1000/L12/seed1" in names
    assert "ner/masakhaner2-luo/metaxl/src-masakhaner2-swa/n1000/L0+12/seed2" in names
    assert "ner/masakhaner2-luo/target-only/seed1" in names
    assert "ner/masakhaner2-wol/jt/src-masakhaner2-en/n1000/seed2" in names
    by_name = {r.name: r for r in runs}
    to = by_name["ner/masakhaner2-luo/target-only/seed1"].config
    assert to.source == [] and to.backoff_epochs == 0
    jt = by_name["ner/masakhaner2-wol/jt/src-masakhaner2-en/n1000/seed2"].config
    assert jt.backoff_epochs == 0 and jt.lr == pytest.approx(3e-5) and isinstance(jt.lr, float)
    mx = by_name["ner/masakhaner2-luo/metaxl/src-masakhaner2-swa/n1000/L0+12/seed2"]
    assert mx.config.rtn_layers == [0, 12] and mx.config.backoff_epochs == 1 and mx.config.seed == 2
    assert mx.axes["source"] == ["related"]
    for r in runs:
        r.config.validate()
        assert r.config.epochs == 2


def test_related_imported_lazily_from_metaxl_data(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("metaxl.data")
    fake.related_source = fake_related  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "metaxl.data", fake)
    runs = expand_sweep({"grid": {"targets": ["masakhaner2:luo"], "sources": ["related"], "methods": ["jt"]}})
    assert [r.config.source for r in runs] == [["masakhaner2:swa"]]
    # target-only never asks for the related language
    monkeypatch.setitem(sys.modules, "metaxl.data", None)
    runs = expand_sweep({"grid": {"sources": ["related"], "methods": ["target-only"]}})
    assert len(runs) == 1
    with pytest.raises(ConfigError, match="related"):
        expand_sweep({"grid": {"sources": ["related"], "methods": ["jt"]}})


def test_exclude_rules_and_multi_source() -> None:
    spec = {
        "grid": {
            "targets": ["masakhaner2:luo", "masakhaner2:wol"],
            "sources": ["masakhaner2:en", "related", ["masakhaner2:en", "masakhaner2:swa"]],
            "methods": ["jt", "metaxl"],
            "hypergrad": ["exact", "finite-difference"],
        },
        "exclude": [
            {"method": "jt", "source": "related"},
            {"targets": "masakhaner2:wol", "source": [["masakhaner2:en", "masakhaner2:swa"]]},
        ],
    }
    runs = expand_sweep(spec, related=fake_related)
    keys = {(r.config.target, r.config.method, tuple(r.config.source), r.config.hypergrad) for r in runs}
    assert ("masakhaner2:luo", "jt", ("masakhaner2:swa",), "exact") not in keys  # jt x related excluded
    assert ("masakhaner2:luo", "metaxl", ("masakhaner2:swa",), "finite-difference") in keys
    assert not any(t == "masakhaner2:wol" and len(s) == 2 for t, _, s, _ in keys)
    # jt is not multiplied by hypergrad: one jt run per (target, source)
    jt = [k for k in keys if k[1] == "jt"]
    assert len(jt) == len({(t, s) for t, _, s, _ in jt})
    multi = [r for r in runs if len(r.config.source) == 2 and r.config.method == "metaxl"]
    assert multi and all("src-masakhaner2-en+masakhaner2-swa" in r.name for r in multi)
    assert any("/hypergrad-finite-difference/" in r.name for r in multi)


def test_name_collisions_get_a_hash() -> None:
    runs = expand_sweep({"grid": {"methods": ["jt"], "target": ["/data/a/luo", "/data/b/luo"]}})
    assert len(runs) == 2 and runs[0].name != runs[1].name
    assert all(r.name.split("-")[-1] == r.config_hash for r in runs)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"grid": {"method": ["metaxl", "maml"]}}, "method='maml' is not valid"),
        ({"grid": {"lerning_rate": [1]}}, "grid.lerning_rate: unknown key"),
        ({"grid": {"lr": 3e-5}}, "must be a non-empty list"),
        ({"grid": {"epochs": ["many"]}}, "epochs='many' is not a valid int"),
        ({"base": {"output_dir": "x"}}, "output_dir"),
        ({"base": {"epochs": 1}, "epochs": 3}, "unknown top-level key"),
        ({"exclude": [{"colour": "red"}]}, "exclude\\[0\\]: unknown key 'colour'"),
        ({"grid": {"methods": ["jt"]}, "base": {"source": []}}, "needs at least one --source"),
    ],
)
def test_bad_sweeps_raise_config_error(spec: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        expand_sweep(spec)


def test_an_invalid_setting_shared_by_many_runs_is_named_once() -> None:
    spec = {"grid": {"methods": ["jt"], "seeds": [1, 2, 3]}, "base": {"source": [], "lr": 1e-4}}
    with pytest.raises(ConfigError) as err:
        expand_sweep(spec)
    text = str(err.value)
    assert text.count("needs at least one --source") == 1, text
    assert "(3 runs, first method=jt, seed=1)" in text, text


def test_effective_config_ignores_irrelevant_keys() -> None:
    a = effective_config(TrainConfig(method="jt", rtn_layers=[0], hypergrad="finite-difference"))
    b = effective_config(TrainConfig(method="jt"))
    assert a == b
    c = effective_config(TrainConfig(method="metaxl", rtn_layers=[12, 0]))
    assert c["rtn_layers"] == [0, 12]


def test_task_auto_is_the_same_run_as_the_task_its_corpus_names() -> None:
    # the study's runs (task: ner) count as finished for a sweep that writes task: auto
    auto = TrainConfig(task="auto", target="masakhaner2:bam", source=["masakhaner2:en"], method="jt")
    ner = TrainConfig(task="ner", target="masakhaner2:bam", source=["masakhaner2:en"], method="jt")
    assert effective_config(auto)["task"] == "ner"
    assert config_hash(auto) == config_hash(ner)
    sa = TrainConfig(task="sa", target="masakhaner2:bam", source=["masakhaner2:en"], method="jt")
    assert config_hash(sa) != config_hash(auto)
    local = effective_config(TrainConfig(task="auto", target="data/my-corpus", method="target-only"))
    assert local["task"] == "auto"                       # no corpus name to read: left as written


def test_example_sweeps_expand() -> None:
    related = {
        f"masakhaner2:{t}": ("masakhaner2:fr" if t in ("bam", "mos", "wol") else "masakhaner2:swa", "x")
        for t in ("bam", "ewe", "fon", "lug", "luo", "mos", "twi", "wol")
    }
    ner = expand_sweep(load_sweep(REPO / "examples/sweeps/ner_masakhaner.yaml"), related=lambda t: related[t])
    assert len(ner) == 8 * 5 * 3
    assert {r.config.method for r in ner} == {"target-only", "jt", "metaxl"}
    sa = expand_sweep(load_sweep(REPO / "examples/sweeps/sa_nusax.yaml"))
    assert len(sa) == 8 * 2 * 5 * 3
    assert {r.config.sa_labels for r in sa} == {"binary", "3way"}
    assert not {"nusax:javanese", "nusax:sundanese"} & {r.config.target for r in sa}
    assert all(r.name.startswith("sa/nusax-") for r in sa)


def test_finite_difference_study_shares_the_study_folder() -> None:
    """study_sa_fd.yaml's runs are the study's MetaXL runs with another hypergradient, in folders of their own."""
    import dataclasses

    study = {r.name: r for r in expand_sweep(load_sweep(REPO / "examples/sweeps/study_sa.yaml"))}
    fd = expand_sweep(load_sweep(REPO / "examples/sweeps/study_sa_fd.yaml"))
    assert len(fd) == 8 * 2 * 2 * 3 and {r.config.hypergrad for r in fd} == {"finite-difference"}
    assert not {r.name for r in fd} & set(study)
    for r in fd:
        twin = study[r.name.replace("/hypergrad-finite-difference", "")]
        assert twin.config.method == "metaxl"
        assert dataclasses.replace(r.config, hypergrad="exact") == twin.config


def test_cli_registration() -> None:
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    args = parser.parse_args(["sweep", "s.yaml", "--jobs", "3", "--backend", "ray", "--retry-failed"])
    assert (args.config, args.jobs, args.backend, args.retry_failed, args.dry_run) == (
        "s.yaml",
        3,
        "ray",
        True,
        False,
    )
    assert callable(args.func)


# ---------------------------------------------------------------------------------------------
# execution
# ---------------------------------------------------------------------------------------------
def small_sweep(tmp_path: Path, targets: list[str], seeds: list[int] | None = None, **base: object) -> Path:
    return write_sweep(
        tmp_path / "sweep.yaml",
        {
            "base": {"epochs": 1, **base},
            "grid": {"targets": targets, "methods": ["jt"], "seeds": seeds or [1]},
        },
    )


def test_dry_run_launches_and_writes_nothing(tmp_path: Path, fake_train: Path) -> None:
    cfg = small_sweep(tmp_path, ["masakhaner2:luo", "masakhaner2:wol"])
    out = io.StringIO()
    outcome = run_sweep(cfg, runs_dir=tmp_path / "runs", dry_run=True, out=out, progress=False)
    text = out.getvalue()
    assert outcome.total == 2 and outcome.exit_code == 0
    assert "plan: 2 runs, 0 already finished, 0 failed, 2 to run" in text
    assert "new        ner/masakhaner2-luo/jt/src-masakhaner2-en/n1000/seed1" in text
    assert not (tmp_path / "runs").exists() and not fake_train.exists()


def test_runs_failures_and_reruns(tmp_path: Path, fake_train: Path) -> None:
    cfg = small_sweep(tmp_path, ["masakhaner2:luo", "masakhaner2:failing", "masakhaner2:wol"], seeds=[1, 2])
    runs_dir = tmp_path / "runs"
    outcome = run_sweep(cfg, runs_dir=runs_dir, jobs=2, progress=False, out=io.StringIO())
    assert (outcome.total, outcome.finished, outcome.failed, outcome.exit_code) == (6, 4, 2, 1)
    bad = runs_dir / "ner/masakhaner2-failing/jt/src-masakhaner2-en/n1000/seed1"
    good = runs_dir / "ner/masakhaner2-luo/jt/src-masakhaner2-en/n1000/seed2"
    assert run_status(bad) == "failed" and run_status(good) == "finished"
    marker = read_failed_marker(bad / "FAILED")
    assert marker["exit_code"] == "1" and "something went wrong" in marker["log_tail"]
    saved = yaml.safe_load((good / "config.yaml").read_text())
    assert TrainConfig.from_dict(saved).output_dir == str(good)
    assert "training masakhaner2:luo jt" in (good / "train.log").read_text()
    state = json.loads((runs_dir / "sweep_state.json").read_text())
    entry = state["runs"]["ner/masakhaner2-failing/jt/src-masakhaner2-en/n1000/seed1"]
    assert entry["status"] == "failed" and entry["exit_code"] == 1 and entry["log_tail"]
    assert state["summary"] == {"total": 6, "finished": 4, "failed": 2, "interrupted": 0}
    assert len(launches_by_dir(fake_train)) == 6

    # re-run: nothing to do, failed runs are skipped (exit 1 because the sweep is incomplete)
    outcome = run_sweep(cfg, runs_dir=runs_dir, progress=False, out=io.StringIO())
    assert (outcome.launched, outcome.skipped_failed, outcome.exit_code) == (0, 2, 1)
    assert sum(launches_by_dir(fake_train).values()) == 6

    # --retry-failed re-runs only the failed ones
    outcome = run_sweep(cfg, runs_dir=runs_dir, retry_failed=True, progress=False, out=io.StringIO())
    assert (outcome.launched, outcome.failed) == (2, 2)
    counts = launches_by_dir(fake_train)
    assert counts[str(bad)] == 2 and counts[str(good)] == 1
    state = json.loads((runs_dir / "sweep_state.json").read_text())
    assert state["runs"]["ner/masakhaner2-failing/jt/src-masakhaner2-en/n1000/seed1"]["launches"] == 2


def test_busy_cpus_get_a_thread_note_unless_threads_are_set(
    tmp_path: Path, fake_train: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Children get cores // jobs threads; on CPUs that other work already uses, the sweep says
    how to avoid oversubscribing them (4x slower runs, measured) and stays quiet when the user
    set the threads or the machine is idle."""
    monkeypatch.setattr(sweep_mod, "_cores", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    cfg = small_sweep(tmp_path, ["masakhaner2:luo"])

    def sweep_text(load: float, runs: str) -> str:
        monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
        out = io.StringIO()
        assert run_sweep(cfg, runs_dir=tmp_path / runs, jobs=1, progress=False, out=out).finished == 1
        return out.getvalue()

    busy = sweep_text(1.9, "busy")
    assert "1-minute load average 1.9 on 2 cores" in busy and "gets 2 threads" in busy
    assert "OMP_NUM_THREADS=1" in busy
    assert "CPUs are busy" not in sweep_text(0.2, "idle")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert "CPUs are busy" not in sweep_text(1.9, "set")


@pytest.mark.parametrize("user,expected", [
    ({}, {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2"}),
    ({"OMP_NUM_THREADS": "1"}, {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}),
    ({"MKL_NUM_THREADS": "1"}, {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}),
    ({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "3"}, {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "3", "OPENBLAS_NUM_THREADS": "1"}),
])
def test_a_thread_variable_the_user_set_sets_the_others_in_the_child(
    tmp_path: Path, fake_train: Path, monkeypatch: pytest.MonkeyPatch, user: dict[str, str], expected: dict[str, str]
) -> None:
    """The child's environment, as it printed it: with OMP_NUM_THREADS=1 set by the user, MKL got
    cores // jobs threads (2 here) and ran its sgemm on two threads beside another run."""
    monkeypatch.setattr(sweep_mod, "_cores", lambda: 2)
    for var in sweep_mod.THREAD_VARS:
        monkeypatch.delenv(var, raising=False)
    for var, value in user.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("FAKE_PRINT_ENV", "1")
    cfg = small_sweep(tmp_path, ["masakhaner2:luo"])
    runs = tmp_path / "runs"
    assert run_sweep(cfg, runs_dir=runs, jobs=1, progress=False, out=io.StringIO()).finished == 1
    log = next(runs.rglob("train.log")).read_text()
    assert dict(re.findall(r"^env (\w+)=(\S+)$", log, re.M)) == expected


def test_more_jobs_than_cores_get_a_note(tmp_path: Path, fake_train: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--jobs beyond the cores only time-shares them on the CPU: the sweep says so, and runs anyway."""
    monkeypatch.setattr(sweep_mod, "_cores", lambda: 2)
    cfg = small_sweep(tmp_path, ["masakhaner2:luo", "masakhaner2:wol", "masakhaner2:ewe"])

    def sweep_text(jobs: int, runs: str) -> str:
        out = io.StringIO()
        assert run_sweep(cfg, runs_dir=tmp_path / runs, jobs=jobs, progress=False, out=out).finished == 3
        return out.getvalue()

    text = sweep_text(3, "three")
    assert "--jobs 3 on 2 cores" in text and "use --jobs 2 unless they train on a GPU" in text
    assert "--jobs" not in sweep_text(2, "two")


def test_the_last_runs_get_the_cores_of_the_runs_that_ended(
    tmp_path: Path, fake_train: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once no run is left to start, a local sweep raises the threads of the runs still going to
    cores // running through their threads files (metaxl.threads, followed by the training loop);
    threads the user set are left alone."""
    monkeypatch.setattr(sweep_mod, "_cores", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setenv("FAKE_FOLLOW_THREADS", "1")
    # luo ends first and ewe takes its place (every run started, 2 running: 2 threads each);
    # when ewe ends, wol is the last one going and gets all 4 cores
    monkeypatch.setenv("FAKE_SLEEPS", json.dumps({"masakhaner2:luo": 0.2, "masakhaner2:ewe": 1.5, "masakhaner2:wol": 4.0}))
    cfg = small_sweep(tmp_path, ["masakhaner2:luo", "masakhaner2:wol", "masakhaner2:ewe"])

    logs: dict[str, str] = {}

    def threads_seen(runs: Path) -> dict[str, list[str]]:
        assert run_sweep(cfg, runs_dir=runs, jobs=2, progress=False, out=io.StringIO()).finished == 3
        for t in ("luo", "ewe", "wol"):
            logs[t] = (runs / f"ner/masakhaner2-{t}/jt/src-masakhaner2-en/n1000/seed1/train.log").read_text()
        return {t: re.findall(r"^threads (\d+) ", log, re.M) for t, log in logs.items()}

    # a slow start (here: writing ewe's run folder) must not let wol take ewe's cores meanwhile
    prepare = sweep_mod._Runner.prepare

    def slow_prepare(self: sweep_mod._Runner, run: sweep_mod.PlannedRun) -> Path:
        if "ewe" in run.name:
            time.sleep(0.6)
        return prepare(self, run)

    monkeypatch.setattr(sweep_mod._Runner, "prepare", slow_prepare)
    assert threads_seen(tmp_path / "runs") == {"luo": ["2"], "ewe": ["2"], "wol": ["2", "4"]}
    raised_at = float(re.findall(r"^threads 4 (\S+)$", logs["wol"], re.M)[0])
    assert raised_at >= float(re.findall(r"^slept until (\S+)$", logs["ewe"], re.M)[0])  # only once ewe had ended
    assert not (tmp_path / "runs" / sweep_mod.THREADS_DIR).exists()  # each run's file removed, then the folder
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("FAKE_SLEEPS", json.dumps({"masakhaner2:luo": 0.0, "masakhaner2:ewe": 0.0, "masakhaner2:wol": 0.5}))
    assert threads_seen(tmp_path / "user") == {"luo": [], "ewe": [], "wol": []}


def test_progress_bar_shows_the_running_runs_epochs(
    tmp_path: Path, fake_train: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FAKE_EPOCH_LINE", "1")  # each fake run logs "epoch 1/2: ..." then sleeps
    monkeypatch.setenv("FAKE_SLEEP", "1.5")
    monkeypatch.setattr(sweep_mod, "PROGRESS_EVERY_S", 0.2)
    cfg = small_sweep(tmp_path, ["masakhaner2:luo", "masakhaner2:wol"])
    outcome = run_sweep(cfg, runs_dir=tmp_path / "runs", jobs=2, progress=True, out=io.StringIO())
    assert outcome.finished == 2
    err = capsys.readouterr().err
    assert "running=[1/2 1/2] epochs" in err  # both runs, read from their train.log while they ran
    assert "done=2, failed=0" in err


def test_unfinished_runs_are_resumed_and_changed_config_refused(tmp_path: Path, fake_train: Path) -> None:
    cfg = small_sweep(tmp_path, ["masakhaner2:luo", "masakhaner2:wol"])
    runs_dir = tmp_path / "runs"
    run_sweep(cfg, runs_dir=runs_dir, progress=False, out=io.StringIO())
    wol = runs_dir / "ner/masakhaner2-wol/jt/src-masakhaner2-en/n1000/seed1"
    res = json.loads((wol / "results.json").read_text())
    res["status"] = "running"  # as if killed mid-training
    (wol / "results.json").write_text(json.dumps(res))
    outcome = run_sweep(cfg, runs_dir=runs_dir, progress=False, out=io.StringIO())
    assert (outcome.finished_before, outcome.launched, outcome.finished) == (1, 1, 1)
    assert launches_by_dir(fake_train)[str(wol)] == 2
    assert all(line.split()[1] == "1" for line in fake_train.read_text().splitlines())  # --resume passed

    changed = small_sweep(tmp_path, ["masakhaner2:luo", "masakhaner2:wol"], lr=1.0e-4)
    with pytest.raises(ConfigError, match=r"different config.*lr: 3e-05 -> 0.0001"):
        run_sweep(changed, runs_dir=runs_dir, progress=False, out=io.StringIO())


def test_kill_midway_and_resume(tmp_path: Path, fake_train: Path) -> None:
    targets = [f"masakhaner2:t{i}" for i in range(6)]
    cfg = small_sweep(tmp_path, targets)
    runs_dir = tmp_path / "runs"
    env = {**os.environ, "FAKE_SLEEP": "1.0", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "metaxl.sweep",
            str(cfg),
            "--runs-dir",
            str(runs_dir),
            "--jobs",
            "2",
            "--no-progress",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    finished: list[Path] = []
    while time.monotonic() < deadline:
        finished = [p.parent for p in runs_dir.rglob("results.json") if run_status(p.parent) == "finished"]
        if len(finished) >= 2:
            break
        time.sleep(0.05)
    assert len(finished) >= 2, proc.communicate(timeout=5)[0]
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 130, output
    assert "interrupted" in output
    first = launches_by_dir(fake_train)
    assert 2 <= len(first) < 6
    # every launched child is gone
    for line in fake_train.read_text().splitlines():
        pid = int(line.split()[0])
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    finished_first = {
        str(p.parent) for p in runs_dir.rglob("results.json") if run_status(p.parent) == "finished"
    }
    assert not list(runs_dir.rglob("FAILED"))
    state = json.loads((runs_dir / "sweep_state.json").read_text())
    assert {e["status"] for e in state["runs"].values()} <= {"finished", "interrupted", "pending"}

    outcome = run_sweep(cfg, runs_dir=runs_dir, jobs=2, progress=False, out=io.StringIO())
    assert outcome.exit_code == 0
    assert outcome.finished_before == len(finished_first)
    assert outcome.finished == 6 - len(finished_first)
    counts = launches_by_dir(fake_train)
    assert len(counts) == 6
    for d in finished_first:
        assert counts[d] == 1, f"{d} was relaunched"
    assert all(run_status(runs_dir / r) == "finished" for r in counts)


def test_sigterm_in_process_terminates_children(tmp_path: Path, fake_train: Path, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_SLEEP", "30")
    cfg = small_sweep(tmp_path, ["masakhaner2:luo", "masakhaner2:wol", "masakhaner2:bam"])
    runs_dir = tmp_path / "runs"

    def kill_soon() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(launches_by_dir(fake_train)) < 2:
            time.sleep(0.05)
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGTERM)

    t = threading.Thread(target=kill_soon)
    t.start()
    start = time.monotonic()
    outcome = run_sweep(cfg, runs_dir=runs_dir, jobs=2, progress=False, out=io.StringIO(), grace_s=5)
    t.join()
    assert time.monotonic() - start < 15
    assert outcome.exit_code == 130 and outcome.interrupted == 3 and outcome.failed == 0
    assert not list(runs_dir.rglob("FAILED"))
    for line in fake_train.read_text().splitlines():
        with pytest.raises(ProcessLookupError):
            os.kill(int(line.split()[0]), 0)


# ---------------------------------------------------------------------------------------------
# Ray backend (a fake ray module standing in for the real one)
# ---------------------------------------------------------------------------------------------
def make_fake_ray() -> types.ModuleType:
    ray = types.ModuleType("ray")
    pool = ThreadPoolExecutor(max_workers=2)
    state: dict = {"init": None, "options": None}

    class Remote:
        def __init__(self, fn):
            self.fn = fn

        def options(self, **kw):
            state["options"] = kw
            return self

        def remote(self, *args):
            return pool.submit(self.fn, *args)

    def wait(refs, num_returns=1, timeout=None):
        from concurrent.futures import FIRST_COMPLETED
        from concurrent.futures import wait as fwait

        done, rest = fwait(refs, timeout=timeout, return_when=FIRST_COMPLETED)
        return list(done), list(rest)

    ray.remote = Remote  # type: ignore[attr-defined]
    ray.wait = wait  # type: ignore[attr-defined]
    ray.get = lambda ref: ref.result()  # type: ignore[attr-defined]
    ray.cancel = lambda ref, force=False: ref.cancel()  # type: ignore[attr-defined]
    ray.is_initialized = lambda: state["init"] is not None  # type: ignore[attr-defined]
    ray.init = lambda address=None: state.__setitem__("init", address or "local")  # type: ignore[attr-defined]
    ray.state = state  # type: ignore[attr-defined]
    return ray


def test_ray_backend_with_fake_ray(tmp_path: Path, fake_train: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ray = make_fake_ray()
    monkeypatch.setitem(sys.modules, "ray", ray)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    cfg = small_sweep(tmp_path, ["masakhaner2:luo", "masakhaner2:failing", "masakhaner2:wol"])
    runs_dir = tmp_path / "runs"
    outcome = run_sweep(cfg, runs_dir=runs_dir, backend="ray", num_cpus=4, progress=False, out=io.StringIO())
    assert (outcome.finished, outcome.failed) == (2, 1)
    assert ray.state["init"] == "auto"  # type: ignore[attr-defined]
    assert ray.state["options"]["num_cpus"] == 4  # type: ignore[attr-defined]
    assert run_status(runs_dir / "ner/masakhaner2-failing/jt/src-masakhaner2-en/n1000/seed1") == "failed"


def test_ray_missing_gives_install_hint(
    tmp_path: Path, fake_train: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    cfg = small_sweep(tmp_path, ["masakhaner2:luo"])
    with pytest.raises(MetaXLError, match=r'pip install "metaxl\[ray\]"'):
        run_sweep(cfg, runs_dir=tmp_path / "runs", backend="ray", progress=False, out=io.StringIO())
    assert not (tmp_path / "runs").exists()


def test_module_cli_reports_user_errors(tmp_path: Path) -> None:
    bad = write_sweep(tmp_path / "bad.yaml", {"grid": {"methods": ["maml"]}})
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    r = subprocess.run(
        [sys.executable, "-m", "metaxl.sweep", str(bad), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "bad.yaml" in r.stderr and "maml" in r.stderr and "Traceback" not in r.stderr


def test_sweep_then_report_end_to_end(tmp_path: Path, fake_train: Path) -> None:
    from metaxl.report import make_report

    cfg = write_sweep(
        tmp_path / "sweep.yaml",
        {
            "base": {"epochs": 1},
            "grid": {
                "targets": ["masakhaner2:luo", "masakhaner2:wol", "masakhaner2:failing"],
                "sources": ["masakhaner2:en", "related"],
                "methods": ["target-only", "jt", "metaxl"],
                "seeds": [1, 2],
            },
            "exclude": [{"target": "masakhaner2:failing", "source": "related"}],
        },
    )
    runs_dir = tmp_path / "runs"
    outcome = run_sweep(
        cfg, runs_dir=runs_dir, jobs=2, related=fake_related, progress=False, out=io.StringIO()
    )
    # luo: 2 + 2x2x2 = 10; wol (related == en): 2 + 2 + 2 = 6; failing: 2 + 2 + 2 = 6, all failing
    assert (outcome.total, outcome.finished, outcome.failed) == (22, 16, 6)
    res = make_report(runs_dir, related=fake_related)
    assert res.counts["finished"] == 16 and res.counts["failed"] == 6
    table = res.tables[0]
    assert table.columns == ["luo", "wol"]
    assert [r.label for r in table.rows] == [
        "target only",
        "JT (en)",
        "MetaXL (en)",
        "JT (related)",
        "MetaXL (related)",
    ]
    # wol's related language is English: its en runs fill both the (en) and (related) rows
    assert all(set(r.cells) == {"masakhaner2:luo", "masakhaner2:wol"} for r in table.rows)
    assert [c.stats.n for c in res.comparisons] == [4, 4]
    assert all(c.stats.mean == pytest.approx(2.0) for c in res.comparisons)  # fake: metaxl = jt + 2


def test_first_seeds_run_first(tmp_path: Path, fake_train: Path) -> None:
    """Every setting's seed 1 is launched before any seed 2: a sweep stopped early leaves whole tables."""
    cfg = small_sweep(tmp_path, ["masakhaner2:luo", "masakhaner2:wol"], seeds=[1, 2])
    run_sweep(cfg, runs_dir=tmp_path / "runs", jobs=1, progress=False, out=io.StringIO())
    order = [line.split(" ", 2)[2] for line in fake_train.read_text().splitlines() if line.strip()]
    seeds = [Path(d).name for d in order]
    assert seeds == ["seed1", "seed1", "seed2", "seed2"], order
    assert "luo" in order[0] and "wol" in order[1]


def test_save_state_does_not_change_a_runs_identity(tmp_path: Path, fake_train: Path) -> None:
    """A sweep finished with save_state: false (fast GPU) is continued by one that saves state."""
    runs_dir = tmp_path / "runs"
    run_sweep(small_sweep(tmp_path, ["masakhaner2:luo"], save_state=False), runs_dir=runs_dir,
              progress=False, out=io.StringIO())
    again = run_sweep(small_sweep(tmp_path, ["masakhaner2:luo", "masakhaner2:wol"]), runs_dir=runs_dir,
                      progress=False, out=io.StringIO())
    assert (again.total, again.finished_before) == (2, 1)
    assert len(launches_by_dir(fake_train)) == 2


def test_only_selects_a_slice_and_the_rest_continues_later(tmp_path: Path, fake_train: Path) -> None:
    """--only runs a slice of the grid (one target, some seeds); the full sweep then runs only the rest."""
    data = {"base": {"epochs": 1},
            "grid": {"targets": ["masakhaner2:luo", "masakhaner2:wol"], "sources": ["masakhaner2:en", "related"],
                     "methods": ["target-only", "jt"], "seeds": [1, 2, 3]}}
    cfg = write_sweep(tmp_path / "sweep.yaml", data)
    runs_dir = tmp_path / "runs"
    out = io.StringIO()
    outcome = run_sweep(cfg, runs_dir=runs_dir, only=["targets=masakhaner2:luo", "seed=2,3"],
                        related=fake_related, progress=False, out=out)
    # luo: target-only + jt(en) + jt(related = swa), seeds 2 and 3
    assert (outcome.total, outcome.finished, outcome.exit_code) == (6, 6, 0)
    text = out.getvalue()
    assert "--only targets=masakhaner2:luo seed=2,3: 6 of 15" in text
    ran = launches_by_dir(fake_train)
    assert all("masakhaner2-luo" in d and not d.endswith("seed1") for d in ran) and len(ran) == 6

    # the selection matches `related` as written and as resolved
    again = run_sweep(cfg, runs_dir=runs_dir, only=["source=related", "seed=2"], related=fake_related,
                      dry_run=True, progress=False, out=io.StringIO())
    assert (again.total, again.finished_before) == (2, 1)  # luo's jt(swa) seed 2 finished, wol's jt(en) not
    resolved = run_sweep(cfg, runs_dir=runs_dir, only=["source=masakhaner2:swa"], related=fake_related,
                         dry_run=True, progress=False, out=io.StringIO())
    assert resolved.total == 3

    full = run_sweep(cfg, runs_dir=runs_dir, related=fake_related, progress=False, out=io.StringIO())
    assert (full.total, full.finished_before, full.finished) == (15, 6, 9)  # wol: jt(related) is jt(en)
    assert sum(launches_by_dir(fake_train).values()) == 15  # no run twice


def test_only_errors_name_the_fix() -> None:
    runs = expand_sweep({"grid": {"targets": ["nusax:balinese"], "methods": ["jt", "metaxl"],
                                  "sources": ["nusax:english", ["nusax:english", "nusax:indonesian"]],
                                  "rtn_layers": [12, [0, 12]]}})
    assert len(select_runs(runs, parse_only(["source=nusax:english+nusax:indonesian"]))) == 3
    assert len(select_runs(runs, parse_only(["method=metaxl", "rtn_layers=0+12"]))) == 2
    assert len(select_runs(runs, parse_only(["rtn_layers=12,0+12", "method=metaxl"]))) == 4
    assert select_runs(runs, {}) == runs
    with pytest.raises(ConfigError, match="its values are method: 'jt', 'metaxl'"):
        select_runs(runs, parse_only(["method=jt-rtn"]))
    with pytest.raises(ConfigError, match="unknown key 'tgt'"):
        parse_only(["tgt=nusax:balinese"])
    with pytest.raises(ConfigError, match="write KEY=VALUE"):
        parse_only(["nusax:balinese"])
    with pytest.raises(ConfigError, match="given twice"):
        parse_only(["seed=1", "seeds=2"])
    with pytest.raises(ConfigError, match="seed='x' is not a valid int"):
        parse_only(["seed=x"])


def _ner_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    for split in ("train", "dev", "test"):
        (path / f"{split}.txt").write_text("Kofi B-PER\nwalks O\n\n")
    return path


def test_missing_data_stops_the_sweep_before_any_launch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With `metaxl train` as the child, a data set that does not resolve here refuses the sweep at once."""
    monkeypatch.delenv("METAXL_TRAIN_CMD", raising=False)
    good = _ner_folder(tmp_path / "data" / "good")
    cfg = write_sweep(tmp_path / "sweep.yaml", {
        "base": {"epochs": 1, "data_dir": str(tmp_path / "data")},
        "grid": {"targets": [str(good), "masakhaner2:xx"], "sources": [str(good)],
                 "methods": ["target-only", "jt"], "seeds": [1, 2]},
    })
    runs_dir = tmp_path / "runs"
    with pytest.raises(DataError) as err:
        run_sweep(cfg, runs_dir=runs_dir, out=io.StringIO(), progress=False)
    msg = str(err.value)
    assert "1 data set(s) of this sweep are not found here, so 4 of the 8 runs to do would fail" in msg
    assert "masakhaner2:xx (4 runs)" in msg and "nothing was launched" in msg
    assert "masakhaner2:xx: " in msg and "--only" in msg
    assert not runs_dir.exists()

    # the dry run shows the same as a warning, then the plan
    out = io.StringIO()
    run_sweep(cfg, runs_dir=runs_dir, dry_run=True, out=out, progress=False)
    assert "warning: 1 data set(s)" in out.getvalue() and "new        auto/good/jt/src-good/n1000/seed1" in out.getvalue()

    # the slice whose data are here passes the check
    runs = [r for r in expand_sweep(load_sweep(cfg)) if r.config.target == str(good)]
    assert len(runs) == 4 and sweep_mod.missing_data(runs) == []
    # a missing source counts too, once per run that needs it; target-only runs do not need it
    bad_src = expand_sweep({"base": {"data_dir": str(tmp_path / "data")},
                            "grid": {"targets": [str(good)], "sources": ["nusax:nowhere"],
                                     "methods": ["target-only", "jt", "metaxl"]}})
    assert [(name, n) for name, _, n in sweep_mod.missing_data(bad_src)] == [("nusax:nowhere", 2)]


def test_custom_train_command_skips_the_data_check(tmp_path: Path, fake_train: Path) -> None:
    cfg = small_sweep(tmp_path, ["masakhaner2:xx"])
    outcome = run_sweep(cfg, runs_dir=tmp_path / "runs", out=io.StringIO(), progress=False)
    assert outcome.finished == 1 and launches_by_dir(fake_train)

"""Data parallelism: a step on 2 gloo processes equals the single-process step on the global batch.

The module-scoped fixture starts two worker processes (forked from pytest on Linux, else this file
run as a script) with ``RANK=0/1``, ``WORLD_SIZE=2``, ``MASTER_ADDR=127.0.0.1`` and a free
``MASTER_PORT`` (what torchrun sets), so the real :func:`metaxl.distributed.init_from_env` builds
the process group. Each rank takes its shard of the
same global batches and runs every case (method x optimiser); the test process then runs the same
cases single-process on the global batches and compares theta and phi.

Exactness needs per-example-mean losses over equal shards: float64 tiny BERT, dropout 0, sequence
classification (token classification averages over tokens, whose count differs between shards).
MetaXL gets explicit meta batches whose rank shards concatenate to the global meta batch.

``broken`` cases patch :func:`metaxl.meta.allreduce_mean` to skip averaging (all calls, or only the
k-th call of the step: g, g', phi's hypergradient, theta's gradient) and must *differ* from
the single-process step, so the comparison can fail and every averaging point is needed.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

WORLD = 2
STEPS = 1
TOL = 1e-5
SOURCE = 1  # per-source RTNs, source 1: group 0 gets no gradient on any rank

# (name, method, hypergrad, optimiser, max_grad_norm); sgd clips (0.05 is below the gradient norm)
CASES: list[tuple[str, str, str, str, float]] = []
for _opt, _clip in (("sgd", 0.05), ("adamw", 10.0)):
    CASES += [
        (f"target-only-{_opt}", "target-only", "exact", _opt, _clip),
        (f"jt-{_opt}", "jt", "exact", _opt, _clip),
        (f"jt-rtn-{_opt}", "jt-rtn", "exact", _opt, _clip),
        (f"metaxl-exact-{_opt}", "metaxl", "exact", _opt, _clip),
        (f"metaxl-fd-{_opt}", "metaxl", "finite-difference", _opt, _clip),
    ]
# broken: (name, base case, index of the skipped allreduce_mean call in step 1, None = every call)
BROKEN: list[tuple[str, str, int | None]] = [
    ("target-only-noavg", "target-only-sgd", None),
    ("jt-noavg", "jt-adamw", None),
    ("jt-rtn-noavg", "jt-rtn-sgd", None),
    ("metaxl-exact-noavg", "metaxl-exact-sgd", None),
    ("metaxl-fd-noavg", "metaxl-fd-adamw", None),
]
for _k, _what in enumerate(("g", "gmeta", "hypergrad", "theta")):  # the order of the calls in a step
    BROKEN.append((f"metaxl-exact-skip-{_what}", "metaxl-exact-sgd", _k))
_CASE = {c[0]: c for c in CASES}


# ---------------------------------------------------------------------------- shared by both sides
def _build(method: str, hypergrad: str, opt: str, clip: float, diagnostics: bool = True) -> tuple[Any, Any, Any]:
    """A fresh learner with deterministic weights (identical in every process); ``diagnostics``:
    the default meta-loss probe (step 0 probes, adding allreduce calls that do not change the step)."""
    from conftest import tiny_bert_config
    from transformers import BertForSequenceClassification

    from metaxl.config import TrainConfig
    from metaxl.meta import Learner
    from metaxl.rtn import RTNInjector

    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(num_labels=3)).double().train()
    inj = None
    if method in ("jt-rtn", "metaxl"):
        inj = RTNInjector(model, [0, 2], variant="gated", hidden=4, num_sources=2, per_source=True).double()
        with torch.no_grad():  # the gated RTN starts near identity: give it a non-trivial start
            for p in inj.parameters():
                p.add_(0.3 * torch.randn_like(p))
    cfg = TrainConfig(method=method, hypergrad=hypergrad, inner_lr=0.5 if method == "metaxl" else None,
                      fd_epsilon=1e-3, max_grad_norm=clip, virtual_from_layer=0,
                      **({} if diagnostics else {"diagnostics_every": 0}))

    def make(params: list[torch.nn.Parameter], lr: float) -> tuple[torch.optim.Optimizer, Any]:
        o: torch.optim.Optimizer = (torch.optim.SGD(params, lr=lr) if opt == "sgd"
                                    else torch.optim.AdamW(params, lr=lr / 10, weight_decay=0.01))
        return o, torch.optim.lr_scheduler.LambdaLR(o, lambda _: 1.0)

    opt_t, sched_t = make(list(model.parameters()), 0.5)
    opt_p, sched_p = make(list(inj.parameters()), 0.5) if inj is not None else (None, None)
    learner = Learner(model, inj, cfg, opt_t, sched_t, opt_p, sched_p, contextlib.nullcontext)
    return model, inj, learner


def _global_batches() -> list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """(source, target, meta) global batches of 4 examples each, with ragged padding."""
    g = torch.Generator().manual_seed(1234)

    def batch(n: int = 4, length: int = 7) -> dict[str, torch.Tensor]:
        ids = torch.randint(4, 64, (n, length), generator=g)
        lens = torch.randint(3, length + 1, (n,), generator=g)
        mask = (torch.arange(length)[None, :] < lens[:, None]).long()
        ids = ids * mask
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (n,), generator=g)}

    return [(batch(), batch(), batch()) for _ in range(STEPS)]


def _run(name: str, rank: int = 0, world: int = 1, diagnostics: bool = True) -> dict[str, list[torch.Tensor]]:
    """STEPS steps of case ``name`` on this rank's shards; returns theta and phi (and the start)."""
    from metaxl.distributed import shard_batch

    _, method, hypergrad, opt, clip = _CASE[name]
    model, inj, learner = _build(method, hypergrad, opt, clip, diagnostics)
    start = [p.detach().clone() for p in model.parameters()] + (
        [p.detach().clone() for p in inj.parameters()] if inj is not None else [])
    for src, tgt, meta in _global_batches():
        src, tgt, meta = (shard_batch(b, rank, world) for b in (src, tgt, meta))
        stats = learner.step(src if method != "target-only" else None, SOURCE, tgt,
                             meta if method == "metaxl" else None)
        assert stats.loss == stats.loss
    return {"theta": [p.detach().clone() for p in model.parameters()],
            "phi": [p.detach().clone() for p in inj.parameters()] if inj is not None else [],
            "start": start}


def _worker(out_dir: str) -> None:
    torch.set_num_threads(1)
    import metaxl.meta as meta_mod
    from metaxl.distributed import barrier, cleanup, init_from_env

    info = init_from_env("cpu", timeout_s=60)
    assert info.world_size == WORLD and info.backend == "gloo" and info.owned, info
    results: dict[str, Any] = {name: _run(name, info.rank, info.world_size) for name in _CASE}
    real = meta_mod.allreduce_mean
    for name, base, skip in BROKEN:
        calls = [0]

        def patched(tensors: list[torch.Tensor], skip: int | None = skip, calls: list[int] = calls) -> None:
            k, calls[0] = calls[0], calls[0] + 1
            if skip is None or k == skip:
                return
            real(tensors)

        meta_mod.allreduce_mean = patched  # type: ignore[assignment]
        try:
            # without the diagnostics' probe, so call k of the step is the k-th averaging point
            results[name] = _run(base, info.rank, info.world_size, diagnostics=False)
        finally:
            meta_mod.allreduce_mean = real
    torch.save(results, Path(out_dir) / f"rank{info.rank}.pt")
    barrier()
    cleanup()


# ---------------------------------------------------------------------------- the two-process run
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(rank: int, port: int) -> dict[str, str]:
    """What torchrun sets for each process (plus: CPU only, one thread, gloo on loopback)."""
    env = dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", METAXL_DIST_BACKEND="gloo")
    if sys.platform.startswith("linux") and "GLOO_SOCKET_IFNAME" not in os.environ:
        env["GLOO_SOCKET_IFNAME"] = "lo"
    return env


def _train_worker(out_dir: str) -> None:
    """``metaxl train`` in one rank: the config comes from ``dist.yaml``, the results go to JSON."""
    import json

    from metaxl.config import TrainConfig
    from metaxl.distributed import cleanup, get_rank
    from metaxl.train import train

    torch.set_num_threads(1)
    cfg = TrainConfig.from_yaml(Path(out_dir) / "dist.yaml")
    try:
        results = train(cfg, log=lambda *_: None)
        rank = get_rank()
    finally:
        cleanup()
    (Path(out_dir) / f"train{rank}.json").write_text(json.dumps(results, default=str))


_JOBS = {"steps": _worker, "train": _train_worker}


def _forked(rank: int, port: int, out: str, job: str) -> None:
    """Entry point of a forked worker: the env vars as torchrun would set them, then the worker."""
    os.environ.update(_env(rank, port))
    try:
        _JOBS[job](out)
    except BaseException:
        import traceback

        (Path(out) / f"rank{rank}.log").write_text(traceback.format_exc())
        raise


def _launch(out: Path, job: str = "steps", timeout: float = 150.0) -> tuple[int, str]:
    """Run both ranks. Forked from this process where possible (no second import of torch and
    transformers: a few seconds instead of ~30 on a busy 2-core machine), else as fresh interpreters
    running this file (``METAXL_TEST_DIST=subprocess`` forces that)."""
    import multiprocessing as mp

    port = _free_port()
    if "fork" in mp.get_all_start_methods() and os.environ.get("METAXL_TEST_DIST") != "subprocess":
        ctx = mp.get_context("fork")
        forks = [ctx.Process(target=_forked, args=(rank, port, str(out), job), daemon=True) for rank in range(WORLD)]
        for f in forks:
            f.start()
        deadline = time.time() + timeout
        for f in forks:
            f.join(max(deadline - time.time(), 1.0))
        for f in forks:
            if f.is_alive():
                f.kill()
                f.join()
        logs = [(out / f"rank{r}.log").read_text() if (out / f"rank{r}.log").exists() else "" for r in range(WORLD)]
        worst = next((f.exitcode for f in forks if f.exitcode != 0), 0)
        return int(worst or 0), "\n----\n".join(logs)
    procs = [
        subprocess.Popen([sys.executable, __file__, str(out), job], env=dict(os.environ, **_env(rank, port)),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in range(WORLD)
    ]
    texts, worst = [], 0
    for p in procs:
        try:
            text, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            text, _ = p.communicate()
            text += "\n[timed out]"
        texts.append(text)
        worst = worst or (p.returncode or 0)
    return worst, "\n----\n".join(texts)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("dist")
    single = {name: _run(name) for name in _CASE}  # first: also imports everything the forks need
    for _attempt in range(2):  # a second try in case another process grabbed the port
        rc, log = _launch(out)
        if rc == 0:
            break
    assert rc == 0, f"distributed workers failed:\n{log[-6000:]}"
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return {"ranks": ranks, "single": single}


def _max_diff(a: dict[str, list[torch.Tensor]], b: dict[str, list[torch.Tensor]], key: str) -> float:
    return max((float((x - y).abs().max()) for x, y in zip(a[key], b[key], strict=True)), default=0.0)


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_two_rank_step_equals_single_process_step(two_ranks, name):
    ref = two_ranks["single"][name]
    moved = _max_diff({"x": ref["theta"] + ref["phi"]}, {"x": ref["start"]}, "x")
    assert moved > 1e-3, "degenerate case: the step did not move the parameters"
    for rank, res in enumerate(two_ranks["ranks"]):
        for key in ("theta", "phi"):
            assert len(res[name][key]) == len(ref[key])
            diff = _max_diff(res[name], ref, key)
            assert diff < TOL, f"{name} rank {rank}: {key} differs from the single-process step by {diff:.2e}"
    if _CASE[name][1] in ("jt-rtn", "metaxl"):
        phi_moved = _max_diff({"x": ref["phi"]}, {"x": ref["start"][-len(ref["phi"]):]}, "x")
        assert phi_moved > 1e-6, f"{name}: phi did not move, so the phi comparison proves nothing"


@pytest.mark.parametrize("name,base,skip", BROKEN)
def test_without_averaging_the_step_differs(two_ranks, name, base, skip):
    ref = two_ranks["single"][base]
    res = two_ranks["ranks"][0][name]
    diff = max(_max_diff(res, ref, "theta"), _max_diff(res, ref, "phi"))
    assert diff > 10 * TOL, f"{name}: skipping allreduce call {skip} did not change the step ({diff:.2e})"


# ---------------------------------------------------------------------------- the training loop
def _train_is_distributed() -> bool:
    import importlib
    import inspect

    return "init_from_env" in inspect.getsource(importlib.import_module("metaxl.train"))


@pytest.mark.skipif(not _train_is_distributed(), reason="metaxl.train does not set up torch.distributed yet")
def test_two_process_training_run_matches_the_single_process_run(toy_data, tiny_model, tmp_path):
    """``metaxl train`` (MetaXL, split meta batch) on 2 ranks = 1 process with the same global batch:
    same final weights and RTNs (float32 roundoff), rank 0's results on every rank, world_size 2."""
    import json
    import shutil

    from safetensors.torch import load_file

    from metaxl.config import TrainConfig
    from metaxl.train import train

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # dropout masks differ per rank
    (model_dir / "config.json").write_text(json.dumps(config))
    cfg = TrainConfig(target=str(toy_data / "sa-tgt"), source=[str(toy_data / "sa-src")], model=str(model_dir),
                      method="metaxl", epochs=1, batch_size=8, target_size=16, source_size=24, lr=5e-4,
                      meta_lr=1e-3, rtn_hidden=8, max_length=32, warmup=0.0, device="cpu", progress=False,
                      output_dir=str(tmp_path / "single"))
    single = train(cfg, log=lambda *_: None)
    work = tmp_path / "work"
    work.mkdir()
    cfg.replace(output_dir=str(tmp_path / "dist")).to_yaml(work / "dist.yaml")
    rc, log = _launch(work, "train")
    assert rc == 0, f"distributed training failed:\n{log[-6000:]}"
    ranks = [json.loads((work / f"train{r}.json").read_text()) for r in range(WORLD)]
    assert ranks[0] == ranks[1], "every rank returns rank 0's results"
    on_disk = json.loads((tmp_path / "dist" / "results.json").read_text())
    assert on_disk["world_size"] == WORLD and on_disk["status"] == "finished"
    assert on_disk["epochs"][0]["steps"] == single["epochs"][0]["steps"] == 3
    assert on_disk["epochs"][0]["train_loss"] == pytest.approx(single["epochs"][0]["train_loss"], abs=1e-5)
    for name in ("checkpoint/model.safetensors", "rtn.safetensors"):
        a, b = load_file(str(tmp_path / "single" / name)), load_file(str(tmp_path / "dist" / name))
        assert a.keys() == b.keys()
        diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        assert diff < 1e-5, f"{name}: 2-process weights differ from the single process by {diff:.2e}"


# ---------------------------------------------------------------------------- helpers, no processes
def test_shards_concatenate_to_the_global_batch():
    from metaxl.distributed import even_split, shard, shard_batch

    for n in range(0, 12):
        for world in (1, 2, 3, 4):
            items = list(range(n))
            parts = [shard(items, r, world) for r in range(world)]
            assert sum(parts, []) == items
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
            assert even_split(n, world) == (n >= world and all(len(p) == n // world for p in parts))
    batch = {"input_ids": torch.arange(10).view(5, 2), "labels": torch.arange(5)}
    parts = [shard_batch(batch, r, 2) for r in range(2)]
    for key in batch:
        assert torch.equal(torch.cat([p[key] for p in parts]), batch[key])
    with pytest.raises(ValueError):
        shard([1, 2], 2, 2)


def test_init_from_env_is_a_no_op_for_a_single_process(monkeypatch):
    from metaxl.distributed import DistInfo, broadcast_object, init_from_env, is_main, local_device
    from metaxl.errors import ConfigError

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert init_from_env() == DistInfo()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_from_env("cpu") == DistInfo()
    assert not torch.distributed.is_initialized()
    assert is_main() and broadcast_object({"a": 1}) == {"a": 1}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        init_from_env("cpu")
    assert not is_main()
    info = DistInfo(rank=1, world_size=2, local_rank=1, is_main=False)
    assert local_device(torch.device("cuda"), info) == torch.device("cuda", 1)
    assert local_device(torch.device("cuda", 0), info) == torch.device("cuda", 0)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    _JOBS[sys.argv[2] if len(sys.argv) > 2 else "steps"](sys.argv[1])

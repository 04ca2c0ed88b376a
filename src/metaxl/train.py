"""The training loop: one loop for every method (target-only, JT, JT+RTN, MetaXL).

Epochs run over the source set (over the target set for target-only) with the target set cycling,
as in the paper. Dev is evaluated after every epoch; the best epoch's model is saved and the test
set evaluated there. ``results.json`` in the output folder holds every epoch's metrics.

Under ``torchrun``/``accelerate launch`` (see docs/distributed.md) every process draws the same
global batches and trains on its shard; gradients are averaged in :mod:`metaxl.meta`, and only
rank 0 writes.

>>> from metaxl.config import TrainConfig
>>> from metaxl.train import train
>>> results = train(TrainConfig(target="masakhaner2:luo", source=["masakhaner2:en"],
...                             method="metaxl", epochs=2, output_dir="runs/luo"))  # doctest: +SKIP
>>> results["test"]["f1"]                                                            # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import TrainConfig
from .data import Example
from .errors import ConfigError, DataError
from .threads import THREADS_FILE_ENV, ThreadsFile

STATE_DIR = "train_state"


# ---------------------------------------------------------------------------- setup helpers
def code_version() -> dict[str, str | None]:
    """The metaxl version that ran and, where it runs from a git checkout of this project, the
    commit (``+dirty`` when ``src/metaxl`` has uncommitted changes): ``results.json`` records it, so
    runs of older code can be told apart (e.g. finite-difference runs before commit 9dead71).

    >>> v = code_version()
    >>> sorted(v), v["metaxl"] == __import__("metaxl").__version__
    (['git', 'metaxl'], True)
    """
    import subprocess

    from . import __version__

    here = Path(__file__).resolve().parent
    git: str | None = None

    def run(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    top = run("rev-parse", "--show-toplevel")
    # only this project's checkout: an installed copy inside some other repository has no commit of ours
    if top is not None and Path(top).resolve() / "src" / "metaxl" == here:
        head = run("rev-parse", "--short=12", "HEAD")
        if head:
            dirty = run("status", "--porcelain", "--", ".")
            git = head + ("+dirty" if dirty else "")
    return {"metaxl": __version__, "git": git}


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; checks that an explicit cuda device exists."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, mps)") from None


def autocast_factory(device: torch.device, precision: str) -> Any:
    """The autocast of a run (bf16 on CUDA or the CPU, fp16 on CUDA): :func:`metaxl.precision.autocast_factory`."""
    from .precision import autocast_factory as factory

    return factory(device, precision)


@dataclass
class PreparedData:
    task: str
    labels: list[str]
    target_train: list[Example]
    sources: list[list[Example]]
    dev: list[Example]
    test: list[Example]
    source_names: list[str]


def prepare_data(cfg: TrainConfig) -> PreparedData:
    """Resolve, read, subsample and check every data set before anything is written."""
    from .data import resolve_dataset, subsample
    from .tasks import check_labels, reconcile_labels

    task = None if cfg.task == "auto" else cfg.task
    target = resolve_dataset(cfg.target, cfg.data_dir, task=task, sa_labels=cfg.sa_labels)
    task = target.task
    data_seed = cfg.data_seed if cfg.data_seed is not None else cfg.seed
    target_train: list[Example] = subsample(target.load("train"), cfg.target_size, data_seed)
    dev: list[Example] = subsample(target.load("dev"), cfg.dev_size, data_seed)
    test: list[Example] = subsample(target.load("test"), cfg.test_size, data_seed)
    sources: list[list[Example]] = []
    source_names: list[str] = []
    if cfg.method != "target-only":
        for k, spec in enumerate(cfg.source):
            corpus = resolve_dataset(spec, cfg.data_dir, task=task, sa_labels=cfg.sa_labels)
            if corpus.task != task:
                raise DataError(f"source {spec} is a {corpus.task} data set but target {cfg.target} is {task}")
            sources.append(subsample(corpus.load("train"), cfg.source_size, data_seed + k))
            source_names.append(corpus.name)
    labels = reconcile_labels(task, target_train, sources)
    check_labels(dev, labels, f"{cfg.target} dev")
    check_labels(test, labels, f"{cfg.target} test")
    return PreparedData(task, labels, target_train, sources, dev, test, source_names)


GROUP_CHUNK = 50
"""``group_by_length``: batches are formed within chunks of this many batches."""


def batches(features: list[dict[str, Any]], batch_size: int, generator: torch.Generator,
            shuffle: bool = True, group_by_length: bool = False) -> Iterator[list[dict[str, Any]]]:
    """One pass over ``features`` in batches (shuffled with ``generator``).

    ``group_by_length``: the shuffled order is cut into chunks of ``GROUP_CHUNK`` batches, each
    chunk sorted by length into batches of similar lengths, and the batches (and the examples in
    each) are shuffled, so a batch pads to about its own lengths.

    >>> feats = [{"input_ids": [0] * n} for n in (9, 2, 8, 3, 7, 1)]
    >>> [sorted(len(f["input_ids"]) for f in b)
    ...  for b in batches(feats, 2, torch.Generator().manual_seed(0), group_by_length=True)]
    [[8, 9], [1, 2], [3, 7]]
    """
    order = torch.randperm(len(features), generator=generator).tolist() if shuffle else list(range(len(features)))
    if not group_by_length:
        for i in range(0, len(order), batch_size):
            yield [features[j] for j in order[i : i + batch_size]]
        return
    groups: list[list[int]] = []
    span = batch_size * GROUP_CHUNK
    for c in range(0, len(order), span):
        chunk = sorted(order[c : c + span], key=lambda j: len(features[j]["input_ids"]), reverse=True)
        groups += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    if shuffle:  # batch order, and the order inside a batch (MetaXL splits a target batch in halves)
        groups = [groups[g] for g in torch.randperm(len(groups), generator=generator).tolist()]
        groups = [[group[k] for k in torch.randperm(len(group), generator=generator).tolist()] for group in groups]
    for group in groups:
        yield [features[j] for j in group]


def cycle(features: list[dict[str, Any]], batch_size: int, generator: torch.Generator,
          group_by_length: bool = False) -> Iterator[list[dict[str, Any]]]:
    """Endless shuffled batches: the target set cycles while epochs run over the source set."""
    while True:
        yield from batches(features, batch_size, generator, group_by_length=group_by_length)


def theta_groups(model: Any, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Optimiser groups for the model: the encoder at ``lr`` (group 0, whose lr is also the
    virtual-step lr), the task head (parameters above every layer) at ``head_lr``."""
    from .meta import num_layers, param_depth

    depth = num_layers(model)
    encoder: list[torch.nn.Parameter] = []
    head: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (head if param_depth(name, depth) > depth else encoder).append(p)
    if cfg.head_lr is None:
        return [{"params": encoder + head, "lr": cfg.lr}]
    return [{"params": encoder, "lr": cfg.lr}, {"params": head, "lr": cfg.head_lr}]


# ---------------------------------------------------------------------------- evaluation
@torch.inference_mode()  # no autograd bookkeeping at all (no_grad still tracks versions and views)
def predict_features(model: Any, features: list[dict[str, Any]], pad_id: int, batch_size: int,
                     device: torch.device, autocast: Any = contextlib.nullcontext) -> list[torch.Tensor]:
    """Logits for every feature, in the order given (one tensor per example, padding removed).

    Batches are formed from length-sorted features so that a batch pads to lengths close to its
    own (NER dev/test sets mix 5- and 120-token sentences; in given order batches of 64 pad
    MasakhaNER bam dev to 2.1x its real tokens, sorted to 1.1x: ``benchmarks/eval_cost.py``).
    Padding is masked, so the logits do not depend on the batching.
    """
    from .tasks import collate

    model.eval()
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]), reverse=True)
    out: list[torch.Tensor] = [torch.empty(0)] * len(features)  # every slot is filled below
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        batch = collate([features[j] for j in idx], pad_id)
        batch.pop("labels", None)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            logits = model(**batch).logits.float().cpu()
        for row, j in enumerate(idx):
            out[j] = logits[row, : len(features[j]["input_ids"])] if logits.dim() == 3 else logits[row]
    return out


def evaluate(model: Any, task: str, examples: list[Any], features: list[dict[str, Any]], labels: list[str],
             pad_id: int, batch_size: int, device: torch.device, autocast: Any = contextlib.nullcontext
             ) -> tuple[dict[str, Any], list[Any]]:
    """Metrics (percent; ``f1`` is the headline) and predictions of ``model`` on ``examples``."""
    from .tasks import compute_metrics, predictions_to_labels

    logits = predict_features(model, features, pad_id, batch_size, device, autocast)
    id2label = dict(enumerate(labels))
    pred = predictions_to_labels(task, features, logits, id2label)
    gold = [list(e.tags) for e in examples] if task == "ner" else [e.label for e in examples]
    return compute_metrics(task, gold, pred, labels), pred


# ---------------------------------------------------------------------------- results
def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _grad_ok(model: Any) -> None:
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("the model has no trainable parameters")


# ---------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, resume: bool = False, log: Any = print) -> dict[str, Any]:
    """Train ``cfg.method`` and return the results dict also written to ``results.json``.

    With ``resume=True`` the training state is saved after every epoch (``train_state/``, deleted
    at the end) and an interrupted run in the same output folder continues where it stopped.

    Everything that can fail on user input (config values, data files, labels, the model) is
    checked before the output folder is touched.
    """
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    from .checkpoint import load_training_state_dict, save_checkpoint
    from .distributed import (
        all_mean,
        broadcast_module,
        broadcast_object,
        init_from_env,
        local_device,
        set_rank_seed,
        shard,
    )
    from .meta import Learner, enable_gradient_checkpointing
    from .models import load_model, load_tokenizer
    from .rtn import RTNInjector, encoder_parts, resolve_layers
    from .tasks import collate, encode

    cfg.validate()
    dist = init_from_env(cfg.device)  # no-op for a single process
    device = local_device(resolve_device(cfg.device), dist)
    if not dist.is_main:
        log = lambda *_a, **_k: None  # noqa: E731
    if dist.enabled:
        need = 2 * dist.world_size if cfg.method == "metaxl" and cfg.meta_batch == "split" else dist.world_size
        if cfg.batch_size < dist.world_size or cfg.tgt_batch_size < need:
            raise ConfigError(f"{dist.world_size} processes need --batch-size >= {dist.world_size} and a target "
                              f"batch >= {need} (the global batch is split across processes)")
    autocast = autocast_factory(device, cfg.precision)
    data = prepare_data(cfg)
    tokenizer = load_tokenizer(cfg.model)
    set_seed(cfg.seed)
    model = load_model(cfg.model, data.task, data.labels)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if isinstance(max_pos, int):
        limit = max_pos - (2 if getattr(model.config, "model_type", "") in ("roberta", "xlm-roberta", "camembert") else 0)
        if cfg.max_length > limit:
            raise ConfigError(f"--max-length {cfg.max_length} is longer than model {cfg.model!r} supports "
                              f"({limit} positions); use --max-length {limit} or less")
    if cfg.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    _grad_ok(model)
    uses_rtn = cfg.method in ("jt-rtn", "metaxl")
    if uses_rtn:
        resolve_layers(cfg.rtn_layers, len(encoder_parts(model)[1]))  # clear error before writing
    label2id = {label: i for i, label in enumerate(data.labels)}
    enc = lambda exs: encode(data.task, exs, tokenizer, label2id, cfg.max_length)  # noqa: E731
    tgt_feats = enc(data.target_train)
    src_feats = [enc(s) for s in data.sources]
    dev_feats, test_feats = enc(data.dev), enc(data.test)
    for name, feats in [("target train", tgt_feats), ("dev", dev_feats), ("test", test_feats)] + [
        (f"source {n}", f) for n, f in zip(data.source_names, src_feats, strict=True)
    ]:
        if not feats:
            raise DataError(f"the {name} split is empty after subsampling/filtering; check the data and sizes")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # ---- output folder (only now: every input has been checked)
    out = Path(cfg.output_dir)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.to_yaml(out / "config.yaml")

    model.to(device)
    injector = None
    if uses_rtn:
        torch.manual_seed(cfg.seed)
        injector = RTNInjector(model, cfg.rtn_layers, cfg.rtn_variant, cfg.rtn_hidden,
                               num_sources=len(src_feats), per_source=cfg.rtn_per_source,
                               detach_input=cfg.rtn_detach).to(device)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model, injector)
    # every rank starts from rank 0's weights (random task head, RTNs); dropout then differs per rank
    broadcast_module(model)
    if injector is not None:
        broadcast_module(injector)
    set_rank_seed(cfg.seed, dist)

    steps_per_epoch = math.ceil(
        (sum(len(f) for f in src_feats) if cfg.method != "target-only" else len(tgt_feats)) / cfg.batch_size
    )
    main_steps = steps_per_epoch * cfg.epochs
    total_epochs = cfg.epochs + cfg.backoff_epochs
    opt_theta = torch.optim.AdamW(theta_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched_theta = get_linear_schedule_with_warmup(opt_theta, int(cfg.warmup * main_steps), main_steps)
    opt_phi = sched_phi = None
    if injector is not None:
        phi_lr = cfg.lr if cfg.method == "jt-rtn" else cfg.meta_lr
        opt_phi = torch.optim.AdamW(injector.parameters(), lr=phi_lr, weight_decay=cfg.weight_decay)
        sched_phi = get_linear_schedule_with_warmup(opt_phi, int(cfg.warmup * main_steps), main_steps)
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
    learner = Learner(model, injector, cfg, opt_theta, sched_theta, opt_phi, sched_phi, autocast, scaler)

    gen = torch.Generator().manual_seed(cfg.seed)
    results: dict[str, Any] = {
        "status": "running", "config": cfg.to_dict(), "method": cfg.method, "task": data.task,
        "target": cfg.target, "source": data.source_names if cfg.method != "target-only" else [],
        "seed": cfg.seed, "source_size": cfg.source_size, "target_size": cfg.target_size,
        "rtn_layers": list(cfg.rtn_layers) if uses_rtn else [], "labels": data.labels,
        "sizes": {"target_train": len(tgt_feats), "source_train": [len(f) for f in src_feats],
                  "dev": len(dev_feats), "test": len(test_feats)},
        "epochs": [], "best_epoch": None, "dev": None, "test": None, "checkpoint": None,
        "device": str(device), "torch": torch.__version__, "world_size": dist.world_size,
        "code": code_version(),
    }
    start_epoch, best_f1, elapsed_before = 1, -1.0, 0.0
    best: Snapshot | None = None  # the best dev epoch's weights; the test set is evaluated on them once, at the end
    state_dir = out / STATE_DIR
    if resume and (state_dir / "state.pt").is_file():
        state = torch.load(state_dir / "state.pt", map_location=device, weights_only=False)
        load_training_state_dict(model, state["model"])
        opt_theta.load_state_dict(state["opt_theta"])
        sched_theta.load_state_dict(state["sched_theta"])
        if injector is not None:
            assert opt_phi is not None and sched_phi is not None
            injector.load_state_dict(state["rtn"])
            opt_phi.load_state_dict(state["opt_phi"])
            sched_phi.load_state_dict(state["sched_phi"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        results = state["results"]
        best = state.get("best")  # absent in states saved before test evaluation moved to the end
        set_rank_seed(cfg.seed + len(results["epochs"]), dist)
        start_epoch = results["epochs"][-1]["epoch"] + 1 if results["epochs"] else 1
        best_f1 = max([e["dev"]["f1"] for e in results["epochs"]], default=-1.0)
        elapsed_before = sum(e["seconds"] for e in results["epochs"])
        log(f"resuming {out} from epoch {start_epoch}")
    if dist.is_main:
        write_json(out / "results.json", results)

    tgt_iter = cycle(tgt_feats, cfg.tgt_batch_size, gen, cfg.group_by_length)
    t_start = time.time()
    threads_file = ThreadsFile.from_env()  # a sweep raises our threads when its other runs have ended

    def to_dev(feats: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in collate(feats, pad_id).items()}

    def local(feats: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """This rank's contiguous shard of a global batch (the whole batch for one process)."""
        return shard(feats, dist.rank, dist.world_size)

    for epoch in range(start_epoch, total_epochs + 1):
        backoff = epoch > cfg.epochs
        if backoff and learner.method != "jt":
            # paper sec. 4.6: continue the MetaXL model on joint-training data, no RTN
            learner.method = "jt"
            if injector is not None:
                injector.remove()
            back_steps = steps_per_epoch * cfg.backoff_epochs
            for group, lr in zip(opt_theta.param_groups, (cfg.lr, cfg.head_lr or cfg.lr), strict=False):
                group["lr"] = group["initial_lr"] = lr
            learner.sched_theta = get_linear_schedule_with_warmup(opt_theta, int(cfg.warmup * back_steps), back_steps)
        model.train()
        t0 = time.time()
        losses: list[float] = []
        meta_losses: list[float] = []
        phi_norms: list[float] = []
        skipped = 0
        if cfg.method == "target-only":
            plan: list[tuple[int | None, list[dict[str, Any]] | None]] = [
                (None, None) for _ in range(steps_per_epoch)
            ]
        else:
            plan = [(k, b) for k, f in enumerate(src_feats) for b in batches(f, cfg.batch_size, gen, group_by_length=cfg.group_by_length)]
            order = torch.randperm(len(plan), generator=gen).tolist() if len(src_feats) > 1 else range(len(plan))
            plan = [plan[i] for i in order]
        bar = tqdm(plan, desc=f"epoch {epoch}/{total_epochs} {learner.method}",
                   disable=not cfg.progress or not dist.is_main, leave=False, dynamic_ncols=True)
        for k, src in bar:
            if threads_file is not None and (n := threads_file.poll()) is not None and n != torch.get_num_threads():
                log(f"threads: {torch.get_num_threads()} -> {n} (set by the sweep through ${THREADS_FILE_ENV})")
                torch.set_num_threads(n)
            tgt = next(tgt_iter)
            meta: list[dict[str, Any]] | None = None
            if learner.method == "metaxl" and cfg.meta_batch == "separate":
                meta = next(tgt_iter)
            elif learner.method == "metaxl" and dist.enabled:
                # split the *global* target batch (as meta.split_batch) so rank shards of each half
                # concatenate to the single-process halves
                tgt, meta = tgt[: len(tgt) // 2], tgt[len(tgt) // 2 :]
            parts = [p for p in (src, tgt, meta) if p is not None]
            if dist.enabled and min(len(p) for p in parts) < dist.world_size:
                skipped += 1  # a tail batch too small to give every rank an example (same on all ranks)
                continue
            src_b = to_dev(local(src)) if src is not None else None
            meta_b = to_dev(local(meta)) if meta is not None else None
            stats = learner.step(src_b, k or 0, to_dev(local(tgt)), meta_b)
            loss = all_mean(stats.loss)  # the global-batch loss; every rank takes the same decision
            if not math.isfinite(loss):
                raise RuntimeError(f"training diverged at epoch {epoch}: loss {loss}; lower --lr")
            losses.append(loss)
            if stats.meta_loss is not None:
                meta_losses.append(all_mean(stats.meta_loss))
            if stats.phi_grad_norm is not None and math.isfinite(stats.phi_grad_norm):
                phi_norms.append(stats.phi_grad_norm)  # already averaged across processes
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        bar.close()
        dev_metrics, _ = evaluate(model, data.task, data.dev, dev_feats, data.labels, pad_id,
                                  cfg.eval_batch_size, device, autocast)
        row: dict[str, Any] = {
            "epoch": epoch, "phase": "backoff" if backoff else "main", "steps": len(plan) - skipped,
            "train_loss": float(np.mean(losses)) if losses else None,
            "meta_loss": float(np.mean(meta_losses)) if meta_losses else None,
            # MetaXL: the median norm of the hypergradient (phi's gradient) over the epoch's steps
            "phi_grad_norm": float(np.median(phi_norms)) if phi_norms else None,
            "lr": learner.current_lr(), "dev": dev_metrics,
        }
        improved = dev_metrics["f1"] > best_f1
        if improved:
            best_f1 = dev_metrics["f1"]
            best = Snapshot.take(model, injector)  # in back-off: the RTNs as the main phase left them
            results.update(best_epoch=epoch, dev=dev_metrics, test=None)
        row["seconds"] = time.time() - t0
        row["best"] = improved
        results["epochs"].append(row)
        log(f"epoch {epoch}/{total_epochs}: loss {row['train_loss']:.4f}  dev f1 {dev_metrics['f1']:.2f}"
            + ("  (best)" if improved else "") + f"  [{row['seconds']:.0f}s]"
            + (f"  ({skipped} tail batches smaller than {dist.world_size} skipped)" if skipped else ""))
        if dist.is_main:
            write_json(out / "results.json", results)
        if resume and cfg.save_state and epoch < total_epochs and not backoff and dist.is_main:
            _save_state(state_dir, model, injector, learner, gen, results, best)

    # the test set, once, on the best dev epoch's weights (not after every improvement: for NER, test
    # sets of ~1,300 sentences made that half of a run's time on CPU)
    if best is not None:
        t0 = time.time()
        best.restore(model, injector)
        test_metrics, _ = evaluate(model, data.task, data.test, test_feats, data.labels, pad_id,
                                   cfg.eval_batch_size, device, autocast)
        results["test"] = test_metrics
        if cfg.save_checkpoint and dist.is_main:
            save_checkpoint(out / "checkpoint", model, tokenizer, data.task, data.labels, cfg.max_length,
                            extra={"config": cfg.to_dict(), "epoch": results["best_epoch"], "dev": results["dev"],
                                   "test": test_metrics})
            results["checkpoint"] = "checkpoint"
            if best.rtn is not None:
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in best.rtn.items()}, str(out / "rtn.safetensors"))
        log(f"test f1 {test_metrics['f1']:.2f} (best dev epoch {results['best_epoch']})  [{time.time() - t0:.0f}s]")

    results["status"] = "finished"
    results["wall_seconds"] = elapsed_before + time.time() - t_start
    results = broadcast_object(results)  # rank 0's results (its evaluation) on every rank
    if dist.is_main:
        write_json(out / "results.json", results)
        if state_dir.exists():
            shutil.rmtree(state_dir)
    if injector is not None:
        injector.remove()
    return results


class Snapshot:
    """A CPU copy of what training changes (trainable parameters of the model, the RTNs' state).

    >>> net = torch.nn.Linear(2, 1)
    >>> before = net.weight.clone()
    >>> snap = Snapshot.take(net, None)
    >>> with torch.no_grad():
    ...     _ = net.weight.add_(1.0)
    >>> snap.restore(net, None)
    >>> torch.equal(net.weight, before)
    True
    """

    def __init__(self, params: dict[str, torch.Tensor], rtn: dict[str, torch.Tensor] | None) -> None:
        self.params = params
        self.rtn = rtn

    @classmethod
    def take(cls, model: Any, injector: Any) -> Snapshot:
        params = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
        rtn = None
        if injector is not None:
            rtn = {k: v.detach().to("cpu", copy=True) for k, v in injector.state_dict().items()}
        return cls(params, rtn)

    @torch.no_grad()
    def restore(self, model: Any, injector: Any) -> None:
        current = dict(model.named_parameters())
        for n, p in self.params.items():
            current[n].copy_(p)
        if injector is not None and self.rtn is not None:
            injector.load_state_dict(self.rtn)


def _save_state(state_dir: Path, model: Any, injector: Any, learner: Any, gen: torch.Generator,
                results: dict[str, Any], best: Snapshot | None = None) -> None:
    from .checkpoint import training_state_dict

    state_dir.mkdir(parents=True, exist_ok=True)
    state = {
        "model": training_state_dict(model), "opt_theta": learner.opt_theta.state_dict(),
        "sched_theta": learner.sched_theta.state_dict(),
        "rtn": injector.state_dict() if injector is not None else None,
        "opt_phi": learner.opt_phi.state_dict() if learner.opt_phi is not None else None,
        "sched_phi": learner.sched_phi.state_dict() if learner.sched_phi is not None else None,
        "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
        "results": results, "best": best,
    }
    tmp = state_dir / "state.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, state_dir / "state.pt")

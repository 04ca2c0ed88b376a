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
import logging
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
from .errors import ConfigError, DataError, MetaXLError
from .threads import THREADS_FILE_ENV, ThreadsFile

STATE_DIR = "train_state"
logger = logging.getLogger("metaxl")


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


class TargetCycle:
    """:func:`cycle` that can be saved mid-pass: the current pass's batches (as indices) and the
    position in it are its state, so a resumed run draws the same target batches as the
    uninterrupted one whatever the number of steps per epoch.

    >>> import itertools
    >>> feats = [{"input_ids": [i]} for i in range(5)]
    >>> a = TargetCycle(feats, 2, torch.Generator().manual_seed(0))
    >>> first = [next(a) for _ in range(4)]
    >>> b = TargetCycle(feats, 2, torch.Generator().manual_seed(0))
    >>> first == [next(b) for _ in range(4)] == list(itertools.islice(cycle(feats, 2, torch.Generator().manual_seed(0)), 4))
    True
    >>> saved, gen_state = b.state(), b.generator.get_state()
    >>> c = TargetCycle(feats, 2, torch.Generator().set_state(gen_state), state=saved)
    >>> [next(b) for _ in range(3)] == [next(c) for _ in range(3)]
    True
    """

    def __init__(self, features: list[dict[str, Any]], batch_size: int, generator: torch.Generator,
                 group_by_length: bool = False, state: dict[str, Any] | None = None) -> None:
        self.features, self.batch_size, self.generator = features, batch_size, generator
        self.group_by_length = group_by_length
        self.order: list[list[int]] = [list(b) for b in state["order"]] if state else []
        self.pos: int = int(state["pos"]) if state else 0

    def __iter__(self) -> TargetCycle:
        return self

    def __next__(self) -> list[dict[str, Any]]:
        if self.pos >= len(self.order):  # a new pass, drawn when needed (as cycle() draws it)
            index = [{"i": i, "input_ids": f["input_ids"]} for i, f in enumerate(self.features)]
            self.order = [[x["i"] for x in b] for b in batches(index, self.batch_size, self.generator,
                                                              group_by_length=self.group_by_length)]
            self.pos = 0
        self.pos += 1
        return [self.features[i] for i in self.order[self.pos - 1]]

    def state(self) -> dict[str, Any]:
        return {"order": [list(b) for b in self.order], "pos": self.pos}


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
    """``data`` as JSON (non-finite floats as null), written to a temporary file, synced and renamed."""
    from .guards import write_json_atomic

    write_json_atomic(path, data, path.name)


def _grad_ok(model: Any) -> None:
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("the model has no trainable parameters")


# ---------------------------------------------------------------------------- the loop
def phi_optimizer(params: Any, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """The RTNs' optimiser: AdamW (decoupled weight decay) or, with ``meta_optimizer=adam-l2``, the
    official code's Adam with the L2 term added to the gradient (with hypergradients of ~1e-9 per
    weight, that term dominates and pulls the RTN's output towards zero).

    >>> cfg = TrainConfig(meta_optimizer="adam-l2", meta_weight_decay=5e-4, meta_eps=1e-12)
    >>> opt = phi_optimizer(torch.nn.Linear(2, 2).parameters(), cfg, 1e-3)
    >>> type(opt).__name__, opt.defaults["weight_decay"], opt.defaults["eps"]
    ('Adam', 0.0005, 1e-12)
    """
    decay = cfg.weight_decay if cfg.meta_weight_decay is None else cfg.meta_weight_decay
    kind = torch.optim.Adam if cfg.meta_optimizer == "adam-l2" else torch.optim.AdamW
    return kind(params, lr=lr, eps=cfg.meta_eps, weight_decay=decay)


def probe_batch(features: list[dict[str, Any]], pad_id: int, device: torch.device, size: int = 16
                ) -> dict[str, torch.Tensor]:
    """A fixed batch for the RTN diagnostics: the first ``size`` source examples (every run of a
    sweep with the same source sample sees the same batch)."""
    from .tasks import collate

    return {k: v.to(device) for k, v in collate(features[:size], pad_id).items()}


def rtn_diagnostics(model: Any, injector: Any, probe: dict[str, torch.Tensor], initial: dict[str, torch.Tensor],
                    autocast: Any = contextlib.nullcontext) -> dict[str, Any]:
    """Is the RTN learning or idling? The relative change it makes to the probe batch's source
    token vectors (mean ``||RTN(h) - h|| / ||h||``, per layer and the mean) and the relative
    distance of its weights from their initial values."""
    with autocast():  # the run's precision (a bf16 run's probe forward in bf16 too)
        change = injector.relative_change(model, probe)
    mean = {key: round(float(np.mean([c[key] for c in change.values()])), 6) for key in ("change", "norm_ratio", "cosine")}
    return {"rel_change": mean["change"], "norm_ratio": mean["norm_ratio"], "cosine": mean["cosine"],
            "by_layer": {str(k): v for k, v in change.items()},
            "weight_drift": round(injector.weight_drift(initial), 6)}


def train(cfg: TrainConfig, resume: bool = False, log: Any = print, *, prepared: PreparedData | None = None,
          model: Any = None, tokenizer: Any = None, artifacts: dict[str, Any] | None = None,
          on_setup: Any = None) -> dict[str, Any]:
    """Train ``cfg.method`` and return the results dict also written to ``results.json``.

    Hooks of the Python API (:func:`metaxl.api.train`): ``prepared`` replaces reading the data sets
    named in ``cfg``, ``model``/``tokenizer`` replace loading ``cfg.model`` (a model with its task head
    for ``prepared.labels``), and ``artifacts`` (a dict) receives the trained ``model``, ``tokenizer``,
    ``rtn`` (the RTN injector, or None) and ``data``. ``cfg.output_dir=None`` writes nothing.

    ``on_setup(model, learner)``, if given, is called once the model, RTNs and optimisers exist,
    before the first step (benchmarks/planted_shift.py installs its source distortion there).

    With ``resume=True`` the training state is saved after every epoch (``train_state/``, deleted
    at the end) and an interrupted run in the same output folder continues where it stopped.

    Everything that can fail on user input (config values, data files, labels, the model) is
    checked before the output folder is touched.
    """
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    from . import guards
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
    from .reporting import make_reporter
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
    if resume and cfg.output_dir is None:
        raise ConfigError("resume needs an output_dir (the training state is saved there)")
    data = prepared if prepared is not None else prepare_data(cfg)
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.model)
    set_seed(cfg.seed)
    if model is None:
        model = load_model(cfg.model, data.task, data.labels)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if isinstance(max_pos, int):
        limit = max_pos - (2 if getattr(model.config, "model_type", "") in ("roberta", "xlm-roberta", "camembert") else 0)
        if cfg.max_length > limit:
            raise ConfigError(f"--max-length {cfg.max_length} is longer than model {cfg.model!r} supports "
                              f"({limit} positions); use --max-length {limit} or less")
    extension = None
    if cfg.extend_vocab:  # paper Appendix C (metaxl.vocab); a resumed run reuses its saved extension
        from .vocab import VOCAB_DIR, extend_vocabulary

        saved = Path(cfg.output_dir) / VOCAB_DIR if resume and cfg.output_dir is not None else None
        extension = extend_vocabulary(model, tokenizer, data.target_train, cfg.extend_vocab, saved, broadcast_object)
        tokenizer = extension.tokenizer
        log(f"vocabulary: {len(extension.added)} target pieces added ({len(tokenizer)} in all)")
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
    for name, feats in [("target train", tgt_feats), ("dev", dev_feats), ("test", test_feats)]:
        if (note := guards.truncation_warning(data.task, feats, cfg.max_length, name)) is not None:
            log(note)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # ---- output folder (only now: every input has been checked)
    writes = dist.is_main and cfg.output_dir is not None  # output_dir=None: an in-memory run, nothing written
    out = Path(cfg.output_dir or ".")
    if (resume and cfg.output_dir is not None
            and (done := guards.check_resume(out, cfg.to_dict(), TrainConfig().to_dict())) is not None):
        log(f"{out} holds a finished run (best epoch {done.get('best_epoch')}); nothing to do "
            "(use another --output-dir to train again)")
        return done
    if writes:
        _prepare_output(out, model, resume and cfg.save_state, cfg)
        if extension is not None and resume:
            extension.tokenizer.save_pretrained(out / VOCAB_DIR)

    model.to(device)
    injector = None
    if uses_rtn:
        torch.manual_seed(cfg.seed)
        injector = RTNInjector(model, cfg.rtn_layers, cfg.rtn_variant, cfg.rtn_hidden,
                               num_sources=len(src_feats), per_source=cfg.rtn_per_source,
                               detach_input=cfg.rtn_detach, init=cfg.rtn_init,
                               preserve_norm=cfg.rtn_norm == "preserve").to(device)
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
    logger.debug("%s, %s on %s: %d target / %s source / %d dev / %d test examples, %d steps per epoch, %d labels",
                 cfg.method, data.task, device, len(tgt_feats), [len(f) for f in src_feats], len(dev_feats),
                 len(test_feats), steps_per_epoch, len(data.labels))
    total_epochs = cfg.epochs + cfg.backoff_epochs
    opt_theta = torch.optim.AdamW(theta_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched_theta = get_linear_schedule_with_warmup(opt_theta, int(cfg.warmup * main_steps), main_steps)
    opt_phi = sched_phi = None
    if injector is not None:
        phi_lr = cfg.lr if cfg.method == "jt-rtn" else cfg.meta_lr
        opt_phi = phi_optimizer(injector.parameters(), cfg, phi_lr)
        sched_phi = get_linear_schedule_with_warmup(opt_phi, int(cfg.warmup * main_steps), main_steps)
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
    learner = Learner(model, injector, cfg, opt_theta, sched_theta, opt_phi, sched_phi, autocast, scaler)
    if on_setup is not None:
        on_setup(model, learner)
    rtn_start: dict[str, torch.Tensor] = {}
    probe: dict[str, torch.Tensor] = {}
    if injector is not None:
        rtn_start = {k: v.detach().clone() for k, v in injector.state_dict().items()}
        probe = probe_batch(src_feats[0], pad_id, device)

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
        "rtn_init": rtn_diagnostics(model, injector, probe, rtn_start, autocast) if injector is not None else None,
    }
    if extension is not None:
        results["vocab_added"] = len(extension.added)
    start_epoch, best_f1, elapsed_before = 1, -1.0, 0.0
    best: Snapshot | None = None  # the best dev epoch's weights; the test set is evaluated on them once, at the end
    state_dir = out / STATE_DIR
    tgt_state: dict[str, Any] | None = None
    if resume and (state_dir / "state.pt").is_file():
        state = _load_state(state_dir / "state.pt", device)
        tgt_state = state.get("tgt_cycle")
        load_training_state_dict(model, state["model"])
        opt_theta.load_state_dict(state["opt_theta"])
        sched_theta.load_state_dict(state["sched_theta"])
        if injector is not None:
            assert opt_phi is not None and sched_phi is not None
            injector.load_state_dict(state["rtn"])
            opt_phi.load_state_dict(state["opt_phi"])
            sched_phi.load_state_dict(state["sched_phi"])
        learner.steps_taken = state.get("steps_taken", 0)
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        results = state["results"]
        if injector is not None and state.get("rtn_start") is not None:
            rtn_start = state["rtn_start"]
        best = state.get("best")  # absent in states saved before test evaluation moved to the end
        set_rank_seed(cfg.seed + len(results["epochs"]), dist)
        start_epoch = results["epochs"][-1]["epoch"] + 1 if results["epochs"] else 1
        best_f1 = max([e["dev"]["f1"] for e in results["epochs"]], default=-1.0)
        elapsed_before = sum(e["seconds"] for e in results["epochs"])
        log(f"resuming {out} from epoch {start_epoch}")
    if writes:
        write_json(out / "results.json", results)
    reporter = make_reporter(cfg.report_to, out, cfg.output_dir is not None,
                             sum(e["steps"] for e in results["epochs"])) if dist.is_main else None

    tgt_iter = TargetCycle(tgt_feats, cfg.tgt_batch_size, gen, cfg.group_by_length, state=tgt_state)
    failure: MetaXLError | None = None
    watched = list(model.parameters()) + (list(injector.parameters()) if injector is not None else [])
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
        probes: list[tuple[float, float]] = []
        learner.hypergrad_stats.reset()
        skipped = nonfinite = 0
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
        for step_no, (k, src) in enumerate(bar, 1):
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
            undo = _undo_point(model, injector, learner) if cfg.on_nonfinite == "skip" else None
            stats = learner.step(src_b, k or 0, to_dev(local(tgt)), meta_b)
            loss = all_mean(stats.loss)  # the global-batch loss; every rank takes the same decision
            if (problem := guards.step_problem(loss, stats.phi_grad_norm, watched, cfg.precision)) is not None:
                message = guards.divergence_message(problem, epoch, step_no, cfg)
                if undo is None:
                    failure = guards.Diverged(message)
                    break
                undo.restore()
                nonfinite += 1
                log(f"warning: step skipped: {message.partition('; or pass')[0]}")
                continue
            losses.append(loss)
            if reporter is not None:
                reporter.log_step(loss, stats, learner)
            if stats.meta_loss is not None:
                meta_losses.append(all_mean(stats.meta_loss))
            if stats.phi_grad_norm is not None and math.isfinite(stats.phi_grad_norm):
                phi_norms.append(stats.phi_grad_norm)  # already averaged across processes
            if stats.meta_probe is not None:
                probes.append(stats.meta_probe)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        bar.close()
        if failure is not None:
            break
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
        if injector is not None and not backoff:
            row["rtn"] = rtn_diagnostics(model, injector, probe, rtn_start, autocast)
            if learner.method == "metaxl":
                row["rtn"].update(learner.hypergrad_stats.summary())
                if probes:
                    row["rtn"]["meta_loss_before"] = round(float(np.mean([b for b, _ in probes])), 6)
                    row["rtn"]["meta_loss_after"] = round(float(np.mean([a for _, a in probes])), 6)
                    # the change itself, unrounded: one phi step moves the meta loss by ~1e-6 or less
                    row["rtn"]["meta_step_change"] = float(np.mean([a - b for b, a in probes]))
        if cfg.on_nonfinite == "skip":
            row["nonfinite_skips"] = nonfinite
            results["nonfinite_skips"] = results.get("nonfinite_skips", 0) + nonfinite
        improved = dev_metrics["f1"] > best_f1
        if improved:
            best_f1 = dev_metrics["f1"]
            best = Snapshot.take(model, injector)  # in back-off: the RTNs as the main phase left them
            results.update(best_epoch=epoch, dev=dev_metrics, test=None)
        row["seconds"] = time.time() - t0
        row["best"] = improved
        results["epochs"].append(row)
        if reporter is not None:
            reporter.log_epoch(row)
        log(f"epoch {epoch}/{total_epochs}: loss {row['train_loss'] or float('nan'):.4f}  dev f1 {dev_metrics['f1']:.2f}"
            + ("  (best)" if improved else "") + f"  [{row['seconds']:.0f}s]" + rtn_log_line(row.get("rtn"))
            + (f"  ({skipped} tail batches smaller than {dist.world_size} skipped)" if skipped else ""))
        if writes:
            write_json(out / "results.json", results)
        if resume and cfg.save_state and epoch < total_epochs and not backoff and writes:
            try:
                _save_state(state_dir, model, injector, learner, gen, results, best, tgt_iter, rtn_start)
            except guards.DiskError as err:
                failure = err
                break

    # the test set, once, on the best dev epoch's weights (not after every improvement: for NER, test
    # sets of ~1,300 sentences made that half of a run's time on CPU)
    if best is not None:
        t0 = time.time()
        best.restore(model, injector)
        test_metrics, _ = evaluate(model, data.task, data.test, test_feats, data.labels, pad_id,
                                   cfg.eval_batch_size, device, autocast)
        results["test"] = test_metrics
        if reporter is not None:
            reporter.log_test(test_metrics, results["best_epoch"])
        if cfg.save_checkpoint and writes:
            try:
                save_checkpoint(out / "checkpoint", model, tokenizer, data.task, data.labels, cfg.max_length,
                                extra={"config": cfg.to_dict(), "epoch": results["best_epoch"],
                                       "dev": results["dev"], "test": test_metrics, "sizes": results["sizes"],
                                       "vocab_added": results.get("vocab_added")})
                results["checkpoint"] = "checkpoint"
                if best.rtn is not None:
                    from safetensors.torch import save

                    guards.write_bytes_atomic(out / "rtn.safetensors", save(
                        {k: v.contiguous() for k, v in best.rtn.items()}), "rtn.safetensors")
            except guards.DiskError as err:
                failure = failure or err
        log(f"test f1 {test_metrics['f1']:.2f} (best dev epoch {results['best_epoch']})  [{time.time() - t0:.0f}s]")

    results["status"] = "finished" if failure is None else "failed"
    if failure is not None:
        results["error"] = str(failure)
    results["wall_seconds"] = elapsed_before + time.time() - t_start
    results = broadcast_object(results)  # rank 0's results (its evaluation) on every rank
    if writes:
        try:
            write_json(out / "results.json", results)
        except guards.DiskError:
            if failure is None:
                raise
        if state_dir.exists() and failure is None:
            shutil.rmtree(state_dir)
        if extension is not None and failure is None:  # kept for a resumed run only; the checkpoint holds it
            shutil.rmtree(out / "extended_tokenizer", ignore_errors=True)
    if failure is not None:
        if injector is not None:
            injector.remove()
        if reporter is not None:
            reporter.close()
        raise failure
    if injector is not None:
        injector.remove()
    if reporter is not None:
        reporter.close()
    if artifacts is not None:
        artifacts.update(model=model, tokenizer=tokenizer, rtn=injector, data=data)
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


def rtn_log_line(rtn: dict[str, Any] | None) -> str:
    """The RTN diagnostics on the epoch's log line.

    >>> rtn_log_line({"rel_change": 0.31, "weight_drift": 0.015, "hypergrad_snr": 0.2,
    ...               "meta_loss_before": 0.5, "meta_loss_after": 0.49})
    '  rtn: change 0.310 drift 0.015 snr 0.20 meta-step -1.0e-02'
    >>> rtn_log_line(None)
    ''
    """
    if not rtn:
        return ""
    text = f"  rtn: change {rtn['rel_change']:.3f}"
    if rtn.get("norm_ratio") is not None:
        text += f" (norm x{rtn['norm_ratio']:.2f} cos {rtn['cosine']:.2f})"
    text += f" drift {rtn['weight_drift']:.3f}"
    if rtn.get("hypergrad_snr") is not None:
        text += f" snr {rtn['hypergrad_snr']:.2f}"
    if rtn.get("meta_loss_before") is not None:
        change = rtn.get("meta_step_change", rtn["meta_loss_after"] - rtn["meta_loss_before"])
        text += f" meta-step {change:+.1e}"
    return text


def _save_state(state_dir: Path, model: Any, injector: Any, learner: Any, gen: torch.Generator,
                results: dict[str, Any], best: Snapshot | None = None, tgt: TargetCycle | None = None,
                rtn_start: dict[str, torch.Tensor] | None = None) -> None:
    from .checkpoint import training_state_dict
    from .guards import os_error

    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise os_error(err, state_dir, "the training state") from None
    state = {
        "model": training_state_dict(model), "opt_theta": learner.opt_theta.state_dict(),
        "sched_theta": learner.sched_theta.state_dict(),
        "rtn": injector.state_dict() if injector is not None else None,
        "opt_phi": learner.opt_phi.state_dict() if learner.opt_phi is not None else None,
        "sched_phi": learner.sched_phi.state_dict() if learner.sched_phi is not None else None,
        "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
        "results": results, "best": best, "tgt_cycle": tgt.state() if tgt is not None else None,
        "rtn_start": rtn_start or None, "steps_taken": learner.steps_taken,
    }
    tmp = state_dir / "state.pt.tmp"
    try:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, state_dir / "state.pt")  # the previous state stays whole until this rename
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise os_error(err, state_dir / "state.pt", "the training state") from None


def _load_state(path: Path, device: torch.device) -> dict[str, Any]:
    """The saved training state, or a one-line error saying how to start over."""
    try:
        return torch.load(path, map_location=device, weights_only=False)  # type: ignore[no-any-return]
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file: tell the user what to do
        raise ConfigError(f"{path}: the saved training state cannot be read ({type(err).__name__}); delete "
                          f"{path.parent} to start this run over") from None


def _prepare_output(out: Path, model: Any, save_state: bool, cfg: TrainConfig) -> None:
    """Check the output folder and its free space, then create it and write config.yaml."""
    import yaml

    from .guards import check_output_dir, ensure_space, model_bytes, os_error, recover_dir, write_bytes_atomic

    check_output_dir(out)
    size = model_bytes(model)
    # the checkpoint, and with --resume the state (weights + AdamW's two moments + the best snapshot)
    need = (size if cfg.save_checkpoint else 0) + (4 * size if save_state else 0)
    ensure_space(next(p for p in [out, *out.parents] if p.exists()), need, "the checkpoint and training state")
    try:
        out.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        write_bytes_atomic(out / "config.yaml", text.encode("utf-8"), "config.yaml")
    except OSError as err:
        raise os_error(err, out, "the output folder") from None
    recover_dir(out / "checkpoint")  # a checkpoint swap cut short by a kill: the old one back


def _undo_point(model: Any, injector: Any, learner: Any) -> Any:
    """What ``--on-nonfinite skip`` restores when a step gives non-finite values."""
    from .guards import StepUndo

    return StepUndo.take([model, injector], [learner.opt_theta, learner.sched_theta, learner.opt_phi,
                                             learner.sched_phi, learner.scaler])

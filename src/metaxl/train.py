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
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import CallableModule
from .config import TrainConfig
from .data import Example
from .errors import ConfigError, DataError, MetaXLError
from .threads import THREADS_FILE_ENV, ThreadsFile

if TYPE_CHECKING:
    from .distributed import DistInfo

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


# ---------------------------------------------------------------------------- the recipe
# train() reads as the run it performs (docs/design.md): setup (processes, data and model, the
# encoded splits, the output folder, the learner, the results so far), one epoch at a time
# (train_epoch: the steps; end_epoch: dev evaluation, model selection, the epoch's row), and
# finish (the test set on the best epoch's weights, the checkpoint, results.json).
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
    cfg.validate()
    run = setup(cfg, resume, log, prepared, model, tokenizer)  # every input checked, nothing written yet
    if (done := finished_run(run)) is not None:
        return done
    if run.writes:
        create_output(run)
    build_learner(run, on_setup)
    state = start_state(run)
    for epoch in range(state.start_epoch, run.total_epochs + 1):
        record = train_epoch(run, state, epoch)
        if state.failure is None:
            end_epoch(run, state, epoch, record)
        if state.failure is not None:
            break
    evaluate_test_set(run, state)
    return finish(run, state, artifacts)


@dataclass
class Features:
    """The encoded splits: one dict (``input_ids``, ``attention_mask``, ``labels``) per example."""

    target: list[dict[str, Any]]
    sources: list[list[dict[str, Any]]]
    dev: list[dict[str, Any]]
    test: list[dict[str, Any]]


@dataclass
class Run:
    """What the parts of a training run share: made by :func:`setup`, completed by
    :func:`build_learner`, then read by every part."""

    cfg: TrainConfig
    resume: bool
    log: Any  # print-like; silent on every process but rank 0
    dist: DistInfo
    device: torch.device
    autocast: Any
    data: PreparedData
    model: Any
    tokenizer: Any
    extension: Any  # the --extend-vocab result (metaxl.vocab.Extension), or None
    feats: Features
    pad_id: int
    out: Path  # the output folder ("." for an in-memory run)
    writes: bool  # rank 0 of a run with an output folder: only it writes files
    # made by build_learner
    injector: Any = None  # the RTNs (metaxl.rtn.RTNInjector) of jt-rtn and metaxl, else None
    learner: Any = None  # metaxl.meta.Learner: one step of the method, with its optimisers
    steps_per_epoch: int = 0
    probe: dict[str, torch.Tensor] = field(default_factory=dict)  # the RTN diagnostics' source batch
    watched: list[torch.nn.Parameter] = field(default_factory=list)  # checked for non-finite values

    @property
    def total_epochs(self) -> int:
        return self.cfg.epochs + self.cfg.backoff_epochs

    @property
    def state_dir(self) -> Path:
        return self.out / STATE_DIR

    def on_device(self, feats: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """This process's shard of a global batch, collated and on the device."""
        from .distributed import shard
        from .tasks import collate

        local = shard(feats, self.dist.rank, self.dist.world_size)  # the whole batch for one process
        return {k: v.to(self.device) for k, v in collate(local, self.pad_id).items()}


@dataclass
class RunState:
    """What changes from epoch to epoch: what ``resume`` saves after an epoch and restores."""

    results: dict[str, Any]  # results.json as it stands
    gen: torch.Generator  # draws the source batches and the target cycle
    rtn_start: dict[str, torch.Tensor]  # the RTNs' initial weights (their drift is a diagnostic)
    best: Snapshot | None = None  # the best dev epoch's weights; the test set is evaluated on them once, at the end
    best_f1: float = -1.0
    start_epoch: int = 1
    elapsed_before: float = 0.0  # seconds of the epochs run before a resume
    reporter: Any = None  # TensorBoard (--report-to), rank 0 only
    threads_file: ThreadsFile | None = None  # a sweep raises our threads when its other runs have ended
    started: float = 0.0
    failure: MetaXLError | None = None  # divergence or a full disk: the run ends, results.json says why
    tgt_iter: TargetCycle = field(init=False)


# ---------------------------------------------------------------------------- setup
def setup(cfg: TrainConfig, resume: bool, log: Any, prepared: PreparedData | None, model: Any,
          tokenizer: Any) -> Run:
    """Processes, data, model and tokenizer, the encoded splits: every check on user input, before
    anything is written."""
    dist, device, log = start_processes(cfg, log)
    autocast = autocast_factory(device, cfg.precision)
    if resume and cfg.output_dir is None:
        raise ConfigError("resume needs an output_dir (the training state is saved there)")
    data = prepared if prepared is not None else prepare_data(cfg)
    model, tokenizer, extension = load_model_and_tokenizer(cfg, data, resume, log, model, tokenizer)
    feats = encode_splits(cfg, data, tokenizer, log)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    writes = dist.is_main and cfg.output_dir is not None  # output_dir=None: an in-memory run, nothing written
    return Run(cfg, resume, log, dist, device, autocast, data, model, tokenizer, extension, feats, pad_id,
               Path(cfg.output_dir or "."), writes)


def start_processes(cfg: TrainConfig, log: Any) -> tuple[DistInfo, torch.device, Any]:
    """The process group under ``torchrun`` (a no-op for one process), this process's device, and
    its log (silent but on rank 0)."""
    from .distributed import init_from_env, local_device

    dist = init_from_env(cfg.device)
    device = local_device(resolve_device(cfg.device), dist)
    if not dist.is_main:
        log = lambda *_a, **_k: None  # noqa: E731
    if dist.enabled:
        need = 2 * dist.world_size if cfg.method == "metaxl" and cfg.meta_batch == "split" else dist.world_size
        if cfg.batch_size < dist.world_size or cfg.tgt_batch_size < need:
            raise ConfigError(f"{dist.world_size} processes need --batch-size >= {dist.world_size} and a target "
                              f"batch >= {need} (the global batch is split across processes)")
    return dist, device, log


def load_model_and_tokenizer(cfg: TrainConfig, data: PreparedData, resume: bool, log: Any, model: Any,
                             tokenizer: Any) -> tuple[Any, Any, Any]:
    """The model (with its task head for ``data.labels``) and tokenizer, the vocabulary extended for
    the target (paper Appendix C; a resumed run reuses its saved extension), the embeddings frozen."""
    from .distributed import broadcast_object
    from .models import load_model as load_pretrained
    from .models import load_tokenizer
    from .rtn import encoder_parts, resolve_layers

    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.model)
    set_seed(cfg.seed)
    if model is None:
        model = load_pretrained(cfg.model, data.task, data.labels)
    _check_max_length(cfg, model)
    extension = None
    if cfg.extend_vocab:
        from .vocab import VOCAB_DIR, extend_vocabulary

        saved = Path(cfg.output_dir) / VOCAB_DIR if resume and cfg.output_dir is not None else None
        extension = extend_vocabulary(model, tokenizer, data.target_train, cfg.extend_vocab, saved, broadcast_object)
        tokenizer = extension.tokenizer
        log(f"vocabulary: {len(extension.added)} target pieces added ({len(tokenizer)} in all)")
        if cfg.freeze_embeddings and extension.added:
            log("note: --freeze-embeddings keeps the new pieces' embeddings at their start (the mean of "
                "their old pieces); --no-freeze-embeddings trains them")
    if cfg.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    _grad_ok(model)
    if cfg.method in ("jt-rtn", "metaxl"):
        resolve_layers(cfg.rtn_layers, len(encoder_parts(model)[1]))  # clear error before writing
    return model, tokenizer, extension


def _check_max_length(cfg: TrainConfig, model: Any) -> None:
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if isinstance(max_pos, int):
        limit = max_pos - (2 if getattr(model.config, "model_type", "") in ("roberta", "xlm-roberta", "camembert") else 0)
        if cfg.max_length > limit:
            raise ConfigError(f"--max-length {cfg.max_length} is longer than model {cfg.model!r} supports "
                              f"({limit} positions); use --max-length {limit} or less")


def encode_splits(cfg: TrainConfig, data: PreparedData, tokenizer: Any, log: Any) -> Features:
    """Tokenise every split (labels aligned to the first piece of each word); an empty split is an
    error, truncated examples a logged warning."""
    from . import guards
    from .tasks import encode

    label2id = {label: i for i, label in enumerate(data.labels)}
    enc = lambda exs: encode(data.task, exs, tokenizer, label2id, cfg.max_length)  # noqa: E731
    feats = Features(enc(data.target_train), [enc(s) for s in data.sources], enc(data.dev), enc(data.test))
    named = [("target train", feats.target), ("dev", feats.dev), ("test", feats.test)]
    for name, split in named + [(f"source {n}", f) for n, f in zip(data.source_names, feats.sources, strict=True)]:
        if not split:
            raise DataError(f"the {name} split is empty after subsampling/filtering; check the data and sizes")
    for name, split in named:
        if (note := guards.truncation_warning(data.task, split, cfg.max_length, name)) is not None:
            log(note)
    return feats


def finished_run(run: Run) -> dict[str, Any] | None:
    """With ``resume``, the results of a run that already finished in the output folder."""
    from . import guards

    if not run.resume or run.cfg.output_dir is None:
        return None
    done = guards.check_resume(run.out, run.cfg.to_dict(), TrainConfig().to_dict())
    if done is not None:
        run.log(f"{run.out} holds a finished run (best epoch {done.get('best_epoch')}); nothing to do "
                "(use another --output-dir to train again)")
    return done


def create_output(run: Run) -> None:
    """The output folder with config.yaml (only now: every input has been checked), and the extended
    tokenizer that a resumed run reloads."""
    _prepare_output(run.out, run.model, run.resume and run.cfg.save_state, run.cfg)
    if run.extension is not None and run.resume:
        from .vocab import VOCAB_DIR

        run.extension.tokenizer.save_pretrained(run.out / VOCAB_DIR)


def build_learner(run: Run, on_setup: Any) -> None:
    """The model on its device, the RTNs, every process on rank 0's weights, the optimisers and
    the :class:`~metaxl.meta.Learner` that takes the method's steps."""
    from .distributed import broadcast_module, set_rank_seed
    from .meta import Learner, enable_gradient_checkpointing
    from .rtn import RTNInjector

    cfg, feats = run.cfg, run.feats
    run.model.to(run.device)
    if cfg.method in ("jt-rtn", "metaxl"):
        torch.manual_seed(cfg.seed)
        run.injector = RTNInjector(run.model, cfg.rtn_layers, cfg.rtn_variant, cfg.rtn_hidden,
                                   num_sources=len(feats.sources), per_source=cfg.rtn_per_source,
                                   detach_input=cfg.rtn_detach, init=cfg.rtn_init,
                                   preserve_norm=cfg.rtn_norm == "preserve").to(run.device)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(run.model, run.injector)
    # every rank starts from rank 0's weights (random task head, RTNs); dropout then differs per rank
    broadcast_module(run.model)
    if run.injector is not None:
        broadcast_module(run.injector)
    set_rank_seed(cfg.seed, run.dist)
    run.steps_per_epoch = math.ceil(
        (sum(len(f) for f in feats.sources) if cfg.method != "target-only" else len(feats.target)) / cfg.batch_size
    )
    logger.debug("%s, %s on %s: %d target / %s source / %d dev / %d test examples, %d steps per epoch, %d labels",
                 cfg.method, run.data.task, run.device, len(feats.target), [len(f) for f in feats.sources],
                 len(feats.dev), len(feats.test), run.steps_per_epoch, len(run.data.labels))
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
    run.learner = Learner(run.model, run.injector, cfg, *optimisers(run), run.autocast, scaler)
    if on_setup is not None:
        on_setup(run.model, run.learner)
    # only what a step can change: frozen weights (the word embeddings under --freeze-embeddings,
    # 96M of e5-small's 117M) stay as loaded, and scanning them cost ~0.3 s a step on the CPU
    run.watched = list(run.learner.theta.values()) + list(run.learner.phi)
    if run.injector is not None:
        run.probe = probe_batch(feats.sources[0], run.pad_id, run.device)


def optimisers(run: Run) -> tuple[Any, Any, Any, Any]:
    """theta's AdamW and schedule; the RTNs' (phi's) optimiser and schedule, or None, None."""
    from transformers import get_linear_schedule_with_warmup

    cfg = run.cfg
    main_steps = run.steps_per_epoch * cfg.epochs
    opt_theta = torch.optim.AdamW(theta_groups(run.model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched_theta = get_linear_schedule_with_warmup(opt_theta, int(cfg.warmup * main_steps), main_steps)
    if run.injector is None:
        return opt_theta, sched_theta, None, None
    opt_phi = phi_optimizer(run.injector.parameters(), cfg, cfg.lr if cfg.method == "jt-rtn" else cfg.meta_lr)
    sched_phi = get_linear_schedule_with_warmup(opt_phi, int(cfg.warmup * main_steps), main_steps)
    return opt_theta, sched_theta, opt_phi, sched_phi


def start_state(run: Run) -> RunState:
    """The run's state at its first epoch, or (``resume``) where an interrupted run stopped; the
    first results.json, the reporter and the target cycle."""
    from .reporting import make_reporter

    cfg = run.cfg
    rtn_start = {k: v.detach().clone() for k, v in run.injector.state_dict().items()} if run.injector is not None else {}
    gen = torch.Generator().manual_seed(cfg.seed)
    state = RunState(initial_results(run, rtn_start), gen, rtn_start)
    tgt_cycle = None
    if run.resume and (run.state_dir / "state.pt").is_file():
        tgt_cycle = restore_state(run, state, _load_state(run.state_dir / "state.pt", run.device))
    if run.writes:
        write_json(run.out / "results.json", state.results)
    if run.dist.is_main:
        state.reporter = make_reporter(cfg.report_to, run.out, cfg.output_dir is not None,
                                       sum(e["steps"] for e in state.results["epochs"]))
    state.tgt_iter = TargetCycle(run.feats.target, cfg.tgt_batch_size, gen, cfg.group_by_length, state=tgt_cycle)
    state.started = time.time()
    state.threads_file = ThreadsFile.from_env()
    return state


def initial_results(run: Run, rtn_start: dict[str, torch.Tensor]) -> dict[str, Any]:
    """results.json before the first epoch: the run's settings, sizes, versions and the RTNs' start."""
    cfg, data, feats = run.cfg, run.data, run.feats
    results: dict[str, Any] = {
        "status": "running", "config": cfg.to_dict(), "method": cfg.method, "task": data.task,
        "target": cfg.target, "source": data.source_names if cfg.method != "target-only" else [],
        "seed": cfg.seed, "source_size": cfg.source_size, "target_size": cfg.target_size,
        "rtn_layers": list(cfg.rtn_layers) if cfg.method in ("jt-rtn", "metaxl") else [], "labels": data.labels,
        "sizes": {"target_train": len(feats.target), "source_train": [len(f) for f in feats.sources],
                  "dev": len(feats.dev), "test": len(feats.test)},
        "epochs": [], "best_epoch": None, "dev": None, "test": None, "checkpoint": None,
        "device": str(run.device), "torch": torch.__version__, "world_size": run.dist.world_size,
        "code": code_version(),
        "rtn_init": (rtn_diagnostics(run.model, run.injector, run.probe, rtn_start, run.autocast)
                     if run.injector is not None else None),
    }
    if run.extension is not None:
        results["vocab_added"] = len(run.extension.added)
    return results


def restore_state(run: Run, state: RunState, saved: dict[str, Any]) -> dict[str, Any] | None:
    """Load a saved training state (``resume``) into the model, RTNs, optimisers, random generators
    and ``state``; returns the target cycle's saved position."""
    from .checkpoint import load_training_state_dict
    from .distributed import set_rank_seed

    learner, injector = run.learner, run.injector
    load_training_state_dict(run.model, saved["model"])
    learner.opt_theta.load_state_dict(saved["opt_theta"])
    learner.sched_theta.load_state_dict(saved["sched_theta"])
    if injector is not None:
        injector.load_state_dict(saved["rtn"])
        learner.opt_phi.load_state_dict(saved["opt_phi"])
        learner.sched_phi.load_state_dict(saved["sched_phi"])
    learner.steps_taken = saved.get("steps_taken", 0)
    state.gen.set_state(saved["generator"])
    torch.set_rng_state(saved["torch_rng"])
    random.setstate(saved["python_rng"])
    state.results = results = saved["results"]
    if injector is not None and saved.get("rtn_start") is not None:
        state.rtn_start = saved["rtn_start"]
    state.best = saved.get("best")  # absent in states saved before test evaluation moved to the end
    set_rank_seed(run.cfg.seed + len(results["epochs"]), run.dist)
    state.start_epoch = results["epochs"][-1]["epoch"] + 1 if results["epochs"] else 1
    state.best_f1 = max([e["dev"]["f1"] for e in results["epochs"]], default=-1.0)
    state.elapsed_before = sum(e["seconds"] for e in results["epochs"])
    run.log(f"resuming {run.out} from epoch {state.start_epoch}")
    return saved.get("tgt_cycle")


# ---------------------------------------------------------------------------- one epoch
@dataclass
class EpochRecord:
    """What an epoch's steps leave for its row of results.json."""

    started: float
    backoff: bool
    planned: int = 0  # steps in the epoch's plan
    skipped: int = 0  # tail batches too small to give every process an example
    nonfinite: int = 0  # steps undone by --on-nonfinite skip
    losses: list[float] = field(default_factory=list)
    meta_losses: list[float] = field(default_factory=list)
    phi_norms: list[float] = field(default_factory=list)
    probes: list[tuple[float, float]] = field(default_factory=list)  # meta loss before/after the phi step


def train_epoch(run: Run, state: RunState, epoch: int) -> EpochRecord:
    """One pass over the source set (the target set for target-only), the target set cycling;
    sets ``state.failure`` and stops when a step diverges."""
    from tqdm.auto import tqdm

    cfg, learner = run.cfg, run.learner
    record = EpochRecord(started=0.0, backoff=epoch > cfg.epochs)
    if record.backoff and learner.method != "jt":
        enter_backoff(run)
    run.model.train()
    record.started = time.time()
    learner.hypergrad_stats.reset()
    plan = epoch_plan(run, state.gen)
    record.planned = len(plan)
    bar = tqdm(plan, desc=f"epoch {epoch}/{run.total_epochs} {learner.method}",
               disable=not cfg.progress or not run.dist.is_main, leave=False, dynamic_ncols=True)
    for step_no, (k, src) in enumerate(bar, 1):
        follow_sweep_threads(run, state.threads_file)
        tgt, meta = target_batches(run, state.tgt_iter)
        parts = [p for p in (src, tgt, meta) if p is not None]
        if run.dist.enabled and min(len(p) for p in parts) < run.dist.world_size:
            record.skipped += 1  # a tail batch too small to give every rank an example (same on all ranks)
            continue
        recorded = take_step(run, state, record, (epoch, step_no), k, src, tgt, meta)
        if state.failure is not None:
            break
        if recorded:
            bar.set_postfix(loss=f"{np.mean(record.losses[-20:]):.3f}")
    bar.close()
    return record


def enter_backoff(run: Run) -> None:
    """Paper sec. 4.6: continue the MetaXL model on joint-training data, no RTN, with a fresh
    learning-rate schedule over the back-off epochs."""
    from transformers import get_linear_schedule_with_warmup

    cfg, learner = run.cfg, run.learner
    learner.method = "jt"
    if run.injector is not None:
        run.injector.remove()
    back_steps = run.steps_per_epoch * cfg.backoff_epochs
    for group, lr in zip(learner.opt_theta.param_groups, (cfg.lr, cfg.head_lr or cfg.lr), strict=False):
        group["lr"] = group["initial_lr"] = lr
    learner.sched_theta = get_linear_schedule_with_warmup(learner.opt_theta, int(cfg.warmup * back_steps), back_steps)


Plan = list[tuple[int | None, list[dict[str, Any]] | None]]
"""An epoch's steps: (source index, source batch), or (None, None) for target-only."""


def epoch_plan(run: Run, gen: torch.Generator) -> Plan:
    """The epoch's source batches, each source shuffled and (with several sources) the batches mixed."""
    cfg, sources = run.cfg, run.feats.sources
    if cfg.method == "target-only":
        return [(None, None) for _ in range(run.steps_per_epoch)]
    plan: Plan = [(k, b) for k, f in enumerate(sources)
                  for b in batches(f, cfg.batch_size, gen, group_by_length=cfg.group_by_length)]
    order = torch.randperm(len(plan), generator=gen).tolist() if len(sources) > 1 else range(len(plan))
    return [plan[i] for i in order]


def follow_sweep_threads(run: Run, threads_file: ThreadsFile | None) -> None:
    if threads_file is not None and (n := threads_file.poll()) is not None and n != torch.get_num_threads():
        run.log(f"threads: {torch.get_num_threads()} -> {n} (set by the sweep through ${THREADS_FILE_ENV})")
        torch.set_num_threads(n)


def target_batches(run: Run, tgt_iter: TargetCycle) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The step's target batch and MetaXL's meta batch (None where the step splits one batch)."""
    tgt = next(tgt_iter)
    meta: list[dict[str, Any]] | None = None
    if run.learner.method == "metaxl" and run.cfg.meta_batch == "separate":
        meta = next(tgt_iter)
    elif run.learner.method == "metaxl" and run.dist.enabled:
        # split the *global* target batch (as meta.split_batch) so rank shards of each half
        # concatenate to the single-process halves
        tgt, meta = tgt[: len(tgt) // 2], tgt[len(tgt) // 2 :]
    return tgt, meta


def take_step(run: Run, state: RunState, record: EpochRecord, where: tuple[int, int], k: int | None,
              src: list[dict[str, Any]] | None, tgt: list[dict[str, Any]], meta: list[dict[str, Any]] | None
              ) -> bool:
    """One step of the method on this process's shards, checked for non-finite values: recorded
    (True), undone (``--on-nonfinite skip``: False), or the run fails (``state.failure``)."""
    from . import guards
    from .distributed import all_mean

    cfg, learner = run.cfg, run.learner
    src_b = run.on_device(src) if src is not None else None
    meta_b = run.on_device(meta) if meta is not None else None
    undo = _undo_point(run.model, run.injector, learner) if cfg.on_nonfinite == "skip" else None
    stats = learner.step(src_b, k or 0, run.on_device(tgt), meta_b)
    loss = all_mean(stats.loss)  # the global-batch loss; every rank takes the same decision
    if (problem := guards.step_problem(loss, stats.phi_grad_norm, run.watched, cfg.precision)) is not None:
        message = guards.divergence_message(problem, *where, cfg)
        if undo is None:
            state.failure = guards.Diverged(message)
            return False
        undo.restore()
        record.nonfinite += 1
        run.log(f"warning: step skipped: {message.partition('; or pass')[0]}")
        return False
    record.losses.append(loss)
    if state.reporter is not None:
        state.reporter.log_step(loss, stats, learner)
    if stats.meta_loss is not None:
        record.meta_losses.append(all_mean(stats.meta_loss))
    if stats.phi_grad_norm is not None and math.isfinite(stats.phi_grad_norm):
        record.phi_norms.append(stats.phi_grad_norm)  # already averaged across processes
    if stats.meta_probe is not None:
        record.probes.append(stats.meta_probe)
    return True


# ---------------------------------------------------------------------------- evaluate and select
def end_epoch(run: Run, state: RunState, epoch: int, record: EpochRecord) -> None:
    """Dev evaluation and model selection (the best dev epoch's weights kept), the epoch's row in
    results.json and its log line, the training state saved for ``resume``."""
    from . import guards

    cfg, results = run.cfg, state.results
    dev_metrics, _ = evaluate(run.model, run.data.task, run.data.dev, run.feats.dev, run.data.labels, run.pad_id,
                              cfg.eval_batch_size, run.device, run.autocast)
    row = epoch_row(run, state, epoch, record, dev_metrics)
    if cfg.on_nonfinite == "skip":
        row["nonfinite_skips"] = record.nonfinite
        results["nonfinite_skips"] = results.get("nonfinite_skips", 0) + record.nonfinite
    improved = dev_metrics["f1"] > state.best_f1
    if improved:
        state.best_f1 = dev_metrics["f1"]
        state.best = Snapshot.take(run.model, run.injector)  # in back-off: the RTNs as the main phase left them
        results.update(best_epoch=epoch, dev=dev_metrics, test=None)
    row["seconds"] = time.time() - record.started
    row["best"] = improved
    results["epochs"].append(row)
    if state.reporter is not None:
        state.reporter.log_epoch(row)
    run.log(f"epoch {epoch}/{run.total_epochs}: loss {row['train_loss'] or float('nan'):.4f}  dev f1 "
            f"{dev_metrics['f1']:.2f}" + ("  (best)" if improved else "") + f"  [{row['seconds']:.0f}s]"
            + rtn_log_line(row.get("rtn"))
            + (f"  ({record.skipped} tail batches smaller than {run.dist.world_size} skipped)" if record.skipped else ""))
    if run.writes:
        write_json(run.out / "results.json", results)
    if run.resume and cfg.save_state and epoch < run.total_epochs and not record.backoff and run.writes:
        try:
            _save_state(run.state_dir, run.model, run.injector, run.learner, state.gen, results, state.best,
                        state.tgt_iter, state.rtn_start)
        except guards.DiskError as err:
            state.failure = err


def epoch_row(run: Run, state: RunState, epoch: int, record: EpochRecord, dev_metrics: dict[str, Any]
              ) -> dict[str, Any]:
    """The epoch's losses, learning rates, dev metrics and (with RTNs, main phase) RTN diagnostics."""
    learner = run.learner
    row: dict[str, Any] = {
        "epoch": epoch, "phase": "backoff" if record.backoff else "main", "steps": record.planned - record.skipped,
        "train_loss": float(np.mean(record.losses)) if record.losses else None,
        "meta_loss": float(np.mean(record.meta_losses)) if record.meta_losses else None,
        # MetaXL: the median norm of the hypergradient (phi's gradient) over the epoch's steps
        "phi_grad_norm": float(np.median(record.phi_norms)) if record.phi_norms else None,
        "lr": learner.current_lr(), "dev": dev_metrics,
    }
    if run.injector is not None and not record.backoff:
        row["rtn"] = rtn_diagnostics(run.model, run.injector, run.probe, state.rtn_start, run.autocast)
        if learner.method == "metaxl":
            row["rtn"].update(learner.hypergrad_stats.summary())
            if probes := record.probes:
                row["rtn"]["meta_loss_before"] = round(float(np.mean([b for b, _ in probes])), 6)
                row["rtn"]["meta_loss_after"] = round(float(np.mean([a for _, a in probes])), 6)
                # the change itself, unrounded: one phi step moves the meta loss by ~1e-6 or less
                row["rtn"]["meta_step_change"] = float(np.mean([a - b for b, a in probes]))
    return row


# ---------------------------------------------------------------------------- finish
def evaluate_test_set(run: Run, state: RunState) -> None:
    """The test set, once, on the best dev epoch's weights (not after every improvement: for NER,
    test sets of ~1,300 sentences made that half of a run's time on CPU), and the checkpoint."""
    if state.best is None:
        return
    t0 = time.time()
    state.best.restore(run.model, run.injector)
    test_metrics, _ = evaluate(run.model, run.data.task, run.data.test, run.feats.test, run.data.labels,
                               run.pad_id, run.cfg.eval_batch_size, run.device, run.autocast)
    state.results["test"] = test_metrics
    if state.reporter is not None:
        state.reporter.log_test(test_metrics, state.results["best_epoch"])
    if run.cfg.save_checkpoint and run.writes:
        save_best(run, state, test_metrics)
    run.log(f"test f1 {test_metrics['f1']:.2f} (best dev epoch {state.results['best_epoch']})  "
            f"[{time.time() - t0:.0f}s]")


def save_best(run: Run, state: RunState, test_metrics: dict[str, Any]) -> None:
    """The best epoch's model as ``checkpoint/`` and its RTNs as ``rtn.safetensors``; a full disk
    fails the run (``state.failure``) after the test metrics are recorded."""
    from . import guards
    from .checkpoint import save_checkpoint

    results = state.results
    try:
        save_checkpoint(run.out / "checkpoint", run.model, run.tokenizer, run.data.task, run.data.labels,
                        run.cfg.max_length, extra={"config": run.cfg.to_dict(), "epoch": results["best_epoch"],
                                                   "dev": results["dev"], "test": test_metrics,
                                                   "sizes": results["sizes"],
                                                   "vocab_added": results.get("vocab_added")})
        results["checkpoint"] = "checkpoint"
        if state.best is not None and state.best.rtn is not None:
            from safetensors.torch import save

            guards.write_bytes_atomic(run.out / "rtn.safetensors", save(
                {k: v.contiguous() for k, v in state.best.rtn.items()}), "rtn.safetensors")
    except guards.DiskError as err:
        state.failure = state.failure or err


def finish(run: Run, state: RunState, artifacts: dict[str, Any] | None) -> dict[str, Any]:
    """The final results.json (rank 0's on every process), the training state and the extended
    tokenizer removed; the RTN hooks removed; the failure, if any, raised."""
    from . import guards
    from .distributed import broadcast_object

    results, failure = state.results, state.failure
    results["status"] = "finished" if failure is None else "failed"
    if failure is not None:
        results["error"] = str(failure)
    results["wall_seconds"] = state.elapsed_before + time.time() - state.started
    results = broadcast_object(results)  # rank 0's results (its evaluation) on every rank
    if run.writes:
        try:
            write_json(run.out / "results.json", results)
        except guards.DiskError:
            if failure is None:
                raise
        if run.state_dir.exists() and failure is None:
            shutil.rmtree(run.state_dir)
        if run.extension is not None and failure is None:  # kept for a resumed run only; the checkpoint holds it
            shutil.rmtree(run.out / "extended_tokenizer", ignore_errors=True)
    if run.injector is not None:
        run.injector.remove()
    if state.reporter is not None:
        state.reporter.close()
    if failure is not None:
        raise failure
    if artifacts is not None:
        artifacts.update(model=run.model, tokenizer=run.tokenizer, rtn=run.injector, data=run.data)
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


sys.modules[__name__].__class__ = CallableModule  # metaxl.train(cfg) is metaxl.api.train (see metaxl.CallableModule)

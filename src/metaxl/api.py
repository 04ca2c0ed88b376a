"""The Python API: ``from metaxl import TrainConfig, train, evaluate, predict``.

The same runs as ``metaxl train`` / ``evaluate`` / ``predict``, from a notebook or a script, with
models and data given by name (as on the command line) or as objects: a Hugging Face model
instance (and its tokenizer), lists of :class:`~metaxl.data.NERExample` / :class:`~metaxl.data.SAExample`.

>>> from metaxl import TrainConfig, train, evaluate, predict
>>> result = train(TrainConfig(target="masakhaner2:luo", source="masakhaner2:en", epochs=5,
...                            output_dir=None))              # doctest: +SKIP
>>> result.test["f1"], result.best_epoch                        # doctest: +SKIP
(16.77, 5)
>>> predict(result, "Raila Odinga nodhi Kisumu")["tags"]       # doctest: +SKIP
['B-PER', 'I-PER', 'O', 'B-LOC']
>>> evaluate("runs/luo/checkpoint", "masakhaner2:luo")["f1"]    # doctest: +SKIP

See docs/api.md for a worked example with real output.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .data import NERExample, SAExample
from .errors import ConfigError, DataError, ModelError
from .reporting import default_handler, info

logger = logging.getLogger("metaxl")

IN_MEMORY = "in-memory"
"""The name recorded (config, results.json) for data or models passed as objects."""


# ---------------------------------------------------------------------------- the result
@dataclass
class TrainResult:
    """What :func:`train` returns: the trained model (best dev epoch's weights, in eval mode), its
    tokenizer, the RTN (``None`` for target-only and JT; not part of the model, as at test time),
    the results dict (as ``results.json``) and where the run was written (``None``: nowhere).

    ``result.predict(...)``, ``result.evaluate(...)`` and ``result.save(folder)`` work as the module
    functions on this model; ``save`` writes a checkpoint ``metaxl predict`` and ``load_checkpoint`` read.
    """

    model: Any
    tokenizer: Any
    rtn: Any
    results: dict[str, Any]
    config: TrainConfig
    output_dir: Path | None = None
    task: str = field(init=False)
    labels: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.task = self.results["task"]
        self.labels = list(self.results["labels"])

    @property
    def max_length(self) -> int:
        return self.config.max_length

    @property
    def best_epoch(self) -> int | None:
        return self.results.get("best_epoch")

    @property
    def dev(self) -> dict[str, Any] | None:
        """Dev metrics of the best epoch (percent; ``f1`` is the headline)."""
        return self.results.get("dev")

    @property
    def test(self) -> dict[str, Any] | None:
        """Test metrics on the best dev epoch's weights."""
        return self.results.get("test")

    @property
    def metrics(self) -> dict[str, Any]:
        """``{"dev": ..., "test": ...}`` of the best dev epoch."""
        return {"dev": self.dev, "test": self.test}

    @property
    def checkpoint(self) -> Path | None:
        """The checkpoint folder written by the run, if any."""
        if self.output_dir is None or not self.results.get("checkpoint"):
            return None
        return self.output_dir / self.results["checkpoint"]

    def predict(self, texts: str | Sequence[Any], batch_size: int = 32) -> Any:
        return predict(self, texts, batch_size=batch_size)

    def evaluate(self, data: Any, split: str = "test", **kw: Any) -> dict[str, Any]:
        return evaluate(self, data, split=split, **kw)

    def save(self, path: str | Path) -> Path:
        """Write a checkpoint folder (model, tokenizer, ``metaxl.json``) to ``path``."""
        from .checkpoint import save_checkpoint

        extra = {"config": self.config.to_dict(), "epoch": self.best_epoch, "dev": self.dev, "test": self.test,
                 "sizes": self.results.get("sizes"), "vocab_added": self.results.get("vocab_added")}
        return save_checkpoint(path, self.model, self.tokenizer, self.task, self.labels, self.max_length, extra=extra)

    def __repr__(self) -> str:
        test = self.test or {}
        return (f"TrainResult(method={self.config.method!r}, task={self.task!r}, best_epoch={self.best_epoch}, "
                f"test_f1={test.get('f1', float('nan')):.2f}, "
                f"output_dir={str(self.output_dir) if self.output_dir else None!r})")


# ---------------------------------------------------------------------------- train
def train(config: TrainConfig | dict[str, Any] | None = None, *, model: Any = None, tokenizer: Any = None,
          target: Any = None, source: Any = None, dev: Sequence[Any] | None = None,
          test: Sequence[Any] | None = None, resume: bool = False,
          log: Callable[..., Any] | None = None, **overrides: Any) -> TrainResult:
    """Train one model and return a :class:`TrainResult`.

    ``config`` is a :class:`TrainConfig` (or a dict of its keys); keyword ``overrides`` replace
    fields (``epochs=3``). ``model`` is a name/folder (as ``--model``) or a Hugging Face model
    instance: a ``...ForTokenClassification`` (NER) / ``...ForSequenceClassification`` (SA) with as
    many labels as the data has is trained in place, any other (e.g. an ``AutoModel``) gets a fresh
    task head. ``tokenizer`` (a fast tokenizer or a folder) is needed with a model instance that was
    not loaded from a folder. ``target`` is a data set name or a list of training examples (then
    ``dev`` and ``test`` example lists are needed too); ``source`` a name, a list of names, a list of
    examples or a list of such lists (one per source). Example lists are subsampled to
    ``target_size`` / ``source_size`` as named data sets are. ``output_dir=None`` writes nothing.

    >>> from metaxl.data import SAExample
    >>> examples = [SAExample("good food", "positive"), SAExample("bad food", "negative")] * 8
    >>> train(target=examples, dev=examples, output_dir=None)
    Traceback (most recent call last):
    metaxl.errors.DataError: test: an in-memory target needs test=[examples] too
    """
    from .train import train as run_training

    cfg = _config(config, overrides)
    from_memory = {k: v for k, v in (("target", target), ("source", source)) if not _is_names(v)}
    names = {k: v for k, v in (("target", target), ("source", source)) if v is not None and _is_names(v)}
    if "target" in names:
        cfg = cfg.replace(target=str(names["target"]))
    if "source" in names:
        given = names["source"]
        cfg = cfg.replace(source=[str(given)] if isinstance(given, (str, os.PathLike)) else [str(v) for v in given])
    if isinstance(model, (str, os.PathLike)):
        cfg = cfg.replace(model=str(model))
        model = None
    if "target" in from_memory:
        cfg = cfg.replace(target=IN_MEMORY)
    if "source" in from_memory:
        cfg = cfg.replace(source=[f"{IN_MEMORY}:{k}" for k in range(len(_source_lists(from_memory["source"])))])
    if model is not None:
        cfg = cfg.replace(model=str(getattr(model, "name_or_path", "") or IN_MEMORY))
    if (dev is not None or test is not None) and "target" not in from_memory:
        raise ConfigError("dev= and test= go with an in-memory target (target=[examples]); with a named target "
                          "its own dev and test splits are used")
    cfg.validate()
    prepared = None
    if from_memory:
        prepared = prepare_objects(cfg, from_memory.get("target"), from_memory.get("source"), dev, test)
    if tokenizer is not None and not _is_names(tokenizer):
        _check_fast(tokenizer)
    elif tokenizer is not None or model is not None:
        tokenizer = _load_tokenizer(tokenizer, model)
    if model is not None:
        from .train import prepare_data

        data = prepared if prepared is not None else prepare_data(cfg)
        prepared = data
        model = _task_model(model, data.task, data.labels, cfg.seed)
    artifacts: dict[str, Any] = {}
    if log is None:
        default_handler()
    results = run_training(cfg, resume=resume, log=log or info, prepared=prepared, model=model,
                           tokenizer=tokenizer, artifacts=artifacts)
    return TrainResult(model=artifacts["model"], tokenizer=artifacts["tokenizer"], rtn=artifacts["rtn"],
                       results=results, config=cfg,
                       output_dir=Path(cfg.output_dir) if cfg.output_dir is not None else None)


def _config(config: TrainConfig | dict[str, Any] | None, overrides: dict[str, Any]) -> TrainConfig:
    if config is None:
        config = TrainConfig()
    elif isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    elif not isinstance(config, TrainConfig):
        raise ConfigError(f"config must be a TrainConfig or a dict of its keys, got {type(config).__name__}")
    if overrides:
        config = TrainConfig.from_dict({**config.to_dict(), **overrides}, where="train()")
    return config


def _is_names(value: Any) -> bool:
    """None, a name, or a list of names (not examples)."""
    if value is None or isinstance(value, (str, os.PathLike)):
        return True
    return isinstance(value, (list, tuple)) and all(isinstance(v, (str, os.PathLike)) for v in value)


def _source_lists(source: Any) -> list[list[Any]]:
    """One list of examples per source: ``[ex, ...]`` is one source, ``[[ex, ...], [ex, ...]]`` several."""
    if not isinstance(source, (list, tuple)) or not source:
        raise DataError(f"source must be a name, a list of names or a list of examples, got {type(source).__name__}")
    if all(isinstance(s, (list, tuple)) for s in source):
        return [list(s) for s in source]
    return [list(source)]


def _examples(items: Any, where: str) -> list[NERExample] | list[SAExample]:
    if items is None:
        raise DataError(f"{where}: an in-memory target needs {where}=[examples] too")
    items = list(items)
    if not items:
        raise DataError(f"{where}: the list of examples is empty")
    kinds = sorted({type(e).__name__ for e in items})
    if kinds not in (["NERExample"], ["SAExample"]):
        raise DataError(f"{where}: expected a list of NERExample or of SAExample (metaxl.data), "
                        f"got {' and '.join(kinds)} items")
    return items  # type: ignore[return-value]


def _task_of(examples: list[Any]) -> str:
    return "ner" if isinstance(examples[0], NERExample) else "sa"


def prepare_objects(cfg: TrainConfig, target: Any, source: Any, dev: Any, test: Any) -> Any:
    """:class:`metaxl.train.PreparedData` from example lists and/or the names in ``cfg``.

    Lists are subsampled as named data sets (``target_size``, ``source_size``, ``dev_size``,
    ``test_size``, with ``data_seed``) and their labels checked the same way.
    """
    from .data import resolve_dataset, subsample
    from .tasks import check_labels, reconcile_labels
    from .train import PreparedData

    task = None if cfg.task == "auto" else cfg.task
    data_seed = cfg.data_seed if cfg.data_seed is not None else cfg.seed
    if target is not None:
        target_all: list[Any] = _examples(target, "target")
        dev_all: list[Any] = _examples(dev, "dev")
        test_all: list[Any] = _examples(test, "test")
        found = _task_of(target_all)
        for name, exs in (("dev", dev_all), ("test", test_all)):
            if _task_of(exs) != found:
                raise DataError(f"{name} examples are {_task_of(exs)} but the target's are {found}")
        if task is not None and task != found:
            raise DataError(f"task={task!r} but the target examples are {found} examples")
        task = found
        target_name = IN_MEMORY
    else:
        corpus = resolve_dataset(cfg.target, cfg.data_dir, task=task, sa_labels=cfg.sa_labels)
        task, target_name = corpus.task, corpus.name
        target_all, dev_all, test_all = corpus.load("train"), corpus.load("dev"), corpus.load("test")
    target_train: list[Any] = subsample(target_all, cfg.target_size, data_seed)
    sources: list[list[Any]] = []
    source_names: list[str] = []
    if cfg.method != "target-only":
        if source is not None:
            specs: list[Any] = [_examples(s, f"source {k}") for k, s in enumerate(_source_lists(source))]
        else:
            specs = list(cfg.source)
        for k, spec in enumerate(specs):
            if isinstance(spec, list):
                exs, name, kind = spec, f"{IN_MEMORY}:{k}", _task_of(spec)
            else:
                corpus = resolve_dataset(spec, cfg.data_dir, task=task, sa_labels=cfg.sa_labels)
                exs, name, kind = corpus.load("train"), corpus.name, corpus.task
            if kind != task:
                raise DataError(f"source {name} is a {kind} data set but the target ({target_name}) is {task}")
            sources.append(subsample(exs, cfg.source_size, data_seed + k))
            source_names.append(name)
    labels = reconcile_labels(task, target_train, sources)
    dev_s: list[Any] = subsample(dev_all, cfg.dev_size, data_seed)
    test_s: list[Any] = subsample(test_all, cfg.test_size, data_seed)
    check_labels(dev_s, labels, f"{target_name} dev")
    check_labels(test_s, labels, f"{target_name} test")
    return PreparedData(task, labels, target_train, sources, dev_s, test_s, source_names)


def _check_fast(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError("metaxl needs a fast tokenizer (PreTrainedTokenizerFast, tokenizer.json) for word "
                         f"alignment; got {type(tokenizer).__name__}")


def _load_tokenizer(tokenizer: Any, model: Any) -> Any:
    from .models import load_tokenizer

    if tokenizer is not None:
        return load_tokenizer(str(tokenizer))
    where = getattr(model, "name_or_path", "")
    if where and Path(where).is_dir():
        return load_tokenizer(where)
    raise ConfigError("a model object needs its tokenizer: pass tokenizer=AutoTokenizer.from_pretrained(...) "
                      "(or a tokenizer folder)")


def _task_model(model: Any, task: str, labels: list[str], seed: int) -> Any:
    """``model`` itself when it has the task's head for ``labels``, else the same encoder with a fresh head."""
    from .models import load_model
    from .train import set_seed

    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise ModelError(f"model must be a name, a folder or a Hugging Face PreTrainedModel, got {type(model).__name__}")
    head = "ForTokenClassification" if task == "ner" else "ForSequenceClassification"
    if type(model).__name__.endswith(head) and model.config.num_labels == len(labels):
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {label: i for i, label in enumerate(labels)}
        return model
    logger.info("model %s has no %s head for %d labels: adding a fresh one", type(model).__name__, head, len(labels))
    with tempfile.TemporaryDirectory(prefix="metaxl-model-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        set_seed(seed)
        return load_model(tmp, task, labels)


# ---------------------------------------------------------------------------- evaluate / predict
def _loaded(model: Any, tokenizer: Any = None, device: str = "auto") -> Any:
    """A TrainResult or Loaded as is; a checkpoint folder loaded."""
    if isinstance(model, (str, os.PathLike)):
        from .checkpoint import load_checkpoint
        from .train import resolve_device

        return load_checkpoint(str(model), str(resolve_device(device)))
    if all(hasattr(model, a) for a in ("model", "tokenizer", "task", "labels", "max_length")):
        return model
    raise ModelError("expected a TrainResult (from metaxl.train), a checkpoint folder, or "
                     f"metaxl.checkpoint.load_checkpoint(...)'s result; got {type(model).__name__}")


def _device_of(model: Any) -> Any:
    import torch

    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def evaluate(model: Any, data: Any, split: str = "test", *, data_dir: str | None = None,
             sa_labels: str | None = None, batch_size: int = 64, device: str = "auto") -> dict[str, Any]:
    """Metrics (percent; ``f1`` is the headline) of a trained model on a data set's ``split`` or on
    a list of examples. ``model``: a :class:`TrainResult`, a checkpoint folder or a loaded checkpoint.

    >>> evaluate("runs/luo/checkpoint", "masakhaner2:luo", split="dev")["f1"]   # doctest: +SKIP
    21.44
    """
    from .data import resolve_dataset
    from .tasks import check_labels, encode
    from .train import evaluate as evaluate_features

    loaded = _loaded(model, device=device)
    if _is_names(data) and data is not None and isinstance(data, (str, os.PathLike)):
        meta_cfg = getattr(loaded, "meta", {}).get("config", {}) if hasattr(loaded, "meta") else {}
        cfg = getattr(loaded, "config", None)
        labels_scheme = sa_labels or (cfg.sa_labels if cfg is not None else meta_cfg.get("sa_labels", "binary"))
        corpus = resolve_dataset(str(data), data_dir, task=loaded.task, sa_labels=labels_scheme)
        examples: list[Any] = corpus.load(split)
        where = f"{data} {split}"
    else:
        examples = _examples(data, "data")
        where = "the examples"
        if _task_of(examples) != loaded.task:
            raise DataError(f"the model is a {loaded.task} model but the examples are {_task_of(examples)}")
    check_labels(examples, loaded.labels, where)
    label2id = {label: i for i, label in enumerate(loaded.labels)}
    feats = encode(loaded.task, examples, loaded.tokenizer, label2id, loaded.max_length)
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    metrics, _ = evaluate_features(loaded.model, loaded.task, examples, feats, loaded.labels, pad, batch_size,
                                   _device_of(loaded.model))
    return metrics


def predict(model: Any, texts: str | Sequence[Any], *, batch_size: int = 32, device: str = "auto") -> Any:
    """Tags (NER) or a label and its probability (SA) for one text or a list of texts.

    NER takes whitespace-separated sentences or lists of words. One text gives one dict, a list a
    list of dicts: ``{"tokens", "tags"}`` (NER), ``{"text", "label", "probability", "probabilities"}``
    (SA). ``model``: a :class:`TrainResult`, a checkpoint folder or a loaded checkpoint.

    >>> predict("runs/luo/checkpoint", "Raila Odinga nodhi Kisumu")   # doctest: +SKIP
    {'tokens': ['Raila', 'Odinga', 'nodhi', 'Kisumu'], 'tags': ['B-PER', 'I-PER', 'O', 'B-LOC']}
    """
    from .predict import predict_lines

    loaded = _loaded(model, device=device)
    single = isinstance(texts, str)
    items = [texts] if isinstance(texts, str) else list(texts)
    lines = [" ".join(t) if isinstance(t, (list, tuple)) else str(t) for t in items]
    if not all(line.strip() for line in lines):
        raise DataError("predict: empty text among the inputs")
    out = predict_lines(loaded, lines, device=_device_of(loaded.model), batch_size=batch_size)
    return out[0] if single else out

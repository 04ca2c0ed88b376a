"""Typed training configuration.

Every field is also a ``metaxl train`` flag (``--source-size 1000`` sets ``source_size``) and a key
of the YAML config file. Precedence: defaults < YAML file < command-line flags.

>>> from metaxl.config import TrainConfig
>>> cfg = TrainConfig(target="masakhaner2:luo", source="masakhaner2:en", method="metaxl")
>>> cfg.source                # one name is a one-element list
['masakhaner2:en']
>>> cfg.rtn_layers            # -1 = after the last layer (the paper's "layer 12" for 12-layer models)
[-1]
>>> cfg.validate()            # raises ConfigError on a bad value
>>> TrainConfig.from_dict({"target": "nusax:balinese", "method": "jt", "epochs": 3}).epochs
3
>>> TrainConfig(output_dir=None).output_dir is None   # an in-memory run: nothing is written
True
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

METHODS = ("target-only", "jt", "jt-rtn", "metaxl")
HYPERGRADS = ("exact", "finite-difference")
META_BATCH = ("split", "separate")
RTN_VARIANTS = ("plain", "gated")
RTN_INITS = ("xavier", "identity")
RTN_NORMS = ("free", "preserve")
META_OPTIMIZERS = ("adamw", "adam-l2")
HYPERGRAD_SCALES = ("none", "inverse-lr", "unit")
TASKS = ("auto", "ner", "sa")
SA_LABELS = ("binary", "3way", "all")
PRECISIONS = ("fp32", "fp16", "bf16")
ON_NONFINITE = ("stop", "skip")
CHOICES = {"task": TASKS, "sa_labels": SA_LABELS, "method": METHODS, "rtn_variant": RTN_VARIANTS,
           "rtn_init": RTN_INITS, "rtn_norm": RTN_NORMS, "hypergrad": HYPERGRADS, "meta_batch": META_BATCH,
           "meta_optimizer": META_OPTIMIZERS, "hypergrad_scale": HYPERGRAD_SCALES, "precision": PRECISIONS,
           "on_nonfinite": ON_NONFINITE}
"""The enumerated fields and their values (``metaxl train --help`` lists them; argparse checks them)."""


@dataclass
class TrainConfig:
    # --- data ---
    target: str = "masakhaner2:luo"
    """Target data set: a name (masakhaner2:luo, nusax:balinese, wikiann:qu) or a folder/file."""
    source: list[str] = field(default_factory=lambda: ["masakhaner2:en"])
    """Source data set(s). Several give multi-source training (one RTN per source or shared)."""
    data_dir: str | None = None
    """Folder holding local corpora (default: $METAXL_DATA, then ./data, then ../shared/data)."""
    task: str = "auto"
    """ner, sa, or auto (from the data set)."""
    sa_labels: str = "binary"
    """Sentiment label scheme: binary (neutral dropped, as the paper), 3way, or all."""
    target_size: int | None = 100
    """Target training examples, sampled with data_seed (None: all)."""
    source_size: int | None = 1000
    """Source training examples per source, sampled with data_seed (None: all)."""
    dev_size: int | None = None
    """Cap on dev examples (None: all)."""
    test_size: int | None = None
    """Cap on test examples (None: all)."""
    max_length: int = 128
    # --- model ---
    model: str = "default"
    """default (offline multilingual-e5-small), a local checkpoint folder, or a hub name."""
    freeze_embeddings: bool = False
    """Freeze the word-embedding matrix (250k x d for XLM-R vocabularies): about 2x faster steps."""
    extend_vocab: int = 0
    """Paper, Appendix C: train a subword tokenizer of this many pieces on the target's training text
    and add the pieces the model's vocabulary lacks (new rows: the mean of the old pieces); 0: off."""
    # --- method ---
    method: str = "metaxl"
    rtn_layers: list[int] = field(default_factory=lambda: [-1])
    """Insert an RTN after these layers (0 = embeddings, N = last layer); -1 means the last."""
    rtn_variant: str = "gated"
    """gated (official code: residual, sigmoid-gated) or plain (paper eq. 1)."""
    rtn_hidden: int = 192
    rtn_init: str = "xavier"
    """xavier (official code: Xavier-normal weights; the gated RTN then changes each source vector by
    about a third of its norm at the start) or identity (gated only: the output projection starts at
    zero, so the RTN starts as the identity and only the meta-gradient moves it away)."""
    rtn_norm: str = "free"
    """free, or preserve: each RTN output vector is rescaled to its input's norm, so the RTN turns
    source vectors but cannot inflate them (which the first-order meta objective rewards)."""
    rtn_detach: bool = True
    """gated RTN: its branch reads h.detach(), as the official code (False: exact gradients)."""
    rtn_per_source: bool = False
    """With several sources: one RTN per source language (True) or one shared RTN (False)."""
    hypergrad: str = "exact"
    """exact (second-order through the virtual step) or finite-difference (DARTS)."""
    fd_epsilon: float = 0.01
    """finite-difference radius, divided by ||g'|| as in DARTS."""
    meta_batch: str = "split"
    """split: half of each target batch is the meta batch (official code); separate: draw one."""
    inner_lr: float | None = None
    """Virtual-step lr; None uses the current main lr (as the official code)."""
    inner_lr_per_group: bool = False
    """Virtual step at each optimiser group's current lr (the head at head_lr), as the real step."""
    reuse_source_gradient: bool = False
    """theta's step reuses the source gradient taken before phi's step (old phi): one forward and
    backward less per step, an approximation (official code: recompute with the new phi).
    Ignored under fp16 (its GradScaler path recomputes)."""
    virtual_from_layer: int = 0
    """Only parameters of layers >= this take the virtual step (0: all, exact)."""
    # --- optimisation ---
    epochs: int = 20
    batch_size: int = 10
    target_batch_size: int | None = None
    """Target batch size (None: batch_size)."""
    source_weight: float = 1.0
    """The source loss's weight in the training loss (every method with a source; the paper: 1). A JT
    control for MetaXL: the meta objective rewards longer source vectors, i.e. a heavier source."""
    group_by_length: bool = False
    """Training batches of similar lengths (sorted within chunks of 50 batches, batch order
    shuffled): about half the padded tokens, faster steps where compute is the bottleneck (CPU);
    batches are less random than the default's (opt-in)."""
    lr: float = 3e-5
    meta_lr: float = 1e-6
    meta_optimizer: str = "adamw"
    """phi's optimiser: adamw (decoupled weight decay meta_weight_decay) or adam-l2 (official code:
    Adam with the L2 term meta_weight_decay * phi added to the hypergradient)."""
    meta_weight_decay: float | None = None
    """phi's weight decay (None: weight_decay). The official code: 5e-4 with meta_optimizer=adam-l2."""
    meta_eps: float = 1e-8
    """phi's Adam epsilon. Hypergradients are ~1e-9 per weight at lr 1e-4: below the default eps,
    Adam's step shrinks to a fraction of meta_lr (see hypergrad_scale)."""
    hypergrad_scale: str = "none"
    """none: phi's gradient is d L_meta(theta') / d phi, proportional to the inner lr; inverse-lr:
    divided by the encoder's inner lr (per unit virtual step), so its size does not depend on the lr
    or its warm-up and Adam sees values well above its epsilon; unit: that direction scaled to norm 1
    at every step (over all of phi), so a late step counts as much as an early one: the hypergradient
    falls ~1000x as the losses fall, and Adam's second moment (beta2 0.999, a ~700-step memory) then
    shrinks phi's late steps to a few thousandths of meta_lr."""
    diagnostics_every: int = 5
    """MetaXL: every this many steps, the meta loss of the step's batches at theta' before and after
    the phi step (eval mode, no dropout; 0: off). Costs about two forward+backward passes."""
    head_lr: float | None = None
    """lr of the task head (None: lr). A larger head lr (e.g. 3e-3) makes short CPU runs learn."""
    weight_decay: float = 0.0
    warmup: float = 0.1
    max_grad_norm: float = 10.0
    backoff_epochs: int = 0
    """After MetaXL training, fine-tune this many epochs on JT data (paper sec. 4.6)."""
    # --- run ---
    seed: int = 11
    data_seed: int | None = 42
    """Seed of the target/source subsamples (None: the run's seed, a different sample per seed)."""
    device: str = "auto"
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    eval_batch_size: int = 64
    output_dir: str | None = "runs/metaxl"
    """Output folder (results.json, checkpoint/); None: an in-memory run that writes nothing."""
    save_checkpoint: bool = True
    save_state: bool = True
    """With --resume (as sweeps run): save the training state after each epoch. Turn off where an
    epoch is faster than writing the model and optimiser (small models on a GPU); a killed run then
    starts again from epoch 1."""
    progress: bool = True
    on_nonfinite: str = "stop"
    """A step giving a non-finite loss, hypergradient or weight: stop (the run fails, the best
    checkpoint so far is kept) or skip (the step is undone with a warning and counted in
    results.json; keeps a copy of the weights and optimiser state each step)."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers: tensorboard (event files in output_dir; pip install metaxl[tensorboard])."""

    # ------------------------------------------------------------------
    def __post_init__(self) -> None:
        # TrainConfig(source="data/sa-src") means one source, not one per letter
        if isinstance(self.source, str):
            self.source = [self.source]
        elif self.source is None:
            self.source = []
        if isinstance(self.report_to, str):
            self.report_to = parse_list(self.report_to)
        elif self.report_to is None:
            self.report_to = []
        if isinstance(self.rtn_layers, int):
            self.rtn_layers = [self.rtn_layers]

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> TrainConfig:
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(cls.field_names())}"
            )
        data = dict(data)
        for key in ("source", "report_to"):
            if isinstance(data.get(key), str):
                data[key] = parse_list(data[key])
            if key in data and data[key] is None:
                data[key] = []
        if isinstance(data.get("rtn_layers"), (str, int)):
            data["rtn_layers"] = parse_list(str(data["rtn_layers"]))  # each item checked by _coerce below
        types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        for key, value in list(data.items()):
            data[key] = _coerce(key, value, types[key], where)
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        from .guards import read_yaml_text, yaml_error

        path = Path(path)
        try:
            data = yaml.safe_load(read_yaml_text(path, "config file")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(yaml_error(path, e)) from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}; "
                              "write one key: value per line")
        return cls.from_dict(data, where=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        def one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
            if value not in allowed:
                raise ConfigError(f"{name}={value!r} is not valid; choose one of: {', '.join(allowed)}")

        one_of("method", self.method, METHODS)
        one_of("hypergrad", self.hypergrad, HYPERGRADS)
        one_of("meta_batch", self.meta_batch, META_BATCH)
        one_of("rtn_variant", self.rtn_variant, RTN_VARIANTS)
        one_of("task", self.task, TASKS)
        one_of("sa_labels", self.sa_labels, SA_LABELS)
        one_of("precision", self.precision, PRECISIONS)
        one_of("rtn_init", self.rtn_init, RTN_INITS)
        one_of("rtn_norm", self.rtn_norm, RTN_NORMS)
        one_of("meta_optimizer", self.meta_optimizer, META_OPTIMIZERS)
        one_of("hypergrad_scale", self.hypergrad_scale, HYPERGRAD_SCALES)
        if self.rtn_init == "identity" and self.rtn_variant != "gated":
            raise ConfigError("rtn_init=identity needs rtn_variant=gated (the plain RTN replaces h and cannot "
                              "start as the identity); use rtn_init=xavier with the plain RTN")
        if not (self.meta_eps > 0 and math.isfinite(self.meta_eps)):
            raise ConfigError(f"meta_eps must be a finite number > 0, got {self.meta_eps}")
        if self.meta_weight_decay is not None and not (self.meta_weight_decay >= 0 and math.isfinite(self.meta_weight_decay)):
            raise ConfigError(f"meta_weight_decay must be a finite number >= 0, got {self.meta_weight_decay}")
        if self.diagnostics_every < 0:
            raise ConfigError(f"diagnostics_every must be >= 0 (0: off), got {self.diagnostics_every}")
        if self.method != "target-only" and not self.source:
            raise ConfigError(f"method {self.method!r} needs at least one --source data set")
        if self.method in ("jt-rtn", "metaxl") and not self.rtn_layers:
            raise ConfigError(f"method {self.method!r} needs at least one RTN layer (--rtn-layers 12)")
        for name in ("epochs", "batch_size", "rtn_hidden", "max_length", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("target_size", "source_size", "dev_size", "test_size", "target_batch_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name} must be >= 1 (or omitted for all), got {v}")
        if self.method == "metaxl" and self.meta_batch == "split" and self.tgt_batch_size < 2:
            raise ConfigError("meta_batch=split needs a target batch of at least 2 (half trains, half is meta)")
        if not self.source_weight >= 0:
            raise ConfigError(f"source_weight must be >= 0 (1: the paper's plain sum), got {self.source_weight}")
        if self.lr <= 0 or self.meta_lr < 0:
            raise ConfigError(f"lr must be > 0 and meta_lr >= 0, got lr={self.lr} meta_lr={self.meta_lr}")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warmup is a fraction of the training steps in [0, 1), got {self.warmup}")
        if self.extend_vocab < 0:
            raise ConfigError(f"extend_vocab is a number of subword pieces (0: off), got {self.extend_vocab}")
        if self.backoff_epochs < 0:
            raise ConfigError(f"backoff_epochs must be >= 0, got {self.backoff_epochs}")
        if self.backoff_epochs and self.method != "metaxl":
            raise ConfigError("backoff_epochs only applies to method=metaxl")
        if self.head_lr is not None and self.head_lr <= 0:
            raise ConfigError(f"head_lr must be > 0 (or omitted to use lr), got {self.head_lr}")
        if self.inner_lr is not None and self.inner_lr < 0:
            raise ConfigError(f"inner_lr must be >= 0, got {self.inner_lr}")
        if self.inner_lr_per_group and self.inner_lr is not None:
            raise ConfigError("inner_lr_per_group takes each group's lr as the virtual-step lr: "
                              f"leave inner_lr unset (got inner_lr={self.inner_lr})")
        if self.fd_epsilon <= 0:
            raise ConfigError(f"fd_epsilon must be > 0, got {self.fd_epsilon}")
        from .reporting import check_report_to

        check_report_to(self.report_to)
        self._validate_numbers()

    def _validate_numbers(self) -> None:
        """Non-finite numbers, clipping, weight decay and on_nonfinite (checked last)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value}")
        if self.max_grad_norm <= 0:
            raise ConfigError(f"max_grad_norm must be > 0 (the gradient-norm clipping threshold; 1 is common), "
                              f"got {self.max_grad_norm}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.on_nonfinite not in ON_NONFINITE:
            raise ConfigError(f"on_nonfinite={self.on_nonfinite!r} is not valid; choose one of: {', '.join(ON_NONFINITE)}")

    @property
    def tgt_batch_size(self) -> int:
        return self.target_batch_size or self.batch_size


def _coerce(key: str, value: Any, type_name: str, where: str) -> Any:
    """YAML reads ``3e-5`` as a string and users write ``"100"``: convert to the field's type."""
    base = type_name.replace(" | None", "").strip()
    if value is None:
        if type_name.endswith("| None"):
            return None
        raise ConfigError(f"{where}: {key} cannot be empty")
    try:
        if base == "float" and not isinstance(value, bool):
            return float(value)
        if base == "int" and not isinstance(value, bool):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if base == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1", "on"):
                return True
            if str(value).lower() in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if base == "str":
            return str(value)
        if base == "list[int]":
            return [int(v) for v in value]
        if base == "list[str]":
            return [str(v) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {key}={value!r} is not a valid {base}; give a {base.replace('list[', 'list of ').rstrip(']')}") from None
    return value


def parse_list(text: str) -> list[str]:
    """Split ``"a,b, c"`` into ``["a", "b", "c"]``.

    >>> parse_list("0,12")
    ['0', '12']
    """
    return [part.strip() for part in str(text).split(",") if part.strip()]

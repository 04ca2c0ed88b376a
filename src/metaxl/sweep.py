"""Grids of ``metaxl train`` runs: expansion, resumable local / Ray execution.

A sweep file is YAML with ``base:`` (TrainConfig keys shared by every run), ``grid:`` (lists of
values to combine) and optional ``exclude:`` rules::

    base: {epochs: 20, target_size: 100}
    grid:
      targets: [masakhaner2:luo, masakhaner2:wol]
      sources: [masakhaner2:en, related]       # 'related': the target's built-in related language
      methods: [target-only, jt, metaxl]
      seeds: [1, 2, 3]
    exclude:
      - {method: jt, source: related}

Every run gets a readable folder (``ner/masakhaner2-luo/metaxl/src-masakhaner2-en/n1000/L12/seed1``)
holding ``config.yaml``, ``results.json`` and ``train.log``. Re-running the same command skips
finished runs, resumes unfinished ones and (with ``--retry-failed``) re-runs failed ones.

>>> from metaxl.sweep import expand_sweep
>>> runs = expand_sweep({"grid": {"targets": ["masakhaner2:luo"], "methods": ["target-only", "jt"],
...                               "sources": ["masakhaner2:en"], "seeds": [1, 2]}})
>>> [r.name for r in runs][:2]
['ner/masakhaner2-luo/target-only/seed1', 'ner/masakhaner2-luo/target-only/seed2']
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from .config import TrainConfig, parse_list
from .errors import ConfigError, DataError, MetaXLError
from .threads import THREADS_FILE_ENV, write_threads

__all__ = [
    "SweepSpec",
    "PlannedRun",
    "SweepOutcome",
    "load_sweep",
    "expand_sweep",
    "effective_config",
    "run_status",
    "run_sweep",
    "register_cli",
    "main",
]

RELATED = "related"
"""Grid value of ``sources`` meaning the target's built-in related language."""

TRAIN_CMD_ENV = "METAXL_TRAIN_CMD"
DEFAULT_TRAIN_COMMAND = ("{python}", "-m", "metaxl", "train")
"""Prefix of the child command; ``--config C --output-dir D --resume`` is appended."""

STATE_FILE = "sweep_state.json"
FAILED_MARKER = "FAILED"
LOCK_FILE = ".sweep.lock"
THREADS_DIR = ".threads"  # the running runs' threads files (metaxl.threads), removed as they end

# grid key -> TrainConfig field
GRID_ALIASES = {
    "targets": "target",
    "sources": "source",
    "methods": "method",
    "source_sizes": "source_size",
    "seeds": "seed",
    "rtn_layers": "rtn_layers",
}
STANDARD_AXES = ("target", "source", "method", "source_size", "rtn_layers")
TOP_LEVEL_KEYS = ("name", "base", "grid", "exclude", "runs_dir", "ray")

# Keys that never change what a run computes (excluded from dedup / config comparison).
NON_SEMANTIC_KEYS = ("output_dir", "progress", "save_state", "diagnostics_every", "report_to")
# Keys that only matter for some methods; others get TrainConfig's defaults (see effective_config).
SOURCE_KEYS = ("source", "source_size")
RTN_KEYS = ("rtn_layers", "rtn_variant", "rtn_hidden", "rtn_init", "rtn_norm", "rtn_per_source", "meta_lr", "meta_optimizer",
            "meta_weight_decay", "meta_eps")
META_KEYS = ("hypergrad", "fd_epsilon", "meta_batch", "inner_lr", "inner_lr_per_group", "reuse_source_gradient",
             "virtual_from_layer", "backoff_epochs", "hypergrad_scale")

_DEFAULTS = TrainConfig().to_dict()
_HINTS = typing.get_type_hints(TrainConfig)

# Data set name prefix -> task, for folder names when task is "auto".
_TASK_BY_PREFIX = {
    "masakhaner2": "ner",
    "masakhaner": "ner",
    "wikiann": "ner",
    "conll": "ner",
    "conll2003": "ner",
    "nusax": "sa",
    "marc": "sa",
    "sentipers": "sa",
    "sentiraama": "sa",
}


# ----------------------------------------------------------------------------------------------
# Sweep specification and expansion
# ----------------------------------------------------------------------------------------------
@dataclass
class SweepSpec:
    """A parsed sweep YAML file.

    >>> spec = SweepSpec.from_dict({"grid": {"seeds": [1, 2]}})
    >>> spec.grid
    {'seeds': [1, 2]}
    """

    base: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    exclude: list[dict[str, Any]] = field(default_factory=list)
    name: str | None = None
    runs_dir: str | None = None
    ray: dict[str, Any] = field(default_factory=dict)
    where: str = "sweep"

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "sweep") -> SweepSpec:
        """Check the top-level layout of a sweep mapping (values are checked by :func:`expand_sweep`)."""
        if not isinstance(data, dict):
            raise ConfigError(
                f"{where}: expected a mapping with base:, grid:, exclude:, got {type(data).__name__}"
            )
        unknown = sorted(set(data) - set(TOP_LEVEL_KEYS))
        if unknown:
            hint = ""
            if set(unknown) & set(TrainConfig.field_names()) | set(unknown) & set(GRID_ALIASES):
                hint = " (training keys go under base: or grid:)"
            raise ConfigError(
                f"{where}: unknown top-level key(s) {', '.join(unknown)}{hint}; valid: {', '.join(TOP_LEVEL_KEYS)}"
            )
        base = data.get("base") or {}
        grid = data.get("grid") or {}
        exclude = data.get("exclude") or []
        ray = data.get("ray") or {}
        if not isinstance(base, dict):
            raise ConfigError(
                f"{where}: base: must be a mapping of TrainConfig keys, got {type(base).__name__}"
            )
        if not isinstance(grid, dict):
            raise ConfigError(f"{where}: grid: must be a mapping of key: [values], got {type(grid).__name__}; write one key: [values] line per key")
        if not isinstance(exclude, list) or not all(isinstance(r, dict) for r in exclude):
            raise ConfigError(
                f"{where}: exclude: must be a list of mappings like '- {{method: jt, source: related}}'"
            )
        if not isinstance(ray, dict) or set(ray) - {"num_cpus", "num_gpus"}:
            raise ConfigError(f"{where}: ray: accepts only num_cpus and num_gpus, got {ray!r}")
        runs_dir = data.get("runs_dir")
        name = data.get("name")
        return cls(
            base=dict(base),
            grid=dict(grid),
            exclude=[dict(r) for r in exclude],
            name=None if name is None else str(name),
            runs_dir=None if runs_dir is None else str(runs_dir),
            ray=dict(ray),
            where=where,
        )


def load_sweep(path: str | Path) -> SweepSpec:
    """Read a sweep YAML file.

    >>> spec = load_sweep("examples/sweeps/ner_masakhaner.yaml")  # doctest: +SKIP
    >>> len(spec.grid["targets"])                                   # doctest: +SKIP
    8
    """
    from .guards import read_yaml_text, yaml_error

    path = Path(path)
    try:
        data = yaml.safe_load(read_yaml_text(path, "sweep file")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(yaml_error(path, e)) from None
    spec = SweepSpec.from_dict(data, where=str(path))
    if spec.name is None:
        spec.name = path.stem
    return spec


@dataclass
class PlannedRun:
    """One run of a sweep: its folder name (relative to the runs dir) and full config."""

    name: str
    config: TrainConfig
    axes: dict[str, Any] = field(default_factory=dict)
    """The grid values as written (``source: 'related'`` stays 'related')."""
    merged: list[dict[str, Any]] = field(default_factory=list)
    """The grid values of combinations merged into this run (same effective config)."""

    def directory(self, runs_dir: str | Path) -> Path:
        return Path(runs_dir) / self.name

    @property
    def config_hash(self) -> str:
        return config_hash(self.config)


def effective_config(cfg: TrainConfig | dict[str, Any]) -> dict[str, Any]:
    """The config with keys the method ignores reset to defaults (used for dedup and grouping).

    target-only ignores sources and the RTN; jt ignores the RTN and meta keys; jt-rtn ignores the
    meta-gradient keys; ``fd_epsilon`` only matters for finite-difference; ``rtn_per_source`` only
    with several sources. RTN layers are sorted. ``task: auto`` reads as the task its target's
    corpus names (``infer_task``), so a run written with ``task: ner`` and one with ``auto`` on the
    same NER corpus are the same run.

    >>> eff = effective_config({"method": "target-only", "source": ["masakhaner2:en"], "rtn_layers": [0]})
    >>> eff["source"], eff["source_size"], eff["rtn_layers"]
    ([], None, [-1])
    """
    d = dict(_DEFAULTS)
    d.update(cfg.to_dict() if isinstance(cfg, TrainConfig) else cfg)
    method = d.get("method")
    reset: list[str] = []
    if method == "target-only":
        d["source"] = []
        d["source_size"] = None
        d["source_weight"] = _DEFAULTS["source_weight"]
        reset += [*RTN_KEYS, *META_KEYS]
    elif method == "jt":
        reset += [*RTN_KEYS, *META_KEYS]
    elif method == "jt-rtn":
        reset += [k for k in META_KEYS]
    for key in reset:
        d[key] = _DEFAULTS[key]
    if d.get("task") == "auto":
        d["task"] = _task_of_target(d.get("target"))
    if d.get("hypergrad") != "finite-difference":
        d["fd_epsilon"] = _DEFAULTS["fd_epsilon"]
    if len(d.get("source") or []) < 2:
        d["rtn_per_source"] = _DEFAULTS["rtn_per_source"]
    if isinstance(d.get("rtn_layers"), list):
        try:
            d["rtn_layers"] = sorted({int(x) for x in d["rtn_layers"]})
        except (TypeError, ValueError):
            pass
    return d


def config_hash(cfg: TrainConfig | dict[str, Any], n: int = 8) -> str:
    """Short stable hash of the effective config (ignores output_dir / progress).

    >>> len(config_hash(TrainConfig()))
    8
    """
    d = effective_config(cfg)
    for k in NON_SEMANTIC_KEYS:
        d.pop(k, None)
    blob = json.dumps(d, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:n]


def infer_task(cfg: TrainConfig) -> str:
    """'ner' / 'sa' from the config's task or the target's data set name; 'auto' if unknown.

    >>> infer_task(TrainConfig(target="nusax:balinese"))
    'sa'
    """
    return cfg.task if cfg.task != "auto" else _task_of_target(cfg.target)


def _task_of_target(target: Any) -> str:
    """'ner' / 'sa' from a ``corpus:lang`` target's corpus name; 'auto' if it names none."""
    prefix = target.split(":", 1)[0].lower() if isinstance(target, str) and ":" in target else ""
    return _TASK_BY_PREFIX.get(prefix, "auto")


def _slug(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "+".join(_slug(v) for v in value) or "none"
    text = "none" if value is None else str(value)
    if "/" in text or "\\" in text:  # a path: keep its last part
        text = Path(text.rstrip("/\\")).name or text
    text = re.sub(r"[^A-Za-z0-9._+-]+", "-", text.replace(":", "-")).strip("-.")
    return text or "x"


def _layers_label(layers: Sequence[int]) -> str:
    return "L" + "+".join("last" if x == -1 else str(x) for x in layers)


def key_matters(key: str, method: str) -> bool:
    """Whether TrainConfig key ``key`` affects a run of ``method``.

    >>> key_matters("rtn_layers", "jt"), key_matters("rtn_layers", "metaxl")
    (False, True)
    """
    if method == "target-only" and key in (*SOURCE_KEYS, *RTN_KEYS, *META_KEYS):
        return False
    if method == "jt" and key in (*RTN_KEYS, *META_KEYS):
        return False
    if method == "jt-rtn" and key in META_KEYS:
        return False
    return True


def run_name(cfg: TrainConfig, extra_keys: Sequence[str] = ()) -> str:
    """Readable folder name of a run (without the uniqueness hash).

    >>> run_name(TrainConfig(target="masakhaner2:luo", source=["masakhaner2:en"], seed=1))
    'ner/masakhaner2-luo/metaxl/src-masakhaner2-en/n1000/Llast/seed1'
    """
    eff = effective_config(cfg)
    method = cfg.method
    parts = [infer_task(cfg), _slug(cfg.target), _slug(method)]
    if method != "target-only":
        parts.append("src-" + _slug(eff["source"]))
        parts.append("n" + ("all" if eff["source_size"] is None else str(eff["source_size"])))
    if method in ("jt-rtn", "metaxl"):
        parts.append(_layers_label(eff["rtn_layers"]))
    for key in extra_keys:
        if key_matters(key, method) and key not in ("seed", *STANDARD_AXES):
            parts.append(f"{key}-{_slug(eff[key])}")
    parts.append(f"seed{cfg.seed}")
    return "/".join(parts)


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _coerce(key: str, value: Any, where: str) -> Any:
    """Check / coerce a YAML value for TrainConfig field ``key`` (YAML reads ``3e-5`` as a string)."""
    if key == "source":
        return _as_sources(value, where)
    if key == "rtn_layers":
        return _as_layers(value, where)
    hint = _HINTS[key]
    if typing.get_origin(hint) is list and typing.get_args(hint) == (str,):  # report_to: a name or a list
        if isinstance(value, str):
            return parse_list(value)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ConfigError(f"{where}: {key}={value!r} is not a valid list of names")
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None or (
        isinstance(value, str) and value.lower() in ("all", "none", "null") and type(None) in args
    ):
        if type(None) in args:
            return None
        raise ConfigError(f"{where}: {key} cannot be empty; give a {_type_name(hint)}")
    for t in args:
        if t is bool and isinstance(value, bool):
            return value
        if t is int and not isinstance(value, bool):
            if isinstance(value, int):
                return value
            if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
                return int(value)
        if t is float and not isinstance(value, bool):
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
        if t is str and isinstance(value, str):
            return value
    raise ConfigError(f"{where}: {key}={value!r} is not a valid {_type_name(hint)}; give a {_type_name(hint)}")


def _as_sources(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return parse_list(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value]
    raise ConfigError(
        f"{where}: source={value!r}: give a data set spec (masakhaner2:en), 'related', or a list of them"
    )


def _as_layers(value: Any, where: str) -> list[int]:
    try:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, int):
            return [value]
        if isinstance(value, str):
            return [int(x) for x in parse_list(value)]
        if isinstance(value, list):
            return [int(x) for x in value if not isinstance(x, bool)] if value else []
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"{where}: rtn_layers={value!r}: give a layer number (12) or a list of them ([0, 12])")


def _grid_axes(spec: SweepSpec) -> list[tuple[str, list[Any]]]:
    fields = set(TrainConfig.field_names())
    axes: dict[str, list[Any]] = {}
    for key, values in spec.grid.items():
        fname = GRID_ALIASES.get(key, key)
        where = f"{spec.where}: grid.{key}"
        if fname not in fields:
            raise ConfigError(
                f"{where}: unknown key; use a TrainConfig key ({', '.join(TrainConfig.field_names())}) "
                f"or one of {', '.join(GRID_ALIASES)}"
            )
        if fname in NON_SEMANTIC_KEYS and fname == "output_dir":
            raise ConfigError(f"{where}: output_dir is set per run by the sweep; remove it")
        if fname in axes:
            raise ConfigError(f"{spec.where}: grid gives {fname!r} twice (e.g. both 'targets' and 'target')")
        if not isinstance(values, list) or not values:
            raise ConfigError(
                f"{where} must be a non-empty list of values, got {values!r}; put single values under base:"
            )
        norm: list[Any]
        if fname == "source":
            norm = [_as_sources(v, where) for v in values]
        elif fname == "rtn_layers":
            norm = [_as_layers(v, where) for v in values]
        else:
            norm = [_coerce(fname, v, where) for v in values]
        axes[fname] = norm
    order = [k for k in STANDARD_AXES if k in axes]
    order += [k for k in axes if k not in STANDARD_AXES and k != "seed"]
    if "seed" in axes:
        order.append("seed")
    return [(k, axes[k]) for k in order]


def _rule_values(key: str, value: Any, where: str) -> list[Any]:
    """Accepted values of one exclude-rule key (for list-valued keys a flat list is one value)."""
    if key == "source":
        if isinstance(value, list) and any(isinstance(v, list) for v in value):
            return [_as_sources(v, where) for v in value]
        return [_as_sources(value, where)]
    if key == "rtn_layers":
        if isinstance(value, list) and any(isinstance(v, list) for v in value):
            return [sorted(_as_layers(v, where)) for v in value]
        return [sorted(_as_layers(value, where))]
    values = value if isinstance(value, list) else [value]
    return [_coerce(key, v, where) for v in values]


def _compile_rules(spec: SweepSpec) -> list[dict[str, list[Any]]]:
    fields = set(TrainConfig.field_names())
    rules = []
    for i, rule in enumerate(spec.exclude):
        where = f"{spec.where}: exclude[{i}]"
        if not rule:
            raise ConfigError(f"{where}: empty rule would exclude every run; remove it")
        compiled: dict[str, list[Any]] = {}
        for key, value in rule.items():
            fname = GRID_ALIASES.get(key, key)
            if fname not in fields:
                raise ConfigError(
                    f"{where}: unknown key {key!r}; use TrainConfig keys like method, source, target"
                )
            compiled[fname] = _rule_values(fname, value, f"{where}.{key}")
        rules.append(compiled)
    return rules


def _norm_for_match(key: str, value: Any) -> Any:
    if key == "rtn_layers" and isinstance(value, list):
        return sorted(value)
    return value


def _excluded(rules: list[dict[str, list[Any]]], raw: dict[str, Any], eff: dict[str, Any] | None) -> bool:
    for rule in rules:
        ok = True
        for key, accepted in rule.items():
            cands = []
            if key in raw:
                cands.append(_norm_for_match(key, raw[key]))
            if eff is not None and key in eff:
                cands.append(_norm_for_match(key, eff[key]))
            if not any(c == a for c in cands for a in accepted):
                ok = False
                break
        if ok:
            return True
    return False


RelatedFn = Callable[[str], tuple[str, str]]


def _default_related() -> RelatedFn:
    try:
        from .data import related_source
    except ImportError as e:
        raise ConfigError(
            f"'related' sources need metaxl.data.related_source, which cannot be imported ({e}); "
            "list the source data sets explicitly"
        ) from None
    return related_source


@dataclass
class ExpansionStats:
    combinations: int = 0
    excluded: int = 0
    duplicates: int = 0


def expand_sweep(
    spec: SweepSpec | dict[str, Any],
    *,
    related: RelatedFn | None = None,
    stats: ExpansionStats | None = None,
) -> list[PlannedRun]:
    """Expand a sweep into validated, deduplicated runs with unique folder names.

    ``related(target) -> (source_spec, reason)`` resolves the word ``related`` (default:
    :func:`metaxl.data.related_source`, imported only when needed). Every config is validated with
    :meth:`TrainConfig.validate`; a bad one raises :class:`ConfigError` naming the run.

    >>> runs = expand_sweep({"grid": {"targets": ["nusax:balinese"], "sources": ["related"],
    ...                               "methods": ["jt"]}},
    ...                     related=lambda t: ("nusax:indonesian", "same family"))
    >>> runs[0].config.source
    ['nusax:indonesian']
    """
    if isinstance(spec, dict):
        spec = SweepSpec.from_dict(spec)
    stats = stats if stats is not None else ExpansionStats()
    base = _base_config(spec)
    axes = _grid_axes(spec)
    rules = _compile_rules(spec)
    extra_keys = [k for k, _ in axes if k not in STANDARD_AXES and k != "seed"]
    keys = [k for k, _ in axes]
    sources = _RelatedSources(spec.where, related)
    runs: list[PlannedRun] = []
    seen: dict[str, PlannedRun] = {}
    errors: dict[str, list[str]] = {}  # message -> the runs it stops
    for combo in itertools.product(*(vals for _, vals in axes)):
        stats.combinations += 1
        raw = dict(zip(keys, combo, strict=True))
        desc = ", ".join(f"{k}={v}" for k, v in raw.items()) or "the base config"
        cfg = _combination_config(spec.where, base, raw, desc, rules, sources)
        if cfg is None:
            stats.excluded += 1
            continue
        try:
            cfg.validate()
        except ConfigError as e:
            errors.setdefault(f"{e}", []).append(desc)
            continue
        h = config_hash(cfg)
        if h in seen:
            stats.duplicates += 1
            seen[h].merged.append(raw)
            continue
        seen[h] = PlannedRun(name=run_name(cfg, extra_keys), config=cfg, axes=raw)
        runs.append(seen[h])
    if errors:
        lines = [f"{msg} ({f'{len(d)} runs, first' if len(d) > 1 else 'run'} {d[0]})" for msg, d in errors.items()]
        shown = "; ".join(lines[:5]) + (f"; ... {len(lines) - 5} more" if len(lines) > 5 else "")
        raise ConfigError(f"{spec.where}: invalid run config(s): {shown}. Fix base:/grid: or add exclude: rules")
    _unique_names(runs)
    return runs


def _base_config(spec: SweepSpec) -> dict[str, Any]:
    """The sweep's ``base:`` as TrainConfig fields (grid aliases allowed; output_dir is the sweep's)."""
    fields = set(TrainConfig.field_names())
    base: dict[str, Any] = {}
    for key, value in spec.base.items():
        fname = GRID_ALIASES.get(key, key) if key not in fields else key
        if fname not in fields:
            raise ConfigError(
                f"{spec.where}: base.{key}: unknown key; valid keys: {', '.join(TrainConfig.field_names())}"
            )
        if fname == "output_dir":
            raise ConfigError(
                f"{spec.where}: base.output_dir: the sweep sets each run's output_dir; use --runs-dir"
            )
        base[fname] = _coerce(fname, value, f"{spec.where}: base.{key}")
    base.setdefault("progress", False)
    return base


class _RelatedSources:
    """Replaces the word ``related`` in a run's sources by the target's related source data set
    (``related(target)``, default :func:`metaxl.data.related_source`), once per target."""

    def __init__(self, where: str, related: RelatedFn | None) -> None:
        self.where, self.related = where, related
        self.cache: dict[str, list[str]] = {}

    def resolve(self, target: str, sources: list[str], raw_desc: str) -> list[str]:
        out = []
        for s in sources:
            if s != RELATED:
                out.append(s)
                continue
            if target not in self.cache:
                if self.related is None:
                    self.related = _default_related()
                try:
                    got = self.related(target)
                except MetaXLError as e:
                    raise ConfigError(
                        f"{self.where}: {raw_desc}: no related source for target {target!r} ({e}); "
                        f"add an exclude rule '- {{target: {target}, source: related}}' or list sources explicitly"
                    ) from None
                src = got[0] if isinstance(got, tuple) else got
                self.cache[target] = [str(src)]
            out.extend(self.cache[target])
        return out


def _combination_config(where: str, base: dict[str, Any], raw: dict[str, Any], desc: str, rules: list[dict[str, list[Any]]],
                        sources: _RelatedSources) -> TrainConfig | None:
    """One grid combination's config over the base (not yet validated), or None when an exclude
    rule drops it: on the values as written, or on the effective config."""
    merged = {**base, **raw}
    if _excluded(rules, raw, {**_DEFAULTS, **merged}):
        return None
    method = merged.get("method", _DEFAULTS["method"])
    target = merged.get("target", _DEFAULTS["target"])
    if method == "target-only":
        merged["source"] = []
    else:
        merged["source"] = sources.resolve(target, list(merged.get("source", _DEFAULTS["source"])), desc)
    try:
        cfg = TrainConfig.from_dict(merged, where=f"{where}: run ({desc})")
    except TypeError as e:
        raise ConfigError(f"{where}: run ({desc}): {e}") from None
    eff = effective_config(cfg)
    if _excluded(rules, raw, eff):
        return None
    return TrainConfig.from_dict({k: eff[k] for k in TrainConfig.field_names()})


def _unique_names(runs: list[PlannedRun]) -> None:
    """Append the config hash where readable names collide."""
    by_name: dict[str, list[PlannedRun]] = {}
    for r in runs:
        by_name.setdefault(r.name, []).append(r)
    for name, group in by_name.items():
        if len(group) > 1:
            for r in group:
                r.name = f"{name}-{r.config_hash}"


def parse_only(options: Sequence[str]) -> dict[str, list[Any]]:
    """``--only KEY=V1,V2`` options -> one selection rule, in the form of a compiled exclude rule.

    A run is selected when it matches every key; the comma-separated values of one key are
    alternatives. For the list-valued keys a ``+`` joins one value's items: ``source=a+b`` is the
    two-source setting, ``rtn_layers=0+12`` the two-RTN one. Keys are those of ``exclude:`` rules
    (TrainConfig keys and the plural grid names).

    >>> parse_only(["targets=nusax:balinese", "seed=2,3", "rtn_layers=12,0+12"])
    {'target': ['nusax:balinese'], 'seed': [2, 3], 'rtn_layers': [[12], [0, 12]]}
    """
    fields = set(TrainConfig.field_names())
    rule: dict[str, list[Any]] = {}
    for opt in options:
        key, sep, text = opt.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key or not text:
            raise ConfigError(f"--only {opt!r}: write KEY=VALUE[,VALUE...], e.g. --only target=nusax:balinese")
        fname = GRID_ALIASES.get(key, key)
        if fname not in fields:
            raise ConfigError(
                f"--only {opt!r}: unknown key {key!r}; use a TrainConfig key or grid name "
                "(target, source, method, source_size, rtn_layers, seed, sa_labels, ...)"
            )
        if fname in rule:
            raise ConfigError(f"--only: {key!r} given twice; list its alternatives once: {key}=A,B")
        alternatives = [a.strip() for a in text.split(",") if a.strip()]
        if fname in ("source", "rtn_layers"):
            value: Any = [[x.strip() for x in a.split("+")] for a in alternatives]
        else:
            value = alternatives
        rule[fname] = _rule_values(fname, value, f"--only {key}")
    return rule


def select_runs(runs: list[PlannedRun], rule: dict[str, list[Any]]) -> list[PlannedRun]:
    """The runs that match a :func:`parse_only` rule (by the grid value as written or as resolved).

    Raises :class:`ConfigError` naming the values the sweep has when the rule selects nothing.

    >>> runs = expand_sweep({"grid": {"targets": ["nusax:balinese", "nusax:acehnese"],
    ...                               "methods": ["target-only"], "seeds": [1, 2, 3]}})
    >>> [r.name for r in select_runs(runs, parse_only(["target=nusax:acehnese", "seed=2"]))]
    ['sa/nusax-acehnese/target-only/seed2']
    """
    if not rule:
        return list(runs)
    def matches(r: PlannedRun) -> bool:
        eff = effective_config(r.config)
        for axes in (r.axes, *r.merged):  # a grid value the run's method ignores cannot select it
            written = {k: v for k, v in axes.items() if key_matters(k, r.config.method)}
            if _excluded([rule], written, eff):
                return True
        return False

    chosen = [r for r in runs if matches(r)]
    if not chosen and runs:
        seen = []
        for key in rule:
            vals = sorted({repr(_norm_for_match(key, effective_config(r.config)[key])) for r in runs})
            seen.append(f"{key}: {', '.join(vals[:12])}{' ...' if len(vals) > 12 else ''}")
        raise ConfigError(f"--only selects none of the sweep's {len(runs)} runs; its values are {'; '.join(seen)}")
    return chosen


# ----------------------------------------------------------------------------------------------
# Run status on disk
# ----------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_failed_marker(path: Path) -> dict[str, str]:
    """Parse a ``FAILED`` marker: ``key: value`` header lines, then the log tail.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "FAILED"
    >>> _ = p.write_text("exit_code: 1\\nreason: boom\\n--- last lines of train.log ---\\nx\\n")
    >>> read_failed_marker(p)["exit_code"]
    '1'
    """
    info: dict[str, str] = {}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return info
    head, _, tail = text.partition("\n--- ")
    for line in head.splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            info[key.strip()] = value.strip()
    if tail:
        info["log_tail"] = tail.partition("\n")[2]
    return info


def run_status(run_dir: str | Path) -> str:
    """Status of a run folder: 'finished', 'failed', 'unfinished' (started) or 'new'.

    >>> run_status("/nonexistent/run")
    'new'
    """
    run_dir = Path(run_dir)
    results = _read_json(run_dir / "results.json") if (run_dir / "results.json").exists() else None
    if results is not None and results.get("status") == "finished":
        return "finished"
    if (run_dir / FAILED_MARKER).exists() or (results is not None and results.get("status") == "failed"):
        return "failed"
    if any((run_dir / f).exists() for f in ("results.json", "config.yaml", "train.log", "checkpoint")):
        return "unfinished"
    return "new"


def _data_specs(cfg: TrainConfig) -> list[str]:
    """The data sets a run reads: its target, and its sources unless it is target-only."""
    return list(dict.fromkeys([cfg.target] + ([] if cfg.method == "target-only" else list(cfg.source))))


def missing_data(runs: Sequence[PlannedRun]) -> list[tuple[str, str, int]]:
    """The data sets ``runs`` need that do not resolve here: ``(name, error, number of runs)``.

    Each distinct (data set, ``data_dir``, ``sa_labels``) is resolved once, as ``metaxl train``
    would (local corpora are looked up on disk; hub corpora are not fetched, so they always pass).

    >>> run = PlannedRun("r", TrainConfig(target="masakhaner2:xx", data_dir="/nonexistent", method="target-only"))
    >>> [(name, n) for name, _, n in missing_data([run])]
    [('masakhaner2:xx', 1)]
    """
    from .data import resolve_dataset

    errors: dict[tuple[str, str | None, str], str | None] = {}
    counts: dict[tuple[str, str | None, str], int] = {}
    for r in runs:
        c = r.config
        for spec in _data_specs(c):
            key = (spec, c.data_dir, c.sa_labels)
            if key not in errors:
                try:
                    resolve_dataset(spec, c.data_dir, sa_labels=c.sa_labels)
                    errors[key] = None
                except (DataError, ConfigError) as e:
                    errors[key] = str(e)
            if errors[key] is not None:
                counts[key] = counts.get(key, 0) + 1
    return [(key[0], str(errors[key]), n) for key, n in counts.items()]


def _config_differences(path: Path, cfg: TrainConfig) -> list[str]:
    try:
        old = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return ["<unreadable config.yaml>"]
    if not isinstance(old, dict):
        return ["<unreadable config.yaml>"]
    try:
        old_eff = effective_config(old)
    except Exception:  # noqa: BLE001 - any malformed file is simply "different"
        return ["<unreadable config.yaml>"]
    new_eff = effective_config(cfg)
    diffs = []
    for k in TrainConfig.field_names():
        if k in NON_SEMANTIC_KEYS:
            continue
        if old_eff.get(k) != new_eff.get(k):
            diffs.append(f"{k}: {old_eff.get(k)!r} -> {new_eff.get(k)!r}")
    return diffs


PROGRESS_EVERY_S = 5.0
"""How often the sweep's progress bar re-reads the running runs' logs for their epochs."""
_EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+):")


def epochs_done(lines: Sequence[str]) -> tuple[int, int] | None:
    """The last ``epoch K/N:`` line of a run's log (``metaxl train`` prints one per finished epoch)
    as ``(K, N)``; None before the first.

    >>> epochs_done(["===== launch ...", "epoch 1/10: loss 2.0462  dev f1 50.95  (best)  [266s]",
    ...              "epoch 2/10: loss 1.1  dev f1 55.00  (best)  [270s]"])
    (2, 10)
    >>> epochs_done(["Loading weights: 100%"]) is None
    True
    """
    for line in reversed(lines):
        m = _EPOCH_LINE.match(line)
        if m:
            return int(m.group(1)), int(m.group(2))
    return None


def _log_tail(path: Path, n: int = 20) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 16384))
            data = f.read().decode(errors="replace")
    except OSError:
        return []
    lines = [ln.rstrip("\r") for ln in data.replace("\r\n", "\n").split("\n")]
    lines = [ln.split("\r")[-1] for ln in lines]  # keep the last state of tqdm-style lines
    while lines and not lines[-1].strip():
        lines.pop()
    return lines[-n:]


# ----------------------------------------------------------------------------------------------
# Child processes
# ----------------------------------------------------------------------------------------------
def resolve_train_command(train_command: Sequence[str] | str | None = None) -> list[str]:
    """The child command prefix: argument, else $METAXL_TRAIN_CMD (shell words), else the default.

    ``{python}`` is replaced by the interpreter of the machine that launches the child.

    >>> resolve_train_command("python fake_train.py")
    ['python', 'fake_train.py']
    """
    if train_command is None:
        env = os.environ.get(TRAIN_CMD_ENV, "").strip()
        if env:
            train_command = env
    if train_command is None:
        return list(DEFAULT_TRAIN_COMMAND)
    if isinstance(train_command, str):
        parts = shlex.split(train_command)
    else:
        parts = [str(p) for p in train_command]
    if not parts:
        raise ConfigError(f"empty train command (${TRAIN_CMD_ENV}); give e.g. 'python -m metaxl train'")
    return parts


def _child_argv(prefix: Sequence[str], run_dir: Path) -> list[str]:
    return [
        *(sys.executable if p == "{python}" else p for p in prefix),
        "--config",
        str(run_dir / "config.yaml"),
        "--output-dir",
        str(run_dir),
        "--resume",
    ]


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
"""The thread-count variables of the libraries under torch's CPU kernels (OpenMP, MKL, OpenBLAS)."""


def user_threads(environ: Mapping[str, str] | None = None) -> str | None:
    """The thread count the user set for any CPU library (``OMP_NUM_THREADS`` first), or None.

    >>> user_threads({"MKL_NUM_THREADS": "1"}), user_threads({"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "1"})
    ('1', '3')
    >>> user_threads({"OMP_NUM_THREADS": " "}) is None
    True
    """
    environ = os.environ if environ is None else environ
    return next((environ[v].strip() for v in THREAD_VARS if environ.get(v, "").strip()), None)


def _thread_env(threads: int, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables a training child gets on top of the sweep's environment.

    Threads: ``threads`` for every library when the user set none; when the user set one (the
    recipe ``OMP_NUM_THREADS=1 metaxl sweep ...``), the others alike: MKL's sgemm otherwise ran
    on ``cores // jobs`` threads beside OpenMP's one (two sweeps side by side: a JT NER epoch took
    314 s against 56-62 s with both set to 1). A variable the user set is never changed.

    >>> _thread_env(2, {})
    {'OMP_NUM_THREADS': '2', 'MKL_NUM_THREADS': '2', 'OPENBLAS_NUM_THREADS': '2', 'TOKENIZERS_PARALLELISM': 'false'}
    >>> _thread_env(2, {"OMP_NUM_THREADS": "1"})
    {'MKL_NUM_THREADS': '1', 'OPENBLAS_NUM_THREADS': '1', 'TOKENIZERS_PARALLELISM': 'false'}
    """
    environ = os.environ if environ is None else environ
    value = user_threads(environ) or str(max(1, threads))
    env = {var: value for var in THREAD_VARS if not environ.get(var, "").strip()}
    if "TOKENIZERS_PARALLELISM" not in environ:
        env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def _kill_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError, OSError):
        try:
            proc.send_signal(sig)
        except (ProcessLookupError, OSError):
            pass


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` (Linux) after which the child gets SIGTERM when the thread that started it
    dies, so a Ray worker killed by ``ray.cancel(force=True)`` or a killed driver leaves no
    training behind. Resolved here, in the parent: between fork and exec the child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig, sigterm = 1, int(signal.SIGTERM)
    return lambda: prctl(pr_set_pdeathsig, sigterm)


WAIT_POLL_S = 0.2
"""``run_child`` waits for its child in slices this long, so that Python code runs in between."""


def run_child(
    prefix: Sequence[str],
    run_dir: str,
    env_updates: dict[str, str],
    header: str,
    on_start: Callable[[subprocess.Popen[bytes]], None] | None = None,
    grace_s: float = 10.0,
) -> int:
    """Run one training child, stdout+stderr appended to ``run_dir/train.log``; return its exit code.

    Used by the local backend and, unchanged, inside Ray tasks: on KeyboardInterrupt (how Ray
    cancels a task) the child's process group gets SIGTERM, then SIGKILL after ``grace_s``. The
    wait is a loop of short waits, not one blocking ``waitpid``: Ray delivers the cancellation as
    an asynchronous exception, which only arrives while Python code runs (a task blocked in
    ``Popen.wait()`` never saw it, and its run went on after Ctrl-C).

    >>> run_child(["true"], "/tmp", {}, "")   # doctest: +SKIP
    0
    """
    rdir = Path(run_dir)
    argv = _child_argv(prefix, rdir)
    env = {**os.environ, **env_updates}
    with open(rdir / "train.log", "ab") as log:
        log.write(f"\n===== {header} {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent(),
        )
        try:
            if on_start is not None:
                on_start(proc)
            while True:
                try:
                    return proc.wait(timeout=WAIT_POLL_S)
                except subprocess.TimeoutExpired:
                    continue
        except BaseException:
            _kill_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc, signal.SIGKILL)
                proc.wait()
            raise


# ----------------------------------------------------------------------------------------------
# The sweep runner
# ----------------------------------------------------------------------------------------------
@dataclass
class SweepOutcome:
    """Counts after a sweep invocation; ``exit_code`` is what ``metaxl sweep`` returns."""

    total: int = 0
    finished_before: int = 0
    launched: int = 0
    finished: int = 0
    failed: int = 0
    skipped_failed: int = 0
    interrupted: int = 0
    runs_dir: str = ""

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 1 if (self.failed or self.skipped_failed) else 0


def busy_cpu_note(load: float, cores: int, jobs: int) -> str | None:
    """A warning for a local sweep started on a machine whose CPUs are already busy, else None.

    Each child gets ``cores // jobs`` threads (``_thread_env``), chosen as if the sweep had the
    machine to itself. When other work already keeps some cores busy (another sweep, a training
    run), threads beyond the free cores make PyTorch's CPU kernels wait on each other: on the
    project's 2-core machine a target-only NER run with 2 threads beside a 1-thread run took 165 s
    per epoch against 41 s with 1 thread (docs/sweeps.md). ``load`` is the 1-minute load average.

    >>> busy_cpu_note(load=0.1, cores=2, jobs=1) is None
    True
    >>> print(busy_cpu_note(load=1.2, cores=2, jobs=1))
    note: the CPUs are busy already (1-minute load average 1.2 on 2 cores) and each run of this sweep gets 2 threads; if that other work keeps going, runs can be several times slower: start the sweep with OMP_NUM_THREADS=1 (threads of all processes <= cores), or stop the other work
    """
    threads = max(1, cores // max(1, jobs))
    free = cores - load
    if threads <= 1 or jobs * threads <= free + 0.5:
        return None
    return (
        f"note: the CPUs are busy already (1-minute load average {load:.1f} on {cores} cores) and each run "
        f"of this sweep gets {threads} threads; if that other work keeps going, runs can be several times "
        f"slower: start the sweep with OMP_NUM_THREADS={max(1, int((free + 0.5) // jobs))} (threads of "
        f"all processes <= cores), or stop the other work"
    )


def too_many_jobs_note(cores: int, jobs: int) -> str | None:
    """A note for a local sweep asked to run more runs at once than the machine has cores, else None.

    Each child then gets one thread (``_thread_env``) and the children time-share the cores: on
    the CPU, runs beyond the cores finish no sooner overall, each run takes longer, and all of
    them hold their memory at once. On a GPU machine more runs than cores can pay (the GPU does
    the work), hence a note, not an error.

    >>> too_many_jobs_note(cores=2, jobs=2) is None
    True
    >>> print(too_many_jobs_note(cores=2, jobs=4))
    note: --jobs 4 on 2 cores: if the runs train on the CPU, the 4 runs time-share 2 cores, so each is slower, they finish no sooner than with --jobs 2, and all 4 hold their memory at once; use --jobs 2 unless they train on a GPU
    """
    if jobs <= cores:
        return None
    return (
        f"note: --jobs {jobs} on {cores} cores: if the runs train on the CPU, the {jobs} runs time-share "
        f"{cores} cores, so each is slower, they finish no sooner than with --jobs {cores}, and all {jobs} "
        f"hold their memory at once; use --jobs {cores} unless they train on a GPU"
    )


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@contextmanager
def _sweep_lock(runs_dir: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-Unix
        yield
        return
    path = runs_dir / LOCK_FILE
    fh = open(path, "a+")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise MetaXLError(
                f"another metaxl sweep is running on {runs_dir} (lock {path}); wait for it to end or stop it"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield
    finally:
        fh.close()


def _pid_runs(pid: int, needle: str) -> bool:
    cmdline = Path(f"/proc/{pid}/cmdline")
    try:
        return needle in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False


class _State:
    """``runs_dir/sweep_state.json``: informative per-run record, written atomically."""

    def __init__(self, runs_dir: Path, sweep: str) -> None:
        self.path = runs_dir / STATE_FILE
        self.lock = threading.Lock()
        old = _read_json(self.path) or {}
        self.data: dict[str, Any] = {"sweep": sweep, "runs": dict(old.get("runs") or {})}

    def get(self, name: str) -> dict[str, Any]:
        return dict(self.data["runs"].get(name) or {})

    def update(self, name: str, **fields: Any) -> None:
        with self.lock:
            entry = self.data["runs"].setdefault(name, {})
            entry.update(fields)
            for k in [k for k, v in fields.items() if v is None]:
                entry.pop(k, None)
            self._write()

    def save(self, **summary: Any) -> None:
        with self.lock:
            self.data["summary"] = summary
            self._write()

    def _write(self) -> None:
        self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=False))
        os.replace(tmp, self.path)


class _Runner:
    def __init__(
        self,
        runs_dir: Path,
        runs: list[PlannedRun],
        state: _State,
        prefix: list[str],
        env: dict[str, str],
        out: TextIO,
        grace_s: float,
        cores: int | None = None,
    ) -> None:
        self.runs_dir = runs_dir
        self.runs = runs
        self.state = state
        self.prefix = prefix
        self.env = env
        self.out = out
        self.grace_s = grace_s
        self.stop = threading.Event()
        self.signum: int | None = None
        self.lock = threading.Lock()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.outcome: dict[str, str] = {}
        self.by_name = {r.name: r for r in runs}
        # local backend, threads chosen by the sweep: each running run's thread count, raised
        # (cores // running) through its threads file once no run is left to start
        self.cores = cores
        self.threads: dict[str, int] = {}
        self.started = 0

    # -- preparing and concluding a run (driver side, shared by both backends) --
    def prepare(self, run: PlannedRun) -> Path:
        rdir = run.directory(self.runs_dir)
        rdir.mkdir(parents=True, exist_ok=True)
        cfg = run.config.replace(output_dir=str(rdir))
        cfg.to_yaml(rdir / "config.yaml")
        (rdir / FAILED_MARKER).unlink(missing_ok=True)
        launches = int(self.state.get(run.name).get("launches", 0)) + 1
        self.state.update(
            run.name,
            status="running",
            launches=launches,
            started=time.strftime("%Y-%m-%dT%H:%M:%S"),
            exit_code=None,
            reason=None,
            log_tail=None,
            ended=None,
        )
        return rdir

    def conclude(self, run: PlannedRun, rc: int | None, error: str | None = None) -> str:
        rdir = run.directory(self.runs_dir)
        results = _read_json(rdir / "results.json")
        status = results.get("status") if results else None
        now = time.strftime("%Y-%m-%dT%H:%M:%S")
        if rc == 0 and status == "finished":
            self.state.update(run.name, status="finished", exit_code=0, ended=now, pid=None)
            return "finished"
        if self.stop.is_set() and status != "failed":
            self.state.update(run.name, status="interrupted", exit_code=rc, ended=now, pid=None)
            return "interrupted"
        if error is not None:
            reason = error
        elif rc is not None and rc < 0:
            reason = f"killed by signal {-rc} ({_signame(-rc)})"
        elif rc:
            reason = f"exited with code {rc}"
        elif status == "failed":
            reason = "results.json says status 'failed'"
        else:
            reason = f"exited 0 but results.json status is {status!r} (expected 'finished')"
        tail = _log_tail(rdir / "train.log")
        header = [
            f"exit_code: {rc}",
            f"reason: {reason}",
            f"time: {now}",
            f"command: {shlex.join(_child_argv(self.prefix, rdir))}",
        ]
        text = "\n".join(header) + "\n--- last lines of train.log ---\n" + "\n".join(tail) + "\n"
        (rdir / FAILED_MARKER).write_text(text)
        self.state.update(
            run.name, status="failed", exit_code=rc, reason=reason, log_tail=tail, ended=now, pid=None
        )
        return "failed"

    # -- local backend --
    def _threads_file(self, run: PlannedRun) -> Path:
        return self.runs_dir / THREADS_DIR / (run.name.replace("/", "__") + ".threads")

    def _register(self, run: PlannedRun) -> dict[str, str]:
        """Count ``run`` as started and, when the sweep chose the threads, give it its threads
        file; both under the lock, so that ``spread_threads`` never sees every run started but
        this one's threads not yet counted (it would hand this run's cores to another)."""
        with self.lock:
            self.started += 1
            if self.cores is None:
                return self.env
            threads = int(self.env["OMP_NUM_THREADS"])
            path = self._threads_file(run)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_threads(path, threads)
            self.threads[run.name] = threads
            return {**self.env, THREADS_FILE_ENV: str(path)}

    def _run_local(self, run: PlannedRun) -> str:
        if self.stop.is_set():
            return "not started"
        rdir = self.prepare(run)
        env = self._register(run)

        def on_start(proc: subprocess.Popen[bytes]) -> None:
            with self.lock:
                self.procs[run.name] = proc
                stopping = self.stop.is_set()
            self.state.update(run.name, pid=proc.pid)
            if stopping:
                _kill_group(proc, signal.SIGTERM)

        try:
            rc = run_child(self.prefix, str(rdir), env, f"launch {run.name}", on_start, self.grace_s)
        except OSError as e:
            return self.conclude(run, None, error=f"could not start {self.prefix[0]!r}: {e}")
        finally:
            with self.lock:
                self.procs.pop(run.name, None)
                if self.threads.pop(run.name, None) is not None:
                    self._threads_file(run).unlink(missing_ok=True)
        return self.conclude(run, rc)

    def spread_threads(self) -> None:
        """Once every run has started, give the cores of the runs that ended to those still going:
        each gets ``cores // running`` threads (never fewer than it has)."""
        if self.cores is None or self.stop.is_set():
            return
        with self.lock:
            if self.started < len(self.runs) or not self.threads:
                return
            share = max(1, self.cores // len(self.threads))
            for name, threads in self.threads.items():
                if threads < share:
                    write_threads(self._threads_file(self.by_name[name]), share)
                    self.threads[name] = share

    def terminate_all(self, sig: int = signal.SIGTERM) -> None:
        with self.lock:
            procs = list(self.procs.values())
        for p in procs:
            _kill_group(p, sig)

    def run_local(self, jobs: int, bar: Any) -> None:
        pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="metaxl-sweep")
        futures: dict[Future[str], PlannedRun] = {pool.submit(self._run_local, r): r for r in self.runs}
        pending = set(futures)
        killed_at: float | None = None
        shown_at = time.monotonic()
        try:
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                for f in done:
                    self._record(futures[f], f.result(), bar)
                self.spread_threads()
                if time.monotonic() - shown_at > PROGRESS_EVERY_S:  # the running runs' epochs, from their logs
                    shown_at = time.monotonic()
                    self._postfix(bar)
                if self.stop.is_set():
                    if killed_at is None:
                        killed_at = time.monotonic()
                        self.terminate_all(signal.SIGTERM)
                    elif time.monotonic() - killed_at > self.grace_s:
                        self.terminate_all(signal.SIGKILL)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            with contextlib.suppress(OSError):
                (self.runs_dir / THREADS_DIR).rmdir()  # empty by now (each run removes its file)

    # -- ray backend --
    def run_ray(self, jobs: int | None, num_cpus: float, num_gpus: float, bar: Any) -> None:
        ray = import_ray()
        started_ray = False
        if not ray.is_initialized():
            if os.environ.get("RAY_ADDRESS"):
                ray.init(address="auto")
            else:
                ray.init()
                started_ray = True  # a local Ray instance of this sweep: shut down at the end
        try:
            self._ray_loop(ray, jobs, num_cpus, num_gpus, bar)
        finally:
            if started_ray and hasattr(ray, "shutdown"):
                ray.shutdown()

    def _ray_loop(self, ray: Any, jobs: int | None, num_cpus: float, num_gpus: float, bar: Any) -> None:
        task = ray.remote(run_child).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0)
        queue = list(self.runs)
        inflight: dict[Any, PlannedRun] = {}
        limit = jobs if jobs and jobs > 0 else len(queue)
        cancelled = False
        cancelled_at = 0.0
        forced = False
        while queue or inflight:
            while queue and len(inflight) < limit and not self.stop.is_set():
                run = queue.pop(0)
                rdir = self.prepare(run)
                inflight[task.remote(self.prefix, str(rdir), self.env, f"ray launch {run.name}")] = run
            if self.stop.is_set():
                queue.clear()
                if not cancelled:  # KeyboardInterrupt in each task: run_child stops its child
                    for ref in inflight:
                        ray.cancel(ref, force=False)
                    cancelled, cancelled_at = True, time.monotonic()
                elif not forced and time.monotonic() - cancelled_at > self.grace_s + 5:
                    for ref in inflight:  # kills the worker; its child gets SIGTERM (_die_with_parent)
                        ray.cancel(ref, force=True)
                    forced = True
            if not inflight:
                break
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=0.5)
            for ref in ready:
                run = inflight.pop(ref)
                try:
                    rc = ray.get(ref)
                    result = self.conclude(run, int(rc))
                except Exception as e:  # noqa: BLE001 - task errors / cancellation
                    if self.stop.is_set():
                        result = self.conclude(run, None)
                    else:
                        result = self.conclude(run, None, error=f"ray task failed: {type(e).__name__}: {e}")
                self._record(run, result, bar)

    def _record(self, run: PlannedRun, result: str, bar: Any) -> None:
        self.outcome[run.name] = result
        if result == "failed":
            info = self.state.get(run.name)
            msg = f"FAILED {run.name}: {info.get('reason', '')} (see {run.directory(self.runs_dir) / 'train.log'})"
            bar.write(msg, file=self.out)
        if result in ("finished", "failed"):
            bar.update(1)
        self._postfix(bar)

    def _postfix(self, bar: Any) -> None:
        """Finished and failed counts, and for each running run (local backend) the epochs its log
        says are done: ``done=3, failed=0, running=[4/10 1/10]``."""
        counts = {k: sum(1 for v in self.outcome.values() if v == k) for k in ("finished", "failed")}
        with self.lock:
            running = sorted(self.procs)
        epochs = []
        for name in running:
            k_n = epochs_done(_log_tail(self.by_name[name].directory(self.runs_dir) / "train.log", 200))
            epochs.append(f"{k_n[0]}/{k_n[1]}" if k_n else "0/?")
        extra = {"running": "[" + " ".join(epochs) + "] epochs"} if epochs else {}
        bar.set_postfix(done=counts["finished"], failed=counts["failed"], **extra, refresh=True)


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return "?"


def import_ray() -> Any:
    """Import ray, or raise a MetaXLError saying how to install it.

    >>> import_ray()  # doctest: +SKIP
    <module 'ray' ...>
    """
    try:
        import ray
    except ImportError:
        raise MetaXLError(
            'the Ray backend needs the ray package: pip install "metaxl[ray]" (or use --backend local)'
        ) from None
    return ray


def run_sweep(
    sweep: str | Path | SweepSpec,
    *,
    runs_dir: str | Path | None = None,
    jobs: int | None = None,
    backend: str = "local",
    dry_run: bool = False,
    retry_failed: bool = False,
    only: Sequence[str] = (),
    train_command: Sequence[str] | str | None = None,
    related: RelatedFn | None = None,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    out: TextIO | None = None,
    progress: bool = True,
    grace_s: float = 10.0,
) -> SweepOutcome:
    """Plan and run a sweep; returns counts (``outcome.exit_code``: 0 ok, 1 failures, 130 interrupted).

    Finished runs are skipped, unfinished ones relaunched with ``--resume``, failed ones only with
    ``retry_failed``. ``only`` (``["target=nusax:balinese", "seed=2,3"]``, see :func:`parse_only`)
    restricts everything, the plan included, to the matching runs. SIGINT/SIGTERM stop the sweep: children are terminated, the state is saved.

    >>> outcome = run_sweep("examples/sweeps/ner_masakhaner.yaml", dry_run=True)  # doctest: +SKIP
    >>> outcome.total                                                                # doctest: +SKIP
    120
    """
    out = out if out is not None else sys.stdout
    if backend not in ("local", "ray"):
        raise ConfigError(f"--backend {backend!r} is not valid; choose local or ray")
    if jobs is not None and jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}; use --jobs 1 or more")
    if isinstance(sweep, SweepSpec):
        spec, sweep_name = sweep, sweep.where
    else:
        spec, sweep_name = load_sweep(sweep), str(sweep)
    plan = plan_sweep(spec, sweep_name, runs_dir, only, related, retry_failed)
    prefix = resolve_train_command(train_command)
    plan.classify()
    outcome = SweepOutcome(total=len(plan.runs), finished_before=plan.count("finished"), runs_dir=str(plan.rdir))
    outcome.skipped_failed = 0 if retry_failed else plan.count("failed")
    plan.report(out)
    # Only for `metaxl train` itself (a custom train command may read its data its own way).
    if prefix == list(DEFAULT_TRAIN_COMMAND):
        _check_data(plan.todo, warn_only=dry_run or backend == "ray", out=out)
    if dry_run:
        for r in plan.runs:
            print(f"  {plan.status[r.name]:<10} {r.name}", file=out)
    if dry_run or not plan.todo:
        out.flush()
        return outcome

    if backend == "ray":
        import_ray()  # fail early with the install hint
    plan.rdir.mkdir(parents=True, exist_ok=True)
    with _sweep_lock(plan.rdir):
        state = _State(plan.rdir, sweep_name)
        plan.record(state)
        env, spread_cores, cpus, gpus = _resources(backend, jobs, num_cpus, num_gpus, spec, out)
        runner = _Runner(plan.rdir, plan.todo, state, prefix, env, out, grace_s, spread_cores)
        try:
            _run_until_done_or_stopped(runner, backend, jobs, cpus, gpus, len(plan.todo), progress)
        finally:
            _settle(runner, plan, state, outcome)
    _print_done(outcome, plan.rdir, out)
    return outcome


@dataclass
class SweepPlan:
    """What a sweep invocation will do: the grid's runs, those ``--only`` selects, their status on
    disk (new / unfinished / finished / failed) and the runs to do."""

    name: str
    all_runs: list[PlannedRun]
    runs: list[PlannedRun]
    stats: ExpansionStats
    only: Sequence[str]
    rdir: Path
    retry_failed: bool
    status: dict[str, str] = field(default_factory=dict)
    todo: list[PlannedRun] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for s in self.status.values() if s == status)

    def classify(self) -> None:
        """Each run's status, and the runs to do; refuses to mix a changed config with an existing
        run folder."""
        mismatches = []
        for r in self.runs:
            d = r.directory(self.rdir)
            self.status[r.name] = run_status(d)
            if (d / "config.yaml").exists():
                diffs = _config_differences(d / "config.yaml", r.config)
                if diffs:
                    mismatches.append(f"{d}: {'; '.join(diffs[:4])}")
        if mismatches:
            raise ConfigError(
                f"{len(mismatches)} run folder(s) under {self.rdir} hold a different config than {self.name} now "
                f"gives, e.g. {mismatches[0]}. Use another --runs-dir, or delete those folders to re-run them"
            )
        self.todo = [
            r
            for r in self.runs
            if self.status[r.name] in ("new", "unfinished") or (self.retry_failed and self.status[r.name] == "failed")
        ]
        # Every setting's first seed before any second seed: a sweep stopped early leaves whole tables.
        seed_rank = {s: i for i, s in enumerate(dict.fromkeys(r.config.seed for r in self.runs))}
        self.todo.sort(key=lambda r: seed_rank[r.config.seed])

    def report(self, out: TextIO) -> None:
        """The grid's size and the plan: ``plan: 12 runs, 4 already finished, 0 failed, 8 to run``."""
        stats, n_failed = self.stats, self.count("failed")
        print(
            f"sweep {self.name}: {len(self.all_runs)} runs ({stats.combinations} grid combinations, "
            f"{stats.duplicates} duplicates merged, {stats.excluded} excluded) in {self.rdir}"
            + (f"; --only {' '.join(self.only)}: {len(self.runs)} of {len(self.all_runs)}" if self.only else ""),
            file=out,
        )
        fail_note = "" if self.retry_failed or not n_failed else " (skipped; --retry-failed re-runs them)"
        print(
            f"plan: {len(self.runs)} runs, {self.count('finished')} already finished, {n_failed} failed{fail_note}, "
            f"{len(self.todo)} to run ({self.count('unfinished')} to resume)",
            file=out,
        )

    def record(self, state: _State) -> None:
        """The plan in the sweep's state file; refuses runs that an earlier, killed sweep still runs."""
        for r in self.todo:
            info = state.get(r.name)
            pid = info.get("pid")
            if info.get("status") == "running" and isinstance(pid, int) and _pid_runs(pid, str(r.directory(self.rdir))):
                raise MetaXLError(
                    f"run {r.name} is still running as pid {pid} from an earlier sweep that was killed; "
                    f"wait for it or kill it (kill {pid}) and run the sweep again"
                )
        for r in self.runs:
            if self.status[r.name] == "finished":
                state.update(r.name, status="finished", pid=None)
            elif self.status[r.name] == "failed" and r not in self.todo:
                fm = read_failed_marker(r.directory(self.rdir) / FAILED_MARKER)
                state.update(r.name, status="failed", reason=fm.get("reason", "results.json status 'failed'"))
            elif r in self.todo:
                state.update(r.name, status="pending", pid=None)


def plan_sweep(spec: SweepSpec, name: str, runs_dir: str | Path | None, only: Sequence[str],
               related: RelatedFn | None, retry_failed: bool) -> SweepPlan:
    """The sweep's runs (expanded, then selected by ``only``) and its runs folder, not yet classified."""
    stats = ExpansionStats()
    rule = parse_only(only)
    all_runs = expand_sweep(spec, related=related, stats=stats)
    runs = select_runs(all_runs, rule)
    if runs_dir is None:
        runs_dir = spec.runs_dir or str(Path("runs") / (spec.name or "sweep"))
    return SweepPlan(name, all_runs, runs, stats, only if rule else (), Path(runs_dir).absolute(), retry_failed)


def _check_data(todo: list[PlannedRun], warn_only: bool, out: TextIO) -> None:
    """The data every run to do needs, checked before anything is launched: a data folder missing on
    a machine would otherwise fail every run of the grid, one by one. A dry run and Ray (a cluster's
    workers may hold data the driver does not) only warn."""
    missing = missing_data(todo)
    if not missing:
        return
    bad = {name for name, _, _ in missing}
    n_bad = sum(1 for r in todo if bad & set(_data_specs(r.config)))
    names = ", ".join(f"{name} ({n} run{'s' * (n != 1)})" for name, _, n in missing)
    msg = (
        f"{len(missing)} data set(s) of this sweep are not found here, so {n_bad} of the {len(todo)} runs "
        f"to do would fail: {names}. {missing[0][1]}. To run the others anyway, leave those runs out "
        f"with --only or an exclude rule"
    )
    if warn_only:
        print(f"warning: {msg}", file=out)
    else:
        raise DataError(msg + "; nothing was launched")


def _resources(backend: str, jobs: int | None, num_cpus: float | None, num_gpus: float | None, spec: SweepSpec,
               out: TextIO) -> tuple[dict[str, str], int | None, float, float]:
    """The children's thread environment, the cores to spread them over (local backend, threads
    not set by the user), and Ray's CPUs and GPUs per run."""
    if backend == "ray":
        cpus = float(num_cpus if num_cpus is not None else spec.ray.get("num_cpus", 1))
        gpus = float(num_gpus if num_gpus is not None else spec.ray.get("num_gpus", 0))
        return _thread_env(max(1, int(cpus))), None, cpus, gpus  # Ray places the runs; their threads stay as given
    jobs, cores = jobs or 1, _cores()
    spread_cores = cores if user_threads() is None else None  # the user's threads are left alone
    note = too_many_jobs_note(cores, jobs)
    if note:
        print(note, file=out)
    if user_threads() is None and hasattr(os, "getloadavg"):
        note = busy_cpu_note(os.getloadavg()[0], cores, jobs)
        if note:
            print(note, file=out)
    return _thread_env(cores // jobs), spread_cores, 0.0, 0.0


def _run_until_done_or_stopped(runner: _Runner, backend: str, jobs: int | None, cpus: float, gpus: float,
                               n_todo: int, progress: bool) -> None:
    """Run the runner's runs under a progress bar; SIGINT/SIGTERM stop it (a second one kills the
    runs without grace)."""
    from tqdm.auto import tqdm

    def handler(signum: int, frame: types.FrameType | None) -> None:
        if runner.stop.is_set():  # second signal: no more grace
            runner.terminate_all(signal.SIGKILL)
        runner.signum = signum
        runner.stop.set()

    installed: dict[Any, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            installed[sig] = signal.signal(sig, handler)
    bar = tqdm(total=n_todo, desc="runs", unit="run", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    try:
        if backend == "ray":
            runner.run_ray(jobs, cpus, gpus, bar)
        else:
            runner.run_local(jobs or 1, bar)
    finally:
        bar.close()
        for sig, old in installed.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


def _settle(runner: _Runner, plan: SweepPlan, state: _State, outcome: SweepOutcome) -> None:
    """After the runner (also when it was stopped): the runs not started back to pending, the
    counts in ``outcome`` and the state file."""
    for r in plan.todo:
        if runner.outcome.get(r.name, "not started") == "not started":
            runner.outcome[r.name] = "not started"
            state.update(r.name, status="pending", pid=None)
    res = list(runner.outcome.values())
    outcome.launched = sum(1 for v in res if v != "not started")
    outcome.finished = res.count("finished")
    outcome.failed = res.count("failed")
    outcome.interrupted = res.count("interrupted") + (res.count("not started") if runner.stop.is_set() else 0)
    state.save(
        total=len(plan.runs),
        finished=plan.count("finished") + outcome.finished,
        failed=outcome.failed + outcome.skipped_failed,
        interrupted=outcome.interrupted,
    )


def _print_done(outcome: SweepOutcome, rdir: Path, out: TextIO) -> None:
    msg = (
        f"done: {outcome.finished} finished, {outcome.failed} failed"
        + (f", {outcome.skipped_failed} failed earlier (skipped)" if outcome.skipped_failed else "")
        + (f", {outcome.interrupted} interrupted" if outcome.interrupted else "")
    )
    print(msg, file=out)
    if outcome.failed or outcome.skipped_failed:
        print(f"failures are listed in {rdir / STATE_FILE} and each run's {FAILED_MARKER} file", file=out)
    if outcome.interrupted:
        print("interrupted: run the same command again to resume", file=out)
    out.flush()


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def _cmd_sweep(args: argparse.Namespace) -> int:
    outcome = run_sweep(
        args.config,
        runs_dir=args.runs_dir,
        jobs=args.jobs,
        backend=args.backend,
        dry_run=args.dry_run,
        retry_failed=args.retry_failed,
        only=args.only or (),
        num_cpus=args.ray_num_cpus,
        num_gpus=args.ray_num_gpus,
        progress=not args.no_progress,
    )
    return outcome.exit_code


def register_cli(subparsers: Any) -> None:
    """Add the ``sweep`` subcommand to an argparse subparsers object.

    >>> import argparse
    >>> p = argparse.ArgumentParser(); register_cli(p.add_subparsers())
    >>> p.parse_args(["sweep", "s.yaml", "--jobs", "2"]).jobs
    2
    """
    p = subparsers.add_parser(
        "sweep",
        help="run a grid of training runs (resumable; local processes or Ray)",
        description="Expand a sweep YAML (base:, grid:, exclude:) into runs and train them. Re-running skips "
        "finished runs and resumes unfinished ones. See docs/sweeps.md.",
    )
    p.add_argument("config", help="sweep YAML file")
    p.add_argument(
        "--runs-dir",
        default=None,
        help="folder for the runs (default: runs_dir: in the YAML, else runs/<name>)",
    )
    p.add_argument(
        "--jobs", type=int, default=None, help="parallel runs (local default 1; ray: cap on runs in flight)"
    )
    p.add_argument("--backend", choices=("local", "ray"), default="local")
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan and each run's status; launch nothing"
    )
    p.add_argument("--retry-failed", action="store_true", help="also re-run runs that failed before")
    p.add_argument(
        "--only",
        action="append",
        metavar="KEY=V1,V2",
        help="run (and plan) only the runs matching KEY, one of the comma-separated values; repeat for "
        "several keys, all must match (e.g. --only target=nusax:balinese --only seed=2,3; a+b is one "
        "multi-source or multi-layer value)",
    )
    p.add_argument(
        "--ray-num-cpus", type=float, default=None, help="CPUs per Ray task (default: ray.num_cpus or 1)"
    )
    p.add_argument(
        "--ray-num-gpus", type=float, default=None, help="GPUs per Ray task (default: ray.num_gpus or 0)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_sweep)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m metaxl.sweep ...`` is ``metaxl sweep ...``."""
    from .cli import main as cli_main

    return cli_main(["sweep", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

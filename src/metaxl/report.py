"""Paper-style tables, paired significance tests and bar charts from a folder of runs.

Everything is recomputed from the ``results.json`` files under the runs folder (see
docs/design.md for their schema): rows are settings (``target only``, ``JT (en)``,
``MetaXL (related)``...), columns the target languages and ``avg``, cells mean ± std over seeds.

>>> from metaxl.report import make_report
>>> result = make_report("runs/ner_masakhaner")          # doctest: +SKIP
>>> print(result.markdown_path)                          # doctest: +SKIP
runs/ner_masakhaner/report/report.md
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

from .config import TrainConfig
from .errors import MetaXLError
from .sweep import (
    FAILED_MARKER,
    META_KEYS,
    NON_SEMANTIC_KEYS,
    RTN_KEYS,
    effective_config,
    infer_task,
    key_matters,
    read_failed_marker,
)

__all__ = [
    "RunRecord",
    "Cell",
    "Row",
    "Table",
    "Comparison",
    "ReportResult",
    "collect_runs",
    "cell_stats",
    "paired_stats",
    "build_tables",
    "paired_comparisons",
    "holm",
    "make_report",
    "register_cli",
    "main",
]

METHOD_NAMES = {"target-only": "target only", "jt": "JT", "jt-rtn": "JT+RTN", "metaxl": "MetaXL"}
METHOD_ORDER = {"target-only": 0, "jt": 1, "jt-rtn": 2, "metaxl": 3}
# Keys that never define a setting (run bookkeeping) or are table / row / column keys already.
_NOT_SETTING = {
    "target",
    "source",
    "seed",
    "method",
    "task",
    "sa_labels",
    "source_size",
    "output_dir",
    "data_dir",
    "device",
    "progress",
    "save_checkpoint",
    "save_state",
    "eval_batch_size",
    "gradient_checkpointing",
    "report_to",
}
RelatedFn = Callable[[str], Any]


# ----------------------------------------------------------------------------------------------
# Reading runs
# ----------------------------------------------------------------------------------------------
@dataclass
class RunRecord:
    """One run folder: status 'finished' | 'unfinished' | 'failed' | 'unreadable'."""

    rel: str
    status: str
    results: dict[str, Any] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    reason: str = ""


def _config_of(results: dict[str, Any]) -> dict[str, Any]:
    cfg = results.get("config")
    if not isinstance(cfg, dict):
        cfg = {}
        for key in ("method", "target", "source", "seed", "source_size", "target_size", "rtn_layers", "task"):
            if key in results:
                cfg[key] = results[key]
    cfg = {k: v for k, v in cfg.items() if k in TrainConfig.field_names()}
    if isinstance(cfg.get("source"), str):
        cfg["source"] = [cfg["source"]]
    eff = effective_config(cfg)
    if results.get("task") in ("ner", "sa"):
        eff["task"] = results["task"]
    return eff


def collect_runs(runs_dir: str | Path, skip: Sequence[str | Path] = ()) -> list[RunRecord]:
    """Find run folders (holding results.json, config.yaml or FAILED) under ``runs_dir``.

    >>> [r.status for r in collect_runs("runs/ner_masakhaner")][:2]   # doctest: +SKIP
    ['finished', 'failed']
    """
    root = Path(runs_dir)
    if not root.is_dir():
        raise MetaXLError(
            f"runs folder not found: {root}; give the --runs-dir of a sweep or a folder of runs"
        )
    skip_abs = {Path(s).resolve() for s in skip}
    records: list[RunRecord] = []
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirnames[:] = sorted(
            n for n in dirnames if not n.startswith(".") and (d / n).resolve() not in skip_abs
        )
        names = set(filenames)
        if not names & {"results.json", "config.yaml", FAILED_MARKER}:
            continue
        dirnames[:] = []  # a run folder: do not descend into checkpoint/ etc.
        rel = d.relative_to(root).as_posix()
        results: dict[str, Any] | None = None
        if "results.json" in names:
            try:
                loaded = json.loads((d / "results.json").read_text())
            except (OSError, ValueError) as e:
                records.append(RunRecord(rel, "unreadable", reason=f"results.json: {e}"))
                continue
            if not isinstance(loaded, dict):
                records.append(RunRecord(rel, "unreadable", reason="results.json is not a JSON object"))
                continue
            results = loaded
        status = results.get("status") if results else None
        if results is not None and status == "finished":
            records.append(RunRecord(rel, "finished", results, _config_of(results)))
        elif FAILED_MARKER in names or status == "failed":
            info = read_failed_marker(d / FAILED_MARKER) if FAILED_MARKER in names else {}
            reason = info.get("reason") or str((results or {}).get("error") or "results.json status 'failed'")
            if info.get("exit_code") not in (None, "None"):
                reason = f"exit code {info['exit_code']}: {reason}"
            records.append(RunRecord(rel, "failed", results, _config_of(results) if results else {}, reason))
        else:
            why = f"status {status!r}" if results else "no results.json yet"
            records.append(RunRecord(rel, "unfinished", results, _config_of(results) if results else {}, why))
    records.sort(key=lambda r: r.rel)
    return records


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------
@dataclass
class Cell:
    """mean ± std (ddof=1; NaN when n < 2) of one setting on one target over seeds."""

    mean: float
    std: float
    n: int
    values: list[float] = field(default_factory=list)
    partial: bool = False
    """For 'avg': some of the table's targets are missing from this row."""
    seed_counts: tuple[int, int] | None = None
    """For 'avg': the fewest and most seeds of the targets it averages (``n`` counts the seeds run on
    every one of them, the ones its ± is over)."""

    @property
    def seed_range(self) -> tuple[int, int]:
        """The fewest and most seeds behind the cell: ``seed_counts`` for an 'avg', else ``(n, n)``."""
        return self.seed_counts or (self.n, self.n)


def cell_stats(values: Sequence[float]) -> Cell:
    """Mean and sample standard deviation.

    >>> c = cell_stats([50.0, 52.0, 54.0])
    >>> (c.mean, c.std, c.n)
    (52.0, 2.0, 3)
    """
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        return Cell(math.nan, math.nan, 0, [])
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n >= 2 else math.nan
    return Cell(mean, std, n, vals)


@dataclass
class PairedStats:
    n: int
    mean: float
    ci_low: float
    ci_high: float
    wins: int
    losses: int
    ties: int
    t_p: float
    wilcoxon_p: float


def paired_stats(a: Sequence[float], b: Sequence[float]) -> PairedStats:
    """Paired comparison of ``a - b``: mean, 95% t interval, wins/losses/ties, t-test and Wilcoxon p.

    >>> s = paired_stats([62.0, 60.0, 65.0], [60.0, 59.0, 61.0])
    >>> (s.n, s.mean, s.wins, s.losses)
    (3, 2.3333333333333335, 3, 0)
    """
    from scipy import stats

    if len(a) != len(b):
        raise ValueError("paired samples must have the same length")
    d = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    n = len(d)
    mean = sum(d) / n if n else math.nan
    wins = sum(1 for x in d if x > 0)
    losses = sum(1 for x in d if x < 0)
    ties = n - wins - losses
    lo = hi = t_p = w_p = math.nan
    if n >= 2:
        sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
        half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
        lo, hi = mean - half, mean + half
        if sd > 0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t_p = float(stats.ttest_rel(list(map(float, a)), list(map(float, b))).pvalue)
    if any(x != 0 for x in d):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                w_p = float(stats.wilcoxon(d).pvalue)
            except ValueError:
                w_p = math.nan
    return PairedStats(n, mean, lo, hi, wins, losses, ties, t_p, w_p)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the given order (NaN stays NaN and is not counted).

    A family of m tests: the i-th smallest p is multiplied by m - i + 1, then made non-decreasing
    and capped at 1. Reject at level a where the adjusted p is <= a (family-wise error <= a).

    >>> holm([0.01, 0.04, 0.03])
    [0.03, 0.06, 0.06]
    >>> holm([0.2, float("nan")])
    [0.2, nan]
    """
    real = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(real):
        running = max(running, min(1.0, (len(real) - rank) * p))
        out[i] = running
    return out


# ----------------------------------------------------------------------------------------------
# Settings, tables, comparisons
# ----------------------------------------------------------------------------------------------
@dataclass
class _Entry:
    rel: str
    task: str
    variant: str
    source_size: int | None
    method: str
    kind: str
    extras: tuple[tuple[str, Any], ...]
    target: str
    seed: int
    value: float
    shared: str  # pairing key: config without method-specific keys
    hidden: tuple[tuple[str, Any], ...] = ()
    """Varying settings left out of the label: the most common value among the method's runs."""


@dataclass
class Row:
    label: str
    method: str
    kind: str
    cells: dict[str, Cell]
    avg: Cell
    avg_shared: Cell | None = None
    """Mean over the targets that every row of the table has (when some row lacks one)."""
    seeds: dict[str, list[int]] = field(default_factory=dict)
    """Per target, the seeds of its finished runs."""


@dataclass
class Table:
    """One paper-style table: rows = settings, columns = targets + avg."""

    title: str
    slug: str
    task: str
    variant: str
    source_size: int | None
    targets: list[str]
    """Target specs, in column order."""
    columns: list[str]
    """Column labels (short target names)."""
    rows: list[Row]
    shared: list[str] = field(default_factory=list)
    """Targets present in every row, when that is fewer than all: the `avg` column over them."""
    common: list[str] = field(default_factory=list)
    """Per method, the settings its row labels leave out (the most common value of each)."""

    @property
    def uniform_n(self) -> bool:
        ns = {c.n for r in self.rows for c in r.cells.values()}
        return len(ns) <= 1


@dataclass
class Comparison:
    """MetaXL vs JT over (target, seed) pairs of one table and source kind."""

    table: str
    kind: str
    treatment: str
    control: str
    stats: PairedStats
    pairs: list[tuple[str, int, float, float]]  # (target, seed, metaxl, jt)

    def by_target(self) -> PairedStats:
        """The same comparison with each target's seeds averaged first: n = targets.

        Two seeds of one target share its data and are not independent draws; tested over
        targets, a difference has to hold across languages, not only across a few languages'
        seeds.

        >>> c = Comparison("t", "en", "MetaXL", "JT", paired_stats([1.0], [0.0]),
        ...                [("luo", 1, 60.0, 62.0), ("luo", 2, 58.0, 60.0), ("wol", 1, 50.0, 51.0)])
        >>> s = c.by_target()
        >>> (s.n, s.mean, s.wins, s.losses)
        (2, -1.5, 0, 2)
        """
        per: dict[str, list[tuple[float, float]]] = {}
        for target, _, x, y in self.pairs:
            per.setdefault(target, []).append((x, y))
        a = [sum(x for x, _ in v) / len(v) for v in per.values()]
        b = [sum(y for _, y in v) / len(v) for v in per.values()]
        return paired_stats(a, b)


def _fmt_value(key: str, value: Any) -> str:
    if key == "rtn_layers" and isinstance(value, list):
        return "L" + "+".join(str(v) for v in value)
    if key == "hypergrad":
        return "FD" if value == "finite-difference" else "exact"
    if isinstance(value, float):
        return f"{key}={value:g}"
    return f"{key}={value}"


def _short(spec: str) -> str:
    spec = str(spec)
    if "/" in spec or "\\" in spec:
        return Path(spec.rstrip("/\\")).name or spec
    return spec.rsplit(":", 1)[-1]


def _default_related() -> RelatedFn | None:
    try:
        from .data import related_source
    except ImportError:
        return None
    return related_source


def _default_canonical() -> Callable[[str], str]:
    """Spec normaliser of metaxl.data (nusax-senti:ban == nusax:balinese) when available."""
    try:
        from . import data
    except ImportError:
        return lambda s: s.strip().lower()
    fn = getattr(data, "canonical_spec", None) or getattr(data, "_canonical", None)
    if not callable(fn):
        return lambda s: s.strip().lower()

    def canon(spec: str) -> str:
        try:
            return str(fn(spec))
        except Exception:  # noqa: BLE001 - paths and unknown specs compare as written
            return spec.strip().lower()

    return canon


def _kinds_fn(related: RelatedFn | None) -> Callable[[str, list[str]], tuple[str, str, bool]]:
    cache: dict[str, str | None] = {}
    canon = _default_canonical()

    def rel_of(target: str) -> str | None:
        if target not in cache:
            got: Any = None
            if related is not None:
                try:
                    got = related(target)
                except Exception:  # noqa: BLE001 - no related language known: just not 'related'
                    got = None
            cache[target] = str(got[0] if isinstance(got, tuple) else got) if got else None
        return cache[target]

    def kinds(target: str, sources: list[str]) -> tuple[str, str, bool]:
        literal = "+".join(_short(s) for s in sources) or "none"
        r = rel_of(target) if sources else None
        marked = "+".join("related" if r and canon(s) == canon(r) else _short(s) for s in sources) or "none"
        return literal, marked, marked != literal

    return kinds


def _entries(
    records: list[RunRecord], metric: str, split: str, related: RelatedFn | None
) -> tuple[list[_Entry], list[str]]:
    kinds = _kinds_fn(related)
    base: list[tuple[RunRecord, dict[str, Any], float, str, str, bool]] = []
    missing: list[str] = []
    for rec in records:
        if rec.status != "finished" or rec.results is None:
            continue
        block = rec.results.get(split)
        value = block.get(metric) if isinstance(block, dict) else None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(float(value)):
            missing.append(rec.rel)
            continue
        cfg = rec.config
        literal, marked, is_rel = kinds(str(cfg["target"]), list(cfg.get("source") or []))
        base.append((rec, cfg, float(value), literal, marked, is_rel))

    def group(cfg: dict[str, Any]) -> tuple[str, str]:
        task = cfg.get("task") if cfg.get("task") in ("ner", "sa") else None
        if task is None:
            task = infer_task(TrainConfig(target=str(cfg["target"]), task="auto"))
        return task, (str(cfg.get("sa_labels")) if task == "sa" else "")

    # Which keys vary within a (task, variant), among runs where the key matters.
    seen: dict[tuple[str, str], dict[str, set[str]]] = {}
    for _, cfg, *_rest in base:
        values_by_key = seen.setdefault(group(cfg), {})
        for key, val in cfg.items():
            if key in _NOT_SETTING or not key_matters(key, str(cfg["method"])):
                continue
            values_by_key.setdefault(key, set()).add(json.dumps(val, sort_keys=True, default=str))
    varying = {g: [k for k in TrainConfig.field_names() if len(v.get(k, ())) > 1] for g, v in seen.items()}
    # Literal source labels used as non-related sources (e.g. 'en'): related runs whose source is one
    # of them also appear in that row (a target whose related language is English).
    fixed = {(group(cfg), lit) for _, cfg, _, lit, _, is_rel in base if not is_rel}

    entries: list[_Entry] = []
    for rec, cfg, value, literal, marked, is_rel in base:
        g = group(cfg)
        method = str(cfg["method"])
        extras = tuple((k, cfg[k]) for k in varying.get(g, []) if key_matters(k, method))
        drop = {
            "method",
            "seed",
            "target",
            *RTN_KEYS,
            *META_KEYS,
            "output_dir",
            "progress",
            "device",
            "data_dir",
            *NON_SEMANTIC_KEYS,  # e.g. save_state: how a run was kept, not what it computed
        }
        shared = json.dumps({k: v for k, v in cfg.items() if k not in drop}, sort_keys=True, default=str)
        kind_list = [marked] if method != "target-only" else ["none"]
        if method != "target-only" and is_rel and (g, literal) in fixed:
            kind_list.append(literal)
        for kind in kind_list:
            entries.append(
                _Entry(
                    rec.rel,
                    g[0],
                    g[1],
                    cfg.get("source_size") if method != "target-only" else None,
                    method,
                    kind,
                    extras,
                    str(cfg["target"]),
                    int(cfg.get("seed", 0)),
                    value,
                    shared,
                )
            )
    return _hide_common_settings(entries), missing


def _hide_common_settings(entries: list[_Entry]) -> list[_Entry]:
    """Label rows by what differs: a varying setting whose value is more common than any other among
    the runs of the same method, task and variant (the reference of a one-factor-at-a-time
    ablation) moves from ``extras`` (the label) to ``hidden``; on a tie (a grid) it stays.
    Rows stay distinct: two settings that differ in a key cannot both hold its most common value.

    >>> e = [_Entry("r", "sa", "binary", 200, "metaxl", "en", (("meta_lr", v),), "t", s, 1.0, "")
    ...      for v, s in ((1e-4, 1), (1e-4, 2), (1e-3, 1))]
    >>> [(x.extras, x.hidden) for x in _hide_common_settings(e)][1:]
    [((), (('meta_lr', 0.0001),)), ((('meta_lr', 0.001),), ())]
    """
    counts: dict[tuple[str, str, str, str], dict[str, int]] = {}
    for e in entries:
        for k, v in e.extras:
            by_value = counts.setdefault((e.task, e.variant, e.method, k), {})
            key = json.dumps(v, sort_keys=True, default=str)
            by_value[key] = by_value.get(key, 0) + 1
    modal: dict[tuple[str, str, str, str], str | None] = {}
    for g, c in counts.items():  # a value more common than every other; on a tie (a grid), none
        ranked = sorted(c.values(), reverse=True)
        modal[g] = max(c, key=lambda v: c[v]) if len(ranked) == 1 or ranked[0] > ranked[1] else None
    out = []
    for e in entries:
        shown: list[tuple[str, Any]] = []
        hidden: list[tuple[str, Any]] = []
        for k, v in e.extras:
            common = modal[(e.task, e.variant, e.method, k)] == json.dumps(v, sort_keys=True, default=str)
            (hidden if common else shown).append((k, v))
        out.append(dataclasses.replace(e, extras=tuple(shown), hidden=tuple(hidden)))
    return out


def _label(e: _Entry) -> str:
    name = METHOD_NAMES.get(e.method, e.method)
    parts = [] if e.method == "target-only" else [e.kind]
    parts += [_fmt_value(k, v) for k, v in e.extras]
    return f"{name} ({'; '.join(parts)})" if parts else name


def _row_key(e: _Entry) -> tuple[Any, ...]:
    return (
        e.method != "target-only",
        "related" in e.kind,
        e.kind,
        METHOD_ORDER.get(e.method, 9),
        e.method,
        tuple((k, _sort_value(v)) for k, v in e.extras),
    )


def _sort_value(v: Any) -> tuple[Any, ...]:
    """Natural order for setting values: numbers, then layer lists by length (L0, L12, L0+12), then text."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, float(v))
    if isinstance(v, list) and all(isinstance(x, (int, float)) for x in v):
        return (1, len(v), tuple(float(x) for x in v))
    return (2, str(v))


def _table_title(task: str, variant: str, size: int | None, only_target: bool) -> tuple[str, str]:
    name = task.upper() if task in ("ner", "sa") else task
    if variant:
        name += f" ({variant} labels)"
    size_txt = "no source data" if only_target else f"source size {'all' if size is None else size}"
    slug = (
        task
        + (f"-{variant}" if variant else "")
        + ("" if only_target else f"_n{'all' if size is None else size}")
    )
    return f"{name}, {size_txt}", re.sub(r"[^A-Za-z0-9_.-]+", "-", slug)


def build_tables(entries: list[_Entry]) -> tuple[list[Table], list[str]]:
    """Group entries into tables (one per task / label scheme / source size); returns duplicates too."""
    groups: dict[tuple[str, str], dict[int | None, list[_Entry]]] = {}
    for e in entries:
        g = groups.setdefault((e.task, e.variant), {})
        if e.method != "target-only":
            g.setdefault(e.source_size, []).append(e)
    tables: list[Table] = []
    duplicates: list[str] = []
    for (task, variant), by_size in sorted(groups.items()):
        target_only = [
            e for e in entries if (e.task, e.variant) == (task, variant) and e.method == "target-only"
        ]
        sizes: list[int | None] = sorted(by_size, key=lambda s: (s is None, s or 0)) or [None]
        for size in sizes:
            members = target_only + by_size.get(size, [])
            title, slug = _table_title(task, variant, size, only_target=not by_size)
            targets = sorted({e.target for e in members}, key=lambda t: (_short(t), t))
            shorts = [_short(t) for t in targets]
            columns = shorts if len(set(shorts)) == len(shorts) else targets
            rows_by_label: dict[str, dict[str, dict[int, _Entry]]] = {}
            first: dict[str, _Entry] = {}
            for e in sorted(members, key=lambda e: e.rel):
                label = _label(e)
                first.setdefault(label, e)
                by_seed = rows_by_label.setdefault(label, {}).setdefault(e.target, {})
                if e.seed in by_seed:
                    duplicates.append(f"{e.rel} (same setting, target and seed as {by_seed[e.seed].rel})")
                    continue
                by_seed[e.seed] = e
            rows = []
            for label in sorted(rows_by_label, key=lambda lb: _row_key(first[lb])):
                per_target = rows_by_label[label]
                cells = {
                    t: cell_stats([x.value for _, x in sorted(per_target[t].items())]) for t in per_target
                }
                present = [t for t in targets if t in per_target]
                avg = _average(per_target, cells, present)
                avg.partial = len(present) < len(targets)
                e0 = first[label]
                seeds = {t: sorted(per_target[t]) for t in per_target}
                rows.append(Row(label, e0.method, e0.kind, cells, avg, seeds=seeds))
            shared = [t for t in targets if all(t in rows_by_label[lb] for lb in rows_by_label)]
            if shared and len(shared) < len(targets):
                for row in rows:
                    row.avg_shared = _average(rows_by_label[row.label], row.cells, shared)
            else:
                shared = []
            common = []
            for method in sorted({e.method for e in members}, key=lambda m: METHOD_ORDER.get(m, 9)):
                by_key = {k: v for e in members if e.method == method for k, v in e.hidden}  # one modal value per key
                hidden = sorted(by_key.items(), key=lambda kv: TrainConfig.field_names().index(kv[0]))
                if hidden and any(e.extras for e in members if e.method == method):
                    common.append(f"{METHOD_NAMES.get(method, method)}: " + "; ".join(_fmt_value(k, v) for k, v in hidden))
            tables.append(Table(title, slug, task, variant, size, targets, columns, rows, shared, common))
    return tables, duplicates


def _average(per_target: dict[str, dict[int, _Entry]], cells: dict[str, Cell], targets: list[str]) -> Cell:
    """A row's average over ``targets``: the mean of their cell means, ± the std over seeds of the
    per-seed average (seeds run on every one of them)."""
    common = set.intersection(*(set(per_target[t]) for t in targets)) if targets else set()
    avg = cell_stats([sum(per_target[t][s].value for t in targets) / len(targets) for s in sorted(common)])
    avg.mean = sum(cells[t].mean for t in targets) / len(targets) if targets else math.nan
    if targets:
        counts = [cells[t].n for t in targets]
        avg.seed_counts = (min(counts), max(counts))
    return avg


def paired_comparisons(entries: list[_Entry], tables: list[Table]) -> list[Comparison]:
    """MetaXL − JT over runs paired on (task, target, source, source_size, seed and shared settings)."""
    out: list[Comparison] = []
    for table in tables:
        members = [
            e
            for e in entries
            if (e.task, e.variant, e.source_size) == (table.task, table.variant, table.source_size)
            and e.method in ("jt", "metaxl")
        ]
        jt: dict[tuple[str, str, int, str], _Entry] = {}
        for e in sorted(members, key=lambda e: e.rel):
            if e.method == "jt":
                jt.setdefault((e.kind, e.target, e.seed, e.shared), e)
        groups: dict[tuple[str, str, str], dict[tuple[str, int], tuple[float, float]]] = {}
        order: dict[tuple[str, str, str], tuple[Any, ...]] = {}
        for e in sorted(members, key=lambda e: e.rel):
            if e.method != "metaxl":
                continue
            j = jt.get((e.kind, e.target, e.seed, e.shared))
            if j is None:
                continue
            key = (e.kind, _label(e), _label(j))
            order[key] = _row_key(e)
            groups.setdefault(key, {}).setdefault((e.target, e.seed), (e.value, j.value))
        for key in sorted(groups, key=lambda k: order[k]):
            pairs = sorted(groups[key].items())
            a = [p[1][0] for p in pairs]
            b = [p[1][1] for p in pairs]
            out.append(
                Comparison(
                    table.title,
                    key[0],
                    key[1],
                    key[2],
                    paired_stats(a, b),
                    [(t, s, x, y) for (t, s), (x, y) in pairs],
                )
            )
    return out


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def _num(x: float, digits: int = 2) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def _p(x: float) -> str:
    if math.isnan(x):
        return "–"
    return "<0.001" if x < 0.001 else f"{x:.3f}"


def _cell_text(c: Cell | None, show_n: bool) -> str:
    if c is None or c.n == 0 and math.isnan(c.mean):
        return "–"
    text = _num(c.mean) if math.isnan(c.std) else f"{_num(c.mean)} ± {_num(c.std)}"
    if c.partial:
        text += " †"
    if show_n:
        lo, hi = c.seed_range
        text += f" (n={lo})" if lo == hi else f" (n={lo}–{hi})"
    return text


def table_markdown(table: Table) -> str:
    """Markdown for one table (header, separator, one line per setting).

    >>> t = Table("NER", "ner", "ner", "", 1000, ["x:luo"], ["luo"],
    ...           [Row("JT (en)", "jt", "en", {"x:luo": cell_stats([60.0])}, cell_stats([60.0]))])
    >>> print(table_markdown(t))
    | setting | luo | avg |
    |---|---:|---:|
    | JT (en) | 60.00 | 60.00 |
    """
    show_n = not table.uniform_n
    extra = [f"avg of the {len(table.shared)} shared"] if table.shared else []
    lines = [
        "| setting | " + " | ".join([*table.columns, "avg", *extra]) + " |",
        "|---|" + "---:|" * (len(table.columns) + 1 + len(extra)),
    ]
    for row in table.rows:
        cells = [_cell_text(row.cells.get(t), show_n) for t in table.targets] + [_cell_text(row.avg, show_n)]
        if table.shared:
            cells.append(_cell_text(row.avg_shared, show_n))
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def coverage_markdown(tables: Sequence[Table], names: dict[str, str] | None = None) -> str:
    """Markdown table of how many targets each setting has finished, per seed: a partial sweep's
    progress at a glance (``names`` shortens table titles).

    >>> rows = [Row("JT (en)", "jt", "en", {}, cell_stats([]), seeds={"x:luo": [1, 2], "x:bam": [1]})]
    >>> print(coverage_markdown([Table("NER", "ner", "ner", "", 200, ["x:bam", "x:luo"], ["bam", "luo"], rows)]))
    | table | setting | seed 1 | seed 2 |
    |---|---|---:|---:|
    | NER | JT (en) | 2/2 | 1/2 |
    """
    seeds = sorted({s for t in tables for r in t.rows for ss in r.seeds.values() for s in ss})
    lines = [
        "| table | setting | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|---|" + "---:|" * len(seeds),
    ]
    for t in tables:
        for r in t.rows:
            counts = [sum(s in ss for ss in r.seeds.values()) for s in seeds]
            cells = [f"{c}/{len(t.targets)}" if c else "–" for c in counts]
            lines.append(f"| {(names or {}).get(t.title, t.title)} | {r.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _paired_row(c: Comparison, s: PairedStats, adj: float) -> str:
    """A Markdown row of the paired tables: ``s`` is ``c.stats`` or ``c.by_target()``, ``adj`` its Holm p."""
    return (
        f"| {c.table} | {c.kind} | {c.treatment} − {c.control} | {s.n} | {_num(s.mean)} | "
        f"[{_num(s.ci_low)}, {_num(s.ci_high)}] | {s.wins}/{s.losses}/{s.ties} | {_p(s.t_p)} | "
        f"{_p(s.wilcoxon_p)} | {_p(adj)} |"
    )


def _csv_num(x: float) -> str:
    return "" if x is None or math.isnan(x) else repr(float(x))


def write_table_csv(table: Table, path: Path) -> None:
    """CSV with columns setting, <target> mean/std/n..., then for ``avg`` (and ``avg shared``) mean,
    std, n (the seeds run on every target it averages, the ones its std is over), seeds min and
    seeds max (the fewest and most seeds of those targets: its mean is over each target's mean)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        header = ["setting"]
        for col in table.columns:
            header += [f"{col} mean", f"{col} std", f"{col} n"]
        for col in ["avg", *(["avg shared"] if table.shared else [])]:
            header += [f"{col} mean", f"{col} std", f"{col} n", f"{col} seeds min", f"{col} seeds max"]
        w.writerow(header)
        for row in table.rows:
            line = [row.label]
            for t in table.targets:
                c = row.cells.get(t)
                line += [_csv_num(c.mean), _csv_num(c.std), str(c.n)] if c else ["", "", "0"]
            for a in [row.avg, *([row.avg_shared] if table.shared else [])]:
                if a is None:
                    line += ["", "", "0", "0", "0"]
                    continue
                line += [_csv_num(a.mean), _csv_num(a.std), str(a.n), *map(str, a.seed_range)]
            w.writerow(line)


def bar_axis_limits(lo: float, hi: float) -> tuple[float, float]:
    """The bar chart's y range for bars (with their error bars) from ``lo`` to ``hi``: from a multiple
    of 10 at least 2 below ``lo`` (0 when the bars span 40 points or more, or reach below 10), with
    room on top for the value labels.

    >>> bar_axis_limits(76.6, 90.1)   # scores close together: the axis starts at 70
    (70.0, 92.51)
    >>> bar_axis_limits(5.8, 73.0)    # a wide span: the axis starts at 0
    (0.0, 81.76)
    >>> bar_axis_limits(0.0, 0.0)     # nothing learnt anywhere
    (0.0, 1.0)
    """
    if lo < 0 or hi - lo >= 40:
        bottom = min(0.0, lo)
    else:
        bottom = max(0.0, float(math.floor((lo - 2) / 10) * 10))
    return bottom, round(hi + 0.12 * (hi - bottom), 2) if hi > bottom else bottom + 1.0


def plot_table(table: Table, path: Path, ylabel: str) -> None:
    """Write :func:`bar_figure` of ``table`` as a PNG at ``path``."""
    bar_figure(table, ylabel).savefig(path, dpi=110, bbox_inches="tight")


def bar_figure(table: Table, ylabel: str) -> Figure:
    """Grouped bar chart: targets (+ avg) on x, one bar per setting, its value
    on top, error bars = std over seeds (only where a cell has 2 or more), the legend right of the
    axes. The y axis starts at a multiple of 10 below the lowest bar (0 when the bars span 40 points
    or more), so differences of a point or two stay visible."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # the average bar compares rows only over the same targets: the shared ones when a row lacks some
    cols = [*table.targets, "avg"]
    names = [*table.columns, f"avg ({len(table.shared)} shared)" if table.shared else "avg"]
    nrows = max(1, len(table.rows))
    fig = Figure(figsize=(max(6.0, 0.35 * len(cols) * nrows + 2), 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    width = 0.8 / nrows
    from matplotlib import colormaps

    palette = colormaps["tab10" if nrows <= 10 else "tab20"]  # one colour per row, also past ten rows
    bars: list[tuple[float, float, float]] = []  # x, mean, std (NaN: one seed)
    for i, row in enumerate(table.rows):
        xs, ys = [], []
        for j, col in enumerate(cols):
            c = (row.avg_shared if table.shared else row.avg) if col == "avg" else row.cells.get(col)
            if c is None or math.isnan(c.mean):
                continue
            xs.append(j - 0.4 + width * (i + 0.5))
            ys.append(c.mean)
            bars.append((xs[-1], c.mean, c.std))
        ax.bar(xs, ys, width=width * 0.95, label=row.label, color=palette(i % palette.N))
    spread = [(x, m, s) for x, m, s in bars if not math.isnan(s)]
    if spread:
        ax.errorbar([b[0] for b in spread], [b[1] for b in spread], yerr=[b[2] for b in spread],
                    fmt="none", ecolor="black", elinewidth=1, capsize=2)
    if bars:
        lows = [m - (0 if math.isnan(s) else s) for _, m, s in bars]
        highs = [m + (0 if math.isnan(s) else s) for _, m, s in bars]
        bottom, top = bar_axis_limits(min(lows), max(highs))
        ax.set_ylim(bottom, top)
        if len(bars) <= 60:
            for (x, m, _), h in zip(bars, highs, strict=True):
                ax.text(x, h + 0.01 * (top - bottom), f"{m:.1f}", ha="center", va="bottom", fontsize=6.5,
                        rotation=90)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(names, rotation=30 if len(cols) > 8 else 0)
    ax.set_ylabel(ylabel)
    ax.set_title(table.title)
    ax.grid(axis="y", alpha=0.3)
    # beside the axes, not under them: below, it ran into the rotated target names
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 if nrows <= 12 else 2,
              frameon=False)
    return fig


def paired_figure(comparisons: Sequence[Comparison], holm_p: Sequence[float] | None = None) -> Figure:
    """Paired differences MetaXL − JT, one line per comparison: every (target, seed) pair as a dot
    (its target's colour, the same across lines), the mean as a black diamond with its 95% CI, a
    line at 0. The y labels give the table, the source kind, n, wins/losses and the t-test p (and
    Holm p). A look shows what the paired table's mean hides: whether one target drives it.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    comps = list(comparisons)
    adj = list(holm_p) if holm_p is not None else [math.nan] * len(comps)
    targets = sorted({t for c in comps for t, _, _, _ in c.pairs})
    palette = colormaps["tab10" if len(targets) <= 10 else "tab20"]
    colour = {t: palette(i % palette.N) for i, t in enumerate(targets)}
    one_table = len({c.table for c in comps}) == 1
    # x range: the dots, the means and the intervals of 3 or more pairs (a 2-pair t interval is
    # wide enough to flatten everything else; it is drawn cut, with an arrow at the cut end)
    xs = [m - j for c in comps for _, _, m, j in c.pairs] + [c.stats.mean for c in comps]
    xs += [v for c in comps if c.stats.n >= 3 for v in (c.stats.ci_low, c.stats.ci_high)]
    xs = [v for v in xs if not math.isnan(v)] + [0.0]
    pad = 0.08 * ((max(xs) - min(xs)) or 1.0)
    lo, hi = min(xs) - pad, max(xs) + pad
    fig = Figure(figsize=(9.0, 1.2 + (0.75 if one_table else 0.9) * max(1, len(comps))))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    labels = []
    for y, (c, hp) in enumerate(zip(comps, adj, strict=True)):
        ypos = len(comps) - 1 - y  # the first comparison on top, as in the table
        # one dot per pair, spread a little up and down (deterministic) so that close ones stay visible
        ax.scatter([m - j for _, _, m, j in c.pairs],
                   [ypos + 0.12 + ((k % 5) - 2) * 0.06 for k in range(len(c.pairs))],
                   s=18, color=[colour[t] for t, _, _, _ in c.pairs], alpha=0.85, zorder=3)
        st = c.stats
        if not math.isnan(st.ci_low):
            ax.plot([max(st.ci_low, lo), min(st.ci_high, hi)], [ypos - 0.18] * 2, color="black",
                    linewidth=1.5, zorder=2)
            cut = [(lo, "<")] * (st.ci_low < lo) + [(hi, ">")] * (st.ci_high > hi)  # arrows at cut ends
            for edge, mark in cut:
                ax.scatter([edge], [ypos - 0.18], marker=mark, s=30, color="black", zorder=4, clip_on=False)
        ax.scatter([st.mean], [ypos - 0.18], marker="D", s=36, color="black", zorder=4)
        p_text = f"p {_p(st.t_p)}" + (f", Holm {_p(hp)}" if not math.isnan(hp) else "")
        head = f"{c.treatment} − {c.control}" if one_table else f"{c.table}\n{c.treatment} − {c.control}"
        labels.append(f"{head}\nn={st.n}, {st.wins}/{st.losses} W/L, {p_text}")
    ax.set_xlim(lo, hi)
    ax.axvline(0.0, color="grey", linewidth=1, linestyle="--", zorder=1)
    ax.set_yticks(range(len(comps)))
    ax.set_yticklabels(list(reversed(labels)), fontsize=7.5)
    ax.set_ylim(-0.7, len(comps) - 0.3)
    ax.set_xlabel("MetaXL − JT (points); diamond: mean with 95% CI; dots: (target, seed) pairs")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Paired differences MetaXL − JT" + (f": {comps[0].table}" if comps and one_table else ""))
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", linestyle="", markersize=5, color=colour[t], label=_short(t))
               for t in targets]
    if handles:
        ax.legend(handles=handles, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  frameon=False, title="target", title_fontsize="small")
    return fig


@dataclass
class ReportResult:
    """What :func:`make_report` wrote and computed."""

    out_dir: Path
    markdown_path: Path
    tables: list[Table]
    comparisons: list[Comparison]
    records: list[RunRecord]
    files: list[Path]
    counts: dict[str, int]


def make_report(
    runs_dir: str | Path,
    out: str | Path | None = None,
    *,
    metric: str = "f1",
    split: str = "test",
    related: RelatedFn | None = None,
    plots: bool = True,
) -> ReportResult:
    """Read every results.json under ``runs_dir`` and write report.md, CSVs and PNGs to ``out``.

    ``related(target) -> (source_spec, reason)`` marks sources that are the target's related
    language (default: :func:`metaxl.data.related_source` when importable).

    >>> res = make_report("runs/ner_masakhaner", metric="f1", split="test")  # doctest: +SKIP
    >>> [t.title for t in res.tables]                                         # doctest: +SKIP
    ['NER, source size 1000']
    """
    runs_dir = Path(runs_dir)
    out_dir = Path(out) if out is not None else runs_dir / "report"
    records, entries, missing = _read_runs(runs_dir, out_dir, metric, split, related)
    tables, duplicates = build_tables(entries)
    comparisons = paired_comparisons(entries, tables)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = _counts(records, duplicates, missing)
    files: list[Path] = []
    md = _summary_markdown(runs_dir, counts, missing, duplicates, metric, split)
    md += _tables_markdown(tables, out_dir, files, metric, split, plots)
    md += _paired_markdown(comparisons, out_dir, files, plots)
    md += rtn_markdown(entries, records)
    md += _runs_markdown(tables, records)
    files.append(_write_runs_csv(out_dir / "runs.csv", records, entries, metric, split))
    md_path = out_dir / "report.md"
    md_path.write_text("\n".join(md))
    files.insert(0, md_path)
    return ReportResult(out_dir, md_path, tables, comparisons, records, files, counts)


def _read_runs(
    runs_dir: Path, out_dir: Path, metric: str, split: str, related: RelatedFn | None
) -> tuple[list[RunRecord], list[_Entry], list[str]]:
    """The run records under ``runs_dir`` (``out_dir`` skipped), the entries that have
    ``split.metric`` and the runs that miss it; a one-line error where there is nothing to report."""
    if split not in ("dev", "test"):
        raise MetaXLError(f"--split {split!r} is not valid; choose dev or test")
    records = collect_runs(runs_dir, skip=[out_dir])
    if not records:
        raise MetaXLError(
            f"no runs under {runs_dir} (no results.json, config.yaml or FAILED found); "
            "give the --runs-dir of a sweep"
        )
    if related is None:
        related = _default_related()
    entries, missing = _entries(records, metric, split, related)
    finished = [r for r in records if r.status == "finished"]
    if finished and not entries:
        avail = sorted(
            {k for r in finished for k in ((r.results or {}).get(split) or {}) if isinstance(k, str)}
        )
        raise MetaXLError(
            f"no finished run under {runs_dir} has {split}.{metric}; available {split} metrics: "
            f"{', '.join(avail) or 'none'} (choose one with --metric, or --split dev/test)"
        )
    return records, entries, missing


def _counts(records: list[RunRecord], duplicates: list[str], missing: list[str]) -> dict[str, int]:
    counts = {
        s: sum(1 for r in records if r.status == s)
        for s in ("finished", "unfinished", "failed", "unreadable")
    }
    counts["read"] = len(records)
    counts["duplicates"] = len(duplicates)
    counts["no_metric"] = len(missing)
    return counts


def _summary_markdown(
    runs_dir: Path, counts: dict[str, int], missing: list[str], duplicates: list[str], metric: str, split: str
) -> list[str]:
    """The report's title, what was read, and how to read a cell."""
    md: list[str] = ["# MetaXL report", ""]
    md.append(
        f"Read {counts['read']} run folders under `{runs_dir}`: {counts['finished']} finished, "
        f"{counts['unfinished']} skipped unfinished, {counts['failed']} failed"
        + (f", {counts['unreadable']} unreadable" if counts["unreadable"] else "")
        + "."
    )
    if missing:
        md.append(f"{len(missing)} finished runs have no `{split}.{metric}` and were skipped.")
    if duplicates:
        md.append(f"{len(duplicates)} duplicate runs ignored: " + "; ".join(duplicates[:5]))
    md += [
        "",
        f"Cells: {split} {metric} (percent), mean ± sample std (ddof=1) over seeds; a single seed shows "
        "the value alone. `avg`: mean over the row's targets of their cells' means (its ± is the std over seeds "
        "of the per-seed average, for seeds run on every target; its n, or n=a–b, the seeds of the targets "
        "it averages); † = some targets missing from the row; where a row misses "
        "targets, `avg of the N shared` averages every row over the same N targets, the column to compare.",
        "",
    ]
    return md


def _tables_markdown(
    tables: list[Table], out_dir: Path, files: list[Path], metric: str, split: str, plots: bool
) -> list[str]:
    """One section per table; writes each table's CSV (and PNG with ``plots``), added to ``files``."""
    md: list[str] = []
    for table in tables:
        md += [f"## {table.title}", "", table_markdown(table), ""]
        if table.uniform_n and table.rows:
            n = next(iter(table.rows[0].cells.values())).n
            md.append(f"{n} seed(s) per cell.")
            md.append("")
        if table.common:
            md.append("A row's label names the settings where it differs from the most common one; the most common: "
                      + " | ".join(table.common) + ".")
            md.append("")
        csv_path = out_dir / f"{table.slug}.csv"
        write_table_csv(table, csv_path)
        files.append(csv_path)
        if plots and table.rows:
            png = out_dir / f"{table.slug}.png"
            plot_table(table, png, f"{split} {metric}")
            files.append(png)
            md += [f"![{table.title}]({png.name})", ""]
    return md


_PAIRED_HEADER = "| table | source | comparison | {n} | mean Δ | 95% CI | wins/losses/ties | t-test p | Wilcoxon p | Holm p |"


def _paired_markdown(comparisons: list[Comparison], out_dir: Path, files: list[Path], plots: bool) -> list[str]:
    """The paired MetaXL − JT section (by pair, and by target where that differs); writes
    significance.csv, pairs.csv and (with ``plots``) paired.png, added to ``files``."""
    md = ["## Paired comparison: MetaXL − JT", ""]
    holm_p = holm([c.stats.t_p for c in comparisons])
    by_target = [c.by_target() for c in comparisons]
    holm_t = holm([t.t_p for t in by_target])
    if comparisons:
        md.append(
            "Runs paired on (task, target, source, source size, seed); n = (language, seed) pairs; "
            "95% CI of the mean difference (t); p-values: two-sided paired t-test and Wilcoxon signed-rank; "
            f"Holm p: the t-test p adjusted for the {len(comparisons)} comparison(s) of this report "
            "(Holm-Bonferroni; a difference is significant at 5% family-wise where it is <= 0.05)."
        )
        md += ["", _PAIRED_HEADER.format(n="n"), "|---|---|---|---:|---:|---|---|---:|---:|---:|"]
        md += [_paired_row(c, c.stats, adj) for c, adj in zip(comparisons, holm_p, strict=True)]
    if any(len(c.pairs) > t.n for c, t in zip(comparisons, by_target, strict=True)):  # else the same table again
        md += [
            "",
            "By target: each target's seeds averaged first, so n = targets (seeds of one target share "
            "its data; this asks whether the difference holds across languages). Same columns; Holm "
            "over the same comparisons.",
            "",
            _PAIRED_HEADER.format(n="targets"),
            "|---|---|---|---:|---:|---|---|---:|---:|---:|",
        ]
        md += [_paired_row(c, t, adj) for c, t, adj in zip(comparisons, by_target, holm_t, strict=True)]
    if comparisons:
        md += [
            "",
            "Every pair is in `pairs.csv` (target, seed, both scores, the difference)"
            + (", and drawn in `paired.png`:" if plots else "."),
        ]
        if plots:
            md += ["", "![Paired differences MetaXL − JT](paired.png)"]
    else:
        md.append("No MetaXL and JT runs with matching (target, source, source size, seed) to pair.")
    md.append("")
    files.append(_write_significance_csv(out_dir / "significance.csv", comparisons, by_target, holm_p, holm_t))
    files.append(_write_pairs_csv(out_dir / "pairs.csv", comparisons))
    if plots and comparisons:
        png = out_dir / "paired.png"
        paired_figure(comparisons, holm_p).savefig(png, dpi=110, bbox_inches="tight")
        files.append(png)
    return md


_SIGNIFICANCE_COLUMNS = [
    "table", "source", "treatment", "control", "n", "mean_diff", "ci_low", "ci_high", "wins", "losses", "ties",
    "ttest_p", "wilcoxon_p", "ttest_p_holm", "targets", "target_mean_diff", "target_ci_low", "target_ci_high",
    "target_wins", "target_losses", "target_ttest_p", "target_wilcoxon_p", "target_ttest_p_holm",
]


def _write_significance_csv(
    path: Path, comparisons: list[Comparison], by_target: list[PairedStats], holm_p: list[float], holm_t: list[float]
) -> Path:
    """One row per comparison: its paired statistics by pair, then by target."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(_SIGNIFICANCE_COLUMNS)
        for c, t, adj, adj_t in zip(comparisons, by_target, holm_p, holm_t, strict=True):
            s = c.stats
            w.writerow([
                c.table, c.kind, c.treatment, c.control,
                s.n, _csv_num(s.mean), _csv_num(s.ci_low), _csv_num(s.ci_high), s.wins, s.losses, s.ties,
                _csv_num(s.t_p), _csv_num(s.wilcoxon_p), _csv_num(adj),
                t.n, _csv_num(t.mean), _csv_num(t.ci_low), _csv_num(t.ci_high), t.wins, t.losses,
                _csv_num(t.t_p), _csv_num(t.wilcoxon_p), _csv_num(adj_t),
            ])
    return path


def _write_pairs_csv(path: Path, comparisons: list[Comparison]) -> Path:
    """Every (target, seed) pair of every comparison, with both scores and the difference."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["table", "source", "treatment", "control", "target", "seed", "treatment_value",
                    "control_value", "diff"])
        for c in comparisons:
            for target, seed, x, y in c.pairs:
                w.writerow([c.table, c.kind, c.treatment, c.control, target, seed, _csv_num(x), _csv_num(y),
                            _csv_num(x - y)])
    return path


RTN_COLUMNS = (("rel_change", "change of source vectors", ".3f"), ("norm_ratio", "norm ratio", ".2f"),
               ("cosine", "cosine", ".2f"), ("weight_drift", "weight drift", ".3f"),
               ("hypergrad_snr", "hypergradient SNR", ".2f"))


def rtn_markdown(entries: list[_Entry], records: list[RunRecord]) -> list[str]:
    """Is the RTN learning? The last epoch's RTN diagnostics (``results.json`` ``epochs[-1].rtn``),
    averaged per task and setting over targets and seeds; nothing for runs without them (runs of
    code before issue 29, methods without an RTN).

    >>> e = _Entry("a", "ner", "", 200, "metaxl", "en", (), "t", 1, 50.0, "")
    >>> r = RunRecord("a", "finished", {"rtn_init": {"rel_change": 0.3},
    ...     "epochs": [{"rtn": {"rel_change": 0.5, "weight_drift": 0.2, "hypergrad_snr": 0.4}}]})
    >>> for line in rtn_markdown([e], [r])[5:7]:
    ...     print(line)
    |---|---|---:|---:|---:|---:|---:|---:|
    | ner | MetaXL (en) | 1 | 0.300 -> 0.500 | - | - | 0.200 | 0.40 |
    """
    by_rel = {r.rel: r for r in records}
    groups: dict[tuple[str, str], list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for e in entries:
        res = by_rel[e.rel].results if e.rel in by_rel else None
        epochs = (res or {}).get("epochs") or []
        last = epochs[-1].get("rtn") if epochs else None
        if last:
            groups.setdefault((e.task, _label(e)), []).append(((res or {}).get("rtn_init") or {}, last))
    if not groups:
        return []

    def mean(values: list[Any], spec: str) -> str:
        vals = [float(v) for v in values if v is not None]
        return format(sum(vals) / len(vals), spec) if vals else "-"

    md = ["## RTN diagnostics", "",
          "The RTN at the last epoch, mean over runs: relative change of a probe batch's source token vectors "
          "(start -> end), norm ratio and cosine of RTN(h) to h, relative distance of its weights from the start, "
          "signal-to-noise of the hypergradients (MetaXL; 1 = one direction, ~0 = noise).", "",
          "| task | setting | runs | " + " | ".join(title for _, title, _ in RTN_COLUMNS) + " |",
          "|---|---|---:|" + "---:|" * len(RTN_COLUMNS)]
    for (task, label), runs in sorted(groups.items()):
        cells = [f"{mean([s.get('rel_change') for s, _ in runs], '.3f')} -> {mean([e.get('rel_change') for _, e in runs], '.3f')}"]
        cells += [mean([e.get(key) for _, e in runs], spec) for key, _, spec in RTN_COLUMNS[1:]]
        md.append(f"| {task} | {label} | {len(runs)} | " + " | ".join(cells) + " |")
    return md + [""]


def _runs_markdown(tables: list[Table], records: list[RunRecord]) -> list[str]:
    """The runs finished per seed, the failed runs and the unfinished ones."""
    md: list[str] = []
    if any(r.seeds for t in tables for r in t.rows):
        md += [
            "## Runs finished per seed",
            "",
            "Targets with a finished run of each setting and seed (of the table's targets; – none).",
            "",
            coverage_markdown(tables),
            "",
        ]
    failed = [r for r in records if r.status in ("failed", "unreadable")]
    md += ["## Failed runs", ""]
    if failed:
        md += ["| run | reason |", "|---|---|"]
        md += [f"| `{r.rel}` | {r.reason.replace('|', '/')} |" for r in failed]
    else:
        md.append("None.")
    unfinished = [r for r in records if r.status == "unfinished"]
    if unfinished:
        md += ["", "## Unfinished runs (skipped)", ""]
        md += [f"- `{r.rel}`: {r.reason}" for r in unfinished]
    md.append("")
    return md


def _write_runs_csv(path: Path, records: list[RunRecord], entries: list[_Entry], metric: str, split: str) -> Path:
    """One row per run folder read, finished or not, with its score where it has one."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "status", "task", "method", "target", "source", "source_size", "seed",
                    f"{split}_{metric}", "reason"])
        by_rel = {e.rel: e for e in entries}
        for r in records:
            e = by_rel.get(r.rel)
            cfg = r.config
            w.writerow([
                r.rel, r.status, e.task if e else cfg.get("task", ""), cfg.get("method", ""),
                cfg.get("target", ""), "+".join(cfg.get("source") or []), cfg.get("source_size", ""),
                cfg.get("seed", ""), _csv_num(e.value) if e else "", r.reason,
            ])
    return path


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def _cmd_report(args: argparse.Namespace) -> int:
    res = make_report(args.runs_dir, args.out, metric=args.metric, split=args.split, plots=not args.no_plots)
    c = res.counts
    print(
        f"read {c['read']} runs: {c['finished']} finished, {c['unfinished']} unfinished (skipped), "
        f"{c['failed']} failed; {len(res.tables)} table(s), {len(res.comparisons)} paired comparison(s)"
    )
    print(f"wrote {res.markdown_path} (+ {len(res.files) - 1} CSV/PNG files in {res.out_dir})")
    return 0


def register_cli(subparsers: Any) -> None:
    """Add the ``report`` subcommand to an argparse subparsers object.

    >>> import argparse
    >>> p = argparse.ArgumentParser(); register_cli(p.add_subparsers())
    >>> p.parse_args(["report", "runs/x", "--split", "dev"]).split
    'dev'
    """
    p = subparsers.add_parser(
        "report",
        help="paper-style tables, significance tests and charts from a folder of runs",
        description="Read every results.json under RUNS_DIR and write report.md, one CSV and PNG per table, "
        "significance.csv, pairs.csv, paired.png and runs.csv. See docs/sweeps.md.",
    )
    p.add_argument("runs_dir", help="folder of runs (e.g. a sweep's --runs-dir)")
    p.add_argument("--out", default=None, help="output folder (default: RUNS_DIR/report)")
    p.add_argument("--metric", default="f1", help="metric key in results.json (default f1)")
    p.add_argument("--split", choices=("test", "dev"), default="test")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG charts")
    p.set_defaults(func=_cmd_report)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m metaxl.report ...`` is ``metaxl report ...``."""
    from .cli import main as cli_main

    return cli_main(["report", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

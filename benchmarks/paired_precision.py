#!/usr/bin/env python
"""Paired accuracy difference of the CPU fast path (bf16 + group_by_length) against the defaults.

Reads every finished ``results.json`` under RUNS_DIR (e.g. the runs of
``examples/sweeps/bf16_accuracy.yaml``), pairs runs whose configs are equal but for ``precision``
and ``group_by_length`` (same task, target, source, method, seed, ...), and prints for each task
and method, and for all pairs, the mean difference fast - default in the test metric, its 95% t
confidence interval and the number of pairs. A CI that holds 0 and is narrow next to the seed-to-seed
spread says the fast path does not change results beyond seed noise.

    python benchmarks/paired_precision.py results/bf16_accuracy [--metric f1]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

WAY_KEYS = ("precision", "group_by_length")
IGNORED = (*WAY_KEYS, "device")
"""Keys a pair may differ in, beyond ``metaxl.sweep.NON_SEMANTIC_KEYS`` (output folder, progress, ...).
A pair's configs are compared as ``metaxl.sweep.effective_config`` gives them, so a run written by an
older metaxl (without the keys added since, i.e. at their defaults) pairs with today's."""


def way_of(config: dict[str, Any]) -> str:
    """``default`` (fp32, shuffled batches), ``fast`` (bf16 + group_by_length) or the pair of values.

    >>> way_of({"precision": "fp32", "group_by_length": False}), way_of({"precision": "bf16", "group_by_length": True})
    ('default', 'fast')
    """
    key = (config.get("precision", "fp32"), bool(config.get("group_by_length", False)))
    return {("fp32", False): "default", ("bf16", True): "fast"}.get(key, f"{key[0]}/{key[1]}")


def mean_ci(diffs: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t confidence interval (nan bounds for fewer than two values).

    >>> m, lo, hi = mean_ci([1.0, 2.0, 3.0])
    >>> m, round(lo, 2), round(hi, 2)
    (2.0, -0.48, 4.48)
    """
    from scipy import stats

    m = statistics.fmean(diffs)
    if len(diffs) < 2:
        return m, math.nan, math.nan
    half = float(stats.t.ppf(0.975, len(diffs) - 1)) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return m, m - half, m + half


def pair_key(config: dict[str, Any]) -> str:
    """What a default run and its fast twin share: the effective config less the way and the device.

    >>> a = pair_key({"target": "nusax:balinese", "task": "auto", "method": "jt", "precision": "bf16",
    ...               "group_by_length": True, "output_dir": "runs/a", "device": "cpu"})
    >>> a == pair_key({"target": "nusax:balinese", "task": "sa", "method": "jt", "device": "cuda"})
    True
    """
    from metaxl.sweep import NON_SEMANTIC_KEYS, effective_config

    eff = effective_config(config)
    return json.dumps({k: v for k, v in eff.items() if k not in IGNORED and k not in NON_SEMANTIC_KEYS},
                      sort_keys=True, default=str)


def paired_runs(runs_dir: Path) -> dict[tuple[str, str], list[tuple[dict[str, Any], dict[str, Any]]]]:
    """(default, fast) results.json pairs under ``runs_dir``, by (task, method)."""
    by_key: dict[str, dict[str, Any]] = defaultdict(dict)
    for path in sorted(runs_dir.rglob("results.json")):
        res = json.loads(path.read_text())
        if res.get("status") != "finished" or not res.get("test"):
            continue
        by_key[pair_key(res["config"])][way_of(res["config"])] = res
    out: dict[tuple[str, str], list[tuple[dict[str, Any], dict[str, Any]]]] = defaultdict(list)
    for ways in by_key.values():
        if "default" in ways and "fast" in ways:
            out[(ways["default"]["task"], ways["default"]["method"])].append((ways["default"], ways["fast"]))
    return dict(out)


def differences(ps: list[tuple[dict[str, Any], dict[str, Any]]], metric: str) -> list[float]:
    """fast - default of the test ``metric``, one per (default, fast) pair."""
    return [float(f["test"][metric]) - float(d["test"][metric]) for d, f in ps]


def pairs(runs_dir: Path, metric: str = "f1") -> dict[tuple[str, str], list[float]]:
    """Differences fast - default of the test ``metric``, by (task, method)."""
    return {k: differences(v, metric) for k, v in paired_runs(runs_dir).items()}


def seed_sd(runs: list[dict[str, Any]], metric: str) -> float:
    """Seed-to-seed spread: the pooled standard deviation over seeds within each target (and source).

    >>> runs = [{"target": "a", "source": ["s"], "test": {"f1": v}} for v in (1.0, 3.0)]
    >>> seed_sd(runs + [{"target": "b", "source": ["s"], "test": {"f1": v}} for v in (5.0, 5.0)], "f1")
    1.0
    """
    groups: dict[str, list[float]] = defaultdict(list)
    for r in runs:
        groups[json.dumps([r.get("target"), r.get("source")])].append(float(r["test"][metric]))
    ss = sum(sum((x - statistics.fmean(v)) ** 2 for x in v) for v in groups.values())
    dof = sum(len(v) - 1 for v in groups.values())
    return math.sqrt(ss / dof) if dof else math.nan


def report(runs: dict[tuple[str, str], list[tuple[dict[str, Any], dict[str, Any]]]], metric: str) -> str:
    """One line per task and method and one for all: pairs, mean difference, 95% CI, the default
    runs' seed spread (what "within seed noise" is measured against) and where the defaults ran."""
    lines = [f"{'task':<5} {'method':<7} {'pairs':>5} {'mean diff (fast - default) ' + metric:>36} {'95% CI':>18} "
             f"{'seed sd':>7}  default runs on"]
    rows = sorted(runs.items()) + [(("all", ""), [p for v in runs.values() for p in v])]
    for (task, method), ps in rows:
        if not ps:
            continue
        m, lo, hi = mean_ci(differences(ps, metric))
        sd = seed_sd([d for d, _ in ps], metric)
        devices = Counter(str(d.get("device", "?")) for d, _ in ps)
        lines.append(f"{task:<5} {method:<7} {len(ps):5d} {m:+36.2f} {f'[{lo:+.2f}, {hi:+.2f}]':>18} {sd:7.2f}  "
                     + ", ".join(f"{k} {n}" for k, n in sorted(devices.items())))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[tuple[str, str], list[float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs_dir", type=Path)
    p.add_argument("--metric", default="f1")
    args = p.parse_args(argv)
    if not args.runs_dir.is_dir():
        raise SystemExit(f"{args.runs_dir} is not a folder of runs")
    runs = paired_runs(args.runs_dir)
    if not runs:
        raise SystemExit(f"no finished default/fast pairs under {args.runs_dir} (a pair: same config but "
                         "precision fp32 + shuffled batches, and bf16 + group_by_length)")
    print(report(runs, args.metric))
    return {k: differences(v, args.metric) for k, v in runs.items()}


if __name__ == "__main__":
    main()

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
from collections import defaultdict
from pathlib import Path
from typing import Any

WAY_KEYS = ("precision", "group_by_length")
IGNORED = (*WAY_KEYS, "output_dir", "progress", "device")


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


def pairs(runs_dir: Path, metric: str = "f1") -> dict[tuple[str, str], list[float]]:
    """Differences fast - default of the test ``metric``, by (task, method)."""
    by_key: dict[str, dict[str, Any]] = defaultdict(dict)
    for path in sorted(runs_dir.rglob("results.json")):
        res = json.loads(path.read_text())
        if res.get("status") != "finished" or not res.get("test"):
            continue
        cfg = res["config"]
        key = json.dumps({k: v for k, v in cfg.items() if k not in IGNORED}, sort_keys=True)
        by_key[key][way_of(cfg)] = res
    out: dict[tuple[str, str], list[float]] = defaultdict(list)
    for ways in by_key.values():
        if "default" in ways and "fast" in ways:
            d, f = ways["default"], ways["fast"]
            out[(d["task"], d["method"])].append(float(f["test"][metric]) - float(d["test"][metric]))
    return dict(out)


def report(diffs: dict[tuple[str, str], list[float]], metric: str) -> str:
    lines = [f"{'task':<5} {'method':<7} {'pairs':>5} {'mean diff (fast - default) ' + metric:>36} {'95% CI':>18}"]
    rows = sorted(diffs.items()) + [(("all", ""), [d for v in diffs.values() for d in v])]
    for (task, method), ds in rows:
        if not ds:
            continue
        m, lo, hi = mean_ci(ds)
        lines.append(f"{task:<5} {method:<7} {len(ds):5d} {m:+36.2f} {f'[{lo:+.2f}, {hi:+.2f}]':>18}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[tuple[str, str], list[float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs_dir", type=Path)
    p.add_argument("--metric", default="f1")
    args = p.parse_args(argv)
    if not args.runs_dir.is_dir():
        raise SystemExit(f"{args.runs_dir} is not a folder of runs")
    diffs = pairs(args.runs_dir, args.metric)
    if not diffs:
        raise SystemExit(f"no finished default/fast pairs under {args.runs_dir} (a pair: same config but "
                         "precision fp32 + shuffled batches, and bf16 + group_by_length)")
    print(report(diffs, args.metric))
    return diffs


if __name__ == "__main__":
    main()

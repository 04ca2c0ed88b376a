#!/usr/bin/env python
"""The cost of whole study runs on the CPU: today's defaults against the fast path, side by side.

For each task (NER: MasakhaNER 2.0 bam + English; SA: NusaX balinese + indonesian) and method
(JT, MetaXL) it trains a whole run with the base settings of ``examples/sweeps/study_<task>.yaml``
(e5-small, 100 targets, 200 sources, 10 epochs, the study's learning rates), once with the
defaults (fp32, shuffled batches) and once on the fast path (``--precision bf16``, bf16 autocast on
the CPU, for training and evaluation; ``--group-by-length``), one after the other in this process,
each pair back to back so that both see the same machine. It prints each run's wall time and CPU
time (the process's, less sensitive to other work on a shared machine), their ratios, and both
test F1s. ``--epochs``, ``--dev-size``, ``--test-size`` and ``--source-size`` give a shorter
measurement (say so when quoting it):

    OMP_NUM_THREADS=1 python benchmarks/run_cost.py --threads 1                      # the whole study setting
    OMP_NUM_THREADS=1 python benchmarks/run_cost.py --threads 1 --epochs 1 --dev-size 100 --test-size 200

On two cores, the tasks can run as two invocations side by side (``--tasks ner --json a.json`` and
``--tasks sa --json b.json``: each pair still runs back to back in one process) and
``--combine a.json b.json`` prints their rows as one table, with the total.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from epoch_split import PAIRS, parse_sets, run, study_base  # noqa: E402
from step_cost import machine_fields, machine_line  # noqa: E402

WAYS: dict[str, dict[str, Any]] = {
    "default": {},
    "fast": {"precision": "bf16", "group_by_length": True},
}
"""The two ways a run is trained: today's defaults and the fast path (settings on top of the study's)."""


def config(task: str, method: str, way: str, args: argparse.Namespace, out: str) -> Any:
    """The run's TrainConfig: the study's base settings, the benchmark's sizes, ``WAYS[way]``.

    >>> ns = argparse.Namespace(epochs=1, dev_size=10, test_size=20, source_size=None, seed=1, model="default",
    ...                         pairs=dict(PAIRS), set=[])
    >>> cfg = config("ner", "jt", "fast", ns, "/tmp/x")
    >>> cfg.precision, cfg.group_by_length, cfg.source_size, cfg.lr, cfg.epochs
    ('bf16', True, 200, 0.0001, 1)
    """
    from metaxl.config import TrainConfig

    target, source = args.pairs[task]
    data = {**study_base(task), "target": target, "source": [source], "method": method, "model": args.model,
            "epochs": args.epochs, "seed": args.seed, "dev_size": args.dev_size, "test_size": args.test_size,
            "device": "cpu", "output_dir": out, "progress": False, **parse_sets(args.set), **WAYS[way]}
    if args.source_size is not None:
        data["source_size"] = args.source_size
    return TrainConfig.from_dict(data)


def one_run(cfg: Any) -> dict[str, Any]:
    """Train ``cfg`` (resumable, as sweeps run it) and time it: wall and this process's CPU seconds,
    and the wall seconds of each phase (:func:`epoch_split.run`: train steps, dev eval, state save, ...)."""
    cpu = time.process_time()
    with contextlib.redirect_stdout(io.StringIO()):
        res = run(cfg)
    return {"wall_s": res["wall_s"], "cpu_s": time.process_time() - cpu, "test_f1": res["test_f1"],
            "phases_s": res["seconds"]}


def report(res: dict[str, Any]) -> str:
    lines = [machine_line(res), res["setting"], "",
             f"{'task':<4} {'method':<7} {'default s':>9} {'fast s':>7} {'wall ratio':>10} {'cpu ratio':>9} "
             f"{'test f1 default':>15} {'test f1 fast':>12}"]
    total = {way: {"wall_s": 0.0, "cpu_s": 0.0} for way in WAYS}
    for row in res["runs"]:
        d, f = row["default"], row["fast"]
        for way in WAYS:
            for k in ("wall_s", "cpu_s"):
                total[way][k] += row[way][k]
        lines.append(f"{row['task']:<4} {row['method']:<7} {d['wall_s']:9.0f} {f['wall_s']:7.0f} "
                     f"{f['wall_s'] / d['wall_s']:10.2f} {f['cpu_s'] / d['cpu_s']:9.2f} "
                     f"{d['test_f1']:15.2f} {f['test_f1']:12.2f}")
    d, f = total["default"], total["fast"]
    lines.append(f"{'all':<12} {d['wall_s']:9.0f} {f['wall_s']:7.0f} {f['wall_s'] / d['wall_s']:10.2f} "
                 f"{f['cpu_s'] / d['cpu_s']:9.2f}")
    phases = ("train steps", "step guard", "dev eval", "test eval", "state save", "setup and other")
    lines += ["", "wall seconds by phase (default -> fast)",
              f"{'task':<4} {'method':<7} " + " ".join(f"{p:>17}" for p in phases)]
    for row in res["runs"]:
        cells = [f"{row['default']['phases_s'].get(p, 0.0):7.1f} -> {row['fast']['phases_s'].get(p, 0.0):6.1f}"
                 for p in phases]
        lines.append(f"{row['task']:<4} {row['method']:<7} " + " ".join(f"{c:>17}" for c in cells))
    return "\n".join(lines)


def combine(paths: list[str]) -> dict[str, Any]:
    """The rows of several ``--json`` files as one result (machine and setting from the first).

    Refused when they were measured on different machines, torch builds or settings (but the tasks):
    their ratios would not be side by side.
    """
    parts = [json.loads(Path(p).read_text()) for p in paths]
    first = parts[0]
    for path, part in zip(paths[1:], parts[1:], strict=True):
        for key in ("machine", "cores", "torch", "torch_threads", "setting"):
            if part.get(key) != first.get(key):
                raise SystemExit(f"--combine: {path} differs from {paths[0]} in {key} "
                                 f"({part.get(key)!r} vs {first.get(key)!r}); only runs of one machine and setting combine")
    return {**first, "runs": [row for part in parts for row in part["runs"]], "combined": list(paths)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                   help="print the rows of these --json files as one table (no runs)")
    p.add_argument("--tasks", default="ner,sa", help="comma list of ner, sa")
    p.add_argument("--methods", default="jt,metaxl", help="comma list of target-only, jt, jt-rtn, metaxl")
    p.add_argument("--epochs", type=int, default=10, help="the study's 10 by default")
    p.add_argument("--dev-size", type=int, default=None, help="cap on dev examples (default: all, as the study)")
    p.add_argument("--test-size", type=int, default=None, help="cap on test examples (default: all, as the study)")
    p.add_argument("--source-size", type=int, default=None, help="source examples (default: the study's 200)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--model", default="default")
    for task, (target, source) in PAIRS.items():
        p.add_argument(f"--{task}-data", default=f"{target},{source}", metavar="TARGET,SOURCE",
                       help=f"the {task.upper()} target and source data sets (default: {target},{source})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting of the study in both ways (e.g. --set max_length=64); repeatable")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--keep", default=None, metavar="DIR",
                   help="keep the run folders (results.json, config.yaml, train.log) under DIR/<task>-<method>-<way> "
                        "(default: a temporary folder); DIR must not hold them yet")
    args = p.parse_args(argv)
    args.pairs = {}
    for task in PAIRS:
        parts = [x.strip() for x in getattr(args, f"{task}_data").split(",")]
        if len(parts) != 2 or not all(parts):
            p.error(f"--{task}-data takes TARGET,SOURCE, got {getattr(args, f'{task}_data')!r}")
        args.pairs[task] = tuple(parts)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.combine:
        combined = combine(args.combine)
        print(report(combined))
        if args.json:
            Path(args.json).write_text(json.dumps(combined, indent=1))
        return combined
    if args.threads:
        torch.set_num_threads(args.threads)
    from metaxl.precision import describe_cpu

    res: dict[str, Any] = {**machine_fields(torch.device("cpu")), "cpu": describe_cpu(), "runs": [],
                           "args": {k: v for k, v in vars(args).items() if k != "pairs"}, "pairs": args.pairs}
    res["setting"] = (f"study settings, {args.epochs} epochs, dev {args.dev_size or 'all'}, test {args.test_size or 'all'}, "
                      f"sources {args.source_size or 200}, seed {args.seed}; fast = "
                      + ", ".join(f"{k}={v}" for k, v in WAYS["fast"].items()) + f"; {res['cpu']}")
    if args.keep and Path(args.keep).exists() and any(Path(args.keep).iterdir()):
        raise SystemExit(f"--keep {args.keep}: the folder is not empty; its runs would be resumed, not timed")
    with contextlib.ExitStack() as stack:
        tmp = args.keep or stack.enter_context(tempfile.TemporaryDirectory())
        for task in args.tasks.split(","):
            for method in args.methods.split(","):
                row: dict[str, Any] = {"task": task, "method": method}
                for way in WAYS:
                    row[way] = one_run(config(task, method, way, args, f"{tmp}/{task}-{method}-{way}"))
                    print(f"{task} {method} {way}: {row[way]['wall_s']:.0f} s, test f1 {row[way]['test_f1']:.2f}",
                          file=sys.stderr, flush=True)
                res["runs"].append(row)
    print(report(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()

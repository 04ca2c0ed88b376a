#!/usr/bin/env python
"""Where a training run's time goes, epoch by epoch: training steps, batch collation, dev evaluation,
the per-epoch state save (``--resume``, as sweeps run), the best-epoch snapshot, results.json
writes; and the test evaluation at the end.

A real ``metaxl.train.train`` run (the study's settings of ``examples/sweeps/study_<task>.yaml``,
e5-small) with those functions wrapped by timers; ``--profile N`` also prints the N functions of
largest own time (cProfile) to find what else costs. Keep it short (1-2 epochs, 1 thread):

    OMP_NUM_THREADS=1 python benchmarks/epoch_split.py --task ner --method jt --epochs 2 --threads 1
    OMP_NUM_THREADS=1 python benchmarks/epoch_split.py --task ner --method jt --epochs 2 --threads 1 --precision bf16 --group-by-length
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cost import machine_fields, machine_line  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PAIRS = {"ner": ("masakhaner2:bam", "masakhaner2:en"), "sa": ("nusax:balinese", "nusax:indonesian")}


def study_base(task: str) -> dict[str, Any]:
    """The ``base`` settings of the study's sweep file for ``task`` (ner or sa).

    >>> study_base("ner")["source_size"], study_base("sa")["task"]
    (200, 'sa')
    """
    import yaml

    return dict(yaml.safe_load((REPO / "examples" / "sweeps" / f"study_{task}.yaml").read_text())["base"])


def parse_sets(items: list[str]) -> dict[str, str]:
    """``--set KEY=VALUE`` overrides of TrainConfig fields (converted as the YAML values are).

    >>> parse_sets(["max_length=32", "rtn_layers=-1"])
    {'max_length': '32', 'rtn_layers': '-1'}
    """
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise SystemExit(f"--set takes KEY=VALUE (a TrainConfig field), got {item!r}")
        out[key.strip()] = value.strip()
    return out


class Timers:
    """Accumulated seconds per phase; a phase entered inside another is charged to the inner one only.

    >>> t = Timers()
    >>> with t.phase("outer"):
    ...     with t.phase("inner"):
    ...         pass
    >>> sorted(t.seconds), t.calls["inner"]
    (['inner', 'outer'], 1)
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[list[Any]] = []  # [name, start, time of inner phases]

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._stack.append([name, time.perf_counter(), 0.0])
        try:
            yield
        finally:
            _, start, inner = self._stack.pop()
            total = time.perf_counter() - start
            self.seconds[name] += total - inner
            self.calls[name] += 1
            if self._stack:
                self._stack[-1][2] += total

    def wrap(self, owner: Any, attr: str, name: str) -> Callable[[], None]:
        """Time every call of ``owner.attr`` as ``name``; returns the undo."""
        original = getattr(owner, attr)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return original(*args, **kwargs)

        setattr(owner, attr, timed)
        return lambda: setattr(owner, attr, original)


PHASES = ("train steps", "step guard", "collate", "dev eval", "state save", "snapshot", "results.json", "test eval")


def run(cfg: Any, profile: int = 0) -> dict[str, Any]:
    """Train ``cfg`` (with ``resume=True``, as sweeps do) and return the time of each phase."""
    import metaxl.guards
    import metaxl.meta
    import metaxl.tasks
    import metaxl.train as tr

    timers = Timers()
    undo = [
        timers.wrap(metaxl.meta.Learner, "step", "train steps"),
        timers.wrap(metaxl.guards, "step_problem", "step guard"),
        timers.wrap(metaxl.tasks, "collate", "collate"),
        timers.wrap(tr, "_save_state", "state save"),
        timers.wrap(tr.Snapshot, "take", "snapshot"),
        timers.wrap(tr, "write_json", "results.json"),
    ]
    evaluate = tr.evaluate
    evals = 0

    def timed_eval(*args: Any, **kwargs: Any) -> Any:
        nonlocal evals
        evals += 1
        with timers.phase("dev eval" if evals <= cfg.epochs else "test eval"):
            return evaluate(*args, **kwargs)

    tr.evaluate = timed_eval  # type: ignore[assignment]
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    try:
        if prof:
            prof.enable()
        res = tr.train(cfg, resume=True, log=lambda *_: None)
    finally:
        if prof:
            prof.disable()
        tr.evaluate = evaluate  # type: ignore[assignment]
        for u in undo:
            u()
    wall = time.perf_counter() - t0
    out: dict[str, Any] = {"wall_s": wall, "seconds": dict(timers.seconds), "calls": dict(timers.calls),
                           "epochs": cfg.epochs, "test_f1": res["test"]["f1"] if res.get("test") else None}
    out["seconds"]["setup and other"] = wall - sum(timers.seconds.values())
    if prof:
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(profile)
        out["profile"] = text.getvalue()
    return out


def report(res: dict[str, Any]) -> str:
    e = res["epochs"]
    lines = [machine_line(res), res["setting"], "",
             f"{'phase':<16} {'total s':>8} {'per epoch s':>11} {'calls':>6} {'% of run':>8}"]
    for name in (*PHASES, "setup and other"):
        s = res["seconds"].get(name, 0.0)
        per = f"{s / e:11.2f}" if name not in ("test eval", "setup and other") else f"{'-':>11}"
        lines.append(f"{name:<16} {s:8.2f} {per} {res['calls'].get(name, 0):6d} {100 * s / res['wall_s']:7.1f}%")
    lines.append(f"{'whole run':<16} {res['wall_s']:8.2f}   test f1 {res['test_f1']:.2f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=("ner", "sa"), default="ner")
    p.add_argument("--method", default="jt", help="target-only, jt, jt-rtn or metaxl")
    p.add_argument("--target", default=None, help="default: masakhaner2:bam (ner), nusax:balinese (sa)")
    p.add_argument("--source", default=None, help="default: masakhaner2:en (ner), nusax:indonesian (sa)")
    p.add_argument("--model", default="default")
    p.add_argument("--epochs", type=int, default=2, help="the state is saved after every epoch but the last")
    p.add_argument("--dev-size", type=int, default=None, help="cap on dev examples (default: all)")
    p.add_argument("--test-size", type=int, default=None, help="cap on test examples (default: all)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--group-by-length", action="store_true")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting of the study (e.g. --set max_length=64); repeatable")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="print the N functions of largest own time")
    p.add_argument("--json", default=None, help="also write the figures here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from metaxl.config import TrainConfig

    target, source = PAIRS[args.task]
    target, source = args.target or target, args.source or source
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig.from_dict({
            **study_base(args.task), "target": target, "source": [source], "method": args.method,
            "model": args.model, "epochs": args.epochs, "seed": args.seed, "dev_size": args.dev_size,
            "test_size": args.test_size, "precision": args.precision, "group_by_length": args.group_by_length,
            "device": "cpu", "output_dir": f"{tmp}/run", "progress": False, **parse_sets(args.set),
        })
        res = {**machine_fields(torch.device("cpu")), **run(cfg, args.profile)}
    res["setting"] = (f"{args.method} {target} + {source}; {args.epochs} epochs; study settings; {args.precision}"
                      f"{', group_by_length' if args.group_by_length else ''}; seed {args.seed}")
    print(report(res))
    if "profile" in res:
        print(res["profile"])
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in res.items() if k != "profile"}, indent=1))
    return res


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""The divergence guard's cost a step: the scan before issue 34's fix against today's, side by side.

After every training step metaxl checks the weights for non-finite or exploded values
(``metaxl.guards.weight_problem``). It used to scan every weight of the model with
``t.abs().max()`` (a full copy of each); it now scans only what a step can change (theta's
trainable weights and the RTN: not the word embeddings frozen by ``--freeze-embeddings``, 96M of
e5-small's 117M) with ``torch.aminmax`` (one read, no copy). Both are timed interleaved on the
study's model; the per-run figure is the per-step time x the study's 200 steps (10 epochs x 20).

    OMP_NUM_THREADS=1 python benchmarks/guard_cost.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cost import machine_fields, machine_line  # noqa: E402


def scan_before(params: list[Any]) -> float:
    """The guard's scan before the fix: every weight, ``|t|.max()``."""
    return float(torch.stack([t.detach().abs().max().float() for t in params if t.numel()]).max())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=200, help="steps a run (the study's: 10 epochs x 20)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from metaxl.guards import weight_problem
    from metaxl.models import load_model

    model = load_model(args.model, "ner", ["O", "B-PER", "I-PER"])
    model.get_input_embeddings().weight.requires_grad_(False)  # the study's --freeze-embeddings
    every = list(model.parameters())
    trained = [q for q in every if q.requires_grad]
    ways = {"before (all weights, abs().max())": lambda: scan_before(every),
            "now (trained weights, aminmax)": lambda: weight_problem(trained)}
    times: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(args.rounds + 1):  # the first round warms up
        for name, fn in ways.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    res = {**machine_fields(torch.device("cpu")), "weights": sum(q.numel() for q in every),
           "trained": sum(q.numel() for q in trained),
           "seconds": {k: statistics.median(v[1:]) for k, v in times.items()}}
    print(machine_line(res))
    print(f"{args.model}: {res['weights'] / 1e6:.1f}M weights, {res['trained'] / 1e6:.1f}M trained; "
          f"median of {args.rounds} interleaved rounds")
    before, now = res["seconds"].values()
    for name, s in res["seconds"].items():
        print(f"{name:<36} {s:8.4f} s a step  {s * args.steps:7.1f} s a run of {args.steps} steps")
    print(f"ratio now / before: {now / before:.3f}")
    return res


if __name__ == "__main__":
    main()

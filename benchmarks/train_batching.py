#!/usr/bin/env python
"""Cost of a training epoch: shuffled batches (the default) vs ``group_by_length`` batches.

Training batches pad to their longest sequence. Shuffled batches of 10 NusaX or MasakhaNER
sentences compute about twice the real tokens; ``group_by_length`` (opt-in) sorts each chunk of 50
batches by length before cutting it, then shuffles the batches. This script prints, for a real
target/source pair, the padding each way draws (padded tokens / real tokens over ``--shuffles``
epochs; exact, machine-independent) and the time of one training epoch each way, measured with
``metaxl.train.train`` itself (dev and test capped at a few examples so that the epoch is training),
in one process, interleaved (``--rounds`` rounds of each way in turn, after ``--warmup`` epochs).

    python benchmarks/train_batching.py --target nusax:balinese --source nusax:indonesian --method jt --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the machine described as step_cost.py describes it
from step_cost import machine_fields, machine_line, parse_with_machine_args  # noqa: E402


def padding_ratio(lengths: list[int], batch_size: int, group_by_length: bool, shuffles: int, seed: int = 0) -> float:
    """Padded tokens / real tokens of the batches ``metaxl.train.batches`` draws, over ``shuffles`` epochs.

    >>> lengths = [40, 3] * 50
    >>> padding_ratio(lengths, 10, False, 5) > 1.6, padding_ratio(lengths, 10, True, 5)
    (True, 1.0)
    """
    from metaxl.train import batches

    feats = [{"input_ids": [0] * n} for n in lengths]
    gen = torch.Generator().manual_seed(seed)
    padded = 0
    for _ in range(shuffles):
        for b in batches(feats, batch_size, gen, group_by_length=group_by_length):
            padded += max(len(f["input_ids"]) for f in b) * len(b)
    return padded / (sum(lengths) * shuffles)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="default, a checkpoint folder or a hub name")
    p.add_argument("--target", default="nusax:balinese")
    p.add_argument("--source", default="nusax:indonesian")
    p.add_argument("--method", default="jt", help="target-only, jt, jt-rtn or metaxl")
    p.add_argument("--target-size", type=int, default=100)
    p.add_argument("--source-size", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1, help="unmeasured epochs first (the epoch time excludes loading)")
    p.add_argument("--shuffles", type=int, default=20, help="epochs over which the padding is counted")
    return parse_with_machine_args(p, argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from metaxl.config import TrainConfig
    from metaxl.data import resolve_dataset, subsample
    from metaxl.models import load_tokenizer
    from metaxl.tasks import encode, reconcile_labels
    from metaxl.train import train


    tokenizer = load_tokenizer(args.model)
    sets = {"target": (args.target, args.target_size)}
    if args.method != "target-only":
        sets["source"] = (args.source, args.source_size)
    padding: dict[str, dict[str, float]] = {}
    for role, (spec, size) in sets.items():
        corpus = resolve_dataset(spec, None)
        examples = subsample(corpus.load("train"), size, 42)
        labels = reconcile_labels(corpus.task, examples, [])
        feats = encode(corpus.task, examples, tokenizer, {lab: i for i, lab in enumerate(labels)}, args.max_length)
        lengths = [len(f["input_ids"]) for f in feats]
        padding[role] = {way: padding_ratio(lengths, args.batch_size, way == "grouped", args.shuffles)
                         for way in ("shuffled", "grouped")}

    def epoch(group_by_length: bool, out: str) -> float:
        cfg = TrainConfig(
            target=args.target, source=[args.source], model=args.model, method=args.method, epochs=1,
            batch_size=args.batch_size, target_size=args.target_size, source_size=args.source_size,
            max_length=args.max_length, dev_size=4, test_size=4, lr=1e-4, head_lr=3e-3, meta_lr=1e-4,
            freeze_embeddings=True, rtn_layers=[-1], device=args.device, output_dir=out,
            save_checkpoint=False, progress=False, group_by_length=group_by_length,
        )
        with contextlib.redirect_stdout(io.StringIO()):
            res = train(cfg, log=lambda *_: None)
        return float(res["epochs"][0]["seconds"])

    ways = {"shuffled": False, "grouped": True}
    times: dict[str, list[float]] = {name: [] for name in ways}
    with tempfile.TemporaryDirectory() as tmp:
        for w in range(args.warmup):
            epoch(False, f"{tmp}/warmup{w}")
        for r in range(args.rounds):
            for name, flag in ways.items():
                times[name].append(epoch(flag, f"{tmp}/{name}{r}"))
    base = statistics.median(times["shuffled"])
    res: dict[str, Any] = {
        **machine_fields(torch.device(args.device)), "model": args.model, "method": args.method,
        "data": f"{args.target} ({args.target_size})"
        + (f" + {args.source} ({args.source_size})" if args.method != "target-only" else ""),
        "batch_size": args.batch_size, "shuffles": args.shuffles, "ways": {},
    }
    for name in ways:
        med = statistics.median(times[name])
        res["ways"][name] = {"times_s": times[name], "median_s": med, "ratio": med / base,
                             "padding": {role: p[name] for role, p in padding.items()}}
    print(report(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


def report(res: dict[str, Any]) -> str:
    roles = list(next(iter(res["ways"].values()))["padding"])
    lines = [
        machine_line(res),
        f"model {res['model']}; {res['method']} on {res['data']}; batch {res['batch_size']}; one epoch, median of "
        f"{len(next(iter(res['ways'].values()))['times_s'])} interleaved rounds; padding over {res['shuffles']} epochs",
        "",
        f"{'batches':<9}  {'s/epoch':>8}  {'x shuffled':>10}  " + "  ".join(f"{'padded/real ' + r:>18}" for r in roles),
    ]
    for name, w in res["ways"].items():
        lines.append(f"{name:<9}  {w['median_s']:8.1f}  {w['ratio']:10.2f}  "
                     + "  ".join(f"{w['padding'][r]:18.2f}" for r in roles))
    return "\n".join(lines)


if __name__ == "__main__":
    main()

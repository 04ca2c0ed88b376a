#!/usr/bin/env python
"""Cost of evaluating a data set: batches in the given order vs length-sorted batches.

``metaxl.train.predict_features`` (used by training's dev/test evaluation, ``metaxl evaluate`` and
``metaxl predict``) forms its batches from length-sorted examples and puts the outputs back in the
given order. This script measures what that saves on a real split, in one process, interleaved
(``--rounds`` rounds of each way in turn, after a warm-up), and checks that both ways give the same
logits. It also prints the padding each way computes (tokens in padded batches / real tokens),
which does not depend on the machine.

    python benchmarks/eval_cost.py --model default --data masakhaner2:bam --split dev --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the machine described as step_cost.py describes it
from step_cost import machine_fields, machine_line, parse_with_machine_args  # noqa: E402


def in_given_order(model: Any, features: list[dict[str, Any]], pad_id: int, batch_size: int,
                   device: torch.device) -> list[torch.Tensor]:
    """The way ``predict_features`` batched before: consecutive examples, as given."""
    from metaxl.tasks import collate

    model.eval()
    out: list[torch.Tensor] = []
    with torch.no_grad():
        for i in range(0, len(features), batch_size):
            chunk = features[i : i + batch_size]
            batch = collate(chunk, pad_id)
            batch.pop("labels", None)
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
            for j, f in enumerate(chunk):
                out.append(logits[j, : len(f["input_ids"])] if logits.dim() == 3 else logits[j])
    return out


def padded_tokens(lengths: list[int], batch_size: int) -> int:
    """Tokens a forward pass computes when batches pad to their longest member.

    >>> padded_tokens([5, 1, 5, 1], 2), padded_tokens(sorted([5, 1, 5, 1], reverse=True), 2)
    (20, 12)
    """
    return sum(max(lengths[i : i + batch_size]) * len(lengths[i : i + batch_size])
               for i in range(0, len(lengths), batch_size))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="default, a checkpoint folder or a hub name")
    p.add_argument("--data", default="masakhaner2:bam", help="a data set name or folder (as metaxl train --target)")
    p.add_argument("--split", default="dev", choices=["train", "dev", "test"])
    p.add_argument("--sa-labels", default="binary")
    p.add_argument("--limit", type=int, default=None, help="first N examples only")
    p.add_argument("--batch-size", type=int, default=64, help="as metaxl train --eval-batch-size")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    return parse_with_machine_args(p, argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from metaxl.data import resolve_dataset
    from metaxl.models import load_model, load_tokenizer
    from metaxl.tasks import encode, reconcile_labels
    from metaxl.train import predict_features

    corpus = resolve_dataset(args.data, None, sa_labels=args.sa_labels)
    examples = corpus.load(args.split)[: args.limit]
    labels = reconcile_labels(corpus.task, examples, [])
    tokenizer = load_tokenizer(args.model)
    feats = encode(corpus.task, examples, tokenizer, {lab: i for i, lab in enumerate(labels)}, args.max_length)
    device = torch.device(args.device)
    model = load_model(args.model, corpus.task, labels).to(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    lengths = [len(f["input_ids"]) for f in feats]

    ways = {
        "given order": lambda: in_given_order(model, feats, pad_id, args.batch_size, device),
        "length-sorted": lambda: predict_features(model, feats, pad_id, args.batch_size, device),
    }
    outputs = {name: fn() for name, fn in ways.items()}  # warm-up, and the outputs compared below
    diff = max(float((a - b).abs().max()) for a, b in zip(*outputs.values(), strict=True))
    same_argmax = sum(int(torch.equal(a.argmax(-1), b.argmax(-1))) for a, b in zip(*outputs.values(), strict=True))
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, fn in ways.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["given order"])
    res: dict[str, Any] = {
        **machine_fields(device), "model": args.model, "data": f"{args.data} {args.split}", "examples": len(feats),
        "real_tokens": sum(lengths), "batch_size": args.batch_size,
        "ways": {}, "max_abs_logit_diff": diff, "same_predictions": same_argmax,
    }
    for name in ways:
        order = lengths if name == "given order" else sorted(lengths, reverse=True)
        med = statistics.median(times[name])
        res["ways"][name] = {"times_s": times[name], "median_s": med, "ratio": med / base,
                             "padded_tokens": padded_tokens(order, args.batch_size)}
    print(report(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


def report(res: dict[str, Any]) -> str:
    lines = [
        machine_line(res),
        f"model {res['model']}; {res['data']}: {res['examples']} examples, {res['real_tokens']} tokens; "
        f"batch {res['batch_size']}; median of {len(next(iter(res['ways'].values()))['times_s'])} interleaved rounds",
        "",
        f"{'batches':<14}  {'seconds':>8}  {'x given':>7}  {'padded tokens':>13}  {'x real':>6}",
    ]
    for name, w in res["ways"].items():
        lines.append(f"{name:<14}  {w['median_s']:8.2f}  {w['ratio']:7.2f}  {w['padded_tokens']:13d}  "
                     f"{w['padded_tokens'] / res['real_tokens']:6.2f}")
    lines.append(f"\nsame predictions: {res['same_predictions']}/{res['examples']} examples; "
                 f"largest logit difference {res['max_abs_logit_diff']:.1e}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

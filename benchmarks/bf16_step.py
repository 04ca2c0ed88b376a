#!/usr/bin/env python
"""fp32 against bf16 autocast on the CPU, step by step: JT and MetaXL (exact) training steps of the
study's setting (frozen word embeddings, gated RTN after the last layer), one model, interleaved
rounds, each step timed by wall clock and by this thread's CPU time (``time.thread_time``: on a
shared machine the wall clock counts other processes' turns, the CPU time does not).

    OMP_NUM_THREADS=1 python benchmarks/bf16_step.py --threads 1 --rounds 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cost import machine_fields, machine_line  # noqa: E402

LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-DATE", "I-DATE"]


class _ConstSched:
    def step(self) -> None:
        pass


def batch(n: int, length: int, vocab: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A random NER batch of ``n`` sequences of ``length`` tokens (no padding).

    >>> b = batch(2, 5, 100, torch.Generator().manual_seed(0))
    >>> tuple(b["input_ids"].shape), tuple(b["labels"].shape)
    ((2, 5), (2, 5))
    """
    return {"input_ids": torch.randint(5, vocab, (n, length), generator=gen),
            "attention_mask": torch.ones(n, length, dtype=torch.long),
            "labels": torch.randint(0, len(LABELS), (n, length), generator=gen)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--methods", default="jt,metaxl")
    p.add_argument("--batch-size", type=int, default=10, help="source batch and target batch size")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="measured rounds (one step of every method and precision)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from metaxl.config import TrainConfig
    from metaxl.meta import Learner
    from metaxl.models import load_model
    from metaxl.precision import autocast_factory, describe_cpu
    from metaxl.rtn import RTNInjector

    torch.manual_seed(0)
    model = load_model(args.model, "ner", LABELS)
    model.get_input_embeddings().weight.requires_grad_(False)  # the study's freeze_embeddings
    model.train()
    vocab = model.get_input_embeddings().weight.shape[0]
    injector = RTNInjector(model, [-1], "gated", 192)
    learners = {}
    for method in args.methods.split(","):
        for precision in ("fp32", "bf16"):
            cfg = TrainConfig(method=method, lr=1e-4, meta_lr=1e-4, freeze_embeddings=True, precision=precision)
            opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=0.0)  # lr 0: weights fixed
            opt_phi = torch.optim.AdamW(injector.parameters(), lr=0.0) if method == "metaxl" else None
            learners[(method, precision)] = Learner(
                model, injector if method == "metaxl" else None, cfg, opt, _ConstSched(), opt_phi, _ConstSched(),
                autocast_factory(torch.device("cpu"), precision) if precision == "bf16" else contextlib.nullcontext)
    gen = torch.Generator().manual_seed(1)
    src = batch(args.batch_size, args.seq_len, vocab, gen)
    tgt = batch(args.batch_size, args.seq_len, vocab, gen)
    times: dict[str, dict[str, list[float]]] = {f"{m} {pr}": {"wall": [], "cpu": []} for m, pr in learners}
    for r in range(args.warmup + args.rounds):
        for (method, precision), learner in learners.items():
            wall, cpu = time.perf_counter(), time.thread_time()
            learner.step(src, 0, tgt)
            if r >= args.warmup:
                times[f"{method} {precision}"]["wall"].append(time.perf_counter() - wall)
                times[f"{method} {precision}"]["cpu"].append(time.thread_time() - cpu)
            print(f"round {r} {method} {precision}: {time.perf_counter() - wall:.1f} s", file=sys.stderr, flush=True)
    res: dict[str, Any] = {**machine_fields(torch.device("cpu")), "cpu": describe_cpu(), "args": vars(args),
                           "times": times}
    lines = [machine_line(res), f"{res['cpu']}; {args.model}, batch {args.batch_size} + {args.batch_size} x "
             f"{args.seq_len} tokens, frozen embeddings, median of {args.rounds} interleaved rounds", "",
             f"{'method':<8} {'fp32 cpu s':>10} {'bf16 cpu s':>10} {'cpu ratio':>9} {'fp32 wall s':>11} {'bf16 wall s':>11} {'wall ratio':>10}"]
    for method in args.methods.split(","):
        f, b = times[f"{method} fp32"], times[f"{method} bf16"]
        fc, bc = statistics.median(f["cpu"]), statistics.median(b["cpu"])
        fw, bw = statistics.median(f["wall"]), statistics.median(b["wall"])
        lines.append(f"{method:<8} {fc:10.2f} {bc:10.2f} {bc / fc:9.2f} {fw:11.2f} {bw:11.2f} {bw / fw:10.2f}")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()

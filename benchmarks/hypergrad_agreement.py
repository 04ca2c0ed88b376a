#!/usr/bin/env python
"""How close the finite-difference hypergradient is to the exact one, on real batches.

For one model and data set (the ablation's NusaX balinese <- indonesian by default), this takes
``--batches`` real training batches (source batch, target batch split in train and meta halves, as
``metaxl train`` does) and for each computes, at the same weights, the exact hypergradient
(``hypergrad: exact``) and the finite-difference one (``hypergrad: finite-difference``) of
``metaxl.meta.Learner``, three ways:

* ``eval``: dropout off (the two are then deterministic);
* ``train``: dropout on, as in training; the shifted forwards of finite differences replay the
  dropout masks of the forward that gave ``g`` (``metaxl.meta.replayed_rng``, the code since the fix);
* ``train-fresh-masks``: dropout on, each shifted forward drawing masks of its own: what the
  finite-difference mode computed before the fix (reproduced here by disabling the replay).

It prints, per RTN variant, the cosine between the two hypergradients and the ratio of their
norms (median, min and max over batches). For the plain RTN (paper eq. 1) both estimate the same
derivative; the gated RTN reads ``h.detach()`` (official code), so autograd's exact term is a
pseudo-gradient and finite differences estimate another quantity (docs/method.md).

    python benchmarks/hypergrad_agreement.py --batches 5 --threads 1   # ~10 min on this 2-core CPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cost import _ConstSched, machine_fields, machine_line, parse_with_machine_args  # noqa: E402

import metaxl.meta as meta_module  # noqa: E402
from metaxl.config import TrainConfig  # noqa: E402
from metaxl.meta import Learner, split_batch  # noqa: E402

WAYS = ("eval", "train", "train-fresh-masks")


@contextlib.contextmanager
def fresh_masks() -> Iterator[None]:
    """The finite-difference mode as it was before the fix: no replay of the dropout masks."""
    saved = meta_module.replayed_rng
    meta_module.replayed_rng = lambda state: contextlib.nullcontext()  # type: ignore[assignment]
    try:
        yield
    finally:
        meta_module.replayed_rng = saved


def flat(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.detach().reshape(-1).double() for g in grads])


def real_batches(cfg: TrainConfig, n_batches: int, seed: int) -> tuple[list[tuple[Any, Any]], int, list[str], str]:
    """``n_batches`` (source, target) feature lists, the tokenizer's pad id, the labels and the task."""
    from metaxl.models import load_tokenizer
    from metaxl.tasks import encode
    from metaxl.train import batches, prepare_data

    data = prepare_data(cfg)
    tokenizer = load_tokenizer(cfg.model)
    label2id = {label: i for i, label in enumerate(data.labels)}
    src = encode(data.task, data.sources[0], tokenizer, label2id, cfg.max_length)
    tgt = encode(data.task, data.target_train, tokenizer, label2id, cfg.max_length)
    gen = torch.Generator().manual_seed(seed)
    src_b = list(batches(src, cfg.batch_size, gen))
    tgt_b = list(batches(tgt, cfg.tgt_batch_size, gen))
    pairs = [(src_b[i % len(src_b)], tgt_b[i % len(tgt_b)]) for i in range(n_batches)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return pairs, pad, data.labels, data.task


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="model name or local checkpoint folder")
    ap.add_argument("--target", default="nusax:balinese")
    ap.add_argument("--source", default="nusax:indonesian")
    ap.add_argument("--task", default="auto")
    ap.add_argument("--sa-labels", default="binary")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--target-size", type=int, default=100)
    ap.add_argument("--source-size", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--rtn-layers", default="12", help="comma-separated, as metaxl train")
    ap.add_argument("--variants", default="gated,plain", help="RTN variants to compare")
    ap.add_argument("--inner-lr", type=float, default=1e-4, help="the virtual step's lr (a)")
    ap.add_argument("--fd-epsilon", type=float, default=0.01)
    ap.add_argument("--freeze-embeddings", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                    help="float64 takes rounding out of the finite differences")
    ap.add_argument("--ways", default=",".join(WAYS), help="which of: " + ", ".join(WAYS) + " (comma-separated)")
    ap.add_argument("--batches", type=int, default=5, help="real batches to compare on")
    ap.add_argument("--seed", type=int, default=1)
    args = parse_with_machine_args(ap, argv)

    from metaxl.models import load_model
    from metaxl.rtn import RTNInjector
    from metaxl.tasks import collate

    cfg = TrainConfig(target=args.target, source=[args.source], task=args.task, sa_labels=args.sa_labels,
                      data_dir=args.data_dir, target_size=args.target_size, source_size=args.source_size,
                      batch_size=args.batch_size, max_length=args.max_length, model=args.model, method="metaxl",
                      rtn_layers=[int(x) for x in args.rtn_layers.split(",")], inner_lr=args.inner_lr,
                      fd_epsilon=args.fd_epsilon, freeze_embeddings=args.freeze_embeddings, seed=args.seed)
    cfg.validate()
    ways = [w.strip() for w in args.ways.split(",")]
    if unknown := [w for w in ways if w not in WAYS]:
        raise SystemExit(f"--ways: unknown {unknown}; choose from {list(WAYS)}")
    device = torch.device(args.device)
    pairs, pad, labels, task = real_batches(cfg, args.batches, args.seed)
    machine = machine_fields(device)
    print(machine_line(machine))
    print(f"model {args.model}, {task} {args.target} <- {args.source}, {args.batches} real batches of "
          f"{args.batch_size} + {args.batch_size}, RTN after layer(s) {args.rtn_layers}, a = {args.inner_lr}, "
          f"fd_epsilon = {args.fd_epsilon}, {args.dtype}")
    out: dict[str, Any] = {"machine": machine, "args": vars(args), "variants": {}}
    t0 = time.time()
    for variant in args.variants.split(","):
        torch.manual_seed(args.seed)
        model = load_model(args.model, task, labels)
        if args.freeze_embeddings:
            model.get_input_embeddings().weight.requires_grad_(False)
        inj = RTNInjector(model, cfg.rtn_layers, variant, cfg.rtn_hidden, detach_input=cfg.rtn_detach)
        dtype = getattr(torch, args.dtype)
        model.to(device=device, dtype=dtype)
        inj.to(device=device, dtype=dtype)
        vcfg = cfg.replace(rtn_variant=variant)
        learner = Learner(model, inj, vcfg, torch.optim.SGD(model.parameters(), lr=0.0), _ConstSched(),
                          torch.optim.SGD(inj.parameters(), lr=0.0), _ConstSched())
        rows: dict[str, dict[str, list[float]]] = {w: {"cos": [], "norm_ratio": []} for w in ways}
        for i, (src_f, tgt_f) in enumerate(pairs):
            src = {k: v.to(device) for k, v in collate(src_f, pad).items()}
            tgt_full = {k: v.to(device) for k, v in collate(tgt_f, pad).items()}
            tgt, meta = split_batch(tgt_full)
            for way in ways:
                model.train(way != "eval")
                grads = {}
                for mode in ("exact", "finite-difference"):
                    vcfg.hypergrad = mode
                    torch.manual_seed(1000 + i)  # both modes: the same dropout masks up to g's forward
                    with fresh_masks() if (way == "train-fresh-masks" and mode != "exact") else contextlib.nullcontext():
                        grads[mode] = flat(learner.hypergradient(src, 0, tgt, meta)[0])
                ex, fd = grads["exact"], grads["finite-difference"]
                rows[way]["cos"].append(float(torch.nn.functional.cosine_similarity(ex, fd, dim=0)))
                rows[way]["norm_ratio"].append(float(fd.norm() / ex.norm().clamp_min(1e-30)))
            print(f"  {variant}: batch {i + 1}/{len(pairs)} done [{time.time() - t0:.0f}s]", flush=True)
        out["variants"][variant] = rows
    print()
    print("cosine(FD, exact) and |FD| / |exact|, median [min, max] over batches")
    header = f"{'RTN':<6}  {'way':<18}  {'cosine':<24}  {'norm ratio':<24}"
    print(header)
    print("-" * len(header))
    for variant, rows in out["variants"].items():
        for way, r in rows.items():
            def cell(xs: list[float]) -> str:
                return f"{statistics.median(xs):6.3f} [{min(xs):6.3f}, {max(xs):6.3f}]"
            print(f"{variant:<6}  {way:<18}  {cell(r['cos']):<24}  {cell(r['norm_ratio']):<24}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()

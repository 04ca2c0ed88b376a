#!/usr/bin/env python
"""The planted-shift check on a real encoder (issue 29 item 3; tests/test_planted_shift.py is the
tiny-model version).

Source batches are distorted right after the RTN's layer by a known orthogonal map ``M`` (a
reflection of ``--flip`` of the d dimensions, :func:`metaxl.planted.reflection`), under every
method; target batches and evaluation are not. Then JT, MetaXL and MetaXL with meta lr 0 (no
meta-learning) are trained with the same settings, and the script prints, per method and seed, the
best dev F1, its test F1 and how far the composed map ``RTN(M h)`` still is from the identity on the
dev set's token vectors (mean cosine distance; ``M h`` alone for JT).

If the meta-gradient does its job, MetaXL's distance falls well below the shift's and its F1 ends
above JT's; MetaXL with meta lr 0 does neither.

    python benchmarks/planted_shift.py --target masakhaner2:yor --source masakhaner2:en --seeds 1 \\
        --out runs/planted                        # e5-small, the tuning setting: ~1.5 h on 1 CPU core
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from metaxl.config import TrainConfig
from metaxl.planted import PlantedShift, reflection
from metaxl.rtn import encoder_parts, hidden_size
from metaxl.train import prepare_data, train

REPO = Path(__file__).resolve().parents[1]
METHODS = {
    "jt": {"method": "jt"},
    "metaxl": {"method": "metaxl"},
    "metaxl-lr0": {"method": "metaxl", "meta_lr": 0.0},
}
NEW = {"rtn_init": "identity", "meta_batch": "separate", "hypergrad_scale": "inverse-lr", "inner_lr_per_group": True}


def base_config(args: argparse.Namespace) -> dict[str, Any]:
    cfg = TrainConfig.from_yaml(args.config).to_dict() if args.config else {}
    cfg.update(target=args.target, source=[args.source], model=args.model, epochs=args.epochs, progress=False,
               meta_lr=args.meta_lr, **NEW)
    if args.dev_size:
        cfg["dev_size"] = args.dev_size
    return cfg


def dev_vectors(cfg: TrainConfig, model: Any, layer: int, n: int = 32) -> torch.Tensor:
    """The token vectors after ``layer`` of the first ``n`` dev sentences (eval mode, no shift)."""
    from metaxl.models import load_tokenizer
    from metaxl.tasks import collate, encode

    data = prepare_data(cfg)
    tok = load_tokenizer(cfg.model)
    feats = encode(data.task, data.dev[:n], tok, {lab: i for i, lab in enumerate(data.labels)}, cfg.max_length)
    batch = collate(feats, tok.pad_token_id or 0)
    batch.pop("labels", None)
    model.eval()
    with torch.no_grad():
        device = next(model.parameters()).device
        out = model(**{k: v.to(device) for k, v in batch.items()}, output_hidden_states=True)
    return out.hidden_states[layer][batch["attention_mask"].bool().to(device)]


def one_run(cfg: TrainConfig, flip: int, seed: int) -> dict[str, Any]:
    state: dict[str, Any] = {}

    def on_setup(model: Any, learner: Any) -> None:
        layer = len(encoder_parts(model)[1])  # the RTN's layer: the last (cfg.rtn_layers [12] / [-1])
        shift = PlantedShift(model, layer, reflection(hidden_size(model), flip, seed=seed))
        shift.install(learner)
        state.update(model=model, learner=learner, shift=shift)

    results = train(cfg, resume=False, log=lambda *a, **k: print(*a, **k, flush=True), on_setup=on_setup)
    shift, model = state["shift"], state["model"]
    h = dev_vectors(cfg, model, shift.layer)
    return {"dev_f1": results["dev"]["f1"], "test_f1": results["test"]["f1"],
            "distance_shift": shift.distance(None, h), "distance": shift.distance(state["learner"].injector, h),
            "rtn": results["epochs"][-1].get("rtn")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "examples/tuning/ner_base.yaml"),
                   help="TrainConfig YAML of the shared settings (default: the issue-29 tuning setting)")
    p.add_argument("--target", default="masakhaner2:yor")
    p.add_argument("--source", default="masakhaner2:en")
    p.add_argument("--model", default="default")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--dev-size", type=int, default=None)
    p.add_argument("--meta-lr", type=float, default=1e-3)
    p.add_argument("--flip", type=int, default=None, help="dimensions reflected (default: half of d)")
    p.add_argument("--seeds", default="1")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--out", default="runs/planted")
    args = p.parse_args(argv)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in args.methods.split(","):
            if name not in METHODS:
                p.error(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
            cfg = TrainConfig.from_dict({**base_config(args), **METHODS[name], "seed": seed,
                                         "output_dir": str(Path(args.out) / f"{name}-seed{seed}")})
            flip = args.flip
            if flip is None:
                from metaxl.models import load_model

                flip = hidden_size(load_model(cfg.model, "ner", ["O"])) // 2
            row = {"method": name, "seed": seed, **one_run(cfg, flip, seed)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nplanted shift: {args.target} <- {args.source}, reflection of {flip} dimensions after the last layer")
    print("| method | seed | dev F1 | test F1 | distance of M | distance of RTN(M) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['seed']} | {r['dev_f1']:.2f} | {r['test_f1']:.2f} | {r['distance_shift']:.3f} "
              f"| {r['distance']:.3f} |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "planted_shift.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

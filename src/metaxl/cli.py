"""The ``metaxl`` command line.

``metaxl train`` mirrors :class:`metaxl.config.TrainConfig`: every field is a flag
(``source_size`` -> ``--source-size``), a YAML file given with ``--config`` sets defaults, and
flags override it.

    metaxl train --target masakhaner2:luo --source masakhaner2:en --method metaxl --epochs 5
    metaxl evaluate runs/luo/checkpoint masakhaner2:luo --split test
    echo "Raila Odinga nodhi Kisumu" | metaxl predict runs/luo/checkpoint
    metaxl demo
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

from .config import TrainConfig, parse_list
from .errors import ConfigError, MetaXLError

_TYPES = {"str": str, "int": int, "float": float}


def _flag_type(type_name: str) -> tuple[Any, dict[str, Any]]:
    base = type_name.replace(" | None", "").strip()
    if base == "bool":
        return None, {"action": argparse.BooleanOptionalAction}
    if base == "list[str]":
        return parse_list, {"metavar": "A,B"}
    if base == "list[int]":
        return lambda s: [int(x) for x in parse_list(s)], {"metavar": "I,J"}
    if base in _TYPES:
        kind = _TYPES[base]
        if type_name.endswith("| None"):
            return (lambda s, kind=kind: None if s.lower() in ("none", "all") else kind(s)), {}
        return kind, {}
    raise TypeError(f"no CLI type for {type_name}")


def _field_docs() -> dict[str, str]:
    """Field docstrings (the string literal under each field) for --help."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    try:
        tree = ast.parse(inspect.getsource(TrainConfig))
    except (OSError, TypeError):
        return docs
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            value = getattr(nxt, "value", None)
            if isinstance(nxt, ast.Expr) and isinstance(value, ast.Constant):
                docs[node.target.id] = str(value.value)
    return docs


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, defaulting to 'not given' so YAML values survive."""
    docs = _field_docs()
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        conv, extra = _flag_type(str(f.type))
        default = getattr(defaults, f.name)
        help_text = f"{docs.get(f.name, '')} (default: {default})".strip()
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text, **extra}
        if conv is not None:
            kwargs["type"] = conv
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    data: dict[str, Any] = {}
    if getattr(args, "config", None):
        data = TrainConfig.from_yaml(args.config).to_dict()
    names = set(TrainConfig.field_names())
    data.update({k: v for k, v in vars(args).items() if k in names})
    cfg = TrainConfig.from_dict(data)
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace) -> int:
    from .distributed import cleanup, is_main
    from .train import train

    cfg = config_from_args(args)
    if args.print_config:
        if is_main():
            print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    try:
        results = train(cfg, resume=args.resume)
    finally:
        cleanup()  # destroys the process group of a torchrun/accelerate launch (no-op otherwise)
    if not is_main():
        return 0
    test = results["test"] or {}
    print(f"best epoch {results['best_epoch']}: dev {results['dev']['f1']:.2f}  test {test.get('f1', float('nan')):.2f}"
          f"  ({test.get('headline', 'f1')})")
    print(f"results: {cfg.output_dir}/results.json")
    if results.get("checkpoint"):
        print(f"checkpoint: {cfg.output_dir}/{results['checkpoint']}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .data import resolve_dataset
    from .tasks import check_labels, encode
    from .train import evaluate, resolve_device

    device = resolve_device(args.device)
    loaded = load_checkpoint(args.checkpoint, str(device))
    sa_labels = args.sa_labels or loaded.meta.get("config", {}).get("sa_labels", "binary")
    corpus = resolve_dataset(args.data, args.data_dir, task=loaded.task, sa_labels=sa_labels)
    examples = corpus.load(args.split)
    check_labels(examples, loaded.labels, f"{args.data} {args.split}")
    label2id = {label: i for i, label in enumerate(loaded.labels)}
    feats = encode(loaded.task, examples, loaded.tokenizer, label2id, loaded.max_length)
    pad = loaded.tokenizer.pad_token_id or 0
    metrics, _ = evaluate(loaded.model, loaded.task, examples, feats, loaded.labels, pad, args.batch_size, device)
    if args.output:
        from pathlib import Path

        Path(args.output).write_text(json.dumps(metrics, indent=2))
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(f"{args.data} {args.split}: {len(examples)} examples")
        for key in ("f1", "precision", "recall", "accuracy", "macro_f1"):
            if key in metrics:
                print(f"  {key:<10} {metrics[key]:6.2f}")
        print(f"  headline: {metrics.get('headline', 'f1')}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .predict import predict_lines
    from .train import resolve_device

    device = resolve_device(args.device)
    loaded = load_checkpoint(args.checkpoint, str(device))
    if args.input in (None, "-"):
        lines = sys.stdin.read().splitlines()
    else:
        from pathlib import Path

        path = Path(args.input)
        if not path.is_file():
            raise MetaXLError(f"input file not found: {path}")
        lines = path.read_text(encoding="utf-8").splitlines()
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise MetaXLError("no input text: give --input FILE or pipe lines on stdin (one sentence per line)")
    for out in predict_lines(loaded, lines, device=device, batch_size=args.batch_size):
        if args.format == "json":
            print(json.dumps(out, ensure_ascii=False))
        elif loaded.task == "ner":
            print("\n".join(f"{tok}\t{tag}" for tok, tag in zip(out["tokens"], out["tags"], strict=True)))
            print()
        else:
            print(f"{out['label']}\t{out['probability']:.4f}\t{out['text']}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="metaxl", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"metaxl {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors too")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train target-only, JT, JT+RTN or MetaXL",
                       description="Train one model. Flags override the --config YAML file.")
    p.add_argument("--config", help="YAML file of TrainConfig keys")
    p.add_argument("--resume", action="store_true",
                   help="save the training state each epoch and continue an interrupted run in --output-dir")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    add_config_flags(p)
    p.add_argument("--fp16", dest="precision", action="store_const", const="fp16", default=argparse.SUPPRESS,
                   help="same as --precision fp16 (CUDA)")
    p.add_argument("--bf16", dest="precision", action="store_const", const="bf16", default=argparse.SUPPRESS,
                   help="same as --precision bf16 (CUDA, or a CPU with bf16 instructions: avx512_bf16, amx_bf16)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a checkpoint on a data set")
    p.add_argument("checkpoint")
    p.add_argument("data", help="data set name (masakhaner2:luo, nusax:balinese) or folder")
    p.add_argument("--split", default="test", choices=["train", "dev", "test"])
    p.add_argument("--data-dir")
    p.add_argument("--sa-labels", choices=["binary", "3way", "all"], help="default: as in training")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print all metrics as JSON")
    p.add_argument("--output", help="also write the metrics to this JSON file")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="tag / classify raw text (one sentence per line)")
    p.add_argument("checkpoint")
    p.add_argument("--input", "-i", help="text file (default: stdin)")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=cmd_predict)

    from .demo import register_cli as register_demo

    register_demo(sub)
    for module in ("e5", "sweep", "report", "analysis", "datainfo"):
        __import__(f"metaxl.{module}", fromlist=["register_cli"]).register_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except MetaXLError as err:
        if args.debug:
            raise
        print(f"metaxl: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("metaxl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into head & co., which stopped reading: not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


__all__ = ["main", "build_parser", "add_config_flags", "config_from_args", "ConfigError"]

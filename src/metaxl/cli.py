"""The ``metaxl`` command line.

``metaxl train`` mirrors :class:`metaxl.config.TrainConfig`: every field is a flag
(``source_size`` -> ``--source-size``), a YAML file given with ``--config`` sets defaults, and
flags override it.

    metaxl train --target masakhaner2:luo --source masakhaner2:en --method metaxl --epochs 5
    metaxl evaluate runs/luo/checkpoint masakhaner2:luo --split test
    echo "Raila Odinga nodhi Kisumu" | metaxl predict runs/luo/checkpoint
    metaxl demo
    metaxl data download masakhaner2:wol nusax
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from .config import CHOICES, TrainConfig, parse_list
from .errors import ConfigError, MetaXLError
from .reporting import REPORT_TO

_TYPES = {"str": str, "int": int, "float": float}
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")


def device_arg(text: str) -> str:
    """argparse type of ``--device``: auto, cpu, cuda, cuda:N, mps (xpu, xpu:N).

    >>> device_arg("cuda:1")
    'cuda:1'
    >>> device_arg("gpu")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: invalid device 'gpu': choose auto, cpu, cuda, cuda:N (cuda:1) or mps
    """
    if not DEVICE_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"invalid device {text!r}: choose auto, cpu, cuda, cuda:N (cuda:1) or mps")
    return text


def _report_to_arg(text: str) -> list[str]:
    values = [] if text.lower() == "none" else parse_list(text)
    bad = [v for v in values if v not in REPORT_TO]
    if bad:
        raise argparse.ArgumentTypeError(f"invalid choice: {bad[0]!r} (choose from {', '.join(REPORT_TO)}, none)")
    return values


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that reads ``-1e-4`` and ``-.5`` as values, not flags (``--lr -1e-4`` then
    reaches validation, which names the problem, instead of "expected one argument").

    >>> p = Parser(); _ = p.add_argument("--lr", type=float); p.parse_args(["--lr", "-1e-4"]).lr
    -0.0001
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message: str) -> NoReturn:
        """A bad command line: one ``metaxl: error:`` line, as every other user error, saying where
        the options are listed (argparse's own form is a usage block and ``metaxl train: error:``)."""
        self.exit(2, f"metaxl: error: {message}; use '{self.prog} --help' for the options\n")


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
        if f.name in CHOICES:
            kwargs["choices"] = CHOICES[f.name]
        if f.name == "report_to":
            kwargs.update(type=_report_to_arg, metavar="{" + ",".join(REPORT_TO) + "}")
        if f.name == "device":
            kwargs.update(type=device_arg, metavar="{auto,cpu,cuda,cuda:N,mps}")
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    data: dict[str, Any] = {}
    if getattr(args, "config", None):
        data = TrainConfig.from_yaml(args.config).to_dict()
    names = set(TrainConfig.field_names())
    data.update({k: v for k, v in vars(args).items() if k in names})
    cfg = TrainConfig.from_dict(data)
    try:
        cfg.validate()
    except ConfigError as err:
        raise ConfigError(_with_fix(str(err), getattr(args, "config", None))) from None
    return cfg


def _with_fix(message: str, config: str | None) -> str:
    """A config value's error, with where to change it (the flag, or the key of the YAML file).

    >>> _with_fix("epochs must be >= 1, got 0", "c.yaml")
    'epochs must be >= 1, got 0; set --epochs (or epochs: in c.yaml)'
    """
    key = message.split()[0].split("=")[0] if message else ""
    if key not in TrainConfig.field_names() or " --" in message:
        return message
    flag = "--" + key.replace("_", "-")
    return f"{message}; set {flag}" + (f" (or {key}: in {config})" if config else "")


# ---------------------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace) -> int:
    from . import reporting
    from .distributed import cleanup, is_main
    from .train import train

    cfg = config_from_args(args)
    if args.print_config:
        if is_main():
            print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    try:
        results = train(cfg, resume=args.resume, log=reporting.info)
    finally:
        cleanup()  # destroys the process group of a torchrun/accelerate launch (no-op otherwise)
    if not is_main():
        return 0
    test = results["test"] or {}
    print(f"best epoch {results['best_epoch']}: dev {results['dev']['f1']:.2f}  test {test.get('f1', float('nan')):.2f}"
          f"  ({test.get('headline', 'f1')})")
    if cfg.output_dir is None:
        print("no output folder (--output-dir none): nothing was written")
        return 0
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
    from pathlib import Path

    from .guards import check_loaded_model, truncation_warning, write_json_atomic

    if args.output and Path(args.output).is_dir():
        raise MetaXLError(f"--output {args.output} is a folder; give a file name such as {Path(args.output) / 'metrics.json'}")
    check_loaded_model(loaded, args.checkpoint)
    if (note := truncation_warning(loaded.task, feats, loaded.max_length, f"{args.data} {args.split}")):
        print(note, file=sys.stderr)
    metrics, _ = evaluate(loaded.model, loaded.task, examples, feats, loaded.labels, pad, args.batch_size, device)
    if args.output:
        write_json_atomic(Path(args.output), metrics, "the metrics")
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
    from .guards import check_loaded_model, decode_input

    check_loaded_model(loaded, args.checkpoint)
    if args.input in (None, "-"):
        lines = decode_input(sys.stdin.buffer.read(), "standard input").splitlines()
    else:
        from pathlib import Path

        path = Path(args.input)
        if not path.is_file():
            if path.is_dir():
                raise MetaXLError(f"--input {path} is a folder; give a text file with one sentence per line")
            raise MetaXLError(f"input file not found: {path}; check the path (or pipe the text on stdin)")
        lines = decode_input(path.read_bytes(), str(path)).splitlines()
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

    parser = Parser(prog="metaxl", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"metaxl {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors too")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug logging (logger 'metaxl')")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
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
    p.add_argument("--sa-labels", choices=CHOICES["sa_labels"], help="default: as in training")
    p.add_argument("--device", default="auto", type=device_arg, help="auto, cpu, cuda, cuda:N, mps (default: auto)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print all metrics as JSON")
    p.add_argument("--output", help="also write the metrics to this JSON file")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="tag / classify raw text (one sentence per line)")
    p.add_argument("checkpoint")
    p.add_argument("--input", "-i", help="text file (default: stdin)")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.add_argument("--device", default="auto", type=device_arg, help="auto, cpu, cuda, cuda:N, mps (default: auto)")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=cmd_predict)

    from .demo import register_cli as register_demo

    register_demo(sub)
    for module in ("e5", "sweep", "report", "analysis", "datainfo", "download"):
        __import__(f"metaxl.{module}", fromlist=["register_cli"]).register_cli(sub)
    return parser


def pipe_safe_print(*args: Any, **kwargs: Any) -> None:
    """``print`` that survives a closed pipe (``metaxl train ... | head -1``): later lines go to
    /dev/null and the run goes on to the end, so results.json is finished, not left "running"."""
    import os

    try:
        print(*args, **kwargs)
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def negative_values(argv: Sequence[str]) -> list[str]:
    """``--lr -1e-4`` -> ``--lr=-1e-4``: argparse takes a negative number in exponent notation for
    an option and fails with "expected one argument" instead of the value's own check.

    >>> negative_values(["train", "--lr", "-1e-4", "--epochs", "-2", "--no-progress"])
    ['train', '--lr=-1e-4', '--epochs=-2', '--no-progress']
    """
    out: list[str] = []
    for tok in argv:
        prev = out[-1] if out else ""
        if tok.startswith("-") and prev.startswith("--") and "=" not in prev and _is_number(tok):
            out[-1] = f"{prev}={tok}"
        else:
            out.append(tok)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    from .download import route_argv

    parser = build_parser()
    # `data download` -> its parser; `--lr -1e-4` -> `--lr=-1e-4`
    args = parser.parse_args(negative_values(route_argv(sys.argv[1:] if argv is None else list(argv))))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .reporting import configure_logging

    configure_logging(args.verbose, args.quiet)
    try:
        return int(args.func(args) or 0)
    except MetaXLError as err:
        if args.debug:
            raise
        print(f"metaxl: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("metaxl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into head & co., which stopped reading: not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:  # a file system refusing a write or read the checks did not foresee
        if args.debug:
            raise
        where = f"{err.filename}: " if err.filename else ""
        print(f"metaxl: error: {where}{err.strerror or err}; check the path, its permissions and free space",
              file=sys.stderr)
        return 1


__all__ = ["main", "build_parser", "add_config_flags", "config_from_args", "ConfigError"]

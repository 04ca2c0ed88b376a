"""The demo's data, shipped with the package: the sentences ``metaxl demo`` samples, nothing more.

``metaxl demo`` trains on 100 Luo sentences of MasakhaNER 2.0, evaluates on 200 dev and 500 test
sentences, with 150 English (CoNLL-2003) source sentences. Those subsets sit in
``metaxl/demo_data/masakhaner2/{luo,en}/`` (with the corpus licence, CC BY-NC 4.0, and
attribution), so the demo runs where no data folder holds MasakhaNER 2.0:
:func:`metaxl.data.resolve_dataset` falls back to them, with a one-line notice, when a name is
found in no data folder. As the demo's sizes equal the subsets' sizes, its sampling keeps every
sentence in its order, and the demo's results are those on the full corpus.

The files are written by the demo's own data preparation (:func:`metaxl.train.prepare_data` on
the demo's config), from a folder holding the full corpus::

    python -m metaxl.demo_subsets --data-dir ../shared/data      # rewrites src/metaxl/demo_data

>>> sorted(str(p.relative_to(DEMO_DATA_DIR)) for p in DEMO_DATA_DIR.rglob("*.txt"))
['masakhaner2/en/train.txt', 'masakhaner2/luo/dev.txt', 'masakhaner2/luo/test.txt', 'masakhaner2/luo/train.txt']
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .data import NERExample

DEMO_DATA_DIR = Path(__file__).resolve().parent / "demo_data"
"""The packaged demo data: a data folder (``masakhaner2/<lang>/<split>.txt``)."""

__all__ = ["DEMO_DATA_DIR", "format_conll", "write_demo_subsets", "main"]


def format_conll(examples: Sequence[NERExample]) -> str:
    """``token TAG`` lines, a blank line after each sentence (what :func:`~metaxl.data.read_conll` reads).

    >>> print(format_conll([NERExample(("Kisumu", "en"), ("B-LOC", "O"))]), end="")
    Kisumu B-LOC
    en O
    <BLANKLINE>
    """
    lines: list[str] = []
    for ex in examples:
        for token, tag in zip(ex.tokens, ex.tags, strict=True):
            if not token or any(c in " \t\r\n" for c in token):
                raise ValueError(f"token {token!r} cannot be written as a 'token TAG' line")
            lines.append(f"{token} {tag}")
        lines.append("")
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_demo_subsets(data_dir: str | Path | None, out: str | Path = DEMO_DATA_DIR) -> dict[str, int]:
    """Write the demo's subsets, drawn from the full corpus in ``data_dir``, under ``out``.

    Returns the number of sentences written per file (relative path -> count).
    """
    from .demo import demo_args, demo_config
    from .train import prepare_data

    args = demo_args(["--data-dir", str(data_dir)] if data_dir is not None else [])
    data = prepare_data(demo_config(args, "jt"))  # jt: the target's and the source's samples
    target_lang = args.target.partition(":")[2]
    source_lang = args.source.partition(":")[2]
    if not (args.target.startswith("masakhaner2:") and args.source.startswith("masakhaner2:")):
        raise ValueError("the demo's data sets are expected to be MasakhaNER 2.0 names")
    parts = {
        f"masakhaner2/{target_lang}/train.txt": data.target_train,
        f"masakhaner2/{target_lang}/dev.txt": data.dev,
        f"masakhaner2/{target_lang}/test.txt": data.test,
        f"masakhaner2/{source_lang}/train.txt": data.sources[0],
    }
    for rel, examples in parts.items():
        _write_atomic(Path(out) / rel, format_conll(examples))  # type: ignore[arg-type]
    return {rel: len(examples) for rel, examples in parts.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m metaxl.demo_subsets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="data folder with the full masakhaner2/ corpus")
    parser.add_argument("--out", default=str(DEMO_DATA_DIR), help="where to write (default: %(default)s)")
    args = parser.parse_args(argv)
    for rel, n in write_demo_subsets(args.data_dir, args.out).items():
        print(f"{n:5d} sentences  {Path(args.out) / rel}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

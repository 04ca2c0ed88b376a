"""``metaxl data``: what a data set holds, to choose a source language and to spot bad data before
training on it.

For each data set and split: the number of examples and words per example; for NER the entity
mentions per sentence, the share of sentences with at least one entity and the entity types; for
sentiment the labels. With a tokenizer also the sub-words per word (fertility: how well the
encoder's vocabulary covers the language) and the share of unknown tokens. ``examples`` draws a few
training examples to read, entities in brackets.

    metaxl data masakhaner2:en masakhaner2:fr masakhaner2:bam --tokenizer default --examples 3
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .data import SPLITS, NERExample, SAExample, resolve_dataset
from .errors import ConfigError, DataError

EXAMPLE_WIDTH = 160
"""Examples longer than this are cut in the text output (not in --json)."""

__all__ = ["SplitStats", "split_stats", "format_stats", "format_example", "register_cli"]


@dataclass
class SplitStats:
    """Counts for one split of one data set (see :func:`split_stats`)."""

    name: str
    split: str
    task: str
    examples: int
    words: int
    mentions: int = 0
    """NER: entity mentions (spans as seqeval, and so the F1 metric, counts them)."""
    with_entity: int = 0
    """NER: sentences with at least one entity."""
    types: dict[str, int] = field(default_factory=dict)
    """NER: mentions per entity type."""
    labels: dict[str, int] = field(default_factory=dict)
    """Sentiment: examples per label."""
    subwords: int | None = None
    """With a tokenizer: sub-word tokens of all the words (no special tokens, no truncation)."""
    unknown: int | None = None
    """With a tokenizer: how many of those are the unknown token."""

    @property
    def words_per_example(self) -> float:
        return self.words / self.examples if self.examples else float("nan")

    @property
    def mentions_per_example(self) -> float:
        return self.mentions / self.examples if self.examples else float("nan")

    @property
    def with_entity_share(self) -> float:
        return self.with_entity / self.examples if self.examples else float("nan")

    @property
    def subwords_per_word(self) -> float | None:
        return None if self.subwords is None or not self.words else self.subwords / self.words

    @property
    def unknown_share(self) -> float | None:
        return None if self.unknown is None or not self.subwords else self.unknown / self.subwords

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("words_per_example", "mentions_per_example", "with_entity_share", "subwords_per_word",
                  "unknown_share"):
            d[k] = getattr(self, k)
        if self.task != "ner":
            for k in ("mentions", "with_entity", "types", "mentions_per_example", "with_entity_share"):
                d.pop(k)
        else:
            d.pop("labels")
        return d


def _count_subwords(tokenizer: Any, task: str, examples: Sequence[Any], chunk: int = 512) -> tuple[int, int]:
    unk = getattr(tokenizer, "unk_token_id", None)
    total = unknown = 0
    for start in range(0, len(examples), chunk):
        part = examples[start : start + chunk]
        if task == "ner":
            words = [list(e.tokens) for e in part if e.tokens]
            ids = tokenizer(words, is_split_into_words=True, add_special_tokens=False)["input_ids"] if words else []
        else:
            ids = tokenizer([e.text for e in part], add_special_tokens=False)["input_ids"]
        for row in ids:
            total += len(row)
            if unk is not None:
                unknown += sum(1 for t in row if t == unk)
    return total, unknown


def split_stats(
    examples: Sequence[NERExample] | Sequence[SAExample],
    name: str = "",
    split: str = "train",
    tokenizer: Any = None,
) -> SplitStats:
    """Count what one split holds.

    >>> s = split_stats([NERExample(("Amina", "Otieno", "went", "to", "Kisumu"),
    ...                             ("B-PER", "I-PER", "O", "O", "B-LOC")),
    ...                  NERExample(("ok",), ("O",))], "toy")
    >>> (s.examples, s.words, s.mentions, s.with_entity, s.types)
    (2, 6, 2, 1, {'LOC': 1, 'PER': 1})
    >>> split_stats([SAExample("so good", "positive"), SAExample("bad", "negative")]).labels
    {'negative': 1, 'positive': 1}
    """
    from seqeval.metrics.sequence_labeling import get_entities  # the spans the F1 metric counts

    task = "ner" if examples and isinstance(examples[0], NERExample) else "sa"
    s = SplitStats(name, split, task, len(examples), 0)
    types: Counter[str] = Counter()
    labels: Counter[str] = Counter()
    for e in examples:
        if isinstance(e, NERExample):
            s.words += len(e.tokens)
            found = [kind for kind, _, _ in get_entities(list(e.tags))]
            s.mentions += len(found)
            s.with_entity += bool(found)
            types.update(found)
        else:
            s.words += len(e.text.split())
            labels[e.label] += 1
    s.types = dict(sorted(types.items()))
    s.labels = dict(sorted(labels.items()))
    if tokenizer is not None:
        s.subwords, s.unknown = _count_subwords(tokenizer, task, examples)
    return s


def _shares(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    if not total:
        return "-"
    return " ".join(f"{k} {100 * v / total:.0f}%" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def format_stats(rows: Sequence[SplitStats]) -> str:
    """A fixed-width table, one line per data set and split.

    >>> print(format_stats([split_stats([SAExample("so good", "positive")], "toy")]))
    data set  split  examples  words/ex  entities/ex  with entity  entity types / labels
    toy       train         1       2.0            -            -  positive 100%
    """
    with_tok = any(r.subwords is not None for r in rows)
    header = ["data set", "split", "examples", "words/ex", "entities/ex", "with entity"]
    if with_tok:
        header += ["subwords/word", "unk"]
    header.append("entity types / labels")
    table: list[list[str]] = [header]
    for r in rows:
        ner = r.task == "ner"
        line = [
            r.name,
            r.split,
            str(r.examples),
            f"{r.words_per_example:.1f}",
            f"{r.mentions_per_example:.2f}" if ner else "-",
            f"{100 * r.with_entity_share:.1f}%" if ner else "-",
        ]
        if with_tok:
            spw, unk = r.subwords_per_word, r.unknown_share
            line += ["-" if spw is None else f"{spw:.2f}", "-" if unk is None else f"{100 * unk:.2f}%"]
        line.append(_shares(r.types if ner else r.labels))
        table.append(line)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    out = []
    for row in table:
        cells = [
            c.ljust(w) if i in (0, 1) or i == len(row) - 1 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def format_example(example: NERExample | SAExample) -> str:
    """One example to read: entity spans in brackets with their type; a label before a text.

    >>> format_example(NERExample(("Amina", "Otieno", "went", "to", "Kisumu"), ("B-PER", "I-PER", "O", "O", "B-LOC")))
    '[Amina Otieno|PER] went to [Kisumu|LOC]'
    >>> format_example(SAExample("so good", "positive"))
    'positive: so good'
    """
    if isinstance(example, SAExample):
        return f"{example.label}: {example.text}"
    from seqeval.metrics.sequence_labeling import get_entities  # the spans the F1 metric counts

    spans = {start: (end, kind) for kind, start, end in get_entities(list(example.tags))}
    parts: list[str] = []
    i = 0
    while i < len(example.tokens):
        if i in spans:
            end, kind = spans[i]
            parts.append(f"[{' '.join(example.tokens[i : end + 1])}|{kind}]")
            i = end + 1
        else:
            parts.append(example.tokens[i])
            i += 1
    return " ".join(parts)


# ---------------------------------------------------------------------------- CLI
def _parse_splits(value: str) -> list[str]:
    splits = [s.strip() for s in value.split(",") if s.strip()]
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise ConfigError(f"--splits {value!r}: use a comma list of {', '.join(SPLITS)}")
    return splits


def cmd_data(args: argparse.Namespace) -> int:
    splits = _parse_splits(args.splits)
    if args.examples < 0:
        raise ConfigError(f"--examples must be >= 0, got {args.examples}")
    tokenizer = None
    if args.tokenizer:
        from .models import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    rows: list[SplitStats] = []
    notes: list[str] = []
    samples: list[tuple[str, list[str]]] = []
    for spec in args.data:
        corpus = resolve_dataset(spec, args.data_dir, task=args.task, sa_labels=args.sa_labels)
        found = 0
        missing: list[str] = []
        for split in splits:
            try:
                examples = corpus.load(split)
            except DataError as err:
                missing.append(f"{spec}: no {split} split ({err})")
                continue
            found += 1
            rows.append(split_stats(examples, spec, split, tokenizer))
            if args.examples and found == 1:  # examples of the first split that could be read
                rng = random.Random(args.seed)
                picked = sorted(rng.sample(range(len(examples)), min(args.examples, len(examples))))
                samples.append((f"{spec} ({split}, {len(picked)} of {len(examples)}, seed {args.seed})",
                                [format_example(examples[i]) for i in picked]))
        if not found:
            raise DataError(f"{spec}: none of the splits {', '.join(splits)} could be read: " + "; ".join(missing))
        notes += missing
    if args.json:
        print(json.dumps({"splits": [r.to_dict() for r in rows],
                          "examples": {k: v for k, v in samples}, "notes": notes}, indent=2, ensure_ascii=False))
        return 0
    print(format_stats(rows))
    for note in notes:
        print(f"note: {note}")
    for title, lines in samples:
        print(f"\n{title}:")
        for line in lines:
            print(f"  {line if len(line) <= EXAMPLE_WIDTH else line[: EXAMPLE_WIDTH - 1] + '…'}")
    return 0


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "data",
        help="what a data set holds: sizes, entities or labels, tokenizer coverage, examples",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="To fetch MasakhaNER 2.0 or NusaX-Senti: metaxl data download NAME... (see metaxl data download --help)",
    )
    p.add_argument("data", nargs="+", help="data set names (masakhaner2:fr, nusax:balinese), folders or files")
    p.add_argument("--splits", default="train,dev,test", help="comma list of train, dev, test (default: all three)")
    p.add_argument("--data-dir", help="folder of local data sets (searched before $METAXL_DATA, ./data, ../shared/data)")
    p.add_argument("--task", choices=["auto", "ner", "sa"], default="auto")
    p.add_argument("--sa-labels", choices=["binary", "3way", "all"], default="all",
                   help="sentiment label scheme (default: all, every label as it is)")
    p.add_argument("--tokenizer", help="also count sub-words per word and unknown tokens with this model's "
                   "tokenizer: default (the offline encoder), a checkpoint folder or a hub name")
    p.add_argument("--examples", type=int, default=0, metavar="K",
                   help="print K random examples of the first split read, entities in brackets")
    p.add_argument("--seed", type=int, default=0, help="which examples --examples draws")
    p.add_argument("--json", action="store_true", help="print everything as JSON")
    p.set_defaults(func=cmd_data)

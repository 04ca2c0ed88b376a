"""Data sets: readers, name resolution, subsampling.

Readers turn files into immutable examples:

* :func:`read_conll` -- NER, one ``token TAG`` per line (CoNLL, MasakhaNER) or the Rahimi WikiAnn
  format (``en:token<TAB>TAG``), blank line between sentences, IOB2 tags;
* :func:`read_classification` -- sentiment, JSONL / JSON / CSV / TSV with a text and a label column.

:func:`resolve_dataset` turns a name (``masakhaner2:luo``, ``nusax:balinese``, ``wikiann:qu``,
``marc:en``, ``sentipers``, ``sentiraama``), a folder or a file into a :class:`Corpus`, whose
``load("train" | "dev" | "test")`` reads a split lazily. Local corpora are looked up in, in order:
``data_dir``, ``$METAXL_DATA``, ``./data``, ``../shared/data`` (the last two relative to the current
directory).

>>> import tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> _ = (folder / "train.txt").write_text("Obama B-PER\\nspoke O\\n\\nNairobi B-LOC\\n")
>>> corpus = resolve_dataset(str(folder / "train.txt"))
>>> corpus.task, [ex.tags for ex in corpus.load("train")]
('ner', [('B-PER', 'O'), ('B-LOC',)])
>>> subsample(list(range(10)), 3, seed=1)
[1, 2, 4]
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError, DataError

__all__ = [
    "NERExample",
    "SAExample",
    "Example",
    "Corpus",
    "read_conll",
    "read_classification",
    "marc_label",
    "sentipers_label",
    "nusax_label",
    "resolve_dataset",
    "subsample",
    "available_languages",
    "data_dirs",
    "download_dir",
    "RELATED_LANGUAGES",
    "related_source",
    "SPLITS",
]


@dataclass(frozen=True)
class NERExample:
    """One sentence: words and their IOB2 tags (same length).

    >>> NERExample(("Nairobi", "is"), ("B-LOC", "O")).tags
    ('B-LOC', 'O')
    """

    tokens: tuple[str, ...]
    tags: tuple[str, ...]


@dataclass(frozen=True)
class SAExample:
    """One text and its label.

    >>> SAExample("great food", "positive").label
    'positive'
    """

    text: str
    label: str


Example = NERExample | SAExample
T = TypeVar("T")

SPLITS = ("train", "dev", "test")
_SPLIT_ALIASES = {"train": "train", "dev": "dev", "valid": "dev", "validation": "dev", "test": "test"}
_SPLIT_FILE_STEMS = {"train": ("train",), "dev": ("dev", "valid", "validation"), "test": ("test",)}
NER_EXTENSIONS = (".txt", ".conll", ".iob", ".iob2", ".bio", ".tsv")
SA_EXTENSIONS = (".jsonl", ".json", ".csv")
TEXT_FIELDS = ("text", "sentence", "review_body", "review", "content")
LABEL_FIELDS = ("label", "sentiment", "polarity", "stars", "star_rating")
SA_LABEL_SCHEMES = ("binary", "3way", "all")
DATA_ENV = "METAXL_DATA"

# ----------------------------------------------------------------------------------------------
# small helpers


def _read_text(path: Path) -> str:
    """Read a UTF-8 (optionally BOM-prefixed) file, with user-facing errors."""
    if not path.exists():
        raise DataError(f"{path}: file not found; check the path (relative paths start at {Path.cwd()})")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, expected a file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte {data[e.start:e.start + 1]!r}); re-save the file as UTF-8"
        ) from None


def _split_lines(text: str) -> list[str]:
    # only \n, \r\n and \r end a line (str.splitlines would also split on \x1c, \u2028, ...)
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _short(value: str, limit: int = 60) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


# ----------------------------------------------------------------------------------------------
# CoNLL / Rahimi WikiAnn

_TAG_RE = re.compile(r"^(O|[BI]-\S+)$")
_BIOES_RE = re.compile(r"^[ESLU]-\S+$")
_FIELD_SPLIT = re.compile(r"[ \t]+")
_LANG_PREFIX = re.compile(r"^([a-z]{2,3}(?:-[a-z0-9]{1,8}){0,2}|simple):(.+)$")


def _check_tag(tag: str, path: Path, lineno: int, line: str) -> None:
    if _TAG_RE.match(tag):
        return
    if _BIOES_RE.match(tag):
        raise DataError(
            f"{path}:{lineno}: tag {tag!r} is BIOES/BILOU, metaxl reads IOB2 only; convert the file "
            f"(S-X -> B-X, E-X/L-X -> I-X, U-X -> B-X) and retry"
        )
    raise DataError(
        f"{path}:{lineno}: tag {tag!r} in line {_short(line)} is not an IOB2 tag; expected 'O', "
        f"'B-TYPE' or 'I-TYPE' in the last column of 'token TAG' lines"
    )


def _to_iob2(tags: list[str]) -> tuple[str, ...]:
    """IOB1 / bare ``I-`` starts to IOB2: an ``I-X`` not continuing an ``X`` span becomes ``B-X``."""
    out: list[str] = []
    prev_type: str | None = None
    for tag in tags:
        if tag == "O":
            prev_type = None
            out.append(tag)
            continue
        prefix, typ = tag[0], tag[2:]
        if prefix == "I" and prev_type != typ:
            tag = "B-" + typ
        prev_type = typ
        out.append(tag)
    return tuple(out)


def read_conll(path: str | Path) -> list[NERExample]:
    """Read an NER file: ``token TAG`` lines, blank line between sentences.

    The tag is the last whitespace-separated column and the token the first (so CoNLL-2003's
    ``token POS chunk TAG`` works). Rahimi WikiAnn files (``en:token<TAB>TAG``) lose their language
    prefix when every token of the file carries the same one. ``-DOCSTART-`` lines are skipped,
    CRLF is fine, IOB1 is converted to IOB2. Malformed lines, BIOES tags and empty files raise
    :class:`~metaxl.errors.DataError` naming ``file:line``.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "wiki.txt"
    >>> _ = p.write_text("qu:Lima\\tB-LOC\\nqu:llaqta\\tO\\n\\nqu:Cusco\\tI-LOC\\n")
    >>> read_conll(p)
    [NERExample(tokens=('Lima', 'llaqta'), tags=('B-LOC', 'O')), NERExample(tokens=('Cusco',), tags=('B-LOC',))]
    """
    path = Path(path)
    text = _read_text(path)
    sentences: list[tuple[list[str], list[str]]] = []
    tokens: list[str] = []
    tags: list[str] = []
    seen_tags: set[str] = set()
    for lineno, raw in enumerate(_split_lines(text), start=1):
        line = raw.strip(" \t")
        if not line:
            if tokens:
                sentences.append((tokens, tags))
                tokens, tags = [], []
            continue
        first, _, rest = line.partition(" ")
        if "\t" in line or " " in rest:
            fields = _FIELD_SPLIT.split(line)
            first, tag = fields[0], (fields[-1] if len(fields) > 1 else "")
        else:
            tag = rest
        if "DOCSTART" in first and (first == "-DOCSTART-" or first.endswith(":-DOCSTART-")):
            if tokens:
                sentences.append((tokens, tags))
                tokens, tags = [], []
            continue
        if not tag:
            raise DataError(
                f"{path}:{lineno}: expected 'token TAG' (two whitespace-separated columns), got "
                f"{_short(line)}; put the tag after the token, and leave a blank line between sentences"
            )
        if tag not in seen_tags:
            _check_tag(tag, path, lineno, line)
            seen_tags.add(tag)
        tokens.append(first)
        tags.append(tag)
    if tokens:
        sentences.append((tokens, tags))
    if not sentences:
        raise DataError(
            f"{path}: no sentences found (empty file, or only -DOCSTART- lines); expected one "
            f"'token TAG' per line with a blank line between sentences"
        )
    # Rahimi WikiAnn: strip a language prefix shared by every token of the file
    prefix: str | None = None
    for toks, _ in sentences:
        for tok in toks:
            m = _LANG_PREFIX.match(tok)
            if m is None or (prefix is not None and m.group(1) != prefix):
                prefix = None
                break
            prefix = m.group(1)
        else:
            continue
        break
    cut = len(prefix) + 1 if prefix else 0
    return [NERExample(tuple(t[cut:] for t in toks), _to_iob2(tg)) for toks, tg in sentences]


# ----------------------------------------------------------------------------------------------
# classification files

LabelMap = Mapping[str, str | None] | Callable[[str], str | None]


def marc_label(stars: int | str, sa_labels: str = "binary") -> str | None:
    """Map an Amazon review star rating to a sentiment label (MARC, as the paper).

    1-2 -> negative, 4-5 -> positive, 3 -> dropped (None) with ``binary``, ``neutral`` with
    ``3way``; ``all`` keeps the stars as labels. Anything else raises ValueError.

    >>> [marc_label(s) for s in (1, 2, 3, 4, "5")]
    ['negative', 'negative', None, 'positive', 'positive']
    >>> marc_label(3, "3way")
    'neutral'
    """
    value = _as_int(stars, range(1, 6), "a star rating 1-5")
    if sa_labels == "all":
        return str(value)
    if value <= 2:
        return "negative"
    if value >= 4:
        return "positive"
    return "neutral" if sa_labels == "3way" else None


def sentipers_label(polarity: int | str, sa_labels: str = "binary") -> str | None:
    """Map a SentiPers polarity (-2..2) to a sentiment label (as the paper).

    -2/-1 -> negative, 1/2 -> positive, 0 -> dropped (``binary``) or ``neutral`` (``3way``);
    ``all`` keeps the polarity.

    >>> [sentipers_label(p) for p in (-2, -1, 0, 1, "+2")]
    ['negative', 'negative', None, 'positive', 'positive']
    """
    value = _as_int(polarity, range(-2, 3), "a polarity -2..2")
    if sa_labels == "all":
        return str(value)
    if value < 0:
        return "negative"
    if value > 0:
        return "positive"
    return "neutral" if sa_labels == "3way" else None


def nusax_label(label: str, sa_labels: str = "binary") -> str | None:
    """NusaX-Senti labels: positive / neutral / negative; ``binary`` drops neutral.

    >>> nusax_label("Neutral"), nusax_label("neutral", "3way"), nusax_label("positive")
    (None, 'neutral', 'positive')
    """
    value = str(label).strip().lower()
    if value not in ("positive", "neutral", "negative"):
        raise ValueError("expected positive, neutral or negative")
    if value == "neutral" and sa_labels == "binary":
        return None
    return value


def _generic_label(sa_labels: str) -> Callable[[str], str | None]:
    """Labels kept as they are, except that ``binary`` drops 'neutral'."""

    def convert(value: str) -> str | None:
        if sa_labels == "binary" and value.strip().lower() == "neutral":
            return None
        return value

    return convert


def _as_int(value: int | str, allowed: range, what: str) -> int:
    try:
        number = float(str(value).strip())
    except ValueError:
        raise ValueError(f"expected {what}") from None
    if not number.is_integer() or int(number) not in allowed:
        raise ValueError(f"expected {what}")
    return int(number)


def _raw_label(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _pick_field(fields: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str,
                path: Path, option: str) -> str:
    lower = {f.strip().lower(): f for f in fields if isinstance(f, str)}
    if wanted is not None:
        if wanted in fields:
            return wanted
        if wanted.lower() in lower:
            return lower[wanted.lower()]
        raise DataError(f"{path}: no {what} column {wanted!r}; the columns are: {', '.join(map(str, fields))}")
    for name in candidates:
        if name in lower:
            return lower[name]
    raise DataError(
        f"{path}: cannot find the {what} column among {', '.join(map(str, fields)) or '(none)'}; "
        f"name it one of {', '.join(candidates)} or pass {option}"
    )


def read_classification(
    path: str | Path,
    *,
    text_field: str | None = None,
    label_field: str | None = None,
    label_map: LabelMap | None = None,
) -> list[SAExample]:
    """Read a sentiment file: JSONL (``.jsonl``; ``.json`` may also be one JSON array), CSV or TSV.

    The text column is the first of text / sentence / review_body / review / content and the label
    column the first of label / sentiment / polarity / stars / star_rating (case-insensitive)
    unless given. ``label_map`` (a dict or a function of the raw label string) converts labels; a
    ``None`` result drops the row. Errors name ``file:line`` and the offending value.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "reviews.csv"
    >>> _ = p.write_text('id,review_body,stars\\n1,"Good, ""really"" good",5\\n2,meh,3\\n')
    >>> read_classification(p, label_map=marc_label)
    [SAExample(text='Good, "really" good', label='positive')]
    """
    path = Path(path)
    text = _read_text(path)
    suffix = path.suffix.lower()
    rows = _json_rows(path, text, suffix) if suffix in (".jsonl", ".json") else _delimited_rows(path, text, suffix)
    if not rows:
        raise DataError(f"{path}: no examples found; expected one text and label per row")

    fields: list[str] = []
    for _, item in rows:
        for key in item:
            if key not in fields:
                fields.append(key)
    tcol = _pick_field(fields, text_field, TEXT_FIELDS, "text", path, "text_field")
    lcol = _pick_field(fields, label_field, LABEL_FIELDS, "label", path, "label_field")

    examples: list[SAExample] = []
    lines: list[int] = []
    dropped = 0
    for lineno, item in rows:
        text_value = item.get(tcol)
        raw = item.get(lcol)
        if text_value is None or not str(text_value).strip():
            raise DataError(f"{path}:{lineno}: missing text ({tcol!r}); every row needs a text")
        if raw is None or _raw_label(raw) == "":
            raise DataError(f"{path}:{lineno}: missing label ({lcol!r}); every row needs a label")
        label = _map_label(_raw_label(raw), label_map, f"{path}:{lineno}")
        if label is None:
            dropped += 1
            continue
        examples.append(SAExample(str(text_value), str(label)))
        lines.append(lineno)
    if examples:
        _check_label_typos(path, [e.label for e in examples], lines)
    if not examples:
        raise DataError(
            f"{path}: no examples left: all {dropped} rows were dropped by the label mapping "
            f"(e.g. neutral rows with sa_labels=binary); use --sa-labels 3way or other data"
        )
    return examples


def _json_rows(path: Path, text: str, suffix: str) -> list[tuple[int, dict[str, Any]]]:
    """(line or item number, object) of a JSONL file, or of a ``.json`` file holding one array."""
    rows: list[tuple[int, dict[str, Any]]] = []
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); fix the file") from None
        for i, item in enumerate(items, start=1):
            if not isinstance(item, dict):
                raise DataError(f"{path}: item {i} is {_short(str(item))}, expected an object with text and label")
            rows.append((i, item))
        return rows
    for lineno, line in enumerate(_split_lines(text), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{lineno}: not a JSON object ({e.msg}): {_short(line)}; JSONL needs one "
                f"object per line"
            ) from None
        if not isinstance(item, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {_short(line)}")
        rows.append((lineno, item))
    return rows


def _delimited_rows(path: Path, text: str, suffix: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row by column name) of a CSV (``.csv``) or TSV file with a header line."""
    delimiter = "," if suffix == ".csv" else "\t"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows: list[tuple[int, dict[str, Any]]] = []
    header: list[str] | None = None
    start = 1
    try:
        for row in reader:
            lineno, start = start, reader.line_num + 1
            if not row or all(not cell.strip() for cell in row):
                continue
            if header is None:
                header = [cell.strip() for cell in row]
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{path}:{lineno}: {len(row)} columns, but the header ({', '.join(header)}) has "
                    f"{len(header)}; quote fields that contain {'commas' if delimiter == ',' else 'tabs'} "
                    f'with double quotes ("...")'
                )
            rows.append((lineno, dict(zip(header, row, strict=True))))
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed {suffix.lstrip('.') or 'TSV'} ({e}); fix the quoting") from None
    if header is None:
        raise DataError(f"{path}: empty file; expected a header line (e.g. text,label) and one row per example")
    return rows


def _map_label(raw: str, label_map: LabelMap | None, where: str) -> str | None:
    """``raw`` through ``label_map`` (a dict or a function; None drops the row)."""
    if label_map is None:
        return raw
    try:
        if callable(label_map):
            return label_map(raw)
        if raw not in label_map:
            raise ValueError(f"known labels: {', '.join(map(str, label_map))}")
        return label_map[raw]
    except ValueError as e:
        raise DataError(f"{where}: label {raw!r} cannot be mapped ({e})") from None


def _check_label_typos(path: Path, labels: Sequence[str], lines: Sequence[int]) -> None:
    """Raise on a rare label that looks like a misspelling of a frequent one (``positve`` among
    hundreds of ``positive``): it would silently become a class of its own.

    >>> _check_label_typos(Path("t.csv"), ["positive"] * 9 + ["negative"] * 9 + ["positve"], range(2, 21))
    Traceback (most recent call last):
    metaxl.errors.DataError: t.csv:20: label 'positve' (1 row) looks like a typo of 'positive' (9 rows); fix the label, or rename it if it is a class of its own
    """
    import difflib
    from collections import Counter

    counts = Counter(labels)
    for label, n in counts.items():
        frequent = [x for x, m in counts.items() if m >= max(5, 5 * n) and x != label]
        norm = {x.strip().lower(): x for x in frequent}
        close = difflib.get_close_matches(label.strip().lower(), list(norm), n=1, cutoff=0.8)
        if close:
            other = norm[close[0]]
            line = lines[labels.index(label)]
            raise DataError(f"{path}:{line}: label {label!r} ({n} row{'s' if n > 1 else ''}) looks like a typo of "
                            f"{other!r} ({counts[other]} rows); fix the label, or rename it if it is a class of its own")


# ----------------------------------------------------------------------------------------------
# corpora


class Corpus:
    """A resolved data set: ``name``, ``task`` ("ner" | "sa") and ``load(split)``.

    ``location`` says where the data comes from (a folder, a file or a hub id). Splits are read on
    first use and cached; ``load`` returns a fresh list each time.

    >>> c = Corpus("toy", "sa", lambda split: [SAExample("ok", "positive")])
    >>> c.load("dev")
    [SAExample(text='ok', label='positive')]
    """

    def __init__(self, name: str, task: str, loader: Callable[[str], list[Any]], location: str = "") -> None:
        self.name = name
        self.task = task
        self.location = location or name
        self._loader = loader
        self._cache: dict[str, list[Any]] = {}

    def load(self, split: str) -> list[NERExample] | list[SAExample]:
        """Read ``split`` ("train", "dev" or "test"; "valid"/"validation" mean "dev")."""
        key = _SPLIT_ALIASES.get(str(split).strip().lower())
        if key is None:
            raise DataError(f"{self.name}: unknown split {split!r}; use train, dev or test")
        if key not in self._cache:
            self._cache[key] = self._loader(key)
        return list(self._cache[key])

    def __repr__(self) -> str:
        return f"Corpus(name={self.name!r}, task={self.task!r}, location={self.location!r})"


def download_dir() -> Path:
    """Where ``metaxl data download`` puts corpora by default, and the last folder searched.

    ``$METAXL_CACHE/data``, else ``~/.cache/metaxl/data``.

    >>> download_dir().name
    'data'
    """
    env = os.environ.get("METAXL_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "metaxl") / "data"


def data_dirs(data_dir: str | Path | None = None) -> list[Path]:
    """The folders searched for local corpora, in order.

    ``data_dir``, ``$METAXL_DATA``, ``./data``, ``../shared/data`` (relative to the current
    directory), then :func:`download_dir` (``~/.cache/metaxl/data``).

    >>> [str(p) for p in data_dirs("/corpora")][0]
    '/corpora'
    """
    found: list[Path] = []
    for item in (data_dir, os.environ.get(DATA_ENV) or None, "data", os.path.join("..", "shared", "data"),
                 download_dir()):
        if item is None:
            continue
        p = Path(item).expanduser()
        p = p if p.is_absolute() else (Path.cwd() / p)
        p = Path(os.path.normpath(p))
        if p not in found:
            found.append(p)
    return found


# where to get the offline corpora, and their folder names under a data folder
_HOW_TO_GET = {
    "masakhaner2": (
        "or get MasakhaNER 2.0 from github.com/masakhane-io/masakhane-ner (folder MasakhaNER2.0/"
        "transfer_corpus) and lay it out as masakhaner2/<lang>/{train,dev,test}.txt under one of them "
        f"(or set ${DATA_ENV} / --data-dir)"
    ),
    "nusax": (
        "or get NusaX-Senti from github.com/IndoNLP/nusax (folder datasets/sentiment) and lay it out as "
        f"nusax-senti/<language>/{{train,valid,test}}.csv under one of them (or set ${DATA_ENV} / --data-dir)"
    ),
}
_FOLDERS = {
    "masakhaner2": ("masakhaner2", "MasakhaNER2.0", "masakhaner"),
    "nusax": ("nusax-senti", "nusax", "nusax_senti"),
    "wikiann": ("wikiann",),
    "marc": ("marc", "amazon_reviews_multi"),
    "sentipers": ("sentipers",),
    "sentiraama": ("sentiraama",),
}
_CORPUS_ALIASES = {
    "masakhaner2": "masakhaner2",
    "masakhaner": "masakhaner2",
    "nusax": "nusax",
    "nusax-senti": "nusax",
    "nusax_senti": "nusax",
    "wikiann": "wikiann",
    "panx": "wikiann",
    "marc": "marc",
    "amazon_reviews_multi": "marc",
    "sentipers": "sentipers",
    "sentiraama": "sentiraama",
}
_TASK_OF = {"masakhaner2": "ner", "wikiann": "ner", "nusax": "sa", "marc": "sa", "sentipers": "sa", "sentiraama": "sa"}
_NUSAX_CODES = {
    "ace": "acehnese", "ban": "balinese", "bjn": "banjarese", "bug": "buginese", "eng": "english",
    "en": "english", "ind": "indonesian", "id": "indonesian", "jav": "javanese", "mad": "madurese",
    "min": "minangkabau", "nij": "ngaju", "sun": "sundanese", "bbc": "toba_batak",
}
MARC_LANGUAGES = ("de", "en", "es", "fr", "ja", "zh")
PAPER_WIKIANN_LANGUAGES = ("qu", "cdo", "ilo", "xmf", "mhr", "mi", "tk", "gn", "en", "es", "zh", "id", "ka", "ru", "tr")
# Hugging Face dataset ids tried in order (the first that loads wins)
HUB_IDS: dict[str, tuple[str, ...]] = {
    "wikiann": ("unimelb-nlp/wikiann", "wikiann"),
    "marc": ("amazon_reviews_multi", "mteb/amazon_reviews_multi"),
}
_HUB_SPLIT = {"train": "train", "dev": "validation", "test": "test"}


def _split_file(folder: Path, split: str, exts: Sequence[str]) -> Path | None:
    for stem in _SPLIT_FILE_STEMS[split]:
        for ext in exts:
            candidate = folder / f"{stem}{ext}"
            if candidate.is_file():
                return candidate
    return None


def _task_of_file(path: Path, task: str | None) -> str:
    suffix = path.suffix.lower()
    if task in ("ner", "sa"):
        if task == "ner" and suffix in SA_EXTENSIONS:
            raise DataError(
                f"{path}: a {suffix} file holds sentiment data, but task=ner; NER needs CoNLL "
                f"'token TAG' files ({', '.join(NER_EXTENSIONS)})"
            )
        return task
    if suffix in SA_EXTENSIONS:
        return "sa"
    if suffix in NER_EXTENSIONS:
        return "ner"
    raise DataError(
        f"{path}: unknown file type {suffix or '(no extension)'}; use {', '.join(NER_EXTENSIONS)} for NER "
        f"('token TAG' lines) or {', '.join(SA_EXTENSIONS)} for sentiment (or pass --task)"
    )


def _reader(task: str, sa_labels: str, label_map: LabelMap | None = None) -> Callable[[Path], list[Any]]:
    if task == "ner":
        return read_conll
    mapping: LabelMap = label_map if label_map is not None else _generic_label(sa_labels)
    return lambda p: read_classification(p, label_map=mapping)


def _folder_corpus(name: str, folder: Path, task: str | None, sa_labels: str,
                   label_map: LabelMap | None = None) -> Corpus:
    exts = NER_EXTENSIONS + SA_EXTENSIONS
    files = {s: _split_file(folder, s, exts) for s in SPLITS}
    present = [f for f in files.values() if f is not None]
    if not present:
        seen = sorted(p.name for p in folder.iterdir())[:20] if folder.is_dir() else []
        raise DataError(
            f"{folder}: no train/dev/test files; expected train, dev (or valid) and test with an extension "
            f"{', '.join(exts)}; found: {', '.join(seen) or 'nothing'}"
        )
    tasks = {_task_of_file(f, task) for f in present}
    if len(tasks) > 1:
        raise DataError(
            f"{folder}: mixes NER files and sentiment files ({', '.join(p.name for p in present)}); "
            f"pass --task ner or --task sa, or keep one kind of file"
        )
    the_task = tasks.pop()
    read = _reader(the_task, sa_labels, label_map)

    def load(split: str) -> list[Any]:
        path = files[split]
        if path is None:
            names = ", ".join(f"{s}{e}" for s in _SPLIT_FILE_STEMS[split] for e in exts[:3])
            raise DataError(
                f"{name}: no {split} file in {folder} (looked for {names}, ...); add one to the folder"
            )
        return read(path)

    return Corpus(name, the_task, load, str(folder))


def _file_corpus(path: Path, task: str | None, sa_labels: str) -> Corpus:
    the_task = _task_of_file(path, task)
    read = _reader(the_task, sa_labels)
    used: list[str] = []

    def load(split: str) -> list[Any]:
        if used and used[0] != split:
            raise DataError(
                f"{path} is a single file and already serves the {used[0]} split, so it cannot also be the "
                f"{split} split; pass a folder with train, dev and test files instead"
            )
        used[:] = [split]
        return read(path)

    return Corpus(str(path), the_task, load, str(path))


def _find_local(corpus: str, lang: str | None, data_dir: str | Path | None) -> tuple[Path | None, list[Path]]:
    """First existing ``<base>/<folder>[/<lang>]``, and every path looked at."""
    looked: list[Path] = []
    for base in data_dirs(data_dir):
        for folder in _FOLDERS[corpus]:
            p = base / folder
            if lang is not None:
                p = p / lang
            looked.append(p)
            if p.is_dir():
                return p, looked
    return None, looked


def available_languages(corpus_name: str, data_dir: str | Path | None = None) -> list[str]:
    """Languages of a named corpus found locally (sorted).

    For hub corpora (wikiann, marc) the locally present languages are joined with the known ones
    (MARC's six, and the WikiAnn languages the paper used). An absent local corpus gives ``[]``.

    >>> available_languages("marc", data_dir="/nonexistent")
    ['de', 'en', 'es', 'fr', 'ja', 'zh']
    """
    corpus = _CORPUS_ALIASES.get(corpus_name.strip().lower().rstrip(":"))
    if corpus is None or corpus in ("sentipers", "sentiraama"):
        raise DataError(
            f"unknown corpus {corpus_name!r}; corpora with languages: masakhaner2, nusax, wikiann, marc"
        )
    langs: set[str] = set()
    for base in data_dirs(data_dir):
        for folder in _FOLDERS[corpus]:
            p = base / folder
            if p.is_dir():
                langs.update(c.name for c in p.iterdir() if c.is_dir() and not c.name.startswith("."))
    if corpus == "marc":
        langs.update(MARC_LANGUAGES)
    if corpus == "wikiann":
        langs.update(PAPER_WIKIANN_LANGUAGES)
    return sorted(langs)


def _absent(corpus: str, name: str, spec: str, looked: list[Path], data_dir: str | Path | None) -> DataError:
    paths = ", ".join(str(p) for p in looked)
    command = f"metaxl data download {name}" + (f" --data-dir {data_dir}" if data_dir is not None else "")
    where = data_dir if data_dir is not None else (os.environ.get(DATA_ENV) or download_dir())
    return DataError(
        f"{spec}: data set not found; looked in: {paths}. To get it: {command} (into {where}), "
        f"{_HOW_TO_GET[corpus]}"
    )


_NOTICED: set[str] = set()


def _packaged_corpus(corpus: str, name: str, lang: str, ctask: str, sa_labels: str,
                     label_map: LabelMap | None) -> Corpus | None:
    """The demo subset shipped in the package (``metaxl/demo_data``), announced once per process."""
    from .demo_subsets import DEMO_DATA_DIR

    folder = DEMO_DATA_DIR / _FOLDERS[corpus][0] / lang
    if not folder.is_dir():
        return None
    inner = _folder_corpus(name, folder, ctask, sa_labels, label_map)
    sizes = ", ".join(
        f"{f.read_text(encoding='utf-8').count(chr(10) + chr(10))} {split}"
        for split in SPLITS if (f := folder / f"{split}.txt").is_file()
    )
    if name not in _NOTICED:
        _NOTICED.add(name)
        print(f"metaxl: {name} is in no data folder; using the demo subset shipped with metaxl ({sizes} "
              f"sentences; CC BY-NC 4.0). The full corpus: metaxl data download {name}", file=sys.stderr)

    def load(split: str) -> list[Any]:
        if _split_file(folder, split, NER_EXTENSIONS + SA_EXTENSIONS) is None:
            raise DataError(
                f"{name}: the demo subset shipped with metaxl has no {split} split ({folder}); get the full "
                f"corpus: metaxl data download {name}"
            )
        return inner.load(split)

    return Corpus(name, ctask, load, str(folder))


def _hub_loader(corpus: str, lang: str | None, spec: str, sa_labels: str, looked: list[Path]) -> Callable[[str], list[Any]]:
    local = ", ".join(str(p) for p in looked[:2]) + (", ..." if len(looked) > 2 else "")
    if corpus == "wikiann":
        layout = f"wikiann/{lang}/{{train,dev,test}}.txt ('token TAG' or Rahimi 'lang:token<TAB>TAG' lines)"
    else:
        layout = f"marc/{lang}/{{train,dev,test}}.jsonl (review_body and stars fields)"
    offline_help = (
        f"offline, put the files in a data folder as {layout} (looked for: {local}) or pass a folder "
        f"with train/dev/test files instead of {spec}"
    )

    def load(split: str) -> list[Any]:
        try:
            import datasets  # type: ignore[import-not-found]
        except ImportError:
            raise DataError(
                f"{spec} is loaded from the Hugging Face hub, which needs the datasets package and internet: "
                f"pip install datasets (or pip install 'metaxl[hub]'); {offline_help}"
            ) from None
        errors: list[str] = []
        for hub_id in HUB_IDS[corpus]:
            try:
                ds = datasets.load_dataset(hub_id, lang, split=_HUB_SPLIT[split])
            except Exception as e:  # noqa: BLE001 - any hub failure is reported to the user
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                errors.append(f"{hub_id}: {type(e).__name__}: {first[:200]}")
                continue
            return _convert_hub(corpus, hub_id, ds, spec, sa_labels)
        raise DataError(
            f"{spec}: could not load it from the Hugging Face hub ({'; '.join(errors)}); this needs "
            f"internet; {offline_help}"
        )

    return load


def _convert_hub(corpus: str, hub_id: str, ds: Any, spec: str, sa_labels: str) -> list[Any]:
    if corpus == "wikiann":
        names = ds.features["ner_tags"].feature.names
        out_ner = [
            NERExample(tuple(row["tokens"]), _to_iob2([names[t] for t in row["ner_tags"]]))
            for row in ds
            if row["tokens"]
        ]
        if not out_ner:
            raise DataError(f"{spec}: the hub split {hub_id} is empty")
        return out_ner
    out_sa: list[SAExample] = []
    for row in ds:
        if "stars" in row:
            stars, text = row["stars"], row.get("review_body") or row.get("text") or ""
        else:  # mteb/amazon_reviews_multi: label 0..4
            stars, text = int(row["label"]) + 1, row.get("text") or ""
        label = marc_label(stars, sa_labels)
        if label is not None:
            out_sa.append(SAExample(str(text), label))
    if not out_sa:
        raise DataError(f"{spec}: no examples left from the hub split {hub_id}")
    return out_sa


def _marc_map(sa_labels: str) -> Callable[[str], str | None]:
    generic = _generic_label(sa_labels)
    return lambda v: marc_label(v, sa_labels) if _looks_int(v) else generic(v)


def _sentipers_map(sa_labels: str) -> Callable[[str], str | None]:
    generic = _generic_label(sa_labels)
    return lambda v: sentipers_label(v, sa_labels) if _looks_int(v) else generic(v)


def _looks_int(value: str) -> bool:
    return re.fullmatch(r"[+-]?\d+(\.0+)?", value.strip()) is not None


def resolve_dataset(
    spec: str,
    data_dir: str | Path | None = None,
    *,
    task: str | None = None,
    sa_labels: str = "binary",
) -> Corpus:
    """Turn a data set name, folder or file into a :class:`Corpus` (nothing is read yet).

    Names: ``masakhaner2:<lang>``, ``nusax:<language>`` (or ``nusax-senti:``; ISO codes such as
    ``ban`` work), ``wikiann:<lang>`` and ``marc:<lang>`` (local folder first, else the Hugging Face
    hub through the ``datasets`` package), ``sentipers``, ``sentiraama`` (local folder only).
    A folder holds train/dev(valid)/test files (.txt/.conll/.iob/.tsv: NER unless ``task="sa"``;
    .jsonl/.json/.csv: sentiment). A single file serves one split only. ``sa_labels`` ("binary",
    "3way", "all") sets the sentiment label scheme: binary drops neutral, as the paper.

    >>> resolve_dataset("marc:en", data_dir="/nonexistent")
    Corpus(name='marc:en', task='sa', location='hub:amazon_reviews_multi/en')
    """
    if task in (None, "auto"):
        task = None
    elif task not in ("ner", "sa"):
        raise ConfigError(f"task={task!r} is not valid; choose one of: auto, ner, sa")
    if sa_labels not in SA_LABEL_SCHEMES:
        raise ConfigError(f"sa_labels={sa_labels!r} is not valid; choose one of: {', '.join(SA_LABEL_SCHEMES)}")
    spec = str(spec).strip()
    if not spec:
        raise DataError("empty data set name; give a name such as masakhaner2:luo, a folder or a file")

    path = Path(spec).expanduser()
    if path.is_dir():
        return _folder_corpus(spec, path, task, sa_labels)
    if path.is_file():
        return _file_corpus(path, task, sa_labels)

    corpus, lang = _corpus_and_language(spec, path, data_dir)
    name = f"{corpus}:{lang}" if lang else corpus
    ctask = _TASK_OF[corpus]
    if task is not None and task != ctask:
        raise ConfigError(f"task={task} but {name} is a{'n NER' if ctask == 'ner' else ' sentiment'} data set; use task={ctask} or auto")
    if corpus in ("masakhaner2", "nusax"):
        return _downloadable_corpus(spec, corpus, name, lang, data_dir, sa_labels)
    return _other_corpus(spec, corpus, name, lang, data_dir, sa_labels)


def _corpus_and_language(spec: str, path: Path, data_dir: str | Path | None) -> tuple[str, str]:
    """A data set name's corpus (aliases resolved) and language (lower case; NusaX ISO codes
    resolved; "" for the corpora without languages)."""
    head, _, lang = spec.partition(":")
    corpus = _CORPUS_ALIASES.get(head.strip().lower())
    if corpus is None:
        raise DataError(
            f"unknown data set {spec!r}: not an existing file or folder (looked at {path.resolve()}) and not "
            f"a known name; use masakhaner2:<lang>, nusax:<language>, wikiann:<lang>, marc:<lang>, "
            f"sentipers, sentiraama, or a folder with train/dev/test files"
        )
    lang = lang.strip()
    if lang.lower() in ("", "none"):
        lang = ""
    if corpus in ("sentipers", "sentiraama"):
        if lang:
            raise DataError(f"{spec}: {corpus} has no languages; write just {corpus}")
    elif not lang:
        langs = available_languages(corpus, data_dir)
        raise DataError(
            f"{spec}: name a language, e.g. {corpus}:{langs[0] if langs else 'xx'}; "
            f"available: {', '.join(langs) or 'none found locally'}"
            + (f" (metaxl data download {corpus}:<lang> fetches one)" if corpus in ("masakhaner2", "nusax") else "")
        )
    lang = lang.lower()
    if corpus == "nusax":
        lang = _NUSAX_CODES.get(lang, lang)
    return corpus, lang


def _downloadable_corpus(spec: str, corpus: str, name: str, lang: str, data_dir: str | Path | None,
                         sa_labels: str) -> Corpus:
    """MasakhaNER 2.0 and NusaX: a local folder, else the demo subset shipped with metaxl, else an
    error saying how to download it."""
    ctask = _TASK_OF[corpus]
    folder, looked = _find_local(corpus, lang, data_dir)
    label_map = (lambda v: nusax_label(v, sa_labels)) if corpus == "nusax" else None
    if folder is not None:
        return _folder_corpus(name, folder, ctask, sa_labels, label_map)
    packaged = _packaged_corpus(corpus, name, lang, ctask, sa_labels, label_map)
    if packaged is not None:
        return packaged
    from .download import languages

    langs = available_languages(corpus, data_dir)
    if langs and lang not in languages(corpus):
        raise DataError(
            f"{spec}: unknown {corpus} language {lang!r}; available: {', '.join(langs)} (here); "
            f"metaxl data download {corpus}:<lang> fetches {', '.join(languages(corpus))}"
        )
    raise _absent(corpus, name, spec, looked, data_dir)


def _other_corpus(spec: str, corpus: str, name: str, lang: str, data_dir: str | Path | None,
                  sa_labels: str) -> Corpus:
    """WikiAnn and MARC (a local folder, else the Hugging Face hub), SentiPers and Sentiraama (a
    local folder only)."""
    ctask = _TASK_OF[corpus]
    folder, looked = _find_local(corpus, lang or None, data_dir)
    label_map: LabelMap | None = None
    if corpus == "marc":
        label_map = _marc_map(sa_labels)
    elif corpus == "sentipers":
        label_map = _sentipers_map(sa_labels)
    if folder is not None:
        return _folder_corpus(name, folder, ctask, sa_labels, label_map)
    if corpus in ("wikiann", "marc"):
        return Corpus(name, ctask, _hub_loader(corpus, lang, spec, sa_labels, looked),
                      f"hub:{HUB_IDS[corpus][0]}/{lang}")
    source = {
        "sentipers": "SentiPers (github.com/phosseini/sentipers; polarity -2..2)",
        "sentiraama": "Sentiraama (Telugu, IIIT Hyderabad LTRC; labels positive/negative)",
    }[corpus]
    looked_s = ", ".join(str(p) for p in looked)
    raise DataError(  # raised here, not on load: `metaxl sweep --dry-run` and prepare_data see it at once
        f"{spec}: not found locally (looked in: {looked_s}) and not on the Hugging Face hub in the "
        f"paper's form; get {source}, write {corpus}/{{train,dev,test}}.jsonl (or .csv) with text and "
        f"label (or polarity) fields into a data folder, or pass a folder with train/dev/test files"
    )


# ----------------------------------------------------------------------------------------------
# subsampling


def subsample(examples: Sequence[T], n: int | None, seed: int) -> list[T]:
    """``n`` examples drawn with ``random.Random(seed)``, kept in their original order.

    ``n=None`` or ``n >= len(examples)`` returns all of them, in order.

    >>> subsample("abcdef", 3, seed=0) == subsample("abcdef", 3, seed=0)
    True
    >>> subsample([3, 1, 2], None, seed=0)
    [3, 1, 2]
    """
    if n is None or n >= len(examples):
        return list(examples)
    if n < 0:
        raise ConfigError(f"sample size must be >= 0 (or None for all), got {n}")
    chosen = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in chosen]


# ----------------------------------------------------------------------------------------------
# related source languages

_FR = "French, the official/contact language: shared named entities (places, people, organisations), Latin script"
RELATED_LANGUAGES: dict[str, tuple[str, str]] = {
    # MetaXL paper, Table 2 (WikiAnn, Rahimi splits)
    "wikiann:qu": ("wikiann:es", "paper: Spanish, contact language of Quechua (Peru, Bolivia)"),
    "wikiann:gn": ("wikiann:es", "paper: Spanish, contact language of Guarani (Paraguay)"),
    "wikiann:cdo": ("wikiann:zh", "paper: Chinese, Min Dong is a Sinitic language"),
    "wikiann:ilo": ("wikiann:id", "paper: Indonesian, Austronesian like Ilocano"),
    "wikiann:mi": ("wikiann:id", "paper: Indonesian, Austronesian like Maori"),
    "wikiann:xmf": ("wikiann:ka", "paper: Georgian, Kartvelian like Mingrelian"),
    "wikiann:mhr": ("wikiann:ru", "paper: Russian, contact language of Meadow Mari"),
    "wikiann:tk": ("wikiann:tr", "paper: Turkish, Oghuz Turkic like Turkmen"),
    # MasakhaNER 2.0 targets -> a source present in masakhaner2/
    "masakhaner2:am": ("masakhaner2:ar", "Arabic, the only other Semitic language present (different script)"),
    "masakhaner2:bam": ("masakhaner2:fr", "Mali: " + _FR),
    "masakhaner2:bbj": ("masakhaner2:fr", "Cameroon (Ghomala' region is francophone): " + _FR),
    "masakhaner2:ewe": ("masakhaner2:fon", "Fon, a Gbe language closely related to Ewe"),
    "masakhaner2:fon": ("masakhaner2:ewe", "Ewe, a Gbe language closely related to Fon"),
    "masakhaner2:hau": ("masakhaner2:pcm", "Nigerian Pidgin: same country's entities, Latin script, English-based"),
    "masakhaner2:ibo": ("masakhaner2:yor", "Yoruba, Volta-Niger relative spoken in Nigeria"),
    "masakhaner2:yor": ("masakhaner2:ibo", "Igbo, Volta-Niger relative spoken in Nigeria"),
    "masakhaner2:kin": ("masakhaner2:lug", "Luganda, Great Lakes Bantu relative of Kinyarwanda"),
    "masakhaner2:lug": ("masakhaner2:kin", "Kinyarwanda, Great Lakes Bantu relative of Luganda"),
    "masakhaner2:luo": ("masakhaner2:swa", "Swahili, Kenya's lingua franca: shared Kenyan entities (no other Nilotic language present)"),
    "masakhaner2:mos": ("masakhaner2:fr", "Burkina Faso: " + _FR),
    "masakhaner2:nya": ("masakhaner2:sna", "Shona, neighbouring Southern-Central Bantu (Malawi/Zambia/Zimbabwe)"),
    "masakhaner2:sna": ("masakhaner2:nya", "Chichewa, neighbouring Southern-Central Bantu"),
    "masakhaner2:pcm": ("masakhaner2:en", "English, the lexifier of Nigerian Pidgin"),
    "masakhaner2:swa": ("masakhaner2:lug", "Luganda, East African Bantu (Uganda, where Swahili is official)"),
    "masakhaner2:tsn": ("masakhaner2:zul", "isiZulu, Southern Bantu of South Africa (no Sotho-Tswana source present)"),
    "masakhaner2:twi": ("masakhaner2:ewe", "Ewe, Kwa relative spoken next to Twi in Ghana"),
    "masakhaner2:wol": ("masakhaner2:fr", "Senegal: " + _FR + ", many French loans"),
    "masakhaner2:xho": ("masakhaner2:zul", "isiZulu, Nguni sibling, largely mutually intelligible"),
    "masakhaner2:zul": ("masakhaner2:xho", "isiXhosa, Nguni sibling, largely mutually intelligible"),
}
for _lang in ("acehnese", "balinese", "banjarese", "buginese", "javanese", "madurese", "minangkabau",
              "ngaju", "sundanese", "toba_batak"):
    RELATED_LANGUAGES[f"nusax:{_lang}"] = (
        "nusax:indonesian",
        "Indonesian, the national language: Malayo-Polynesian relative, heavy lexical contact (NusaX is parallel)",
    )


def _canonical(spec: str) -> str:
    head, _, lang = spec.strip().partition(":")
    corpus = _CORPUS_ALIASES.get(head.lower(), head.lower())
    lang = lang.strip().lower()
    if corpus == "nusax":
        lang = _NUSAX_CODES.get(lang, lang)
    return f"{corpus}:{lang}" if lang else corpus


def related_source(spec: str) -> tuple[str, str]:
    """The related-language source for a target (from :data:`RELATED_LANGUAGES`) and why.

    >>> related_source("nusax-senti:balinese")[0]
    'nusax:indonesian'
    >>> related_source("wikiann:qu")
    ('wikiann:es', 'paper: Spanish, contact language of Quechua (Peru, Bolivia)')
    """
    key = _canonical(spec)
    if key not in RELATED_LANGUAGES:
        known = ", ".join(sorted(RELATED_LANGUAGES))
        raise DataError(
            f"no related source language known for {spec!r}; pass --source yourself (e.g. the English "
            f"corpus, masakhaner2:en or nusax:english); known targets: {known}"
        )
    return RELATED_LANGUAGES[key]

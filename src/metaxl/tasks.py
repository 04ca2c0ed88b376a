"""Labels, tokenisation with label alignment, collation, metrics (NER and sentiment).

NER is labelled on the first sub-word of each word (the rest and special tokens get -100);
predictions are mapped back to every gold word, and words cut off by truncation are predicted
``O``. Metrics are in percent; ``f1`` is the headline (NER span micro-F1 with seqeval; sentiment
F1 of the positive class for binary labels, macro-F1 otherwise).

>>> from metaxl.data import NERExample
>>> reconcile_labels("ner", [NERExample(("Juba",), ("B-LOC",))], [[NERExample(("Ann",), ("B-PER",))]])
['O', 'B-LOC', 'I-LOC', 'B-PER', 'I-PER']
>>> round(compute_metrics("sa", ["positive", "negative"], ["positive", "positive"], ["negative", "positive"])["f1"], 2)
66.67
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .data import Example, NERExample, SAExample
from .errors import DataError, ModelError

if TYPE_CHECKING:
    import torch

__all__ = [
    "TASKS",
    "IGNORE_INDEX",
    "reconcile_labels",
    "check_labels",
    "encode",
    "collate",
    "predictions_to_labels",
    "probabilities",
    "compute_metrics",
]

TASKS = ("ner", "sa")
IGNORE_INDEX = -100
_TASK_NAMES = {"ner": "NER", "sa": "sentiment"}


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def _task_of(example: Any) -> str | None:
    if isinstance(example, NERExample):
        return "ner"
    if isinstance(example, SAExample):
        return "sa"
    return None


def _check_examples(task: str, examples: Sequence[Any], what: str) -> None:
    if not examples:
        return
    kind = _task_of(examples[0])  # a corpus has one task, so the first example tells
    if kind != task:
        got = _TASK_NAMES.get(kind or "", type(examples[0]).__name__)
        raise DataError(
            f"{what} holds {got} examples but the task is {_TASK_NAMES[task]}; use data sets of one "
            f"task (NER: CoNLL 'token TAG' files, sentiment: text + label files)"
        )


def _entity_types(examples: Sequence[Any]) -> set[str]:
    types: set[str] = set()
    for ex in examples:
        for tag in ex.tags:
            if tag != "O":
                types.add(tag[2:])
    return types


def reconcile_labels(
    task: str,
    target_train: Sequence[Example],
    sources: Sequence[Sequence[Example]],
    *,
    names: Sequence[str] | None = None,
) -> list[str]:
    """One label list for the target and all sources.

    NER: ``O`` then ``B-T``, ``I-T`` for every entity type T (sorted) of the target and the
    sources (types only a source has are kept). Sentiment: the sorted label set, which must be the
    same for every source as for the target. ``names`` (target first, then sources) only make the
    error messages clearer.

    >>> from metaxl.data import SAExample
    >>> reconcile_labels("sa", [SAExample("a", "positive"), SAExample("b", "negative")], [])
    ['negative', 'positive']
    """
    _check_task(task)
    label_names = list(names) if names is not None else []
    tname = label_names[0] if label_names else "the target"

    def sname(i: int) -> str:
        return label_names[i + 1] if len(label_names) > i + 1 else f"source #{i + 1}"

    if not target_train:
        raise DataError(f"{tname}: no training examples; the target needs at least one")
    _check_examples(task, target_train, tname)
    for i, src in enumerate(sources):
        if not src:
            raise DataError(f"{sname(i)}: no training examples")
        _check_examples(task, src, sname(i))
    if task == "ner":
        types = _entity_types(target_train)
        for src in sources:
            types |= _entity_types(src)
        labels = ["O"]
        for typ in sorted(types):
            labels += [f"B-{typ}", f"I-{typ}"]
        return labels
    target_set = {ex.label for ex in target_train if isinstance(ex, SAExample)}
    for i, src in enumerate(sources):
        source_set = {ex.label for ex in src if isinstance(ex, SAExample)}
        if source_set != target_set:
            raise DataError(
                f"sentiment labels differ: {tname} has {sorted(target_set)} but {sname(i)} has "
                f"{sorted(source_set)}; use the same scheme for both (--sa-labels binary drops neutral, "
                f"--sa-labels 3way keeps positive/neutral/negative) or relabel the data"
            )
    return sorted(target_set)


def check_labels(examples: Sequence[Example], labels: Sequence[str], where: str) -> None:
    """Raise DataError naming the first label of ``examples`` that is not in ``labels``.

    >>> from metaxl.data import NERExample
    >>> check_labels([NERExample(("x",), ("B-LOC",))], ["O", "B-LOC", "I-LOC"], "dev")
    """
    known = set(labels)
    for i, ex in enumerate(examples):
        found = ex.tags if isinstance(ex, NERExample) else (ex.label,)
        for label in found:
            if label not in known:
                raise DataError(
                    f"{where}: example {i + 1} has label {label!r}, which the training data does not have "
                    f"(labels: {', '.join(labels)}); relabel it, or train with data that has this label"
                )


def _label_id(label: str, label2id: Mapping[str, int], where: str, index: int) -> int:
    try:
        return label2id[label]
    except KeyError:
        raise DataError(
            f"{where}: example {index + 1} has label {label!r}, not among the model's labels "
            f"({', '.join(label2id)}); relabel the data or train with this label"
        ) from None


def _word_ids(enc: Any, tokenizer: Any) -> list[int | None]:
    try:
        return list(enc.word_ids())
    except (ValueError, AttributeError):
        raise ModelError(
            f"{type(tokenizer).__name__} is not a fast tokenizer, so words cannot be aligned with sub-words; "
            f"use a model folder with a tokenizer.json"
        ) from None


def encode(
    task: str,
    examples: Sequence[Example],
    tokenizer: Any,
    label2id: Mapping[str, int],
    max_length: int,
    *,
    where: str = "data",
) -> list[dict[str, Any]]:
    """Tokenise examples into features (plain lists, padded later by :func:`collate`).

    Every feature has ``input_ids``, ``attention_mask``, ``labels`` and ``index`` (position in
    ``examples``). NER: words are tokenised with ``is_split_into_words=True`` (a fast tokenizer is
    needed), ``labels`` holds the tag id on each word's first sub-word and -100 elsewhere,
    ``word_ids[w]`` is the position of word w's first sub-word (-1 when truncated away) and
    ``n_words`` the number of words. A word that tokenises to nothing is replaced by the unknown
    token (or, without one, left at -1 and predicted ``O``). Sentiment: ``labels`` is the label id.
    An empty NER tag tuple or sentiment label ``""`` means unlabelled (-100).

    >>> from tokenizers import Tokenizer, models, pre_tokenizers
    >>> from transformers import PreTrainedTokenizerFast
    >>> vocab = {"[UNK]": 0, "[PAD]": 1, "nai": 2, "##robi": 3, "is": 4}
    >>> raw = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    >>> raw.pre_tokenizer = pre_tokenizers.Whitespace()
    >>> tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]")
    >>> f = encode("ner", [NERExample(("nairobi", "is"), ("B-LOC", "O"))], tok, {"O": 0, "B-LOC": 1}, 16)[0]
    >>> f["input_ids"], f["labels"], f["word_ids"]
    ([2, 3, 4], [1, -100, 0], [0, 2])
    """
    _check_task(task)
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if task == "sa":
        return _encode_sa(examples, tokenizer, label2id, max_length, where)
    return _encode_ner(examples, tokenizer, label2id, max_length, where)


def _encode_sa(examples: Sequence[Example], tokenizer: Any, label2id: Mapping[str, int], max_length: int,
               where: str) -> list[dict[str, Any]]:
    features: list[dict[str, Any]] = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, SAExample):
            raise DataError(f"{where}: example {i + 1} is not a sentiment example; the task is sentiment")
        enc = tokenizer(ex.text, truncation=True, max_length=max_length)
        label = IGNORE_INDEX if ex.label == "" else _label_id(ex.label, label2id, where, i)
        features.append({
            "input_ids": list(enc["input_ids"]),
            "attention_mask": list(enc["attention_mask"]),
            "labels": label,
            "index": i,
        })
    return features


def _encode_ner(examples: Sequence[Example], tokenizer: Any, label2id: Mapping[str, int], max_length: int,
                where: str) -> list[dict[str, Any]]:
    features: list[dict[str, Any]] = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, NERExample):
            raise DataError(f"{where}: example {i + 1} is not an NER example; the task is NER")
        words = list(ex.tokens)
        labelled = len(ex.tags) > 0
        if labelled and len(ex.tags) != len(words):
            raise DataError(f"{where}: example {i + 1} has {len(words)} words but {len(ex.tags)} tags")
        tag_ids = [_label_id(t, label2id, where, i) for t in ex.tags] if labelled else []
        enc, wids, first = _tokenize_words(tokenizer, words, max_length)
        labels = [IGNORE_INDEX] * len(wids)
        if labelled:
            for w, pos in enumerate(first):
                if pos >= 0:
                    labels[pos] = tag_ids[w]
        features.append({
            "input_ids": list(enc["input_ids"]),
            "attention_mask": list(enc["attention_mask"]),
            "labels": labels,
            "word_ids": first,
            "n_words": len(words),
            "index": i,
        })
    return features


def _tokenize_words(tokenizer: Any, words: list[str], max_length: int) -> tuple[Any, list[int | None], list[int]]:
    """The encoding of a word list, its word ids and each word's first position; words that give no
    pieces are replaced (in ``words``) by the unknown token, when the tokenizer has one."""
    def encode_words() -> tuple[Any, list[int | None], list[int]]:
        enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
        wids = _word_ids(enc, tokenizer)
        return enc, wids, _first_positions(wids, len(words))

    enc, wids, first = encode_words()
    if getattr(tokenizer, "unk_token", None) and words:
        # a word without a position produced no pieces, unless it was truncated away (words
        # after the last one seen, when the encoding is full)
        last_seen = max((w for w in wids if w is not None), default=-1)
        truncated = len(wids) >= max_length
        empty = [w for w in range(len(words)) if first[w] < 0 and (w < last_seen or not truncated)]
        if empty:
            for w in empty:
                words[w] = tokenizer.unk_token
            enc, wids, first = encode_words()
    return enc, wids, first


def _first_positions(word_ids: Sequence[int | None], n_words: int) -> list[int]:
    first = [-1] * n_words
    for pos, w in enumerate(word_ids):
        if w is not None and 0 <= w < n_words and first[w] < 0:
            first[w] = pos
    return first


def collate(features: Sequence[Mapping[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch of features into tensors: ``input_ids`` (with ``pad_token_id``),
    ``attention_mask`` (0 on padding) and ``labels`` (NER: -100 on padding; sentiment: one id each).

    >>> batch = collate([{"input_ids": [5, 6], "attention_mask": [1, 1], "labels": [1, -100]},
    ...                  {"input_ids": [7], "attention_mask": [1], "labels": [0]}], pad_token_id=1)
    >>> batch["input_ids"].tolist(), batch["labels"].tolist()
    ([[5, 6], [7, 1]], [[1, -100], [0, -100]])
    """
    import torch

    if not features:
        raise ValueError("collate needs at least one feature")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None: the tokenizer has no padding token")
    width = max(len(f["input_ids"]) for f in features)
    n = len(features)
    input_ids = torch.full((n, width), int(pad_token_id), dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    token_level = isinstance(features[0]["labels"], (list, tuple))
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long) if token_level else torch.empty(n, dtype=torch.long)
    for row, f in enumerate(features):
        length = len(f["input_ids"])
        input_ids[row, :length] = torch.tensor(f["input_ids"], dtype=torch.long)
        attention[row, :length] = torch.tensor(f["attention_mask"], dtype=torch.long)
        if token_level:
            labels[row, : len(f["labels"])] = torch.tensor(f["labels"], dtype=torch.long)
        else:
            labels[row] = int(f["labels"])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def _rows(logits: Any) -> list[Any]:
    """Per-feature numpy arrays from a tensor, an array or a list of either."""
    import numpy as np

    def to_np(x: Any) -> Any:
        if hasattr(x, "detach"):
            return x.detach().float().cpu().numpy()
        return np.asarray(x, dtype=np.float64)

    if isinstance(logits, (list, tuple)):
        return [to_np(x) for x in logits]
    return list(to_np(logits))


def predictions_to_labels(
    task: str,
    features: Sequence[Mapping[str, Any]],
    logits: Any,
    id2label: Mapping[int, str] | Sequence[str],
) -> list[Any]:
    """Turn model outputs into labels: one tag list per sentence (NER, one tag per gold word,
    ``O`` for truncated words) or one label per text (sentiment).

    ``logits`` is one row per feature: a list of ``[seq_len, n_labels]`` / ``[n_labels]`` tensors
    or arrays, or one batched tensor (padding beyond a feature's length is ignored).

    >>> feats = [{"word_ids": [0, -1], "n_words": 2}]
    >>> predictions_to_labels("ner", feats, [[[0.1, 2.0], [3.0, 0.0]]], ["O", "B-LOC"])
    [['B-LOC', 'O']]
    """
    _check_task(task)
    rows = _rows(logits)
    if len(rows) != len(features):
        raise ValueError(f"{len(features)} features but {len(rows)} rows of logits")
    out: list[Any] = []
    for f, row in zip(features, rows, strict=True):
        if task == "sa":
            out.append(id2label[int(row.argmax(-1))])
            continue
        best = row.argmax(-1)
        tags = []
        for pos in f["word_ids"]:
            tags.append(id2label[int(best[pos])] if 0 <= pos < len(best) else "O")
        out.append(tags)
    return out


def probabilities(logits: Any, id2label: Mapping[int, str] | Sequence[str]) -> list[dict[str, float]]:
    """Softmax of sentiment logits, one ``{label: probability}`` per text.

    >>> probabilities([[0.0, 0.0]], ["negative", "positive"])
    [{'negative': 0.5, 'positive': 0.5}]
    """
    out = []
    for row in _rows(logits):
        values = [float(v) for v in row]
        top = max(values)
        exps = [math.exp(v - top) for v in values]
        total = sum(exps)
        out.append({id2label[k]: e / total for k, e in enumerate(exps)})
    return out


def compute_metrics(task: str, gold: Sequence[Any], pred: Sequence[Any], labels: Sequence[str]) -> dict[str, Any]:
    """Metrics in percent, always with ``f1`` (the headline) and ``headline`` (its name).

    NER (seqeval, default mode, IOB2 spans): ``precision``, ``recall``, ``f1`` (micro), ``macro_f1``,
    ``per_type`` {type: {precision, recall, f1, support}}. Sentiment: ``accuracy``, ``macro_f1``,
    ``per_label`` and ``f1`` = F1 of ``positive`` for labels {negative, positive} (of the second
    label for other binary sets), else macro-F1.

    >>> m = compute_metrics("ner", [["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "I-PER", "O", "B-ORG"]],
    ...                     ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"])
    >>> m["precision"], m["recall"], m["f1"], m["per_type"]["PER"]["f1"]
    (50.0, 50.0, 50.0, 100.0)
    """
    _check_task(task)
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold items but {len(pred)} predictions")
    if task == "ner":
        return _ner_metrics(gold, pred, labels)
    return _sa_metrics(gold, pred, labels)


def _pct(x: float) -> float:
    return float(x) * 100.0


def _ner_metrics(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]], labels: Sequence[str]) -> dict[str, Any]:
    from seqeval.metrics.sequence_labeling import get_entities

    for i, (g, p) in enumerate(zip(gold, pred, strict=True)):
        if len(g) != len(p):
            raise ValueError(f"sentence {i}: {len(g)} gold tags but {len(p)} predicted")
    # span counting as seqeval's default (conlleval-like) mode, done here so empty cases are defined
    types = sorted({lab[2:] for lab in labels if lab != "O"})
    true_spans: set[tuple[int, str, int, int]] = set()
    pred_spans: set[tuple[int, str, int, int]] = set()
    for i, (g, p) in enumerate(zip(gold, pred, strict=True)):
        true_spans.update((i, t, s, e) for t, s, e in get_entities(list(g)))
        pred_spans.update((i, t, s, e) for t, s, e in get_entities(list(p)))
    for _, t, _, _ in true_spans | pred_spans:
        if t not in types:
            types.append(t)

    def prf(tp: int, n_pred: int, n_true: int) -> tuple[float, float, float]:
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_true if n_true else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return _pct(precision), _pct(recall), _pct(f1)

    per_type: dict[str, dict[str, float]] = {}
    for t in types:
        ts = {s for s in true_spans if s[1] == t}
        ps = {s for s in pred_spans if s[1] == t}
        tp_p, tp_r, tp_f = prf(len(ts & ps), len(ps), len(ts))
        per_type[t] = {"precision": tp_p, "recall": tp_r, "f1": tp_f, "support": len(ts)}
    precision, recall, f1 = prf(len(true_spans & pred_spans), len(pred_spans), len(true_spans))
    present = [v["f1"] for v in per_type.values() if v["support"] > 0]
    n_tokens = sum(len(g) for g in gold)
    correct = sum(a == b for g, p in zip(gold, pred, strict=True) for a, b in zip(g, p, strict=True))
    return {
        "f1": f1,
        "headline": "span micro-F1 (seqeval)",
        "precision": precision,
        "recall": recall,
        "macro_f1": sum(present) / len(present) if present else 0.0,
        "token_accuracy": _pct(correct / n_tokens) if n_tokens else 0.0,
        "per_type": per_type,
        "support": len(true_spans),
    }


def _sa_metrics(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    names = list(labels)
    for lab in list(gold) + list(pred):
        if lab not in names:
            names.append(lab)
    per_label: dict[str, dict[str, float]] = {}
    for lab in names:
        tp = sum(1 for g, p in zip(gold, pred, strict=True) if g == lab and p == lab)
        n_pred = sum(1 for p in pred if p == lab)
        n_true = sum(1 for g in gold if g == lab)
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_true if n_true else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[lab] = {"precision": _pct(precision), "recall": _pct(recall), "f1": _pct(f1), "support": n_true}
    correct = sum(1 for g, p in zip(gold, pred, strict=True) if g == p)
    accuracy = _pct(correct / len(gold)) if gold else 0.0
    macro = sum(per_label[lab]["f1"] for lab in labels) / len(labels) if labels else 0.0
    result: dict[str, Any] = {"accuracy": accuracy, "macro_f1": macro, "per_label": per_label}
    if len(labels) == 2:
        positive = "positive" if set(labels) == {"negative", "positive"} else labels[1]
        result["f1"] = per_label[positive]["f1"]
        result["headline"] = f"F1 of {positive!r}"
    else:
        result["f1"] = macro
        result["headline"] = "macro-F1"
    return {"f1": result.pop("f1"), "headline": result.pop("headline"), **result}

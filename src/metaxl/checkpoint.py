"""Save and load trained metaxl models.

A checkpoint is a standard Hugging Face folder (``model.safetensors``, ``config.json``, tokenizer
files) plus ``metaxl.json`` (task, labels, max_length and the training config) and a model card,
``README.md`` (method, languages, data sizes, metrics, config: :func:`model_card`), so that a
shared checkpoint explains itself. transformers alone can load it
(``AutoModelForTokenClassification.from_pretrained(path)``); the RTN is not in it.

>>> loaded = load_checkpoint("runs/demo/metaxl/checkpoint")  # doctest: +SKIP
>>> loaded.task, loaded.labels[:3]                           # doctest: +SKIP
('ner', ['O', 'B-LOC', 'I-LOC'])
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelError

META_FILE = "metaxl.json"
CARD_FILE = "README.md"


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    task: str
    labels: list[str]
    max_length: int = 128
    meta: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(path: str | Path, model: Any, tokenizer: Any, task: str, labels: list[str],
                    max_length: int, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` + ``tokenizer`` + ``metaxl.json`` to ``path`` atomically (tmp, then rename).

    >>> save_checkpoint("out/checkpoint", model, tok, "sa", ["negative", "positive"], 128)  # doctest: +SKIP
    """
    from .guards import json_safe, save_dir_atomic

    path = Path(path)
    meta = {"task": task, "labels": list(labels), "max_length": int(max_length), **(extra or {})}

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps(json_safe(meta), indent=2, allow_nan=False))
        (tmp / CARD_FILE).write_text(model_card(meta), encoding="utf-8")

    save_dir_atomic(path, write, "the checkpoint")
    return path


def load_checkpoint(path: str | Path, device: str = "cpu") -> Loaded:
    """Load a checkpoint written by ``metaxl train`` (model in eval mode on ``device``).

    >>> loaded = load_checkpoint("runs/x/checkpoint")   # doctest: +SKIP
    """
    from transformers import (
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
    )

    path = Path(path)
    meta_path = path / META_FILE
    if not path.is_dir():
        raise ModelError(f"checkpoint folder not found: {path}; give the checkpoint folder metaxl train wrote "
                         "(OUTPUT_DIR/checkpoint)")
    if not meta_path.is_file():
        hint = ""
        if (path / "checkpoint" / META_FILE).is_file():
            hint = f" (did you mean {path / 'checkpoint'}?)"
        raise ModelError(f"{path} is not a metaxl checkpoint: {META_FILE} is missing{hint}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        task, labels = meta["task"], list(meta["labels"])
        if task not in ("ner", "sa") or not labels or not all(isinstance(x, str) for x in labels):
            raise KeyError("task must be ner or sa and labels a list of strings")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise ModelError(f"{meta_path}: unreadable ({err}); re-train or restore the file") from None
    cls = AutoModelForTokenClassification if task == "ner" else AutoModelForSequenceClassification
    try:
        model = cls.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # noqa: BLE001
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"could not load the model in {path}: {first}; re-train or restore the folder") from None
    from .models import check_tokenizer

    check_tokenizer(tokenizer, path, str(path))
    model.to(device).eval()
    return Loaded(model=model, tokenizer=tokenizer, task=task, labels=labels,
                  max_length=int(meta.get("max_length", 128)), meta=meta)


_METHOD_TEXT = {
    "target-only": "fine-tuned on the target language's training data only",
    "jt": "joint training (JT): fine-tuned on the source and target training data together",
    "jt-rtn": "joint training with a representation transformation network (RTN) trained jointly",
    "metaxl": "MetaXL: joint training with an RTN that transforms source representations, trained by "
              "meta-learning to help the target language",
}


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else "-" if value is None else str(value)


def model_card(meta: dict[str, Any]) -> str:
    """The ``README.md`` of a checkpoint folder, from its ``metaxl.json`` contents.

    >>> card = model_card({"task": "ner", "labels": ["O", "B-PER", "I-PER"], "max_length": 128,
    ...                    "config": {"method": "metaxl", "target": "masakhaner2:luo", "source": ["masakhaner2:en"],
    ...                               "model": "default", "rtn_layers": [-1], "epochs": 5},
    ...                    "epoch": 4, "dev": {"f1": 21.44}, "test": {"f1": 16.77, "headline": "span micro-F1"},
    ...                    "sizes": {"target_train": 100, "source_train": [150], "dev": 200, "test": 500}})
    >>> print(card.split("## Use")[0])  # doctest: +NORMALIZE_WHITESPACE
    ---
    library_name: transformers
    pipeline_tag: token-classification
    tags: [metaxl, cross-lingual, low-resource, ner]
    ---
    # metaxl: metaxl on masakhaner2:luo (ner)
    <BLANKLINE>
    MetaXL: joint training with an RTN that transforms source representations, trained by meta-learning to help the target language. Trained with metaxl (MetaXL, Xia et al., NAACL 2021).
    <BLANKLINE>
    | | |
    |---|---|
    | method | metaxl (RTN after layer(s) -1, not part of this model) |
    | task | ner, 3 labels: O, B-PER, I-PER |
    | target language | masakhaner2:luo: 100 training examples, dev 200, test 500 |
    | source language(s) | masakhaner2:en: 150 training examples |
    | base model | default |
    | best dev epoch | 4 of 5 |
    | dev f1 | 21.44 |
    | test f1 | 16.77 (span micro-F1) |
    <BLANKLINE>
    <BLANKLINE>
    """
    import yaml

    cfg = dict(meta.get("config") or {})
    task, method, target = meta.get("task", "?"), cfg.get("method", "?"), cfg.get("target", "?")
    pipeline = "token-classification" if task == "ner" else "text-classification"
    rows = _card_rows(meta, cfg)
    table = "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])
    auto = "AutoModelForTokenClassification" if task == "ner" else "AutoModelForSequenceClassification"
    return f"""---
library_name: transformers
pipeline_tag: {pipeline}
tags: [metaxl, cross-lingual, low-resource, {task}]
---
# metaxl: {method} on {target} ({task})

{_METHOD_TEXT.get(method, method)}. Trained with metaxl (MetaXL, Xia et al., NAACL 2021).

{table}

## Use

```bash
echo "one sentence per line" | metaxl predict PATH/TO/THIS/FOLDER
metaxl evaluate PATH/TO/THIS/FOLDER {target} --split test
```

```python
from metaxl import predict
predict("PATH/TO/THIS/FOLDER", "one sentence")
# or with transformers alone: {auto}.from_pretrained("PATH/TO/THIS/FOLDER")
```

The metrics are percentages on the target's dev and test splits (the test split evaluated once, on
the best dev epoch's weights). `metaxl.json` holds the label map and the full training record.

## Training configuration

```yaml
{yaml.safe_dump(cfg, sort_keys=False).rstrip()}
```
"""

def _card_rows(meta: dict[str, Any], cfg: dict[str, Any]) -> list[tuple[str, str]]:
    """The model card's table: method, task, languages and sizes, base model, metrics."""
    task, labels = meta.get("task", "?"), list(meta.get("labels", []))
    method = cfg.get("method", "?")
    sizes = meta.get("sizes") or {}
    sources = list(cfg.get("source") or []) if method != "target-only" else []
    src_sizes = sizes.get("source_train") or []
    test, dev = meta.get("test") or {}, meta.get("dev") or {}
    target = cfg.get("target", "?")
    target_row = f"{target}: {_fmt(sizes.get('target_train'))} training examples, dev {_fmt(sizes.get('dev'))}, " \
                 f"test {_fmt(sizes.get('test'))}" if sizes else str(target)
    rows = [("method", method + (f" (RTN after layer(s) {', '.join(map(str, cfg.get('rtn_layers', [])))}, "
                                 "not part of this model)" if method in ("jt-rtn", "metaxl") else "")),
            ("task", f"{task}, {len(labels)} labels: {', '.join(labels)}"),
            ("target language", target_row)]
    if sources:
        rows.append(("source language(s)", "; ".join(
            f"{s}: {_fmt(src_sizes[i]) if i < len(src_sizes) else '?'} training examples" for i, s in enumerate(sources))))
    rows.append(("base model", str(cfg.get("model", "?"))))
    if meta.get("vocab_added"):
        rows.append(("vocabulary", f"{meta['vocab_added']} target subword pieces added (paper Appendix C)"))
    rows.append(("best dev epoch", f"{_fmt(meta.get('epoch'))} of {_fmt(cfg.get('epochs'))}"))
    rows.append(("dev f1", _fmt(dev.get("f1"))))
    rows.append(("test f1", _fmt(test.get("f1")) + (f" ({test['headline']})" if test.get("headline") else "")))
    for key in ("accuracy", "macro_f1"):
        if key in test:
            rows.append((f"test {key}", _fmt(test[key])))
    return rows

# ---------------------------------------------------------------------------- the per-epoch training state
def training_state_dict(model: Any) -> dict[str, Any]:
    """What of ``model`` a resumable training state must hold: every entry of its state dict but
    the frozen parameters, which resuming loads unchanged from the model itself.

    With the study's frozen word embeddings (e5-small: 250k x 384, 96M of its 118M parameters) the
    per-epoch state save wrote 0.47 GB of model of which 0.38 GB never changes.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Embedding(10, 2), torch.nn.Linear(2, 1))
    >>> _ = net[0].weight.requires_grad_(False)
    >>> sorted(training_state_dict(net))
    ['1.bias', '1.weight']
    """
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k not in frozen}


def load_training_state_dict(model: Any, state: dict[str, Any]) -> None:
    """Load a :func:`training_state_dict` (or a whole state dict, as states saved before it were)
    into ``model``; only frozen parameters may be absent.

    >>> import torch
    >>> a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    >>> _ = a.bias.requires_grad_(False), b.bias.requires_grad_(False)
    >>> load_training_state_dict(b, training_state_dict(a))
    >>> torch.equal(a.weight, b.weight)
    True
    """
    missing, unexpected = model.load_state_dict(state, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    bad = sorted(set(missing) & trainable) + sorted(unexpected)
    if bad:
        raise ModelError(f"the saved training state does not fit this model ({', '.join(bad[:5])}); "
                         "delete the run's train_state/ folder to start it again")

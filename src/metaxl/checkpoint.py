"""Save and load trained metaxl models.

A checkpoint is a standard Hugging Face folder (``model.safetensors``, ``config.json``, tokenizer
files) plus ``metaxl.json`` (task, labels, max_length and the training config). transformers alone
can load it (``AutoModelForTokenClassification.from_pretrained(path)``); the RTN is not in it.

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

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
import shutil
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
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    meta = {"task": task, "labels": list(labels), "max_length": int(max_length), **(extra or {})}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
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
        raise ModelError(f"checkpoint folder not found: {path}")
    if not meta_path.is_file():
        hint = ""
        if (path / "checkpoint" / META_FILE).is_file():
            hint = f" (did you mean {path / 'checkpoint'}?)"
        raise ModelError(f"{path} is not a metaxl checkpoint: {META_FILE} is missing{hint}")
    try:
        meta = json.loads(meta_path.read_text())
        task, labels = meta["task"], list(meta["labels"])
    except (json.JSONDecodeError, KeyError) as err:
        raise ModelError(f"{meta_path}: unreadable ({err}); re-train or restore the file") from None
    cls = AutoModelForTokenClassification if task == "ner" else AutoModelForSequenceClassification
    try:
        model = cls.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # noqa: BLE001
        raise ModelError(f"could not load the model in {path}: {err}") from None
    model.to(device).eval()
    return Loaded(model=model, tokenizer=tokenizer, task=task, labels=labels,
                  max_length=int(meta.get("max_length", 128)), meta=meta)


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
    >>> _ = a.bias.requires_grad_(False)
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

"""Predictions on raw text from a trained checkpoint.

>>> from metaxl.checkpoint import load_checkpoint
>>> loaded = load_checkpoint("runs/demo/metaxl/checkpoint")              # doctest: +SKIP
>>> predict_lines(loaded, ["Raila Odinga nodhi Kisumu"])[0]["tags"]     # doctest: +SKIP
['B-PER', 'I-PER', 'O', 'B-LOC']
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from . import CallableModule


def predict_lines(loaded: Any, lines: list[str], device: torch.device | str = "cpu",
                  batch_size: int = 32) -> list[dict[str, Any]]:
    """NER: whitespace-tokenised words and one tag per word; SA: label and its probability.

    Returns one dict per line: ``{"tokens", "tags"}`` for NER, ``{"text", "label", "probability",
    "probabilities"}`` for sentiment.
    """
    from .data import NERExample, SAExample
    from .tasks import encode, predictions_to_labels, probabilities
    from .train import predict_features

    device = torch.device(device)
    labels = loaded.labels
    label2id = {label: i for i, label in enumerate(labels)}
    id2label = dict(enumerate(labels))
    if loaded.task == "ner":
        examples: list[Any] = [NERExample(tuple(line.split()), ()) for line in lines]
    else:
        examples = [SAExample(line.strip(), "") for line in lines]
    feats = encode(loaded.task, examples, loaded.tokenizer, label2id, loaded.max_length)
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    logits = predict_features(loaded.model, feats, pad, batch_size, device)
    preds = predictions_to_labels(loaded.task, feats, logits, id2label)
    if loaded.task == "ner":
        return [{"tokens": list(e.tokens), "tags": p} for e, p in zip(examples, preds, strict=True)]
    probs = probabilities(logits, id2label)
    return [{"text": e.text, "label": p, "probability": pr[p], "probabilities": pr}
            for e, p, pr in zip(examples, preds, probs, strict=True)]


sys.modules[__name__].__class__ = CallableModule  # metaxl.predict(...) is metaxl.api.predict (see metaxl.CallableModule)

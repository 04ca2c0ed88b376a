"""Vocabulary extension for languages the encoder never saw (paper, Appendix C; ``--extend-vocab N``).

A subword tokenizer of ``N`` pieces is trained with ``tokenizers`` on the target's training text,
through the model tokenizer's own normaliser and pre-tokeniser, with the model tokenizer's kind of
subword model (WordPiece: BERT, mBERT; Unigram: XLM-R, e5), so that its pieces have the model
vocabulary's form (``##ing``, ``▁kisumu``). The pieces the model's vocabulary lacks are added to it
(WordPiece: new entries; Unigram: new pieces with the score the target-trained model gave them),
the input embeddings are resized, and each new row is initialised as the mean of the embeddings of
the pieces the original tokenizer splits that string into. The extended tokenizer is saved with the
checkpoint, so ``load_checkpoint`` and ``metaxl predict`` use it.

>>> from metaxl.data import NERExample
>>> texts = target_texts([NERExample(("Raila", "Odinga"), ("B-PER", "I-PER"))])
>>> texts
['Raila Odinga']
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelError

logger = logging.getLogger("metaxl")

VOCAB_DIR = "extended_tokenizer"
"""In a run's output folder: the extended tokenizer (a resumed run reuses it: the trainers of
``tokenizers`` break frequency ties in a per-process random order, so a second training could differ)."""


@dataclass
class Extension:
    tokenizer: Any
    added: list[str]


def target_texts(examples: Sequence[Any]) -> list[str]:
    """The raw text of NER (words joined by spaces) or sentiment examples."""
    return [" ".join(e.tokens) if hasattr(e, "tokens") else e.text for e in examples]


def _backend_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError("--extend-vocab needs a fast tokenizer (tokenizer.json)")
    return json.loads(backend.to_str())


def train_pieces(tokenizer: Any, texts: list[str], size: int) -> list[tuple[str, float]]:
    """Train a ``size``-piece subword model of the tokenizer's kind on ``texts``; its pieces (and
    Unigram scores, 0.0 for WordPiece), specials and the model's unknown token left out."""
    from tokenizers import Tokenizer, models, trainers

    spec = _backend_json(tokenizer)
    kind = spec["model"]["type"]
    trainer_tok = Tokenizer.from_str(json.dumps(spec))
    specials = {t["content"] for t in spec.get("added_tokens", [])}
    if kind == "WordPiece":
        prefix = spec["model"].get("continuing_subword_prefix", "##")
        trainer_tok.model = models.WordPiece(unk_token=spec["model"].get("unk_token", "[UNK]"),
                                             continuing_subword_prefix=prefix)
        trainer: Any = trainers.WordPieceTrainer(vocab_size=size, special_tokens=[], show_progress=False,
                                                 continuing_subword_prefix=prefix)
    elif kind == "Unigram":
        trainer_tok.model = models.Unigram()
        trainer = trainers.UnigramTrainer(vocab_size=size, special_tokens=[], show_progress=False)
    else:
        raise ModelError(f"--extend-vocab supports WordPiece (BERT) and Unigram (XLM-R, e5) tokenizers; "
                         f"this model's is {kind}")
    trainer_tok.train_from_iterator(texts, trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    if kind == "WordPiece":
        pieces = [(p, 0.0) for p, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1])]
    else:
        pieces = [(p, float(s)) for p, s in trained["vocab"]]
    return [(p, s) for p, s in pieces if p not in specials]


def extend_tokenizer(tokenizer: Any, pieces: list[tuple[str, float]]) -> Extension:
    """A copy of ``tokenizer`` whose subword model also has ``pieces`` (those it lacks), ids appended."""
    from transformers import AutoTokenizer

    spec = _backend_json(tokenizer)
    model = spec["model"]
    if model["type"] == "WordPiece":
        vocab: dict[str, int] = model["vocab"]
        next_id = max([*vocab.values(), *(t["id"] for t in spec.get("added_tokens", []))]) + 1
        added = [p for p, _ in pieces if p not in vocab]
        for i, piece in enumerate(added):
            vocab[piece] = next_id + i
    elif model["type"] == "Unigram":
        known = {p for p, _ in model["vocab"]}
        top = max([len(model["vocab"]) - 1, *(t["id"] for t in spec.get("added_tokens", []))])
        if top != len(model["vocab"]) - 1:
            raise ModelError("--extend-vocab: this tokenizer has added tokens after its Unigram vocabulary")
        new = [(p, s) for p, s in pieces if p not in known]
        model["vocab"].extend([p, s] for p, s in new)
        added = [p for p, _ in new]
    else:
        raise ModelError(f"--extend-vocab does not support {model['type']} tokenizers")
    with tempfile.TemporaryDirectory(prefix="metaxl-vocab-") as tmp:
        tokenizer.save_pretrained(tmp)
        (Path(tmp) / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
        extended = AutoTokenizer.from_pretrained(tmp, use_fast=True)
    return Extension(extended, added)


def piece_string(piece: str, tokenizer: Any) -> str:
    """The text a piece stands for: without the WordPiece ``##`` or the SentencePiece ``▁``.

    >>> piece_string("##ing", None), piece_string("\u2581kisumu", None)
    ('ing', 'kisumu')
    """
    for mark in ("##", "\u2581"):
        if piece.startswith(mark) and len(piece) > len(mark):
            return piece[len(mark):]
    return piece


def resize_embeddings(model: Any, old_tokenizer: Any, new_tokenizer: Any, added: list[str]) -> None:
    """Grow the input embeddings to the new tokenizer; row of each added piece = the mean of the
    old tokenizer's pieces of its string (the mean of all rows when that string gives none)."""
    import torch

    emb = model.get_input_embeddings()
    old_rows = emb.weight.detach().clone()
    new_size = max(len(new_tokenizer), old_rows.shape[0])
    # no mean_resizing: its covariance over 250k rows is wasted on rows set here, and it logs that
    # the new rows are drawn from a normal distribution, which they are not
    model.resize_token_embeddings(new_size, mean_resizing=False)
    weight = model.get_input_embeddings().weight
    special = set(getattr(old_tokenizer, "all_special_ids", []) or [])
    mean = old_rows.mean(0)
    with torch.no_grad():
        weight[old_rows.shape[0]:] = mean  # a row no added piece names: the mean of all
        for piece in added:
            new_id = new_tokenizer.convert_tokens_to_ids(piece)
            ids = [i for i in old_tokenizer(piece_string(piece, old_tokenizer), add_special_tokens=False)["input_ids"]
                   if i not in special and i < old_rows.shape[0]]
            # an added piece may take a row the old matrix had spare (e5: ids 250002 on, 250037 rows)
            weight[new_id] = old_rows[ids].mean(0) if ids else mean


def extend_vocabulary(model: Any, tokenizer: Any, examples: Sequence[Any], size: int,
                      saved: Path | None = None, share: Any = None) -> Extension:
    """Appendix C end to end: train ``size`` pieces on the examples' text, add the new ones to the
    tokenizer and the model's embeddings. ``saved``: a folder holding the tokenizer of an earlier
    extension (a resumed run), used instead of training again. ``share``: makes every process of a
    distributed run use rank 0's pieces (:func:`metaxl.distributed.broadcast_object`)."""
    from transformers import AutoTokenizer

    if saved is not None and (saved / "tokenizer.json").is_file():
        extended = AutoTokenizer.from_pretrained(saved, use_fast=True)
        old = set(tokenizer.get_vocab())
        added = [p for p, _ in sorted(extended.get_vocab().items(), key=lambda kv: kv[1]) if p not in old]
        ext = Extension(extended, added)
    else:
        pieces = train_pieces(tokenizer, target_texts(examples), size)
        ext = extend_tokenizer(tokenizer, share(pieces) if share is not None else pieces)
    resize_embeddings(model, tokenizer, ext.tokenizer, ext.added)
    return ext

